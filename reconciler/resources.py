"""The one type desired and live state share, and what each vendor can express.

The policy loader and every provider produce `Resource`s; the planner diffs them by `address`.
`Capabilities` is what a provider declares it can do; the policy checks read it so that a policy asking
a vendor for what it cannot do fails at validation, before any request.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final, TypedDict, cast


class Kind(StrEnum):
    """The names of the built-in kinds (a vendor may declare more: `KindDef`, `register_kind`)."""

    USER = "user"
    DEVICE = "device"
    GATEWAY = "gateway"
    ASSOCIATION = "association"
    INVITATION = "invitation"
    PERMISSION = "permission"
    KEY = "key"
    SHARE = "share"
    TEMP_KEY = "temp_key"


class Status(StrEnum):
    PRESENT = "present"   # live and in force (or, for desired, should exist)
    PENDING = "pending"   # the vendor is still working on it (async create, approval, sent invitation)
    ABSENT = "absent"     # desired only: must not exist (decommission)


def address_of(system: str, kind: str, name: str) -> str:
    return f"{system}/{kind}/{name}"


# A grant's name is `user/device[/OPERATION]`; a person with several windows on one door has one grant per
# window, named `<slot>@<start>` (`@now` for the window without a start). The slot is what the vendor keys on.
WINDOW_MARK = "@"


def grant_slot(name: str) -> str:
    """`alice/front-gate/OPEN@2026-03-01T00:00:00Z` → `alice/front-gate/OPEN` (also drops a `#<id>` suffix)."""
    return name.split("#", 1)[0].split(WINDOW_MARK, 1)[0]


def grant_parts(name: str) -> list[str]:
    """A grant name's parts without its window: `[user, device]` or `[user, device, operation]`."""
    return grant_slot(name).split("/")


def unknown_name(vendor_id: str) -> str:
    """Name for a live object that neither policy nor state knows: `id:<vendor id>`."""
    return f"id:{vendor_id}"


class OnChange(StrEnum):
    """What a change of one attribute does to its object (Terraform's `ForceNew`, plus one step more)."""

    UPDATE = "update"     # changed in place
    REPLACE = "replace"   # the object is revoked and created again: the plan shows a replacement
    FIXED = "fixed"       # the vendor cannot change it and re-creating the object is not ours to decide (a user
                          # account): the plan warns "remove the entry and add it again"


class _NoDefault:
    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT: Final = _NoDefault()


@dataclass(frozen=True)
class Attribute:
    """One attribute of a kind on a vendor: a line of the vendor's attribute schema.

    - `type`: the type of a value (`None` is also a value: no end, no schedule).
    - `default`: what the desired object holds when the policy leaves the field out; `None` is a default
      (compared: a schedule dropped from the policy must leave the vendor too); `NO_DEFAULT`: left out of the
      object, so that whatever the vendor holds satisfies it.
    - `on_change`: whether a change is made in place, forces replacement, or cannot be made.
    - `required`: the policy must give it (grants that need an end).
    - `choices`: the values the vendor accepts (empty: any of the type).
    - `compared`: False for a field that only travels with the request that creates the object and is
      never read back (a per-grant `notify`): it goes to `meta`, not `attributes`.
    - `access`: how a change of its value moves access (what `classify`, the mass-revoke guard, the plan's
      words and `reconciler access` read): a tuple of values ordered from least to most access
      (`(True, False)` for a `pin_required`; a missing or unknown value ranks as the first), or the name of
      a comparator (`ACCESS_START`, `ACCESS_END`, `ACCESS_SCHEDULE`, `ACCESS_LIMIT`, `ACCESS_MEMBERS`).
      None: a change of it moves no access.
    - `privilege`: the values that give the power to grant (`ADMIN`): a change to or from one is listed as
      a privilege change.
    """

    type: type | tuple[type, ...] = str
    default: Any = NO_DEFAULT
    on_change: OnChange = OnChange.UPDATE
    required: bool = False
    choices: frozenset[str] = frozenset()
    compared: bool = True
    access: tuple[Any, ...] | str | None = None
    privilege: frozenset[Any] = frozenset()

    def rank(self, value: Any) -> int:
        """The place of `value` in an ordered `access` (0 for a missing or unknown value)."""
        order = self.access
        if isinstance(order, tuple) and value in order:
            return order.index(value)
        return 0

    @property
    def has_default(self) -> bool:
        return self.default is not NO_DEFAULT


