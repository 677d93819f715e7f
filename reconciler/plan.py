"""The plan: a sorted, serialisable, checksummed value.

The planner builds it, renderers format `to_dict()`, and the applier executes its changes. The checksum
covers what apply would do (the changes), so a saved plan can be compared with a fresh one to refuse a
stale plan.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from enum import StrEnum
from typing import Any, Mapping

from reconciler.resources import GRANT_KINDS, Kind, Resource

FORMAT_VERSION = 1


class Action(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    REPLACE = "replace"


class Effect(StrEnum):
    GRANT = "grant"
    REVOKE = "revoke"
    NONE = "none"




def phase_of(action: Action, kind: str) -> int:
    """0: revoke grants; 1: remove associations; 2: remove users, devices, gateways;
    3: create/update users, devices, gateways; 4: everything that depends on them."""
    if action is Action.DELETE:
        if kind in GRANT_KINDS:
            return 0
        if kind in (Kind.ASSOCIATION, Kind.INVITATION):
            return 1
        return 2
    if kind in (Kind.USER, Kind.DEVICE, Kind.GATEWAY):
        return 3
    return 4


def effect_of(action: Action, kind: str) -> Effect:
    if kind in GRANT_KINDS or kind == Kind.USER:
        if action is Action.CREATE or action is Action.REPLACE:
            return Effect.GRANT if kind in GRANT_KINDS else Effect.NONE
        if action is Action.DELETE:
            return Effect.REVOKE
    return Effect.NONE


@dataclass(frozen=True)
class Change:
    action: Action
    desired: Resource | None
    live: Resource | None
    changed: tuple[str, ...] = ()
    origin: str | None = None     # "policy": the YAML changed; "drift": the live system changed outside git

    @property
    def resource(self) -> Resource:
        resource = self.desired or self.live
        assert resource is not None
        return resource

    @property
    def address(self) -> str:
        return self.resource.address

    @property
    def system(self) -> str:
        return self.resource.system

    @property
    def kind(self) -> str:
        return self.resource.kind

    @property
    def effect(self) -> Effect:
        return effect_of(self.action, self.kind)

    @property
    def phase(self) -> int:
        return phase_of(self.action, self.kind)

    @property
    def source(self) -> str | None:
        return self.desired.source if self.desired else None

    def to_dict(self) -> dict[str, Any]:
        before = _side(self.live) if self.action is not Action.CREATE else None
        after = _side(self.desired) if self.action is not Action.DELETE else None
        data: dict[str, Any] = {
            "address": self.address, "system": self.system, "kind": self.kind,
            "action": str(self.action), "effect": str(self.effect),
            "before": before, "after": after, "source": self.source,
        }
        if self.changed:
            data["changed"] = list(self.changed)
        if self.origin:
            data["origin"] = self.origin
        meta = self.desired.meta if self.desired else {}
        if meta.get("reason"):
            data["reason"] = meta["reason"]
        if meta.get("via"):
            data["via"] = list(meta["via"])
        return data


def _side(resource: Resource | None) -> dict[str, Any] | None:
    if resource is None:
        return None
    data = dict(resource.attributes)
    if resource.id is not None:
        data["id"] = resource.id
    return data


@dataclass(frozen=True)
class Note:
    """A line of a plan that is not a change: pending, unmanaged, or a warning."""

    address: str
    message: str
    system: str = ""
    kind: str = ""
    details: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"address": self.address, "message": self.message}
        if self.system:
            data["system"] = self.system
        if self.kind:
            data["kind"] = self.kind
        data.update(dict(self.details))
        return data


@dataclass(frozen=True)
class Plan:
    now: str
    changes: tuple[Change, ...] = ()
    pending: tuple[Note, ...] = ()
    unmanaged: tuple[Note, ...] = ()
    warnings: tuple[Note, ...] = ()
    managed_grants: int = 0          # live grants on managed devices: the base of the mass-revoke rail
    policy_digest: str = ""          # of the desired resources: a saved plan is refused when it changes
    live_digests: Mapping[str, str] = field(default_factory=dict)   # of the live side of each change

    def __post_init__(self) -> None:
        object.__setattr__(self, "changes", tuple(sorted(self.changes, key=lambda c: (c.address, c.action))))
        for name in ("pending", "unmanaged", "warnings"):
            object.__setattr__(self, name, tuple(sorted(getattr(self, name), key=lambda n: (n.address, n.message))))

    @property
    def has_changes(self) -> bool:
        return bool(self.changes)

    def summary(self) -> dict[str, int]:
        counts = {str(action): 0 for action in Action}
        for change in self.changes:
            counts[str(change.action)] += 1
        return counts

    @property
    def revocations(self) -> int:
        return sum(1 for c in self.changes if c.effect is Effect.REVOKE and c.kind in GRANT_KINDS)

    def checksum(self) -> str:
        return self._checksum

    @cached_property
    def _checksum(self) -> str:
        # A plan is immutable, and serialising thousands of changes is not free: compute it once.
        payload = json.dumps([c.to_dict() for c in self.changes], sort_keys=True, separators=(",", ":"),
                             default=str)
        return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "now": self.now,
            "checksum": self.checksum(),
            "digests": {"policy": self.policy_digest, "live": dict(sorted(self.live_digests.items()))},
            "summary": self.summary(),
            "changes": [c.to_dict() for c in self.changes],
            "pending": [n.to_dict() for n in self.pending],
            "unmanaged": [n.to_dict() for n in self.unmanaged],
            "warnings": [n.to_dict() for n in self.warnings],
        }
