"""Writes at the network's pace: a system's `concurrency:` bounds the requests in flight to its vendor, not the
workers of its apply. A worker waiting for the state to make its records durable holds no slot, so the pool
is larger than `concurrency` and the vendor still never sees more than `concurrency` requests at once; each
worker's records are durable before it sends anything that may change the vendor; and once the apply stops
itself nothing more is sent, not even by a batch already started and waiting for a slot."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_apply_run import NOW, Fake, create

from reconciler import run
from reconciler.applier import MAX_WORKERS, ApplyRun, workers
from reconciler.errors import VendorError
from reconciler.plan import Plan
from reconciler.providers.http import HttpClient
from reconciler.sandbox.abloy import AbloySimulator
from reconciler.state import LocalState

WRITERS = 8


class Counting:
    """Counts the requests the vendor is answering at once (the handler runs on the sender's thread)."""

    def __init__(self, answer: Any, pause: float = 0.0):
        self.answer = answer
        self.pause = pause
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.threads: set[str] = set()
        self.writes = 0

    def handle(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
            self.threads.add(threading.current_thread().name)
            self.writes += request.method != "GET"
        try:
            if self.pause:
                time.sleep(self.pause)
            return self.answer(request)
        finally:
            with self.lock:
                self.now -= 1


def test_the_client_holds_a_slot_only_while_a_request_is_in_flight():
    """8 threads, 2 slots, a slow state: never more than 2 requests at the vendor, and requests go out while
    2 or more workers are waiting on the state (a worker waiting on the state holds no slot)."""
    syncing = [0]
    sent_while_syncing = [0]
    lock = threading.Lock()

    def answer(request: httpx.Request) -> httpx.Response:
        with lock:
            sent_while_syncing[0] += syncing[0] >= 2
        return httpx.Response(200, json={})

    vendor = Counting(answer, pause=0.003)
    client = HttpClient("https://vendor.test", system="hq", transport=httpx.MockTransport(vendor.handle),
                        max_in_flight=2)

    def durable() -> None:       # a state commit over a slow link
        with lock:
            syncing[0] += 1
        time.sleep(0.01)
        with lock:
            syncing[0] -= 1

    client.before_write = durable
    with ThreadPoolExecutor(WRITERS) as pool:
        statuses = list(pool.map(lambda n: client.request("POST", f"/item/{n}", json={}).status_code,
                                 range(20 * WRITERS)))
    client.close()
    assert statuses == [200] * 20 * WRITERS
    assert vendor.peak == 2          # the cap was reached and never passed
    assert sent_while_syncing[0] > 0


def test_a_write_waiting_for_a_slot_is_not_sent_once_writes_are_refused():
    """One slot, held by a slow request; the others wait for it. Then writes are refused (the apply stopped
    itself): none of the waiting ones reaches the vendor, while the one in flight is answered."""
    release = threading.Event()
    arrived = threading.Event()

    def answer(request: httpx.Request) -> httpx.Response:
        arrived.set()
        while not release.is_set():
            time.sleep(0.01)
        return httpx.Response(200, json={})

    vendor = Counting(answer)
    client = HttpClient("https://vendor.test", system="hq", transport=httpx.MockTransport(vendor.handle),
                        max_in_flight=1)
    refused: list[str] = []

    def may_write() -> None:
        if refused:
            raise VendorError(refused[0])

    client.may_write = may_write
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client.request, "POST", f"/item/{n}", json={}) for n in range(4)]
        while not arrived.is_set():
            time.sleep(0.01)
        time.sleep(0.1)                         # the other three are waiting for the slot
        refused.append("hq: not sent: the apply stopped")
        release.set()
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.result().status_code)
            except VendorError as exc:
                outcomes.append(str(exc))
    client.close()
    assert sorted(map(str, outcomes)) == ["200"] + ["hq: not sent: the apply stopped"] * 3
    assert vendor.writes == 1