@dataclass(frozen=True)
class Enforcement:
    """What a vendor's documents say about when a change of one kind is in force on the lock, not merely
    accepted by the vendor. Empty words are "the documents say nothing": shown as unknown, never immediate.

    - `grant`: when a granting change starts to open the door (from its start, or once the vendor moves it
      out of a pending state); `grant_at_start`: it is in force from its start (else `from` is unknown).
    - `revoke`: when a revoking change stops the door opening; `revoke_offline`: the attribute (an ISO 8601
      duration, its default from the schema) for which a key already on the phone still opens offline after
      the revocation; `revoke_at_once`: the documents say it is in force at once.
    - `pending`: the live states (`meta["state"]`) in which the vendor has accepted a change but the lock
      does not enforce it yet (a key being created); `failed`: states in which it never will (`error`).
    - `shorten`: what shortens the exposure of a revocation, set ahead of time ("" : the vendor offers none)."""

    grant: str = ""
    grant_at_start: bool = False
    revoke: str = ""
    revoke_offline: str | None = None
    revoke_at_once: bool = False
    pending: frozenset[str] = frozenset()
    failed: frozenset[str] = frozenset()
    shorten: str = ""


@dataclass(frozen=True)
class KindSchema:
    """The attributes one kind has on one vendor, in the order they are built. `immutable`: the vendor
    cannot update this kind at all, so a change of any attribute (declared or not) forces replacement."""

    attributes: Mapping[str, Attribute] = field(default_factory=dict)
    immutable: bool = False
    enforcement: Enforcement | None = None     # when a change is in force on the lock; None: unknown

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))

    def __contains__(self, name: object) -> bool:
        return name in self.attributes

    def get(self, name: str) -> Attribute | None:
        return self.attributes.get(name)

    def on_change(self, name: str) -> OnChange:
        if self.immutable:
            return OnChange.REPLACE
        attribute = self.attributes.get(name)
        return attribute.on_change if attribute is not None else OnChange.UPDATE

    def fixing(self, names: Iterable[str]) -> KindSchema:
        """This schema with `names` marked as not changeable in place."""
        attributes = dict(self.attributes)
        for name in names:
            attributes[name] = replace(attributes.get(name, Attribute()), on_change=OnChange.FIXED)
        return KindSchema(attributes, self.immutable, self.enforcement)


NO_SCHEMA: Final = KindSchema()
_ON_CHANGE_ORDER = (OnChange.UPDATE, OnChange.REPLACE, OnChange.FIXED)


def on_change(name: str, *schemas: KindSchema) -> OnChange:
    """The strictest thing any of the schemas (desired's and live's) says a change of `name` does."""
    return max((s.on_change(name) for s in schemas), key=_ON_CHANGE_ORDER.index, default=OnChange.UPDATE)


# -- access meaning: the named comparators an `Attribute(access=...)` may give --------------------------------
ACCESS_START: Final = "start"         # where a window begins (none: from now); later narrows
ACCESS_END: Final = "end"             # where a window ends (none: no end); earlier narrows
ACCESS_SCHEDULE: Final = "schedule"   # weekly spans `{day, from, to}` (none: every hour); fewer narrows
ACCESS_LIMIT: Final = "limit"         # a number of uses (none: no limit); fewer narrows
ACCESS_MEMBERS: Final = "members"     # the people a key is for; fewer narrows. `members:<field>`: naming people
                                      # moves nothing while ordered `<field>` is at its widest (a public key)
COMPARATORS: Final = frozenset({ACCESS_START, ACCESS_END, ACCESS_SCHEDULE, ACCESS_LIMIT, ACCESS_MEMBERS})


