"""What each CLI command does, as plain functions: load, read, plan, apply.

Called only by `cli.py`, which parses options and maps errors to exit codes. Kept apart so tests and
other front ends (CI jobs) run the same workflow without click.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from reconciler import planner
from reconciler.access import AccessRow, Admin, rows_from_live, rows_from_policy, select
from reconciler.applier import ApplyReport, apply_plan, check_mass_revoke
from reconciler.bulk import paused_collection
from reconciler.enforce_wait import WaitResult
from reconciler.errors import PlanError, PolicyError, ReconcilerError, RefusedError, StateError
from reconciler.plan import (
    FORMAT_VERSION,
    OPTIONAL_CHANGE_KEYS,
    Change,
    Note,
    Plan,
    changes_checksum,
    enforcement_of,
    exposure_line,
    renamed_address,
)
from reconciler.policy import Policy, load_policy
from reconciler.providers.base import Event, Provider, ReadResult
from reconciler.providers.factory import build_provider, capabilities
from reconciler.resources import KindSchema, format_time
from reconciler.state import LocalState, StateStore
from reconciler.state import open_state as open_store
from reconciler.state.local import (
    REVISION,
    evidence_note,
    evidence_notes,
    residual_of,
    revision_of,
    select_system,
    system_note,
)
from reconciler.state.trust import check_state
from reconciler.text import printable

log = logging.getLogger(__name__)


def wall_clock() -> datetime:
    """The one reading of the wall clock in the product. Everything else takes the session's clock."""
    return datetime.now(UTC)


class SessionClock:
    """A session's time, the one way to read it. `start` is the moment the session plans as of; calling the
    clock reads the time now, which providers and embedded sandboxes do during the run. A pinned clock
    (`--now`, tests) stays at `start`; a running one advances from `start` on the monotonic clock, so a long
    apply never sees time jump back or forth with the machine's clock."""

    def __init__(self, start: datetime, *, running: bool):
        self.start = start
        self._origin = time.monotonic() if running else None

    def __call__(self) -> datetime:
        if self._origin is None:
            return self.start
        return self.start + timedelta(seconds=time.monotonic() - self._origin)


@dataclass
class Session:
    """Inputs shared by every command. Its time is `clock` (a `SessionClock`): `clock.start` is the moment
    it plans as of, `clock()` the time now. `now` is only the input that pins it (`--now`, tests); left
    None, the clock starts at the wall clock and runs.
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
    # The revision being applied (`--revision`/RECONCILER_REVISION): COMMIT, or COMMIT@TIME (Unix seconds or
    # ISO 8601) where the policy directory is not a git work tree holding that commit.
    revision: str | None = None
    # `--target`: systems (SYSTEM) or addresses (SYSTEM/KIND/NAME) the run is limited to; () is everything.
    targets: tuple[str, ...] = ()
    clock: SessionClock = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.clock = SessionClock(self.now, running=False) if self.now is not None else \
            SessionClock(wall_clock(), running=True)

    @property
    def sandbox_dir(self) -> Path:
        return self.state_path.parent / "sandbox"


def running_clock(start: datetime) -> SessionClock:
    """A clock that reads `start` now and advances on the monotonic clock: a served sandbox's vendor
    time under `sandbox serve --now`."""
    return SessionClock(start, running=True)


def open_state(session: Session) -> StateStore:
    """The session's state store: PostgreSQL when a URL was given, else the local file."""
    return open_store(session.state_url or session.state_path, lock_timeout=session.lock_timeout)


def validate(session: Session) -> Policy:
    policy = load_policy(session.directory, capabilities(), session.env, allowed_hosts=session.allowed_hosts,
                         allowed_credentials=session.allowed_credentials)
    if policy.rules:
        from reconciler.assertions import check_rules

        broken = check_rules(policy)
        if broken:
            raise PolicyError(broken)
    return policy


def test(session: Session, *, live: bool = False) -> tuple[Policy, list[Any]]:
    """The policy's assertions evaluated against the policy (or, `live`, what the systems hold); the rules are
    checked by `validate` on the way (a broken rule is a PolicyError)."""
    from reconciler.assertions import evaluate_assertions, zones_of

    policy = validate(session)
    rows, _ = access(session, live=True) if live else rows_from_policy(policy.resources, policy.emails)
    return policy, evaluate_assertions(policy.assertions, rows, zones_of(policy))


