"""What each CLI command does, as plain functions: load, read, plan, apply.

Called only by `cli.py`, which parses options and maps errors to exit codes. Kept apart so tests and
other front ends (CI jobs) run the same workflow without click.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from reconciler import planner
from reconciler.access import AccessRow, Admin, rows_from_live, rows_from_policy, select
from reconciler.applier import ApplyReport, apply_plan, check_mass_revoke
from reconciler.bulk import paused_collection
from reconciler.errors import PlanError, ReconcilerError, RefusedError, StateError
from reconciler.plan import FORMAT_VERSION, OPTIONAL_CHANGE_KEYS, Change, Note, Plan, changes_checksum
from reconciler.policy import Policy, load_policy
from reconciler.providers.base import Event, Provider, ReadResult
from reconciler.providers.factory import build_provider, capabilities
from reconciler.state import LocalState
from reconciler.state import open_state as open_store
from reconciler.state.guard import check_state

log = logging.getLogger(__name__)


def wall_clock() -> datetime:
    """The one reading of the wall clock in the product. Everything else takes the session's clock."""
    return datetime.now(UTC)


@dataclass
class Session:
    """Inputs shared by every command.

    `now` is the moment the session plans as of: the wall clock when the session starts, or a pinned
    time (`--now`, tests). `clock()` is what providers and embedded sandboxes read during the run: a
    pinned session stays at `now`; a real one advances from `now` on the monotonic clock, so a long
    apply never sees time jump back or forth with the machine's clock.
    """

    directory: Path
    state_path: Path
    env: Mapping[str, str]
    now: datetime | None = None
    state_url: str | None = None           # postgresql://… : the shared state; state_path is then unused
    lock_timeout: float = 0.0              # seconds apply waits for another apply's lock
    transports: Mapping[str, Any] = field(default_factory=dict)   # system → httpx transport (tests)
    provider_options: Mapping[str, Any] = field(default_factory=dict)
    # From the operator, never the policy: hosts a system may name, extra credential variable names.
    allowed_hosts: tuple[str, ...] = ()
    allowed_credentials: tuple[str, ...] = ()
    # Reading progress: (None, 0, systems) when the reads start, then (system, objects read, systems) as each ends.
    on_read: Callable[[str | None, int, int], None] | None = None
    _started: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.now is None:
            self.now = wall_clock()
            self._started = time.monotonic()

    @property
    def sandbox_dir(self) -> Path:
        return self.state_path.parent / "sandbox"

    @property
    def at(self) -> datetime:
        """The moment the session plans as of: `now`, which `__post_init__` always sets."""
        assert self.now is not None
        return self.now

    def clock(self) -> datetime:
        if self._started is None:
            return self.at
        return self.at + timedelta(seconds=time.monotonic() - self._started)


def running_clock(start: datetime) -> Callable[[], datetime]:
    """A clock that reads `start` now and advances on the monotonic clock: a served sandbox's vendor
    time under `sandbox serve --now`."""
    started = time.monotonic()
    return lambda: start + timedelta(seconds=time.monotonic() - started)


def open_state(session: Session) -> Any:
    """The session's state store: PostgreSQL when a URL was given, else the local file."""
    return open_store(session.state_url or session.state_path, lock_timeout=session.lock_timeout)


def validate(session: Session) -> Policy:
    return load_policy(session.directory, capabilities(), session.env, allowed_hosts=session.allowed_hosts,
                       allowed_credentials=session.allowed_credentials)


def schema() -> dict[str, Any]:
    """The JSON Schema of one policy file, with every installed vendor's settings and credential keys."""
    from reconciler.policy.json_schema import policy_json_schema

    return policy_json_schema(capabilities())


def build_providers(session: Session, policy: Policy, state: Any) -> dict[str, Provider]:
    options = {"clock": session.clock, **session.provider_options}
    return {name: build_provider(system, state, sandbox_dir=session.sandbox_dir,
                                 transport=session.transports.get(name), **options)
            for name, system in sorted(policy.systems.items())}


def read_live(policy: Policy, providers: Mapping[str, Provider],
              on_read: Callable[[str | None, int, int], None] | None = None) -> dict[str, ReadResult]:
    """Read every system in bulk, all systems at once; a read that makes a plan impossible is an error.
    `on_read` is told when the reads start and as each system's ends (see `Session.on_read`)."""
    desired = policy.resources

    def read(name: str) -> Any:
        result = providers[name].read(desired)
        if on_read:
            on_read(name, len(result.resources), len(providers))
        return result

    if on_read:
        on_read(None, 0, len(providers))
    with ThreadPoolExecutor(max(1, len(providers))) as pool:
        reads = dict(zip(providers, pool.map(read, providers), strict=False))
    problems = [e for result in reads.values() for e in result.errors]
    if problems:
        raise PlanError(problems)
    return reads