def test_a_halt_reaches_every_provider_and_the_pool_is_larger_than_concurrency():
    provider = Fake()

    def bug(batch):
        if batch[0].address == "hq/user/b":
            raise KeyError("bug")

    provider.hook = bug
    report = ApplyRun(Plan(now=NOW, changes=(create("a"), create("b"))), {"hq": provider}).execute()
    assert report.internal and provider.halted.startswith("apply stopped by an internal error at hq/user/b")
    assert workers(8) == 32 and workers(1) == 4 and workers(64) == 64 and workers(40) == MAX_WORKERS


def _policy(directory: Path, concurrency: int, users: int = 30, doors: int = 6) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "systems.yaml").write_text(
        f"systems:\n  site: {{vendor: abloy-keyless, url: sandbox, concurrency: {concurrency}}}\n")
    (directory / "devices.yaml").write_text("devices:\n" + "".join(
        f"  door-{d}: {{system: site, name: Door {d}}}\n" for d in range(doors)))
    (directory / "users.yaml").write_text("users:\n" + "".join(
        f"  person-{u}: {{systems: [site]}}\n" for u in range(users)))
    (directory / "access.yaml").write_text("permissions:\n" + "".join(
        f"  - users: [person-{u}]\n    devices: [door-{u % doors}, door-{(u + 1) % doors}]\n"
        "    start: 2026-01-01T00:00:00Z\n    end: 2099-12-31T23:59:59Z\n" for u in range(users)))


class SlowState(LocalState):
    """A local state whose `sync` takes a while (a commit over a slow link), and that checks, at every write
    a worker sends, that what this worker recorded is durable by then (the handler runs on its thread)."""

    def __init__(self, path: Path, **kwargs: Any):
        super().__init__(path, **kwargs)
        self.guard = threading.Lock()
        self.count = 0
        self.durable = 0
        self.last: dict[int, int] = {}      # thread → the number of its latest write
        self.late: list[str] = []

    def _recorded(self) -> None:
        with self.guard:
            self.count += 1
            self.last[threading.get_ident()] = self.count

    def put(self, address, record):
        super().put(address, record)
        self._recorded()

    def delete(self, address):
        super().delete(address)
        self._recorded()

    def mark_applied(self, address, attributes_digest):
        super().mark_applied(address, attributes_digest)
        self._recorded()

    def sync(self):
        with self.guard:
            upto = self.count
        time.sleep(0.005)
        super().sync()
        with self.guard:
            self.durable = max(self.durable, upto)

    def check_sent(self, request: httpx.Request) -> None:
        with self.guard:
            mine = self.last.get(threading.get_ident(), 0)
            if request.method != "GET" and mine > self.durable:
                self.late.append(f"{request.method} {request.url.path}")


@pytest.mark.parametrize("concurrency", [1, 3])
def test_an_apply_never_has_more_than_concurrency_requests_in_flight(tmp_path, monkeypatch, concurrency):
    """Through the whole apply (policy, factory, applier, provider): the vendor never sees more than the
    system's `concurrency:` requests at once, while more workers than that send (the pool is larger), and
    every worker's records are durable before each write it sends."""
    _policy(tmp_path / "policy", concurrency)
    sim = AbloySimulator()
    state = SlowState(tmp_path / "state.json")
    monkeypatch.setattr(run, "open_state", lambda session: state)

    def answer(request: httpx.Request) -> httpx.Response:
        state.check_sent(request)
        return sim.handle(request)

    vendor = Counting(answer, pause=0.002)
    session = run.Session(directory=tmp_path / "policy", state_path=tmp_path / "state.json", env={},
                          now=datetime(2026, 11, 22, 10, tzinfo=UTC),
                          transports={"site": httpx.MockTransport(vendor.handle)})
    _, report = run.apply(session, saved=None, approve=lambda plan: True)
    assert report is not None and report.ok, report.summary()
    assert len(report.done) == 6 + 30 + 60
    assert vendor.peak == concurrency
    senders = {t for t in vendor.threads if t.startswith("apply-site")}
    assert len(senders) > concurrency       # more workers than slots took part
    assert state.late == []
