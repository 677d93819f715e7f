"""A vendor declares its own kinds (`KindDef` in `Capabilities.kinds`) and its accounts' fields (a user schema
of `UserField`s): the policy, the planner, the guard and the order of apply read the declarations, with no
edit in the core. The built-in kinds are declarations of the same form."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from reconciler import vendors
from reconciler.errors import PolicyError
from reconciler.plan import Action, Effect, owners, phase_of
from reconciler.planner import plan
from reconciler.policy import Policy, load_policy
from reconciler.policy.json_schema import policy_json_schema
from reconciler.resources import (
    ACCESS_END,
    ACCESS_START,
    GRANT_KINDS,
    KINDS,
    Attribute,
    Capabilities,
    Kind,
    KindDef,
    KindSchema,
    register_kind,
)

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)

ACCESS_GRANT = KindDef("access_grant", grant=True, owners=(Kind.USER, Kind.DEVICE),
                       depends_on=(Kind.USER, Kind.DEVICE))
GRANTCO = Capabilities(
    vendor="grantco", grant_kind="access_grant", user_accounts=True, kinds=(ACCESS_GRANT,),
    operations=frozenset({"OPEN"}), creates_devices=True,
    attributes={
        Kind.USER: KindSchema({"email": Attribute(str), "name": Attribute(str)}),
        "access_grant": KindSchema({"start": Attribute(str, access=ACCESS_START),
                                    "end": Attribute(str, default=None, access=ACCESS_END),
                                    "pin_required": Attribute(bool, default=True, access=(True, False))}),
    })

POLICY = """\
systems:
  doors: {vendor: grantco, url: sandbox}
users:
  alice: {name: Alice Hansen, email: alice@example.com, phone: "+4790000001"}
devices:
  front: {system: doors, name: Front}
permissions:
  - {users: [alice], devices: [front], operations: [OPEN]}
"""


@pytest.fixture
def policy_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    known = vendors.names()
    monkeypatch.setattr(vendors, "names", lambda: sorted([*known, "grantco", "plainco"]))
    (tmp_path / "policy.yaml").write_text(POLICY)
    return tmp_path


def test_built_in_kinds_are_declarations() -> None:
    assert {k for k, d in KINDS.items() if d.grant} >= {Kind.PERMISSION, Kind.KEY, Kind.SHARE, Kind.TEMP_KEY}
    assert KINDS[Kind.USER].holder and KINDS[Kind.DEVICE].top
    assert "access_grant" in GRANT_KINDS      # registered when its vendor's capabilities were built


def test_a_kind_declared_twice_differently_is_refused() -> None:
    with pytest.raises(ValueError, match="declared twice"):
        register_kind(KindDef("access_grant"))


def test_a_vendor_kind_is_a_grant_in_the_plan(policy_path: Path) -> None:
    policy = load_policy(policy_path, {"grantco": GRANTCO}, {})
    [grant] = [r for r in policy.resources if r.kind == "access_grant"]
    assert grant.address == "doors/access_grant/alice/front/OPEN" and grant.is_grant
    assert grant.attributes["pin_required"] is True
    assert set(grant.depends_on) >= {"doors/user/alice", "doors/device/front"}
    assert owners(grant.address) == ["doors/user/alice", "doors/device/front"]
    assert phase_of(Action.DELETE, "access_grant") == 0 and phase_of(Action.CREATE, "access_grant") == 4
    created = plan(policy.resources, [], now=NOW)
    assert {c.address: c.effect for c in created.changes}["doors/access_grant/alice/front/OPEN"] == Effect.GRANT


def test_accounts_carry_the_fields_their_vendor_declares(policy_path: Path) -> None:
    policy = load_policy(policy_path, {"grantco": GRANTCO}, {})
    [user] = [r for r in policy.resources if r.kind == Kind.USER]
    # The vendor's user schema declares email and name (not phone, not role): exactly those travel.
    assert dict(user.attributes) == {"email": "alice@example.com", "name": "Alice Hansen"}


# -- a key a vendor's schema declares is a policy key on that vendor's systems --------------------------------

def _load(tmp_path: Path, text: str, capabilities: dict[str, Capabilities] | None = None) -> Policy:
    (tmp_path / "policy.yaml").write_text(text)
    return load_policy(tmp_path, capabilities or {"grantco": GRANTCO}, {})


def _errors(tmp_path: Path, text: str, capabilities: dict[str, Capabilities] | None = None) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        _load(tmp_path, text, capabilities)
    return [line.split("policy.yaml:", 1)[1] for line in caught.value.lines()]


def test_a_declared_grant_key_reaches_the_grant(policy_path: Path) -> None:
    policy = _load(policy_path, POLICY.replace("operations: [OPEN]}", "operations: [OPEN], pin_required: false}"))
    [grant] = [r for r in policy.resources if r.kind == "access_grant"]
    assert grant.attributes["pin_required"] is False


def test_a_declared_key_is_type_checked_at_its_value(policy_path: Path) -> None:
    text = POLICY.replace("operations: [OPEN]}", "operations: [OPEN], pin_required: 'no'}")
    assert _errors(policy_path, text) == [
        "8:74: `pin_required:` on grantco takes a bool (device 'front' is on system 'doors')"]


def test_a_key_no_vendor_declares_stays_unknown(policy_path: Path) -> None:
    text = POLICY.replace("operations: [OPEN]}", "operations: [OPEN], pin_requird: false}")
    assert _errors(policy_path, text) == ["8:60: unknown key 'pin_requird' (did you mean 'pin_required'?)"]
    text = POLICY.replace("name: Front}", "name: Front, chime: true}")
    assert _errors(policy_path, text) == ["6:39: unknown key 'chime'"]


def test_a_key_declared_by_another_vendor_is_an_error_on_this_one(policy_path: Path) -> None:
    plain = Capabilities(vendor="plainco", grant_kind=Kind.KEY, creates_devices=True)
    text = (POLICY.replace("  doors:", "  plain: {vendor: plainco, url: sandbox}\n  doors:")
            .replace("devices:\n", "devices:\n  back: {system: plain, name: Back}\n")
            + "  - {users: [alice], devices: [back], pin_required: false}\n")
    assert _errors(policy_path, text, {"grantco": GRANTCO, "plainco": plain}) == [
        "11:39: plainco has no 'pin_required' on grants (device 'back' is on system 'plain'); remove `pin_required:`"]


def test_declared_keys_are_in_the_editor_schema() -> None:
    schema = policy_json_schema({"grantco": GRANTCO})
    permission = schema["$defs"]["Permission"]
    assert permission["additionalProperties"] is False
    assert permission["properties"]["pin_required"] == {"type": "boolean", "description": "declared by grantco"}
    assert "pin_required" not in policy_json_schema({})["$defs"]["Permission"]["properties"]
