"""The plan: a sorted, serialisable, checksummed value.

The planner builds it, renderers format `to_dict()`, and the applier executes its changes. The checksum
covers what apply would do (the changes), so a saved plan can be compared with a fresh one to refuse a
stale plan.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from functools import cached_property
from typing import Any

from reconciler.resources import (
    ACCESS_END,
    ACCESS_LIMIT,
    ACCESS_MEMBERS,
    ACCESS_SCHEDULE,
    ACCESS_START,
    GRANT_KINDS,
    NO_SCHEMA,
    Attribute,
    Kind,
    KindSchema,
    Resource,
    access_fields,
    duration_seconds,
    format_time,
    kind_def,
    parse_time,
)

FORMAT_VERSION = 1


class Action(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    REPLACE = "replace"


@dataclass(frozen=True)
class Rename:
    """`previously:` on a user, device or gateway: `old` is now `new` on `system`."""

    system: str
    kind: str          # user, device or gateway
    old: str
    new: str

    @property
    def before(self) -> str:
        return f"{self.system}/{self.kind}/{self.old}"

    @property
    def after(self) -> str:
        return f"{self.system}/{self.kind}/{self.new}"


def _bare(part: str) -> str:
    """A name part without its window or vendor-id suffix (`roof@2026-…` → `roof`)."""
    return part.split("#", 1)[0].split("@", 1)[0]


def person_door(kind: str) -> bool:
    """A grant named `user/device[/…]` (a declared grant kind owned by a user and a device)."""
    declared = kind_def(kind)
    return declared.grant and declared.owners == (Kind.USER, Kind.DEVICE)


def owners(address: str) -> list[str]:
    """The users, devices and gateways an address belongs to: itself for those, the person and the door of
    a grant, the person of an invitation, the gateway and the door of an association."""
    system, kind, name = ([*address.split("/", 2), "", ""])[:3]
    parts = name.split("/")
    if kind in ("user", "device", "gateway"):
        return [address]
    if kind == "invitation":
        return [f"{system}/user/{name}"]
    if person_door(kind) and len(parts) >= 2:
        return [f"{system}/user/{parts[0]}", f"{system}/device/{_bare(parts[1])}"]
    if kind == "association" and len(parts) == 2:
        return [f"{system}/gateway/{parts[0]}", f"{system}/device/{parts[1]}"]
    return []


def renamed_address(address: str, renames: list[Rename]) -> str | None:
    """Where `address` lives after `renames` (every part naming a renamed user, device or gateway is
    changed), or None when none of them touches it."""
    system, kind, name = ([*address.split("/", 2), "", ""])[:3]
    parts = name.split("/")
    touched = False
    for r in renames:
        if r.system != system:
            continue
        if kind == r.kind or (kind == "invitation" and r.kind == "user"):
            if name == r.old:
                parts, touched = [r.new], True
            continue
        slot = {("user", True): 0, ("device", True): 1, ("gateway", False): 0, ("device", False): 1}.get(
            (r.kind, person_door(kind)))
        if slot is None or not (kind == "association" or person_door(kind)):
            continue
        if kind == "association" and r.kind == "user":
            continue
        if kind != "association" and r.kind == "gateway":
            continue
        if len(parts) > slot and _bare(parts[slot]) == r.old:
            parts[slot] = r.new + parts[slot][len(_bare(parts[slot])):]
            touched = True
    return f"{system}/{kind}/{'/'.join(parts)}" if touched else None


def matches(address: str, pattern: str) -> bool:
    """An `ignore:` pattern: `*` is any text within one part of an address (between `/`), `**` any text."""
    return _pattern(pattern).fullmatch(address) is not None


_PATTERNS: dict[str, re.Pattern[str]] = {}


def _pattern(pattern: str) -> re.Pattern[str]:
    compiled = _PATTERNS.get(pattern)
    if compiled is None:
        text = "".join(".*" if part == "**" else "[^/]*" if part == "*" else re.escape(part)
                       for part in re.split(r"(\*\*|\*)", pattern))
        compiled = _PATTERNS[pattern] = re.compile(text)
    return compiled


def ignored_by(address: str, patterns: tuple[str, ...]) -> str | None:
    """The pattern that ignores `address`: one matching it, or one of its owners (a user's grants go with
    the user)."""
    for candidate in (address, *owners(address)):
        for pattern in patterns:
            if matches(candidate, pattern):
                return pattern
    return None


class Effect(StrEnum):
    GRANT = "grant"
    REVOKE = "revoke"
    NONE = "none"




def phase_of(action: Action, kind: str) -> int:
    """0: revoke grants; 1: remove associations; 2: remove users, devices, gateways;
    3: create/update users, devices, gateways; 4: everything that depends on them."""
    declared = kind_def(kind)
    if action is Action.DELETE:
        if declared.grant:
            return 0
        return 1 if declared.owners and not declared.top else 2
    return 3 if declared.top else 4


def effect_of(action: Action, kind: str) -> Effect:
    """The effect judged by the verb alone: for changes made without a plan-time judgement (tests, tools)."""
    declared = kind_def(kind)
    if declared.grant or declared.holder:
        if action is Action.CREATE or action is Action.REPLACE:
            return Effect.GRANT if declared.grant else Effect.NONE
        if action is Action.DELETE:
            return Effect.REVOKE
    return Effect.NONE


# -- effect by access ------------------------------------------------------------------------------------
# What a change does to someone's ability to open a door or administer a system, judged at plan time `now`:
# it grants when the after side allows something the before side does not, and revokes when the before side
# allows something the after side does not; both at once (a window moved later with a later end) is possible.

def _window(attrs: Mapping[str, Any], fields: AccessFields, now: str, *, desired: bool) -> tuple[str, str] | None:
    """The part of a window from now on, as (start, end) with "~" for no end; None when nothing is left."""
    start = attrs.get(fields.start) or "" if fields.start else ""
    if desired and not start:
        start = now     # no start in the policy: from now
    end = (attrs.get(fields.end) or "~") if fields.end else "~"
    start = max(start, now)
    return (start, end) if start < end else None


def _within(inner: tuple[str, str], outer: tuple[str, str] | None) -> bool:
    return outer is not None and outer[0] <= inner[0] and inner[1] <= outer[1]


def _schedule_within(inner: Any, outer: Any) -> bool:
    """Weekly spans: `None` is every hour of every day."""
    if not outer:
        return True
    if not inner:
        return False
    return all(any(o["day"] == i["day"] and o["from"] <= i["from"] and i["to"] <= o["to"] for o in outer)
               for i in inner)


def _limit_within(inner: Any, outer: Any) -> bool:
    """A number of uses: `None` is no limit."""
    return outer is None or (inner is not None and inner <= outer)


def _members_within(inner: Any, outer: Any) -> bool:
    return set(inner or ()) <= set(outer or ())


_WITHIN: dict[str, Callable[[Any, Any], bool]] = {
    ACCESS_SCHEDULE: _schedule_within, ACCESS_LIMIT: _limit_within, ACCESS_MEMBERS: _members_within}


@dataclass(frozen=True)
class AccessFields:
    """What a kind's declarations say about access, sorted for `classify`: the window's fields, the fields
    compared by a named comparator, the ordered fields, the privilege fields."""

    start: str | None
    end: str | None
    compared: tuple[tuple[str, Callable[[Any, Any], bool]], ...]
    ordered: tuple[tuple[str, Attribute], ...]
    privilege: tuple[tuple[str, frozenset[Any]], ...]
    widest: tuple[str, Any] | None    # an ordered field whose widest value makes the member list moot (public)


_FIELDS: dict[tuple[str, int], tuple[KindSchema, AccessFields]] = {}


def access_of(kind: str, schema: KindSchema = NO_SCHEMA) -> AccessFields:
    """The access meaning of `kind`'s fields on a vendor (`Attribute.access`), sorted once per schema."""
    cached = _FIELDS.get((kind, id(schema)))
    if cached is not None and cached[0] is schema:
        return cached[1]
    fields = access_fields(kind, schema)
    start = next((n for n, a in fields if a.access == ACCESS_START), None)
    end = next((n for n, a in fields if a.access == ACCESS_END), None)
    named = [(n, a.access.split(":", 1)) for n, a in fields if isinstance(a.access, str)]
    compared = tuple((n, _WITHIN[how[0]]) for n, how in named if how[0] in _WITHIN)
    ordered = tuple((n, a) for n, a in fields if isinstance(a.access, tuple))
    privilege = tuple((n, a.privilege) for n, a in fields if a.privilege)
    audience = next((how[1] for n, how in named if how[0] == ACCESS_MEMBERS and len(how) == 2), None)
    widest = next(((n, a.access[-1]) for n, a in ordered if n == audience and isinstance(a.access, tuple)), None)
    result = AccessFields(start, end, compared, ordered, privilege, widest)
    _FIELDS[(kind, id(schema))] = (schema, result)
    return result