@dataclass(frozen=True)
class KindDef:
    """One kind of object, declared: the built-in kinds are declarations of this form, and a vendor declares
    its own in `Capabilities.kinds` (registered when its capabilities are built) without a core edit.

    - `name`: the word in an address (`<system>/<name>/<object name>`).
    - `grant`: it gives access to a door (the guard counts it, its revocations go first).
    - `holder`: it is a person's account: deleting it takes every access of the person.
    - `top`: a user, device or gateway: named by its own key (renamed by `previously:`), created before and
      deleted after what depends on it.
    - `owners`: the kinds its name's parts name, in order (`("user", "device")`: `alice/front-gate[/OPEN]`).
    - `depends_on`: the kinds that must exist before one of it is created.
    - `attributes`: the meaning of its fields wherever a vendor's schema does not declare one (`access=`,
      `privilege=`): what the built-in fields have always meant.
    """

    name: str
    grant: bool = False
    holder: bool = False
    top: bool = False
    owners: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()
    attributes: Mapping[str, Attribute] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))
        for name, attribute in self.attributes.items():
            _check_access(self.name, name, attribute)


def _check_access(kind: str, name: str, attribute: Attribute) -> None:
    if isinstance(attribute.access, str) and attribute.access.split(":", 1)[0] not in COMPARATORS:
        raise ValueError(f"{kind}.{name}: access={attribute.access!r} names no comparator "
                         f"(one of {', '.join(sorted(COMPARATORS))}, or a tuple of values least to most access)")


ROLE_ORDER: Final = ("USER", "ADMIN")
_WINDOW = {"start": Attribute(str, access=ACCESS_START), "end": Attribute(str, access=ACCESS_END),
           "schedule": Attribute(list, access=ACCESS_SCHEDULE), "role": Attribute(str, access=ROLE_ORDER)}
_ADMIN = Attribute(str, access=ROLE_ORDER, privilege=frozenset({"ADMIN"}))

KINDS: dict[str, KindDef] = {}
GRANT_KINDS: set[str] = set()     # derived from the declarations: every kind declared with `grant=True`


def register_kind(kind: KindDef) -> KindDef:
    """Declare a kind (again: the same declaration is accepted; another one under a taken name is an error)."""
    known = KINDS.get(kind.name)
    if known is not None and known != kind:
        raise ValueError(f"kind {kind.name!r} is declared twice, differently")
    KINDS[kind.name] = kind
    if kind.grant:
        GRANT_KINDS.add(kind.name)
    return kind


def kind_def(name: str) -> KindDef:
    """The declaration of `name` (an undeclared kind: one with no meaning for access or order)."""
    return KINDS.get(name) or KindDef(name)


for _kind in (
    KindDef(Kind.USER, holder=True, top=True, attributes={"role": _ADMIN}),
    KindDef(Kind.DEVICE, top=True),
    KindDef(Kind.GATEWAY, top=True),
    KindDef(Kind.ASSOCIATION, owners=(Kind.GATEWAY, Kind.DEVICE), depends_on=(Kind.GATEWAY, Kind.DEVICE)),
    KindDef(Kind.INVITATION, owners=(Kind.USER,), depends_on=(Kind.USER,)),
    KindDef(Kind.PERMISSION, grant=True, owners=(Kind.USER, Kind.DEVICE), depends_on=(Kind.USER, Kind.DEVICE),
            attributes=_WINDOW),
    KindDef(Kind.KEY, grant=True, owners=(Kind.USER, Kind.DEVICE), depends_on=(Kind.USER, Kind.DEVICE),
            attributes=_WINDOW),
    KindDef(Kind.SHARE, grant=True, owners=(Kind.USER, Kind.DEVICE), depends_on=(Kind.USER, Kind.DEVICE),
            attributes={**_WINDOW, "role": _ADMIN}),
    KindDef(Kind.TEMP_KEY, grant=True, depends_on=(Kind.DEVICE,),
            attributes={**_WINDOW, "access": Attribute(str, access=("users", "public")),
                        "users": Attribute(list, access=f"{ACCESS_MEMBERS}:access"),
                        "max_uses": Attribute(int, access=ACCESS_LIMIT)}),
):
    register_kind(_kind)


_ACCESS_CACHE: dict[tuple[str, int], tuple[KindSchema, tuple[tuple[str, Attribute], ...]]] = {}


