"""The per-kind attribute schema: one declaration per vendor says which policy fields a grant has, their
defaults, and whether a change is an update, a replacement or impossible. Validation, expansion, the
planner, rendering and export read it, so a new permission field is the model plus the vendors that
support it; these tests add one without touching `reconciler/`."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import pytest
from ruamel.yaml.comments import CommentedMap

from reconciler.errors import PolicyError
from reconciler.export import _permissions, _temp_keys
from reconciler.plan import Action
from reconciler.planner import plan
from reconciler.policy import load_policy, schema
from reconciler.policy.schema import GrantField
from reconciler.providers.abloy import CAPABILITIES as ABLOY
from reconciler.providers.sentry import SentryProvider
from reconciler.providers.spkey import CAPABILITIES as SPKEY
from reconciler.providers.unloc import CAPABILITIES as UNLOC
from reconciler.providers.unloc_partner import CAPABILITIES as UNLOC_PARTNER
from reconciler.render import access_sentence, render_text
from reconciler.resources import (
    NO_DEFAULT,
    Attribute,
    Capabilities,
    Kind,
    KindSchema,
    Meta,
    OnChange,
    Resource,
    Status,
    grant_schema_of,
    on_change,
)

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
FRONT = "0b6f6a52-3f0e-4d7e-9b8a-2d1c5e7f9a10"

SYSTEMS = """\
systems:
  office:
    vendor: sentry
    url: sandbox
  cabins:
    vendor: unloc-partner
    url: sandbox
    partner_id: p1
users:
  alice: {email: alice@example.com, phone: "+4790000001"}
devices:
  front: {system: office, id: "0b6f6a52-3f0e-4d7e-9b8a-2d1c5e7f9a10"}
  cabin: {system: cabins, id: "danalock-00:00:00:00:00:01"}
"""


# ------------------------------------------------------------------------ a new field, declared in two places

class PinPermission(schema.PermissionModel):
    """The model half of a new field: one annotated line."""

    pin_required: Annotated[bool | None, GrantField("has no PIN requirement", "a PIN requirement")] = None


PIN = Attribute(bool, default=False, on_change=OnChange.REPLACE)


class PinSentry(SentryProvider):
    """The vendor half: the vendor's grant schema gains the attribute (its request mapping would send it)."""

    capabilities = dataclasses.replace(SentryProvider.capabilities, attributes={
        Kind.SHARE: KindSchema({**SentryProvider.capabilities.grant_schema.attributes, "pin_required": PIN})})


@pytest.fixture
def pin_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schema, "PermissionModel", PinPermission)


def load(tmp_path: Path, permissions: str, sentry: Capabilities = PinSentry.capabilities) -> list[Resource]:
    (tmp_path / "systems.yaml").write_text(SYSTEMS)
    (tmp_path / "permissions.yaml").write_text("permissions:\n" + textwrap.indent(textwrap.dedent(permissions), "  "))
    capabilities = {c.vendor: c for c in (sentry, UNLOC_PARTNER)}
    return load_policy(tmp_path, capabilities, {}).resources


def share(resources: list[Resource]) -> Resource:
    [grant] = [r for r in resources if r.kind == Kind.SHARE]
    return grant


def test_a_new_field_is_validated_expanded_with_its_default_and_schema(tmp_path: Path, pin_field: None) -> None:
    given = share(load(tmp_path, """\
        - users: [alice]
          devices: [front]
          pin_required: true
        """))
    assert given.attributes["pin_required"] is True
    assert given.schema.on_change("pin_required") is OnChange.REPLACE
    omitted = share(load(tmp_path, """\
        - users: [alice]
          devices: [front]
        """))
    assert omitted.attributes["pin_required"] is False        # the vendor's default, compared like any value
    # A vendor that does not declare it keeps its grants as they were.
    plain = share(load(tmp_path, "- users: [alice]\n  devices: [front]\n", sentry=SentryProvider.capabilities))
    assert "pin_required" not in plain.attributes


def test_a_new_field_on_a_vendor_without_it_fails_at_its_key(tmp_path: Path, pin_field: None) -> None:
    with pytest.raises(PolicyError) as caught:
        load(tmp_path, """\
            - users: [alice]
              devices: [cabin]
              pin_required: true
            """)
    [line] = caught.value.lines()
    assert line.endswith("permissions.yaml:4:5: unloc-partner has no PIN requirement (device 'cabin' is on system "
                         "'cabins'); remove `pin_required:`"), line


def test_a_vendor_narrowing_the_type_is_a_located_error(tmp_path: Path, pin_field: None) -> None:
    narrow = dataclasses.replace(PinSentry.capabilities, attributes={
        Kind.SHARE: KindSchema({**PinSentry.capabilities.grant_schema.attributes, "pin_required": Attribute(str)})})
    with pytest.raises(PolicyError) as caught:
        load(tmp_path, "- users: [alice]\n  devices: [front]\n  pin_required: true\n", sentry=narrow)
    [line] = caught.value.lines()
    assert "permissions.yaml:4:19: `pin_required:` on sentry takes a str" in line, line


