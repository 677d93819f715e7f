"""`rules:`: invariants checked by validate, plan and test; each violation is an error at the violating
entry's line and at the rule's line, and nothing is sent."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from reconciler.cli import main

POLICY = """\
systems:
  hq: {vendor: abloy-keyless, url: sandbox}
  cabins: {vendor: unloc, url: sandbox, lock_holder_id: 866b8a35-4184-44c5-8ffd-448a77e5a91c}
users:
  alice: {phone: "+4790000001"}
  henrik: {}
  kari: {role: ADMIN}
  nora: {role: ADMIN}
groups:
  it: [henrik]
devices:
  server-room: {system: hq}
  guest-1: {system: cabins, id: 0634f1ba-e175-49e8-98bc-32b11505107b}
permissions:
  - groups: [it]
    devices: [server-room]
    start: 2026-01-01T00:00:00Z
    end: 2030-01-01T00:00:00Z
    key_validity: P1D
  - users: [alice]
    devices: [guest-1]
    start: 2026-03-01T00:00:00Z
    end: 2026-03-10T00:00:00Z
"""
RULES = """\
rules:
  - only: {devices: [server-room], groups: [it]}
  - max_duration: {devices: [guest-*], period: P14D}
  - require_end: {devices: [guest-*]}
  - min_admins: {system: hq, count: 2}
  - max_key_validity: {devices: [server-room], period: P1D}
"""
# Each rule kind, the change to POLICY that breaks it, the violating entry's line and the rule's line.
BREAKS = {
    "only": (("  - groups: [it]\n", "  - groups: [it]\n    users: [alice]\n"), 15, 2),
    "max_duration": (("2026-03-10T00:00:00Z", "2026-03-20T00:00:00Z"), 20, 3),
    "require_end": (("    end: 2026-03-10T00:00:00Z\n", ""), 20, 4),
    "min_admins": (("  nora: {role: ADMIN}\n", "  nora: {}\n"), 7, 5),
    "max_key_validity": (("key_validity: P1D", "key_validity: P3D"), 15, 6),
}


@pytest.fixture
def policy_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RECONCILER_STATE", raising=False)
    directory = tmp_path / "p"
    directory.mkdir()
    (directory / "policy.yaml").write_text(POLICY)
    (directory / "rules.yaml").write_text(RULES)
    return directory


def _run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("command", ["validate", "test"])
def test_a_policy_keeping_every_rule_is_valid(policy_dir, command):
    result = _run(command, str(policy_dir))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("kind", list(BREAKS))
@pytest.mark.parametrize("command", ["validate", "plan", "test"])
def test_every_rule_kind_refuses_a_violating_policy_at_both_lines(policy_dir, kind, command):
    (old, new), entry_line, rule_line = BREAKS[kind]
    assert old in POLICY
    (policy_dir / "policy.yaml").write_text(POLICY.replace(old, new))
    args = [command, str(policy_dir)] + (["--now", "2026-11-22T10:00:00Z"] if command == "plan" else [])
    result = _run(*args)
    assert result.exit_code == 1, result.output
    assert f"p/policy.yaml:{entry_line}:" in result.output, result.output
    assert f"p/rules.yaml:{rule_line}:" in result.output, result.output
    assert f"rule `{kind}`" in result.output
    assert "internal error" not in result.output


def test_min_admins_refuses_a_plan_deleting_the_second_to_last_admin(policy_dir):
    assert _run("apply", str(policy_dir), "--auto-approve", "--now", "2026-11-22T10:00:00Z").exit_code == 0
    (policy_dir / "policy.yaml").write_text(POLICY.replace("  nora: {role: ADMIN}\n", ""))
    result = _run("plan", str(policy_dir), "--now", "2026-11-22T10:00:00Z")
    assert result.exit_code == 1, result.output
    assert "would keep 1 ADMIN account(s) (kari); the rule asks for at least 2" in result.output
    assert "p/rules.yaml:5:" in result.output and "p/policy.yaml:7:" in result.output


@pytest.mark.parametrize("rule, message", [
    ("- max_duration: {devices: [guest-*], period: two weeks}", "is not a period"),
    ("- min_admins: {system: nowhere, count: 2}", "unknown system 'nowhere'"),
    ("- only: {devices: [server-room], groups: [ghosts]}", "unknown group 'ghosts'"),
    ("- require_end: {devices: [guest-*]}\n    only: {devices: [guest-*]}", "a rule is exactly one of"),
])
def test_a_bad_rule_is_an_error_at_its_line(policy_dir, rule, message):
    (policy_dir / "rules.yaml").write_text(RULES + "  " + rule + "\n")
    result = _run("validate", str(policy_dir))
    assert result.exit_code == 1
    assert "p/rules.yaml:7:" in result.output and message in result.output, result.output
