"""A hostile vendor at the HTTP level: slow, huge or endless answers, proxies in the environment, echoed
secrets, dated Retry-After. Through the httpx transport seam (and loopback sockets for the proxy case)."""

from __future__ import annotations

import base64
import gzip
import json
import socket
import threading
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from reconciler.errors import VendorError
from reconciler.providers.answers import VendorFault
from reconciler.providers.http import AnswerTooLarge, Deadline, DeadlineExceeded, HttpClient, Interrupted, Redactor

from test_abloy_provider import POLICY
from test_hostile_vendor import hostile, listing


def drip(seconds: float, stop: threading.Event | None = None):
    """A body that never ends: one byte every `seconds`."""
    def body():
        yield b'{"items": ['
        while stop is None or not stop.is_set():
            time.sleep(seconds)
            yield b" "
    return body()


def test_the_deadline_covers_the_body_not_only_the_first_byte():
    # Finding 3: an answer dripping a byte at a time kept `plan` running far past its deadline.
    client = HttpClient("https://vendor.test", system="hq", transport=httpx.MockTransport(
        lambda request: httpx.Response(200, headers={"Content-Type": "application/json"}, content=drip(0.05))))
    client.start_phase(Deadline(0.5))
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="hq: the vendor did not answer within 0.5 s"):
        client.request("GET", "/items")
    assert time.monotonic() - started < 5


