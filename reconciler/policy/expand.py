"""Turn merged declarations into the desired `Resource`s the planner diffs against live state.

`load_policy` calls `expand` after the checks; `checks.py` also uses the lookups here (a system's capabilities,
a group's members) so that both agree on what a reference means. Expansion is defensive: an entry that failed
validation or a reference that does not resolve is skipped, because its error is already reported and the
remaining resources are still needed to find conflicting grants.

Naming (addresses are `system/kind/name`): users and invitations by user name, devices and gateways by key,
associations `gateway/device`, grants `user/device/OPERATION` (or `user/device` on vendors without
operations), temp keys by key. Grants are one per (user, device, operation) after groups are expanded, and
one per window where a person has several windows on one door (`…/OPEN@<start>`, vendors with
`several_windows` only; windows must not overlap).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any, cast

from reconciler import resources
from reconciler.errors import Diagnostic
from reconciler.plan import Rename
from reconciler.resources import WINDOW_MARK, Capabilities, Kind, Meta, Resource, Status, address_of, digest

from .schema import DAYS, Declarations, Entry, PermissionModel, SpanModel, UserModel, user_fields, utc_text

USER_FIELDS = frozenset(user_fields())

DEFAULT_OPERATIONS = ("OPEN",)
MISSING = object()     # a field whose value cannot be built (a reference to an unknown schedule: reported)


# ------------------------------------------------------------------------------------------------- lookups

def capabilities_of(declarations: Declarations, capabilities: Mapping[str, Capabilities],
                    system: str | None) -> Capabilities | None:
    """The capabilities behind a system name, or None when the system is unknown, invalid or unsupported."""
    entry = declarations.systems.get(system) if system is not None else None
    if entry is None or entry.model is None:
        return None
    return capabilities.get(entry.model.vendor)


def system_of_device(declarations: Declarations, device: str) -> str | None:
    entry = declarations.devices.get(device)
    return entry.model.system if entry is not None and entry.model is not None else None


def members_of(declarations: Declarations, group: str, _seen: frozenset[str] = frozenset()) -> set[str]:
    """Every user a group reaches through nested groups; unknown names and cycles (reported by the checks)
    are ignored here so that expansion always terminates."""
    entry = declarations.groups.get(group)
    if entry is None or entry.model is None or group in _seen:
        return set()
    users: set[str] = set()
    for member in entry.model:
        if member in declarations.users:
            users.add(member)
        elif member in declarations.groups:
            users |= members_of(declarations, member, _seen | {group})
    return users


def users_of(declarations: Declarations, permission: PermissionModel) -> list[str]:
    users = {user for user in permission.users if user in declarations.users}
    for group in permission.groups:
        users |= members_of(declarations, group)
    return sorted(users)


def has_account(declarations: Declarations, user: str, system: str) -> bool:
    """Whether a user exists in a system with user accounts: every such system unless `systems:` narrows it."""
    entry = declarations.users.get(user)
    if entry is None or entry.model is None:
        return False
    return entry.model.systems is None or system in entry.model.systems


def normalised_schedule(spans: list[SpanModel]) -> list[dict[str, str]]:
    """One `{day, from, to}` per weekday span, in weekday order, so that equal schedules compare equal."""
    flat = [{"day": day, "from": span.start, "to": span.end} for span in spans for day in span.days]
    return sorted(flat, key=lambda s: (DAYS.index(s["day"]), s["from"], s["to"]))


# ---------------------------------------------------------------------------------------------- expansion

def expand(declarations: Declarations, capabilities: Mapping[str, Capabilities]
           ) -> tuple[list[Resource], list[Diagnostic], list[Diagnostic]]:
    """Desired resources sorted by address, warnings, and errors (conflicting grants)."""
    warnings: list[Diagnostic] = []
    errors: list[Diagnostic] = []
    resources = [*_users(declarations, capabilities), *_devices(declarations, capabilities)]
    resources += _gateways(declarations, capabilities, warnings)
    resources += _grants(declarations, capabilities, warnings, errors)
    resources += _temp_keys(declarations, capabilities, warnings)
    return sorted(resources, key=lambda r: r.address), sorted(set(warnings)), errors


def _account(model: UserModel, schema: resources.KindSchema) -> dict[str, Any]:
    """A person's account attributes: the user fields the vendor's user schema declares (`UserField`), in
    its order; a field left out takes the schema's default, or is left out when it has none."""
    attributes: dict[str, Any] = {}
    for field, attribute in schema.attributes.items():
        if field not in USER_FIELDS or not attribute.compared:
            continue
        value = getattr(model, field)
        if value is not None:
            attributes[field] = value
        elif attribute.has_default:
            attributes[field] = attribute.default
    return attributes