@paused_collection
def make_plan(session: Session, policy: Policy, providers: Mapping[str, Provider],
              applied: Mapping[str, str] | None = None, *, state: Any = None) -> Plan:
    """Read every system in bulk, all systems at once, then diff. With `state`, first refuse a state
    that belongs to another system or was lost (`state.guard`)."""
    desired = policy.resources
    reads = read_live(policy, providers, session.on_read)
    live = [r for result in reads.values() for r in result.resources]
    if state is not None:
        check_state(state, {name: p.identity() for name, p in providers.items()}, desired, live)
    notes = [Note(str(d.location), d.message) for d in policy.warnings]
    notes += [n for result in reads.values() for n in result.warnings]
    modes = {name: system.unmanaged for name, system in policy.systems.items()}
    thresholds = {name: system.mass_revoke for name, system in policy.systems.items()}
    return planner.plan(desired, live, now=session.at, unmanaged_modes=modes, warnings=notes, applied=applied,
                        thresholds=thresholds)


def plan(session: Session) -> Plan:
    policy = validate(session)
    state = open_state(session)
    providers = build_providers(session, policy, state)
    try:
        return make_plan(session, policy, providers, state.applied(), state=state)
    finally:
        _close(providers)


def apply(session: Session, *, saved: Mapping[str, Any] | None, approve: Callable[[Plan], bool],
          allow_mass_revoke: bool = False, on_plan: Callable[[Plan], None] | None = None,
          on_change: Callable[[Change, str | None], None] | None = None,
          stop: threading.Event | None = None) -> tuple[Plan, ApplyReport | None]:
    """Plan under the state lock, check it against a saved plan, ask, execute. Returns the report, or
    None when there was nothing to do or approval was declined. Setting `stop` (Ctrl-C) sends nothing
    new; the report then says what was applied, what is uncertain and what remains."""
    policy = validate(session)
    state = open_state(session)
    with state:
        providers = build_providers(session, policy, state)
        if stop is not None:
            for provider in providers.values():
                provider.stop = stop
        try:
            fresh = make_plan(session, policy, providers, state.applied(), state=state)
            for name, provider in providers.items():
                state.set_system(name, provider.identity())
            if saved is not None:
                check_saved(saved, fresh)
            if on_plan:
                on_plan(fresh)
            if not fresh.has_changes:
                for provider in providers.values():
                    provider.commit_reads()
                return fresh, None
            check_mass_revoke(fresh, allow_mass_revoke)
            if not approve(fresh):
                return fresh, None
            report = apply_plan(fresh, providers, allow_mass_revoke=allow_mass_revoke,
                                concurrency={n: s.concurrency for n, s in policy.systems.items()},
                                on_change=on_change, stop=stop)
            return fresh, report
        finally:
            _close(providers)


def forget(session: Session, address: str) -> dict[str, Any]:
    """Drop what the state remembers about one address (an unsettled create an operator has checked by
    hand: none of the candidates is ours). Returns the record dropped."""
    state = open_state(session)
    with state:
        record = state.get(address)
        if record is None:
            known = [a for a, _ in state.items(address.split("/", 1)[0] + "/")]
            raise ReconcilerError(f"the state {state.location} holds nothing for {address!r}"
                                  + (f" (it holds {_some(known)})" if known else ""))
        state.delete(address)
        return record


def access(session: Session, *, user: str | None = None, device: str | None = None, at: datetime | None = None,
           live: bool = False) -> tuple[list[AccessRow], list[Admin]]:
    """Effective access from the policy, or with `live` from what the systems hold (names resolved through
    policy and state); only what is open at `at` when given. Reads nothing from the state but ids."""
    policy = validate(session)
    if live:
        state = LocalState(session.state_path)
        providers = build_providers(session, policy, state)
        try:
            reads = read_live(policy, providers)
        finally:
            _close(providers)
        found = [r for result in reads.values() for r in result.resources]
        rows, admins = rows_from_live(found, policy.resources, policy.emails)
    else:
        rows, admins = rows_from_policy(policy.resources, policy.emails)
    admins = [a for a in admins if (user is None or a.user == user) and device is None]
    return select(rows, user=user, device=device, at=at), admins


def events(session: Session, system: str, device: str) -> list[Event]:
    """The audit trail of one managed device, read through its system's provider."""
    policy = validate(session)
    if system not in policy.systems:
        raise ReconcilerError(f"no system {system!r} in the policy (systems: {', '.join(sorted(policy.systems))})")
    wanted = next((r for r in policy.resources if r.system == system and r.kind == "device" and r.name == device),
                  None)
    if wanted is None:
        raise ReconcilerError(f"no device {device!r} on system {system!r} in the policy")
    state = open_state(session)
    providers = build_providers(session, policy, state)
    try:
        provider = providers[system]
        provider.read(policy.resources)
        return provider.events(wanted)
    finally:
        _close(providers)


