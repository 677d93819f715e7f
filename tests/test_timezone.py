"""Site time zones: `timezone:` on a system (IANA, default UTC); its weekly schedules are local times there,
read correctly across daylight-saving changes by `reconciler access --at` and by assertions."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import jsonschema
import pytest
from click.testing import CliRunner

from reconciler.access import AccessRow, is_open
from reconciler.cli import main

OFFICE = tuple((day, "08:00", "18:00") for day in ("mon", "tue", "wed", "thu", "fri"))
ROW = AccessRow(user="alice", system="site", device="front-gate", start=None, end=None, via="user",
                source="p.yaml:1", schedule=OFFICE)
OSLO = ZoneInfo("Europe/Oslo")
POLICY = """\
systems:
  site: {vendor: unloc, url: sandbox, lock_holder_id: 866b8a35-4184-44c5-8ffd-448a77e5a91c, timezone: Europe/Oslo}
users:
  alice: {phone: "+4790000001"}
devices:
  front-gate: {system: site, id: 0634f1ba-e175-49e8-98bc-32b11505107b}
schedules:
  office: [{days: [mon, tue, wed, thu, fri], from: "08:00", to: "18:00"}]
permissions:
  - users: [alice]
    devices: [front-gate]
    schedule: office
    start: 2026-01-01T00:00:00Z
    end: 2033-12-31T23:59:59Z
"""


def _z(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.mark.parametrize("at, opens", [
    ("2027-01-04T07:00:00Z", True),      # Monday in January: 08:00 in Oslo (UTC+1)
    ("2027-01-04T06:59:00Z", False),
    ("2027-01-04T16:59:00Z", True),
    ("2027-01-04T17:00:00Z", False),     # 18:00 in Oslo
    ("2027-07-05T06:00:00Z", True),      # Monday in July: 08:00 in Oslo (UTC+2, summer time)
    ("2027-07-05T05:59:00Z", False),
    ("2027-07-05T16:00:00Z", False),     # 18:00 in Oslo
    ("2027-03-29T06:00:00Z", True),      # the Monday after the change to summer time
    ("2027-11-01T07:00:00Z", True),      # the Monday after the change back
    ("2027-11-01T06:00:00Z", False),
])
def test_a_schedule_in_oslo_opens_at_08_local_across_daylight_saving(at, opens):
    assert is_open(ROW, _z(at), OSLO) is opens


def test_without_a_site_zone_the_schedule_is_read_in_the_zone_of_at():
    assert is_open(ROW, _z("2027-01-04T07:00:00Z")) is False
    assert is_open(ROW, _z("2027-01-04T08:00:00+01:00")) is True


@pytest.fixture
def policy_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RECONCILER_STATE", raising=False)
    directory = tmp_path / "p"
    directory.mkdir()
    (directory / "policy.yaml").write_text(POLICY)
    return directory


def _access(directory, at):
    return CliRunner().invoke(main, ["access", str(directory), "--at", at], catch_exceptions=False)


@pytest.mark.parametrize("at, opens", [
    ("2027-01-04T07:00:00Z", True), ("2027-01-04T06:59:00Z", False),
    ("2027-07-05T06:00:00Z", True), ("2027-07-05T05:59:00Z", False),
    ("2027-07-05T08:00:00 Europe/Oslo", True), ("2027-07-05T07:59:00 Europe/Oslo", False),
])
def test_access_at_reads_the_schedule_in_the_site_zone_and_shows_it(policy_dir, at, opens):
    result = _access(policy_dir, at)
    assert result.exit_code == 0, result.output
    assert ("alice" in result.output.split("\n", 1)[1]) is opens, result.output
    assert "site Europe/Oslo" in result.output


def test_an_unknown_time_zone_is_an_error_at_its_line(policy_dir):
    (policy_dir / "policy.yaml").write_text(POLICY.replace("timezone: Europe/Oslo", "timezone: Mars/Olympus"))
    result = CliRunner().invoke(main, ["validate", str(policy_dir)], catch_exceptions=False)
    assert result.exit_code == 1
    assert "p/policy.yaml:2:" in result.output and "'Mars/Olympus' is not an IANA time zone" in result.output


def test_an_assertion_without_offset_is_read_in_the_site_zone(policy_dir):
    (policy_dir / "tests.yaml").write_text(
        "assertions:\n"
        "  - can: {user: alice, device: front-gate, at: \"2027-07-05T08:00:00\"}\n"
        "  - cannot: {user: alice, device: front-gate, at: \"2027-07-05T07:59:00\"}\n"
        "  - cannot: {user: alice, device: front-gate, at: \"2027-07-05T17:00:00Z\"}\n")
    result = CliRunner().invoke(main, ["test", str(policy_dir)], catch_exceptions=False)
    assert result.exit_code == 0, result.output


# -- the plan's window text names the site's zone ------------------------------------------------------------

def _cli(*args: str):
    return CliRunner().invoke(main, [*args, "--now", "2026-11-22T10:00:00Z"], catch_exceptions=False)


def test_the_plan_shows_weekly_windows_in_the_site_zone_named(policy_dir, tmp_path):
    markdown = _cli("plan", str(policy_dir), "--format", "markdown")
    assert markdown.exit_code == 0, markdown.output
    [sentence] = [line for line in markdown.output.splitlines() if "**alice** gains access to **front-gate**" in line]
    assert "Mon–Fri 08:00–18:00 Europe/Oslo" in sentence
    text = _cli("plan", str(policy_dir))
    [line] = [line for line in text.output.splitlines() if line.strip().startswith("schedule:")]
    assert line.endswith("(Mon–Fri 08:00–18:00 Europe/Oslo)"), line
    saved = _cli("plan", str(policy_dir), "--format", "json", "--out", str(tmp_path / "plan.json"))
    assert saved.exit_code == 0, saved.output
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["zones"] == {"site": "Europe/Oslo"}
    # A saved plan carries the zone: `show` renders it as plan did, without the policy.
    shown = CliRunner().invoke(main, ["show", str(tmp_path / "plan.json"), "--format", "markdown"],
                               catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    assert shown.output == markdown.output


def test_a_site_without_timezone_names_utc_and_the_plan_has_no_zones(policy_dir, tmp_path):
    (policy_dir / "policy.yaml").write_text(POLICY.replace(", timezone: Europe/Oslo", ""))
    markdown = _cli("plan", str(policy_dir), "--format", "markdown")
    assert "Mon–Fri 08:00–18:00 UTC" in markdown.output
    _cli("plan", str(policy_dir), "--out", str(tmp_path / "plan.json"))
    assert "zones" not in json.loads((tmp_path / "plan.json").read_text())


def test_the_plan_schema_documents_zones(policy_dir, tmp_path):
    schema = json.loads((Path(__file__).parents[1] / "schema" / "plan.schema.json").read_text())
    _cli("plan", str(policy_dir), "--out", str(tmp_path / "plan.json"))
    data = json.loads((tmp_path / "plan.json").read_text())
    assert "zones" in data
    jsonschema.validate(data, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**data, "zones": {"site": 7}}, schema)