def _is_widest(attrs: Mapping[str, Any], fields: AccessFields) -> bool:
    return fields.widest is not None and attrs.get(fields.widest[0]) == fields.widest[1]


def _widens(after: Mapping[str, Any], before: Mapping[str, Any], fields: AccessFields) -> bool:
    """Whether `after` allows something that `before` does not, besides the window."""
    for name, attribute in fields.ordered:
        if attribute.rank(after.get(name)) > attribute.rank(before.get(name)):
            return True
    for name, within in fields.compared:
        if within is _members_within and _is_widest(before, fields):
            continue    # a key for everyone already: naming people widens nothing
        if not within(after.get(name), before.get(name)):
            return True
    return False


def classify(action: Action, kind: str, desired: Mapping[str, Any] | None, live: Mapping[str, Any] | None,
             now: str, schema: KindSchema = NO_SCHEMA) -> frozenset[Effect]:
    """The access effects of one change at plan time: {grant}, {revoke}, both, or none; read from the
    kind's declarations (`Attribute.access`, `KindDef.grant`/`holder`)."""
    declared = kind_def(kind)
    fields = access_of(kind, schema)
    effects: set[Effect] = set()
    if not declared.grant:
        if declared.holder and action is Action.DELETE:
            return frozenset({Effect.REVOKE})    # offboarding: every access of the person goes
        # An object grants nothing by itself, except what its ordered fields give above their least value
        # (an ADMIN's power to grant itself any door).
        for name, attribute in fields.ordered:
            rank_before = attribute.rank((live or {}).get(name)) if action is not Action.CREATE else -1
            rank_after = attribute.rank((desired or {}).get(name)) if action is not Action.DELETE else -1
            if rank_after > max(rank_before, 0):
                effects.add(Effect.GRANT)
            if rank_before > max(rank_after, 0):
                effects.add(Effect.REVOKE)
        return frozenset(effects)
    before = _window(live, fields, now, desired=False) if live is not None and action is not Action.CREATE else None
    after = _window(desired, fields, now, desired=True) if desired is not None and action is not Action.DELETE \
        else None
    if after is not None and (not _within(after, before) or live is None or _widens(desired or {}, live, fields)):
        effects.add(Effect.GRANT)
    if before is not None and (not _within(before, after) or desired is None or _widens(live or {}, desired, fields)):
        effects.add(Effect.REVOKE)
    return frozenset(effects)


