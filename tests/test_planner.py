"""Planner and plan units: pure diffs, safety rails, the plan JSON contract."""

from datetime import UTC, datetime

from reconciler.planner import plan
from reconciler.plan import Action
from reconciler.resources import Resource, Status

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
WINDOW = {"start": "2026-01-01T00:00:00Z", "end": "2026-12-31T23:59:59Z", "key_validity": "P8D"}


def grant(user="alice", device="front-gate", managed=True, id=None, **attrs):
    return Resource("hq", "permission", f"{user}/{device}/OPEN", {**WINDOW, **attrs}, id=id, managed=managed,
                    source="policies/access.yaml:3")


def test_missing_grant_is_created_with_grant_effect():
    result = plan([grant()], [], now=NOW)
    [change] = result.changes
    assert (change.action, change.effect, change.address) == (Action.CREATE, "grant", "hq/permission/alice/front-gate/OPEN")
    assert result.to_dict()["changes"][0]["source"] == "policies/access.yaml:3"


def test_equal_live_and_desired_plan_nothing():
    assert plan([grant()], [grant(id="p1")], now=NOW).changes == ()


def test_changed_window_is_an_update_on_the_same_id():
    result = plan([grant(end="2027-06-30T00:00:00Z")], [grant(id="p1")], now=NOW)
    [change] = result.changes
    assert change.action is Action.UPDATE and change.live.id == "p1" and change.changed == ("end",)


def test_immutable_grant_is_replaced():
    desired = Resource("c", "key", "carol/cabin", {"end": None}, replace_on_change=True)
    live = Resource("c", "key", "carol/cabin", {"end": "2026-12-01T00:00:00Z"}, id="k1")
    [change] = plan([desired], [live], now=NOW).changes
    assert change.action is Action.REPLACE and change.effect == "grant"


def test_ended_grant_is_not_created_and_warned():
    result = plan([grant(end="2026-11-01T00:00:00Z")], [], now=NOW)
    assert result.changes == ()
    assert "has passed" in result.warnings[0].message


def test_undeclared_grant_on_managed_device_is_revoked_or_reported():
    live = [grant("id:x", id="p9")]
    revoked = plan([], live, now=NOW)
    assert [(c.action, c.effect) for c in revoked.changes] == [(Action.DELETE, "revoke")]
    reported = plan([], live, now=NOW, unmanaged_modes={"hq": "report"})
    assert reported.changes == () and reported.unmanaged[0].address == "hq/permission/id:x/front-gate/OPEN"


def test_unknown_users_and_devices_are_listed_never_deleted():
    live = [Resource("hq", "user", "id:u1", {"role": "USER"}, id="u1", managed=False),
            Resource("hq", "device", "old-door", {"name": "Old"}, id="d1", managed=True)]
    result = plan([], live, now=NOW)
    assert result.changes == ()
    assert [n.address for n in result.unmanaged] == ["hq/device/old-door", "hq/user/id:u1"]


def test_removed_user_known_to_state_is_offboarded():
    live = [Resource("hq", "user", "bob", {"role": "USER"}, id="u1", managed=True)]
    [change] = plan([], live, now=NOW).changes
    assert (change.action, change.effect) == (Action.DELETE, "revoke")


def test_decommission_deletes_only_when_declared():
    absent = Resource("hq", "device", "door", {"name": "Door"}, status=Status.ABSENT)
    live = Resource("hq", "device", "door", {"name": "Door"}, id="d1")
    assert [c.action for c in plan([absent], [live], now=NOW).changes] == [Action.DELETE]
    assert plan([absent], [], now=NOW).changes == ()


def test_pending_live_is_shown_not_repeated_until_it_expires():
    want = Resource("hq", "invitation", "alice", {"phone": "+4790000001"})
    sent = Resource("hq", "invitation", "alice", {"phone": "+4790000001"}, id="i1", status=Status.PENDING,
                    meta={"expires": "2026-11-25T00:00:00Z", "pending": "sent"})
    waiting = plan([want], [sent], now=NOW)
    assert waiting.changes == () and waiting.pending[0].address == "hq/invitation/alice"
    later = plan([want], [sent], now=datetime(2026, 11, 26, tzinfo=UTC))
    assert [c.action for c in later.changes] == [Action.CREATE]


def test_create_only_attribute_is_a_warning_not_a_change():
    want = Resource("hq", "user", "alice", {"role": "ADMIN"})
    live = Resource("hq", "user", "alice", {"role": "USER"}, id="u1", meta={"create_only": ("role",)})
    result = plan([want], [live], now=NOW)
    assert result.changes == () and "cannot be changed in place" in result.warnings[0].message


def test_adopted_id_missing_is_a_warning_not_a_create():
    want = Resource("hq", "device", "gate", {}, id="0000")
    result = plan([want], [], now=NOW)
    assert result.changes == () and "not found" in result.warnings[0].message


def test_duplicate_live_grants_keep_one_and_revoke_the_other():
    result = plan([grant()], [grant(id="p1"), grant(id="p2")], now=NOW)
    [change] = result.changes
    assert change.action is Action.DELETE and change.live.id == "p2"


def test_plan_dict_contract_and_checksum_is_stable():
    result = plan([grant(), grant("bob")], [grant("id:x", id="p9")], now=NOW)
    data = result.to_dict()
    assert list(data) == ["format_version", "now", "checksum", "digests", "summary", "effects", "changes", "pending",
                          "unmanaged", "warnings", "guard"]
    assert data["now"] == "2026-11-22T10:00:00Z"
    assert data["summary"] == {"create": 2, "update": 0, "delete": 1, "replace": 0}
    assert [c["address"] for c in data["changes"]] == sorted(c["address"] for c in data["changes"])
    assert set(data["changes"][0]) >= {"address", "system", "kind", "action", "effect", "before", "after", "source"}
    again = plan([grant("bob"), grant()], [grant("id:x", id="p9")], now=datetime(2026, 11, 23, tzinfo=UTC))
    assert again.checksum() == result.checksum() and result.checksum().startswith("sha256:")
    assert plan([grant()], [], now=NOW).checksum() != result.checksum()


def test_managed_grants_counts_live_grants_on_managed_devices():
    result = plan([], [grant(id="p1"), grant("bob", id="p2"), grant("x", managed=False, id="p3")], now=NOW)
    assert result.managed_grants == 2 and result.revocations == 2


def test_origin_tells_drift_from_policy_changes():
    from reconciler.resources import digest
    applied = {"hq/permission/alice/front-gate/OPEN": digest(dict(WINDOW)),
               "hq/permission/bob/front-gate/OPEN": digest(dict(WINDOW))}
    desired = [grant(), grant("bob", end="2028-01-01T00:00:00Z"), grant("carol")]
    live = [grant(id="p1", end="2026-12-01T00:00:00Z"),    # alice: edited outside git
            grant("bob", id="p2"),                          # bob: the policy moved his end
            grant("mallory", id="p9")]                      # granted outside git
    origins = {c.address.split("/")[2]: c.origin for c in plan(desired, live, now=NOW, applied=applied).changes}
    assert origins == {"alice": "drift", "bob": "policy", "carol": "policy", "mallory": "drift"}
    removed = plan([], [grant("bob", id="p2")], now=NOW, applied=applied).changes[0]
    assert removed.origin == "policy"     # bob was applied from git, and git no longer has him
