"""Building blocks shared by the vendor simulators in `reconciler.sandbox`.

Every `<Vendor>Simulator` subclasses `Simulator`, which owns the request workflow: routing against the
vendor's one endpoint table, the request log, fault injection, the rate limit, one lock around the store
and persistence to a JSON file. The vendor module keeps its endpoint table, its authentication, its error
format and its handlers. Tests call `Simulator.handle` through `httpx.MockTransport`; `sandbox.server`
calls it for requests arriving over sockets. Nothing in the core imports this package.

Subclasses must set their own attributes before calling `Simulator.__init__` (it builds or loads the
state through `new_state`/`load_state`), must raise `SimulatorError` for refusals (rendered by their
`render_error`), and must call `mark_changed()` whenever they mutate `self.state`, so that the store is
written after the request.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import hmac
import json
import logging
import math
import os
import random
import re
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any, ClassVar, Literal

import httpx

logger = logging.getLogger(__name__)

REDACTED = "REDACTED"
# Header and body field names whose values never reach the request log (compared case-insensitively,
# with `-` and `_` removed, so `X-Api-Key`, `api_key` and `apiKey` are all caught).
_SECRET_NAMES = frozenset({
    "authorization", "proxyauthorization", "cookie", "setcookie", "xapikey", "apikey",
    "accesskey", "password", "clientsecret", "secret", "token", "refreshtoken", "authtoken",
})

Clock = Callable[[], datetime]
Lost = Literal["timeout", "502"]


def utc_now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------------------------- errors

class SimulatorError(Exception):
    """A refusal: the simulator answers `status` and each vendor renders it in its own error format."""

    def __init__(self, status: int, detail: str, *, title: str | None = None,
                 headers: dict[str, str] | None = None):
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.headers = headers or {}
        super().__init__(f"{status} {detail}")


def json_response(status: int, body: Any = None, *, content_type: str = "application/json",
                  headers: dict[str, str] | None = None) -> httpx.Response:
    """A response with a JSON body (or none, for `body=None`)."""
    all_headers = dict(headers or {})
    if body is None:
        return httpx.Response(status, headers=all_headers)
    all_headers["Content-Type"] = content_type
    return httpx.Response(status, headers=all_headers, content=json.dumps(body).encode())


def problem_response(status: int, detail: str, *, title: str | None = None, type_: str = "about:blank",
                     headers: dict[str, str] | None = None) -> httpx.Response:
    """An RFC 7807 `application/problem+json` response `{type, title, status, detail}`."""
    body = {"type": type_, "title": title or HTTPStatus(status).phrase, "status": status, "detail": detail}
    return json_response(status, body, content_type="application/problem+json", headers=headers)


# ----------------------------------------------------------------------------------------------- time

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")


def parse_datetime(value: object) -> datetime | None:
    """An RFC 3339 date-time with an explicit offset, as UTC; None when `value` is not one.

    Stricter than `datetime.fromisoformat`, which also takes dates without a time or an offset: a
    vendor cannot know which zone a naive time means, so neither do we.
    """
    if not isinstance(value, str) or not _RFC3339.match(value):
        return None
    text = value
    match = re.search(r"\.(\d+)", text)
    if match and len(match.group(1)) > 6:  # Python keeps microseconds; drop the nanosecond digits
        text = text[:match.start(1) + 6] + text[match.end(1):]
    try:
        return datetime.fromisoformat(text).astimezone(UTC)
    except ValueError:
        return None


def format_datetime(value: datetime) -> str:
    """UTC, `Z`, whole seconds unless there is a fraction: `2026-01-01T08:00:00Z`."""
    value = value.astimezone(UTC)
    if value.microsecond:
        return value.strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0") + "Z"
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


# -------------------------------------------------------------------------------------------- storage

class JsonFile:
    """A JSON document on disk, replaced atomically, that notices when another process rewrote it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._signature: tuple[int, int, int] | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def load(self) -> dict[str, Any] | None:
        """The document, or None when the file does not exist yet."""
        signature = self._stat()
        if signature is None:
            return None
        with self.path.open("rb") as handle:
            data = json.load(handle)
        self._signature = signature
        return data

    def save(self, data: dict[str, Any]) -> None:
        # tmp + os.replace in the same directory: a reader (another CLI run) sees the old or the new
        # document, never half of one, even if this process dies mid-write.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=1, sort_keys=False)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._signature = self._stat()

    def changed_on_disk(self) -> bool:
        """Whether someone else replaced the file since we last read or wrote it."""
        return self._stat() != self._signature