# ------------------------------------------------------------------------------------------------ targets

def target_systems(policy: Policy, targets: tuple[str, ...]) -> list[str]:
    """The systems `--target` names (a SYSTEM, or the system of a SYSTEM/KIND/NAME address), sorted;
    every system when there is no target. An unknown system is an error: nothing is read or sent."""
    if not targets:
        return sorted(policy.systems)
    found = set()
    for target in targets:
        system = target.split("/", 1)[0]
        if system not in policy.systems or target.endswith("/") \
                or printable(target) != target or ("/" in target and target.count("/") < 2):
            raise ReconcilerError(f"--target {printable(target)!r}: expected SYSTEM or SYSTEM/KIND/NAME of a system "
                                  f"in the policy (systems: {', '.join(sorted(policy.systems))})")
        found.add(system)
    return sorted(found)


def targeted(policy: Policy, targets: tuple[str, ...]) -> Policy:
    """The policy limited to the targeted systems: what is read, planned, locked and applied."""
    if not targets:
        return policy
    keep = set(target_systems(policy, targets))
    return replace(policy, systems={n: s for n, s in policy.systems.items() if n in keep},
                   resources=[r for r in policy.resources if r.system in keep],
                   renames=[r for r in policy.renames if r.system in keep],
                   evidence={a: e for a, e in policy.evidence.items() if a.split("/", 1)[0] in keep})


def limit_plan(plan: Plan, targets: tuple[str, ...], desired: list[Any], live: list[Any]) -> Plan:
    """A targeted plan: its changes limited to the targeted systems and addresses (and what a targeted
    address depends on, transitively), saying which targets it covers (`targets`: it is partial). The guards
    stay as judged on the whole of each targeted system, so a partial plan refuses whatever the whole would."""
    if not targets:
        return plan
    systems = {t for t in targets if "/" not in t}
    addresses = {t for t in targets if "/" in t}
    depends: dict[str, tuple[str, ...]] = {}
    for resource in [*live, *desired]:
        depends[resource.address] = tuple(resource.depends_on)
    wanted: set[str] = set()
    todo = list(addresses)
    while todo:
        address = todo.pop()
        if address not in wanted:
            wanted.add(address)
            todo.extend(depends.get(address, ()))
    changes = tuple(c for c in plan.changes if c.system in systems or c.address in wanted)
    kept = {c.address for c in changes}
    return replace(plan, changes=changes, targets=tuple(sorted(targets)),
                   live_digests={a: d for a, d in plan.live_digests.items() if a in kept})


def schema() -> dict[str, Any]:
    """The JSON Schema of one policy file, with every installed vendor's settings and credential keys."""
    from reconciler.policy.json_schema import policy_json_schema

    return policy_json_schema(capabilities())


def build_providers(session: Session, policy: Policy, state: StateStore) -> dict[str, Provider]:
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
    pool = ThreadPoolExecutor(max(1, len(providers)), thread_name_prefix="read")
    try:
        reads = dict(zip(providers, pool.map(read, providers), strict=False))
    except BaseException:
        # Ctrl-C (or a failed read): every other read stops at its next chunk or request, and nobody waits
        # for them: a read blocked on a silent vendor would hold the caller until its request timeout. The
        # reads send nothing that changes anything; the CLI leaves whatever is still blocked behind.
        for provider in providers.values():
            provider.stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    problems = [e for result in reads.values() for e in result.errors]
    if problems:
        raise PlanError(problems)
    return reads


