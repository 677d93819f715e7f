"""Execute a plan: revocations first, then dependency order, bounded concurrency per system.

Called by the CLI with the plan and one provider per system. Providers record every successful change in
the state store as it happens (journaled), so an apply stopped at any point is finished by running it
again. A failure does not stop independent changes; what depends on a failed change is skipped, and the
report says what succeeded and what remains.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

from reconciler.errors import RefusedError
from reconciler.plan import Action, Change, Plan

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 8
MASS_REVOKE_SHARE = 0.25
MASS_REVOKE_MINIMUM = 10

_PAST = {Action.CREATE: "created", Action.UPDATE: "updated", Action.DELETE: "deleted", Action.REPLACE: "replaced"}


class Applies(Protocol):
    def commit_reads(self) -> None: ...
    def batches(self, changes: list[Change]) -> list[list[Change]]: ...
    def apply_batch(self, batch: list[Change]) -> None: ...
    def record_applied(self, change: Change) -> None: ...


@dataclass
class ApplyReport:
    done: list[Change] = field(default_factory=list)
    failed: list[tuple[Change, str]] = field(default_factory=list)
    skipped: list[tuple[Change, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.skipped

    def lines(self) -> list[str]:
        return [f"{c.address}: {_PAST[c.action]}" for c in self.done] + self.remaining()

    def remaining(self) -> list[str]:
        """What was not applied, and why: the work a re-run will do."""
        lines = [f"{c.address}: FAILED to {c.action}: {why}" for c, why in self.failed]
        lines += [f"{c.address}: not applied ({why})" for c, why in self.skipped]
        return lines

    def summary(self) -> str:
        return (f"{len(self.done)} applied, {len(self.failed)} failed, {len(self.skipped)} not attempted; "
                "run apply again to finish what remains" if not self.ok else f"{len(self.done)} applied")


def check_mass_revoke(plan: Plan, allow: bool) -> None:
    """Refuse a plan that revokes more than 25 % of the managed grants (when there are at least 10)."""
    total, revoked = plan.managed_grants, plan.revocations
    if allow or total < MASS_REVOKE_MINIMUM or revoked <= total * MASS_REVOKE_SHARE:
        return
    raise RefusedError(f"refused: the plan revokes {revoked} of {total} managed grants "
                       f"({revoked / total:.0%}, more than {MASS_REVOKE_SHARE:.0%}); "
                       "review it and pass --allow-mass-revoke to apply it")


def apply_plan(plan: Plan, providers: Mapping[str, Applies], *, concurrency: Mapping[str, int] | None = None,
               allow_mass_revoke: bool = False,
               on_change: Callable[[Change, str | None], None] | None = None) -> ApplyReport:
    check_mass_revoke(plan, allow_mass_revoke)
    for provider in providers.values():
        provider.commit_reads()
    report = ApplyReport()
    broken: set[str] = set()   # addresses that failed or were skipped: their dependants wait
    phases: dict[int, list[Change]] = defaultdict(list)
    for change in plan.changes:
        phases[change.phase].append(change)

    pools = {system: ThreadPoolExecutor((concurrency or {}).get(system, DEFAULT_CONCURRENCY),
                                        thread_name_prefix=f"apply-{system}") for system in providers}
    try:
        for phase in sorted(phases):
            futures: list[tuple[list[Change], Future[None]]] = []
            by_system: dict[str, list[Change]] = defaultdict(list)
            for change in phases[phase]:
                blocked = [d for d in (change.desired.depends_on if change.desired else ()) if d in broken]
                if blocked:
                    report.skipped.append((change, f"depends on {', '.join(blocked)}"))
                    broken.add(change.address)
                    continue
                by_system[change.system].append(change)
            for system, changes in by_system.items():
                provider = providers[system]
                for batch in provider.batches(changes):
                    futures.append((batch, pools[system].submit(provider.apply_batch, batch)))
            for batch, future in futures:
                try:
                    future.result()
                except Exception as exc:  # a failed change is reported, never lost
                    for change in batch:
                        report.failed.append((change, str(exc)))
                        broken.add(change.address)
                        log.warning("change failed address=%s error=%s", change.address, exc)
                        if on_change:
                            on_change(change, str(exc))
                    continue
                for change in batch:
                    providers[change.system].record_applied(change)
                    report.done.append(change)
                    if on_change:
                        on_change(change, None)
    finally:
        for pool in pools.values():
            pool.shutdown(wait=True)
    return report
