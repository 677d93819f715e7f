"""Write policy YAML from a live system, so a team can adopt what exists: export, then plan, shows no changes.

Called by `reconciler export SYSTEM`. Reads the system twice through its provider: first to discover
devices, user accounts and gateways (adopted by id, named after what the vendor calls them), then the
grants on those devices. Identical grants are folded into permission entries, user sets shared by several
entries become groups, and everything is written with ruamel.yaml with comments naming vendor ids.
"""

from __future__ import annotations

import io
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from reconciler import run
from reconciler.errors import ReconcilerError
from reconciler.policy.expand import USER_FIELDS
from reconciler.policy.schema import UserModel
from reconciler.resources import GRANT_KINDS, Kind, KindSchema, Resource
from reconciler.text import printable


def export_system(session: run.Session, system: str) -> str:
    policy = run.validate(session)
    if system not in policy.systems:
        raise ReconcilerError(f"no system {system!r} in the policy (systems: {', '.join(sorted(policy.systems))})")
    config = policy.systems[system]
    # Devices the policy already declares are read (a vendor without a lock list can only be
    # read through them) but not written again.
    declared = [r for r in policy.resources if r.system == system and r.kind == Kind.DEVICE]
    state = run.open_state(session)
    providers = run.build_providers(session, policy, state)
    try:
        provider = providers[system]
        found = provider.read(declared).resources
        user_schema = provider.capabilities.schema(Kind.USER)
        adopted, keys = _adopt(system, found, user_schema)
        known = {r.address for r in policy.resources}
        second = provider.read([*declared, *(r for r in adopted if r.address not in known)])
        if second.errors:
            raise ReconcilerError("; ".join(second.errors))
        live = second.resources
        fields = provider.capabilities.device_fields
        schemas = provider.capabilities.grant_schema, provider.capabilities.schema(Kind.TEMP_KEY)
    finally:
        for each in providers.values():
            each.close()
    return _to_yaml(system, config.vendor, [r for r in adopted if r.address not in known], keys, live, fields,
                    *schemas)


def _comment(text: str) -> str:
    """Vendor text fit for a YAML comment: one line, control characters escaped (`printable`). Every other
    vendor string goes into the document as a scalar, which the YAML library quotes and escapes."""
    return printable(str(text))[:200]


def _flow(items: Any) -> CommentedSeq:
    seq = CommentedSeq(items)
    seq.fa.set_flow_style()
    return seq


def _slug(text: str, fallback: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:60]
    return slug if slug and slug[0].isalnum() else fallback


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    taken.add(candidate)
    return candidate


def _adopt(system: str, found: list[Resource], user_schema: KindSchema) -> tuple[list[Resource], dict[str, str]]:
    """Desired resources that adopt every device, account and gateway by id; and vendor id → policy key."""
    taken: set[str] = set()
    keys: dict[str, str] = {}
    adopted = []
    for resource in sorted(found, key=lambda r: (r.kind, r.attributes.get("name") or "", r.id or "")):
        if resource.kind not in (Kind.DEVICE, Kind.USER, Kind.GATEWAY) or not resource.id:
            continue
        if not resource.name.startswith("id:"):
            key = _unique(resource.name, taken)
        elif resource.kind == Kind.DEVICE:
            key = _unique(_slug(str(resource.attributes.get("name") or ""), f"device-{resource.id[:8]}"), taken)
        elif resource.kind == Kind.USER:
            key = _unique(f"user-{resource.id[:8].lower()}", taken)
        else:
            serial = str(resource.meta.get("serial_number") or resource.id[:8])
            key = _unique(_slug(f"gateway-{serial}", f"gateway-{resource.id[:8]}"), taken)
        keys[resource.id] = key
        attributes = {"name": resource.attributes["name"]} if resource.kind == Kind.DEVICE else \
            _account(resource, user_schema) if resource.kind == Kind.USER else {}
        adopted.append(Resource(system, resource.kind, key, attributes, id=resource.id, meta=resource.meta))
    return adopted, keys


def _account(resource: Resource, user_schema: KindSchema) -> dict[str, Any]:
    """An adopted account's attributes: the user fields its vendor's user schema declares (`UserField`)."""
    return {field: resource.attributes.get(field) for field in user_schema.attributes if field in USER_FIELDS}


def _account_entry(resource: Resource) -> CommentedMap:
    """A user entry for an adopted account: its declared fields that differ from the policy's defaults."""
    entry = CommentedMap()
    for field, value in resource.attributes.items():
        if value is not None and value != UserModel.model_fields[field].default:
            entry[field] = value
    return entry


