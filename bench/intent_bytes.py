"""Benchmark: bytes written to the state per new user on a system that already has 2,000 users.

    python bench/intent_bytes.py [--users 2000] [--new 1 20]

An in-process Abloy simulator (through the httpx transport seam) gets `--users` user accounts from one apply;
then, for each count in `--new`, that many users are added to the policy and applied. Every write the apply
makes to the state is counted as the JSON it carries (records, applied digests, notes: what a local journal
appends and what PostgreSQL receives), whatever the backend. The table gives, per apply: the users added, the
bytes written, bytes per new user, the largest single record written, and the records left in the state that
hold a set of known ids (after the apply: none should be left once every create was answered).
Creating an Abloy user has no natural key, so each create records an intent first: which user ids existed
before it was sent (`Provider.intend`). Figures, not assertions: the test suite never times anything.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from reconciler import run
from reconciler.sandbox.abloy import AbloySimulator

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
URL = "https://abloy.test/administration"


class Counting:
    """A state store that counts the bytes of every write it passes on (JSON, as a journal line carries it)."""

    def __init__(self, inner: Any):
        self._inner = inner
        self.bytes = 0
        self.largest = 0
        self.writes = 0
        self.by_what: dict[str, int] = {"intents": 0, "known-id sets": 0, "other notes": 0, "records": 0}

    def _count(self, value: Any, what: str = "records") -> None:
        size = len(json.dumps(value, sort_keys=True, separators=(",", ":")).encode())
        self.bytes += size
        self.writes += 1
        self.largest = max(self.largest, size)
        self.by_what[what] += size

    def put(self, address: str, record: Any) -> None:
        self._count({"op": "put", "address": address, "record": dict(record)},
                    "intents" if record.get("intent") else "records")
        self._inner.put(address, record)

    def delete(self, address: str) -> None:
        self._count({"op": "delete", "address": address})
        self._inner.delete(address)

    def mark_applied(self, address: str, digest: str | None) -> None:
        self._count({"op": "applied", "address": address, "digest": digest})
        self._inner.mark_applied(address, digest)

    def set_note(self, key: str, value: Any) -> None:
        if self._inner.note(key) != value:
            self._count({"op": "note", "key": key, "value": value},
                        "known-id sets" if key.startswith("known/") else "other notes")
        self._inner.set_note(key, value)

    def __enter__(self) -> Counting:
        self._inner.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def policy(users: int) -> str:
    lines = ["users:"]
    lines += [f"  u{i:05d}: {{name: User {i}, phone: \"+4791{i:06d}\"}}" for i in range(users)]
    return "\n".join(lines) + "\n"


def known_sets(state_path: Path) -> tuple[int, int]:
    """Records and notes in the saved state that carry a set of known ids, and their bytes."""
    data = json.loads(state_path.read_text())
    found = [r for r in data.get("resources", {}).values() if isinstance(r, dict) and r.get("known")]
    found += [v for k, v in data.get("notes", {}).items() if k.startswith("known/") and v]
    return len(found), sum(len(json.dumps(f)) for f in found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--new", type=int, nargs="+", default=[1, 20])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        directory = root / "policies"
        directory.mkdir()
        sim = AbloySimulator(clock=lambda: NOW)
        creds = sim.credentials
        (directory / "systems.yaml").write_text(
            f"systems:\n  hq:\n    vendor: abloy-keyless\n    url: {URL}\n    credentials:\n"
            '      user_id: "${ABLOY_USER_ID}"\n      access_key: "${ABLOY_ACCESS_KEY}"\n'
            '      api_key: "${ABLOY_API_KEY}"\n')
        env = {"ABLOY_USER_ID": creds["user_id"], "ABLOY_ACCESS_KEY": creds["access_key"],
               "ABLOY_API_KEY": creds["api_key"]}
        state_path = root / "state.json"
        counters: list[Counting] = []
        real_open = run.open_state

        def counting_open(session: run.Session) -> Any:
            counters.append(Counting(real_open(session)))
            return counters[-1]

        run.open_state = counting_open   # type: ignore[assignment]

        def apply(users: int) -> Counting:
            (directory / "people.yaml").write_text(policy(users))
            session = run.Session(directory=directory, state_path=state_path, env=env, now=NOW,
                                  transports={"hq": httpx.MockTransport(sim.handle)}, allowed_hosts=("abloy.test",))
            _, report = run.apply(session, saved=None, approve=lambda plan: True)
            assert report is not None and report.ok, report.lines() if report else "nothing applied"
            return counters[-1]

        print(f"{'apply':<22} {'new':>5} {'bytes written':>14} {'per new user':>13} {'largest write':>14} "
              f"{'sets left':>9}   bytes per new user by what was written")

        def line(label: str, new: int, counted: Counting) -> None:
            left, size = known_sets(state_path)
            parts = ", ".join(f"{what} {n // new:,}" for what, n in counted.by_what.items())
            print(f"{label:<22} {new:>5} {counted.bytes:>14,} {counted.bytes // new:>13,} {counted.largest:>14,} "
                  f"{left:>9}   {parts}")

        line(f"first: {args.users} users", args.users, apply(args.users))
        total = args.users
        for new in args.new:
            total += new
            line(f"+{new} at {total - new} users", new, apply(total))


if __name__ == "__main__":
    main()
