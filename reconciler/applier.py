"""Execute a plan: revocations first, then dependency order, bounded concurrency per system.

Called by the CLI with the plan and one provider per system. Providers record every successful change in
the state store as it happens (journaled), so an apply stopped at any point is finished by running it
again. A failure does not stop independent changes; what depends on a failed change is skipped, and the
report says what succeeded and what remains. A change whose outcome is unknown (the vendor may or may not
have done it, and a lookup could not tell) is *uncertain*: it is never reported as done, and its
dependants wait like those of a failed change.

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
from typing import Protocol

from reconciler.errors import ReconcilerError, RefusedError, StateError, VendorError
from reconciler.plan import Action, Change, Plan

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 8

_PAST = {Action.CREATE: "created", Action.UPDATE: "updated", Action.DELETE: "deleted", Action.REPLACE: "replaced"}


class Applies(Protocol):
    def commit_reads(self) -> None: ...
    def batches(self, changes: list[Change]) -> list[list[Change]]: ...
    def apply_batch(self, batch: list[Change]) -> None: ...
    def record_applied(self, change: Change) -> None: ...


INTERRUPTED = "interrupted before it started"


@dataclass
class ApplyReport:
    done: list[Change] = field(default_factory=list)
    failed: list[tuple[Change, str]] = field(default_factory=list)
    skipped: list[tuple[Change, str]] = field(default_factory=list)
    uncertain: list[tuple[Change, str]] = field(default_factory=list)   # may or may not have happened
    internal: list[tuple[Change, BaseException]] = field(default_factory=list)   # a bug stopped the apply here
    interrupted: bool = False

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
            return f"{len(self.done)} applied"
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


def is_uncertain(exc: BaseException) -> bool:
    """The vendor may have done it: an answer lost after sending, that no lookup could settle."""
    return isinstance(exc, VendorError) and exc.ambiguous


def apply_plan(plan: Plan, providers: Mapping[str, Applies], *, concurrency: Mapping[str, int] | None = None,
               allow_mass_revoke: bool = False,
               on_change: Callable[[Change, str | None], None] | None = None,
               stop: threading.Event | None = None) -> ApplyReport:
    check_mass_revoke(plan, allow_mass_revoke)
    stop = stop or threading.Event()
    for provider in providers.values():
        provider.commit_reads()
    report = ApplyReport()
    broken: set[str] = set()   # addresses that failed or were skipped: their dependants wait
    # A change the state cannot record must not be followed by more: once a write to the state fails,
    # nothing else is sent, and what was queued is reported as not attempted.
    halted: list[str] = []

    phases: dict[int, list[Change]] = defaultdict(list)
    for change in plan.changes:
        phases[change.phase].append(change)

    pools = {system: ThreadPoolExecutor((concurrency or {}).get(system, DEFAULT_CONCURRENCY),
                                        thread_name_prefix=f"apply-{system}") for system in providers}
    def guarded(provider: Applies, batch: list[Change]) -> bool:
        if stop.is_set() or halted:
            return False    # interrupted, the state failed or a bug was hit: nothing new is sent
        try:
            provider.apply_batch(batch)
        except ReconcilerError:
            raise
        except Exception as exc:
            # A bug: stop at once (not when the loop below reaches this unit), so that no other worker
            # starts anything new.
            halted.append(f"apply stopped by an internal error at {batch[0].address}: {type(exc).__name__}")
            raise
        return True

    try:
        for phase in sorted(phases):
            futures: list[tuple[list[Change], Future[bool]]] = []
            by_system: dict[str, list[Change]] = defaultdict(list)
            for change in phases[phase]:
                if stop.is_set() or halted:
                    report.skipped.append((change, INTERRUPTED if stop.is_set() else f"not attempted: {halted[0]}"))
                    continue
                blocked = [d for d in (change.desired.depends_on if change.desired else ()) if d in broken]
                if blocked:
                    report.skipped.append((change, f"depends on {', '.join(blocked)}"))
                    broken.add(change.address)
                    continue
                by_system[change.system].append(change)
            for system, changes in by_system.items():
                provider = providers[system]
                for batch in provider.batches(changes):
                    futures.append((batch, pools[system].submit(guarded, provider, batch)))
            for batch, future in futures:
                try:
                    started = future.result()
                except StateError as exc:
                    # Sent, perhaps, but not recorded: nothing more is sent (see `halted`).
                    if not halted:
                        halted.append(f"the state store failed: {exc}")
                    log.warning("state store failed; apply stops error=%s", exc)
                    for change in batch:
                        report.uncertain.append((change, f"the state could not record it: {exc}"))
                        broken.add(change.address)
                        if on_change:
                            on_change(change, f"uncertain: {exc}")
                    continue
                except ReconcilerError as exc:  # the tool's own errors: a failed change is reported, never lost
                    uncertain = is_uncertain(exc)
                    for change in batch:
                        (report.uncertain if uncertain else report.failed).append((change, str(exc)))
                        broken.add(change.address)
                        log.warning("change %s address=%s error=%s", "uncertain" if uncertain else "failed",
                                    change.address, exc)
                        if on_change:
                            on_change(change, str(exc))
                    continue
                except Exception as exc:    # a programming error, not the vendor's: `guarded` stopped the apply
                    for change in batch:
                        report.internal.append((change, exc))
                        broken.add(change.address)
                        log.error("internal error; apply stops address=%s error=%s: %s", change.address,
                                  type(exc).__name__, exc)
                        if on_change:
                            on_change(change, f"internal error: {type(exc).__name__}: {exc}")
                    continue
                if not started:
                    why = INTERRUPTED if stop.is_set() or not halted else f"not attempted: {halted[0]}"
                    report.skipped.extend((change, why) for change in batch)
                    broken.update(change.address for change in batch)
                    continue
                for change in batch:
                    try:
                        providers[change.system].record_applied(change)
                    except StateError as exc:
                        # Done at the vendor and its id recorded; only the drift mark is missing.
                        if not halted:
                            halted.append(f"the state store failed: {exc}")
                        log.warning("applied mark not recorded address=%s error=%s", change.address, exc)
                    report.done.append(change)
                    if on_change:
                        on_change(change, None)
    finally:
        for pool in pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
    report.interrupted = stop.is_set()
    return report