@paused_collection
def make_plan(session: Session, policy: Policy, providers: Mapping[str, Provider],
              applied: Mapping[str, str] | None = None, *, state: StateStore | None = None,
              renamed: list[tuple[str, str]] | None = None) -> Plan:
    """Read every system in bulk, all systems at once, then diff. With `state`, first refuse a state
    that belongs to another system or was lost (`state.trust`)."""
    desired = policy.resources
    if renamed is None:
        renamed = _renamed(state, policy) if state is not None else []
    reads = read_live(policy, providers, session.on_read)
    live = [r for result in reads.values() for r in result.resources]
    accepted: list[str] = []
    if state is not None:
        accepted = check_state(state, {name: p.identity() for name, p in providers.items()}, desired, live,
                               by_secret=[name for name, p in providers.items() if p.identified_by_secret()])
        applied = state.applied()
    notes = [Note(text.split(":", 1)[0], text.split(": ", 1)[1]) for text in accepted]
    notes += [Note(str(d.location), d.message) for d in policy.warnings]
    notes += [n for result in reads.values() for n in result.warnings]
    modes = {name: system.unmanaged for name, system in policy.systems.items()}
    thresholds = {name: system.mass_revoke for name, system in policy.systems.items()}
    whole = planner.plan(desired, live, now=session.clock.start, unmanaged_modes=modes, warnings=notes,
                         applied=applied, thresholds=thresholds, renamed=renamed, ignore=policy.ignore,
                         evidence=_evidence(state, policy, live),
                         acknowledgements={name: system.offboarding for name, system in policy.systems.items()},
                         schemas=schemas_of(providers))
    zones = {name: system.timezone for name, system in policy.systems.items() if system.timezone != "UTC"}
    if zones:
        whole = replace(whole, zones=zones)
    return limit_plan(whole, session.targets, desired, live)


def schemas_of(providers: Mapping[str, Provider]) -> dict[tuple[str, str], KindSchema]:
    """(system, kind) → its vendor's schema: what the plan reads when a change is in force."""
    return {(name, kind): schema for name, provider in providers.items()
            for kind, schema in provider.capabilities.attributes.items()}


ENTITIES = ("user", "device", "gateway")


def _renamed(state: StateStore, policy: Policy, *, persist: bool = False) -> list[tuple[str, str]]:
    """Move what the state holds under each `previously:` key to its new key (records, applied digests):
    in memory for a plan, written through for an apply. Returns the users, devices and gateways moved."""
    if not policy.renames:
        return []
    pairs = state.moved(lambda address: renamed_address(address, policy.renames))
    if pairs:
        state.move(pairs, persist=persist)
    return [(old, new) for old, new in pairs if old.split("/")[1] in ENTITIES]


def _evidence(state: StateStore | None, policy: Policy, live: list[Any]) -> dict[str, dict[str, str]]:
    """What identifies each user, device and gateway: the policy's own, and for the ones the state knew, what
    the last apply recorded (the note `evidence`), the phone of an invitation it sent, an email a vendor gives."""
    from reconciler.resources import digest

    known: dict[str, dict[str, str]] = {}
    recorded: dict[str, Any] = {}
    if state is not None:
        recorded.update(state.note("evidence") or {})       # written whole by earlier versions
        for system in policy.systems:
            for name in evidence_notes(system):        # the one note of earlier versions, then the buckets
                recorded.update(state.note(name) or {})
    for address, clues in recorded.items():
        if isinstance(clues, dict):
            known[str(address)] = {str(k): str(v) for k, v in clues.items()}
    if state is not None:
        for address, record in state.items():
            system, kind, name = ([*address.split("/", 2), "", ""])[:3]
            if kind == "invitation" and record.get("phone"):
                known.setdefault(f"{system}/user/{name}", {}).setdefault("phone", digest(str(record["phone"])))
    for resource in live:
        if resource.kind == "user" and resource.meta.get("email"):
            known.setdefault(resource.address, {}).setdefault(
                "email", digest(str(resource.meta["email"]).strip().lower()))
    for address, clues in policy.evidence.items():
        known[address] = dict(clues)
    return known


def plan(session: Session) -> Plan:
    policy = targeted(validate(session), session.targets)
    state = open_state(session)
    providers = build_providers(session, policy, state)
    try:
        return make_plan(session, policy, providers, state.applied(), state=state)
    finally:
        _close(providers)