def is_privilege(kind: str, desired: Mapping[str, Any] | None, live: Mapping[str, Any] | None,
                 schema: KindSchema = NO_SCHEMA) -> bool:
    """A privileged value (`Attribute.privilege`: an ADMIN account or share) appears, goes or changes: the
    power to grant, listed one by one in plans."""
    for name, privileged in access_of(kind, schema).privilege:
        values = {(side or {}).get(name) for side in (desired, live) if side is not None}
        if values & privileged and (len(values) > 1 or desired is None or live is None):
            return True
    return False


@dataclass(frozen=True)
class Change:
    action: Action
    desired: Resource | None
    live: Resource | None
    changed: tuple[str, ...] = ()
    origin: str | None = None     # "policy": the YAML changed; "drift": the live system changed outside git
    effects: frozenset[Effect] | None = None    # judged by access at plan time; None: by the verb alone
    looks_like: str | None = None    # "looks like a rename of bob (same phone)": a suspected rename

    @property
    def resource(self) -> Resource:
        resource = self.desired or self.live
        assert resource is not None
        return resource

    @property
    def address(self) -> str:
        return self.resource.address

    @property
    def system(self) -> str:
        return self.resource.system

    @property
    def kind(self) -> str:
        return self.resource.kind

    @property
    def effect(self) -> Effect:
        """One word for the change: revoke when it takes any access away (the mass-revoke guard counts it),
        else grant when it gives any, else none. `access` has both when a change does both."""
        if self.effects is None:
            return effect_of(self.action, self.kind)
        if Effect.REVOKE in self.effects:
            return Effect.REVOKE
        return Effect.GRANT if Effect.GRANT in self.effects else Effect.NONE

    @property
    def grants(self) -> bool:
        return Effect.GRANT in self.effects if self.effects is not None else self.effect is Effect.GRANT

    @property
    def revokes(self) -> bool:
        return Effect.REVOKE in self.effects if self.effects is not None else self.effect is Effect.REVOKE

    @property
    def privilege(self) -> bool:
        return is_privilege(self.kind, self.desired.attributes if self.desired else None,
                            self.live.attributes if self.live and self.action is not Action.CREATE else None,
                            self.resource.schema)

    @property
    def phase(self) -> int:
        if self.kind in GRANT_KINDS and self.action in (Action.UPDATE, Action.REPLACE) and self.revokes \
                and not self.grants:
            return 0    # a grant narrowed (a window moved later, an end earlier) is a revocation: first
        return phase_of(self.action, self.kind)

    @property
    def source(self) -> str | None:
        return self.desired.source if self.desired else None

    def to_dict(self) -> dict[str, Any]:
        before = _side(self.live) if self.action is not Action.CREATE else None
        after = _side(self.desired) if self.action is not Action.DELETE else None
        data: dict[str, Any] = {
            "address": self.address, "system": self.system, "kind": self.kind,
            "action": str(self.action), "effect": str(self.effect),
            "before": before, "after": after, "source": self.source,
        }
        meta = self.desired.meta if self.desired else {}
        # Every key on every change, null when it does not apply (schema/plan.schema.json); the checksum
        # leaves the nulls out (`checksum_form`), so it is the same as when they were omitted.
        data["access"] = ["grant", "revoke"] if self.grants and self.revokes else None
        data["privilege"] = True if self.privilege else None
        data["changed"] = list(self.changed) if self.changed else None
        data["origin"] = self.origin or None
        data["reason"] = meta.get("reason") or None
        data["via"] = list(meta["via"]) if meta.get("via") else None
        data["looks_like"] = self.looks_like or None
        return data


