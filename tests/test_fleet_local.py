"""A fleet on one local state file: a lock file per system, as on PostgreSQL. Two processes applying disjoint
systems of one state hold their locks at once and both their records survive; a second apply of a system is
refused (or waits with --lock-timeout, and says it waited); `state forget` (the whole state) excludes them all.
And `state push`/`pull --target SYSTEM` move one system's records without touching the others.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from datetime import UTC, datetime

import pytest
from test_state_postgres import pg_server, pg_url  # noqa: F401

from reconciler import run
from reconciler.applier import ApplyReport
from reconciler.errors import LockedError, RefusedError
from reconciler.plan import Action, Change
from reconciler.resources import Resource
from reconciler.state import LocalState
from reconciler.state.postgres import PostgresState


def _apply_system(path: str, system: str, ready, release, count: int) -> None:
    state = LocalState(path)
    state.lock([system])
    ready.set()
    for i in range(count):
        state.put(f"{system}/user/u{i}", {"id": f"{system}-{i}"})
        state.mark_applied(f"{system}/user/u{i}", f"sha256:{i}")
    release.wait(60)
    state.__exit__(None, None, None)


def test_two_processes_apply_disjoint_systems_of_one_local_state_at_once(tmp_path):
    path = str(tmp_path / "state.json")
    ctx = multiprocessing.get_context("fork")
    events = [(ctx.Event(), ctx.Event()) for _ in range(2)]
    workers = [ctx.Process(target=_apply_system, args=(path, system, ready, release, 200))
               for system, (ready, release) in zip(("cabins", "hq"), events, strict=True)]
    for worker in workers:
        worker.start()
    try:
        assert all(ready.wait(30) for ready, _ in events)       # both hold their locks at the same time
        with pytest.raises(LockedError) as refused:
            LocalState(path).lock(["hq"])
        assert "system 'hq' of state" in str(refused.value) and f"process {workers[1].pid}" in str(refused.value)
        assert "pass --lock-timeout" in str(refused.value)
        with pytest.raises(LockedError, match=r"after waiting 0\.3s; wait longer with a larger --lock-timeout"):
            LocalState(path, lock_timeout=0.3).lock(["hq"])
        with pytest.raises(LockedError, match=r"^state .* is locked by another apply"):
            LocalState(path).lock()                              # the whole state: excluded by both
    finally:
        for _, release in events:
            release.set()
        for worker in workers:
            worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    after = LocalState(path)
    assert len(after.applied()) == 400 and len(list(after.items())) == 400
    with after:                                                  # alone now: folds whatever is left
        pass
    assert not after.journal_path.exists()
    data = json.loads(after.path.read_text())
    assert len(data["resources"]) == 400


def test_a_waiting_apply_gets_the_system_when_its_holder_is_done(tmp_path):
    path = tmp_path / "state.json"
    holder = LocalState(path)
    holder.lock(["hq"])
    other = LocalState(path)
    other.lock(["cabins"])            # another system: no wait
    other.put("cabins/user/a", {"id": "c"})
    started = time.monotonic()

    def release_later() -> None:
        time.sleep(0.5)
        holder.put("hq/user/a", {"id": "h"})
        holder.__exit__(None, None, None)

    threading.Thread(target=release_later).start()
    waiter = LocalState(path, lock_timeout=30)
    waiter.lock(["hq"])
    assert waiter.get("hq/user/a") == {"id": "h"} and time.monotonic() - started >= 0.4
    waiter.__exit__(None, None, None)
    other.__exit__(None, None, None)
    final = LocalState(path)
    assert dict(final.items()) == {"cabins/user/a": {"id": "c"}, "hq/user/a": {"id": "h"}}


def _local_with_two_systems(path) -> LocalState:
    local = LocalState(path)
    for system in ("hq", "cabins"):
        local.put(f"{system}/user/alice", {"id": f"{system}-1"})
        local.mark_applied(f"{system}/user/alice", f"sha256:{system}")
        local.set_system(system, {"vendor": "v", "account": system})
    local.set_note("evidence/hq", {"hq/user/alice": {"name": "Alice"}})
    for system in ("hq", "cabins"):      # evidence buckets and known-id sets go with their system
        local.set_note(f"evidence/{system}/07", {f"{system}/user/alice": {"name": "Alice"}})
        local.set_note(f"known/{system}/user", {"sha256:x": [f"{system}-0"]})
    local.set_note("residual", [{"address": "hq/permission/x", "until": "2030-01-01T00:00:00Z"},
                                {"address": "cabins/key/y", "until": "2030-01-01T00:00:00Z"}])
    return local


def test_state_push_and_pull_target_one_system_and_leave_the_others(pg_url, tmp_path):
    session = run.Session(directory=tmp_path, state_path=tmp_path / "unused.json", env={}, state_url=pg_url)
    _local_with_two_systems(tmp_path / "all.json")
    assert run.push_state(session, tmp_path / "all.json") == 2
    # A site's own file, newer for hq only.
    site = LocalState(tmp_path / "hq.json")
    site.put("hq/user/alice", {"id": "hq-2"})
    site.put("hq/user/bob", {"id": "hq-3"})
    site.set_system("hq", {"vendor": "v", "account": "hq"})
    with pytest.raises(RefusedError, match="already holds 1 records for hq"):
        run.push_state(session, tmp_path / "hq.json", targets=("hq",))
    assert run.push_state(session, tmp_path / "hq.json", targets=("hq",), force=True) == 2
    whole = run.pull_state(session)
    assert whole["resources"] == {"cabins/user/alice": {"id": "cabins-1"}, "hq/user/alice": {"id": "hq-2"},
                                  "hq/user/bob": {"id": "hq-3"}}
    assert whole["applied"] == {"cabins/user/alice": "sha256:cabins"}       # hq's came with the push: none
    assert whole["systems"]["cabins"] == {"vendor": "v", "account": "cabins"}
    assert whole["notes"]["residual"] == [{"address": "cabins/key/y", "until": "2030-01-01T00:00:00Z"}]
    assert "evidence/hq" not in whole["notes"]
    assert "evidence/hq/07" not in whole["notes"] and "known/hq/user" not in whole["notes"]
    assert whole["notes"]["evidence/cabins/07"] and whole["notes"]["known/cabins/user"]
    pulled = run.pull_state(session, ("cabins",))
    assert pulled == {"version": 1, "systems": {"cabins": {"vendor": "v", "account": "cabins"}},
                      "resources": {"cabins/user/alice": {"id": "cabins-1"}},
                      "applied": {"cabins/user/alice": "sha256:cabins"},
                      "notes": {"residual/cabins": [{"address": "cabins/key/y", "until": "2030-01-01T00:00:00Z"}],
                                "evidence/cabins/07": {"cabins/user/alice": {"name": "Alice"}},
                                "known/cabins/user": {"sha256:x": ["cabins-0"]}}}
    with pytest.raises(Exception, match="holds nothing of system 'nowhere'"):
        run.push_state(session, tmp_path / "hq.json", targets=("nowhere",))


def test_pull_target_from_a_local_state(tmp_path):
    _local_with_two_systems(tmp_path / "state.json")
    session = run.Session(directory=tmp_path, state_path=tmp_path / "state.json", env={})
    pulled = run.pull_state(session, ("hq",))
    assert set(pulled["resources"]) == {"hq/user/alice"} and set(pulled["systems"]) == {"hq"}
    assert pulled["notes"] == {"evidence/hq": {"hq/user/alice": {"name": "Alice"}},
                               "evidence/hq/07": {"hq/user/alice": {"name": "Alice"}},
                               "known/hq/user": {"sha256:x": ["hq-0"]},
                               "residual/hq": [{"address": "hq/permission/x", "until": "2030-01-01T00:00:00Z"}]}
    assert os.path.exists(tmp_path / "state.json.journal")


def _revoked(system: str, name: str) -> tuple[Change, dict[str, str]]:
    change = Change(Action.DELETE, None, Resource(system, "permission", f"{name}/door/OPEN", {}, id=name))
    return change, {"by": "2026-11-30T10:00:00Z", "basis": "operating keys last P8D"}


@pytest.mark.parametrize("backend", ["local", "postgresql"])
def test_two_runners_remember_the_residual_access_of_their_own_systems_at_once(backend, tmp_path, request):
    """Two runners, each holding one system's lock, both loaded the state before either wrote: each keeps its
    own system's residual entries, and neither overwrites the other's (one note per system). Entries an
    earlier version kept in the whole note still count for a system until it writes its own."""
    def open_state():
        return LocalState(tmp_path / "state.json") if backend == "local" else \
            PostgresState(request.getfixturevalue("pg_url"))

    first = open_state()
    first.set_note("residual", [{"address": "cabins/permission/old/door/OPEN", "system": "cabins",
                                 "user": "old", "device": "door", "applied_at": "2026-11-22T09:00:00Z",
                                 "until": "2026-12-01T00:00:00Z"}])
    hq, cabins = open_state(), open_state()
    hq.lock(["hq"])
    cabins.lock(["cabins"])
    try:
        for state, system, name in ((hq, "hq", "bob"), (cabins, "cabins", "eve")):
            change, enforcement = _revoked(system, name)
            run.remember_residual(state, ApplyReport(done=[change], enforcement={change.address: enforcement}),
                                  "2026-11-22T10:00:00Z")
    finally:
        hq.__exit__(None, None, None)
        cabins.__exit__(None, None, None)
    rows = run.residual_rows(open_state(), datetime(2026, 11, 23, tzinfo=UTC), ["hq", "cabins"])
    assert sorted((r.system, r.user) for r in rows) == [("cabins", "eve"), ("cabins", "old"), ("hq", "bob")]


def test_the_revision_guard_reads_each_systems_own_revision(tmp_path):
    """hq was applied from a newer commit, then cabins from an older one (by another runner, at once): the
    whole note (what earlier versions read) says the older; hq's own note still refuses the older commit."""
    state = LocalState(tmp_path / "state.json")
    newer, older = {"commit": "b" * 40, "time": 1763719200}, {"commit": "a" * 40, "time": 1763632800}
    state.set_note("revision/hq", newer)
    state.set_note("revision/cabins", older)
    state.set_note("revision", older)
    current = run.Revision("a" * 40, 1763632800)
    with pytest.raises(RefusedError, match="older: refusing to revert it"):
        run.check_revision(state, current, tmp_path, allow_older=False, systems=["hq"])
    run.check_revision(state, current, tmp_path, allow_older=False, systems=["cabins"])
    run.check_revision(state, current, tmp_path, allow_older=False, systems=["gate"])   # the whole note: older
