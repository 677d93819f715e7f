"""A plan's dict is built once and shared by the checksum, the JSON and the templates; the JSON writer gives
byte for byte what `json.dumps(indent=2)` gives; a resource's address is built once."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from reconciler import plan as plan_module
from reconciler.planner import plan
from reconciler.render import _indented, render_json, render_markdown, render_text
from reconciler.resources import Resource

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
ODD = ["", "ø😀", "tab\there", "new\nline", 'quote " and \\ backslash', "\x00\x1f\x7f\u2028", "<!-- x -->"]


def fleet():
    desired = [Resource("hq", "permission", f"{name or 'x'}/door/OPEN",
                        {"start": "2026-01-01T00:00:00Z", "end": None, "schedule": [{"day": "mon", "from": "08:00",
                                                                                    "to": "18:00"}], "n": 3,
                         "f": 1.5, "b": True, "empty": {}, "none": []},
                        meta={"reason": name, "via": ("user",)}, source=f"p.yaml:{i}") for i, name in enumerate(ODD)]
    live = [Resource("hq", "permission", "gone/door/OPEN", {"end": "2027-01-01T00:00:00Z"}, id="p9")]
    return plan(desired, live, now=NOW)


def test_render_json_is_exactly_json_dumps():
    result = fleet()
    assert render_json(result) == json.dumps(result.to_dict(), indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    for value in ([], {}, [[]], {"a": {}}, [1, -2.5, 1e100, None, False, "x"], {"k": [{"a": [1, {"b": None}]}]}):
        assert _indented(value, 0) == json.dumps(value, indent=2, ensure_ascii=False)


def test_the_plan_dict_is_built_once(monkeypatch):
    result = fleet()
    built = []
    original = plan_module.Change.to_dict
    monkeypatch.setattr(plan_module.Change, "to_dict", lambda self: built.append(self) or original(self))
    checksum = result.checksum()
    render_text(result), render_json(result), render_markdown(result)
    assert result.to_dict()["checksum"] == checksum
    assert len(built) == len(result.changes)


def test_address_is_built_once_and_follows_replace():
    from dataclasses import replace

    resource = Resource("hq", "user", "alice")
    assert resource.address == "hq/user/alice"
    assert replace(resource, name="bob").address == "hq/user/bob"
    assert resource == Resource("hq", "user", "alice") and hash(resource.address) == hash("hq/user/alice")
