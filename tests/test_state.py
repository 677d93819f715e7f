"""Local state: journaled writes survive a crash, atomic snapshots, an exclusive lock."""

import json
import multiprocessing

import pytest

from reconciler.errors import LockedError
from reconciler.state import LocalState

from conftest import later


def test_put_is_durable_before_save(tmp_path):
    path = tmp_path / "state.json"
    state = LocalState(path)
    state.put("hq/user/alice", {"id": "u1"})
    # No save(): a crash here must not lose the record.
    assert LocalState(path).get("hq/user/alice") == {"id": "u1"}


def test_save_folds_journal_into_snapshot(tmp_path):
    path = tmp_path / "state.json"
    state = LocalState(path)
    state.put("a", {"id": "1"})
    state.put("b", {"id": "2"})
    state.delete("a")
    state.save()
    assert not state.journal_path.exists()
    assert json.loads(path.read_text())["resources"] == {"b": {"id": "2"}}


def test_torn_journal_line_is_ignored(tmp_path):
    path = tmp_path / "state.json"
    LocalState(path).put("a", {"id": "1"})
    with open(path.with_name("state.json.journal"), "a") as handle:
        handle.write('{"op": "put", "addr')
    assert LocalState(path).get("a") == {"id": "1"}


def _hold(path, ready, release):
    with LocalState(path):
        ready.set()
        release.wait(10)


def test_second_apply_fails_at_once_on_the_lock(tmp_path):
    path = tmp_path / "state.json"
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(path, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(LockedError, match="locked by another apply"):
            LocalState(path).lock()
    finally:
        release.set()
        holder.join(10)
    with LocalState(path):
        pass


def test_lock_timeout_waits_for_the_holder(tmp_path):
    path = tmp_path / "state.json"
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(path, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(LockedError, match="--lock-timeout"):
            LocalState(path, lock_timeout=0.3).lock()
        later(0.5, release.set)
        with LocalState(path, lock_timeout=60):
            assert release.is_set()
    finally:
        release.set()
        holder.join(10)