def apply(session: Session, *, saved: Mapping[str, Any] | None, approve: Callable[[Plan], bool],
          allow_mass_revoke: bool = False, allow_older_revision: bool = False,
          on_plan: Callable[[Plan], None] | None = None,
          on_change: Callable[[Change, str | None], None] | None = None,
          stop: threading.Event | None = None) -> tuple[Plan, ApplyReport | None]:
    """Plan under the state lock, check it against a saved plan, ask, execute. Returns the report, or
    None when there was nothing to do or approval was declined. Setting `stop` (Ctrl-C) sends nothing
    new; the report then says what was applied, what is uncertain and what remains."""
    if saved is not None and saved.get("targets") and not session.targets:
        session = replace(session, targets=tuple(str(t) for t in saved["targets"]))   # the saved plan's scope
    policy = targeted(validate(session), session.targets)
    current = revision(session)
    state = open_state(session)
    with _locked(state, sorted(policy.systems)):
        if session.now is None:
            session.clock = SessionClock(wall_clock(), running=True)   # the plan is as of when the lock was taken
        check_revision(state, current, session.directory, allow_older=allow_older_revision,
                       systems=sorted(policy.systems))
        renamed = _renamed(state, policy, persist=True)
        providers = build_providers(session, policy, state)
        if stop is not None:
            for provider in providers.values():
                provider.stop = stop
        try:
            fresh = make_plan(session, policy, providers, state.applied(), state=state, renamed=renamed)
            for name, provider in providers.items():
                state.set_system(name, provider.identity())
            if saved is not None:
                check_saved(saved, fresh)
            if on_plan:
                on_plan(fresh)
            if fresh.refused_renames:
                raise RefusedError("refused: " + "; ".join(g.message() for g in fresh.refused_renames)
                                   + ". Nothing was sent")
            if not fresh.has_changes:
                for provider in providers.values():
                    provider.commit_reads()
                _record(state, policy, current)
                return fresh, None
            check_mass_revoke(fresh, allow_mass_revoke)
            if not approve(fresh):
                return fresh, None
            _record(state, policy, current)
            report = apply_plan(fresh, providers, allow_mass_revoke=allow_mass_revoke,
                                concurrency={n: s.concurrency for n, s in policy.systems.items()},
                                on_change=on_change, stop=stop)
            enforce(state, fresh, report, session.clock())
            return fresh, report
        finally:
            _close(providers)


class _locked:
    """The state locked for these systems (each its own lock, in sorted order) for the `with` block."""

    def __init__(self, state: StateStore, systems: list[str]):
        self.state, self.systems = state, systems

    def __enter__(self) -> StateStore:
        self.state.lock(self.systems)
        return self.state

    def __exit__(self, *exc: object) -> None:
        self.state.__exit__(*exc)


RESIDUAL = "residual"     # the state's note: revocations not yet in force, until their offline exposure ends


def enforce(state: StateStore, plan: Plan, report: ApplyReport, applied_at: datetime) -> None:
    """When each applied change is in force, as of `applied_at` (the report's `enforcement`); the state keeps
    every revocation whose door may still open (offline) until then, for `access --live`, and forgets those
    whose exposure has ended."""
    at = format_time(applied_at)
    report.applied_at = at
    report.enforcement = {c.address: enforcement_of(c, at, plan.schemas.get((c.system, c.kind)))
                          for c in report.done}
    try:
        remember_residual(state, report, at)
    except StateError as exc:
        # The apply's own report says the state failed; what is exposed is still printed.
        log.warning("residual access not recorded error=%s", exc)


def wait_in_force(session: Session, plan: Plan, report: ApplyReport | None, seconds: float,
                  on_poll: Callable[[int, int], None] | None = None) -> tuple[WaitResult, dict[str, str]]:
    """`apply --wait`: after the apply (its lock released), read the systems with changes the vendor still has to
    carry out until every one is in force, or `seconds` pass (`enforce_wait`). Sends nothing, writes nothing.
    Returns the outcome and each system's vendor (for the per-vendor lines)."""
    from reconciler.enforce_wait import wait_until_in_force, watch_list

    state = open_state(session)
    done = report.done if report is not None else []
    result = watch_list(plan, done, report.enforcement if report is not None else {},
                        (report.applied_at if report is not None else None) or plan.now, state.id_of)
    policy = validate(session)
    vendors = {name: system.vendor for name, system in policy.systems.items()}
    systems = tuple(sorted({w.system for w in result.watched} & set(policy.systems)))
    if not systems:
        return result, vendors
    watching = targeted(policy, systems)
    providers = build_providers(session, watching, state)
    try:
        def read(system: str) -> ReadResult:
            return providers[system].read(watching.resources)
        return wait_until_in_force(result, read, watching.resources, seconds, clock=session.clock,
                                   on_poll=on_poll), vendors
    finally:
        _close(providers)


