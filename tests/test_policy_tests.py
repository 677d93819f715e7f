"""`reconciler test`: the policy's assertions evaluated against the policy, each result at its `file:line`,
exit 1 when one fails, and JUnit XML a standard parser reads."""

from __future__ import annotations

import shutil
from pathlib import Path
from xml.etree import ElementTree

import pytest
from click.testing import CliRunner

from reconciler.cli import main

ROOT = Path(__file__).resolve().parent.parent
POLICY = """\
systems:
  hq: {vendor: abloy-keyless, url: sandbox}
  site: {vendor: unloc, url: sandbox, lock_holder_id: 866b8a35-4184-44c5-8ffd-448a77e5a91c, timezone: Europe/Oslo}
users:
  alice: {phone: "+4790000001"}
  jonas: {phone: "+4790000002"}
  henrik: {phone: "+4790000003"}
groups:
  staff: [alice]
  it: [henrik]
devices:
  front-gate: {system: site, id: 0634f1ba-e175-49e8-98bc-32b11505107b}
  server-room: {system: hq}
schedules:
  office: [{days: [mon, tue, wed, thu, fri], from: "08:00", to: "18:00"}]
permissions:
  - groups: [staff]
    devices: [front-gate]
    schedule: office
    start: 2026-01-01T00:00:00Z
    end: 2033-12-31T23:59:59Z
  - groups: [it]
    devices: [server-room]
    start: 2026-01-01T00:00:00Z
    end: 2033-12-31T23:59:59Z
"""
ASSERTIONS = """\
assertions:
  - can:    {user: alice, device: front-gate, at: "2026-12-07T08:30:00 Europe/Oslo"}
  - cannot: {user: jonas, device: server-room, at: "2026-12-07T10:00:00Z", reason: SEC-12}
  - cannot: {group: staff, device: server-room}
  - can:    {user: alice, device: front-gate, at: "2026-12-07T07:30:00Z"}
  - cannot: {user: alice, device: front-gate, at: "2026-12-07T07:30:00"}
"""


@pytest.fixture
def policy_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RECONCILER_STATE", raising=False)
    directory = tmp_path / "p"
    directory.mkdir()
    (directory / "policy.yaml").write_text(POLICY)
    (directory / "tests.yaml").write_text(ASSERTIONS)
    return directory


def _run(*args: str):
    return CliRunner().invoke(main, ["test", *args], catch_exceptions=False)


def test_every_assertion_passes_with_its_line(policy_dir):
    result = _run(str(policy_dir))
    assert result.exit_code == 0, result.output
    for line in range(2, 7):
        assert f"PASS p/tests.yaml:{line}: " in result.output
    # 07:30Z on a Monday in December is 08:30 in Oslo (inside the window); 07:30 written without an offset
    # is read in the site's zone, before 08:00
    assert "5 assertions: 5 passed, 0 failed" in result.output


def test_removing_alice_from_her_group_fails_the_assertion_at_its_line(policy_dir):
    (policy_dir / "policy.yaml").write_text(POLICY.replace("staff: [alice]", "staff: []"))
    result = _run(str(policy_dir))
    assert result.exit_code == 1, result.output
    assert "FAIL p/tests.yaml:2: alice can open front-gate at 2026-12-07T08:30:00 Europe/Oslo" in result.output
    assert "no grant lets alice in" in result.output
    assert "PASS p/tests.yaml:3: " in result.output


def test_a_cannot_that_someone_can_fails(policy_dir):
    (policy_dir / "policy.yaml").write_text(POLICY.replace("it: [henrik]", "it: [henrik, jonas]"))
    result = _run(str(policy_dir))
    assert result.exit_code == 1
    assert "FAIL p/tests.yaml:3: jonas cannot open server-room" in result.output
    assert "via group:it (p/policy.yaml:" in result.output


def test_junit_xml_parses_and_names_each_assertion(policy_dir, tmp_path):
    (policy_dir / "policy.yaml").write_text(POLICY.replace("staff: [alice]", "staff: []"))
    out = tmp_path / "report.xml"
    result = _run(str(policy_dir), "--junit-xml", str(out))
    assert result.exit_code == 1
    suite = ElementTree.parse(out).getroot()
    assert suite.tag == "testsuite" and suite.get("failures") == "2" and suite.get("tests") == "5"
    names = [case.get("name") for case in suite.iter("testcase")]
    assert names[0] == "alice can open front-gate at 2026-12-07T08:30:00 Europe/Oslo (p/tests.yaml:2)"
    assert names[2] == "group staff cannot open server-room at any time (p/tests.yaml:4)"
    failed = [case.get("name") for case in suite.iter("testcase") if case.find("failure") is not None]
    assert failed == [names[0], names[3]]


