"""Checks that need more than one entry: references between entries, and what each vendor can express.

`load_policy` calls `check_systems` (vendor support, settings, credentials from the environment → the
`SystemConfig`s) and `check_references` (every other cross-entry and capability rule) after `schema.parse`.
Each rule reports at the place a person has to edit: an unknown name at the reference, a vendor limit at the
key that asks for too much. Capabilities come from the providers (STYLE 3); this module never imports them.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from reconciler import vendors
from reconciler.errors import Diagnostic
from reconciler.plan import Acknowledgement, RevokeThreshold, ignored_by
from reconciler.resources import Attribute, Capabilities, Kind, Resource, duration_seconds
from reconciler.secret import Secret
from reconciler.text import printable
from reconciler.urls import SANDBOX, is_loopback

from .expand import MISSING, capabilities_of, grant_value, has_account, system_of_device, users_of
from .schema import (
    SYSTEM_KEYS,
    Declarations,
    DeviceModel,
    Entry,
    M,
    PermissionModel,
    Place,
    SystemConfig,
    SystemModel,
    _validate,
    device_fields,
    did_you_mean,
    grant_fields,
    model_keys,
)

ENV_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
SCALARS = (str, int, float, bool)


# ---------------------------------------------------------------------------------------------------- systems

def check_systems(declarations: Declarations, capabilities: Mapping[str, Capabilities],
                  env: Mapping[str, str], *, allowed_hosts: Iterable[str] = (),
                  allowed_credentials: Iterable[str] = ()) -> tuple[dict[str, SystemConfig], list[Diagnostic]]:
    systems: dict[str, SystemConfig] = {}
    problems: list[Diagnostic] = []
    hosts = frozenset(h.strip().lower().rstrip("/") for h in allowed_hosts if h.strip())
    variables = frozenset(v.strip() for v in allowed_credentials if v.strip())
    for name, entry in declarations.systems.items():
        if entry.model is None:
            continue
        caps = capabilities.get(entry.model.vendor)
        found: list[Diagnostic] = []
        if caps is None:
            found.append(Diagnostic(entry.place.at("vendor"), f"vendor '{entry.model.vendor}' is not supported "
                                    "by this version of reconciler"))
        found += _check_settings(entry, caps)
        found += _check_url(entry, caps, hosts)
        credentials, credential_problems = _resolve_credentials(entry, entry.model, caps, env, variables)
        found += credential_problems
        problems += found
        if not found:
            systems[name] = SystemConfig(name=name, vendor=entry.model.vendor, url=entry.model.url,
                                         credentials=credentials, unmanaged=entry.model.unmanaged,
                                         settings=dict(entry.settings), concurrency=entry.model.concurrency,
                                         deadline=entry.model.deadline,
                                         source=entry.place.at(), mass_revoke=_threshold(entry),
                                         offboarding=_offboarding(entry), timezone=entry.model.timezone)
    return systems, problems


def _offboarding(entry: Entry[SystemModel]) -> Acknowledgement:
    given = entry.model.offboarding if entry.model is not None else None
    if given is None:
        return Acknowledgement()
    where = entry.place.at("offboarding", "acknowledge")
    return Acknowledgement(given.acknowledge, f"{where.path}:{where.line}")


def _threshold(entry: Entry[SystemModel]) -> RevokeThreshold:
    guard = entry.model.mass_revoke if entry.model is not None else None
    if guard is None:
        return RevokeThreshold()
    where = entry.place.at("mass_revoke", "acknowledge") if guard.acknowledge else None
    return RevokeThreshold(percent=float(guard.percent), minimum=guard.minimum, acknowledge=guard.acknowledge,
                           source=f"{where.path}:{where.line}" if where else None)


def _check_settings(entry: Entry[SystemModel], caps: Capabilities | None) -> list[Diagnostic]:
    problems = []
    vendor = caps.vendor if caps is not None else ""
    # The vendor's settings model (from the registry) states its keys; the registry completes `caps` with them,
    # and capabilities built elsewhere (a provider's own, before registration) that name none take the model's.
    model = vendors.settings_model(vendor) if caps is not None else None
    fields = model.model_fields if model is not None else {}
    settings, required = (caps.settings, caps.required_settings) if caps is not None else (frozenset(), frozenset())
    if not settings and fields:
        settings = frozenset(f.alias or k for k, f in fields.items())
        required = frozenset(f.alias or k for k, f in fields.items() if f.is_required())
    for key, value in entry.settings.items():
        if caps is not None and key not in settings:
            hint = did_you_mean(str(key), [*SYSTEM_KEYS, *settings])
            accepted = f"; it takes {', '.join(sorted(settings))}" if settings else ""
            problems.append(Diagnostic(entry.place.at(key, at_key=True),
                                       f"unknown key '{key}' for vendor {vendor}{hint}{accepted}"))
        elif not isinstance(value, SCALARS):
            problems.append(Diagnostic(entry.place.at(key), f"expected a single value for '{key}'"))
        elif caps is not None and key in caps.setting_durations:
            problems += _check_duration(entry, key, value, *caps.setting_durations[key])
    for key in sorted(required):
        if entry.settings.get(key) in (None, ""):
            problems.append(Diagnostic(entry.place.at(), f"system '{entry.name}' ({vendor}) needs `{key}:`"))
    if model is not None and not problems:
        # The vendor's own settings model: formats and types (a lock holder id that is no UUID), located.
        known = {k: v for k, v in entry.settings.items() if k in model.model_fields}
        # A missing setting is the capabilities' to report (above), in their words.
        problems += [p for p in _validate(model, known, entry.place, "system")[1]
                     if not p.message.startswith("missing required key")]
    return problems


def _check_url(entry: Entry[SystemModel], caps: Capabilities | None, allowed: frozenset[str]) -> list[Diagnostic]:
    """A system talks to the sandbox, loopback, its vendor's production host or a host the operator allowed
    outside the policy; plain http only to loopback. A policy alone can never send credentials elsewhere."""
    url = entry.model.url if entry.model is not None else None
    if url is None or url == SANDBOX:
        return []
    where = entry.place.at("url")
    parts = urlsplit(url)
    try:
        host, port = (parts.hostname or "").lower(), parts.port
    except ValueError:
        return [Diagnostic(where, f"'{printable(url)}' has an invalid port")]
    if is_loopback(host):
        return []
    if parts.scheme != "https":
        return [Diagnostic(where, f"plain http is only allowed to loopback; use https://{printable(parts.netloc)}")]
    production = urlsplit(caps.production_url) if caps is not None and caps.production_url else None
    if production is not None and host == production.hostname and port in (None, 443):
        return []
    if host in allowed or (port is not None and f"{host}:{port}" in allowed):
        return []
    shown = printable(host if port is None else f"{host}:{port}")
    vendor = f"{caps.vendor}'s production host {production.hostname}" if production is not None and caps else \
        "the vendor's production host"
    return [Diagnostic(where, f"host {shown} is not allowed: use sandbox, a loopback address, {vendor} (omit "
                       f"`url:`), or have the operator allow it (--allow-host {shown} or RECONCILER_ALLOW_HOSTS)")]


def credential_prefix(vendor: str) -> str:
    """Variables a vendor's credentials may name start with this: the vendor's first word (`acme-cloud` → ACME_)."""
    return re.split(r"[^A-Za-z0-9]", vendor, maxsplit=1)[0].upper() + "_"


def _check_duration(entry: Entry[SystemModel], key: str, value: Any, low: int, high: int) -> list[Diagnostic]:
    seconds = duration_seconds(value) if isinstance(value, str) else None
    if seconds is None or not low <= seconds <= high:
        return [Diagnostic(entry.place.at(key), f"'{value}' is not a duration between {_span(low)} and "
                           f"{_span(high)}: write ISO 8601, e.g. P7D or PT24H")]
    return []


def _span(seconds: int) -> str:
    return f"{seconds // 86400} days" if seconds >= 86400 else f"{seconds} second{'s' if seconds != 1 else ''}"


def _resolve_credentials(entry: Entry[SystemModel], system: SystemModel, caps: Capabilities | None,
                         env: Mapping[str, str], allowed: frozenset[str] = frozenset()
                         ) -> tuple[dict[str, Secret], list[Diagnostic]]:
    # The sandbox supplies its own credentials, so a demo policy runs with an empty environment.
    sandbox = system.url == SANDBOX
    declared = system.credentials or {}
    credentials: dict[str, Secret] = {}
    problems = []
    sets = (caps.credential_sets or (caps.credentials,)) if caps is not None else ()
    accepted = frozenset().union(*sets) if sets else frozenset()
    for key, value in declared.items():
        where = entry.place.at("credentials", key)
        if caps is not None and key not in accepted:
            hint = did_you_mean(str(key), accepted)
            problems.append(Diagnostic(entry.place.at("credentials", key, at_key=True),
                                       f"unknown credential '{key}' for {caps.vendor}{hint}; it takes "
                                       f"{', '.join(sorted(accepted)) or 'none'}"))
            continue
        match = ENV_REFERENCE.match(value) if isinstance(value, str) else None
        if match is None:
            # Never echo the value: it is, or may be, a secret that must not reach CI logs.
            problems.append(Diagnostic(where, "a literal secret is not accepted; use ${ENV_VAR}"))
            continue
        variable = match.group(1)
        prefix = credential_prefix(system.vendor)
        if not variable.startswith(prefix) and variable not in allowed:
            # Any other variable of the runner (HOME, GITHUB_TOKEN, another vendor's key) stays where it is.
            problems.append(Diagnostic(where, f"{system.vendor} credentials are read from variables named "
                                       f"{prefix}*; {variable} is not one (an operator may allow it with "
                                       "RECONCILER_ALLOW_CREDENTIALS)"))
            continue
        if env.get(variable):
            credentials[key] = Secret(env[variable])
        elif not sandbox:
            problems.append(Diagnostic(where, f"environment variable {variable} is not set (or is empty)"))
    if caps is not None and not sandbox and not any(s <= set(declared) for s in sets):
        where = entry.place.at("credentials") if system.credentials is not None else entry.place.at()
        if len(sets) == 1:
            missing = sorted(sets[0] - set(declared))
            problems.append(Diagnostic(where, f"{caps.vendor} needs credential{'s' if len(missing) > 1 else ''} "
                                       f"{', '.join(missing)} (as ${{ENV_VAR}} references)"))
        else:
            options = " or ".join(" and ".join(sorted(s)) for s in sets)
            problems.append(Diagnostic(where, f"{caps.vendor} needs credentials {options} "
                                       "(as ${ENV_VAR} references)"))
    return credentials, problems


# ------------------------------------------------------------------------------------------------- references

def _numbered(pattern: str | None, number: str) -> bool:
    """Whether a vendor numbers its devices: its id pattern takes a number and refuses it with a letter added."""
    if not pattern:
        return False
    sample = next((s for s in (number, "1", "123456") if re.fullmatch(pattern, s)), None)
    return sample is not None and not any(
        re.fullmatch(pattern, text) for text in (f"{sample}a", f"a{sample}", f"{sample}A", f"A{sample}"))


def _parsed(entries: Mapping[str, Entry[M]]) -> Iterator[tuple[str, Entry[M], M]]:
    """The entries whose keys validated (in part), with their model: the others are reported already."""
    for name, entry in entries.items():
        if entry.model is not None:
            yield name, entry, entry.model


def check_references(declarations: Declarations, capabilities: Mapping[str, Capabilities]) -> list[Diagnostic]:
    problems = [
        *_check_users(declarations, capabilities),
        *_check_devices(declarations, capabilities),
        *_check_gateways(declarations, capabilities),
        *_check_groups(declarations),
        *_check_permissions(declarations, capabilities),
        *_check_temp_keys(declarations, capabilities),
        *_check_previously(declarations),
        *check_declared_keys(declarations, capabilities),
    ]
    return sorted(set(problems))


def declared_keys(capabilities: Mapping[str, Capabilities], kind: str) -> dict[str, list[str]]:
    """The keys the vendors' schemas declare for `kind` (`"grant"`: each vendor's grant kind) that an entry
    model does not have itself, and the vendors declaring each."""
    model = PermissionModel if kind == "grant" else DeviceModel
    own = set(model_keys(model))
    found: dict[str, list[str]] = {}
    for vendor, caps in sorted(capabilities.items()):
        if kind == "grant" and caps.grant_kind == Kind.TEMP_KEY:
            continue    # its grants are temporary keys, which have their own section
        schema = caps.grant_schema if kind == "grant" else caps.schema(kind)
        for key in schema.attributes:
            if key not in own:
                found.setdefault(key, []).append(vendor)
    return found


def check_declared_keys(declarations: Declarations, capabilities: Mapping[str, Capabilities]) -> list[Diagnostic]:
    """The keys of permissions and devices that only vendors' schemas declare: type-checked from the
    declaration of the entry's vendor, an error at the key on a vendor that does not declare it, and `unknown
    key` (as pydantic says of the others) where no vendor does."""
    problems: list[Diagnostic] = []
    # The vendors the policy's systems name (only their providers are loaded to validate it).
    used = {e.model.vendor for e in declarations.systems.values() if e.model is not None}
    capabilities = {v: caps for v in sorted(used) if (caps := capabilities.get(v)) is not None}
    for kind, model, entries in (("grant", PermissionModel, declarations.permissions),
                                 (Kind.DEVICE, DeviceModel, list(declarations.devices.values()))):
        known = declared_keys(capabilities, kind)
        allowed = [*model_keys(model), *known]
        for entry in entries:
            extra = entry.extra
            for key in extra:
                if key not in known:
                    problems.append(Diagnostic(entry.place.at(key, at_key=True),
                                               f"unknown key '{key}'{did_you_mean(key, allowed)}"))
            declared = {k: v for k, v in extra.items() if k in known}
            if declared:
                problems += _check_declared_values(declarations, capabilities, entry, kind, declared)
    return problems


def _check_declared_values(declarations: Declarations, capabilities: Mapping[str, Capabilities], entry: Entry[Any],
                           kind: str, values: Mapping[str, Any]) -> list[Diagnostic]:
    problems: list[Diagnostic] = []
    model = entry.model
    if model is None:
        return problems
    places = ([(d, system_of_device(declarations, d)) for d in model.devices] if kind == "grant"
              else [(entry.name, model.system)])
    for device, system in places:
        caps = capabilities_of(declarations, capabilities, system)
        if system is None or caps is None or (kind == "grant" and caps.grant_kind == Kind.TEMP_KEY):
            continue
        schema = caps.grant_schema if kind == "grant" else caps.schema(Kind.DEVICE)
        on = f" (device '{device}' is on system '{system}')" if kind == "grant" else ""
        for key, value in values.items():
            attribute = schema.get(key)
            if attribute is None:
                what = f"{caps.vendor} has no '{key}' on grants{on}; remove `{key}:`" if kind == "grant" \
                    else f"{caps.vendor} devices have no '{key}'"
                problems.append(Diagnostic(entry.place.at(key, at_key=True), what))
                continue
            wrong = _declared_value(key, value, attribute, caps.vendor, on)
            if wrong:
                problems.append(Diagnostic(entry.place.at(key), wrong))
    return problems


def _misspelt(entry: Entry[Any], caps: Capabilities) -> frozenset[str]:
    """The permission's model keys an undeclared key is a misspelling of (`ned:` is a misspelt `end:`, which
    counts as given)."""
    model = PermissionModel
    found: set[str] = set()
    for key in entry.extra:
        if key not in caps.grant_schema:
            found.update(difflib.get_close_matches(key, model_keys(model), n=1, cutoff=0.6))
    return frozenset(found)


def _declared_value(key: str, value: Any, attribute: Attribute, vendor: str, on: str) -> str | None:
    """What is wrong with a value of a key a vendor declares (its type, its choices), or None."""
    kinds = attribute.type if isinstance(attribute.type, tuple) else (attribute.type,)
    if value is None or (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        return f"`{key}:` on {vendor} takes a {' or '.join(t.__name__ for t in kinds)}{on}"
    if attribute.choices and value not in attribute.choices:
        return f"'{value}' is not a {key} on {vendor}; use {', '.join(sorted(attribute.choices))}"
    return None


def _check_previously(declarations: Declarations) -> list[Diagnostic]:
    """`previously:` names earlier keys of an entry: one still declared would be two entries with one state
    record; one claimed by two entries could go to either."""
    problems: list[Diagnostic] = []
    for section, noun in (("users", "user"), ("devices", "device"), ("gateways", "gateway")):
        entries: dict[str, Entry[Any]] = getattr(declarations, section)
        claimed: dict[str, str] = {}
        for name, entry in entries.items():
            for index, old in enumerate(getattr(entry.model, "previously", None) or ()):
                where = entry.place.at("previously", index)
                if old in entries:
                    problems.append(Diagnostic(where, f"{noun} '{old}' is still declared (at {entries[old].place.at()}); "
                                               f"`previously:` names a key that is gone: remove {section}.{old} "
                                               "or this line"))
                elif old in claimed:
                    problems.append(Diagnostic(where, f"{noun} '{old}' is already named in `previously:` of "
                                               f"{section}.{claimed[old]}"))
                else:
                    claimed[old] = name
    return problems


def check_ignore(declarations: Declarations, resources: list[Resource]) -> list[Diagnostic]:
    """An `ignore:` pattern that covers something the policy declares: the policy would manage what it also
    says never to touch."""
    problems: list[Diagnostic] = []
    for pattern, place in declarations.ignore:
        hit = next((r.address for r in resources if ignored_by(r.address, (pattern,)) is not None), None)
        if hit is not None:
            problems.append(Diagnostic(place.at(), f"ignore pattern '{pattern}' matches {hit}, which the policy "
                                       "declares: remove the entry from the policy (a hand-over) or narrow the "
                                       "pattern"))
    return problems


def _unknown(kind: str, name: str, known: Any) -> str:
    return f"unknown {kind} '{name}'{did_you_mean(name, known)}"


def _check_system_reference(declarations: Declarations, place: Place, system: str) -> list[Diagnostic]:
    if system not in declarations.systems:
        return [Diagnostic(place.at("system"), _unknown("system", system, declarations.systems))]
    return []


def _check_users(declarations: Declarations, capabilities: Mapping[str, Capabilities]) -> list[Diagnostic]:
    problems = []
    for name, entry, user in _parsed(declarations.users):
        for index, system in enumerate(user.systems or ()):
            caps = capabilities_of(declarations, capabilities, system)
            if system not in declarations.systems:
                problems.append(Diagnostic(entry.place.at("systems", index),
                                           _unknown("system", system, declarations.systems)))
            elif caps is not None and not caps.user_accounts:
                problems.append(Diagnostic(entry.place.at("systems", index),
                                           f"system '{system}' ({caps.vendor}) has no user accounts; `systems:` "
                                           "only lists systems where users are accounts"))
        for system in (user.ids or {}):
            caps = capabilities_of(declarations, capabilities, system)
            if system not in declarations.systems:
                problems.append(Diagnostic(entry.place.at("ids", system),
                                           _unknown("system", system, declarations.systems)))
            elif caps is not None and not caps.user_accounts:
                problems.append(Diagnostic(entry.place.at("ids", system), f"system '{system}' ({caps.vendor}) has "
                                           "no user accounts to adopt"))
            elif not has_account(declarations, name, system):
                problems.append(Diagnostic(entry.place.at("ids", system), f"user '{name}' adopts an account on "
                                           f"'{system}' but `systems:` leaves that system out"))
        problems += _check_account_fields(declarations, capabilities, name, entry, user)
        if user.mobile_key and not entry.given("phone"):
            mobile = [s for s in declarations.systems if has_account(declarations, name, s)
                      and (c := capabilities_of(declarations, capabilities, s)) and c.user_accounts and c.mobile_key]
            if mobile:
                problems.append(Diagnostic(entry.place.at("mobile_key"), f"user '{name}' has mobile_key but no "
                                           "phone: the invitation is sent by SMS, so add `phone:`"))
    return problems


def _check_account_fields(declarations: Declarations, capabilities: Mapping[str, Capabilities], name: str,
                          entry: Entry[Any], user: Any) -> list[Diagnostic]:
    """A user field the vendor's user schema requires, on each system where the policy creates the account (an
    adopted account, `ids:`, is not created): missing, it is an error here rather than a refused create."""
    problems = []
    for system in declarations.systems:
        caps = capabilities_of(declarations, capabilities, system)
        if caps is None or not caps.user_accounts or not has_account(declarations, name, system):
            continue
        if system in (user.ids or {}):
            continue
        for field_name, attribute in caps.schema(Kind.USER).attributes.items():
            if attribute.required and not entry.given(field_name):
                problems.append(Diagnostic(entry.place.at(), f"{caps.vendor} accounts need `{field_name}:` "
                                           f"(system '{system}'): add it to user '{name}'"))
    return problems


def _check_devices(declarations: Declarations, capabilities: Mapping[str, Capabilities]) -> list[Diagnostic]:
    problems = []
    adopted: dict[tuple[str, str], Entry[Any]] = {}
    for _, entry, device in _parsed(declarations.devices):
        problems += _check_system_reference(declarations, entry.place, device.system)
        caps = capabilities_of(declarations, capabilities, device.system)
        if caps is None:
            continue
        schema = caps.schema(Kind.DEVICE)
        for key in device_fields():
            if entry.given(key) and key not in schema:
                problems.append(Diagnostic(entry.place.at(key, at_key=True),
                                           f"{caps.vendor} devices have no '{key}'"))
        if device.id is None:
            if not caps.creates_devices and not entry.given("id"):
                problems.append(Diagnostic(entry.place.at(), f"{caps.vendor} cannot create devices: add the `id:` "
                                           f"of the existing one to adopt it"))
            continue
        device_id = str(device.id)
        if isinstance(device.id, int) and not _numbered(caps.device_id_pattern, device_id):
            # A bare number is a vendor's id only where its ids are numbers; elsewhere it is a typo for a quoted id.
            problems.append(Diagnostic(entry.place.at("id"), f"device ids on {caps.vendor} are strings: quote it"))
        elif caps.device_id_pattern and not re.fullmatch(caps.device_id_pattern, device_id):
            problems.append(Diagnostic(entry.place.at("id"), f"'{device_id}' is not a valid device id on "
                                       f"{caps.vendor} (expected {caps.device_id_pattern})"))
        first = adopted.setdefault((device.system, device_id), entry)
        if first is not entry:
            problems.append(Diagnostic(entry.place.at("id"), f"device '{first.name}' at {first.place.at()} "
                                       "already adopts this id"))
    return problems


def _check_gateways(declarations: Declarations, capabilities: Mapping[str, Capabilities]) -> list[Diagnostic]:
    problems = []
    for name, entry, gateway in _parsed(declarations.gateways):
        problems += _check_system_reference(declarations, entry.place, gateway.system)
        caps = capabilities_of(declarations, capabilities, gateway.system)
        if caps is not None and not caps.gateways:
            problems.append(Diagnostic(entry.place.at("system"), f"{caps.vendor} has no gateways "
                                       f"(system '{gateway.system}')"))
            continue
        for index, device in enumerate(gateway.devices):
            system = system_of_device(declarations, device)
            if device not in declarations.devices:
                problems.append(Diagnostic(entry.place.at("devices", index),
                                           _unknown("device", device, declarations.devices)))
            elif system is not None and system != gateway.system:
                problems.append(Diagnostic(entry.place.at("devices", index), f"device '{device}' is on system "
                                           f"'{system}', not on the gateway's system '{gateway.system}'"))
        count = len(set(gateway.devices))
        if caps is not None and count > caps.max_associations:
            problems.append(Diagnostic(entry.place.at("devices"), f"gateway '{name}' has {count} associations; "
                                       f"{caps.vendor} allows at most {caps.max_associations}"))
    return problems


def _check_groups(declarations: Declarations) -> list[Diagnostic]:
    problems = []
    for entry in declarations.groups.values():
        for index, member in enumerate(entry.model or ()):
            if member in declarations.users and member in declarations.groups:
                problems.append(Diagnostic(entry.place.at(index), f"'{member}' is both a user and a group; "
                                           "rename one so that the member is unambiguous"))
            elif member not in declarations.users and member not in declarations.groups:
                known = [*declarations.users, *declarations.groups]
                problems.append(Diagnostic(entry.place.at(index), _unknown("user or group", member, known)))
    return problems + _check_group_cycles(declarations)


def _check_group_cycles(declarations: Declarations) -> list[Diagnostic]:
    problems = []
    reported: set[frozenset[str]] = set()
    done: set[str] = set()

    def visit(group: str, path: list[str]) -> None:
        if group in path:
            cycle = path[path.index(group):]
            if frozenset(cycle) not in reported:
                reported.add(frozenset(cycle))
                # Start the message at the group defined first, so it does not depend on traversal order.
                start = min(range(len(cycle)), key=lambda i: declarations.groups[cycle[i]].place.at())
                ordered = cycle[start:] + cycle[:start]
                entry = declarations.groups[ordered[0]]
                problems.append(Diagnostic(entry.place.at(), "group cycle: " + " → ".join([*ordered, ordered[0]])))
            return
        if group in done:
            return
        for member in declarations.groups[group].model or ():
            if member in declarations.groups and member not in declarations.users:
                visit(member, [*path, group])
        done.add(group)

    for group in declarations.groups:
        visit(group, [])
    return problems


def _check_permissions(declarations: Declarations, capabilities: Mapping[str, Capabilities]) -> list[Diagnostic]:
    problems: list[Diagnostic] = []
    for entry in declarations.permissions:
        permission = entry.model
        if permission is None:
            continue
        place = entry.place
        for index, user in enumerate(permission.users):
            if user not in declarations.users:
                problems.append(Diagnostic(place.at("users", index), _unknown("user", user, declarations.users)))
        for index, group in enumerate(permission.groups):
            if group not in declarations.groups:
                problems.append(Diagnostic(place.at("groups", index),
                                           _unknown("group", group, declarations.groups)))
        if permission.schedule is not None and permission.schedule not in declarations.schedules:
            problems.append(Diagnostic(place.at("schedule"),
                                       _unknown("schedule", permission.schedule, declarations.schedules)))
        users = users_of(declarations, permission)
        for index, device in enumerate(permission.devices):
            if device not in declarations.devices:
                problems.append(Diagnostic(place.at("devices", index),
                                           _unknown("device", device, declarations.devices)))
                continue
            system = system_of_device(declarations, device)
            caps = capabilities_of(declarations, capabilities, system)
            if system is not None and caps is not None:
                dropped = entry.dropped | _misspelt(entry, caps)
                problems += _check_grant_capabilities(declarations, place, permission, caps, system, device, users,
                                                      dropped=dropped)
    return problems


def _check_grant_capabilities(declarations: Declarations, place: Place, permission: Any, caps: Capabilities,
                              system: str, device: str, users: list[str],
                              dropped: frozenset[str] = frozenset()) -> list[Diagnostic]:
    vendor = caps.vendor
    on = f"device '{device}' is on system '{system}'"
    problems = []
    if caps.grant_kind == Kind.TEMP_KEY:
        # Early return: the vendor has no standing grants at all, so the other checks would only add noise.
        index = permission.devices.index(device) if device in permission.devices else None
        where = place.at("devices", index) if index is not None else place.at()
        return [Diagnostic(where, f"{vendor} has only temporary keys ({on}); declare this access under "
                                  "`temp_keys:` instead of `permissions:`")]
    problems += _check_grant_fields(declarations, place, permission, caps, on, dropped)
    if permission.operations is not None:
        if not caps.operations:
            problems.append(Diagnostic(place.at("operations", at_key=True),
                                       f"{vendor} has no operations to choose ({on}); remove `operations:`"))
        else:
            for index, operation in enumerate(permission.operations):
                if operation not in caps.operations:
                    hint = f" (did you mean '{operation.upper()}'?)" if operation.upper() in caps.operations else ""
                    problems.append(Diagnostic(place.at("operations", index), f"'{operation}' is not an operation "
                                               f"on {vendor}{hint}; use {', '.join(sorted(caps.operations))}"))
    for user in users:
        entry = declarations.users[user]
        person = entry.model
        if person is None:
            continue
        if caps.needs_phone and not entry.given("phone"):
            problems.append(Diagnostic(place.at(), f"user '{user}' has no phone: {vendor} sends keys to a phone "
                                       f"number ({on})"))
        if caps.needs_email and not entry.given("email"):
            problems.append(Diagnostic(place.at(), f"user '{user}' has no email: {vendor} identifies people by "
                                       f"email ({on})"))
        if caps.user_accounts and not has_account(declarations, user, system):
            problems.append(Diagnostic(place.at(), f"user '{user}' has no account in system '{system}' (their "
                                       f"`systems:` leaves it out), but is granted '{device}' there"))
    return problems


def _check_grant_fields(declarations: Declarations, place: Place, permission: PermissionModel, caps: Capabilities,
                        on: str, dropped: frozenset[str]) -> list[Diagnostic]:
    """A permission's grant fields against the vendor's grant schema: one the vendor lacks, one it requires, a
    value outside its choices or of another type. The words come from the field's `GrantField` mark."""
    vendor = caps.vendor
    schema = caps.grant_schema
    problems = []
    for name, mark in grant_fields().items():
        attribute = schema.get(name)
        value = getattr(permission, name, None)
        if attribute is None:
            if value is not None:
                problems.append(Diagnostic(place.at(name, at_key=True),
                                           f"{vendor} {mark.lacks} ({on}); remove `{name}:`{mark.instead}"))
            continue
        if value is None:
            if attribute.required and name not in dropped:
                problems.append(Diagnostic(place.at(), f"{vendor} requires {mark.noun}: add `{name}:` to this "
                                           "permission"))
            continue
        if attribute.choices and value not in attribute.choices:
            problems.append(Diagnostic(place.at(name), f"'{value}' is not {mark.noun} on {vendor}; use "
                                       f"{', '.join(sorted(attribute.choices))}"))
            continue
        built = grant_value(declarations, permission, name)
        if built is not None and built is not MISSING and not isinstance(built, attribute.type):
            kinds = attribute.type if isinstance(attribute.type, tuple) else (attribute.type,)
            problems.append(Diagnostic(place.at(name), f"`{name}:` on {vendor} takes a "
                                       f"{' or '.join(t.__name__ for t in kinds)} ({on})"))
    return problems


def _check_temp_keys(declarations: Declarations, capabilities: Mapping[str, Capabilities]) -> list[Diagnostic]:
    problems = []
    for _, entry, key in _parsed(declarations.temp_keys):
        if key.device not in declarations.devices:
            problems.append(Diagnostic(entry.place.at("device"), _unknown("device", key.device,
                                                                          declarations.devices)))
        else:
            caps = capabilities_of(declarations, capabilities, system_of_device(declarations, key.device))
            if caps is not None and not caps.temp_keys:
                problems.append(Diagnostic(entry.place.at("device"), f"{caps.vendor} has no temporary keys "
                                           f"(device '{key.device}')"))
        for index, user in enumerate(key.users or ()):
            person = declarations.users.get(user)
            if person is None:
                problems.append(Diagnostic(entry.place.at("users", index),
                                           _unknown("user", user, declarations.users)))
            elif person.model is not None and not person.given("email"):
                problems.append(Diagnostic(entry.place.at("users", index), f"user '{user}' has no email: temporary "
                                           "keys name their users by email"))
    return problems