def test_ctrl_c_stops_reading_an_answer_at_once():
    stop = threading.Event()
    client = HttpClient("https://vendor.test", system="hq", transport=httpx.MockTransport(
        lambda request: httpx.Response(200, headers={"Content-Type": "application/json"}, content=drip(0.05))))
    client.start_phase(Deadline(600), stop)

    def interrupt():
        time.sleep(0.3)
        stop.set()
    threading.Thread(target=interrupt, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(Interrupted, match="interrupted while reading the answer"):
        client.request("GET", "/items")
    assert time.monotonic() - started < 5


def test_a_drip_fed_listing_stops_the_plan_at_the_systems_deadline(harness):
    harness.write(POLICY, system_extra="deadline: 1\n")
    stop = threading.Event()

    def rewrite(request, response):
        if request.method == "GET" and request.url.path.endswith("/user"):
            return httpx.Response(200, headers={"Content-Type": "application/json"}, content=drip(0.1, stop))
        return response
    hostile(harness, rewrite)
    started = time.monotonic()
    try:
        with pytest.raises(VendorError, match="did not answer within 1 s"):
            harness.plan()
    finally:
        stop.set()
    assert time.monotonic() - started < 10


def test_an_answer_is_capped_after_decompression():
    # Finding 4: a 1 GB chunked listing took 3.1 GB of memory; a 1 MB gzip bomb 2.1 GB.
    bomb = gzip.compress(b" " * (8 << 20))
    assert len(bomb) < (1 << 20)        # under the cap as sent: only the decompressed size is over it
    client = HttpClient("https://vendor.test", system="hq", max_answer_bytes=1 << 20, transport=httpx.MockTransport(
        lambda request: httpx.Response(200, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
                                       content=bomb)))
    with pytest.raises(AnswerTooLarge, match=r"hq: GET /items: the answer is larger than 1 MiB .*max_answer_mb"):
        client.request("GET", "/items")

    sent = []

    def large():                        # 8 MiB in all, far past the cap: reading stops at the cap
        for _ in range(128):
            sent.append(65536)
            yield b" " * 65536
    client = HttpClient("https://vendor.test", system="hq", max_answer_bytes=2 << 20, transport=httpx.MockTransport(
        lambda request: httpx.Response(200, headers={"Content-Type": "application/json"}, content=large())))
    with pytest.raises(AnswerTooLarge):
        client.request("GET", "/items")
    assert sum(sent) <= (2 << 20) + 65536, sum(sent)     # not read to the end, nor held in memory


def test_an_answer_under_the_cap_is_read_whole():
    body = b'{"items": []}' + b" " * ((1 << 20) - 64)
    client = HttpClient("https://vendor.test", system="hq", max_answer_bytes=1 << 20, transport=httpx.MockTransport(
        lambda request: httpx.Response(200, headers={"Content-Type": "application/json"}, content=body)))
    assert client.request("GET", "/items").content == body


def test_a_system_setting_sets_the_cap(harness):
    harness.write(POLICY, system_extra="max_answer_mb: 200\n")
    from reconciler import run
    session = harness.session()
    policy = run.validate(session)
    providers = run.build_providers(session, policy, run.open_state(session))
    assert providers["hq"].max_answer_bytes == 200 << 20
    assert providers["hq"].http.max_answer_bytes == 200 << 20


@pytest.mark.parametrize("cap, refused", [(1, True), (4, False)])
def test_the_systems_cap_applies_to_its_listings(harness, cap, refused):
    # A 2 MiB user listing (padded): refused under `max_answer_mb: 1` naming the setting, read under 4.
    harness.write(POLICY, system_extra=f"max_answer_mb: {cap}\n")

    def pad(request, response):
        if request.method == "GET" and request.url.path.endswith("/user"):
            body = response.json()
            body["padding"] = "x" * (2 << 20)
            return httpx.Response(200, headers={"Content-Type": "application/json"}, content=json.dumps(body).encode())
        return response
    hostile(harness, pad)
    if refused:
        with pytest.raises(AnswerTooLarge, match=r"hq: GET \S*/user: the answer is larger than 1 MiB"):
            harness.plan()
    else:
        assert harness.plan() is not None


def test_a_page_token_sent_twice_stops_the_paging(harness):
    # Finding 9: the same page token again (or a new one forever) was bounded only by the deadline:
    # 15,596 requests and 230 MB.
    harness.write(POLICY)
    pages = []

    def rewrite(request, response):
        if request.method == "GET" and request.url.path.endswith("/user"):
            pages.append(request.url.params.get("next-page-token"))
            body = response.json() if not pages[1:] else {"items": []}    # the simulator knows no such token
            body["nextPageToken"] = "loop-token"
            return httpx.Response(200, headers={"Content-Type": "application/json"}, content=json.dumps(body).encode())
        return response
    hostile(harness, rewrite)
    with pytest.raises(VendorFault, match="the vendor sent page token loop-token twice"):
        harness.plan()
    assert len(pages) == 2


def test_endless_new_page_tokens_stop_at_the_page_cap(harness, monkeypatch):
    import reconciler.providers.abloy as abloy

    monkeypatch.setattr(abloy, "MAX_PAGES", 20)
    harness.write(POLICY)
    count = []

    def rewrite(request, response):
        if request.method == "GET" and request.url.path.endswith("/user"):
            count.append(1)
            return httpx.Response(200, headers={"Content-Type": "application/json"},
                                  content=json.dumps({"items": [], "nextPageToken": f"t{len(count)}"}).encode())
        return response
    hostile(harness, rewrite)
    with pytest.raises(VendorFault, match="more than 20 pages"):
        harness.plan()
    assert len(count) == 21


class _Listener:
    """A loopback socket that records who connects and answers 502: a stand-in for a hostile proxy."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.seen: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(65536)
                self.seen.append(data)
                body = b'{"token": "from-the-listener"}'
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)

    def close(self) -> None:
        self.sock.close()


def test_environment_proxies_do_not_get_the_credentials(monkeypatch):
    # Finding 10: with HTTP_PROXY/ALL_PROXY set, the Abloy login (API key header, access key body) went to
    # that listener. Now the proxy and CA variables count only when the operator opts in.
    proxy, vendor = _Listener(), _Listener()
    try:
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        client = HttpClient(f"http://127.0.0.1:{vendor.port}", system="hq", headers={"X-Api-Key": "secret-api-key"})
        client.request("POST", "/login", json={"accessKey": "secret-access-key"}, authenticated=False)
        assert not proxy.seen
        assert vendor.seen and b"secret-api-key" in vendor.seen[0]
        # The operator's opt-in (--trust-env-proxy) sends through the proxy.
        trusting = HttpClient(f"http://127.0.0.1:{vendor.port}", system="hq", trust_env=True)
        trusting.request("GET", "/anything")
        assert proxy.seen
    finally:
        proxy.close()
        vendor.close()


def test_the_trust_env_proxy_flag_reaches_the_providers(harness, monkeypatch):
    from click.testing import CliRunner

    from reconciler import cli, run

    seen = {}
    real = run.build_providers

    def spy(session, policy, state):
        seen["options"] = dict(session.provider_options)
        raise SystemExit(0)
    monkeypatch.setattr(run, "build_providers", spy)
    harness.write(POLICY)
    for args, env, want in ((["--trust-env-proxy"], {}, True), ([], {"RECONCILER_TRUST_ENV_PROXY": "1"}, True),
                            ([], {}, False)):
        seen.clear()
        CliRunner().invoke(cli.main, ["plan", "-d", str(harness.policy_dir), "--allow-host", "abloy.test", *args],
                           env={**harness.env, **env})
        assert seen, "plan did not reach the providers"
        assert seen["options"].get("trust_env", False) is want
    assert real is not None


@pytest.mark.parametrize("form", [
    lambda s: json.dumps(s)[1:-1].replace("/", "\\/"),
    lambda s: urllib.parse.quote(s, safe=""),
    lambda s: urllib.parse.quote_plus(s),
    lambda s: base64.b64encode(s.encode()).decode(),
    lambda s: base64.urlsafe_b64encode(s.encode()).decode().rstrip("="),
])
def test_redaction_covers_encoded_forms_of_each_secret(form):
    # Finding 11: a secret echoed JSON-escaped (`\/`) or URL-encoded was printed.
    secret = "k3y/with+odd=chars é"
    echoed = form(secret)
    assert echoed != secret
    client = HttpClient("https://vendor.test", system="hq", redactor=Redactor([secret]),
                        transport=httpx.MockTransport(lambda request: httpx.Response(
                            400, text=f"bad key {echoed}")))
    with pytest.raises(VendorError) as caught:
        client.request("GET", "/items")
    assert echoed not in str(caught.value) and "***" in str(caught.value)


def test_retry_after_as_an_http_date_is_read_against_the_session_clock():
    # Finding 12: `Retry-After` as an HTTP date was ignored (the backoff's own short delay was used).
    now = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)      # the session's clock, not the machine's
    answers = iter([httpx.Response(503, headers={"Retry-After": format_datetime(now + timedelta(seconds=42),
                                                                                usegmt=True)}),
                    httpx.Response(200, json={})])
    slept: list[float] = []
    client = HttpClient("https://vendor.test", system="hq", sleep=slept.append, clock=lambda: now,
                        transport=httpx.MockTransport(lambda request: next(answers)))
    client.request("GET", "/items")
    assert slept == [42.0]
    # Capped as the seconds form is.
    answers = iter([httpx.Response(503, headers={"Retry-After": format_datetime(now + timedelta(hours=5),
                                                                                usegmt=True)}),
                    httpx.Response(200, json={})])
    slept.clear()
    client.request("GET", "/items")
    assert slept == [60.0]


def test_a_dated_retry_after_through_a_provider_is_read_against_the_session_clock(harness):
    # The harness's clock is 2026-11-22 10:00 whatever the machine's says (the suite runs 1100 days ahead too):
    # a date 42 s after it means a 42 s wait, never one measured from the wall clock.
    harness.write(POLICY)
    answered = []

    def limited(request, response):
        if request.method == "GET" and request.url.path.endswith("/user") and not answered:
            answered.append(1)
            return httpx.Response(503, headers={"Retry-After": format_datetime(harness.now + timedelta(seconds=42),
                                                                               usegmt=True)})
        return response
    hostile(harness, limited)
    harness.plan()
    assert answered and 42.0 in harness.sleeps, harness.sleeps