OPTIONAL_CHANGE_KEYS = ("access", "privilege", "changed", "origin", "reason", "via", "looks_like")
# Keys derived from the plan's `now` and the change (not what apply does): never part of the checksum, so a
# saved plan checked against a fresh one made later still matches.
DERIVED_CHANGE_KEYS = ("enforcement",)


def _unknown(what: str, kind: str) -> str:
    return f"unknown: the vendor's documents do not say when a {what} {kind} is in force on the lock"


def enforcement_of(change: Change, now: str, schema: KindSchema | None = None) -> dict[str, Any]:
    """When `change` is in force on the lock, as its vendor's documents say (`Enforcement`): `from` for a
    granting change, `by` (the latest moment the lock may still admit) for a revoking one, both null when the
    documents say nothing; the reason in `basis`, and in `shorten` what the vendor offers to cut a
    revocation's exposure. `now` is when the change is made (the plan's now, or when apply sent it)."""
    if schema is None or schema.enforcement is None:
        schema = next((r.schema for r in (change.desired, change.live) if r is not None
                       and r.schema.enforcement is not None), schema)
    declared = schema.enforcement if schema is not None else None
    start: str | None = None
    end: str | None = None
    basis: list[str] = []
    shorten: str | None = None
    if change.revokes:
        if declared is not None and declared.revoke_offline:
            field_ = declared.revoke_offline
            attribute = schema.get(field_) if schema is not None else None
            validity = ((change.live.attributes.get(field_) if change.live else None)
                        or (attribute.default if attribute else None))
            seconds = duration_seconds(str(validity)) if validity else None
            if seconds is not None:
                end = format_time(parse_time(now) + timedelta(seconds=seconds))
                basis.append(f"operating keys last {validity}: {declared.revoke}")
                shorten = declared.shorten or None
            else:
                basis.append(_unknown("revoked", change.kind))
        elif declared is not None and declared.revoke_at_once:
            end = now
            basis.append(declared.revoke)
        else:
            basis.append(_unknown("revoked", change.kind))
    if change.grants:
        if declared is not None and declared.grant:
            if declared.grant_at_start:
                wanted = change.desired.attributes.get("start") if change.desired else None
                start = max(str(wanted), now) if wanted else now
            basis.append(declared.grant)
        else:
            basis.append(_unknown("granted", change.kind))
    if not basis:
        basis.append("changes no access")
    data: dict[str, Any] = {"from": start, "by": end, "basis": "; ".join(basis)}
    if shorten:
        data["shorten"] = shorten
    return data


