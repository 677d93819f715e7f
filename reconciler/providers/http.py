"""The one HTTP client every provider uses: auth hand-off, retries, rate limit, deadlines, redaction.

Providers call `HttpClient.request()`; it adds the vendor's headers and token, and reads every failure by
what it says about the request:
- 429 and 503 mean *not processed*: retried for any method, with capped exponential backoff and jitter,
  honouring `Retry-After`; so are connection errors before anything was sent.
- At most `max_in_flight` requests (the system's `concurrency:`) are in flight at once, whatever the number of
  worker threads: a slot is held only while a request is sent and its answer read, never while its worker
  waits for the state to make a record durable (`before_write` runs before the slot is taken).
- A rate limit is honoured by all workers together, without a storm of 429s: while one worker waits out
  a 429's `Retry-After`, the others send nothing; and each 429 halves how many requests may be in flight
  at once, or cuts it to what the answers of the last second show the limit sustains (their count times
  the time an answer takes), whichever is less (once per round: the 429s of requests sent before the cut
  count as one); that number then grows
  back by one for every window of answers without one (additive increase, multiplicative decrease, as
  TCP does), up to just below where the limit was met; that level is tried again only after
  `PROBE_AFTER` answers. The vendors document no rate headers but `Retry-After`.
- 502, 504, timeouts and connections lost after sending mean *uncertain*: a repeatable request (GET, PUT,
  DELETE) is retried; a create is never repeated here: it raises `VendorError(ambiguous=True)` so that
  the provider looks up whether it landed.
- 401 with a token: log in again once. A failed login is remembered and shared by every worker of the
  client (until the next phase), instead of each worker repeating the whole login sequence.
Every request also respects the phase's `Deadline` (one per system for reads and for apply; each request's
timeout is capped by what remains of it) and a `stop` event (Ctrl-C: nothing new is sent). Every failure is
a one-line `VendorError` with all secrets redacted. Requests go only to the base URL's scheme, host and port
(credentials never travel elsewhere); a redirect is reported, never followed; neither a TLS failure (a wrong
or untrusted certificate) nor an unknown host name is retried: each says so in one line.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import json
import logging
import random
import socket
import ssl
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx

from reconciler.errors import VendorError
from reconciler.providers.answers import error_body, loads
from reconciler.text import printable

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})
UNLIMITED = 1 << 30      # requests in flight before any 429: as many as there are workers
PROBE_AFTER = 256        # answers without a 429 before trying again the level that met the limit
NOT_PROCESSED = frozenset({429, 503})        # the vendor says it did nothing: safe to send again
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Redactor:
    """Replaces every registered secret by `***` in text bound for logs, errors or output."""

    def __init__(self, secrets: Iterable[str] = ()):
        self._secrets: set[str] = {s for s in secrets if s}
        self._lock = threading.Lock()
        self._forms = _all_forms(self._secrets)

    def add(self, secret: str | None) -> None:
        if secret:
            with self._lock:
                if secret not in self._secrets:
                    self._secrets.add(secret)
                    self._forms = _all_forms(self._secrets)

    def __call__(self, text: str) -> str:
        with self._lock:
            secrets = self._forms
        for secret in secrets:
            text = text.replace(secret, "***")
        return text


def _all_forms(secrets: Iterable[str]) -> list[str]:
    return sorted({form for s in secrets for form in _forms(s)}, key=len, reverse=True)


def _forms(secret: str) -> set[str]:
    """A secret as a vendor may echo it: as it is, JSON-escaped (`\\/`, `\\u00e9`), URL-encoded (`%2F`, `+`)
    and base64 (standard and URL-safe, with and without padding)."""
    forms = {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1],
             secret.replace("/", "\\/"), json.dumps(secret)[1:-1].replace("/", "\\/"),
             urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret), urllib.parse.quote(secret)}
    raw = secret.encode()
    for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        text = encoded.decode()
        forms |= {text, text.rstrip("=")}
    return {f for f in forms if len(f) >= min(4, len(secret))}


class DeadlineExceeded(VendorError):
    """The phase's deadline passed before the vendor gave a usable answer."""