def test_a_new_field_is_diffed_replaced_rendered_and_exported(tmp_path: Path, pin_field: None) -> None:
    want = share(load(tmp_path, """\
        - users: [alice]
          devices: [front]
          pin_required: true
        """))
    live = dataclasses.replace(want, attributes={**want.attributes, "pin_required": False}, id="s1",
                               schema=KindSchema(), meta={}, source=None)
    result = plan([want], [live], now=NOW)
    [change] = result.changes
    assert (change.action, change.changed) == (Action.REPLACE, ("pin_required",))
    sentence = access_sentence(change.to_dict())
    assert sentence is not None and "is re-issued: pin\\_required False → True" in sentence
    assert "pin_required" in render_text(result)
    # Export writes the field when it is not the vendor's default, and leaves the default out.
    entries, _, _ = _permissions([live, dataclasses.replace(want, name="alice/back")], {}, set(),
                                 PinSentry.capabilities.grant_schema)
    assert [e.get("pin_required") for e in entries] == [None, True]


def test_device_fields_come_from_the_device_schema(tmp_path: Path) -> None:
    """A device field is accepted where the vendor's device schema declares it, and expanded from it."""
    cabins = dataclasses.replace(UNLOC_PARTNER, attributes={
        **UNLOC_PARTNER.attributes, Kind.DEVICE: KindSchema({"favourite": Attribute(bool, default=False)})})
    assert cabins.device_fields == frozenset({"favourite"}) and not UNLOC_PARTNER.device_fields
    (tmp_path / "systems.yaml").write_text(SYSTEMS.replace('id: "danalock-00:00:00:00:00:01"}',
                                                           'id: "danalock-00:00:00:00:00:01", favourite: true}'))
    capabilities = {c.vendor: c for c in (SentryProvider.capabilities, cabins)}
    devices = {r.name: r for r in load_policy(tmp_path, capabilities, {}).resources if r.kind == Kind.DEVICE}
    assert dict(devices["cabin"].attributes) == {"favourite": True}
    assert dict(devices["front"].attributes) == {}          # adopted, nothing given: nothing to compare
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path, {c.vendor: c for c in (SentryProvider.capabilities, UNLOC_PARTNER)}, {})
    [line] = caught.value.lines()
    assert line.endswith("systems.yaml:13:61: unloc-partner devices have no 'favourite'"), line


def test_export_leaves_out_each_vendors_defaults() -> None:
    def exported(schema_: KindSchema, kind: str, **attributes: Any) -> dict[str, Any]:
        grant = Resource("s", kind, "alice/front", {"start": None, "end": "2027-01-01T00:00:00Z", **attributes})
        [entry] = _permissions([grant], {}, set(), schema_)[0]
        return {k: v for k, v in entry.items() if k not in ("users", "devices")}
    end = {"end": "2027-01-01T00:00:00Z"}
    assert exported(ABLOY.grant_schema, Kind.PERMISSION, key_validity="P8D") == end
    assert exported(ABLOY.grant_schema, Kind.PERMISSION, key_validity="P3D") == {**end, "key_validity": "P3D"}
    sentry = SentryProvider.capabilities.grant_schema
    assert exported(sentry, Kind.SHARE, role="USER") == end
    assert exported(sentry, Kind.SHARE, role="ADMIN") == {**end, "role": "ADMIN"}


def test_export_writes_the_temp_key_fields_of_the_schema_in_its_order() -> None:
    key = Resource("s", Kind.TEMP_KEY, "guest", {"access": "public", "users": [], "start": "2026-12-01T00:00:00Z",
                                                 "end": "2026-12-02T00:00:00Z", "max_uses": None,
                                                 "description": "Door"}, meta={"device": "front"})
    section = _temp_keys([key], CommentedMap(), set(), {}, SPKEY.schema(Kind.TEMP_KEY))
    assert list(section["guest"].items()) == [("device", "front"), ("access", "public"),
                                              ("start", "2026-12-01T00:00:00Z"), ("end", "2026-12-02T00:00:00Z"),
                                              ("description", "Door")]


# ------------------------------------------------------------------ one mechanism for "cannot change in place"

def test_unloc_keys_are_immutable_so_any_change_replaces() -> None:
    want = Resource("c", Kind.KEY, "carol/cabin", {"end": "2027-01-01T00:00:00Z", "schedule": None},
                    schema=UNLOC.grant_schema)
    have = Resource("c", Kind.KEY, "carol/cabin", {"end": None, "schedule": None}, id="k1")
    [change] = plan([want], [have], now=NOW).changes
    assert change.action is Action.REPLACE and want.replace_on_change