def in_force(change: Change, enforcement: Mapping[str, Any] | None, at: str) -> bool:
    """Whether a change the vendor accepted is in force on the lock at `at`, as far as its documents tell:
    a revocation once its `by` has passed (unknown: not known to be), a grant once its `from` is known (a
    later start is the grant's own window, not the vendor's delay)."""
    if enforcement is None:
        return True
    if change.revokes and not (enforcement.get("by") and enforcement["by"] <= at):
        return False
    return not (change.grants and not enforcement.get("from"))


def exposure_line(change: Change, enforcement: Mapping[str, Any], at: str) -> str | None:
    """"bob may open server-room offline until …: operating keys last P8D": a revocation whose door may
    still open after `at`; None for anything else."""
    by = enforcement.get("by")
    if not (change.revokes and by and by > at):
        return None
    parts = change.address.split("/", 2)[2].split("/")
    door = _bare(parts[1]) if len(parts) > 1 else change.address
    return f"{parts[0]} may open {door} offline until {by}: {enforcement['basis']}"


def checksum_form(change: Mapping[str, Any]) -> Mapping[str, Any]:
    """A change as the checksum hashes it: the optional keys only where they are not null."""
    drop = [key for key in OPTIONAL_CHANGE_KEYS if key in change and change[key] is None]
    drop += [key for key in DERIVED_CHANGE_KEYS if key in change]
    if not drop:
        return change
    form = dict(change)       # a C-level copy, then a few deletions: this runs once per change of every plan
    for key in drop:
        del form[key]
    return form


def changes_checksum(changes: Any) -> str:
    """The SHA-256 of json.dumps([checksum_form(c) for c in changes], sort_keys=True, separators=(",", ":"),
    default=str), fed one change at a time (the same bytes: a compact list is "[" + items joined by "," + "]")
    so that the whole payload is never held at once. A saved plan's changes give its checksum back unless
    they were edited."""
    encode = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode
    digest = hashlib.sha256(b"[")
    for n, change in enumerate(changes):
        if n:
            digest.update(b",")
        digest.update(encode(checksum_form(change)).encode())
    digest.update(b"]")
    return "sha256:" + digest.hexdigest()


