"""`reconciler access`: who can open what and when, from the policy and from the sandboxes' live state."""

from __future__ import annotations

import csv
import io
import json

import pytest
from click.testing import CliRunner

from reconciler.cli import main
from reconciler.sandbox.abloy import SEED_DEVICES

NOW = "2026-11-22T10:00:00Z"
CABIN = "0634f1ba-e175-49e8-98bc-32b11505107b"
# Windows far enough ahead that the suite means the same on any date the sandboxes' clocks show.
POLICY = f"""\
systems:
  hq: {{vendor: abloy-keyless, url: sandbox, unmanaged: report}}
  cabins: {{vendor: unloc, url: sandbox, lock_holder_id: 866b8a35-4184-44c5-8ffd-448a77e5a91c}}
users:
  alice: {{phone: "+4790000001"}}
  bob: {{phone: "+4790000002"}}
  eva: {{phone: "+4790000005"}}
  kari: {{role: ADMIN}}
groups:
  staff: [alice, bob]
devices:
  gym: {{system: hq, id: {SEED_DEVICES['Gym']}}}
  cabin: {{system: cabins, id: {CABIN}}}
schedules:
  cleaning: [{{days: [mon, thu], from: "09:00", to: "15:00"}}]
permissions:
  - groups: [staff]
    devices: [gym]
    start: 2026-01-01T00:00:00Z
    end: 2033-12-31T23:59:59Z
  - users: [bob]
    devices: [gym]
    operations: [UPDATE_TIME]
    start: 2026-01-01T00:00:00Z
    end: 2032-01-01T00:00:00Z
  - users: [eva]
    devices: [cabin]
    schedule: cleaning
    start: 2026-01-01T00:00:00Z
    end: 2034-01-01T00:00:00Z
"""
MONDAY_10 = "2032-06-07T10:00:00Z"     # a Monday, after bob's UPDATE_TIME grant ended
TUESDAY_10 = "2032-06-08T10:00:00Z"


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RECONCILER_STATE", raising=False)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(POLICY)
    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output
    return invoke


def rows(cli, *args):
    return json.loads(cli("access", *args, "--format", "json"))


def who(found):
    return sorted((r["user"], r["device"], tuple(r["operations"])) for r in found)


def test_policy_answers_for_groups_expired_grants_and_weekly_schedules(cli):
    everything = rows(cli)
    assert who(everything) == [("alice", "gym", ("OPEN",)), ("bob", "gym", ("OPEN",)),
                               ("bob", "gym", ("UPDATE_TIME",)), ("eva", "cabin", ())]
    alice = next(r for r in everything if r["user"] == "alice")
    assert {k: alice[k] for k in ("system", "start", "end", "via", "source")} == {
        "system": "hq", "start": "2026-01-01T00:00:00Z", "end": "2033-12-31T23:59:59Z", "via": "group:staff",
        "source": "policies/p.yaml:17"}
    # Groups: both members through `staff`; bob's direct grant has ended by then; eva's schedule is on Mondays.
    at_monday = rows(cli, "--at", MONDAY_10)
    assert who(at_monday) == [("alice", "gym", ("OPEN",)), ("bob", "gym", ("OPEN",)), ("eva", "cabin", ())]
    assert {r["via"] for r in at_monday if r["device"] == "gym"} == {"group:staff"}
    assert who(rows(cli, "--at", "2027-06-07T10:00:00Z", "--user", "bob")) == [
        ("bob", "gym", ("OPEN",)), ("bob", "gym", ("UPDATE_TIME",))]          # before it ended
    assert who(rows(cli, "--at", TUESDAY_10, "--device", "cabin")) == []      # no span on Tuesdays
    assert who(rows(cli, "--at", "2032-06-07T15:00:00Z", "--device", "cabin")) == []   # the span ends at 15:00
    # Schedules are read in the zone --at is given in (the lock's local time): 14:30 in Oslo is 13:30 UTC.
    assert who(rows(cli, "--at", "2032-06-07T14:30:00+02:00", "--device", "cabin")) == [("eva", "cabin", ())]
    assert who(rows(cli, "--at", "2034-02-01T10:00:00Z")) == []               # every window has ended


def test_text_markdown_and_csv_say_the_same(cli):
    text = cli("access", "--at", MONDAY_10)
    assert text.splitlines()[0] == f"Access in the policy open at {MONDAY_10}:"
    assert "kari is an ADMIN of hq: can grant itself access to any door there (policies/p.yaml:8)" in text
    markdown = cli("access", "--device", "cabin", "--format", "markdown")
    assert "| eva | cabins | cabin |" in markdown and "Mon, Thu 09:00–15:00" in markdown
    table = list(csv.DictReader(io.StringIO(cli("access", "--format", "csv"))))
    assert [(r["user"], r["device"], r["operations"], r["via"]) for r in table] == [
        ("alice", "gym", "OPEN", "group:staff"), ("bob", "gym", "OPEN", "group:staff"),
        ("bob", "gym", "UPDATE_TIME", "user"), ("eva", "cabin", "", "user")]
    assert table[3]["schedule"] == "Mon, Thu 09:00–15:00" and table[3]["source"] == "policies/p.yaml:26"


def test_live_answers_from_the_sandboxes_with_live_only_access_marked(cli):
    cli("apply", "--auto-approve", "--now", NOW)
    live = rows(cli, "--live")
    ours = [r for r in live if not r["live_only"]]
    assert who(ours) == [("alice", "gym", ("OPEN",)), ("bob", "gym", ("OPEN",)), ("bob", "gym", ("UPDATE_TIME",)),
                         ("eva", "cabin", ())]
    assert {(r["user"], r["via"], r["source"]) for r in ours if r["user"] == "alice"} == {
        ("alice", "group:staff", "policies/p.yaml:17")}
    # The seeded grant of an account nobody declared stays (unmanaged: report) and is marked as such.
    strangers = [r for r in live if r["live_only"]]
    assert strangers and all(r["user"].startswith("id:") and r["source"] is None and r["via"] == "live only"
                             for r in strangers)
    at_monday = rows(cli, "--live", "--at", MONDAY_10)
    assert who(r for r in at_monday if not r["live_only"]) == [
        ("alice", "gym", ("OPEN",)), ("bob", "gym", ("OPEN",)), ("eva", "cabin", ())]
    assert who(rows(cli, "--live", "--at", TUESDAY_10, "--device", "cabin")) == []
    eva = rows(cli, "--live", "--user", "eva")
    assert [r["schedule"] for r in eva] == [[{"day": "mon", "from": "09:00", "to": "15:00"},
                                              {"day": "thu", "from": "09:00", "to": "15:00"}]]
    assert "live only" in cli("access", "--live", "--device", "gym")


def test_bad_at_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["access", "--at", "2026-12-07T10:00:00"])
    assert result.exit_code == 1 and "needs a timezone" in result.output
