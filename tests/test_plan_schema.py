"""The plan JSON is a documented format: `schema/plan.schema.json` (format_version 1) describes what `plan
--format json` and `plan --out` write, every key on every change (null where it does not apply), and real plans
of the demo and every example (five vendors), first and after an apply, with revocations, drift and a
mass-revoke guard, are valid against it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import referencing
import referencing.jsonschema
from click.testing import CliRunner

from reconciler.cli import main
from reconciler.plan import OPTIONAL_CHANGE_KEYS, Action, Effect
from reconciler.resources import Kind

ROOT = Path(__file__).resolve().parent.parent
PLAN_SCHEMA = ROOT / "schema" / "plan.schema.json"
NOW = "2026-11-22T10:00:00Z"
POLICY_SETS = [ROOT / "policies", *sorted(p for p in (ROOT / "examples").iterdir() if any(p.glob("*.yaml")))]


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(PLAN_SCHEMA.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def validator(schema) -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(schema)
    resource = referencing.Resource.from_contents(schema, default_specification=referencing.jsonschema.DRAFT202012)
    registry = referencing.Registry().with_resource(schema["$id"], resource)
    return jsonschema.Draft202012Validator(schema, registry=registry)


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RECONCILER_STATE", raising=False)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, list(args), catch_exceptions=False)
    return invoke


def _errors(validator: jsonschema.Draft202012Validator, plan: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(plan)]


def test_the_schema_names_what_the_code_has(schema):
    change = schema["$defs"]["change"]
    assert set(change["required"]) == set(change["properties"])
    assert set(change["properties"]["action"]["enum"]) == {str(a) for a in Action}
    assert set(change["properties"]["effect"]["enum"]) == {str(e) for e in Effect}
    assert set(schema["$defs"]["kind"]["enum"]) == {str(k) for k in Kind}
    assert set(OPTIONAL_CHANGE_KEYS) <= set(change["required"])
    assert schema["properties"]["format_version"] == {"const": 1}


@pytest.mark.parametrize("directory", POLICY_SETS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_real_plans_are_valid_and_carry_every_key(cli, tmp_path, validator, schema, directory):
    shutil.copytree(directory, tmp_path / "policies")
    first = cli("plan", "--format", "json", "--out", "plan.json", "--now", NOW)
    assert first.exit_code == 0, first.output
    plans = [json.loads(first.output), json.loads(Path("plan.json").read_text())]
    assert cli("apply", "--auto-approve", "--now", NOW).exit_code == 0
    plans.append(json.loads(cli("plan", "--format", "json", "--now", NOW).output))

    keys = schema["$defs"]["change"]["required"]
    assert plans[0]["changes"], "an example with nothing to plan checks nothing"
    for plan in plans:
        assert _errors(validator, plan) == []
        for change in plan["changes"]:
            assert list(change) == keys      # every key, in the documented order


def test_a_plan_with_revocations_drift_and_a_guard_is_valid(cli, tmp_path, validator):
    """Delete most grants from a policy after applying it: the plan revokes, and the guard trips."""
    from reconciler.sandbox.abloy import SEED_DEVICES

    people = "\n".join(f"  p{n}: {{phone: \"+47900000{n:02d}\"}}" for n in range(12))
    policy = (f"systems:\n  hq: {{vendor: abloy-keyless, url: sandbox}}\nusers:\n{people}\n"
              f"devices:\n  gym: {{system: hq, id: {SEED_DEVICES['Gym']}}}\n"
              "permissions:\n  - users: [{users}]\n    devices: [gym]\n    end: 2027-12-31T23:59:59Z\n"
              "    reason: FAC-1\n")
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(policy.replace("{users}", ", ".join(f"p{n}" for n in range(12))))
    assert cli("apply", "--auto-approve", "--now", NOW).exit_code == 0
    (tmp_path / "policies" / "p.yaml").write_text(policy.replace("{users}", "p0"))

    plan = json.loads(cli("plan", "--format", "json", "--now", NOW).output)

    assert _errors(validator, plan) == []
    assert plan["guard"] and plan["guard"][0]["trips"] and plan["guard"][0]["refuses"]
    assert "apply will refuse it" in plan["guard"][0]["message"]
    assert any(c["effect"] == "revoke" and c["before"] and c["after"] is None for c in plan["changes"])


def test_a_guard_under_the_limit_says_apply_proceeds(cli, tmp_path, validator):
    from reconciler.sandbox.abloy import SEED_DEVICES

    people = "\n".join(f"  p{n}: {{phone: \"+47900000{n:02d}\"}}" for n in range(12))
    policy = (f"systems:\n  hq: {{vendor: abloy-keyless, url: sandbox}}\nusers:\n{people}\n"
              f"devices:\n  gym: {{system: hq, id: {SEED_DEVICES['Gym']}}}\n"
              "permissions:\n  - users: [{users}]\n    devices: [gym]\n    end: 2027-12-31T23:59:59Z\n")
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(policy.replace("{users}", ", ".join(f"p{n}" for n in range(12))))
    assert cli("apply", "--auto-approve", "--now", NOW).exit_code == 0
    (tmp_path / "policies" / "p.yaml").write_text(policy.replace("{users}", ", ".join(f"p{n}" for n in range(11))))

    plan = json.loads(cli("plan", "--format", "json", "--now", NOW).output)

    assert _errors(validator, plan) == []
    guard = plan["guard"][0]
    assert (guard["trips"], guard["refuses"]) == (False, False)
    assert "refuse" not in guard["message"] and "apply proceeds" in guard["message"]


@pytest.mark.parametrize("edit", [
    lambda plan: plan["changes"][0].pop("via"),
    lambda plan: plan["changes"][0].update(action="destroy"),
    lambda plan: plan["changes"][0].update(surprise=1),
    lambda plan: plan.update(format_version=2),
    lambda plan: plan.pop("guard"),
])
def test_the_schema_refuses_what_is_not_a_plan(cli, tmp_path, validator, edit):
    shutil.copytree(ROOT / "examples" / "quickstart", tmp_path / "policies")
    plan = json.loads(cli("plan", "--format", "json", "--now", NOW).output)
    assert _errors(validator, plan) == []

    edit(plan)

    assert _errors(validator, plan) != []