def _side(resource: Resource | None) -> dict[str, Any] | None:
    if resource is None:
        return None
    data = dict(resource.attributes)
    if resource.id is not None:
        data["id"] = resource.id
    return data


@dataclass(frozen=True)
class RevokeThreshold:
    """A system's mass-revoke guard (octoDNS-style): apply refuses a plan revoking more than `percent` of
    the system's managed grants once it has at least `minimum` of them, unless the policy acknowledges
    exactly that plan's revocations (`acknowledge`, the token the plan prints) or `--allow-mass-revoke`."""

    percent: float = 25.0
    minimum: int = 10
    acknowledge: str | None = None
    source: str | None = None          # `file:line` of the acknowledgement


@dataclass(frozen=True)
class Guard:
    """The mass-revoke guard of one system, as judged for a plan: shown in the plan, enforced by apply."""

    system: str
    revoking: int
    managed: int
    threshold: RevokeThreshold = RevokeThreshold()
    token: str = ""                   # what `acknowledge:` must say to let exactly these revocations through

    @property
    def trips(self) -> bool:
        return self.managed >= self.threshold.minimum and self.revoking > self.managed * self.threshold.percent / 100

    @property
    def acknowledged(self) -> bool:
        return bool(self.threshold.acknowledge) and self.threshold.acknowledge == self.token

    @property
    def refuses(self) -> bool:
        return self.trips and not self.acknowledged

    def message(self) -> str:
        share = f"{self.revoking / self.managed:.0%}" if self.managed else "all"
        limit = f"more than {self.threshold.percent:g} % of at least {self.threshold.minimum}"
        head = f"{self.system}: the plan revokes {self.revoking} of {self.managed} managed grants ({share}, {limit})"
        if not self.trips:
            # The message agrees with `trips`/`refuses`: under the limit, the guard lets apply through.
            return (f"{self.system}: the plan revokes {self.revoking} of {self.managed} managed grants ({share}); "
                    f"within the mass-revoke guard ({limit} stops): apply proceeds")
        if self.acknowledged:
            return f"{head}; acknowledged in the policy ({self.threshold.source}): apply proceeds"
        how = (f"after review, acknowledge it in the policy with `mass_revoke: {{acknowledge: {self.token}}}` "
               f"under systems.{self.system}, or pass --allow-mass-revoke")
        return _refused(head, how, self.threshold.acknowledge, self.threshold.source, "other revocations")

    def to_dict(self) -> dict[str, Any]:
        return {"system": self.system, "revoking": self.revoking, "managed": self.managed,
                "percent": self.threshold.percent, "minimum": self.threshold.minimum, "trips": self.trips,
                "acknowledged": self.acknowledged, "refuses": self.refuses, "token": self.token,
                "message": self.message()}


def _refused(head: str, how: str, acknowledgement: str | None, source: str | None, other: str) -> str:
    """A guard's refusal: what it refuses, and how to let it through (an acknowledgement for `other` changes
    is said to be one)."""
    if acknowledgement:
        how = f"the acknowledgement {acknowledgement} ({source}) is for {other}; {how}"
    return f"{head}: apply will refuse it; {how}"


def revocation_token(changes: list[Change]) -> str:
    """Names exactly these revocations (address, action, desired side): an acknowledgement in the policy that
    quotes it allows these and no others (drift or a later edit gives another token)."""
    items = sorted([c.address, str(c.action), _side(c.desired) if c.action is not Action.DELETE else None]
                   for c in changes)
    text = json.dumps(items, sort_keys=True, separators=(",", ":"), default=str)
    return "revoke-" + hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Suspect:
    """A delete and a create on one system that look like one user, device or gateway renamed without
    `previously:` (same email, phone, id or name): apply refuses them unless the policy says which it is."""

    system: str
    kind: str
    old: str          # address of what the plan deletes (or leaves)
    new: str          # address of what the plan creates
    why: str          # "same phone"

    @property
    def old_name(self) -> str:
        return self.old.split("/", 2)[2]

    @property
    def new_name(self) -> str:
        return self.new.split("/", 2)[2]


