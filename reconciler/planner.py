"""Diff desired against live resources into a Plan. Pure: no I/O, no clock (`now` is an argument).

Called by the CLI after the policy is loaded and every provider has read its system in bulk. The rules
that make plans safe live here: what is undeclared is revoked or only reported per system, what is not
ours is listed and never touched, what a vendor is still working on is pending rather than repeated, and
a grant whose end has passed is not created. A live object a provider marks `uncertain` (a create whose
answer was lost and that cannot be proven ours) is neither created again nor given anything: it becomes a
warning saying how to resolve it, and so does everything that depends on it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime

from reconciler.plan import (
    Acknowledgement,
    Action,
    Change,
    Effect,
    Guard,
    Note,
    Plan,
    RenameGuard,
    RevokeThreshold,
    Suspect,
    access_of,
    classify,
    ignored_by,
    revocation_token,
)
from reconciler.resources import (
    GRANT_KINDS,
    Kind,
    KindSchema,
    OnChange,
    Resource,
    Status,
    address_of,
    digest,
    format_time,
    grant_slot,
    on_change,
)

REVOKE, REPORT = "revoke", "report"


def plan(desired: Iterable[Resource], live: Iterable[Resource], *, now: datetime,
         unmanaged_modes: Mapping[str, str] | None = None, warnings: Iterable[Note] = (),
         applied: Mapping[str, str] | None = None, thresholds: Mapping[str, RevokeThreshold] | None = None,
         renamed: Iterable[tuple[str, str]] = (), ignore: tuple[str, ...] = (),
         evidence: Mapping[str, Mapping[str, str]] | None = None,
         acknowledgements: Mapping[str, Acknowledgement] | None = None,
         schemas: Mapping[tuple[str, str], KindSchema] | None = None) -> Plan:
    """`applied` (address → digest of the attributes apply last set, from state) lets the plan tell
    drift, a live change made outside git, from a change of the policy. `thresholds` are the systems'
    mass-revoke guards (default 25 % of at least 10 managed grants).

    `renamed`: the (old, new) addresses of users, devices and gateways `previously:` moved in the state (shown,
    nothing sent). `ignore`: `ignore:` patterns; a live object they cover (or whose person, door or gateway
    they cover) is listed once and left as it is. `evidence`: what identifies a user, device or gateway
    (digests of email and phone, id, name, claiming code), for the desired ones and the ones the state knew:
    a delete and a create sharing one are a suspected rename, which apply refuses unless `acknowledgements`
    (per system) quotes its token."""
    modes = unmanaged_modes or {}
    desired = list(desired)
    now_text = format_time(now)
    wanted = {r.address: r for r in desired}
    found = _index_live(live, wanted, now_text)
    ignored: list[Note] = []
    if ignore:
        for address in [a for a in found if a not in wanted]:
            pattern = ignored_by(address, ignore)
            if pattern is not None:
                gone = found.pop(address)
                known = gone.managed if not gone.is_grant else address in (applied or {})
                word = "released" if known else "ignored"
                details = (("id", gone.id),) if gone.id else ()
                ignored.append(Note(address, f"{word}: left as it is (ignore: {pattern})", gone.system, gone.kind,
                                    (("ignored", pattern), *details)))
    uncertain = {a for a, r in found.items() if r.meta.get("uncertain")}

    changes: list[Change] = []
    pending: list[Note] = []
    unmanaged: list[Note] = []
    notes: list[Note] = list(warnings)

    for address, want in wanted.items():
        have = found.get(address)
        if have is not None and _has_expired(have, now_text):
            have = None
        if have is not None and have.meta.get("uncertain"):
            extra = (("candidates", tuple(have.meta["candidates"])),) if have.meta.get("candidates") else ()
            notes.append(Note(address, f"uncertain: {have.meta['uncertain']}", want.system, want.kind,
                              (("uncertain", True), *extra)))
            continue
        blocked = [d for d in want.depends_on if d in uncertain]
        if blocked:
            notes.append(Note(address, f"uncertain: not planned until {', '.join(blocked)} is resolved (see its "
                              "warning); nothing is granted meanwhile", want.system, want.kind, (("uncertain", True),)))
            continue
        if want.status is Status.ABSENT:
            if have is not None:
                changes.append(Change(Action.DELETE, want, have))
            continue
        if have is None and want.id:
            notes.append(Note(address, f"{want.kind} id {want.id} was not found in the system; "
                              "nothing is created for it", want.system, want.kind))
            continue
        if have is None:
            end_key = access_of(want.kind, want.schema).end if want.is_grant else None
            end = want.attributes.get(end_key) if end_key else None
            if end and end <= now_text:
                notes.append(Note(address, f"not created: its end {end} has passed", want.system, want.kind))
                continue
            changes.append(Change(Action.CREATE, want, None))
            continue
        changed = _changed(want, have, now_text, (applied or {}).get(address))
        # The attribute schema says, per attribute, whether a change is an update, a replacement or impossible.
        does = {k: on_change(k, want.schema, have.schema) for k in changed}
        fixed = [k for k in changed if does[k] is OnChange.FIXED]
        if fixed:
            notes.append(Note(address, f"{', '.join(fixed)} cannot be changed in place on this vendor "
                              f"(live {', '.join(f'{k}={have.attributes.get(k)}' for k in fixed)}); "
                              "remove the entry and add it again to re-create it", want.system, want.kind))
            changed = tuple(k for k in changed if k not in fixed)
        if have.status is Status.PENDING and not changed:
            pending.append(_pending_note(have))
            continue
        if changed:
            action = Action.REPLACE if any(does[k] is OnChange.REPLACE for k in changed) else Action.UPDATE
            changes.append(Change(action, want, have, changed))

    for address, have in found.items():
        if address in wanted:
            continue
        change, note = _undeclared(have, modes.get(have.system, REVOKE))
        if change:
            changes.append(change)
        if note:
            unmanaged.append(note)

    managed = [r for r in found.values() if r.is_grant and r.managed and r.status is Status.PRESENT]
    applied_systems = {address.split("/", 1)[0] for address in (applied or {})}
    changes = [replace(c, origin=_origin(c, applied or {}, applied_systems), effects=_effects(c, now_text))
               for c in changes]
    suspects = _suspects(changes, unmanaged, found, wanted, evidence or {})
    if suspects:
        remarks: dict[str, str] = {}
        for suspect in suspects:
            remarks[suspect.new] = f"looks like a rename of {suspect.old_name} ({suspect.why})"
            remarks.setdefault(suspect.old, f"looks like a rename to {suspect.new_name} ({suspect.why})")
        changes = [replace(c, looks_like=remarks[c.address]) if c.address in remarks else c for c in changes]
    by_system: dict[str, list[Suspect]] = defaultdict(list)
    for suspect in suspects:
        by_system[suspect.system].append(suspect)
    rename_guards = tuple(RenameGuard(system, tuple(found_), (acknowledgements or {}).get(system, Acknowledgement()))
                          for system, found_ in sorted(by_system.items()))
    moved = tuple(Note(new, f"{old} → {new} (renamed)", new.split("/", 1)[0], new.split("/")[1],
                       (("previously", old),)) for old, new in renamed)
    guards = _guards(changes, managed, thresholds or {})
    live_digests = {c.address: _live_digest(c.live) for c in changes if c.live is not None}
    policy_digest = digest(sorted((r.address, dict(r.attributes), str(r.status), r.id) for r in desired))
    return Plan(now=now_text, changes=tuple(changes), pending=tuple(pending), unmanaged=tuple(unmanaged),
                warnings=tuple(notes), managed_grants=len(managed), guards=guards, policy_digest=policy_digest,
                live_digests=live_digests, renamed=moved, ignored=tuple(ignored), renames=rename_guards,
                schemas=schemas or {})


WHY = {"email": "same email", "phone": "same phone", "id": "same id", "name": "same name",
       "claiming_code": "same claiming code"}


def _suspects(changes: list[Change], unmanaged: list[Note], found: Mapping[str, Resource],
              wanted: Mapping[str, Resource], evidence: Mapping[str, Mapping[str, str]]) -> list[Suspect]:
    """Pairs of (a user, device or gateway leaving, one arriving) on one system that share what identifies
    them: a rename without `previously:`. A user leaving is a delete; a device or gateway leaving is one the
    state knew that the policy no longer declares (never deleted, but its grants go)."""
    kinds = (Kind.USER, Kind.DEVICE, Kind.GATEWAY)
    leaving = [c.address for c in changes if c.action is Action.DELETE and c.desired is None and c.kind == Kind.USER]
    leaving += [n.address for n in unmanaged if n.kind in (Kind.DEVICE, Kind.GATEWAY)
                and found.get(n.address) is not None and found[n.address].managed]
    leaving += [a for a, r in found.items() if r.kind in (Kind.DEVICE, Kind.GATEWAY) and r.managed
                and a not in wanted and a not in leaving]
    arriving = [c.address for c in changes if c.action is Action.CREATE and c.kind in kinds]
    suspects: list[Suspect] = []
    taken: set[str] = set()
    for new in sorted(arriving):
        want = wanted.get(new)
        mine = dict(evidence.get(new, {}))
        if want is not None and want.kind == Kind.DEVICE and want.attributes.get("name"):
            mine.setdefault("name", str(want.attributes["name"]))
        for old in sorted(leaving):
            if old in taken or old.split("/")[:2] != new.split("/")[:2]:
                continue
            have = found.get(old)
            theirs = dict(evidence.get(old, {}))
            if have is not None and have.kind == Kind.DEVICE and have.attributes.get("name"):
                theirs.setdefault("name", str(have.attributes["name"]))
            same = [k for k in WHY if mine.get(k) and mine.get(k) == theirs.get(k)]
            if same:
                suspects.append(Suspect(new.split("/", 1)[0], new.split("/")[1], old, new,
                                        " and ".join(WHY[k] for k in same)))
                taken.add(old)
                break
    return suspects


def _changed(want: Resource, have: Resource, now_text: str, applied: str | None = None) -> tuple[str, ...]:
    """The attributes in which live differs from desired. A grant without `start` opens from now: a live
    start in the past or none at all satisfies it, a start still to come does not (it would keep the door
    shut), and apply then sends now; unless the last apply made it from exactly these attributes (`applied`,
    its digest), when the start is the one the vendor gave it then (later than a `--now` in the past)."""
    changed = {k for k, v in want.attributes.items() if have.attributes.get(k) != v}
    start_key = access_of(want.kind, want.schema).start if want.is_grant else None
    if start_key and start_key not in want.attributes:
        start = have.attributes.get(start_key)
        if start and start > now_text and applied != digest(dict(want.attributes)):
            changed.add(start_key)
    return tuple(sorted(changed))


def _effects(change: Change, now_text: str) -> frozenset[Effect]:
    desired = change.desired.attributes if change.desired is not None and change.desired.status is not Status.ABSENT \
        else None
    live = change.live.attributes if change.live is not None else None
    return classify(change.action, change.kind, desired, live, now_text, change.resource.schema)


def _guards(changes: list[Change], managed: list[Resource], thresholds: Mapping[str, RevokeThreshold]
            ) -> tuple[Guard, ...]:
    revoking: dict[str, list[Change]] = defaultdict(list)
    for change in changes:
        if change.revokes and change.kind in GRANT_KINDS:
            revoking[change.system].append(change)
    counts: dict[str, int] = defaultdict(int)
    for resource in managed:
        counts[resource.system] += 1
    return tuple(Guard(system, len(found), counts[system], thresholds.get(system, RevokeThreshold()),
                       revocation_token(found)) for system, found in sorted(revoking.items()))


def _live_digest(resource: Resource) -> str:
    return digest([resource.id, dict(resource.attributes), str(resource.status)])


def _origin(change: Change, applied: Mapping[str, str], applied_systems: set[str]) -> str:
    """`drift` when the live system moved away from what apply last made it (or holds access nobody
    applied); `policy` when the YAML asks for something new; `unmanaged` for access found on a system
    reconciler has never applied to (the first plan): not in the policy, but not drift either."""
    last = applied.get(change.address)
    if change.live is not None and change.live.meta.get("not_in_effect"):
        return "not in effect"      # an acknowledged revocation that did not take effect: not drift
    if change.desired is None or change.desired.status is Status.ABSENT:
        # Undeclared live objects: ours once (removed from the policy) or never (made outside git).
        if last is not None or change.desired is not None or not change.resource.is_grant:
            return "policy"
        return "drift" if change.system in applied_systems else "unmanaged"
    return "drift" if last is not None and last == digest(dict(change.desired.attributes)) else "policy"


def _index_live(live: Iterable[Resource], wanted: Mapping[str, Resource], now_text: str) -> dict[str, Resource]:
    """Index live objects by the address of the desired object they stand for.

    A grant's slot (person, device, operation) can hold several live grants and, in the policy, several
    windows (`slot@start`). Each live grant goes to the desired window it already is (same address, or same
    attributes), then the rest are paired with the remaining windows in order of start (an update or
    replace), and what is left over is undeclared: the first keeps the slot's address, the others get
    `#<vendor id>` appended so that they are seen, and revoked or reported, rather than hidden (as a
    provider does for a live grant it knows is not the declared one)."""
    windows: dict[str, list[str]] = defaultdict(list)
    for address in wanted:
        windows[grant_slot(address)].append(address)
    by_slot: dict[str, list[Resource]] = defaultdict(list)
    found: dict[str, Resource] = {}
    for resource in live:
        if "#" in resource.name:
            found[resource.address] = resource    # the provider says it is not the declared grant
        else:
            by_slot[grant_slot(resource.address) if resource.is_grant else resource.address].append(resource)
    for slot, group in by_slot.items():
        group.sort(key=lambda r: (r.status is not Status.PRESENT, r.id or "", r.address))
        free = sorted(windows.get(slot, ()), key=lambda a: (wanted[a].attributes.get("start") or "", a))
        left: list[Resource] = []
        for have in group:            # already at a desired address (providers that keep ids by address)
            if have.address in free:
                free.remove(have.address)
                found[have.address] = have
            else:
                left.append(have)
        unpaired: list[Resource] = []
        for have in left:             # the window it is
            same = next((a for a in free if not _changed(wanted[a], have, now_text)), None)
            if same is None:
                unpaired.append(have)
            else:
                free.remove(same)
                found[same] = _renamed(have, same)
        unpaired.sort(key=lambda r: (r.status is not Status.PRESENT, r.attributes.get("start") or "", r.id or ""))
        for address, have in zip(free, unpaired, strict=False):    # a window moved: update the grant that held it
            found[address] = _renamed(have, address)
        for extra in unpaired[len(free):]:
            name = grant_slot(extra.name)
            if address_of(extra.system, extra.kind, name) in found:
                name = f"{name}#{extra.id}"
            found[address_of(extra.system, extra.kind, name)] = _renamed(
                extra, address_of(extra.system, extra.kind, name))
    return found


def _renamed(resource: Resource, address: str) -> Resource:
    name = address.split("/", 2)[2]
    return resource if resource.name == name else replace(resource, name=name)


def _has_expired(resource: Resource, now_text: str) -> bool:
    expires = resource.meta.get("expires")
    return resource.status is Status.PENDING and isinstance(expires, str) and expires <= now_text


def _pending_note(resource: Resource) -> Note:
    message = resource.meta.get("pending") or "the vendor has not finished this yet"
    return Note(resource.address, message, resource.system, resource.kind,
                tuple(sorted((k, v) for k, v in resource.meta.items() if k in ("expires", "state"))))


def _undeclared(have: Resource, mode: str) -> tuple[Change | None, Note | None]:
    details = (("id", have.id),) if have.id else ()
    if have.kind in GRANT_KINDS:
        if not have.managed:
            return None, None
        if mode == REVOKE:
            return Change(Action.DELETE, None, have), None
        return None, Note(have.address, "access not declared in policy; reported only (unmanaged: report)",
                          have.system, have.kind, details)
    if have.kind == Kind.USER:
        if have.managed:
            return Change(Action.DELETE, None, have), None
        return None, Note(have.address, "user not in policy; listed, never deleted", have.system, have.kind,
                          details)
    if have.kind in (Kind.DEVICE, Kind.GATEWAY):
        label = ", ".join(f"{k}={v}" for k, v in
                          [("name", have.attributes.get("name")), *sorted(have.meta.items())]
                          if v and k != "pending")
        reason = ("removed from policy; no longer managed and never deleted (keep the entry with "
                  "`decommission: true` to delete it)" if have.managed else
                  f"{have.kind} not in policy; listed, never deleted")
        reason += f" [{label}]" if label else ""
        return None, Note(have.address, reason, have.system, have.kind,
                          details + tuple(sorted((k, v) for k, v in have.meta.items() if k != "pending")))
    if have.kind == Kind.ASSOCIATION and have.managed:
        return Change(Action.DELETE, None, have), None
    return None, None
