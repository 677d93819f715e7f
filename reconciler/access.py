"""Effective access: who can open which door, when, through which group, and where the policy says so.

`run.access` calls `rows_from` with the desired resources of a loaded policy (the default) or with what
the providers read from the live systems (`--live`), then `select` to filter by user, device and moment;
`render.render_access` formats the rows. Pure: no I/O and no clock (the moment is an argument).

Rows are what an auditor asks about: one per person, door and window (operations of one window together),
with its weekly schedule, the group it comes through (`via`) and the policy line it comes from (`source`).
Live rows are matched to the policy by person, door and window; live access the policy does not declare is
marked `live_only`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, tzinfo
from typing import Any

from reconciler.plan import access_of
from reconciler.resources import GRANT_KINDS, Kind, Resource, Status, grant_parts, grant_slot, kind_def, parse_time

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
ANYONE = "*"    # a public temporary key: anyone with the link


@dataclass(frozen=True)
class AccessRow:
    user: str
    system: str
    device: str
    start: str | None                      # None: from when it was granted
    end: str | None                        # None: no end
    via: str                               # "user" (named directly), "group:ops", "temp_key:cleaning" …
    source: str | None                     # `file:line` of the policy entry; None for live-only access
    operations: tuple[str, ...] = ()       # operations; empty where the vendor has none
    role: str | None = None                # share role, where the vendor has roles
    schedule: tuple[tuple[str, str, str], ...] | None = None   # (day, from, to) spans; None: any time
    live_only: bool = False                # found live, not declared in the policy
    status: str = "present"                # or "pending": the vendor has not finished it (cannot open yet)
    kind: str = field(default="permission", compare=False)
    residual: bool = False                 # revoked, yet a key already on the phone may open offline until `end`

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.residual:
            del data["residual"]           # marked only where true: the rows as before otherwise
        data["operations"] = list(self.operations)
        data["schedule"] = None if self.schedule is None else [
            {"day": d, "from": f, "to": t} for d, f, t in self.schedule]
        return data


@dataclass(frozen=True)
class Admin:
    """An account that can grant itself any door of its system (an account with `role: ADMIN`)."""

    user: str
    system: str
    source: str | None = None
    live_only: bool = False


def _schedule(value: Any) -> tuple[tuple[str, str, str], ...] | None:
    if not value:
        return None
    return tuple((span["day"], span["from"], span["to"]) for span in value)


def _user_of(name: str) -> str:
    return grant_parts(name)[0]


def _grant_rows(resource: Resource, *, via: str, source: str | None, live_only: bool,
                emails: Mapping[str, str], devices: Mapping[tuple[str, str], str] | None = None) -> list[AccessRow]:
    attrs = resource.attributes
    status = "pending" if resource.status is Status.PENDING else "present"
    if resource.kind == Kind.TEMP_KEY:
        if attrs.get("access") == "public":
            people = [ANYONE]
        else:
            people = [emails.get(email, email) for email in attrs.get("users") or ()]
        if resource.meta.get("status") in ("expired", "used-up"):
            status = str(resource.meta["status"])     # the vendor says it no longer opens
        lock = str(resource.meta.get("lock") or "")
        device = next((d.rsplit("/", 1)[-1] for d in resource.depends_on if f"/{Kind.DEVICE}/" in d),
                      (devices or {}).get((resource.system, lock), lock))
        return [AccessRow(user=person, system=resource.system, device=device, start=attrs.get("start"),
                          end=attrs.get("end"), via=f"temp_key:{resource.name}", source=source,
                          live_only=live_only, status=status, kind=resource.kind) for person in people]
    parts = grant_parts(resource.name)
    operations = (parts[2],) if len(parts) > 2 else ()
    return [AccessRow(user=parts[0], system=resource.system, device=parts[1], start=attrs.get("start"),
                      end=attrs.get("end"), via=via, source=source, operations=operations,
                      role=attrs.get("role"), schedule=_schedule(attrs.get("schedule")), live_only=live_only,
                      status=status, kind=resource.kind)]


def _via(resource: Resource) -> str:
    return ", ".join(resource.meta.get("via") or ()) or "user"


def _merged(rows: Iterable[AccessRow]) -> list[AccessRow]:
    """One row per person, door and window: the operations of one window together."""
    merged: dict[tuple[Any, ...], AccessRow] = {}
    for row in rows:
        key = (row.user, row.system, row.device, row.start, row.end, row.via, row.source, row.role, row.schedule,
               row.live_only, row.status)
        first = merged.get(key)
        if first is None:
            merged[key] = row
        else:
            merged[key] = AccessRow(**{**asdict(first), "operations": tuple(sorted(set(first.operations)
                                                                                     | set(row.operations))),
                                       "schedule": first.schedule, "kind": first.kind})
    return sorted(merged.values(), key=lambda r: (r.user, r.system, r.device, r.start or "", r.operations))


def rows_from_policy(desired: Iterable[Resource], emails: Mapping[str, str]) -> tuple[list[AccessRow], list[Admin]]:
    rows: list[AccessRow] = []
    admins: list[Admin] = []
    for resource in desired:
        if resource.status is Status.ABSENT:
            continue
        if _privileged(resource):
            admins.append(Admin(resource.name, resource.system, resource.source))
        elif resource.kind in GRANT_KINDS:
            rows += _grant_rows(resource, via=_via(resource), source=resource.source, live_only=False,
                                emails=emails)
    return _merged(rows), sorted(admins, key=lambda a: (a.user, a.system))


def _privileged(resource: Resource) -> bool:
    """An account holding a privileged value (`Attribute.privilege`: an ADMIN), which can grant itself any door."""
    return kind_def(resource.kind).holder and any(
        resource.attributes.get(name) in values for name, values in access_of(resource.kind, resource.schema).privilege)


def _same_window(live: Resource, want: Resource) -> bool:
    """The same grant: equal in every field that moves access (`Attribute.access`), the start only when the
    policy gives one."""
    fields = access_of(want.kind, want.schema)
    keys = [name for name, _ in (*fields.ordered, *fields.compared)]
    if fields.end:
        keys.append(fields.end)
    if any(live.attributes.get(k) != want.attributes.get(k) for k in keys if k in want.attributes):
        return False
    start = fields.start
    return start is None or start not in want.attributes or live.attributes.get(start) == want.attributes.get(start)


def rows_from_live(live: Iterable[Resource], desired: Iterable[Resource], emails: Mapping[str, str]
                   ) -> tuple[list[AccessRow], list[Admin]]:
    """Live grants, each matched to the declared grant it stands for (same person, door and window, or the
    only declared window of that person and door) for its group and policy line; the rest are live-only."""
    declared: dict[str, list[Resource]] = {}
    for want in desired:
        if want.kind in GRANT_KINDS and want.status is not Status.ABSENT:
            declared.setdefault(grant_slot(want.address), []).append(want)
    declared_users = {(r.system, r.name) for r in desired if r.kind == Kind.USER}
    live = list(live)
    devices = {(r.system, str(r.id)): r.name for r in live if r.kind == Kind.DEVICE and r.id is not None}
    rows: list[AccessRow] = []
    admins: list[Admin] = []
    for resource in live:
        if _privileged(resource):
            admins.append(Admin(resource.name, resource.system,
                                live_only=(resource.system, resource.name) not in declared_users))
        if resource.kind not in GRANT_KINDS:
            continue
        candidates = declared.get(grant_slot(resource.address), [])
        match = next((w for w in candidates if _same_window(resource, w)), None)
        if match is None and len(candidates) == 1:
            match = candidates[0]
        if match is None:
            rows += _grant_rows(resource, via="live only", source=None, live_only=True, emails=emails,
                                devices=devices)
        else:
            rows += _grant_rows(resource, via=_via(match), source=match.source, live_only=False, emails=emails,
                                devices=devices)
    return _merged(rows), sorted(admins, key=lambda a: (a.user, a.system))


def is_open(row: AccessRow, at: datetime, zone: tzinfo | None = None) -> bool:
    """Whether the row lets its person in at `at`: inside the window, inside a weekly span (read in the site's
    time `zone` when given, else in the zone `at` is given in), and not still pending at the vendor."""
    if zone is not None:
        at = at.astimezone(zone)
    if row.status != "present":
        return False
    if row.start and parse_time(row.start) > at:
        return False
    if row.end and parse_time(row.end) <= at:
        return False
    if row.schedule is None:
        return True
    day, clock = DAYS[at.weekday()], at.strftime("%H:%M")
    return any(d == day and start <= clock < end for d, start, end in row.schedule)


def select(rows: Iterable[AccessRow], *, user: str | None = None, device: str | None = None,
           at: datetime | None = None, zones: Mapping[str, tzinfo] | None = None) -> list[AccessRow]:
    """`zones`: each system's time zone (`timezone:`), in which its weekly spans are read."""
    return [row for row in rows if (user is None or row.user == user) and (device is None or row.device == device)
            and (at is None or is_open(row, at, (zones or {}).get(row.system)))]
