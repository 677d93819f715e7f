"""Day two: renames with `previously:`, suspected renames, `ignore:` hand-overs, against the Abloy simulator
through `reconciler.run` (as the CLI does). Each rename sends nothing but reads; without `previously:` it is
flagged and apply refuses it."""

from __future__ import annotations

import json

import pytest
from test_abloy_provider import POLICY

from reconciler import render
from reconciler.errors import PolicyError, RefusedError


def _writes(h) -> int:
    return sum(h.sim.count(m) for m in ("POST", "PUT", "PATCH", "DELETE")) - h.sim.count("POST", "/administration/login")


def _state(h) -> dict:
    return json.loads((h.tmp_path / "state" / "state.json").read_text())


@pytest.fixture
def applied(harness):
    harness.write(POLICY)
    harness.converge()
    assert not harness.plan().has_changes
    harness.sim.reset_log()
    return harness


# -- previously: -------------------------------------------------------------------------------------------

RENAME_USER = POLICY.replace('  alice: {phone: "+4790000001", mobile_key: true}',
                             '  alice.hansen: {phone: "+4790000001", mobile_key: true, previously: [alice]}') \
    .replace("staff: [alice, bob]", "staff: [alice.hansen, bob]").replace("users: [alice]", "users: [alice.hansen]")
RENAME_DEVICE = POLICY.replace("  annex: {system: hq, name: Annex Door}",
                               "  annex-door: {system: hq, name: Annex Door, previously: [annex]}") \
    .replace("devices: [entrance, annex]", "devices: [entrance, annex-door]")
RENAME_GATEWAY = POLICY.replace("  lobby: {system: hq,", "  hall: {system: hq, previously: [lobby],")


@pytest.mark.parametrize("text, old, new", [
    (RENAME_USER, "hq/user/alice", "hq/user/alice.hansen"),
    (RENAME_DEVICE, "hq/device/annex", "hq/device/annex-door"),
    (RENAME_GATEWAY, "hq/gateway/lobby", "hq/gateway/hall"),
])
def test_previously_renames_without_a_vendor_write(applied, text, old, new):
    h = applied
    h.write(text)
    plan = h.plan()
    assert not plan.has_changes, [c.address for c in plan.changes]
    data = plan.to_dict()
    assert [n["message"] for n in data["renamed"]] == [f"{old} → {new} (renamed)"]
    assert f"{old} → {new} (renamed)" in render.render_text(plan)
    assert f"{old} → {new} (renamed)" in render.render_markdown(plan)
    assert _writes(h) == 0
    h.apply()
    assert _writes(h) == 0                  # reads only
    state = _state(h)
    assert new in state["resources"] and old not in state["resources"]
    moved = [a for a in state["applied"] if a.split("/")[2:3] == [old.rsplit("/", 1)[1]]]
    assert not moved                        # grants named by the old key moved too
    again = h.plan()
    assert not again.has_changes and not again.renamed


def test_previously_of_an_unknown_name_is_harmless(applied):
    h = applied
    h.write(POLICY.replace('  bob: {phone: "+4790000002"}', '  bob: {phone: "+4790000002", previously: [robert]}'))
    plan = h.plan()
    assert not plan.has_changes and not plan.renamed


def test_previously_naming_a_declared_entry_is_an_error_at_its_line(harness):
    harness.write(POLICY.replace('  bob: {phone: "+4790000002"}', '  bob: {phone: "+4790000002", previously: [alice]}'))
    with pytest.raises(PolicyError) as error:
        harness.plan()
    text = str(error.value)
    assert "policy.yaml:3:" in text and "'alice' is still declared" in text


# -- suspected renames -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, old, new, why", [
    (RENAME_USER.replace(", previously: [alice]", ""), "hq/user/alice", "hq/user/alice.hansen", "same phone"),
    (RENAME_DEVICE.replace(", previously: [annex]", ""), "hq/device/annex", "hq/device/annex-door", "same name"),
])
def test_a_rename_without_previously_is_flagged_and_refused(applied, text, old, new, why):
    h = applied
    h.write(text)
    plan = h.plan()
    old_name = old.rsplit("/", 1)[1]
    marker = f"looks like a rename of {old_name} ({why})"
    data = plan.to_dict()
    assert [c["looks_like"] for c in data["changes"] if c["address"] == new] == [marker]
    assert data["rename_guard"][0]["refuses"] and data["rename_guard"][0]["pairs"][0]["from"] == old
    assert marker in render.render_text(plan) and marker in render.render_markdown(plan)
    assert marker in json.dumps(data)
    with pytest.raises(RefusedError) as refused:
        h.apply(allow_mass_revoke=True)
    assert f"previously: [{old_name}]" in str(refused.value)
    assert _writes(h) == 0


