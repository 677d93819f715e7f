"""Vendor text in every command and every format: escaped once per sink, never a new line, a terminal
control sequence or a GitHub workflow command (finding 5).

The Abloy sandbox answers through a hostile rewrite that puts hostile strings into every text field it
returns (names, serial numbers, audit events, error details); each command then runs in-process through the
CLI, and its whole output (stdout and stderr) is checked.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re

import httpx
import pytest
from click.testing import CliRunner

from reconciler.cli import main
from reconciler.sandbox.abloy import SEED_DEVICES, AbloySimulator
from reconciler.text import EscapingFormatter, printable

NOW = "2026-11-22T10:00:00Z"
HOSTILE = ["x\ndecommission: true", "\x1b[2J", "a\rb", "::error::pwned", "::add-mask::x", "\u202etxt"]
EVIL = "::error::evil\n::add-mask::y\x1b[2J\rdecommission: true"

POLICY = f"""\
systems:
  hq: {{vendor: abloy-keyless, url: sandbox}}
users:
  alice: {{phone: "+4790000001"}}
devices:
  gym: {{system: hq, id: {SEED_DEVICES['Gym']}}}
  annex: {{system: hq, name: Annex}}
permissions:
  - users: [alice]
    devices: [gym, annex]
    start: 2026-01-01T00:00:00Z
    end: 2099-12-31T23:59:59Z
"""

TEXT_KEYS = {"name", "serialNumber", "eventName", "type", "detail", "title", "claimingStatus"}


def _poison(value):
    if isinstance(value, dict):
        return {k: (EVIL if k in TEXT_KEYS and isinstance(v, str) and k != "claimingStatus" else _poison(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_poison(v) for v in value]
    return value


@pytest.fixture
def hostile_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RECONCILER_STATE", raising=False)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(POLICY)
    honest = AbloySimulator.handle
    state = {"on": False, "fail_writes": False, "ids": False}

    def handle(self, request):
        if state["fail_writes"] and request.method == "POST" and request.url.path.endswith("/permission"):
            return httpx.Response(400, headers={"Content-Type": "application/problem+json"},
                                  json={"title": EVIL, "detail": EVIL})
        response = honest(self, request)
        if not state["on"] or request.method != "GET":
            return response
        response.read()
        body = _poison(response.json())
        if state["ids"] and request.url.path.endswith("/permission"):
            for item in body.get("items", []):
                item["userId"] = "\x1b[2J\x1b]0;owned\x07" + item["userId"]
        headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
        return httpx.Response(response.status_code, headers=headers, content=json.dumps(body).encode())
    monkeypatch.setattr(AbloySimulator, "handle", handle)
    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(main, list(args), catch_exceptions=False)
        return result.exit_code, result.stdout + (result.stderr if result.stderr_bytes is not None else "")

    # The devices exist at the vendor first (applied honestly), then the vendor turns hostile.
    code, output = invoke("apply", "--auto-approve", "--now", NOW)
    assert code == 0, output
    state["on"] = True
    return invoke, state


def assert_safe(output: str) -> None:
    assert "\x1b" not in output and "\r" not in output and "\u202e" not in output
    for line in output.splitlines():
        assert not line.lstrip().startswith("::"), line
        assert not line.lstrip().startswith("decommission"), line


@pytest.mark.parametrize("args", [
    ("plan", "--now", NOW),
    ("plan", "--now", NOW, "--format", "markdown"),
    ("plan", "--now", NOW, "--format", "json"),
    ("access", "--live"),
    ("access", "--live", "--format", "markdown"),
    ("access", "--live", "--format", "csv"),
    ("access", "--live", "--format", "json"),
    ("events", "hq", "gym"),
    ("export", "hq", "--out", "-"),
])
def test_hostile_vendor_text_is_escaped_in_every_command_and_format(hostile_cli, args):
    invoke, _ = hostile_cli
    code, output = invoke(*args)
    assert code in (0, 2), output
    assert_safe(output)
    if args[0] != "access":     # access shows people and doors by policy name; the rest show vendor text
        assert "evil" in output, output
    if "csv" in args:
        list(csv.reader(io.StringIO(output)))     # still a CSV
    if "json" in args:
        json.loads(output)


def test_apply_failure_lines_escape_the_vendors_error(hostile_cli, tmp_path):
    invoke, state = hostile_cli
    (tmp_path / "policies" / "p.yaml").write_text(POLICY.replace("devices: [gym, annex]", "devices: [gym]")
                                                  .replace("  alice:", "  bob: {}\n  alice:")
                                                  .replace("users: [alice]", "users: [alice, bob]"))
    state["fail_writes"] = True
    code, output = invoke("apply", "--auto-approve", "--now", NOW)
    assert code == 1, output
    assert "FAILED" in output or "failed" in output
    assert "evil" in output
    assert_safe(output)


@pytest.mark.parametrize("text", HOSTILE)
def test_log_lines_and_escapes_hold_for_each_hostile_string(text):
    record = logging.LogRecord("reconciler", logging.WARNING, __file__, 1, "change failed error=%s", (text,), None)
    line = EscapingFormatter("%(levelname)s %(name)s %(message)s").format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u202e" not in line
    shown = printable(text)
    assert not shown.startswith("::") and "\n" not in shown and "\x1b" not in shown


@pytest.mark.parametrize("fmt", ["text", "markdown", "csv"])
def test_access_live_with_hostile_vendor_ids(hostile_cli, fmt):
    # `access --live` showed a vendor's user id raw (ESC, OSC title sequences). An id is now checked by the
    # answer's model: one with control characters is a vendor fault, in one escaped line.
    invoke, state = hostile_cli
    state["ids"] = True
    code, output = invoke("access", "--live", "--format", fmt)
    assert_safe(output)
    assert "\x07" not in output
    assert code == 1 and re.search(r"hq: GET \S*/permission: the vendor's answer is malformed: items.0.userId", output)
