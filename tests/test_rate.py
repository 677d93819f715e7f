"""Rate limits are honoured by all workers together: while one waits out a 429's Retry-After nobody else
sends, and each 429 halves how many requests may be in flight, so a limit does not turn into a storm."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from reconciler.providers.http import HttpClient

WORKERS = 8


def test_nobody_sends_while_a_retry_after_is_waited_out() -> None:
    waiting = threading.Event()
    arrived_while_waiting: list[str] = []
    first = threading.Lock()
    answered_429 = []

    def handle(request: httpx.Request) -> httpx.Response:
        if waiting.is_set():
            arrived_while_waiting.append(request.url.path)
        with first:
            if not answered_429:
                answered_429.append(request.url.path)
                return httpx.Response(429, headers={"Retry-After": "1"})
        time.sleep(0.01)
        return httpx.Response(200, json={})

    sleeps: list[float] = []

    def sleep(seconds: float) -> None:      # stands for the Retry-After: long enough for the others to try
        sleeps.append(seconds)
        waiting.set()
        time.sleep(0.3)
        waiting.clear()

    client = HttpClient("https://vendor.test", system="hq", transport=httpx.MockTransport(handle), sleep=sleep)
    start = threading.Barrier(WORKERS)

    def work(n: int) -> int:
        start.wait()
        return client.request("GET", f"/item/{n}").status_code

    with ThreadPoolExecutor(WORKERS) as pool:
        assert list(pool.map(work, range(WORKERS))) == [200] * WORKERS
    client.close()
    assert sleeps == [1.0]
    assert arrived_while_waiting == []


def test_a_concurrency_limit_does_not_become_a_storm_of_429s() -> None:
    """A vendor that refuses more than 2 requests at once: every request still goes through, and the
    429s stay few (halving what is in flight, then growing it back one at a time)."""
    lock = threading.Lock()
    in_flight = [0]
    refused = [0]

    def handle(request: httpx.Request) -> httpx.Response:
        with lock:
            in_flight[0] += 1
            busy = in_flight[0] > 2
        try:
            if busy:
                with lock:
                    refused[0] += 1
                return httpx.Response(429, headers={"Retry-After": "0"})
            time.sleep(0.005)
            return httpx.Response(200, json={})
        finally:
            with lock:
                in_flight[0] -= 1

    client = HttpClient("https://vendor.test", system="hq", transport=httpx.MockTransport(handle),
                        sleep=lambda seconds: None)
    requests = 20 * WORKERS

    def work(n: int) -> int:
        return client.request("GET", f"/item/{n}").status_code

    with ThreadPoolExecutor(WORKERS) as pool:
        statuses = list(pool.map(work, range(requests)))
    client.close()
    assert statuses == [200] * requests            # nobody gave up after its retries
    assert refused[0] == client.limited
    # Without flow control 6 of 8 workers are refused on every round (hundreds of 429s, and failures).
    assert client.limited <= requests // 4, client.limited