def access_fields(kind: str, schema: KindSchema = NO_SCHEMA) -> tuple[tuple[str, Attribute], ...]:
    """The fields of `kind` whose change moves access, with their meaning: the vendor's schema where it
    declares `access=`, the kind's declaration elsewhere."""
    cached = _ACCESS_CACHE.get((kind, id(schema)))
    if cached is not None and cached[0] is schema:
        return cached[1]
    merged = dict(kind_def(kind).attributes)
    for name, attribute in schema.attributes.items():
        if attribute.access is not None or attribute.privilege:
            _check_access(kind, name, attribute)
            merged[name] = attribute
    fields = tuple((name, a) for name, a in merged.items() if a.access is not None or a.privilege)
    _ACCESS_CACHE[(kind, id(schema))] = (schema, fields)   # the schema is kept: its id is not reused
    return fields


class Meta(TypedDict, total=False):
    """What a resource carries besides its compared attributes: shown, or read by another layer, never
    compared. Every key any layer writes is declared here, so that a misspelt key is a type error."""

    # The policy (expand) → plans, access reviews, providers.
    via: tuple[str, ...]          # how a person came to a grant: `user`, `group:<name>`
    reason: str                   # the permission's `reason:`
    notify: bool                  # a grant attribute that is sent but never compared (`Attribute.compared`)
    phone: str                    # who receives a grant, on vendors that address people by phone …
    email: str | None             # … or by email (also the email a vendor returned for an account)
    claiming_code: str            # a gateway to claim
    # Providers → the planner.
    uncertain: str                # why a create whose answer was lost cannot be proven ours
    not_in_effect: str            # a revocation the vendor acknowledged that did not take effect (when)
    candidates: list[str]         # the vendor ids it might be
    pending: str                  # what the vendor is still doing (shown instead of a change)
    expires: str                  # when a pending invitation lapses (then it is sent again)
    state: str | None             # the vendor's state of a pending object, shown in its note
    # Providers → export, access reviews and notes.
    serial_number: str | None
    claiming_status: str | None
    activation_status: str | None
    status: str | None            # a temporary key's status at the vendor (`expired`, `used-up`)
    uses: int | None
    lock: Any                     # the vendor lock behind a grant or temporary key
    device: str
    created_by: str | None
    # Read back by the provider that wrote them.
    operating_device: str
    lock_id: str
    role: str | None
    batch_sharing: Any
    auth: Any
    data: Any
    # A constructor shorthand folded into `Resource.schema` (never kept).
    create_only: tuple[str, ...]


def compact(meta: Meta) -> Meta:
    """`meta` without its empty values (a vendor field that was not sent)."""
    return cast(Meta, {k: v for k, v in meta.items() if v})


@dataclass(frozen=True)
class Resource:
    """A thing in a vendor system, desired or live.

    - `name`: the part of the address after the kind: `alice`, `lobby/front-gate`, `alice/front-gate/OPEN`.
    - `attributes`: the comparable part; desired and live must use the same keys and value formats.
    - `meta`: shown but never compared (serial numbers, vendor states, expiry of a pending invitation); its
      keys are declared, with who writes and reads them, in `Meta`.
    - `id`: the vendor's id where known.
    - `managed`: live only; whether this object belongs to the policy (known through state or policy),
      which decides between revoking/deleting it and only listing it.
    - `depends_on`: addresses that must exist before this one is created.
    - `source`: `file:line` of the policy entry that declared it.
    - `schema`: the attribute schema of its kind on its vendor (`Capabilities.schema`): the one place that
      says whether a changed attribute is updated, forces replacement or cannot be changed in place.
    - `replace_on_change`: read it as "every change replaces" (the schema is immutable). As constructor
      arguments, `replace_on_change=True` and a `create_only` tuple in `meta` are shorthands folded into
      `schema` (an immutable schema; those attributes marked `FIXED`).
    """

    system: str
    kind: str
    name: str
    attributes: Mapping[str, Any] = field(default_factory=dict)
    id: str | None = None
    status: Status = Status.PRESENT
    meta: Meta = field(default_factory=lambda: Meta())
    managed: bool = True
    depends_on: tuple[str, ...] = ()
    source: str | None = None
    replace_on_change: bool = False
    schema: KindSchema = field(default=NO_SCHEMA, compare=False, repr=False)

    def __post_init__(self) -> None:
        meta = dict(self.meta)
        if self.replace_on_change is not self.schema.immutable or "create_only" in meta:
            self._fold_shorthands(meta)
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))
        object.__setattr__(self, "meta", MappingProxyType(meta))
        # Planning, ordering and rendering ask for the address many times per resource: built once (the fields
        # are frozen; `dataclasses.replace` makes a new resource, which builds its own).
        self.__dict__["_address"] = address_of(self.system, self.kind, self.name)

    def _fold_shorthands(self, meta: dict[str, Any]) -> None:
        """`replace_on_change=True` → an immutable schema; `meta["create_only"]` → those attributes `FIXED`."""
        schema = self.schema
        if self.replace_on_change and not schema.immutable:
            schema = KindSchema(schema.attributes, immutable=True)
        if "create_only" in meta:
            schema = schema.fixing(meta.pop("create_only"))
        object.__setattr__(self, "schema", schema)
        object.__setattr__(self, "replace_on_change", schema.immutable)

    @property
    def address(self) -> str:
        address: str = self.__dict__["_address"]
        return address

    @property
    def is_grant(self) -> bool:
        return self.kind in GRANT_KINDS