def test_gateway_rename_without_previously_is_flagged(applied):
    h = applied
    h.write(RENAME_GATEWAY.replace(" previously: [lobby],", ""))
    plan = h.plan()
    assert plan.renames and plan.renames[0].suspects[0].why == "same claiming code"
    with pytest.raises(RefusedError):
        h.apply(allow_mass_revoke=True)
    assert _writes(h) == 0


def test_an_offboarding_acknowledged_in_the_policy_goes_through(applied):
    h = applied
    text = RENAME_USER.replace(", previously: [alice]", "")
    h.write(text)
    token = h.plan().renames[0].token
    h.write(text, system_extra=f"offboarding: {{acknowledge: {token}}}\n")
    plan = h.plan()
    assert plan.renames[0].acknowledged and not plan.refused_renames
    _, report = h.apply(allow_mass_revoke=True)
    assert report is not None and report.ok
    assert "hq/user/alice" not in _state(h)["resources"]


# -- ignore: -----------------------------------------------------------------------------------------------

def test_ignore_hands_over_a_user_with_grants_without_a_write(applied):
    h = applied
    handed = POLICY.replace('  bob: {phone: "+4790000002"}\n', "").replace("staff: [alice, bob]", "staff: [alice]")
    h.write(handed + "ignore:\n  - hq/user/bob\n")
    plan = h.plan()
    assert not plan.has_changes and plan.revocations == 0
    ignored = {n.address: n.message for n in plan.ignored}
    assert "hq/user/bob" in ignored and ignored["hq/user/bob"].startswith("released: left as it is")
    assert any(a.startswith("hq/permission/bob/") for a in ignored)
    assert "Ignored (`ignore:`; never changed, never revoked)" in render.render_text(plan)
    assert not any(n.address.startswith("hq/") and "bob" in n.address for n in plan.unmanaged)
    h.apply()
    assert _writes(h) == 0


def test_ignore_patterns_leave_strangers_alone_and_list_them_once(applied):
    h = applied
    h.write(POLICY + "ignore:\n  - hq/device/id:*\n  - hq/user/id:*\n")
    plan = h.plan()
    assert all(n.address.startswith(("hq/device/id:", "hq/user/id:", "hq/permission/id:")) for n in plan.ignored)
    assert len({n.address for n in plan.ignored}) == len(plan.ignored)


@pytest.mark.parametrize("pattern", ["hq/user/bob", "hq/device/an*", "hq/permission/*/gym/*"])
def test_an_ignore_pattern_overlapping_a_declared_entry_is_an_error_at_its_line(harness, pattern):
    harness.write(POLICY + f"ignore:\n  - hq/user/nobody\n  - {pattern}\n")
    with pytest.raises(PolicyError) as error:
        harness.plan()
    text = str(error.value)
    line = POLICY.count("\n") + 3
    assert f"policy.yaml:{line}:" in text and f"ignore pattern '{pattern}' matches" in text
    assert "nobody" not in text


@pytest.mark.parametrize("item", ["hq/lock/x", "bob", "hq/user/`rm -rf`", "{a: 1}"])
def test_an_ignore_item_that_is_no_address_is_an_error_at_its_line(harness, item):
    harness.write(POLICY + f"ignore:\n  - {item}\n")
    with pytest.raises(PolicyError) as error:
        harness.plan()
    assert f"policy.yaml:{POLICY.count(chr(10)) + 2}:" in str(error.value)
    assert "an ignore item is an address or pattern" in str(error.value)


def test_a_hand_over_is_not_counted_by_the_mass_revoke_guard_and_report_mode_lists_it_as_ignored(applied):
    h = applied
    handed = POLICY.replace('  bob: {phone: "+4790000002"}\n', "").replace("staff: [alice, bob]", "staff: [alice]")
    h.write(handed + "ignore:\n  - hq/user/bob\n", system_extra="unmanaged: report\nmass_revoke: {minimum: 1}\n")
    plan = h.plan()
    assert not plan.guards and not [n for n in plan.unmanaged if "bob" in n.address]
    # alice, bob and carol on entrance and annex, alice's two on the gym: 8 grants, of which bob's 2 are handed over
    assert len([n for n in plan.ignored if n.address.startswith("hq/permission/bob/")]) == 2
    assert plan.managed_grants == 8 - 2
    assert {n.address for n in plan.ignored} >= {"hq/user/bob"}


def test_a_previously_that_is_no_key_says_so_in_words(harness):
    harness.write(POLICY.replace('  bob: {phone: "+4790000002"}', '  bob: {phone: "+4790000002", previously: [Bob N]}'))
    with pytest.raises(PolicyError) as error:
        harness.plan()
    assert "'Bob N' is not a valid key: `previously:` lists the keys this entry had before" in str(error.value)
