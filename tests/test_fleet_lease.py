"""The shared state's lock as people meet it, against the real PostgreSQL server (RECONCILER_TEST_PG): a lease
its holder renews (a holder that stopped renewing is taken over after its lease; a live one never is), waiters
served in the order they came, and the records of many workers committed together (group commit) with every
one of them in the database once `sync()` returns. Holders are separate processes where the test stops one
(SIGSTOP); the lease is made short through the state URL (`lease=`) so that nothing waits long.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from reconciler.errors import LockedError
from reconciler.state.postgres import PostgresState, StateLocation, StateUnavailableError

from test_state_postgres import _raw, pg_server, pg_url  # noqa: F401

HOLDER = """
import sys
from reconciler.state.postgres import PostgresState
state = PostgresState(sys.argv[1])
state.lock([sys.argv[2]])
print("locked", flush=True)
sys.stdin.readline()                 # until the test says: write something
try:
    state.put(sys.argv[2] + "/user/late", {"id": "late"})
    state.sync()
    print("wrote", flush=True)
except Exception as exc:
    print("refused:", exc, flush=True)
"""


def _holder(url: str, system: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, url, system], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "locked", process.stderr.read() if process.stderr else ""
    return process


def _after(process: subprocess.Popen[str]) -> str:
    """Let the holder try to write; what it said."""
    out, _ = process.communicate("go\n", timeout=60)
    return out


def _end(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGCONT)
    process.kill()
    process.communicate()


def test_a_holder_that_stops_renewing_is_taken_over_after_its_lease(pg_url, caplog):
    holder = _holder(pg_url + "&lease=1", "hq")
    try:
        holder.send_signal(signal.SIGSTOP)          # stuck: it renews nothing from now on
        taker = PostgresState(pg_url, lock_timeout=60)
        with caplog.at_level(logging.WARNING, logger="reconciler.state.postgres"):
            taker.lock(["hq"])
        took = [r.getMessage() for r in caplog.records if "took over" in r.getMessage()]
        assert len(took) == 1, caplog.text
        assert f"system 'hq' of state {taker.location} from host {socket.gethostname()}, process {holder.pid}" \
            in took[0] and "had not renewed its lease" in took[0] and "(lease 1s)" in took[0]
        taker.put("hq/user/new", {"id": "n1"})
        taker.sync()
        holder.send_signal(signal.SIGCONT)          # it wakes without its lock: it must not write
        assert _after(holder).startswith("refused:")
        taker.unlock()
        rows = dict(_raw(pg_url, "SELECT address, record->>'id' FROM {s}.resources"))
        assert rows == {"hq/user/new": "n1"}
    finally:
        _end(holder)


def test_a_live_holder_is_never_taken_over(pg_url, caplog):
    holder = _holder(pg_url + "&lease=1", "hq")
    try:
        waiter = PostgresState(pg_url, lock_timeout=4)        # four of the holder's leases
        with caplog.at_level(logging.WARNING, logger="reconciler.state.postgres"), \
                pytest.raises(LockedError) as refused:
            waiter.lock(["hq"])
        assert "took over" not in caplog.text
        assert f"process {holder.pid}" in str(refused.value) and "lease renewed" in str(refused.value)
        assert _after(holder) == "wrote\n"                    # it kept its lock all along
    finally:
        _end(holder)


def test_a_lease_in_the_url_is_checked(pg_server):
    with pytest.raises(Exception, match="lease must be seconds between 1 and 86400"):
        StateLocation(f"{pg_server}?schema=x&lease=0.1")
    assert StateLocation(f"{pg_server}?schema=x&lease=90s").lease == 90.0


def test_waiters_get_the_lock_in_the_order_they_came(pg_url):
    holder = PostgresState(pg_url)
    holder.lock(["hq"])
    order: list[int] = []
    errors: list[BaseException] = []
    # The last to come polls most often: without a line it would be the first to find the lock free.
    polls = [0.6, 0.3, 0.02]

    def wait(index: int) -> None:
        try:
            state = PostgresState(pg_url, lock_timeout=120, sleep=lambda s: time.sleep(min(s, polls[index]) if
                                                                                   s < 0.2 else polls[index]))
            state.lock(["hq"])
            order.append(index)
            time.sleep(0.3)
            state.unlock()
        except BaseException as exc:      # reported by the test below
            errors.append(exc)

    threads = []
    for index in range(3):
        thread = threading.Thread(target=wait, args=(index,))
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 30
        while _raw(pg_url, "SELECT count(*) FROM {s}.waiters WHERE name = 'hq'")[0][0] < index + 1:
            assert time.monotonic() < deadline and not errors, errors
            time.sleep(0.05)
    holder.unlock()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert order == [0, 1, 2]
    assert _raw(pg_url, "SELECT count(*) FROM {s}.waiters")[0][0] == 0     # each left the line


def test_workers_records_are_committed_together_and_all_there_once_sync_returns(pg_url):
    state = PostgresState(pg_url)
    state.lock(["hq"])
    seen: list[tuple[int, int]] = []

    def worker(n: int) -> None:
        for i in range(40):
            state.put(f"hq/user/w{n}-{i}", {"id": f"{n}-{i}"})
            state.mark_applied(f"hq/user/w{n}-{i}", f"sha256:{i}")
            state.sync()
            if i == 39:       # what this worker queued is in the database now, seen from elsewhere
                seen.append(tuple(_raw(pg_url, "SELECT count(*), (SELECT count(*) FROM {s}.applied WHERE address "
                                               "LIKE %s) FROM {s}.resources WHERE address LIKE %s",
                                       f"hq/user/w{n}-%", f"hq/user/w{n}-%")[0]))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert seen == [(40, 40)] * 8
    assert state.commits < 8 * 40             # 640 writes, 320 syncs: commits shared between workers
    state.unlock()
    assert _raw(pg_url, "SELECT count(*) FROM {s}.resources")[0][0] == 320


def test_a_write_after_the_lock_was_broken_is_refused_by_the_fence(pg_url):
    state = PostgresState(pg_url)
    state.lock(["hq"])
    state.put("hq/user/a", {"id": "1"})
    state.sync()
    # Another runner moves the lock's epoch on (as a takeover does) while this one's connections live on.
    location = StateLocation(pg_url)
    with location.connect() as other:
        other.execute(f"UPDATE {location.schema}.locks SET epoch = epoch + 1 WHERE name = 'hq'")
    state.put("hq/user/b", {"id": "2"})
    with pytest.raises(StateUnavailableError, match="took the lock over"):
        state.sync()
    with pytest.raises(StateUnavailableError):
        state.sync()                       # and stays refused: nothing more may be sent
    state.unlock()
    assert [a for (a,) in _raw(pg_url, "SELECT address FROM {s}.resources")] == ["hq/user/a"]


def test_the_helper_connections_count_in_the_limits(pg_url):
    """One runner's apply uses the lock's connection and a helper, and no more."""
    state = PostgresState(pg_url)
    state.lock(["hq"])
    for i in range(20):
        state.put(f"hq/user/{i}", {"id": str(i)})
    state.sync()
    mine = _raw(pg_url, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s",
                f"reconciler apply %pid {os.getpid()}")[0][0]
    assert 1 <= mine <= 2
    state.unlock()
