"""When a change is in force on the lock, not merely accepted: the vendors' declarations (`Enforcement`), the
plan's `enforcement` object and exposure lines, through the harness as the CLI plans."""

from __future__ import annotations

from datetime import timedelta

import pytest

from harness import ABLOY, NOW, UNLOC, VendorHarness
from reconciler import render
from reconciler.resources import format_time
from reconciler.sandbox.abloy import SEED_DEVICES
from reconciler.sandbox.unloc import SEED_LOCKS

GYM = SEED_DEVICES["Gym"]


def abloy_policy(people: str, validity: str = "") -> str:
    extra = f"\n    key_validity: {validity}" if validity else ""
    return f"""\
users:
  alice: {{phone: "+4790000001"}}
  bob: {{phone: "+4790000002"}}
devices:
  server-room: {{system: hq, id: {GYM}}}
permissions:
  - users: [{people}]
    devices: [server-room]
    start: 2026-01-01T00:00:00Z
    end: 2027-12-31T23:59:59Z{extra}
"""


def revoked(h, validity=""):
    h.write(abloy_policy("alice, bob", validity))
    h.converge()
    h.now = NOW + timedelta(hours=3)
    h.write(abloy_policy("alice", validity))
    plan = h.plan()
    [change] = [c for c in plan.to_dict()["changes"] if c["effect"] == "revoke"]
    return plan, change


@pytest.mark.parametrize(("validity", "days"), [("", 8), ("P1D", 1)])
def test_abloy_revocation_is_in_force_by_now_plus_key_validity(tmp_path, validity, days):
    h = VendorHarness(tmp_path, ABLOY)
    plan, change = revoked(h, validity)
    until = format_time(h.now + timedelta(days=days))
    assert change["enforcement"]["by"] == until
    assert change["enforcement"]["from"] is None
    assert f"P{days}D" in change["enforcement"]["basis"]
    assert "key_validity" in change["enforcement"]["shorten"]
    text = render.render_text(plan)
    assert f"bob may open server-room offline until {until}: operating keys last P{days}D" in text
    assert f"Longest exposure: bob at server-room until {until}" in text
    assert "To shorten: a shorter key_validity" in text
    markdown = render.render_markdown(plan)
    assert "Longest exposure after revocation" in markdown and until in markdown


def test_enforcement_is_not_part_of_the_checksum(tmp_path):
    h = VendorHarness(tmp_path, ABLOY)
    plan, _ = revoked(h)
    h.now += timedelta(minutes=5)
    later = h.plan()
    assert later.to_dict()["changes"][0]["enforcement"] != plan.to_dict()["changes"][0]["enforcement"]
    assert later.checksum() == plan.checksum()


def test_abloy_grant_is_in_force_from_its_start(tmp_path):
    h = VendorHarness(tmp_path, ABLOY)
    h.write(abloy_policy("alice"))
    [change, *_] = [c for c in h.plan().to_dict()["changes"] if c["kind"] == "permission" and c["action"] == "create"]
    assert change["enforcement"]["from"] == format_time(NOW)      # the start is past: from now
    assert change["enforcement"]["by"] is None
    assert "operating keys" in change["enforcement"]["basis"]


UNLOC_POLICY = """\
users:
  bob: {phone: "+4790000002"}
devices:
  cabin: {system: cabins, id: %s}
permissions:
  - users: [bob]
    devices: [cabin]
"""


def test_unloc_grant_waits_for_the_key_to_leave_creating_and_a_revocation_is_unknown(tmp_path):
    h = VendorHarness(tmp_path, UNLOC)
    h.write(UNLOC_POLICY % SEED_LOCKS["Cabin 7"])
    plan = h.plan()
    [grant] = [c for c in plan.to_dict()["changes"] if c["kind"] == "key" and c["action"] == "create"]
    assert grant["enforcement"] == {"from": None, "by": None,
                                    "basis": "in force once Unloc moves the key out of `creating`"}
    [revoke] = [c for c in plan.to_dict()["changes"] if c["effect"] == "revoke"]   # the former caretaker's key
    assert revoke["enforcement"]["by"] is None
    assert revoke["enforcement"]["basis"].startswith("unknown")
    assert "exposure" not in plan.to_dict()


# -- the state remembers revocations until they are in force ------------------------------------------------

@pytest.mark.parametrize(("validity", "days"), [("", 8), ("P1D", 1)])
def test_abloy_apply_reports_by_applied_at_plus_key_validity(tmp_path, validity, days):
    h = VendorHarness(tmp_path, ABLOY)
    h.write(abloy_policy("alice, bob", validity))
    h.converge()
    h.now = NOW + timedelta(hours=3)
    h.write(abloy_policy("alice", validity))
    _, report = h.apply()
    assert report.ok, report.lines()
    [change] = [c for c in report.done if c.revokes]
    assert report.applied_at == format_time(h.now)
    until = format_time(h.now + timedelta(days=days))
    assert report.enforcement[change.address]["by"] == until
    assert report.exposures() == [f"bob may open server-room offline until {until}: operating keys last P{days}D: "
                                  "online at once; offline until the last downloaded operating key expires"]
    assert report.summary() == "1 applied, 1 accepted but not yet in force"


def test_access_live_lists_the_residual_row_until_the_key_expires(tmp_path):
    from reconciler import run
    h = VendorHarness(tmp_path, ABLOY)
    h.write(abloy_policy("alice, bob"))
    h.converge()
    h.write(abloy_policy("alice"))
    _, report = h.apply()
    assert report.ok
    rows, _ = run.access(h.session(), live=True, user="bob", at=NOW + timedelta(days=1))
    [row] = rows
    assert (row.user, row.device, row.residual) == ("bob", "server-room", True)
    assert row.via == f"offline key, until {format_time(NOW + timedelta(days=8))}"
    assert row.to_dict()["residual"] is True
    assert run.access(h.session(), live=True, user="bob", at=NOW + timedelta(weeks=3))[0] == []
    [alice] = run.access(h.session(), live=True, user="alice", at=NOW + timedelta(days=1))[0]
    assert "residual" not in alice.to_dict()


def test_access_live_cli_json_marks_residual_rows(tmp_path):
    from reconciler import render, run
    h = VendorHarness(tmp_path, ABLOY)
    h.write(abloy_policy("alice, bob", "P1D"))
    h.converge()
    h.write(abloy_policy("alice", "P1D"))
    h.apply()
    rows, admins = run.access(h.session(), live=True, at=NOW + timedelta(hours=12))
    data = __import__("json").loads(render.render_access(rows, admins, "json"))
    assert "bob" in [r["user"] for r in data if r.get("residual")]
    assert "alice" not in [r["user"] for r in data if r.get("residual")]
    text = render.render_access(rows, admins, "text")
    assert f"offline key, until {format_time(NOW + timedelta(days=1))}" in text
    assert run.access(h.session(), live=True, user="bob", at=NOW + timedelta(days=2))[0] == []
