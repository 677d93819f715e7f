"""A state that knows whose it is: a deleted, foreign or corrupt state is refused with the way out, and
nothing is sent. Against the Abloy simulator, after a real apply."""

from __future__ import annotations

import json
import subprocess

import pytest

from reconciler.errors import RefusedError, StateError
from reconciler.state import LocalState
from test_abloy_provider import POLICY, assert_converged_without_duplicates, vendor


def _writes(h) -> int:
    return sum(h.sim.count(m) for m in ("POST", "PUT", "PATCH", "DELETE")) - h.sim.count("POST", "/administration/login")


def _state_files(h):
    return h.tmp_path / "state" / "state.json"


def test_state_records_the_identity_of_each_system_without_secrets(harness):
    harness.write(POLICY)
    harness.converge()
    data = json.loads(_state_files(harness).read_text())
    identity = data["systems"]["hq"]
    assert identity["vendor"] == "abloy-keyless" and identity["url"] == "https://abloy.test/administration"
    assert identity["account"].startswith("sha256:")
    text = _state_files(harness).read_text()
    assert all(secret not in text for secret in harness.sim.credentials.values())


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_lost_state_is_refused_not_a_first_run(harness, how):
    harness.write(POLICY)
    harness.converge()
    path = _state_files(harness)
    if how == "deleted":
        for leftover in path.parent.iterdir():
            leftover.unlink()
    else:
        path.write_text(json.dumps({"version": 1, "resources": {}, "applied": {}}))
    harness.sim.reset_log()
    with pytest.raises(RefusedError) as refused:
        harness.plan()
    message = str(refused.value)
    assert "knows nothing of this system" in message and "reconciler export hq" in message
    assert "device 'Annex Door'" in message and "holds exactly the access" in message
    with pytest.raises(RefusedError):
        harness.apply(allow_mass_revoke=True)
    assert _writes(harness) == 0          # nothing created, nothing revoked


def test_lost_state_with_the_previous_snapshot_restored_converges(harness):
    harness.write(POLICY)
    harness.converge()
    harness.write(POLICY.replace("bob: {phone", "dora: {}\n  bob: {phone"))
    harness.converge()
    path = _state_files(harness)
    assert path.with_name("state.json.prev").exists()
    path.write_text('{"version": 1, "resources": {"hq/user/alice": ')     # torn / corrupt
    with pytest.raises(StateError) as unreadable:
        harness.plan()
    message = str(unreadable.value)
    assert "unreadable" in message and "roll back" in message
    command = message.split("`")[1]
    assert command.startswith("mv ")
    subprocess.run(command, shell=True, check=True)
    plan = harness.plan()
    assert not plan.has_changes, [c.address for c in plan.changes]
    assert_converged_without_duplicates(harness, users=4, permissions=8)


def test_corrupt_state_without_previous_snapshot_says_how_out(harness):
    harness.write(POLICY)
    harness.apply()
    _state_files(harness).write_text("<<<<<<< HEAD\n")
    with pytest.raises(StateError, match="no previous snapshot.*export"):
        harness.plan()


def test_state_of_another_system_is_refused(harness):
    harness.write(POLICY)
    harness.converge()
    harness.write(POLICY, system_extra="")
    systems = harness.policy_dir / "systems.yaml"
    systems.write_text(systems.read_text().replace("https://abloy.test/administration",
                                                   "https://other-tenant.test/administration"))
    harness.allowed_hosts.append("other-tenant.test")
    harness.sim.reset_log()
    with pytest.raises(RefusedError, match="belongs to .*abloy.test.*other-tenant.test"):
        harness.plan()
    with pytest.raises(RefusedError):
        harness.apply(allow_mass_revoke=True)
    assert _writes(harness) == 0


def test_state_of_another_policy_naming_the_system_differently_is_refused(harness):
    """Another team's state (systems named otherwise) against this tenant: the tenant holds what the
    policy would create, so it is not a first run."""
    harness.write(POLICY)
    harness.converge()
    state = LocalState(_state_files(harness))
    with state:
        for address, record in list(state.items("hq/")):
            state.delete(address)
            state.put(address.replace("hq/", "branch/", 1), record)
        state.set_system("branch", state.systems()["hq"])
        state._systems.pop("hq")   # noqa: SLF001 - build the other team's file by hand
    users_before = len(vendor(harness, "/user"))
    with pytest.raises(RefusedError, match="knows nothing of this system"):
        harness.apply(allow_mass_revoke=True)
    assert len(vendor(harness, "/user")) == users_before


def test_first_run_on_a_system_with_unrelated_objects_is_allowed(harness):
    """The seeded sandbox has users and a grant no policy made: a true first run still plans."""
    harness.write(POLICY)
    assert harness.plan().has_changes


def test_state_of_another_policy_on_the_same_account_is_refused(harness):
    """Another team's state, same system name and account, but none of its users are this policy's:
    using it would offboard them."""
    harness.write(POLICY)
    harness.converge()
    users_before = len(vendor(harness, "/user"))
    harness.write("users:\n  zed: {}\n")
    with pytest.raises(RefusedError, match="written by another policy"):
        harness.apply(allow_mass_revoke=True)
    assert len(vendor(harness, "/user")) == users_before
