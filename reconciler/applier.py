"""Execute a plan: revocations first, then dependency order, bounded concurrency per system.

Called by the CLI with the plan and one provider per system. Providers record every successful change in
the state store as it happens (journaled), so an apply stopped at any point is finished by running it
again. A failure does not stop independent changes; what depends on a failed change is skipped, and the
report says what succeeded and what remains. A change whose outcome is unknown (the vendor may or may not
have done it, and a lookup could not tell) is *uncertain*: it is never reported as done, and its
dependants wait like those of a failed change.

Workers and requests in flight: a system's `concurrency:` bounds the requests in flight to its vendor (its
provider's HTTP client holds a slot only while a request is sent and answered); its pool has more workers than
that (`workers`), because a worker also waits for the state to make what it recorded durable before it sends
anything that may change the vendor, and a worker waiting on the state holds no slot.

Interrupting: when `stop` is set (the CLI sets it on Ctrl-C), no new change starts; the ones in flight
finish (their requests are bounded by the request timeout) and are journaled as usual, and the report
lists what was applied, what is uncertain and what was not attempted.

A programming error (a `KeyError`, a `TypeError`: anything but the tool's own `ReconcilerError`s) is not
a vendor's failure: it stops the apply like an interrupt (nothing new is sent; what is in flight finishes
and is journaled) and is reported with the change's address in `ApplyReport.internal`; the CLI says so in
one line, with its own exit code, and re-raises it under `RECONCILER_DEBUG=1`.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from reconciler.errors import ReconcilerError, RefusedError, StateError, VendorError
from reconciler.plan import Action, Change, Plan, exposure_line, in_force

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 8
WORKERS_PER_SLOT = 4      # workers per request in flight: the others wait on the state meanwhile
MAX_WORKERS = 64          # per system: threads, not requests; never fewer than its `concurrency`

_PAST = {Action.CREATE: "created", Action.UPDATE: "updated", Action.DELETE: "deleted", Action.REPLACE: "replaced"}


class Applies(Protocol):
    def commit_reads(self) -> None: ...
    def batches(self, changes: list[Change]) -> list[list[Change]]: ...
    def apply_batch(self, batch: list[Change]) -> None: ...
    def record_applied(self, change: Change) -> None: ...
    def halt_sending(self, why: str) -> None: ...


INTERRUPTED = "interrupted before it started"


@dataclass
class ApplyReport:
    done: list[Change] = field(default_factory=list)
    failed: list[tuple[Change, str]] = field(default_factory=list)
    skipped: list[tuple[Change, str]] = field(default_factory=list)
    uncertain: list[tuple[Change, str]] = field(default_factory=list)   # may or may not have happened
    internal: list[tuple[Change, BaseException]] = field(default_factory=list)   # a bug stopped the apply here
    interrupted: bool = False
    applied_at: str | None = None       # when the run finished sending (the session's clock)
    # address → `enforcement_of` the done change as of `applied_at`: when it is in force on the lock
    enforcement: dict[str, dict[str, Any]] = field(default_factory=dict)

    def not_in_force(self) -> list[Change]:
        """Done changes the vendor accepted that are not (known to be) in force on the lock yet."""
        at = self.applied_at or ""
        return [c for c in self.done if not in_force(c, self.enforcement.get(c.address), at)]

    def exposures(self) -> list[str]:
        """One line per done revocation after which a door may still open (offline), longest first."""
        at = self.applied_at or ""
        found = [(self.enforcement[c.address]["by"], line) for c in self.done if c.address in self.enforcement
                 and (line := exposure_line(c, self.enforcement[c.address], at))]
        return [line for _, line in sorted(found, reverse=True)]

    @property
    def ok(self) -> bool:
        return not (self.failed or self.skipped or self.uncertain or self.internal or self.interrupted)

    def lines(self) -> list[str]:
        return [f"{c.address}: {_PAST[c.action]}" for c in self.done] + self.remaining()

    def remaining(self) -> list[str]:
        """What was not applied, and why: the work a re-run will do."""
        lines = [f"{c.address}: INTERNAL ERROR (a bug in reconciler) while trying to {c.action}: "
                 f"{type(exc).__name__}: {exc}" for c, exc in self.internal]
        lines += [f"{c.address}: UNCERTAIN whether it was {_PAST[c.action]}: {why}" for c, why in self.uncertain]
        lines += [f"{c.address}: FAILED to {c.action}: {why}" for c, why in self.failed]
        lines += [f"{c.address}: not applied ({why})" for c, why in self.skipped]
        return lines

    def summary(self) -> str:
        if self.ok:
            waiting = len(self.not_in_force()) if self.enforcement else 0
            return f"{len(self.done)} applied" + (f", {waiting} accepted but not yet in force" if waiting else "")
        return (("interrupted: " if self.interrupted else "")
                + ("stopped by an internal error: " if self.internal else "")
                + f"{len(self.done)} applied, {len(self.uncertain)} uncertain, {len(self.failed)} failed, "
                f"{len(self.skipped)} not attempted; run apply again to finish what remains"
                + ("; it looks up what is uncertain before sending anything" if self.uncertain else ""))


def check_mass_revoke(plan: Plan, allow: bool) -> None:
    """Refuse a plan that a system's mass-revoke guard stops (more than its share of the managed grants,
    25 % of at least 10 by default), unless the policy acknowledges exactly these revocations or `allow`."""
    if allow or not plan.refused_by:
        return
    raise RefusedError("refused: " + "; ".join(g.message() for g in plan.refused_by))


def workers(concurrency: int) -> int:
    """The pool of a system whose `concurrency:` is `concurrency`: a few workers per request in flight."""
    return max(concurrency, min(WORKERS_PER_SLOT * concurrency, MAX_WORKERS))


def is_uncertain(exc: BaseException) -> bool:
    """The vendor may have done it: an answer lost after sending, that no lookup could settle."""
    return isinstance(exc, VendorError) and exc.ambiguous


def apply_plan(plan: Plan, providers: Mapping[str, Applies], *, concurrency: Mapping[str, int] | None = None,
               allow_mass_revoke: bool = False,
               on_change: Callable[[Change, str | None], None] | None = None,
               stop: threading.Event | None = None) -> ApplyReport:
    """Refuse what the mass-revoke guard stops, then run the plan (`ApplyRun`)."""
    check_mass_revoke(plan, allow_mass_revoke)
    return ApplyRun(plan, providers, concurrency=concurrency, on_change=on_change, stop=stop).execute()


class ApplyRun:
    """One apply of a plan: its phases in order; in each, the changes whose dependencies held are grouped per
    system into the provider's batches and sent on that system's pool; each batch's outcome is then taken in
    submission order (`settle`) and lands in `report` as done, failed, uncertain, internal or skipped.

    Two things stop sending anything new: `stop` (the CLI sets it on Ctrl-C) and `halted`, the reason the
    apply stopped itself (the state could not record a change, or a bug was hit). What is in flight finishes.
    """

    def __init__(self, plan: Plan, providers: Mapping[str, Applies], *,
                 concurrency: Mapping[str, int] | None = None,
                 on_change: Callable[[Change, str | None], None] | None = None,
                 stop: threading.Event | None = None):
        self.plan = plan
        self.providers = providers
        self.concurrency = concurrency or {}
        self.on_change = on_change
        self.stop = stop or threading.Event()
        self.report = ApplyReport()
        self.broken: set[str] = set()    # addresses that failed or were skipped: their dependants wait
        self.halted: str | None = None   # why the apply stopped itself; set once, by the first reason
        self._halt_lock = threading.Lock()

    # --- the run
    def execute(self) -> ApplyReport:
        for provider in self.providers.values():
            provider.commit_reads()
        pools = {system: ThreadPoolExecutor(workers(self.concurrency.get(system, DEFAULT_CONCURRENCY)),
                                            thread_name_prefix=f"apply-{system}") for system in self.providers}
        try:
            for changes in self.phases():
                for batch, future in self.submit(self.admitted(changes), pools):
                    self.settle(batch, future)
        finally:
            for pool in pools.values():
                pool.shutdown(wait=True, cancel_futures=True)
        self.report.interrupted = self.stop.is_set()
        return self.report

    def phases(self) -> list[list[Change]]:
        """The plan's changes by phase, earliest first (revocations are phase 0)."""
        phases: dict[int, list[Change]] = defaultdict(list)
        for change in self.plan.changes:
            phases[change.phase].append(change)
        return [phases[phase] for phase in sorted(phases)]

    @property
    def stopping(self) -> bool:
        return self.stop.is_set() or self.halted is not None

    def halt(self, why: str) -> None:
        """Send nothing new from now on, not even from a batch already started (its providers refuse every
        further request that may change a vendor); the first reason is the one reported."""
        with self._halt_lock:
            if self.halted is not None:
                return
            self.halted = why
        for provider in self.providers.values():
            provider.halt_sending(why)

    def not_started_reason(self) -> str:
        return INTERRUPTED if self.stop.is_set() or self.halted is None else f"not attempted: {self.halted}"

    def admitted(self, changes: list[Change]) -> dict[str, list[Change]]:
        """The phase's changes that may be sent, per system; the others are skipped with the reason."""
        by_system: dict[str, list[Change]] = defaultdict(list)
        for change in changes:
            if self.stopping:
                self.report.skipped.append((change, self.not_started_reason()))
                continue
            blocked = [d for d in (change.desired.depends_on if change.desired else ()) if d in self.broken]
            if blocked:
                self.report.skipped.append((change, f"depends on {', '.join(blocked)}"))
                self.broken.add(change.address)
                continue
            by_system[change.system].append(change)
        return by_system

    def submit(self, by_system: Mapping[str, list[Change]],
               pools: Mapping[str, ThreadPoolExecutor]) -> list[tuple[list[Change], Future[bool]]]:
        """Each system's changes in its provider's batches, on that system's pool."""
        futures: list[tuple[list[Change], Future[bool]]] = []
        for system, changes in by_system.items():
            provider = self.providers[system]
            for batch in provider.batches(changes):
                futures.append((batch, pools[system].submit(self.send, provider, batch)))
        return futures

    def send(self, provider: Applies, batch: list[Change]) -> bool:
        """In a worker: send one batch, unless the apply is stopping (then False: not started)."""
        if self.stopping:
            return False
        try:
            provider.apply_batch(batch)
        except ReconcilerError:
            raise
        except Exception as exc:
            # A bug: stop at once (not when `settle` reaches this batch), so that no other worker starts anything.
            self.halt(f"apply stopped by an internal error at {batch[0].address}: {type(exc).__name__}")
            raise
        return True

    def settle(self, batch: list[Change], future: Future[bool]) -> None:
        """Wait for one batch and report its outcome."""
        try:
            started = future.result()
        except StateError as exc:
            self.state_failed(batch, exc)
        except ReconcilerError as exc:      # the tool's own errors: a failed change is reported, never lost
            self.failed(batch, exc)
        except Exception as exc:            # a programming error, not the vendor's: `send` halted the apply
            self.internal(batch, exc)
        else:
            if started:
                self.applied(batch)
            else:
                self.not_started(batch)

    # --- outcomes
    def _notify(self, change: Change, error: str | None) -> None:
        if self.on_change:
            self.on_change(change, error)

    def applied(self, batch: list[Change]) -> None:
        for change in batch:
            try:
                self.providers[change.system].record_applied(change)
            except StateError as exc:
                # Done at the vendor and its id recorded; only the drift mark is missing.
                self.halt(f"the state store failed: {exc}")
                log.warning("applied mark not recorded address=%s error=%s", change.address, exc)
            self.report.done.append(change)
            self._notify(change, None)

    def state_failed(self, batch: list[Change], exc: StateError) -> None:
        """Sent, perhaps, but not recorded: nothing more is sent."""
        self.halt(f"the state store failed: {exc}")
        log.warning("state store failed; apply stops error=%s", exc)
        for change in batch:
            self.report.uncertain.append((change, f"the state could not record it: {exc}"))
            self.broken.add(change.address)
            self._notify(change, f"uncertain: {exc}")

    def failed(self, batch: list[Change], exc: ReconcilerError) -> None:
        """The vendor refused, or may have done it (`is_uncertain`); the dependants wait either way."""
        uncertain = is_uncertain(exc)
        for change in batch:
            (self.report.uncertain if uncertain else self.report.failed).append((change, str(exc)))
            self.broken.add(change.address)
            log.warning("change %s address=%s error=%s", "uncertain" if uncertain else "failed",
                        change.address, exc)
            self._notify(change, str(exc))

    def internal(self, batch: list[Change], exc: Exception) -> None:
        for change in batch:
            self.report.internal.append((change, exc))
            self.broken.add(change.address)
            log.error("internal error; apply stops address=%s error=%s: %s", change.address,
                      type(exc).__name__, exc)
            self._notify(change, f"internal error: {type(exc).__name__}: {exc}")

    def not_started(self, batch: list[Change]) -> None:
        why = self.not_started_reason()
        self.report.skipped.extend((change, why) for change in batch)
        self.broken.update(change.address for change in batch)