def _users(declarations: Declarations, capabilities: Mapping[str, Capabilities]) -> list[Resource]:
    resources = []
    for system in declarations.systems:
        caps = capabilities_of(declarations, capabilities, system)
        if caps is None or not caps.user_accounts:
            continue
        for name, entry in declarations.users.items():
            if entry.model is None or not has_account(declarations, name, system):
                continue
            adopted = (entry.model.ids or {}).get(system)
            schema = caps.schema(Kind.USER)
            user = Resource(system, Kind.USER, name, _account(entry.model, schema), id=adopted,
                            source=entry.place.source, schema=schema)
            resources.append(user)
            if entry.model.mobile_key and caps.mobile_key and entry.model.phone:
                resources.append(Resource(system, Kind.INVITATION, name, {"phone": entry.model.phone},
                                          depends_on=(user.address,), source=entry.place.source))
            elif entry.model.mobile_key is False and caps.mobile_key:
                # Said explicitly: the person's operating device (or pending invitation) is removed. Left
                # out, mobile_key leaves whatever the person has alone.
                resources.append(Resource(system, Kind.INVITATION, name, {}, status=Status.ABSENT,
                                          source=entry.place.source))
    return resources


def _devices(declarations: Declarations, capabilities: Mapping[str, Capabilities]) -> list[Resource]:
    resources = []
    for name, entry in declarations.devices.items():
        device = entry.model
        caps = capabilities_of(declarations, capabilities, device.system) if device is not None else None
        if device is None or caps is None:
            continue
        adopted = None if device.id is None else str(device.id)
        attributes: dict[str, Any] = {}
        if device.name is not None:
            attributes["name"] = device.name
        elif adopted is None:
            attributes["name"] = name  # a created device is named after its key; an adopted one keeps its name
        # The other fields the vendor's device schema declares: the policy's value, else its default.
        for field, attribute in caps.schema(Kind.DEVICE).attributes.items():
            value = getattr(device, field, None) if field != "name" else None
            if value is None and attribute.has_default:
                value = attribute.default
            if value is not None:
                attributes[field] = value
        resources.append(Resource(device.system, Kind.DEVICE, name, attributes, id=adopted,
                                  status=Status.ABSENT if device.decommission else Status.PRESENT,
                                  source=entry.place.source, schema=caps.schema(Kind.DEVICE)))
    return resources


def _is_decommissioned(declarations: Declarations, device: str) -> bool:
    entry = declarations.devices.get(device)
    return entry is not None and entry.model is not None and entry.model.decommission


def _gateways(declarations: Declarations, capabilities: Mapping[str, Capabilities],
              warnings: list[Diagnostic]) -> list[Resource]:
    resources = []
    for name, entry in declarations.gateways.items():
        gateway = entry.model
        caps = capabilities_of(declarations, capabilities, gateway.system if gateway else None)
        if gateway is None or caps is None or not caps.gateways:
            continue
        meta: Meta = {"claiming_code": gateway.claiming_code} if gateway.claiming_code else {}
        resource = Resource(gateway.system, Kind.GATEWAY, name, {}, meta=meta, id=gateway.id,
                            status=Status.ABSENT if gateway.decommission else Status.PRESENT,
                            source=entry.place.source)
        resources.append(resource)
        if gateway.decommission:
            if gateway.devices:
                warnings.append(Diagnostic(entry.place.at("devices"), f"gateway '{name}' is decommissioned: "
                                           "its associations are left out"))
            continue
        for device in dict.fromkeys(gateway.devices):
            if system_of_device(declarations, device) != gateway.system:
                continue  # unknown or on another system: reported by the checks
            if _is_decommissioned(declarations, device):
                warnings.append(Diagnostic(entry.place.at("devices", gateway.devices.index(device)),
                                           f"device '{device}' is decommissioned: its association is left out"))
                continue
            device_address = address_of(gateway.system, Kind.DEVICE, device)
            resources.append(Resource(gateway.system, Kind.ASSOCIATION, f"{name}/{device}", {},
                                      depends_on=(resource.address, device_address), source=entry.place.source))
    return resources


