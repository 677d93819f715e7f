"""One state interface (`reconciler.state.StateStore`): both backends implement it, `open_state` returns it,
providers and run.py use nothing else, and mypy tells a store that does not implement it."""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path

from reconciler import run
from reconciler.state import LocalState, StateStore, open_state
from reconciler.state.postgres import PostgresState

from test_abloy_provider import POLICY
from test_state_postgres import pg_server, pg_url  # noqa: F401 - fixtures
from test_state_protocol_fake import MemoryState

ROOT = Path(__file__).resolve().parents[1]


def test_the_local_state_is_a_state_store(tmp_path):
    state = open_state(tmp_path / "state.json")
    assert isinstance(state, LocalState) and isinstance(state, StateStore)


def test_the_postgres_state_is_a_state_store(pg_url):  # noqa: F811 - the fixture imported above
    state = open_state(pg_url)
    assert isinstance(state, PostgresState) and isinstance(state, StateStore)
    state.sync()                      # nothing to make durable: every write is committed at once
    assert state.previous_path is None


def test_open_state_is_typed_as_the_interface():
    assert typing.get_type_hints(open_state)["return"] is StateStore
    assert typing.get_type_hints(run.open_state)["return"] is StateStore


def test_a_store_missing_a_method_is_not_a_state_store():
    class NoSync:
        def get(self, address):
            return None

    assert not isinstance(NoSync(), StateStore)
    assert isinstance(MemoryState(), StateStore)


def _mypy(tmp_path: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MYPYPATH": str(ROOT / "tests")}
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
                           "--cache-dir", str(tmp_path / "cache"), *map(str, files)],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=False)


def test_mypy_accepts_the_fake_and_refuses_a_store_that_lacks_part_of_the_interface(tmp_path):
    good = _mypy(tmp_path, ROOT / "tests" / "test_state_protocol_fake.py")
    assert good.returncode == 0, good.stdout + good.stderr
    bad = tmp_path / "partial_store.py"
    bad.write_text(
        "from reconciler.state import StateStore\n"
        "from test_state_protocol_fake import MemoryState\n\n\n"
        "class Partial:\n"
        "    def get(self, address: str) -> None: ...\n\n\n"
        "class WrongSync(MemoryState):\n"
        "    def sync(self, force: bool) -> None: ...\n\n\n"
        "def partial() -> StateStore:\n"
        "    return Partial()\n\n\n"
        "def wrong() -> StateStore:\n"
        "    return WrongSync()\n")
    found = _mypy(tmp_path, bad)
    assert found.returncode == 1
    errors = [line for line in found.stdout.splitlines() if ": error:" in line]
    lines = {line.split(":")[1] for line in errors}
    assert {"14", "18"} <= lines, found.stdout     # both returns refused: neither is a StateStore


def test_a_store_of_our_own_serves_plan_and_apply(harness, monkeypatch):
    """run.py and the provider use only the interface: with an in-memory store the policy converges, each
    change a vendor confirmed is synced before the next write is sent, and apply marks what it applied."""
    store = MemoryState()
    monkeypatch.setattr(run, "open_state", lambda session: store)
    harness.write(POLICY)
    harness.converge()
    assert not harness.plan().has_changes
    assert store.digests and store.records
    assert store.identities["hq"]["vendor"] == "abloy-keyless"
    assert any(k.startswith("evidence/hq/") and v for k, v in store.notes.items())
    assert "sync" in store.calls
    first_write = next(i for i, call in enumerate(store.calls) if call.startswith("put "))
    assert "sync" in store.calls[first_write:]
    assert not (tmp := harness.tmp_path / "state" / "state.json").exists(), tmp


def test_no_caller_probes_the_state_for_a_method():
    probes = ("hasattr(state", "getattr(state", "getattr(self.state", "hasattr(self.state")
    for path in (ROOT / "reconciler").rglob("*.py"):
        text = path.read_text()
        assert not [p for p in probes if p in text], path