@dataclass(frozen=True)
class Capabilities:
    """What a vendor can express; checked against the policy before any request is sent."""

    vendor: str
    grant_kind: str                                    # what a permission becomes on this vendor (a built-in
                                                       # `Kind` or one the vendor declares in `kinds`)
    user_accounts: bool = False                        # users are accounts created in the system
    operations: frozenset[str] = frozenset()           # permission operations; empty: none accepted
    gateways: bool = False
    max_associations: int = 0
    temp_keys: bool = False
    creates_devices: bool = False                      # False: a device entry needs `id` (adopt)
    device_fields: frozenset[str] = frozenset({"name"})  # optional device fields besides system/id (shorthand
                                                         # for the device schema, read from it when declared)
    device_id_pattern: str | None = None               # regex an adopted id must match
    mobile_key: bool = False
    needs_phone: bool = False                          # grants go to the user's phone
    needs_email: bool = False                          # grants go to the user's email
    settings: frozenset[str] = frozenset()             # system keys besides vendor/url/credentials/unmanaged
    required_settings: frozenset[str] = frozenset()    # of those, the ones a system must give
    credentials: frozenset[str] = frozenset()          # credential names the vendor needs
    # Alternative complete sets of credentials (e.g. email+password, or an operator token); when given,
    # any name from them is accepted and one set must be complete. Empty: `credentials` is the one set.
    credential_sets: tuple[frozenset[str], ...] = ()
    several_windows: bool = False                      # several grants per person and device (split shifts)
    production_url: str = ""                           # the vendor's production base URL (default `url`)
    setting_durations: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # setting → seconds (min, max)
    # kind → its attribute schema: what a policy field becomes on this vendor, its default, whether a change
    # is made in place, and how it moves access. The grant kind's schema is what validation, expansion, the
    # planner and export read for a permission's fields (`grant_schema_of(...)` builds the usual ones from a
    # few words); undeclared, it is `grant_schema_of()`: a start and an optional end.
    attributes: Mapping[str, KindSchema] = field(default_factory=dict)
    # Kinds this vendor declares besides the built-in ones (its own grant or object kind): registered when
    # the capabilities are built, so the planner, guard and access review know them by name.
    kinds: tuple[KindDef, ...] = ()

    def __post_init__(self) -> None:
        for kind in self.kinds:
            register_kind(kind)
        schemas = dict(self.attributes)
        if self.user_accounts and Kind.USER not in schemas:
            # An account's fields are the user schema's (`UserField`); undeclared, it is a role.
            schemas[Kind.USER] = KindSchema({"role": Attribute(str, default=DEFAULT_ROLE, access=ROLE_ORDER,
                                                               privilege=frozenset({"ADMIN"}))})
        if Kind.DEVICE in schemas:
            object.__setattr__(self, "device_fields", frozenset(schemas[Kind.DEVICE].attributes))
        else:
            order = [*(f for f in DEVICE_FIELD_TYPES if f in self.device_fields),
                     *sorted(self.device_fields - DEVICE_FIELD_TYPES.keys())]
            schemas[Kind.DEVICE] = KindSchema({f: Attribute(DEVICE_FIELD_TYPES.get(f, str)) for f in order})
        if self.grant_kind != Kind.TEMP_KEY and self.grant_kind not in schemas:
            schemas[self.grant_kind] = grant_schema_of()
        object.__setattr__(self, "attributes", MappingProxyType(schemas))

    def schema(self, kind: str) -> KindSchema:
        """The attribute schema of `kind` on this vendor (empty when it declares none)."""
        return self.attributes.get(kind, NO_SCHEMA)

    @property
    def grant_schema(self) -> KindSchema:
        return self.schema(self.grant_kind)

    # What the grant schema says, in the words the checks and the editor schema use (read-only: the schema is
    # the one source).
    @property
    def requires_end(self) -> bool:
        """Every grant needs an end."""
        end = self.grant_schema.get("end")
        return end is not None and end.required

    @property
    def open_ended(self) -> bool:
        """A grant may omit `end`."""
        end = self.grant_schema.get("end")
        return end is None or end.default is None

    @property
    def key_validity(self) -> bool:
        """Operating key validity P1D..P31D per grant."""
        return "key_validity" in self.grant_schema

    @property
    def schedules(self) -> bool:
        """Weekly schedules."""
        return "schedule" in self.grant_schema

    @property
    def share_roles(self) -> frozenset[str]:
        """The roles a grant may have (permission `role`); empty: not accepted."""
        role = self.grant_schema.get("role")
        return role.choices if role is not None else frozenset()

    @property
    def grant_notify(self) -> bool:
        """A permission may say `notify:` for its grants."""
        return "notify" in self.grant_schema

    @property
    def immutable_grants(self) -> bool:
        """A changed grant is revoke + create."""
        return self.grant_schema.immutable