class Interrupted(VendorError):
    """Stopped on request (Ctrl-C) before this request was sent, or while its answer was read."""


class AnswerTooLarge(VendorError):
    """An answer larger than the system's cap (`max_answer_mb`), counted after decompression."""


MAX_ANSWER_BYTES = 64 << 20      # per answer, after decompression; a system's `max_answer_mb` raises it


class Deadline:
    """A time budget on the monotonic clock, shared by every worker of a provider for one phase.

    `renewing=True` restarts the budget at every usable answer (apply: a long apply that keeps getting
    answers is not hung); otherwise it is one overall budget (reads)."""

    def __init__(self, seconds: float, *, renewing: bool = False, monotonic: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self.renewing = renewing
        self._monotonic = monotonic
        self._end = monotonic() + seconds

    def remaining(self) -> float:
        return self._end - self._monotonic()

    def answered(self) -> None:
        if self.renewing:
            self._end = self._monotonic() + self.seconds


class HttpClient:
    """Sync client shared by a provider's worker threads.

    `authenticate(client) -> (headers, lifetime)` returns the auth headers and how many seconds they stay
    valid from when they were asked for (None: until the vendor answers 401); it may call
    `client.send_raw` to log in. The lifetime is measured on this machine's monotonic clock, never by
    comparing the vendor's wall time with ours: the two clocks may differ by minutes, or by years in a
    sandbox. Headers are renewed ahead of expiry by a margin that scales with the lifetime
    (`renewal_margin`), and once on a 401. One login serves every worker thread. `describe(response) ->
    str` turns a vendor error body into one line.
    """

    def __init__(self, base_url: str, *, system: str, headers: dict[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None, redactor: Redactor | None = None,
                 authenticate: Callable[[HttpClient], tuple[dict[str, str], float | None]] | None = None,
                 describe: Callable[[httpx.Response], str] | None = None,
                 max_attempts: int = 6, max_backoff: float = 30.0, timeout: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic,
                 clock: Callable[[], datetime] | None = None, trust_env: bool = False,
                 max_answer_bytes: int = MAX_ANSWER_BYTES, max_in_flight: int | None = None):
        self.system = system
        self.clock = clock           # the session's clock: a Retry-After date is read against it
        self.max_answer_bytes = max_answer_bytes
        self.redact = redactor or Redactor()
        self._authenticate = authenticate
        self._describe = describe or _describe_plain
        self._auth_headers: dict[str, str] | None = None
        self._auth_renew_at: float | None = None     # on the monotonic clock
        self._auth_lock = threading.Lock()
        self._auth_failure: VendorError | None = None   # a login that cannot succeed is not tried again
        self.max_attempts = max_attempts
        self.max_backoff = max_backoff
        self.sleep = sleep
        self.monotonic = monotonic
        self.logins = 0
        self._vendor_anchor: tuple[float, float] | None = None   # (vendor epoch seconds, our monotonic)
        self.timeout = timeout
        # `trust_env=False`: proxy and CA variables (HTTP_PROXY, ALL_PROXY, SSL_CERT_FILE, ...) are ignored
        # unless the operator opts in (`--trust-env-proxy`): credentials go only to the system's own host.
        self.client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers or {},
                                   transport=transport, timeout=timeout, trust_env=trust_env)
        self.calls = 0
        # Flow control across the worker threads (see the module doc). Plain untimed waits on `_flow`:
        # whoever holds the gate or a slot lets go within a request timeout or a Retry-After.
        self._flow_lock = threading.Lock()
        self._flow = threading.Condition(self._flow_lock)
        self._in_flight = 0
        self.max_in_flight = max(1, max_in_flight) if max_in_flight else UNLIMITED   # the system's `concurrency:`
        self._allowed = UNLIMITED
        self._answered = 0           # answers without a 429 since `_allowed` last changed
        self._ceiling: int | None = None     # how many were in flight when the last 429 came
        self._round = 0              # bumped at each cut: a 429 to a request sent before it is not news
        self._answers: deque[float] = deque()    # when the answers of the last second came (monotonic)
        self._latency: float | None = None       # a moving average of how long an answer takes
        self._holds = 0              # workers waiting out a 429's Retry-After: nobody else sends meanwhile
        self._line_up: deque[threading.Condition] = deque()     # workers waiting for a slot, first come first
        self.limited = 0             # 429s seen
        # Called before every request that may change something at the vendor: the state makes what it
        # recorded durable first (`Provider.start_phase` sets it). It runs before the request waits for a slot.
        self.before_write: Callable[[], None] | None = None
        # Called once such a request has its slot, just before it is sent: raises when nothing more may be
        # changed (the apply stopped itself, the state lost its lock while the request waited for the slot).
        self.may_write: Callable[[], None] | None = None
        self.deadline: Deadline | None = None
        self.stop: threading.Event | None = None

    def start_phase(self, deadline: Deadline | None, stop: threading.Event | None = None) -> None:
        """A new phase (reads, apply): a fresh deadline, and a failed login may be tried once more."""
        self.deadline = deadline
        self.stop = stop
        with self._auth_lock:
            self._auth_failure = None

    def close(self) -> None:
        self.client.close()

    # -- auth ----------------------------------------------------------------------------------------
    def invalidate_auth(self, stale: dict[str, str] | None = None) -> None:
        with self._auth_lock:
            if stale is None or self._auth_headers is stale:
                self._auth_headers = None

    def _auth(self) -> dict[str, str]:
        if self._authenticate is None:
            return {}
        with self._auth_lock:
            if self._auth_failure is not None:
                raise self._auth_failure     # another worker's login failed: do not repeat it
            expiring = self._auth_renew_at is not None and self.monotonic() >= self._auth_renew_at
            if self._auth_headers is None or expiring:
                asked = self.monotonic()     # the lifetime runs from the request, at the latest
                try:
                    self._auth_headers, lifetime = self._authenticate(self)
                except VendorError as exc:
                    self._auth_failure = exc
                    raise
                self.logins += 1
                self._auth_renew_at = None if lifetime is None else asked + lifetime - renewal_margin(lifetime)
            return self._auth_headers

    # -- requests ------------------------------------------------------------------------------------
    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
                content: bytes | None = None, headers: dict[str, str] | None = None,
                idempotent: bool | None = None, expect: Iterable[int] = (),
                authenticated: bool = True) -> httpx.Response:
        """Send with auth and retries; returns a 2xx response (or one whose status is in `expect`)."""
        safe_to_repeat = method in IDEMPOTENT_METHODS if idempotent is None else idempotent
        relogged = False
        attempt = 0
        while True:
            attempt += 1
            self._check_go(method, path)
            auth = self._auth() if authenticated else {}
            writes = method not in READ_METHODS
            if writes and self.before_write is not None:
                self.before_write()      # durable first, without holding a slot while the state commits
            sent_in = self._enter()
            try:
                self._check_go(method, path)
                if writes and self.may_write is not None:
                    self.may_write()
            except BaseException:
                self._release()
                raise
            sent_at = self.monotonic()
            limited = False
            try:
                response = self.send_raw(method, path, json=json, params=params, content=content,
                                         headers={**(headers or {}), **auth})
                limited = response.status_code == 429
            except httpx.TransportError as lost:
                transport_error: httpx.TransportError | None = lost
            else:
                transport_error = None
            finally:
                self._leave(limited, sent_in, sent_at)
            if transport_error is not None:
                exc = transport_error
                permanent = _permanent_transport_error(exc, self.client.base_url.host)
                if permanent:
                    raise VendorError(self._line(method, path, permanent)) from None
                sent = not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
                if sent and not safe_to_repeat:
                    raise VendorError(self._line(method, path, f"no answer ({type(exc).__name__}); "
                                                 "the request may have taken effect"),
                                      temporary=True, ambiguous=True) from None
                if attempt >= self.max_attempts:
                    raise VendorError(self._line(method, path, f"unreachable after {attempt} attempts "
                                                 f"({type(exc).__name__})"), temporary=True) from None
                self._backoff(attempt, None, method, path, type(exc).__name__)
                continue
            status = response.status_code
            if status in expect or status < 300:
                if self.deadline is not None:
                    self.deadline.answered()
                return self._checked(response)
            if status < 400:
                where = printable(response.headers.get("Location", "")[:200]) or "nowhere"
                raise VendorError(self._line(method, path, f"HTTP {status} redirect to {where}; redirects are "
                                             f"not followed, so credentials stay with {self.client.base_url.host}: "
                                             "set the system's url to the API's own address"), status=status)
            if status == 401 and authenticated and self._authenticate is not None and not relogged:
                relogged = True
                self.invalidate_auth(auth)
                log.info("token rejected; logging in again system=%s", self.system)
                continue
            if status in RETRY_STATUSES:
                if status not in NOT_PROCESSED and not safe_to_repeat:
                    raise VendorError(self._line(method, path, self._describe(response)
                                                 + "; the request may have taken effect"),
                                      status=status, temporary=True, ambiguous=True)
                if attempt < self.max_attempts:
                    self._backoff(attempt, response.headers.get("Retry-After"), method, path, str(status),
                                  hold=status == 429)
                    continue
                raise VendorError(self._line(method, path, self._describe(response)), status=status,
                                  temporary=True)
            raise VendorError(self._line(method, path, self._describe(response)), status=status)

    def _checked(self, response: httpx.Response) -> httpx.Response:
        """The answer, with `.json()` reading it as input: a body that is not JSON is the vendor's fault
        (`VendorFault`, naming the system, method and path), never a bug of ours."""
        system = self.system
        setattr(response, "json", lambda **_: loads(response, system))   # noqa: B010
        return response

    def send_raw(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, no retry, no auth added: for login calls and the retry loop. Its timeout is
        capped by what remains of the deadline."""
        self.calls += 1
        log.debug("request system=%s method=%s path=%s", self.system, method, path)
        if self.deadline is not None and "timeout" not in kwargs:
            kwargs["timeout"] = max(0.05, min(self.timeout, self.deadline.remaining()))
        request = self.client.build_request(method, path, **kwargs)
        base = self.client.base_url
        if (request.url.scheme, request.url.host, request.url.port) != (base.scheme, base.host, base.port):
            # A path that is really an absolute URL (a vendor's `next` link, say) would carry our headers away.
            raise VendorError(self._line(method, printable(str(request.url))[:200],
                                         f"refused: not on {base.scheme}://{base.netloc.decode()}"))
        response = self.client.send(request, stream=True)
        try:
            self._read_body(response, method, path)
        finally:
            response.close()
        self._note_vendor_time(response)
        return response

    def _read_body(self, response: httpx.Response, method: str, path: str) -> None:
        """Read the answer's body chunk by chunk: the deadline and Ctrl-C are checked between chunks (a
        vendor dripping a byte at a time stops at the deadline, not at the read timeout of each byte),
        and the size is counted after decompression (a gzip bomb stops at the cap, not in memory)."""
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > self.max_answer_bytes:
                raise AnswerTooLarge(self._line(method, path, f"the answer is larger than "
                                                f"{self.max_answer_bytes // (1 << 20)} MiB (counted after "
                                                "decompression); raise the system's `max_answer_mb` if it is "
                                                "genuine"))
            chunks.append(chunk)
            # Ctrl-C cuts a read short; the answer to a write is in flight and is read to the end (bounded by
            # the deadline), or what the vendor did would go unrecorded and be done again by the next apply.
            if self.stop is not None and self.stop.is_set() and method in READ_METHODS:
                raise Interrupted(self._line(method, path, "interrupted while reading the answer"), temporary=True)
            if self.deadline is not None and self.deadline.remaining() <= 0:
                raise self._too_late()
        response._content = b"".join(chunks)   # what `.content`/`.json()` read

    # -- the vendor's clock ----------------------------------------------------------------------------
    def _note_vendor_time(self, response: httpx.Response) -> None:
        date = response.headers.get("Date")
        if not date:
            return
        try:
            seen = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError, IndexError):
            return
        self._vendor_anchor = (seen, self.monotonic())

    def vendor_time(self) -> float | None:
        """The vendor's own time now (epoch seconds), from the `Date` of its latest answer advanced on our
        monotonic clock; None before any dated answer. For what the vendor checks against its clock
        (a signed operation's validity window), never for our own decisions."""
        anchor = self._vendor_anchor
        if anchor is None:
            return None
        return anchor[0] + (self.monotonic() - anchor[1])

    def _check_go(self, method: str, path: str, why: str = "") -> None:
        """Refuse to send (or wait) any more once stopped or past the deadline."""
        if self.stop is not None and self.stop.is_set():
            raise Interrupted(self._line(method, path, "not sent: interrupted"), temporary=True)
        if self.deadline is not None and self.deadline.remaining() <= 0:
            raise self._too_late(why)

    def _too_late(self, why: str = "") -> DeadlineExceeded:
        assert self.deadline is not None
        last = f" (last answer: {why})" if why and why[:1].isdigit() else ""
        return DeadlineExceeded(self.redact(f"{self.system}: the vendor did not answer within "
                                            f"{self.deadline.seconds:g} s{last}"), temporary=True)

    # -- flow control ----------------------------------------------------------------------------------
    def _enter(self) -> int:
        """Wait until no worker is waiting out a Retry-After and a slot is free; take the slot. Returns
        the round it was taken in."""
        with self._flow:
            if self._line_up or not self._may_enter():
                # In line, in order of arrival: with more workers than slots, none waits for ever (a token it
                # holds would expire meanwhile), and a freed slot wakes one waiter, not all of them.
                me = threading.Condition(self._flow_lock)
                self._line_up.append(me)
                while self._line_up[0] is not me or not self._may_enter():
                    me.wait()
                self._line_up.popleft()
            self._in_flight += 1
            self._wake()
            return self._round

    def _may_enter(self) -> bool:
        return not self._holds and self._in_flight < min(self._allowed, self.max_in_flight)

    def _wake(self) -> None:
        """Under `_flow`: let the first in line go, when it may."""
        if self._line_up and self._may_enter():
            self._line_up[0].notify()

    def _release(self) -> None:
        """Give back a slot whose request was not sent."""
        with self._flow:
            self._in_flight -= 1
            self._wake()

    def _leave(self, limited: bool, sent_in: int, sent_at: float) -> None:
        now = self.monotonic()
        with self._flow:
            self._in_flight -= 1
            if not limited:
                took = max(0.0, now - sent_at)
                self._latency = took if self._latency is None else 0.9 * self._latency + 0.1 * took
                self._answers.append(now)
            while self._answers and self._answers[0] < now - 1.0:
                self._answers.popleft()
            if limited:
                self.limited += 1
            if limited and sent_in == self._round:
                self._round += 1
                # Halve what may be in flight (counting this request), never below one; remember where the
                # limit was met, and probe at that level again only rarely.
                level = min(self._allowed, self._in_flight + 1)
                # What the limit lets through, as seen in the last second, times how long an answer takes:
                # the number in flight that keeps to it (Little's law), when that is below the halving.
                sustained = int(len(self._answers) * self._latency) if self._latency is not None else level
                self._allowed = max(1, min(level // 2, sustained))
                self._ceiling = min(level, self._allowed + 1)
                self._answered = 0
                log.info("rate limited system=%s in_flight_allowed=%d", self.system, self._allowed)
            elif not limited and self._allowed < UNLIMITED:
                self._answered += 1
                below = self._ceiling is None or self._allowed + 1 < self._ceiling
                if self._answered >= (self._allowed if below else PROBE_AFTER):
                    self._answered = 0
                    if not below:
                        self._ceiling = None    # the limit may have been raised: find it again
                    self._allowed = self._allowed + 1 if self._allowed < 64 else UNLIMITED
            self._wake()

    def _backoff(self, attempt: int, retry_after: str | None, method: str, path: str, why: str, *,
                 hold: bool = False) -> None:
        """Wait before trying again; with `hold` (a 429), no other worker sends until the wait is over."""
        if not hold:
            self._wait_before_retry(attempt, retry_after, method, path, why)
            return
        with self._flow:
            self._holds += 1
        try:
            self._wait_before_retry(attempt, retry_after, method, path, why)
        finally:
            with self._flow:
                self._holds -= 1
                self._wake()

    def _wait_before_retry(self, attempt: int, retry_after: str | None, method: str, path: str, why: str) -> None:
        delay = min(self.max_backoff, 0.25 * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
        if retry_after:
            asked = self._retry_after_seconds(retry_after)
            if asked is not None:
                delay = min(max(asked, 0.0), max(self.max_backoff, 60.0))
        if self.deadline is not None and delay >= self.deadline.remaining():
            raise self._too_late(why)     # waiting would end past the deadline: say so now
        self._check_go(method, path, why)
        log.info("retrying system=%s method=%s path=%s reason=%s delay=%.2f", self.system, method, path,
                 why, delay)
        if self.stop is not None and self.sleep is time.sleep:
            # Ctrl-C cuts the wait short. Short sleeps rather than a timed Event.wait: a timed wait on a
            # lock takes an absolute time, which a shifted clock (faketime) turns into days.
            end = time.monotonic() + delay
            while not self.stop.is_set() and (left := end - time.monotonic()) > 0:
                time.sleep(min(0.1, left))
        else:
            self.sleep(delay)
        self._check_go(method, path, why)

    def _retry_after_seconds(self, value: str) -> float | None:
        """`Retry-After` as seconds, or as an HTTP date (RFC 9110 §10.2.3) read against the session's
        clock (never the wall clock); None when it is neither."""
        with contextlib.suppress(ValueError):
            return float(value)
        if self.clock is None:
            return None
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return (when - self.clock()).total_seconds()

    def _line(self, method: str, path: str, detail: str) -> str:
        return self.redact(f"{self.system}: {method} {path}: {detail}")


def renewal_margin(lifetime: float) -> float:
    """How long before a token's end it is renewed: a quarter of its life plus a second (claims count
    whole seconds, so a token may be up to a second older than it looks), at most a minute. A token of an
    hour is renewed a minute early; one of 3 s after 1.25 s, never before every request."""
    return min(60.0, max(lifetime, 0.0) / 4 + 1.0)


def token_lifetime(claims: Mapping[str, Any]) -> float | None:
    """A JWT's lifetime from its own claims (`exp - iat`): both are the vendor's clock, so their difference
    holds whatever our clock says. None when either is missing: renew on the vendor's 401 only."""
    try:
        lifetime = float(claims["exp"]) - float(claims["iat"])
    except (KeyError, TypeError, ValueError):
        return None
    return lifetime if lifetime > 0 else None


def json_error(title: str, detail: str) -> Callable[[httpx.Response], str]:
    """A describer for a vendor whose error bodies are JSON `{<title>, <detail>}`:
    `403 Forbidden: detail` (the title falls back to the HTTP reason)."""
    def describe(response: httpx.Response) -> str:
        body = error_body(response)
        if isinstance(body, dict) and (body.get(title) or body.get(detail)):
            text = body.get(detail)
            return f"{response.status_code} {body.get(title) or response.reason_phrase}" + (f": {text}" if text else "")
        return _describe_plain(response, body=False)
    return describe


def describe_plain(response: httpx.Response) -> str:
    """`HTTP 404: <the body's first 200 characters>`: for vendors whose errors are plain text."""
    return _describe_plain(response)


def _describe_plain(response: httpx.Response, *, body: bool = True) -> str:
    if not body:
        return f"HTTP {response.status_code} {response.reason_phrase}".strip()
    text = response.text.strip().replace("\n", " ")
    return f"HTTP {response.status_code}" + (f": {text[:200]}" if text else "")


def _permanent_transport_error(exc: BaseException, host: str) -> str | None:
    """What is wrong when trying again cannot help: the certificate, or a host name nobody knows."""
    seen: BaseException | None = exc
    for _ in range(10):   # the chain httpx → httpcore → ssl/socket is short; never loop on a cycle
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            return (f"TLS certificate of {host} not accepted ({seen.verify_message or 'verification failed'}); "
                    "not retried")
        if isinstance(seen, ssl.SSLError):
            return f"TLS with {host} failed ({seen.reason or type(seen).__name__}); not retried"
        if isinstance(seen, socket.gaierror) and seen.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
            return f"cannot resolve {host} (DNS: no such host); not retried"
        seen = seen.__cause__ or seen.__context__
    return None