def _grants(declarations: Declarations, capabilities: Mapping[str, Capabilities],
            warnings: list[Diagnostic], errors: list[Diagnostic]) -> list[Resource]:
    # slot address (system/kind/user/device[/op]) → its windows: (grant, index of the declaring permission)
    slots: dict[str, list[tuple[Resource, int]]] = {}
    conflicts: dict[tuple[int, int], list[tuple[Resource, Resource]]] = {}
    single: dict[tuple[int, int], list[tuple[Resource, Resource]]] = {}
    several: dict[str, bool] = {}
    for position, entry in enumerate(declarations.permissions):
        permission = entry.model
        if permission is None:
            continue
        users = users_of(declarations, permission)
        for index, device in enumerate(permission.devices):
            system = system_of_device(declarations, device)
            caps = capabilities_of(declarations, capabilities, system)
            if system is None or caps is None:
                continue
            if _is_decommissioned(declarations, device):
                warnings.append(Diagnostic(entry.place.at("devices", index), f"device '{device}' is decommissioned:"
                                           " the grants of this permission on it are left out"))
                continue
            for user in users:
                if caps.user_accounts and not has_account(declarations, user, system):
                    continue  # reported by the checks
                for grant in _grants_for(declarations, entry, permission, caps, system, user, device):
                    windows = slots.setdefault(grant.address, [])
                    several[grant.address] = caps.several_windows
                    same = next((i for i, (g, _) in enumerate(windows) if g.attributes == grant.attributes), None)
                    overlapping = next(((g, p) for g, p in windows if _overlap(g, grant)), None)
                    if same is not None:
                        first, first_position = windows[same]
                        windows[same] = (_merged(first, grant), first_position)
                    elif overlapping is not None:
                        conflicts.setdefault((position, overlapping[1]), []).append((overlapping[0], grant))
                    elif windows and not caps.several_windows:
                        single.setdefault((position, windows[0][1]), []).append((windows[0][0], grant))
                    else:
                        windows.append((grant, position))
    for (later, earlier), pairs in conflicts.items():
        errors.append(_conflict(declarations.permissions[later], declarations.permissions[earlier], pairs,
                                several.get(pairs[0][0].address, False)))
    for (later, earlier), pairs in single.items():
        errors.append(_one_window_only(declarations, declarations.permissions[later],
                                       declarations.permissions[earlier], pairs))
    grants = []
    for windows in slots.values():
        if len(windows) == 1:
            grants.append(windows[0][0])
            continue
        for grant, _ in windows:
            # Each window is its own grant, named by its start: stable when another window is added or moved.
            grants.append(replace(grant, name=f"{grant.name}{WINDOW_MARK}{grant.attributes.get('start') or 'now'}"))
    return grants


def _overlap(first: Resource, second: Resource) -> bool:
    """Whether two windows share a moment; no start reaches back forever, no end forward forever."""
    def bounds(grant: Resource) -> tuple[str, str]:
        return grant.attributes.get("start") or "", grant.attributes.get("end") or "~"
    (start1, end1), (start2, end2) = bounds(first), bounds(second)
    return start1 < end2 and start2 < end1


def _via(declarations: Declarations, permission: PermissionModel, user: str) -> tuple[str, ...]:
    """How a user came to a grant: `user` when named directly, else the groups that reach them; plans and
    pull-request comments say "through group staff"."""
    via = ["user"] if user in permission.users else []
    via += [f"group:{g}" for g in permission.groups if user in members_of(declarations, g)]
    return tuple(via)