def grant_schema_of(*, requires_end: bool = False, open_ended: bool = True, key_validity: bool = False,
                    share_roles: frozenset[str] = frozenset(), schedules: bool = False, grant_notify: bool = False,
                    immutable_grants: bool = False) -> KindSchema:
    """The usual grant schema from a few words: a start and an end (`requires_end`: every grant needs one;
    `open_ended=False`: no default), and what else the vendor has: a key validity (P8D by default), roles
    (USER by default), weekly schedules, a per-grant `notify` (sent, never compared); `immutable_grants`: a
    change is a revoke and a create."""
    attributes = {"start": Attribute(str),
                  "end": Attribute(str, default=None if open_ended else NO_DEFAULT, required=requires_end)}
    if key_validity:
        attributes["key_validity"] = Attribute(str, default=DEFAULT_KEY_VALIDITY)
    if share_roles:
        attributes["role"] = Attribute(str, default=DEFAULT_ROLE, choices=share_roles)
    if schedules:
        attributes["schedule"] = Attribute(list, default=None)
    if grant_notify:
        attributes["notify"] = Attribute(bool, compared=False)
    return KindSchema(attributes, immutable=immutable_grants)


# The defaults `grant_schema_of` gives (explicit schemas state their own).
DEFAULT_KEY_VALIDITY = "P8D"
DEFAULT_ROLE = "USER"
# The types of the device fields `device_fields` may name, in the order a device's attributes are built.
DEVICE_FIELD_TYPES: dict[str, type] = {"name": str, "favourite": bool, "colour": str, "unlock_duration": int}


def digest(value: Any) -> str:
    """A short stable digest of JSON-able data (attributes, a resource's live form): `sha256:<hex>`."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def format_time(moment: datetime) -> str:
    """The one timestamp format of attributes, state and plans: UTC, whole seconds, `Z`."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """Parse an ISO 8601 timestamp with a zone (`Z` or an offset) as vendors send it."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp without a timezone: {text!r}")
    return moment.astimezone(UTC)


_DURATION = re.compile(r"^P(?:(\d+)D)?(?:T(?=\d)(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$")


def duration_seconds(text: str) -> int | None:
    """Seconds of an ISO 8601 duration of days and time (`P7D`, `PT24H`, `P1DT12H`); None when it is not
    one (months and years have no fixed length, so they are not accepted)."""
    match = _DURATION.match(text)
    if not match or text in ("P", "PT") or not any(match.groups()):
        return None
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def normalise_time(text: str | None) -> str | None:
    return None if text is None else format_time(parse_time(text))