def _person(token: str, users: CommentedMap, taken: set[str], meta: Any = None) -> str:
    """A grant's user part: a policy key already, or `id:<phone or email>` (or a vendor user id whose email
    the provider read) for vendors that address people. One policy user per phone or email."""
    if not token.startswith("id:"):
        return token
    value = token[3:]
    if not (value.startswith("+") or "@" in value) and meta is not None:
        value = meta.get("email") or meta.get("phone") or value
    field = "phone" if value.startswith("+") else "email" if "@" in value else None
    if field is None:
        raise ReconcilerError(f"cannot name the holder {value!r} of a grant: it is not an account, phone or email")
    for key, entry in users.items():
        if isinstance(entry, dict) and entry.get(field) == value:
            return key
    key = _unique(_slug(value.split("@")[0] if field == "email" else f"phone-{value[-4:]}", "person"), taken)
    # Known to the vendor by phone or email only: no account in account-based systems.
    users[key] = CommentedMap({field: value, "systems": _flow([])})
    return key


def _to_yaml(system: str, vendor: str, adopted: list[Resource], keys: dict[str, str], live: list[Resource],
             device_fields: frozenset[str], grant_schema: KindSchema, temp_key_schema: KindSchema) -> str:
    users, devices, gateways = CommentedMap(), CommentedMap(), CommentedMap()
    taken = {r.name for r in adopted}
    for resource in sorted(adopted, key=lambda r: r.name):
        if resource.kind == Kind.USER:
            entry = _account_entry(resource)
            entry["ids"] = CommentedMap({system: resource.id})
            users[resource.name] = entry
        elif resource.kind == Kind.DEVICE:
            entry = CommentedMap({"system": system, "id": resource.id})
            name = resource.attributes.get("name")
            if name and "name" in device_fields:
                entry["name"] = name
            devices[resource.name] = entry
            serial = resource.meta.get("serial_number")
            status = resource.meta.get("claiming_status")
            note = ", ".join(x for x in (
                f"'{name}'" if name and "name" not in device_fields else "",
                f"serial {serial}" if serial else "", status.lower() if status else "") if x)
            if note:
                devices.yaml_add_eol_comment(_comment(note), resource.name)
        elif resource.kind == Kind.GATEWAY:
            gateways[resource.name] = CommentedMap({"system": system, "id": resource.id,
                                                    "devices": _flow([])})
            serial = resource.meta.get("serial_number")
            if serial:
                gateways.yaml_add_eol_comment(_comment(f"serial {serial}"), resource.name)
    for resource in live:
        if resource.kind == Kind.ASSOCIATION:
            gateway, device = resource.name.split("/", 1)
            if gateway in gateways and device in devices:
                gateways[gateway]["devices"].append(device)
    grants = [r for r in live if r.kind in GRANT_KINDS and r.kind != Kind.TEMP_KEY]
    permissions, groups, schedules = _permissions(grants, users, taken, grant_schema)
    device_of = {r.id: r.name for r in live if r.kind == Kind.DEVICE and r.id}
    temp_keys = _temp_keys([r for r in live if r.kind == Kind.TEMP_KEY], users, taken, device_of, temp_key_schema)
    document = CommentedMap()
    for name, section in (("users", users), ("groups", groups), ("devices", devices), ("gateways", gateways),
                          ("schedules", schedules), ("permissions", permissions), ("temp_keys", temp_keys)):
        if section:
            document[name] = section
    document.yaml_set_start_comment(
        # First, as in the shipped policies: the editor schema (yaml-language-server) for the file.
        "yaml-language-server: $schema=../schema/policy.schema.json\n"
        f"Exported from system {_comment(repr(system))} ({_comment(vendor)}) by `reconciler export`.\n"
        "Existing objects are adopted by vendor id; review the names, then commit.")
    yaml = YAML()
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 120
    out = io.StringIO()
    yaml.dump(document, out)
    text = out.getvalue()
    if any(line.lstrip().startswith("::") for line in text.splitlines()):
        # A long vendor string folded so that a line begins with `::` (a workflow command in a CI log):
        # written again without folding.
        yaml.width = 1 << 20
        out = io.StringIO()
        yaml.dump(document, out)
        text = out.getvalue()
    return text