def remember_residual(state: StateStore, report: ApplyReport, at: str) -> None:
    """Each system with done changes keeps its own note (`residual/SYSTEM`, written under that system's lock),
    so that runners applying other systems at once never overwrite its entries; expired entries are dropped."""
    done: dict[str, list[Change]] = {}
    for change in report.done:
        done.setdefault(change.system, []).append(change)
    for system, changes in sorted(done.items()):
        before = residual_of(state.note, system)
        kept = [r for r in before if str(r.get("until", "")) > at]
        for change in changes:
            line = exposure_line(change, report.enforcement[change.address], at)
            if line is None:
                continue
            parts = change.address.split("/", 2)[2].split("/")
            kept = [r for r in kept if r.get("address") != change.address]
            kept.append({"address": change.address, "system": change.system, "kind": change.kind,
                         "user": parts[0], "device": parts[1].split("@", 1)[0].split("#", 1)[0],
                         "operations": parts[2:3], "applied_at": at,
                         "until": report.enforcement[change.address]["by"],
                         "basis": report.enforcement[change.address]["basis"]})
        if kept or before:
            state.set_note(system_note(RESIDUAL, system), sorted(kept, key=lambda r: (r["until"], r["address"])))


def residual_rows(state: StateStore, at: datetime, systems: Iterable[str]) -> list[AccessRow]:
    """The revocations the state remembers for `systems` whose door may still open at `at` (offline, until a
    key the phone downloaded expires): rows of their own, `via: offline key, until …`."""
    moment = format_time(at)
    return [AccessRow(user=str(r["user"]), system=str(r["system"]), device=str(r["device"]),
                      start=str(r["applied_at"]), end=str(r["until"]), via=f"offline key, until {r['until']}",
                      source=None, operations=tuple(r.get("operations") or ()), kind=str(r.get("kind", "permission")),
                      residual=True)
            for system in sorted(set(systems)) for r in residual_of(state.note, system)
            if str(r.get("applied_at", "")) <= moment < str(r.get("until", ""))]


def _record(state: StateStore, policy: Policy, current: Revision | None) -> None:
    """What this apply came from: its revision (the revision guard of the next one) and what identified the
    policy's users, devices and gateways (the next plan's clue to a rename)."""
    # One note per system, so runners applying different systems at once never overwrite each other's.
    # Spread over buckets (`evidence_note`): adding a user rewrites one bucket, not the whole system's evidence.
    for system in sorted(policy.systems):
        prefix = system + "/"
        buckets: dict[str, dict[str, Any]] = {}
        for address, clues in policy.evidence.items():
            if address.startswith(prefix):
                buckets.setdefault(evidence_note(system, address), {})[address] = clues
        for name in evidence_notes(system)[1:]:
            if name in buckets or state.note(name):
                state.set_note(name, buckets.get(name, {}))
        if state.note(f"evidence/{system}") is not None:
            state.set_note(f"evidence/{system}", None)      # the one note of earlier versions: now in buckets
    if current is not None:
        # Per system (the guard reads it), and whole as earlier versions read it.
        for system in sorted(policy.systems):
            state.set_note(system_note(REVISION, system), {"commit": current.commit, "time": current.time})
        state.set_note(REVISION, {"commit": current.commit, "time": current.time})


# ------------------------------------------------------------------------------------------ revision guard

