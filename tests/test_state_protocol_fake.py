"""A state store of our own, in memory: the smallest thing that implements `StateStore`. It shows that the
interface is the whole contract (a provider and run.py work with it), and mypy checks it against the
Protocol (test_state_protocol.py runs mypy on it)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Self

from reconciler.state import StateStore


class MemoryState:
    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.digests: dict[str, str] = {}
        self.identities: dict[str, dict[str, str]] = {}
        self.notes: dict[str, Any] = {}
        self.calls: list[str] = []     # the writes and syncs, in order

    @property
    def location(self) -> str:
        return "memory"

    @property
    def previous_path(self) -> Path | None:
        return None

    def get(self, address: str) -> dict[str, Any] | None:
        record = self.records.get(address)
        return dict(record) if record is not None else None

    def items(self, prefix: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
        return iter([(a, dict(r)) for a, r in sorted(self.records.items()) if a.startswith(prefix)])

    def id_of(self, address: str) -> str | None:
        record = self.records.get(address)
        return str(record["id"]) if record and record.get("id") else None

    def applied(self) -> dict[str, str]:
        return dict(self.digests)

    def systems(self) -> dict[str, dict[str, str]]:
        return {name: dict(identity) for name, identity in self.identities.items()}

    def note(self, key: str) -> Any:
        return self.notes.get(key)

    def moved(self, rename: Callable[[str], str | None]) -> list[tuple[str, str]]:
        known = set(self.records) | set(self.digests)
        return [(a, t) for a in sorted(known) if (t := rename(a)) is not None and t != a and t not in known]

    def snapshot(self) -> dict[str, Any]:
        return {"version": 1, "systems": self.systems(), "resources": dict(self.records), "applied": self.applied(),
                "notes": dict(self.notes)}

    def put(self, address: str, record: Mapping[str, Any]) -> None:
        self.calls.append(f"put {address}")
        self.records[address] = dict(record)

    def delete(self, address: str) -> None:
        self.calls.append(f"delete {address}")
        self.records.pop(address, None)

    def mark_applied(self, address: str, attributes_digest: str | None) -> None:
        self.calls.append(f"applied {address}")
        if attributes_digest is None:
            self.digests.pop(address, None)
        else:
            self.digests[address] = attributes_digest

    def set_system(self, name: str, identity: Mapping[str, str]) -> None:
        self.identities[name] = dict(identity)

    def set_note(self, key: str, value: Any) -> None:
        self.notes[key] = value

    def move(self, pairs: list[tuple[str, str]], *, persist: bool) -> None:
        for old, new in pairs:
            if old in self.records:
                self.records[new] = self.records.pop(old)
            if old in self.digests:
                self.digests[new] = self.digests.pop(old)

    def sync(self) -> None:
        self.calls.append("sync")

    def check_writable(self) -> None:
        pass

    def save(self) -> None:
        self.calls.append("save")

    def lock(self, systems: Iterable[str] | None = None) -> None:
        pass

    def unlock(self) -> None:
        pass

    def __enter__(self) -> Self:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()


def as_store(state: MemoryState) -> StateStore:
    """Where mypy checks that the fake is a `StateStore`."""
    return state