def _permissions(grants: list[Resource], users: CommentedMap, taken: set[str], schema: KindSchema
                 ) -> tuple[CommentedSeq, CommentedMap, CommentedMap]:
    # (attributes, operation) → device → holders; then devices with the same holders share an entry.
    by_terms: dict[tuple[str, str | None], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for grant in grants:
        user, device, *rest = grant.name.split("/")
        holder = _person(user, users, taken, grant.meta) if user.startswith("id:") else user
        terms = json.dumps(dict(grant.attributes), sort_keys=True)
        by_terms[(terms, rest[0] if rest else None)][device].add(holder)
    entries: list[tuple[dict[str, Any], str | None, tuple[str, ...], list[str]]] = []
    for (terms, operation), devices in sorted(by_terms.items(), key=lambda item: (item[0][0], item[0][1] or "")):
        by_holders: dict[tuple[str, ...], list[str]] = defaultdict(list)
        for device, holder_set in sorted(devices.items()):
            by_holders[tuple(sorted(holder_set))].append(device)
        for holders, device_list in sorted(by_holders.items()):
            entries.append((json.loads(terms), operation, holders, device_list))
    # Holder sets used by several entries, or large, become groups.
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for _, _, holders, _ in entries:
        counts[holders] += 1
    groups, group_of = CommentedMap(), {}
    for holders, count in sorted(counts.items()):
        if len(holders) > 1 and (count > 1 or len(holders) >= 5):
            name = _unique(f"group-{len(groups) + 1}", taken)
            groups[name] = _flow(holders)
            group_of[holders] = name
    schedules, schedule_of = CommentedMap(), {}
    merged: dict[tuple[str, tuple[str, ...], tuple[str, ...]], list[str]] = defaultdict(list)
    for attrs, operation, holders, device_list in entries:
        key = (json.dumps(attrs, sort_keys=True), holders, tuple(device_list))
        merged[key].append(operation or "")
    result = CommentedSeq()
    for (terms, holders, device_names), operations in merged.items():
        attrs = json.loads(terms)
        entry = CommentedMap()
        if holders in group_of:
            entry["groups"] = _flow([group_of[holders]])
        else:
            entry["users"] = _flow(holders)
        entry["devices"] = _flow(device_names)
        ops = sorted(o for o in operations if o)
        if ops and ops != ["OPEN"]:
            entry["operations"] = _flow(ops)
        # The vendor's grant schema: a field is written when it holds something other than its default.
        for field, attribute in schema.attributes.items():
            value = attrs.get(field)
            if field != "schedule" and attribute.compared and value and \
                    value != (attribute.default if attribute.has_default else None):
                entry[field] = value
        if attrs.get("schedule"):
            spans = json.dumps(attrs["schedule"], sort_keys=True)
            if spans not in schedule_of:
                name = _unique(f"schedule-{len(schedules) + 1}", taken)
                schedules[name] = _schedule_spans(attrs["schedule"])
                schedule_of[spans] = name
            entry["schedule"] = schedule_of[spans]
        result.append(entry)
    return result, groups, schedules


def _schedule_spans(schedule: list[dict[str, str]]) -> CommentedSeq:
    by_times: dict[tuple[str, str], list[str]] = defaultdict(list)
    for span in schedule:
        by_times[(span["from"], span["to"])].append(span["day"])
    spans = CommentedSeq()
    for (start, end), days in by_times.items():
        spans.append(CommentedMap({"days": _flow(days), "from": start, "to": end}))
    return spans


def _temp_keys(keys: list[Resource], users: CommentedMap, taken: set[str], device_of: dict[str, str],
               schema: KindSchema
               ) -> CommentedMap:
    section = CommentedMap()
    emails = {v.get("email"): k for k, v in users.items() if isinstance(v, dict) and v.get("email")}
    for key in keys:
        attrs = dict(key.attributes)
        device = key.meta.get("device") or device_of.get(str(key.meta.get("lock")))
        if not device:
            continue
        entry = CommentedMap({"device": device, "access": attrs.get("access", "public")})
        holders = []
        for email in attrs.get("users") or []:
            if email not in emails:
                emails[email] = _person(f"id:{email}", users, taken)
            holders.append(emails[email])
        if holders:
            entry["users"] = _flow(holders)
        for field, attribute in schema.attributes.items():     # what the vendor's temp keys have, in order
            if field not in ("access", "users") and attribute.compared and attrs.get(field) is not None:
                entry[field] = attrs[field]
        section[key.name if not key.name.startswith("id:") else _unique(f"key-{key.name[3:11]}", taken)] = entry
    return section


def write_export(text: str, path: Path, *, force: bool = False) -> None:
    if path.exists() and not force:
        raise ReconcilerError(f"{path} exists; choose another --out or pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
