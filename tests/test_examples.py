"""The shipped policies run as tests: the demo in policies/ and every example converge on the sandbox."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from reconciler import run

from conftest import NOW

ROOT = Path(__file__).resolve().parent.parent
POLICY_SETS = [ROOT / "policies", *sorted(p for p in (ROOT / "examples").iterdir() if any(p.glob("*.yaml")))]


@pytest.mark.parametrize("source", POLICY_SETS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_policy_set_converges_on_the_sandbox(tmp_path, source):
    shutil.copytree(source, tmp_path / "policies")
    session = run.Session(directory=tmp_path / "policies", state_path=tmp_path / ".reconciler" / "state.json",
                          env={}, now=NOW)
    first = run.plan(session)
    assert first.has_changes
    _, report = run.apply(session, saved=first.to_dict(), approve=lambda plan: True)
    assert report is not None and report.ok, report.lines()
    again = run.plan(session)
    assert not again.has_changes, [c.address for c in again.changes]


@pytest.mark.parametrize("source", POLICY_SETS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_export_after_apply_adopts_every_system_without_changes(tmp_path, source):
    """A second team adopts the applied system from scratch: only the connection, a fresh state, then
    `export` for each system; the plan must show no changes."""
    from ruamel.yaml import YAML

    from reconciler.export import export_system

    shutil.copytree(source, tmp_path / "policies")
    applied = run.Session(directory=tmp_path / "policies", state_path=tmp_path / ".reconciler" / "state.json",
                          env={}, now=NOW)
    run.apply(applied, saved=None, approve=lambda plan: True)
    systems = {}
    for path in sorted((tmp_path / "policies").glob("*.yaml")):
        systems.update((YAML(typ="safe").load(path.read_text()) or {}).get("systems") or {})
    adopter = tmp_path / "adopter"
    adopter.mkdir()
    with open(adopter / "systems.yaml", "w") as handle:
        YAML().dump({"systems": systems}, handle)
    session = run.Session(directory=adopter, state_path=tmp_path / ".reconciler" / "adopter.json", env={}, now=NOW)
    for system in systems:
        (adopter / f"{system}.exported.yaml").write_text(export_system(session, system))
    plan = run.plan(session)
    assert not plan.has_changes, [c.address for c in plan.changes]


DELIBERATELY_EXPIRED = {"hq/permission/lars/server-room/OPEN"}   # policies/access.yaml says so in a comment


@pytest.mark.parametrize("source", POLICY_SETS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_shipped_grant_stops_working_before_2030(tmp_path, source):
    """The demo and the examples keep planning their grants until 2030, whatever today's date."""
    shutil.copytree(source, tmp_path / "policies")
    late = datetime(2029, 12, 31, 23, 0, tzinfo=UTC)
    session = run.Session(directory=tmp_path / "policies", state_path=tmp_path / ".reconciler" / "state.json",
                          env={}, now=late)
    plan = run.plan(session)
    expired = {w.address for w in plan.warnings if "has passed" in w.message}
    assert expired <= DELIBERATELY_EXPIRED, expired