def test_abloy_roles_cannot_change_in_place_from_either_side() -> None:
    fixed = ABLOY.schema(Kind.USER)
    for want_schema, have_schema in ((fixed, KindSchema()), (KindSchema(), fixed)):
        want = Resource("hq", Kind.USER, "alice", {"role": "ADMIN"}, schema=want_schema)
        have = Resource("hq", Kind.USER, "alice", {"role": "USER"}, id="u1", schema=have_schema)
        result = plan([want], [have], now=NOW)
        assert not result.changes
        [note] = result.warnings
        assert "role cannot be changed in place" in note.message


def test_spkey_description_is_fixed_but_the_rest_of_the_key_updates() -> None:
    schema_ = SPKEY.schema(Kind.TEMP_KEY)
    want = Resource("s", Kind.TEMP_KEY, "guest", {"description": "new", "max_uses": 3}, schema=schema_)
    have = Resource("s", Kind.TEMP_KEY, "guest", {"description": "old", "max_uses": 2}, id="t1", schema=schema_)
    result = plan([want], [have], now=NOW)
    [change] = result.changes
    assert (change.action, change.changed) == (Action.UPDATE, ("max_uses",))
    assert [n.address for n in result.warnings] == ["s/temp_key/guest"]


def test_strictest_side_wins() -> None:
    replacing = KindSchema({"a": Attribute(on_change=OnChange.REPLACE)})
    fixed = KindSchema({"a": Attribute(on_change=OnChange.FIXED)})
    assert on_change("a", KindSchema(), replacing) is OnChange.REPLACE
    assert on_change("a", replacing, fixed) is OnChange.FIXED
    assert on_change("b", replacing, fixed) is OnChange.UPDATE
    assert on_change("b", KindSchema(immutable=True)) is OnChange.REPLACE


def test_shorthands_fold_into_the_schema() -> None:
    legacy = Resource("c", Kind.KEY, "a/b", replace_on_change=True, meta={"create_only": ("x",), "via": ("user",)})
    assert legacy.schema.immutable and legacy.replace_on_change
    assert legacy.schema.attributes["x"].on_change is OnChange.FIXED
    assert dict(legacy.meta) == {"via": ("user",)}
    assert dataclasses.replace(legacy, name="a/c").schema == legacy.schema


# --------------------------------------------------------------------- flags and declarations say the same

FLAG_NAMES = ("requires_end", "open_ended", "key_validity", "share_roles", "schedules", "grant_notify",
              "immutable_grants")


@pytest.mark.parametrize("declared", [ABLOY, UNLOC, UNLOC_PARTNER, SentryProvider.capabilities],
                         ids=lambda c: c.vendor)
def test_declared_grant_schema_matches_its_flags(declared: Capabilities) -> None:
    """A vendor's declared grant schema reads back as the words of `grant_schema_of`, and those words build it
    again: the helper and the declarations describe grants alike (the words are read from the schema only)."""
    flags: dict[str, Any] = {name: getattr(declared, name) for name in FLAG_NAMES}
    rebuilt = Capabilities(vendor=declared.vendor, grant_kind=declared.grant_kind,
                           attributes={declared.grant_kind: grant_schema_of(**flags)})
    assert dict(rebuilt.grant_schema.attributes) == dict(declared.grant_schema.attributes)
    assert rebuilt.grant_schema.immutable == declared.grant_schema.immutable


def test_flags_of_abloy_and_sentry() -> None:
    assert ABLOY.requires_end and not ABLOY.open_ended and ABLOY.key_validity and not ABLOY.share_roles
    assert SentryProvider.capabilities.share_roles == frozenset({"USER", "ADMIN"})
    assert UNLOC.schedules and UNLOC.grant_notify and UNLOC.immutable_grants and UNLOC_PARTNER.immutable_grants
    assert SPKEY.grant_schema.on_change("description") is OnChange.FIXED
    assert ABLOY.grant_schema.get("end") == Attribute(str, default=NO_DEFAULT, required=True)


def test_pending_status_is_untouched_by_the_schema() -> None:
    pending = Resource("c", Kind.KEY, "a/b", {"end": None}, status=Status.PENDING, schema=UNLOC.grant_schema)
    result = plan([dataclasses.replace(pending, status=Status.PRESENT, id=None)], [pending], now=NOW)
    assert not result.changes and [n.address for n in result.pending] == ["c/key/a/b"]


# ------------------------------------------------------------------------------------------- typed meta

def test_every_meta_key_read_in_the_package_is_declared() -> None:
    """mypy checks the keys written into `Meta`; this checks the ones read (`meta.get("x")`, `meta["x"]`)."""
    package = Path(__file__).resolve().parent.parent / "reconciler"
    read = set()
    for path in package.rglob("*.py"):
        if "sandbox" in path.relative_to(package).parts:
            continue
        read |= set(re.findall(r"\bmeta(?:\.get\(|\[)\"([a-z_]+)\"", path.read_text(encoding="utf-8")))
    assert {"via", "uncertain", "phone", "email", "lock"} <= read        # the scan finds reads at all
    assert read <= set(Meta.__annotations__), sorted(read - set(Meta.__annotations__))