def _merged(first: Resource, again: Resource) -> Resource:
    """Identical grants from two entries are one grant: the first keeps its source; both reasons are shown."""
    via = tuple(dict.fromkeys((*first.meta.get("via", ()), *again.meta.get("via", ()))))
    first = replace(first, meta={**first.meta, "via": via})
    reasons = [r for r in (first.meta.get("reason"), again.meta.get("reason")) if r]
    if not reasons:
        return first
    return replace(first, meta={**first.meta, "reason": "; ".join(dict.fromkeys(reasons))})


def grant_value(declarations: Declarations, permission: PermissionModel, name: str) -> Any:
    """A permission field as the grant attribute of the same name: instants as UTC text, a schedule's name as
    its normalised spans (`MISSING` when it names no valid schedule), anything else as validated."""
    value = getattr(permission, name, None)
    if isinstance(value, datetime):
        return utc_text(value)
    if name == "schedule" and value is not None:
        schedule = declarations.schedules.get(value)
        return MISSING if schedule is None or schedule.model is None else normalised_schedule(schedule.model)
    return value


def _grants_for(declarations: Declarations, entry: Entry[PermissionModel], permission: PermissionModel,
                caps: Capabilities, system: str, user: str, device: str) -> list[Resource]:
    # The vendor's grant schema says which fields a grant has, and what one left out becomes: a default
    # compared like any value (`end: None` is "no end", `schedule: None` makes a dropped schedule leave the
    # vendor), or nothing at all. A field the vendor does not read back only travels in `meta`.
    attributes: dict[str, Any] = {}
    sent: dict[str, Any] = {}
    for name, attribute in caps.grant_schema.attributes.items():
        value = grant_value(declarations, permission, name)
        if value is MISSING:
            return []
        if value is None:
            if not attribute.has_default:
                continue
            value = attribute.default
        if attribute.compared:
            attributes[name] = value
        elif value is not None:
            sent[name] = value
    meta: Meta = {"via": _via(declarations, permission, user)}
    if permission.reason is not None:
        meta["reason"] = permission.reason
    meta.update(cast(Meta, sent))     # keys the vendor's schema declares as sent, not compared
    # Who receives the grant: providers address people by phone or by email (`needs_phone`, `needs_email`).
    # Kept in meta, not attributes, so that live grants need not echo it to compare equal.
    person = declarations.users[user].model
    if caps.needs_phone and person is not None and person.phone:
        meta["phone"] = person.phone
    if caps.needs_email and person is not None and person.email:
        meta["email"] = person.email
    depends_on: tuple[str, ...] = (address_of(system, Kind.USER, user),) if caps.user_accounts else ()
    depends_on += (address_of(system, Kind.DEVICE, device),)
    if caps.operations:
        names = [f"{user}/{device}/{op}" for op in dict.fromkeys(permission.operations or DEFAULT_OPERATIONS)
                 if op in caps.operations]
    else:
        names = [f"{user}/{device}"]
    return [Resource(system, caps.grant_kind, name, attributes, meta=meta, depends_on=depends_on,
                     source=entry.place.source, schema=caps.grant_schema) for name in names]


def _conflict(second: Entry[PermissionModel], first: Entry[PermissionModel],
              pairs: list[tuple[Resource, Resource]], several_windows: bool = False) -> Diagnostic:
    earlier, later = pairs[0]
    user, device, *operation = later.name.split("/")
    what = f"{operation[0]} on '{device}'" if operation else f"access to '{device}'"
    keys = sorted(set(earlier.attributes) | set(later.attributes))
    different = [k for k in keys if earlier.attributes.get(k) != later.attributes.get(k)]
    extra = len(pairs) - 1
    more = f" ({extra} more grant{'s' if extra > 1 else ''} conflict{'' if extra > 1 else 's'} the same way)"
    apart = ", or give them windows that do not overlap" if several_windows else ""
    return Diagnostic(second.place.at(), f"{user}'s {what} is also granted at {first.place.at()} with a different "
                      f"{_and(different)}; make the two identical or merge them{apart}{more if extra else ''}")