# ---------------------------------------------------------------------------------------- pagination

class PageTokens:
    """Opaque page tokens carrying a keyset cursor bound to one list and its filters.

    A keyset cursor (the sort key of the last item served) rather than an offset keeps paging stable
    while items are deleted between pages. The cursor is encrypted (an HMAC-SHA256 keystream under a
    random nonce) and authenticated, so clients can neither read nor forge it. The token is standard
    base64 with padding, like the vendor's examples, so a client that forgets to URL-encode `+ / =` is
    caught.
    """

    _NONCE, _MAC = 8, 16

    def __init__(self, secret: bytes):
        self._secret = secret

    def _keystream(self, nonce: bytes, length: int) -> bytes:
        blocks = (hmac.new(self._secret, b"stream" + nonce + i.to_bytes(4, "big"), hashlib.sha256).digest()
                  for i in range((length + 31) // 32))
        return b"".join(blocks)[:length]

    def _mac(self, data: bytes) -> bytes:
        return hmac.new(self._secret, b"mac" + data, hashlib.sha256).digest()[:self._MAC]

    def encode(self, scope: str, key: Sequence[Any]) -> str:
        payload = json.dumps({"s": scope, "k": list(key)}, separators=(",", ":")).encode()
        nonce = os.urandom(self._NONCE)
        sealed = nonce + bytes(a ^ b for a, b in zip(payload, self._keystream(nonce, len(payload)), strict=False))
        return base64.b64encode(self._mac(sealed) + sealed).decode()

    def decode(self, scope: str, token: str) -> tuple[Any, ...]:
        """The cursor in `token`; `SimulatorError(400)` when it is tampered, foreign or from another list."""
        invalid = SimulatorError(400, "Invalid next-page-token")
        try:
            raw = base64.b64decode(token.encode(), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise invalid from None
        mac, sealed = raw[:self._MAC], raw[self._MAC:]
        if len(sealed) <= self._NONCE or not hmac.compare_digest(mac, self._mac(sealed)):
            raise invalid
        nonce, cipher = sealed[:self._NONCE], sealed[self._NONCE:]
        data = json.loads(bytes(a ^ b for a, b in zip(cipher, self._keystream(nonce, len(cipher)), strict=False)))
        if data.get("s") != scope or not isinstance(data.get("k"), list):
            raise invalid
        return tuple(data["k"])


def parse_limit(raw: str | None, *, default: int, maximum: int, name: str = "limit") -> int:
    """A page size from the query string: an integer in 1..maximum, else `SimulatorError(400)`."""
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]+", raw) or not 1 <= int(raw) <= maximum:
        raise SimulatorError(400, f"{name} must be an integer between 1 and {maximum}")
    return int(raw)


def paginate(items: Iterable[dict[str, Any]], *, key: Callable[[dict[str, Any]], tuple[Any, ...]],
             limit: int, token: str | None, scope: str, tokens: PageTokens,
             descending: bool = False) -> tuple[list[dict[str, Any]], str | None]:
    """One page of `items` (sorted by `key`, both ways) and the token for the next page, if any."""
    ordered = sorted(items, key=key, reverse=descending)
    if token is not None:
        cursor = tokens.decode(scope, token)
        try:
            ordered = [i for i in ordered if (key(i) < cursor if descending else key(i) > cursor)]
        except TypeError:  # a signed cursor from an older store layout; refuse rather than crash
            raise SimulatorError(400, "Invalid next-page-token") from None
    page = ordered[:limit]
    next_token = tokens.encode(scope, key(page[-1])) if len(ordered) > limit else None
    return page, next_token


# ------------------------------------------------------------------------------------------------ log

def _is_secret_name(name: str) -> bool:
    return name.lower().replace("-", "").replace("_", "") in _SECRET_NAMES


def redact(value: Any) -> Any:
    """`value` with every secret-named field of every nested object replaced by REDACTED."""
    if isinstance(value, dict):
        return {k: REDACTED if _is_secret_name(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


@dataclass
class RequestRecord:
    """One request as the simulator saw it, with secrets redacted.

    `path` is relative to the simulator's base (`/permission/…` whatever prefix it is served under),
    `full_path` is the path as received (`/administration/permission/…`); `status` is None when the
    response was lost; `fault` names an injected fault (`"503"`, `"lost"`).
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any = None
    status: int | None = None
    fault: str | None = None
    full_path: str = ""


class RequestLog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []

    def start(self, request: httpx.Request, path: str) -> RequestRecord:
        headers = {k: REDACTED if _is_secret_name(k) else v for k, v in request.headers.items()}
        body: Any = None
        if request.content:
            try:
                body = redact(json.loads(request.content))
            except (ValueError, UnicodeDecodeError):
                body = f"<{len(request.content)} bytes>"
        record = RequestRecord(method=request.method, path=path, query=dict(request.url.params),
                               headers=headers, body=body, full_path=request.url.path)
        with self._lock:
            self._records.append(record)
        return record

    def records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()


# --------------------------------------------------------------------------------------------- faults

@dataclass
class Fault:
    """An injected failure for requests whose method and relative path match.

    - `commit=False`: the vendor never performs the operation; the client gets `status` (or, with
      `lost`, no answer at all, as if the request died on the way).
    - `commit=True`: the vendor performs it and the answer is lost on the way back: `lost="timeout"`
      (the default) raises `httpx.ReadTimeout`, `lost="502"` answers 502 Bad Gateway.
    - `times`: how many matching requests it hits; None = every one.
    - `then`: called when the fault fires, after the operation (if committed) and before the client sees
      the failure: what somebody else does meanwhile (the helpdesk creating a user, say).
    """

    method: str
    pattern: re.Pattern[str]
    status: int = 503
    times: int | None = 1
    commit: bool = False
    lost: Lost | None = None
    then: Callable[[], Any] | None = None

    def matches(self, method: str, path: str) -> bool:
        return self.method in ("*", method.upper()) and self.pattern.search(path) is not None

    @property
    def effective_lost(self) -> Lost | None:
        return self.lost or ("timeout" if self.commit else None)


@dataclass
class _RandomFaults:
    rate: float
    rng: random.Random
    statuses: tuple[int, ...]
    commit_ratio: float
    lost: Lost
    methods: frozenset[str] | None
    pattern: re.Pattern[str]


class FaultInjector:
    """Scripted and random failures, attachable to any simulator as `sim.faults`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._random: _RandomFaults | None = None
        self.fired: list[tuple[str, str, str]] = []  # (method, path, "503" | "lost" | "commit+lost")

    def add(self, method: str, path_regex: str, *, status: int = 503, times: int | None = 1,
            commit: bool = False, lost: Lost | None = None, then: Callable[[], Any] | None = None) -> Fault:
        """Fail the next `times` requests whose method is `method` (or "*") and whose relative path
        matches `path_regex` (searched, so anchor it with ^…$ for an exact path)."""
        if lost not in (None, "timeout", "502"):
            raise ValueError(f"lost must be 'timeout' or '502', not {lost!r}")
        fault = Fault(method=method.upper(), pattern=re.compile(path_regex), status=status, times=times,
                      commit=commit, lost=lost, then=then)
        with self._lock:
            self._faults.append(fault)
        return fault

    def random_rate(self, p: float, seed: int | str, statuses: Sequence[int] = (503,),
                    commit_ratio: float = 0.5, *, lost: Lost = "timeout",
                    methods: Iterable[str] | None = None, path_regex: str = "") -> None:
        """Fail a share `p` of matching requests: of those, `commit_ratio` are performed with the answer
        lost, the rest answer one of `statuses` without being performed. `p=0` turns it off."""
        if not 0 <= p <= 1 or not 0 <= commit_ratio <= 1:
            raise ValueError("p and commit_ratio must be within 0..1")
        with self._lock:
            self._random = None if p == 0 else _RandomFaults(
                rate=p, rng=random.Random(seed), statuses=tuple(statuses), commit_ratio=commit_ratio,
                lost=lost, methods=frozenset(m.upper() for m in methods) if methods else None,
                pattern=re.compile(path_regex))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self._random = None

    def pick(self, method: str, path: str) -> Fault | None:
        """The fault for this request, if any, counting it against the fault's `times`."""
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            self._faults.remove(fault)
                    return self._fire(method, path, fault)
            chaos = self._random
            if chaos is None or (chaos.methods and method.upper() not in chaos.methods):
                return None
            if not chaos.pattern.search(path) or chaos.rng.random() >= chaos.rate:
                return None
            if chaos.rng.random() < chaos.commit_ratio:
                fault = Fault(method, chaos.pattern, status=502, commit=True, lost=chaos.lost)
            else:
                fault = Fault(method, chaos.pattern, status=chaos.rng.choice(chaos.statuses))
            return self._fire(method, path, fault)

    def _fire(self, method: str, path: str, fault: Fault) -> Fault:
        kind = ("commit+" if fault.commit else "") + ("lost" if fault.effective_lost else str(fault.status))
        self.fired.append((method, path, kind))
        logger.info("sandbox fault injected method=%s path=%s kind=%s", method, path, kind)
        return fault


# ----------------------------------------------------------------------------------------- rate limit

class RateLimiter:
    """At most `limit` requests in any rolling `per` seconds; refused requests do not count.

    Runs on a monotonic clock, not the simulator's (which tests freeze or move by days).
    """

    def __init__(self, limit: int, *, per: float = 1.0, monotonic: Callable[[], float] = time.monotonic):
        if limit < 1:
            raise ValueError("rate limit must be at least 1 request")
        self.limit = limit
        self.per = per
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._stamps: deque[float] = deque()

    def acquire(self) -> int | None:
        """None when the request may go ahead, else the whole seconds to wait (for Retry-After)."""
        with self._lock:
            now = self._monotonic()
            while self._stamps and self._stamps[0] <= now - self.per:
                self._stamps.popleft()
            if len(self._stamps) >= self.limit:
                return max(1, math.ceil(self._stamps[0] + self.per - now))
            self._stamps.append(now)
            return None


# -------------------------------------------------------------------------------------------- routing

@dataclass(frozen=True)
class Route:
    """One row of a vendor's endpoint table.

    `handler` names the operation; the vendor simulator maps it to its method. `auth=False` for endpoints
    that need no session (login); `body` is the media type the request body must have, or None.
    """

    method: str
    template: str
    handler: str
    auth: bool = True
    body: str | None = None

    def regex(self) -> str:
        return re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.template)


@dataclass
class RouteMatch:
    route: Route | None
    params: dict[str, str]
    path: str                   # the request path relative to the simulator's base
    allowed: tuple[str, ...]    # methods the path supports; empty when no template matches it


class Router:
    """Matches request paths against an endpoint table, under a base path.

    With `base_path=""` the base is whatever precedes a known template (`/administration/login`,
    `/abloy-keyless/login`): the shortest such prefix wins, so mounting needs no configuration.
    """

    def __init__(self, routes: Sequence[Route], base_path: str = ""):
        self.routes = tuple(routes)
        self.base_path = "/" + base_path.strip("/") if base_path.strip("/") else ""
        prefix = re.escape(self.base_path) if self.base_path else r"(?P<_prefix>(?:/[^/]+)*?)"
        # Exact paths: a trailing slash is part of a vendor's path (Unloc's `/keys/`) or a mistake.
        self._compiled = [(route, re.compile(f"^{prefix}{route.regex()}$")) for route in self.routes]

    def match(self, method: str, path: str) -> RouteMatch:
        found: list[tuple[int, Route, dict[str, str]]] = []
        for route, regex in self._compiled:
            m = regex.match(path)
            if m:
                params = {k: v for k, v in m.groupdict().items() if k != "_prefix"}
                found.append((len(m.groupdict().get("_prefix") or ""), route, params))
        if not found:
            relative = path.removeprefix(self.base_path)
            return RouteMatch(None, {}, relative or "/", ())
        shortest = min(length for length, _, _ in found)
        candidates = [(route, params) for length, route, params in found if length == shortest]
        relative = path[len(self.base_path):] if self.base_path else path[shortest:]
        allowed = tuple(sorted({route.method for route, _ in candidates}))
        for route, params in candidates:
            if route.method == method.upper():
                return RouteMatch(route, params, relative.rstrip("/") or "/", allowed)
        return RouteMatch(None, {}, relative.rstrip("/") or "/", allowed)


def read_json_body(request: httpx.Request, media_type: str) -> Any:
    """The parsed body; 415 unless `Content-Type` is `media_type` (parameters allowed), 400 if not JSON."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != media_type:
        raise SimulatorError(415, f"Content-Type must be {media_type}")
    try:
        return json.loads(request.content)
    except (ValueError, UnicodeDecodeError):
        raise SimulatorError(400, "Request body is not valid JSON") from None


# ----------------------------------------------------------------------------------------- simulator

class Simulator:
    """The request workflow every vendor simulator shares.

    `handle(request)` is the seam: plug it into `httpx.MockTransport` or mount it in `sandbox.server`.
    It logs the request, applies injected faults and the rate limit, then, holding the one store lock,
    reloads the store if another process replaced it, calls the vendor's `dispatch`, and writes the
    store if the request changed it.
    """

    routes: ClassVar[tuple[Route, ...]] = ()
    store_format: ClassVar[str] = ""   # e.g. "reconciler-sandbox/unloc": a store of another vendor is refused
    store_version: ClassVar[int] = 1

    def __init__(self, store_path: Path | None = None, *, clock: Clock = utc_now,
                 rate_limit: int | None = None, base_path: str = "",
                 monotonic: Callable[[], float] = time.monotonic):
        self._lock = threading.RLock()
        self._clock = clock
        self._offset = timedelta(0)
        self._router = Router(self.routes, base_path)
        self._log = RequestLog()
        self._limiter = RateLimiter(rate_limit, monotonic=monotonic) if rate_limit else None
        self._changed = False
        self.faults = FaultInjector()
        self._file = JsonFile(store_path) if store_path is not None else None
        loaded = self._file.load() if self._file else None
        if loaded is None:
            self.state = self.new_state()
            if self._file:
                self._file.save(self.state)
        else:
            self.state = self.load_state(self._checked(loaded))

    def _checked(self, data: dict[str, Any]) -> dict[str, Any]:
        if data.get("format") != self.store_format or data.get("version") != self.store_version:
            raise ValueError(f"not a {self.store_format} store (format {data.get('format')!r}, "
                             f"version {data.get('version')!r})")
        return data

    # --- subclass hooks
    def new_state(self) -> dict[str, Any]:
        """A fresh store (seeded): called only when there is no store file yet."""
        raise NotImplementedError

    def load_state(self, data: dict[str, Any]) -> dict[str, Any]:
        """Return a store read from disk (its format and version already checked)."""
        return data

    def dispatch(self, request: httpx.Request, match: RouteMatch) -> httpx.Response:
        """Answer one request; runs under the store lock. Raise `SimulatorError` to refuse."""
        raise NotImplementedError

    def render_error(self, error: SimulatorError) -> httpx.Response:
        """The vendor's error format; RFC 7807 unless a vendor overrides it."""
        return problem_response(error.status, error.detail, title=error.title, headers=error.headers)

    # --- clock
    def now(self) -> datetime:
        return (self._clock() + self._offset).astimezone(UTC)

    def set_clock(self, now: datetime | Clock) -> None:
        """Freeze the clock at `now`, or follow a callable from now on."""
        with self._lock:
            self._clock = now if callable(now) else (lambda: now)
            self._offset = timedelta(0)

    def advance(self, delta: timedelta) -> None:
        """Move the simulator clock forward (asynchronous vendor states and expiries follow it)."""
        with self._lock:
            self._offset += delta

    # --- request log
    @property
    def requests(self) -> list[RequestRecord]:
        return self._log.records()

    def reset_log(self) -> None:
        self._log.clear()

    def count(self, method: str = "*", path_prefix: str = "", *, status: int | None = None) -> int:
        """How many logged requests have this method ("*" = any), path prefix (relative to the base,
        or as received) and status."""
        method = method.upper()
        return sum(1 for r in self._log.records()
                   if method in ("*", r.method)
                   and (r.path.startswith(path_prefix) or r.full_path.startswith(path_prefix))
                   and (status is None or r.status == status))

    # --- persistence
    def mark_changed(self) -> None:
        self._changed = True

    def _save_if_changed(self) -> None:
        if self._changed:
            self._changed = False
            if self._file:
                self._file.save(self.state)

    def _reload_if_changed(self) -> None:
        if self._file and self._file.changed_on_disk():
            loaded = self._file.load()
            if loaded is not None:
                logger.debug("sandbox store reloaded path=%s", self._file.path)
                self.state = self.load_state(self._checked(loaded))

    def mutate(self) -> _Mutation:
        """`with sim.mutate():` for admin hooks: the store lock, a fresh read, and a write afterwards."""
        return _Mutation(self)

    # --- the workflow
    def handle(self, request: httpx.Request) -> httpx.Response:
        response = self._respond(request)
        # Like any HTTP server with a clock (RFC 9110 §6.6.1): clients learn the vendor's time from it.
        response.headers["Date"] = email.utils.format_datetime(self.now(), usegmt=True)
        return response

    def _respond(self, request: httpx.Request) -> httpx.Response:
        request.read()
        match = self._router.match(request.method, request.url.path)
        record = self._log.start(request, match.path)
        fault = self.faults.pick(request.method, match.path)
        if fault is not None and not fault.commit:
            return self._fail(request, record, fault)
        if self._limiter is not None:
            wait = self._limiter.acquire()
            if wait is not None:
                response = self.render_error(SimulatorError(
                    429, "Rate limit exceeded", headers={"Retry-After": str(wait)}))
                record.status = response.status_code
                return response
        with self._lock:
            self._reload_if_changed()
            try:
                response = self.dispatch(request, match)
            except SimulatorError as error:
                response = self.render_error(error)
            finally:
                self._save_if_changed()
        if fault is not None:
            logger.debug("sandbox committed then lost method=%s path=%s status=%s",
                         request.method, match.path, response.status_code)
            return self._fail(request, record, fault)
        record.status = response.status_code
        return response

    def _fail(self, request: httpx.Request, record: RequestRecord, fault: Fault) -> httpx.Response:
        if fault.then is not None:
            fault.then()
        lost = fault.effective_lost
        record.fault = "lost" if lost else str(fault.status)
        if lost == "timeout":
            raise httpx.ReadTimeout("sandbox: injected fault, response lost", request=request)
        status = 502 if lost == "502" else fault.status
        # An injected 429 looks like the real limit, which always says when to come back.
        headers = {"Retry-After": "1"} if status == 429 else None
        response = self.render_error(SimulatorError(status, "Injected fault", headers=headers))
        record.status = status
        return response


class _Mutation:
    def __init__(self, sim: Simulator):
        self._sim = sim

    def __enter__(self) -> Simulator:
        self._sim._lock.acquire()
        self._sim._reload_if_changed()
        return self._sim

    def __exit__(self, *exc: object) -> None:
        try:
            self._sim._save_if_changed()
        finally:
            self._sim._lock.release()