@dataclass(frozen=True)
class Revision:
    """The policy's revision: a git commit and its commit time (Unix seconds; None when unknown)."""

    commit: str
    time: int | None

    def describe(self) -> str:
        when = datetime.fromtimestamp(self.time, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if self.time is not None \
            else "an unknown time"
        return f"{self.commit[:12]}… at {when}"


def _git(directory: Path, *args: str) -> str | None:
    """One git command in the policy directory; None when git is missing, fails, or this is no work tree.
    The only place the product runs git."""
    try:
        done = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True,
                              env={**os.environ, "GIT_TERMINAL_PROMPT": "0"}, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _parse_time(text: str) -> int | None:
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return int(moment.timestamp()) if moment.tzinfo is not None else None


def revision(session: Session) -> Revision | None:
    """The revision this run comes from: `session.revision` (COMMIT or COMMIT@TIME), else the HEAD commit of
    the policy directory's git work tree; None outside git (the guard is then off)."""
    given = (session.revision or "").strip()
    if given:
        commit, _, when = given.partition("@")
        if not commit:
            raise ReconcilerError(f"--revision {given!r}: expected COMMIT or COMMIT@TIME")
        stamp = _parse_time(when) if when else None
        if when and stamp is None:
            raise ReconcilerError(f"--revision {given!r}: the time after @ must be Unix seconds or ISO 8601 with "
                                  "a timezone")
        if stamp is None:
            found = _git(session.directory, "show", "-s", "--format=%ct", f"{commit}^{{commit}}")
            stamp = int(found) if found and found.isdigit() else None
        return Revision(commit, stamp)
    found = _git(session.directory, "log", "-1", "--format=%H %ct")
    if not found or " " not in found:
        return None
    commit, seconds = found.split(" ", 1)
    return Revision(commit, int(seconds) if seconds.isdigit() else None)


def revision_notice(session: Session) -> str | None:
    """What `plan` says once about the revision guard: off outside git, or that apply would refuse."""
    current = revision(session)
    if current is None:
        return ("the policy directory is not in a git work tree and no --revision was given: the revision guard "
                "(which refuses to apply an older revision over a newer one) is off")
    try:
        state = open_state(session)
        systems = [s for s in state.systems() if not session.targets or s in session.targets]
        older = _older_of(state, systems, current, session.directory)
    except ReconcilerError:
        return None
    return older


def check_revision(state: StateStore, current: Revision | None, directory: Path, *, allow_older: bool,
                   systems: Iterable[str] = ()) -> None:
    """Refuse to apply a revision older than the one the state says was applied last to any of `systems` (by
    ancestry when both commits are in this repository, else by commit time), unless `allow_older`."""
    if current is None or allow_older:
        return
    older = _older_of(state, systems, current, directory)
    if older:
        raise RefusedError(f"refused: {older}. Nothing was sent; update the checkout (git pull) and plan again, "
                           "or pass --allow-older-revision if reverting is intended")


def _older_of(state: StateStore, systems: Iterable[str], current: Revision, directory: Path) -> str | None:
    """`_older` against the revision last applied to each system (its own note, or the whole note of earlier
    versions; the whole note alone when no system is named)."""
    lasts = [revision_of(state.note, system) for system in sorted(set(systems))] or [state.note(REVISION)]
    seen: set[str] = set()
    for last in lasts:
        key = json.dumps(last, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        older = _older(last, current, directory)
        if older:
            return older
    return None


def _older(last: Any, current: Revision, directory: Path) -> str | None:
    if not isinstance(last, dict) or not last.get("commit"):
        return None
    before = Revision(str(last["commit"]), int(last["time"]) if isinstance(last.get("time"), int) else None)
    if before.commit == current.commit:
        return None
    has_both = all(_git(directory, "cat-file", "-e", f"{c}^{{commit}}") is not None
                   for c in (before.commit, current.commit))
    if has_both:
        if _git(directory, "merge-base", "--is-ancestor", before.commit, current.commit) is not None:
            return None
        how = ("older" if _git(directory, "merge-base", "--is-ancestor", current.commit, before.commit) is not None
               else "not a descendant of it")
    elif before.time is not None and current.time is not None and current.time < before.time:
        how = "older"
    else:
        return None
    return (f"last applied from {before.describe()}; this checkout is {current.describe()}, {how}: "
            "refusing to revert it")


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
        state = open_state(session)       # the configured state, PostgreSQL included
        providers = build_providers(session, policy, state)
        try:
            reads = read_live(policy, providers)
        finally:
            _close(providers)
        found = [r for result in reads.values() for r in result.resources]
        rows, admins = rows_from_live(found, policy.resources, policy.emails)
        rows += residual_rows(state, at or session.clock(), policy.systems)
    else:
        rows, admins = rows_from_policy(policy.resources, policy.emails)
    admins = [a for a in admins if (user is None or a.user == user) and device is None]
    from reconciler.assertions import zones_of

    return select(rows, user=user, device=device, at=at, zones=zones_of(policy)), admins


def site_zones(session: Session) -> dict[str, str]:
    """Each system's time zone name (`timezone:`, default UTC), in which its weekly schedules are read."""
    return {name: system.timezone for name, system in sorted(validate(session).systems.items())}


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


def push_state(session: Session, source: Path, *, force: bool = False, targets: tuple[str, ...] = ()) -> int:
    """Move a local state file into the shared PostgreSQL state, under both locks; returns how many records
    moved. A database state that already holds records is replaced only with `force`. `targets`: only these
    systems' records move, under their own locks, and every other system's records stay as they are."""
    if not session.state_url:
        raise StateError("state push moves a local state file into PostgreSQL: give --state postgresql://… "
                         "(or set RECONCILER_STATE)")
    local = LocalState(source)
    if not (local.path.is_file() or local.journal_path.is_file()):
        raise StateError(f"no state file at {source}")
    local.lock()
    try:
        data = local.snapshot()
        from reconciler.state.postgres import PostgresState  # psycopg is loaded only when asked for

        target = PostgresState(session.state_url, lock_timeout=session.lock_timeout)
        target.lock(list(targets) if targets else None)
        try:
            systems = sorted(set(targets))
            held = sum(1 for a, _ in target.items() if not systems or a.split("/", 1)[0] in systems)
            what = f" for {', '.join(systems)}" if systems else ""
            if held and not force:
                raise RefusedError(f"refused: the state {target.location} already holds {held} records{what}; pull "
                                   "it first (`reconciler state pull`) or pass --force to replace them")
            if not systems:
                target.replace(data)
                return len(data["resources"])
            moved = 0
            for system in systems:
                part = select_system(data, system)
                if not part["resources"] and not part["applied"] and not part["systems"]:
                    raise StateError(f"state {source} holds nothing of system {printable(system)!r}; "
                                     "nothing was pushed")
                target.replace(data, system=system)
                moved += len(part["resources"])
            return moved
        finally:
            target.unlock()
    finally:
        local.unlock()


def unlock_state(session: Session, lock_id: str) -> str:
    """`state unlock LOCK_ID`: break a lock of the shared state whose holder is stuck; returns who held it."""
    if not session.state_url:
        raise StateError("state unlock breaks a lock of the shared PostgreSQL state: give --state postgresql://… "
                         "(or set RECONCILER_STATE); a local state's lock file is released when its process ends")
    from reconciler.state.postgres import PostgresState  # psycopg is loaded only when asked for

    return PostgresState(session.state_url).force_unlock(lock_id)


def pull_state(session: Session, targets: tuple[str, ...] = ()) -> dict[str, Any]:
    """The whole state in the local file's format, from whichever store the session names; `targets`: only
    these systems' records (their addresses, identities, evidence and residual access)."""
    whole = open_state(session).snapshot()
    if not targets:
        return whole
    pulled: dict[str, Any] = {"version": whole["version"], "systems": {}, "resources": {}, "applied": {}}
    for system in sorted(set(targets)):
        part = select_system(whole, system)
        for key in ("systems", "resources", "applied"):
            pulled[key].update(part[key])
        for key, value in (part.get("notes") or {}).items():
            notes = pulled.setdefault("notes", {})
            notes[key] = notes.get(key, []) + value if key == RESIDUAL else value
    return pulled


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
    if sorted(saved.get("targets") or []) != sorted(fresh.targets):
        raise RefusedError(f"refused: the saved plan covers targets {sorted(saved.get('targets') or []) or 'all'}, "
                           f"this apply {sorted(fresh.targets) or 'all'}. Nothing was sent; apply it with the same "
                           "--target, or make a new plan")
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
