"""The meaning of a field for access comes from its declaration (`Attribute(access=...)`), not from its name:
a vendor's new field moves access as it declares, the guard counts it in the right direction, and the
built-in fields keep the meaning they always had (their declarations are the built-in kinds')."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from reconciler.plan import Action, Effect, classify, is_privilege
from reconciler.planner import plan
from reconciler.resources import ACCESS_SCHEDULE, Attribute, Capabilities, Kind, KindSchema, Resource

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
NOW_TEXT = "2026-11-22T10:00:00Z"
WINDOW = {"start": "2026-01-01T00:00:00Z", "end": "2027-12-31T00:00:00Z"}

PIN = Capabilities(vendor="pinlock", grant_kind=Kind.KEY, attributes={Kind.KEY: KindSchema({
    "start": Attribute(str), "end": Attribute(str, default=None),
    "pin_required": Attribute(bool, default=True, access=(True, False))})})
SCHEMA = PIN.grant_schema


def key(name: str, pin: bool, id: str | None = None) -> Resource:
    return Resource("doors", Kind.KEY, name, {**WINDOW, "pin_required": pin}, id=id, schema=SCHEMA)


def test_pin_required_turned_off_grants_access() -> None:
    effects = classify(Action.UPDATE, Kind.KEY, {**WINDOW, "pin_required": False},
                       {**WINDOW, "pin_required": True}, NOW_TEXT, SCHEMA)
    assert effects == {Effect.GRANT}


def test_pin_required_turned_on_revokes_access() -> None:
    effects = classify(Action.UPDATE, Kind.KEY, {**WINDOW, "pin_required": True},
                       {**WINDOW, "pin_required": False}, NOW_TEXT, SCHEMA)
    assert effects == {Effect.REVOKE}


def test_an_undeclared_meaning_moves_no_access() -> None:
    # Without `access=`, today's fields are what they were: a change of an unknown field grants nothing.
    effects = classify(Action.UPDATE, Kind.KEY, {**WINDOW, "pin_required": False},
                       {**WINDOW, "pin_required": True}, NOW_TEXT)
    assert effects == frozenset()


def test_the_guard_counts_pin_required_turned_on_as_a_revocation_and_off_as_none() -> None:
    names = [f"u{n}/door" for n in range(12)]
    tightened = plan([key(n, True) for n in names], [key(n, False, id=f"k{i}") for i, n in enumerate(names)],
                     now=NOW)
    assert {c.effect for c in tightened.changes} == {Effect.REVOKE}
    assert tightened.revocations == 12 and tightened.guards[0].trips
    loosened = plan([key(n, False) for n in names], [key(n, True, id=f"k{i}") for i, n in enumerate(names)],
                    now=NOW)
    assert {c.effect for c in loosened.changes} == {Effect.GRANT}
    assert loosened.revocations == 0 and not any(g.trips for g in loosened.guards)
    assert loosened.to_dict()["effects"] == {"grant": 12, "revoke": 0}


def test_a_declared_privilege_is_listed() -> None:
    schema = KindSchema({"level": Attribute(str, access=("guest", "staff", "owner"), privilege=frozenset({"owner"}))})
    assert is_privilege(Kind.KEY, {"level": "owner"}, {"level": "staff"}, schema)
    assert not is_privilege(Kind.KEY, {"level": "staff"}, {"level": "guest"}, schema)
    assert classify(Action.UPDATE, Kind.KEY, {**WINDOW, "level": "guest"}, {**WINDOW, "level": "owner"},
                    NOW_TEXT, schema) == {Effect.REVOKE}


def test_a_named_comparator_is_read_from_the_declaration() -> None:
    schema = KindSchema({"hours": Attribute(list, access=ACCESS_SCHEDULE)})
    weekdays = [{"day": "mon", "from": "08:00", "to": "18:00"}]
    assert classify(Action.UPDATE, Kind.KEY, {**WINDOW, "hours": None}, {**WINDOW, "hours": weekdays},
                    NOW_TEXT, schema) == {Effect.GRANT}


def test_an_unknown_comparator_is_refused_at_declaration() -> None:
    schema = KindSchema({"hours": Attribute(list, access="sometimes")})
    with pytest.raises(ValueError, match="names no comparator"):
        classify(Action.UPDATE, Kind.KEY, WINDOW, WINDOW, NOW_TEXT, schema)


@pytest.mark.parametrize(("kind", "after", "before", "expected"), [
    (Kind.USER, {"role": "ADMIN"}, {"role": "USER"}, {Effect.GRANT}),
    (Kind.USER, {"role": "USER"}, {"role": "ADMIN"}, {Effect.REVOKE}),
    (Kind.SHARE, {**WINDOW, "role": "ADMIN"}, {**WINDOW, "role": "USER"}, {Effect.GRANT}),
    (Kind.TEMP_KEY, {**WINDOW, "access": "public"}, {**WINDOW, "access": "users", "users": ["a@x"]}, {Effect.GRANT}),
    (Kind.TEMP_KEY, {**WINDOW, "access": "public", "users": ["b@x"]}, {**WINDOW, "access": "public"}, set()),
    (Kind.TEMP_KEY, {**WINDOW, "max_uses": 3}, {**WINDOW, "max_uses": 5}, {Effect.REVOKE}),
    (Kind.PERMISSION, {**WINDOW, "schedule": None}, {**WINDOW, "schedule": [
        {"day": "mon", "from": "08:00", "to": "18:00"}]}, {Effect.GRANT}),
])
def test_built_in_fields_keep_their_meaning(kind: str, after: dict, before: dict, expected: set) -> None:
    assert classify(Action.UPDATE, kind, after, before, NOW_TEXT) == expected