def push_state(session: Session, source: Path, *, force: bool = False) -> int:
    """Move a local state file into the shared PostgreSQL state, under both locks; returns how many records
    moved. A database state that already holds records is replaced only with `force`."""
    if not session.state_url:
        raise StateError("state push moves a local state file into PostgreSQL: give --state postgresql://… "
                         "(or set RECONCILER_STATE)")
    local = LocalState(source)
    if not (local.path.is_file() or local.journal_path.is_file()):
        raise StateError(f"no state file at {source}")
    local.lock()
    try:
        data = local.snapshot()
        with open_state(session) as target:
            held = sum(1 for _ in target.items())
            if held and not force:
                raise RefusedError(f"refused: the state {target.location} already holds {held} records; pull it "
                                   "first (`reconciler state pull`) or pass --force to replace it")
            target.replace(data)
    finally:
        local.unlock()
    return len(data["resources"])


def pull_state(session: Session) -> dict[str, Any]:
    """The whole state in the local file's format, from whichever store the session names."""
    return open_state(session).snapshot()


class SavedPlan:
    """A plan read back from its JSON (`plan --out`): what the renderers need of a `Plan` (its `to_dict()`),
    for `reconciler show`."""

    def __init__(self, data: dict[str, Any]):
        self._data = data

    def to_dict(self) -> dict[str, Any]:
        return self._data


def load_saved(path: Path) -> dict[str, Any]:
    """A saved plan, checked before anything else is done with it: readable, a plan of the format this version
    reads, and not edited by hand (its changes still give its checksum). An edit is refused, never dropped
    silently: apply runs what the checksum names, so an edited file would not run as the user meant."""
    name = path.name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RefusedError(f"refused: cannot read plan {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("changes"), list) \
            or not all(isinstance(c, dict) for c in data["changes"]):
        raise RefusedError(f"refused: {path} is not a reconciler plan (made by `reconciler plan --out`)")
    if data.get("format_version") != FORMAT_VERSION:
        raise RefusedError(f"refused: {name} has format_version {data.get('format_version')!r}; this version reads "
                           f"{FORMAT_VERSION}; run plan again")
    found = changes_checksum(data["changes"])
    if found != data.get("checksum"):
        counted = sum(v for v in (data.get("summary") or {}).values() if isinstance(v, int))
        listed = len(data["changes"])
        what = (f"it lists {listed} changes where its summary counts {counted}" if counted != listed
                else "its changes do not match its checksum")
        raise RefusedError(f"refused: {name} was edited: {what} ({found} from the changes, "
                           f"{data.get('checksum')} recorded); an edited plan is never applied. Nothing was sent; "
                           "run plan again")
    for change in data["changes"]:
        for key in OPTIONAL_CHANGE_KEYS:     # a plan saved before every key was written
            change.setdefault(key, None)
    return data


def check_saved(saved: Mapping[str, Any], fresh: Plan) -> None:
    """A saved plan is executed only if planning again now gives exactly the same changes; otherwise
    it is refused with what moved: the policy, or the live state of resources it touches."""
    if saved.get("format_version") != FORMAT_VERSION:
        raise RefusedError(f"refused: the saved plan has format_version {saved.get('format_version')!r}; "
                           f"this version reads {FORMAT_VERSION}")
    if saved.get("checksum") == fresh.checksum():
        return
    reasons = []
    digests = saved.get("digests") or {}
    if digests.get("policy") and digests["policy"] != fresh.policy_digest:
        reasons.append("the policy changed since the plan was made")
    saved_live = digests.get("live") or {}
    moved = sorted(a for a, d in saved_live.items() if fresh.live_digests.get(a, d) != d)
    saved_addresses = {c.get("address") for c in saved.get("changes", [])}
    fresh_addresses = {c.address for c in fresh.changes}
    gone = sorted(saved_addresses - fresh_addresses)
    new = sorted(fresh_addresses - saved_addresses)
    if moved:
        reasons.append(f"the live state changed for {_some(moved)}")
    if gone:
        reasons.append(f"no longer needed: {_some(gone)}")
    if new:
        reasons.append(f"now also needed: {_some(new)}")
    if not reasons:
        reasons.append("the changes differ")
    raise RefusedError(f"refused: the saved plan is stale ({fresh.checksum()} now, {saved.get('checksum')} "
                       f"saved): {'; '.join(reasons)}. Nothing was sent; make a new plan and review it")


def _some(addresses: list[str], limit: int = 5) -> str:
    return ", ".join(addresses[:limit]) + (f" and {len(addresses) - limit} more" if len(addresses) > limit else "")


def _close(providers: Mapping[str, Provider]) -> None:
    for provider in providers.values():
        provider.close()
