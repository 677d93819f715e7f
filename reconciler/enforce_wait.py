"""`apply --wait`: after an apply, poll the vendors until every change is in force on the lock, or time is up.

`run.wait_in_force` calls `watch_list` to sort an apply's changes by what the vendors' documents say about them
(`Enforcement`): the ones the vendor still has to carry out (a key still being created, a key waiting for the
lock owner's approval: the vendor's `pending` states) are watched; the ones in force at once (or from a known
moment) need no wait; the ones the documents say nothing about are reported as unknown, never as in force, and
never waited for. `wait_until_in_force` then reads each system that still has something to carry out with its
provider's normal bulk read, at a modest interval, until each watched change is in force, has failed (`error`,
`denied`) or the deadline (monotonic clock) has passed. Nothing here sends a change or writes the state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from reconciler import planner
from reconciler.errors import ReconcilerError
from reconciler.plan import Action, Change, Note, Plan, in_force
from reconciler.providers.base import ReadResult
from reconciler.resources import Enforcement, Resource, Status, address_of, grant_slot

log = logging.getLogger(__name__)

FIRST_INTERVAL = 1.0          # seconds between the first polls of a system ...
MAX_INTERVAL = 5.0            # ... growing by half each time up to this
MAX_REASON = 200              # characters of a vendor's reason kept in a line


@dataclass
class Watched:
    """One change (or pending object) the vendor still has to carry out before it is in force."""

    address: str
    system: str
    kind: str
    id: str | None                       # the vendor id apply recorded: what proves the object is ours
    declared: Enforcement
    state: str | None = None             # the vendor's state at the last read
    seconds: float | None = None         # when a read first showed it in force, after the wait began
    failed: str | None = None            # why it never will be (error, denied)
    missing: bool = False                # the last read did not find it at all
    read_error: str | None = None        # the last read of its system failed with this

    @property
    def settled(self) -> bool:
        return self.seconds is not None or self.failed is not None

    def not_in_force(self, waited: float) -> str:
        """Why it is not in force, for the closing list (vendor text included: the caller escapes it)."""
        if self.failed is not None:
            return self.failed
        if self.read_error is not None:
            return f"unknown: the last read failed ({self.read_error})"
        if self.missing:
            return "not at the vendor (revoked, expired or never made)" + \
                (f"; last seen `{self.state}`" if self.state else "")
        if self.state is None:
            return f"not seen at the vendor within {waited:.0f} s"
        return f"still `{self.state}` after {waited:.0f} s"


@dataclass
class WaitResult:
    """What `apply --wait` found: per watched change its outcome; what needed no wait, and what is unknown."""

    watched: list[Watched] = field(default_factory=list)
    at_once: list[Change] = field(default_factory=list)             # in force at apply, as documented
    unknown: list[tuple[str, str, str]] = field(default_factory=list)   # (system, address, basis)
    waited: float = 0.0
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(w.seconds is not None for w in self.watched)

    def missing(self) -> list[str]:
        """`address: why` for each watched change not in force (the exit-1 list)."""
        return [f"{w.address}: {w.not_in_force(self.waited)}" for w in self.watched if w.seconds is None]

    def per_system(self, vendors: Mapping[str, str]) -> list[str]:
        """One line per system: how many changes are in force and how long enforcement took."""
        systems = sorted({w.system for w in self.watched} | {c.system for c in self.at_once}
                         | {s for s, _, _ in self.unknown})
        lines = []
        for system in systems:
            mine = [w for w in self.watched if w.system == system]
            done = [w.seconds for w in mine if w.seconds is not None]
            parts = []
            if mine and len(done) == len(mine):
                parts.append(f"{len(done)} of {len(mine)} in force after {max(done):.1f} s")
            elif mine:
                last = f" (the last after {max(done):.1f} s)" if done else ""
                parts.append(f"{len(done)} of {len(mine)} in force{last}; {len(mine) - len(done)} not in force "
                             f"after waiting {self.waited:.1f} s")
            immediate = sum(1 for c in self.at_once if c.system == system)
            if immediate:
                parts.append(f"{immediate} in force at apply, as documented")
            unknown = sum(1 for s, _, _ in self.unknown if s == system)
            if unknown:
                parts.append(f"{unknown} unknown")
            lines.append(f"{system} ({vendors.get(system, '?')}): " + "; ".join(parts))
        return lines


def watch_list(plan: Plan, done: Iterable[Change], enforcement: Mapping[str, Mapping[str, Any]], applied_at: str,
               ids: Callable[[str], str | None]) -> WaitResult:
    """Sort the applied changes (`done`, with `enforcement` as apply judged it at `applied_at`) and the plan's
    pending objects: what to watch, what is in force at apply, what nobody can tell. A revocation whose door may
    still open offline until a documented moment is in force online at once; its exposure is the apply's own
    line (`ApplyReport.exposures`), which no read can shorten: not waited for."""
    result = WaitResult()
    seen: set[str] = set()
    for change in done:
        declared = _declared(plan, change.system, change.kind)
        seen.add(change.address)
        if change.grants and declared is not None and declared.pending and change.desired is not None:
            result.watched.append(Watched(change.address, change.system, change.kind, ids(change.address), declared))
            continue
        judged = enforcement.get(change.address)
        if judged is not None and in_force(change, judged, applied_at):
            result.at_once.append(change)
        elif change.revokes and judged is not None and judged.get("by"):
            result.at_once.append(change)        # online at once; the offline exposure is printed by apply
        else:
            basis = str((judged or {}).get("basis") or "unknown: the vendor's documents do not say")
            result.unknown.append((change.system, change.address, basis))
    for note in plan.pending:
        declared = _declared(plan, note.system, note.kind)
        state = dict(note.details).get("state")
        if note.address in seen or declared is None or state not in declared.pending:
            continue
        result.watched.append(Watched(note.address, note.system, note.kind, ids(note.address), declared,
                                      state=str(state)))
    return result


def _declared(plan: Plan, system: str, kind: str) -> Enforcement | None:
    schema = plan.schemas.get((system, kind))
    return schema.enforcement if schema is not None else None


def wait_until_in_force(result: WaitResult, read: Callable[[str], ReadResult], desired: list[Resource],
                        seconds: float, *, clock: Callable[[], datetime],
                        monotonic: Callable[[], float] = time.monotonic,
                        sleep: Callable[[float], None] = time.sleep,
                        on_poll: Callable[[int, int], None] | None = None) -> WaitResult:
    """Read each system with a watched change still unsettled (`read(system)`, the provider's bulk read) until
    every one is in force or has failed, or `seconds` have passed on the monotonic clock; the last read is made
    at the deadline. Each read is matched to the policy (`desired`) as a plan does, as of `clock()`.
    `on_poll(settled, watched)` is told after each round. Ctrl-C ends the wait (`interrupted`)."""
    began = monotonic()
    deadline = began + max(0.0, seconds)
    interval = FIRST_INTERVAL
    try:
        while True:
            systems = sorted({w.system for w in result.watched if not w.settled})
            for system in systems:
                _observe(result.watched, system, read, desired, clock(), lambda: monotonic() - began)
            result.waited = monotonic() - began
            if on_poll is not None:
                on_poll(sum(1 for w in result.watched if w.settled), len(result.watched))
            left = deadline - monotonic()
            if all(w.settled for w in result.watched) or left <= 0:
                break
            sleep(min(interval, left))
            interval = min(MAX_INTERVAL, interval * 1.5)
    except KeyboardInterrupt:
        result.interrupted = True
    result.waited = monotonic() - began
    return result


def _observe(watched: list[Watched], system: str, read: Callable[[str], ReadResult], desired: list[Resource],
             now: datetime, since: Callable[[], float]) -> None:
    """One read of `system`, matched to the policy by the planner (a grant's window to the live key that is
    it): a watched change still pending shows in the plan's pending list with its state; one the vendor gave
    up on shows as a warning with a failed state (`error`, `denied`); one absent would be created again; any
    other is in force."""
    mine = [w for w in watched if w.system == system and not w.settled]
    try:
        answer = read(system)
    except ReconcilerError as exc:
        for w in mine:
            w.read_error = _short(str(exc))
        log.info("enforcement wait read failed system=%s error=%s", system, exc)
        return
    elapsed = since()      # when this read was answered: an upper bound of when it showed what it shows
    if answer.errors:
        for w in mine:
            w.read_error = _short("; ".join(answer.errors))
        return
    judged = planner.plan([r for r in desired if r.system == system], answer.resources, now=now)
    pending: dict[str, Any] = {n.address: dict(n.details).get("state") for n in judged.pending}
    absent = {c.address for c in judged.changes if c.action is Action.CREATE}
    for change in judged.changes:
        # A live object the plan would still change (a start the vendor set a second later than ours): what
        # counts here is its vendor state, not whether it matches the policy.
        live = change.live
        if live is not None and change.action is not Action.CREATE and change.address not in pending and (
                live.status is Status.PENDING or live.meta.get("state") in _pending_states(watched, change.address)):
            pending[change.address] = live.meta.get("state")
    failures: dict[str, Note] = {}
    for note in answer.warnings:
        details = dict(note.details)
        if details.get("state") is not None:
            failures[note.address] = note
            if details.get("id"):
                failures[f"id:{str(details['id']).lower()}"] = note
    for w in mine:
        w.read_error = None
        slot = address_of(w.system, w.kind, grant_slot(w.address.split("/", 2)[2]))
        found = failures.get(f"id:{w.id.lower()}") if w.id else None
        found = found or failures.get(w.address) or failures.get(slot)
        failed_state = dict(found.details).get("state") if found is not None else None
        if w.address in pending:
            w.state = str(pending[w.address]) if pending[w.address] is not None else w.state
            w.missing = False
        elif found is not None and failed_state in w.declared.failed:
            w.state = str(failed_state)
            w.failed = f"`{w.state}`: {_short(found.message)}"
        elif w.address in absent:
            w.missing = True        # revoked, expired or never made: it does not come back by itself, but a
                                    # listing may lag, so the wait goes on until its end
        else:
            w.missing = False
            w.seconds = elapsed
            log.info("in force address=%s seconds=%.1f", w.address, elapsed)


def _pending_states(watched: list[Watched], address: str) -> frozenset[str]:
    return next((w.declared.pending for w in watched if w.address == address), frozenset())


def _short(text: str) -> str:
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 1] + "…"
