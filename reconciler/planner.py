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
from dataclasses import replace
from datetime import datetime
from typing import Iterable, Mapping

from reconciler.plan import Action, Change, Note, Plan
from reconciler.resources import GRANT_KINDS, Kind, Resource, Status, digest, format_time

REVOKE, REPORT = "revoke", "report"


def plan(desired: Iterable[Resource], live: Iterable[Resource], *, now: datetime,
         unmanaged_modes: Mapping[str, str] | None = None, warnings: Iterable[Note] = (),
         applied: Mapping[str, str] | None = None) -> Plan:
    """`applied` (address → digest of the attributes apply last set, from state) lets the plan tell
    drift, a live change made outside git, from a change of the policy."""
    modes = unmanaged_modes or {}
    desired = list(desired)
    now_text = format_time(now)
    wanted = {r.address: r for r in desired}
    found = _index_live(live)
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
            end = want.attributes.get("end")
            if want.is_grant and end and end <= now_text:
                notes.append(Note(address, f"not created: its end {end} has passed", want.system, want.kind))
                continue
            changes.append(Change(Action.CREATE, want, None))
            continue
        changed = tuple(sorted(k for k, v in want.attributes.items() if have.attributes.get(k) != v))
        fixed = [k for k in changed if k in have.meta.get("create_only", ())]
        if fixed:
            notes.append(Note(address, f"{', '.join(fixed)} cannot be changed in place on this vendor "
                              f"(live {', '.join(f'{k}={have.attributes.get(k)}' for k in fixed)}); "
                              "remove the entry and add it again to re-create it", want.system, want.kind))
            changed = tuple(k for k in changed if k not in fixed)
        if have.status is Status.PENDING and not changed:
            pending.append(_pending_note(have))
            continue
        if changed:
            action = Action.REPLACE if want.replace_on_change else Action.UPDATE
            changes.append(Change(action, want, have, changed))

    for address, have in found.items():
        if address in wanted:
            continue
        change, note = _undeclared(have, modes.get(have.system, REVOKE))
        if change:
            changes.append(change)
        if note:
            unmanaged.append(note)

    managed_grants = sum(1 for r in found.values() if r.is_grant and r.managed and r.status is Status.PRESENT)
    changes = [replace(c, origin=_origin(c, applied or {})) for c in changes]
    live_digests = {c.address: _live_digest(c.live) for c in changes if c.live is not None}
    policy_digest = digest(sorted((r.address, dict(r.attributes), str(r.status), r.id) for r in desired))
    return Plan(now=now_text, changes=tuple(changes), pending=tuple(pending), unmanaged=tuple(unmanaged),
                warnings=tuple(notes), managed_grants=managed_grants, policy_digest=policy_digest,
                live_digests=live_digests)


def _live_digest(resource: Resource) -> str:
    return digest([resource.id, dict(resource.attributes), str(resource.status)])


def _origin(change: Change, applied: Mapping[str, str]) -> str:
    """`drift` when the live system moved away from what apply last made it (or holds access nobody
    applied); `policy` when the YAML asks for something new."""
    last = applied.get(change.address)
    if change.desired is None or change.desired.status is Status.ABSENT:
        # Undeclared live objects: ours once (removed from the policy) or never (made outside git).
        return "policy" if last is not None or change.desired is not None or not change.resource.is_grant \
            else "drift"
    return "drift" if last is not None and last == digest(dict(change.desired.attributes)) else "policy"


def _index_live(live: Iterable[Resource]) -> dict[str, Resource]:
    """Index by address; a second live object at one address (a duplicate grant made outside the
    policy) gets its vendor id appended so it is seen, and revoked or reported, rather than hidden."""
    by_address: dict[str, list[Resource]] = defaultdict(list)
    for resource in live:
        by_address[resource.address].append(resource)
    found: dict[str, Resource] = {}
    for address, group in by_address.items():
        group.sort(key=lambda r: (r.status is not Status.PRESENT, r.id or ""))
        found[address] = group[0]
        for extra in group[1:]:
            renamed = Resource(extra.system, extra.kind, f"{extra.name}#{extra.id}", extra.attributes,
                               id=extra.id, status=extra.status, meta=extra.meta, managed=extra.managed)
            found[renamed.address] = renamed
    return found


def _has_expired(resource: Resource, now_text: str) -> bool:
    expires = resource.meta.get("expires")
    return resource.status is Status.PENDING and bool(expires) and expires <= now_text


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
                          if v and k not in ("pending", "create_only"))
        reason = ("removed from policy; no longer managed and never deleted (keep the entry with "
                  "`decommission: true` to delete it)" if have.managed else
                  f"{have.kind} not in policy; listed, never deleted")
        reason += f" [{label}]" if label else ""
        return None, Note(have.address, reason, have.system, have.kind,
                          details + tuple(sorted((k, v) for k, v in have.meta.items() if k != "pending")))
    if have.kind == Kind.ASSOCIATION and have.managed:
        return Change(Action.DELETE, None, have), None
    return None, None
