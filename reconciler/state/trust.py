"""Whose state is this? Refuse to plan or apply with a state that belongs elsewhere or was lost.

Called by `reconciler.run` after every system has been read and before anything is planned, for any
state backend (a `StateStore`). Two checks:

- **Identity.** A state records, per policy system name, the vendor system apply last wrote to
  (vendor, endpoint and a digest of the account). A policy system that points somewhere else than what
  its state records is refused: the state's ids would be another system's.
- **A lost state is not a first run.** When the state knows nothing of a system while that system holds
  objects that look made by reconciler for this policy (a device with the name of a device the plan
  would create; an account nobody knows holding exactly the grant a policy user would get), planning
  would create them all again and revoke what the old accounts hold. That is refused with the way out:
  restore the state, or adopt what exists with `reconciler export`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from reconciler.errors import RefusedError
from reconciler.resources import Kind, Resource, Status
from reconciler.state.store import StateStore

SHOWN = 5


def check_state(state: StateStore, identities: Mapping[str, Mapping[str, str]], desired: Iterable[Resource],
                live: Iterable[Resource], *, by_secret: Iterable[str] = ()) -> list[str]:
    """Raise `RefusedError` (one line per system) when the state is another system's or lost. `by_secret`:
    systems whose identity is only a digest of their key; a changed digest there (a rotated key) is accepted
    when the live system holds the objects the state recorded. Returns what was accepted so, in words."""
    recorded: Mapping[str, Mapping[str, str]] = state.systems()
    where = state.location
    desired, live = list(desired), list(live)
    problems: list[str] = []
    accepted: list[str] = []
    rotatable = set(by_secret)
    for name, identity in sorted(identities.items()):
        before = recorded.get(name)
        if before is not None:
            evidence = _evidence(name, state, live) if name in rotatable and dict(before) != dict(identity) \
                and all(before.get(k) == identity.get(k) for k in ("vendor", "url")) else None
            if evidence is not None and evidence[0] and evidence[0] * 2 >= evidence[1]:
                accepted.append(f"{name}: the key changed (identity {before.get('account')} → "
                                f"{identity.get('account')}); accepted on evidence: the live system holds "
                                f"{evidence[0]} of the {evidence[1]} objects the state recorded (found "
                                f"{evidence[0]} of {evidence[1]}); apply records the new identity")
            elif dict(before) != dict(identity):
                found = (f" (found {evidence[0]} of the {evidence[1]} objects the state recorded)"
                         if evidence is not None else "")
                problems.append(
                    f"{name}: the state {where} belongs to {_describe(before)}, but the policy's {name} is "
                    f"{_describe(identity)}{found}; refusing to use another system's state. Point --state at the "
                    f"state of this system, or use a new state file and adopt what it holds with "
                    f"`reconciler export {name}`")
            stranger = _another_policy(name, state, desired)
            if stranger:
                problems.append(stranger)
            continue
        if any(True for _ in state.items(f"{name}/")):
            continue   # written before identities were recorded: the next apply records it
        suspects = look_managed(name, desired, live)
        if suspects:
            shown = "; ".join(suspects[:SHOWN]) + (f"; and {len(suspects) - SHOWN} more"
                                                   if len(suspects) > SHOWN else "")
            previous = state.previous_path
            restore = (f"restore the state file (a previous snapshot may be at {previous})" if previous
                       else "restore the state")
            problems.append(
                f"{name}: the state {where} knows nothing of this system, yet the system holds objects that "
                f"look made by reconciler for this policy: {shown}. This is not a first run: planning now "
                f"would create them again and leave the old ones with their access. Refusing; {restore}, "
                f"or adopt what exists with `reconciler export {name}` and plan again")
    if problems:
        raise RefusedError("\n".join(problems))
    return accepted


def _evidence(name: str, state: StateStore, live: list[Resource]) -> tuple[int, int]:
    """How many of the vendor ids the state recorded for `name` the live system holds, of how many."""
    recorded = {str(record["id"]) for _, record in state.items(f"{name}/") if record.get("id")}
    held = {str(r.id) for r in live if r.system == name and r.id is not None}
    return len(recorded & held), len(recorded)


def _another_policy(name: str, state: StateStore, desired: list[Resource]) -> str | None:
    """A state whose accounts, devices and gateways on this system are none of this policy's was written
    by another policy (another team's, on the same account): planning with it would offboard them all."""
    kinds = {Kind.USER, Kind.DEVICE, Kind.GATEWAY}
    known = {a for a, _ in state.items(f"{name}/") if a.split("/")[1] in kinds}
    declared = {r.address for r in desired if r.system == name}
    if not known or known & declared:
        return None
    where = state.location
    return (f"{name}: the state {where} was written by another policy: none of the {len(known)} users, devices "
            f"and gateways it made on this system ({', '.join(sorted(known)[:SHOWN])}"
            f"{' …' if len(known) > SHOWN else ''}) is in this policy, so planning would offboard them all. "
            "Refusing; use this policy's own state file (--state). If this policy really replaces every one "
            "of them, remove them from the old policy and apply that first")


def look_managed(system: str, desired: list[Resource], live: list[Resource]) -> list[str]:
    """Live objects nobody knows that match what the policy would create in `system`."""
    wanted = [r for r in desired if r.system == system and r.status is Status.PRESENT]
    strangers = [r for r in live if r.system == system and not r.managed]
    found: list[str] = []
    to_create_devices = {r.attributes.get("name"): r for r in wanted
                         if r.kind == Kind.DEVICE and not r.id and r.attributes.get("name")}
    for have in strangers:
        want = to_create_devices.get(have.attributes.get("name")) if have.kind == Kind.DEVICE else None
        if want is not None:
            found.append(f"device {have.attributes.get('name')!r} (id {have.id}) has the name of "
                         f"devices.{want.name}")
    # Grants of the users the plan would create, by everything but the user: (kind, rest of name).
    new_users = {r.name for r in wanted if r.kind == Kind.USER and not r.id}
    shapes: dict[tuple[str, str], list[Resource]] = defaultdict(list)
    for grant in wanted:
        user, _, rest = grant.name.partition("/")
        if grant.is_grant and user in new_users and rest:
            shapes[(grant.kind, rest)].append(grant)
    unknown_users = {r.name for r in strangers if r.kind == Kind.USER}
    matched: dict[str, set[str]] = defaultdict(set)
    for grant in (r for r in live if r.system == system and r.is_grant):
        user, _, rest = grant.name.partition("/")
        if user in unknown_users:
            for want in shapes.get((grant.kind, rest), ()):
                if all(grant.attributes.get(k) == v for k, v in want.attributes.items() if v is not None):
                    matched[user].add(want.name.partition("/")[0])
    for user, policy_users in sorted(matched.items()):
        found.append(f"account {user} holds exactly the access the plan would give new "
                     f"{'/'.join(sorted(policy_users))}")
    return found


def _describe(identity: Mapping[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(identity.items()))