@pytest.mark.parametrize("item, where, message", [
    ("- can: {user: nobody, device: front-gate}", "p/tests.yaml:7:", "unknown user 'nobody'"),
    ("- can: {group: ghosts, device: front-gate}", "p/tests.yaml:7:", "unknown group 'ghosts'"),
    ("- can: {user: alice, device: back-door}", "p/tests.yaml:7:", "unknown device 'back-door'"),
    ("- can: {user: alice, group: staff, device: front-gate}", "p/tests.yaml:7:", "one `user:` or one `group:`"),
    ("- can: {user: alice, device: front-gate, at: \"2026-12-07T08:30:00 Mars/Olympus\"}", "p/tests.yaml:7:",
     "not an IANA time zone"),
    ("- can: {user: alice, device: front-gate, at: soon}", "p/tests.yaml:7:", "is not a date and time"),
    ("- may: {user: alice, device: front-gate}", "p/tests.yaml:7:", "unknown key 'may'"),
])
def test_a_bad_assertion_is_an_error_at_its_line(policy_dir, item, where, message):
    (policy_dir / "tests.yaml").write_text(ASSERTIONS + "  " + item + "\n")
    result = _run(str(policy_dir))
    assert result.exit_code == 1
    assert where in result.output and message in result.output, result.output
    assert "internal error" not in result.output


def test_the_demo_policy_tests_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RECONCILER_STATE", raising=False)
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    result = _run()
    assert result.exit_code == 0, result.output
    assert "0 failed" in result.output and "FAIL" not in result.output


def test_the_markdown_plan_shows_each_result_with_its_line(policy_dir):
    (policy_dir / "policy.yaml").write_text(POLICY.replace("staff: [alice]", "staff: []"))
    (policy_dir / "rules.yaml").write_text("rules:\n  - require_end: {devices: [server-room]}\n")
    result = CliRunner().invoke(main, ["plan", str(policy_dir), "--format", "markdown", "--now",
                                       "2026-11-22T10:00:00Z"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    section = result.output.split("### Policy tests", 1)[1]
    assert "**2 of 5 assertions failed**; 1 rules hold." in section
    assert "- **FAILED** `p/tests.yaml:2`: alice can open front-gate" in section
    assert "- passed `p/tests.yaml:3`: jonas cannot open server-room" in section
    assert "- held `p/rules.yaml:2`: rule `require_end`" in section


def test_the_plan_workflow_fails_the_check_when_an_assertion_fails():
    from ruamel.yaml import YAML

    workflow = YAML(typ="safe").load((ROOT / ".github" / "workflows" / "reconciler-plan.yml").read_text())
    steps = workflow["jobs"]["plan"]["steps"]
    runs = [step.get("run", "") for step in steps]
    assert any(run.startswith("reconciler test") for run in runs)
    # the plan (with the results) is kept before the tests can fail the job, and the comment still posts it
    kept = next(i for i, step in enumerate(steps) if step.get("name") == "Keep the reviewed plan")
    assert kept < next(i for i, run in enumerate(runs) if run.startswith("reconciler test"))
    assert "!cancelled()" in workflow["jobs"]["comment"]["if"]


def test_live_evaluates_what_the_systems_hold(policy_dir):
    (policy_dir / "tests.yaml").write_text(
        "assertions:\n  - can: {group: it, device: server-room, at: \"2027-01-04T10:00:00Z\"}\n")
    before = _run(str(policy_dir), "--live")
    assert before.exit_code == 1
    assert "FAIL p/tests.yaml:2: group it can open server-room" in before.output
    applied = CliRunner().invoke(main, ["apply", str(policy_dir), "--auto-approve"], catch_exceptions=False)
    assert applied.exit_code == 0, applied.output
    after = _run(str(policy_dir), "--live")
    assert after.exit_code == 0, after.output
    assert "PASS p/tests.yaml:2: group it can open server-room" in after.output
