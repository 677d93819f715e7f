"""The one HTTP client every provider uses: auth hand-off, retries, rate limit, redaction.

Providers call `HttpClient.request()`; it adds the vendor's headers and token, retries what is safe to
retry (429, 502, 503, 504 and connection errors, with capped exponential backoff and jitter, honouring
`Retry-After`), logs in again once on a 401, and turns every failure into a one-line `VendorError` with
all secrets redacted. A request that may have taken effect without an answer (a create whose response was
lost) is never repeated here: it raises `VendorError(ambiguous=True)` so the provider can check whether
it landed.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any, Callable, Iterable

import httpx

from reconciler.errors import VendorError

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


class Redactor:
    """Replaces every registered secret by `***` in text bound for logs, errors or output."""

    def __init__(self, secrets: Iterable[str] = ()):
        self._secrets: set[str] = {s for s in secrets if s}
        self._lock = threading.Lock()

    def add(self, secret: str | None) -> None:
        if secret:
            with self._lock:
                self._secrets.add(secret)

    def __call__(self, text: str) -> str:
        with self._lock:
            secrets = sorted(self._secrets, key=len, reverse=True)
        for secret in secrets:
            text = text.replace(secret, "***")
        return text


class HttpClient:
    """Sync client shared by a provider's worker threads.

    `authenticate(client) -> (headers, expires_at)` returns the auth headers and when they stop being
    valid (epoch seconds, or None); it may call `client.send_raw` to log in. Headers are renewed a minute
    before they expire and once on a 401. `describe(response) -> str` turns a vendor error body into one
    line.
    """

    def __init__(self, base_url: str, *, system: str, headers: dict[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None, redactor: Redactor | None = None,
                 authenticate: Callable[["HttpClient"], tuple[dict[str, str], float | None]] | None = None,
                 describe: Callable[[httpx.Response], str] | None = None,
                 max_attempts: int = 6, max_backoff: float = 30.0, timeout: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep):
        self.system = system
        self.redact = redactor or Redactor()
        self._authenticate = authenticate
        self._describe = describe or _describe_plain
        self._auth_headers: dict[str, str] | None = None
        self._auth_expires: float | None = None
        self._auth_lock = threading.Lock()
        self.max_attempts = max_attempts
        self.max_backoff = max_backoff
        self.sleep = sleep
        self.client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers or {},
                                   transport=transport, timeout=timeout)
        self.calls = 0

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
            expiring = self._auth_expires is not None and time.time() >= self._auth_expires - 60
            if self._auth_headers is None or expiring:
                self._auth_headers, self._auth_expires = self._authenticate(self)
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
            auth = self._auth() if authenticated else {}
            try:
                response = self.send_raw(method, path, json=json, params=params, content=content,
                                         headers={**(headers or {}), **auth})
            except httpx.TransportError as exc:
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
            if status < 400 or status in expect:
                return response
            if status == 401 and authenticated and self._authenticate is not None and not relogged:
                relogged = True
                self.invalidate_auth(auth)
                log.info("token rejected; logging in again system=%s", self.system)
                continue
            if status in RETRY_STATUSES:
                if status != 429 and not safe_to_repeat:
                    raise VendorError(self._line(method, path, self._describe(response)
                                                 + "; the request may have taken effect"),
                                      status=status, temporary=True, ambiguous=True)
                if attempt < self.max_attempts:
                    self._backoff(attempt, response.headers.get("Retry-After"), method, path, str(status))
                    continue
                raise VendorError(self._line(method, path, self._describe(response)), status=status,
                                  temporary=True)
            raise VendorError(self._line(method, path, self._describe(response)), status=status)

    def send_raw(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, no retry, no auth added: for login calls and the retry loop."""
        self.calls += 1
        log.debug("request system=%s method=%s path=%s", self.system, method, path)
        return self.client.request(method, path, **kwargs)

    def _backoff(self, attempt: int, retry_after: str | None, method: str, path: str, why: str) -> None:
        delay = min(self.max_backoff, 0.25 * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
        if retry_after:
            try:
                delay = min(max(float(retry_after), 0.0), max(self.max_backoff, 60.0))
            except ValueError:
                pass
        log.info("retrying system=%s method=%s path=%s reason=%s delay=%.2f", self.system, method, path,
                 why, delay)
        self.sleep(delay)

    def _line(self, method: str, path: str, detail: str) -> str:
        return self.redact(f"{self.system}: {method} {path}: {detail}")


def json_error(title: str, detail: str) -> Callable[[httpx.Response], str]:
    """A describer for a vendor whose error bodies are JSON `{<title>, <detail>}`:
    `403 Forbidden: detail` (the title falls back to the HTTP reason)."""
    def describe(response: httpx.Response) -> str:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and (body.get(title) or body.get(detail)):
            text = body.get(detail)
            return f"{response.status_code} {body.get(title) or response.reason_phrase}" + (f": {text}" if text else "")
        return _describe_plain(response, body=False)
    return describe


def _describe_plain(response: httpx.Response, *, body: bool = True) -> str:
    if not body:
        return f"HTTP {response.status_code} {response.reason_phrase}".strip()
    text = response.text.strip().replace("\n", " ")
    return f"HTTP {response.status_code}" + (f": {text[:200]}" if text else "")