@dataclass(frozen=True)
class Acknowledgement:
    """`offboarding: {acknowledge: offboard-…}` under a system: the suspected renames of exactly that token
    are really one person (device, gateway) leaving and another arriving."""

    token: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class RenameGuard:
    """The suspected renames of one system, as judged for a plan: shown in the plan, enforced by apply."""

    system: str
    suspects: tuple[Suspect, ...]
    acknowledgement: Acknowledgement = Acknowledgement()

    @property
    def token(self) -> str:
        text = json.dumps(sorted([s.old, s.new] for s in self.suspects), separators=(",", ":"))
        return "offboard-" + hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def acknowledged(self) -> bool:
        return bool(self.acknowledgement.token) and self.acknowledgement.token == self.token

    @property
    def refuses(self) -> bool:
        return not self.acknowledged

    def message(self) -> str:
        pairs = "; ".join(f"{s.new} looks like a rename of {s.old_name} ({s.why})" for s in self.suspects)
        if self.acknowledged:
            return (f"{self.system}: {pairs}; acknowledged as offboarding in the policy "
                    f"({self.acknowledgement.source}): apply proceeds")
        fix = ", ".join(f"`previously: [{s.old_name}]` on {s.kind}s.{s.new_name}" for s in self.suspects)
        how = (f"if it is a rename, add {fix}; if it really is someone leaving and someone arriving, acknowledge "
               f"it with `offboarding: {{acknowledge: {self.token}}}` under systems.{self.system}")
        return _refused(f"{self.system}: {pairs}", how, self.acknowledgement.token, self.acknowledgement.source,
                        "other pairs")

    def to_dict(self) -> dict[str, Any]:
        return {"system": self.system, "token": self.token, "acknowledged": self.acknowledged,
                "refuses": self.refuses, "message": self.message(),
                "pairs": [{"from": s.old, "to": s.new, "kind": s.kind, "why": s.why} for s in self.suspects]}


@dataclass(frozen=True)
class Note:
    """A line of a plan that is not a change: pending, unmanaged, or a warning."""

    address: str
    message: str
    system: str = ""
    kind: str = ""
    details: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"address": self.address, "message": self.message}
        if self.system:
            data["system"] = self.system
        if self.kind:
            data["kind"] = self.kind
        data.update(dict(self.details))
        return data


