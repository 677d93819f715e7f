"""Untrusted text stays text: names, emails, reasons, file names and vendor text cannot end the pull-request
comment, open markup, add a line to a CI log or start a GitHub workflow command."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from click.testing import CliRunner

from reconciler.cli import main
from reconciler.plan import Note
from reconciler.planner import plan
from reconciler.render import code, md, render_markdown, render_text
from reconciler.resources import Resource

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
HOSTILE = "x\n<!-- ` | [link](https://evil.example.com) **\r::warning::pwned\u202e\x1b[2J"


def hostile_plan():
    window = {"start": "2026-01-01T00:00:00Z", "end": "2027-12-31T23:59:59Z", "key_validity": "P8D"}
    desired = [
        Resource("hq", "permission", "alice/front-gate/OPEN", window,
                 meta={"via": ("group:st`aff",), "reason": HOSTILE}, source=f"policies/{HOSTILE}.yaml:4"),
        Resource("guests", "temp_key", "cleaning", {"access": "users", "users": [f"{HOSTILE}@example.com"],
                 "start": "2026-11-23T08:00:00Z", "end": "2026-11-29T18:00:00Z", "max_uses": 10,
                 "description": HOSTILE}, source="policies/guests.yaml:2"),
        Resource("hq", "device", "front-gate", {"name": HOSTILE}, source="policies/devices.yaml:3"),
    ]
    live = [Resource("hq", "device", "front-gate", {"name": "Front Gate"}, id="d-1"),
            Resource("hq", "device", f"id:{HOSTILE}", {"name": HOSTILE}, id="99", managed=False)]
    return plan(desired, live, now=NOW, warnings=[Note("policies/x.yaml:1:1", HOSTILE)])


def test_markdown_comment_cannot_be_ended_or_marked_up():
    text = render_markdown(hostile_plan())
    assert "<!--" not in text and "<details" in text   # only the template's own tags remain
    assert not re.search(r"<(?!/?details>|/?summary>)", text), "no HTML from values"
    prose = re.sub(r"`[^`\n]*`", "", text)   # code spans render nothing but text
    assert not re.search(r"(?<!\\)\]\(", prose), "no link from values"
    assert not re.search(r"(?<!\\)\*\*\\r", prose), "no emphasis from values"
    assert "\r" not in text and "\u202e" not in text and "\x1b" not in text
    for line in text.splitlines():
        assert not line.startswith("::") and not line.startswith("<!--")
    assert "\\<\\!--" not in text and "&lt;\\!--" in text


def test_text_plan_keeps_every_value_on_its_line():
    text = render_text(hostile_plan())
    assert "\r" not in text and "\u202e" not in text and "\x1b" not in text
    for line in text.splitlines():
        assert "::warning::" not in line or not line.lstrip().startswith("::"), line
    assert "x\\n<!-- ` | [link](https://evil.example.com) **\\r::warning::pwned\\u202e\\x1b[2J" in text


def test_escapes():
    assert md("a_b *c* <b> `d` |e| [f](g) #h !i ~j \\k") == \
        "a\\_b \\*c\\* &lt;b&gt; \\`d\\` \\|e\\| \\[f\\](g) \\#h \\!i \\~j \\\\k"
    assert code("a`b|c\nd<!--") == "a'b\\|c\\nd&lt;!--"


def test_cli_error_lines_cannot_inject_workflow_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text('systems:\n  hq: {vendor: abloy-keyless, url: sandbox}\n'
                                     'users:\n  alice: {phone: "+47 1\\n::warning::pwned"}\n')
    result = CliRunner().invoke(main, ["validate", "p.yaml"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "p.yaml:4:18: '+47 1\\n::warning::pwned' is not a possible phone number: not a phone number"]