def _one_window_only(declarations: Declarations, second: Entry[PermissionModel], first: Entry[PermissionModel],
                     pairs: list[tuple[Resource, Resource]]) -> Diagnostic:
    _earlier, later = pairs[0]
    user, device, *operation = later.name.split("/")
    what = f"{operation[0]} on '{device}'" if operation else f"access to '{device}'"
    system = declarations.systems.get(later.system)
    vendor = system.model.vendor if system is not None and system.model is not None else later.system
    extra = len(pairs) - 1
    more = f" ({extra} more grant{'s' if extra > 1 else ''} the same way)" if extra else ""
    return Diagnostic(second.place.at(), f"{user}'s {what} is also granted at {first.place.at()} in another window; "
                      f"{vendor} holds one grant per person and lock, so it cannot hold two windows: merge them into "
                      f"one window{more}")


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _temp_keys(declarations: Declarations, capabilities: Mapping[str, Capabilities],
               warnings: list[Diagnostic]) -> list[Resource]:
    resources = []
    for name, entry in declarations.temp_keys.items():
        key = entry.model
        system = system_of_device(declarations, key.device) if key else None
        caps = capabilities_of(declarations, capabilities, system)
        if key is None or system is None or caps is None or not caps.temp_keys:
            continue
        if _is_decommissioned(declarations, key.device):
            warnings.append(Diagnostic(entry.place.at("device"), f"device '{key.device}' is decommissioned: "
                                       f"temp key '{name}' is left out"))
            continue
        emails = []
        for user in key.users or ():
            person = declarations.users.get(user)
            if person is not None and person.model is not None and person.model.email:
                emails.append(person.model.email)
        attributes = {"access": key.access, "users": sorted(set(emails)) if key.access == "users" else [],
                      "start": utc_text(key.start), "end": utc_text(key.end), "max_uses": key.max_uses,
                      "description": key.description}
        resources.append(Resource(system, Kind.TEMP_KEY, name, attributes,
                                  depends_on=(address_of(system, Kind.DEVICE, key.device),),
                                  source=entry.place.source, schema=caps.schema(Kind.TEMP_KEY)))
    return resources


# ------------------------------------------------------------------------------------ renames and evidence

def renames(declarations: Declarations) -> list[Rename]:
    """`previously:` as renames per system: a user's on every system it has an account on."""
    found: list[Rename] = []
    for name, entry in declarations.users.items():
        for old in (entry.model.previously or ()) if entry.model is not None else ():
            found += [Rename(system, Kind.USER, old, name) for system in declarations.systems
                      if has_account(declarations, name, system)]
    for section, kind in (("devices", Kind.DEVICE), ("gateways", Kind.GATEWAY)):
        for name, entry in getattr(declarations, section).items():
            model = entry.model
            for old in (model.previously or ()) if model is not None else ():
                found.append(Rename(model.system, kind, old, name))
    return found


def evidence(declarations: Declarations, resources: list[Resource]) -> dict[str, dict[str, str]]:
    """What identifies each declared user, device and gateway besides its key (digests of people's email and
    phone, a gateway's claiming code; a device's id and name): the planner's clue to a rename, and what the
    state keeps of the last applied policy."""
    found: dict[str, dict[str, str]] = {}
    for resource in resources:
        clues: dict[str, str] = {}
        if resource.kind == Kind.USER:
            model = declarations.users[resource.name].model if resource.name in declarations.users else None
            if model is not None and model.email:
                clues["email"] = digest(model.email.strip().lower())
            if model is not None and model.phone:
                clues["phone"] = digest(model.phone)
        elif resource.kind == Kind.DEVICE:
            if resource.attributes.get("name"):
                clues["name"] = str(resource.attributes["name"])
        elif resource.kind == Kind.GATEWAY and resource.meta.get("claiming_code"):
            clues["claiming_code"] = digest(str(resource.meta["claiming_code"]))
        if resource.kind in (Kind.USER, Kind.DEVICE, Kind.GATEWAY) and resource.id:
            clues["id"] = str(resource.id)
        if clues:
            found[resource.address] = clues
    return found