@dataclass(frozen=True)
class Plan:
    now: str
    changes: tuple[Change, ...] = ()
    pending: tuple[Note, ...] = ()
    unmanaged: tuple[Note, ...] = ()
    warnings: tuple[Note, ...] = ()
    managed_grants: int = 0          # live grants on managed devices: the base of the mass-revoke rail
    guards: tuple[Guard, ...] = ()   # per system with revocations: the mass-revoke guard as judged for this plan
    policy_digest: str = ""          # of the desired resources: a saved plan is refused when it changes
    live_digests: Mapping[str, str] = field(default_factory=dict)   # of the live side of each change
    renamed: tuple[Note, ...] = ()   # `previously:`: state records moved, nothing sent
    ignored: tuple[Note, ...] = ()   # live objects `ignore:` covers: never changed, never revoked
    renames: tuple[RenameGuard, ...] = ()    # per system with suspected renames
    # (system, kind) → its vendor's schema: when a change is in force (`Enforcement`) for a change whose
    # resources carry no schema (a live object read back)
    schemas: Mapping[tuple[str, str], KindSchema] = field(default_factory=dict, compare=False, repr=False)
    targets: tuple[str, ...] = ()    # `--target`: a partial plan, of these systems and addresses only
    # system → its IANA time zone (`timezone:`), where not UTC: weekly schedules are local times there, and
    # the plan's window text names it
    zones: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "changes", tuple(sorted(self.changes, key=lambda c: (c.address, c.action))))
        for name in ("pending", "unmanaged", "warnings", "renamed", "ignored"):
            object.__setattr__(self, name, tuple(sorted(getattr(self, name), key=lambda n: (n.address, n.message))))

    @property
    def has_changes(self) -> bool:
        return bool(self.changes)

    def summary(self) -> dict[str, int]:
        counts = {str(action): 0 for action in Action}
        for change in self.changes:
            counts[str(change.action)] += 1
        return counts

    @property
    def revocations(self) -> int:
        return sum(1 for c in self.changes if c.revokes and c.kind in GRANT_KINDS)

    def effects(self) -> dict[str, int]:
        """Changes that grant and that revoke access (a change doing both counts in both)."""
        return {"grant": sum(1 for c in self.changes if c.grants),
                "revoke": sum(1 for c in self.changes if c.revokes)}

    @property
    def refused_by(self) -> tuple[Guard, ...]:
        return tuple(g for g in self.guards if g.refuses)

    @property
    def refused_renames(self) -> tuple[RenameGuard, ...]:
        return tuple(g for g in self.renames if g.refuses)

    def checksum(self) -> str:
        return self._checksum

    @cached_property
    def _change_dicts(self) -> list[dict[str, Any]]:
        # A plan is immutable, and thousands of changes are not free to serialise: each is built once, for the
        # checksum, the JSON and the templates alike. The checksum is taken before the derived keys are
        # added, so that it hashes no copy of each change.
        dicts = [c.to_dict() for c in self.changes]
        self.__dict__["_checksum"] = changes_checksum(dicts)
        for change, data in zip(self.changes, dicts, strict=True):
            data["enforcement"] = enforcement_of(change, self.now, self.schemas.get((change.system, change.kind)))
        return dicts

    @cached_property
    def _checksum(self) -> str:
        self._change_dicts  # noqa: B018 (sets it)
        return str(self.__dict__["_checksum"])

    def exposures(self) -> list[dict[str, Any]]:
        """Each revoking change that may still open a door after it is made: its address, person, door and
        until when (`enforcement.by` later than now), longest first."""
        found = []
        for data in self._change_dicts:
            by = data["enforcement"]["by"]
            if by and by > self.now:
                parts = data["address"].split("/", 2)[2].split("/")
                found.append({"address": data["address"], "user": parts[0],
                              "door": _bare(parts[1]) if len(parts) > 1 else "", "until": by,
                              "basis": data["enforcement"]["basis"],
                              "shorten": data["enforcement"].get("shorten")})
        return sorted(found, key=lambda e: (e["until"], e["address"]), reverse=True)

    @cached_property
    def _dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "now": self.now,
            "checksum": self.checksum(),
            "digests": {"policy": self.policy_digest, "live": dict(sorted(self.live_digests.items()))},
            "summary": self.summary(),
            "effects": self.effects(),
            "changes": self._change_dicts,
            "pending": [n.to_dict() for n in self.pending],
            "unmanaged": [n.to_dict() for n in self.unmanaged],
            "warnings": [n.to_dict() for n in self.warnings],
            "guard": [g.to_dict() for g in self.guards],
        } | self._additions()

    def _additions(self) -> dict[str, Any]:
        """Sections added after format 1 was published: present only when they have something, so that a
        plan without them reads exactly as before."""
        data: dict[str, Any] = {}
        if self.renamed:
            data["renamed"] = [n.to_dict() for n in self.renamed]
        if self.renames:
            data["rename_guard"] = [g.to_dict() for g in self.renames]
        if self.ignored:
            data["ignored"] = [n.to_dict() for n in self.ignored]
        exposures = self.exposures()
        if exposures:
            data["exposure"] = exposures
        if self.targets:
            data["targets"] = list(self.targets)
        if self.zones:
            data["zones"] = dict(sorted(self.zones.items()))
        return data

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-able data, built once per plan: treat it as read-only (a caller that needs to
        change it copies it)."""
        return self._dict
