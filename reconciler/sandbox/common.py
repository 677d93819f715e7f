"""Building blocks shared by the vendor simulators in `reconciler.sandbox`.

Every `<Vendor>Simulator` subclasses `Simulator`, which owns the request workflow: routing against the
vendor's one endpoint table, the request log, fault injection, the rate limit, one lock around the store
and persistence to an append-only log (`LogStore`), with sorted views for paging (`SortedView`). The vendor module keeps its endpoint table, its authentication, its error
format and its handlers. Tests call `Simulator.handle` through `httpx.MockTransport`; `sandbox.server`
calls it for requests arriving over sockets. Nothing in the core imports this package.

Subclasses must set their own attributes before calling `Simulator.__init__` (it builds or loads the
state through `new_state`/`load_state`), must raise `SimulatorError` for refusals (rendered by their
`render_error`), and must call `mark_changed(table, key)` (or `mark_appended(name)`) whenever they change
`self.state`, so that the change is written after the request (see `Simulator`).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import email.utils
import fcntl
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


# What the vendors' documents call an E.164 phone number and a UUID, as the simulators check them.
E164 = re.compile(r"^\+[1-9]\d{1,14}$")
UUID_TEXT = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


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

LOG_KIND = "reconciler-sandbox-log"
LOG_VERSION = 1
_MISSING = object()

Path_ = tuple[str, ...]


def apply_ops(state: Any, ops: Iterable[Sequence[Any]]) -> Any:
    """`state` after the logged operations `["set", path, value]`, `["del", path]` and `["add", path, item]`
    (appends to the list at `path`); a path goes from the root, `[]` replaces the whole state, which is
    then returned."""
    for op in ops:
        kind, path = op[0], op[1]
        if not path:
            state = op[2] if kind == "set" else {}
            continue
        parent = state
        for name in path[:-1]:
            parent = parent[name]
        if kind == "set":
            parent[path[-1]] = op[2]
        elif kind == "add":
            parent[path[-1]].append(op[2])
        else:
            parent.pop(path[-1], None)
    return state


class StoreError(ValueError):
    """A store that is not this simulator's, or not a store at all."""


class LogStore:
    """A simulator's state on disk: an append-only log of JSON lines, shared between processes.

    Line 1 is a header `{"kind": "reconciler-sandbox-log", "log": 1, "format": …, "version": …}`; each
    further line is what one request changed, a JSON list of operations (`apply_ops`), written with one
    `write()` after the request and before its answer. Nothing rewrites the whole store per write:
    a write costs what it changed. Writes are flushed to the operating system, not fsync'd: they survive
    the process being killed, not the machine losing power (a sandbox is not a vendor's durability).

    - Processes: every request runs under an exclusive `flock` on the store file; first it reads the
      lines other processes appended since (`refresh`), so separate CLI runs and `sandbox serve` see each
      other's writes. A compaction replaces the file (tmp + `os.replace`): a process that finds its open
      file no longer at the path reopens and reloads.
    - A process killed mid-write leaves at most a torn last line (no newline): the request it carried was
      never answered; the next process to take the lock cuts it off.
    - A store written in the older one-document JSON format (same `format` and `version`) is converted
      on first open; anything else is refused with `StoreError`.
    - The log is compacted (rewritten as one snapshot line) when it holds many more operations than the
      state has records.
    """

    def __init__(self, path: Path, store_format: str, store_version: int):
        self.path = Path(path)
        self.format, self.version = store_format, store_version
        self._fd: int | None = None
        self._ino: tuple[int, int] | None = None
        self._offset = 0          # bytes of the file already applied to the state we hold
        self._depth = 0
        self._ops_since_snapshot = 0

    # --- opening
    def open(self, new_state: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The stored state; a new store from `new_state()` when there is none yet."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            fresh = new_state()
            self._create(fresh)     # loses quietly to a concurrent creator; we read the winner's below
        self._reopen()
        self.lock()
        try:
            return self._load_all()
        finally:
            self.unlock()

    def _header(self) -> bytes:
        return (json.dumps({"kind": LOG_KIND, "log": LOG_VERSION, "format": self.format, "version": self.version},
                           separators=(",", ":")) + "\n").encode()

    def _snapshot_bytes(self, state: dict[str, Any]) -> bytes:
        return self._header() + _line([["set", [], state]])

    def _write_tmp(self, content: bytes) -> str:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return tmp

    def _create(self, state: dict[str, Any]) -> None:
        tmp = self._write_tmp(self._snapshot_bytes(state))
        try:
            os.link(tmp, self.path)     # atomic, and fails if another process created the store first
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)

    def _reopen(self) -> None:
        if self._fd is not None:
            os.close(self._fd)      # releases a lock held on the replaced file
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        st = os.fstat(self._fd)
        self._ino = (st.st_dev, st.st_ino)
        self._offset = 0

    # --- the lock
    def lock(self) -> None:
        """Take the store's inter-process lock (re-entrant); the caller then calls `refresh`."""
        self._depth += 1
        if self._depth > 1:
            return
        while True:
            assert self._fd is not None
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            self._orphaned = st is None     # deleted under us: the next write puts back what we hold
            if st is None or (st.st_dev, st.st_ino) == self._ino:
                return
            self._reopen()          # replaced by a compaction elsewhere: the new file is the store

    def unlock(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    _orphaned = False

    @property
    def orphaned(self) -> bool:
        """Whether the file was deleted under us (found by `lock`): write it whole again."""
        return self._orphaned

    # --- reading
    def _read_from(self, offset: int) -> bytes:
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        chunks = []
        while offset < size:
            chunk = os.pread(self._fd, size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def _complete_lines(self, data: bytes, start: int) -> list[bytes]:
        """The complete lines of `data` (read from `start`); a torn tail is cut off the file."""
        end = data.rfind(b"\n") + 1
        if end < len(data):
            logger.warning("sandbox store %s: cutting off a torn last write (%d bytes)", self.path, len(data) - end)
            assert self._fd is not None
            os.ftruncate(self._fd, start + end)
        self._offset = start + end
        return data[:end].splitlines()

    def _load_all(self) -> dict[str, Any]:
        data = self._read_from(0)
        first = data.split(b"\n", 1)[0]
        try:
            header = json.loads(first)
        except ValueError:
            header = None
        if not (isinstance(header, dict) and header.get("kind") == LOG_KIND):
            return self._migrate(data)
        if header.get("log") != LOG_VERSION:
            raise StoreError(f"store log version {header.get('log')!r} is not {LOG_VERSION}")
        if header.get("format") != self.format or header.get("version") != self.version:
            raise StoreError(f"not a {self.format} store (format {header.get('format')!r}, "
                             f"version {header.get('version')!r})")
        lines = self._complete_lines(data, 0)
        state: Any = {}
        for line in lines[1:]:
            state = apply_ops(state, json.loads(line))
        self._ops_since_snapshot = len(lines) - 2
        return state

    def _migrate(self, data: bytes) -> dict[str, Any]:
        try:
            document = json.loads(data)
        except ValueError:
            raise StoreError(f"{self.path} is not a sandbox store") from None
        if not isinstance(document, dict) or document.get("format") != self.format \
                or document.get("version") != self.version:
            found = document if isinstance(document, dict) else {}
            raise StoreError(f"not a {self.format} store (format {found.get('format')!r}, "
                             f"version {found.get('version')!r})")
        logger.info("sandbox store %s: converting from the one-document format to a log", self.path)
        self.rewrite(document)
        return document

    def refresh(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """`state` with what other processes wrote since we last read (None: nothing new). Under `lock`."""
        assert self._fd is not None
        if self._orphaned:
            return None
        size = os.fstat(self._fd).st_size
        if self._offset == 0:           # reopened after a compaction elsewhere
            return self._load_all()
        if size == self._offset:
            return None
        if size < self._offset:         # cut by hand: start over from what is there
            return self._load_all()
        start = self._offset
        lines = self._complete_lines(self._read_from(start), start)
        for line in lines:
            state = apply_ops(state, json.loads(line))
        self._ops_since_snapshot += len(lines)
        logger.debug("sandbox store %s: applied %d writes of another process", self.path, len(lines))
        return state

    # --- writing
    def append(self, ops: list[list[Any]]) -> None:
        """Record one request's changes (under `lock`, after `refresh`)."""
        if self._orphaned:
            return
        assert self._fd is not None
        line = _line(ops)
        written = os.write(self._fd, line)
        while written < len(line):      # a regular file takes it whole; be exact anyway
            written += os.write(self._fd, line[written:])
        self._offset += len(line)
        self._ops_since_snapshot += 1

    def should_compact(self, records: int) -> bool:
        return self._ops_since_snapshot > 2 * records + 1000

    def rewrite(self, state: dict[str, Any]) -> None:
        """Replace the log by one snapshot of `state` (under `lock`): compaction and full writes."""
        tmp = self._write_tmp(self._snapshot_bytes(state))
        try:
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._orphaned = False
        old = self._fd
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        st = os.fstat(self._fd)
        self._ino = (st.st_dev, st.st_ino)
        self._offset = st.st_size
        self._ops_since_snapshot = 0
        if self._depth > 0:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        if old is not None:
            os.close(old)   # releases the old file's lock: a waiter there finds the new file and reopens

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:      # a raw descriptor: nothing else would close it
        try:
            self.close()
        except OSError:
            pass


def read_store(path: Path) -> dict[str, Any]:
    """The state a store file holds, read without locking or writing (tests, inspection)."""
    lines = Path(path).read_bytes().split(b"\n")
    header = json.loads(lines[0]) if lines[0].startswith(b"{\"") else None
    if not (isinstance(header, dict) and header.get("kind") == LOG_KIND):
        return json.loads(b"\n".join(lines))     # the one-document format
    state: Any = {}
    for line in lines[1:-1]:                      # the last is empty, or a torn write
        state = apply_ops(state, json.loads(line))
    return state


def _line(ops: list[list[Any]]) -> bytes:
    return (json.dumps(ops, separators=(",", ":")) + "\n").encode()


class ChangeSet:
    """What one request changed in a simulator's state, as paths from the root (in order of change).

    Top-level scalars (`seq`, `tokenGeneration`) are compared by value and need no mark.
    """

    def __init__(self) -> None:
        self.paths: dict[Path_, None] = {}
        self.appended: dict[Path_, int] = {}   # list → index of its first item appended by this request
        self.everything = False

    def mark(self, path: Path_) -> None:
        if not path:
            self.everything = True
        else:
            self.paths[path] = None

    def mark_appended(self, path: Path_, index: int) -> None:
        self.appended.setdefault(path, index)

    def __bool__(self) -> bool:
        return self.everything or bool(self.paths) or bool(self.appended)

    def ops(self, state: dict[str, Any]) -> list[list[Any]]:
        ops: list[list[Any]] = []
        for path in self.paths:
            value: Any = state
            for name in path:
                value = value.get(name, _MISSING) if isinstance(value, dict) else _MISSING
                if value is _MISSING:
                    break
            ops.append(["del", list(path)] if value is _MISSING else ["set", list(path), value])
        for path, first in self.appended.items():
            if path not in self.paths:      # a list written whole already holds its new items
                target: Any = state
                for name in path:
                    target = target[name]
                ops.extend(["add", list(path), item] for item in target[first:])
        return ops

    def clear(self) -> None:
        self.paths.clear()
        self.appended.clear()
        self.everything = False


def scalars(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if not isinstance(v, (dict, list))}


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


SortKey = Callable[[dict[str, Any]], Any]


class SortedView:
    """The records of one table in the order of a sort key, built once and kept until the table changes.

    A page is answered from it by bisection on the key and a walk of the page's length, instead of a sort
    of the whole table per page (which made listing a large table quadratic). `Simulator.view` keeps one
    per table and key, and rebuilds it when the table was marked changed.
    """

    def __init__(self, records: Iterable[dict[str, Any]], key: SortKey, stamp: Any = None):
        self.key = key
        self.stamp = stamp
        self.records = sorted(records, key=key)
        self.keys = [key(r) for r in self.records]
        self._groups: dict[str, dict[Any, list[dict[str, Any]]]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def page(self, *, after: Any = None, limit: int, descending: bool = False,
             where: Callable[[dict[str, Any]], bool] | None = None) -> tuple[list[dict[str, Any]], bool]:
        """Up to `limit` records past the key `after` (in the order asked, kept by `where`) and whether
        more follow. A cursor of another type than the keys raises TypeError."""
        records, found = self.records, list[dict[str, Any]]()
        if descending:
            i = len(records) - 1 if after is None else bisect.bisect_left(self.keys, after) - 1
            step, stop = -1, -1
        else:
            i = 0 if after is None else bisect.bisect_right(self.keys, after)
            step, stop = 1, len(records)
        while i != stop:
            record = records[i]
            if where is None or where(record):
                if len(found) == limit:
                    return found, True
                found.append(record)
            i += step
        return found, False

    def group(self, field: str) -> dict[Any, list[dict[str, Any]]]:
        """The records by the value of `field`, each list in key order (built once per view)."""
        if field not in self._groups:
            by: dict[Any, list[dict[str, Any]]] = {}
            for record in self.records:
                by.setdefault(record.get(field), []).append(record)
            self._groups[field] = by
        return self._groups[field]


def paginate(view: SortedView, *, limit: int, token: str | None, scope: str, tokens: PageTokens,
             descending: bool = False, where: Callable[[dict[str, Any]], bool] | None = None,
             ) -> tuple[list[dict[str, Any]], str | None]:
    """One page of `view` (both ways, filtered by `where`) and the token for the next page, if any."""
    cursor = tokens.decode(scope, token) if token is not None else None
    try:
        page, more = view.page(after=cursor, limit=limit, descending=descending, where=where)
    except TypeError:  # a signed cursor from an older store layout; refuse rather than crash
        raise SimulatorError(400, "Invalid next-page-token") from None
    next_token = tokens.encode(scope, view.key(page[-1])) if more else None
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
    response was lost; `fault` names an injected fault (`"503"`, `"lost"`). `body` is the parsed JSON
    body (redacted), or `"<N bytes>"` for another body; it is kept as compact JSON text and parsed when
    read, which keeps a fleet's request log several times smaller.
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body_text: str | None = None        # the redacted body as JSON text; None: no body
    status: int | None = None
    fault: str | None = None
    full_path: str = ""

    @property
    def body(self) -> Any:
        return None if self.body_text is None else json.loads(self.body_text)


class RequestLog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._strings: dict[str, str] = {}     # one copy of each header name and value seen often

    def _shared(self, text: str) -> str:
        if len(self._strings) < 4096:
            return self._strings.setdefault(text, text)
        return self._strings.get(text, text)

    def start(self, request: httpx.Request, path: str) -> RequestRecord:
        headers = {self._shared(k): REDACTED if _is_secret_name(k) else self._shared(v)
                   for k, v in request.headers.items()}
        body_text: str | None = None
        if request.content:
            try:
                body_text = json.dumps(redact(json.loads(request.content)), separators=(",", ":"))
            except (ValueError, UnicodeDecodeError):
                body_text = json.dumps(f"<{len(request.content)} bytes>")
        record = RequestRecord(method=request.method, path=path, query=dict(request.url.params),
                               headers=headers, body_text=body_text, full_path=request.url.path)
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


def json_object(body: Any, required: set[str], optional: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """`body` when it is a JSON object with every `required` field and no field but those and `optional`;
    else 400 naming the unknown or missing fields."""
    if not isinstance(body, dict):
        raise SimulatorError(400, "Request body must be a JSON object")
    unknown = sorted(set(body) - required - set(optional))
    if unknown:
        raise SimulatorError(400, f"Unknown field(s): {', '.join(unknown)}")
    missing = sorted(required - set(body))
    if missing:
        raise SimulatorError(400, f"Missing required field(s): {', '.join(missing)}")
    return body


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
    It logs the request, applies injected faults and the rate limit, then, holding the one store lock
    (and the store file's lock, for other processes), reads what other processes wrote meanwhile, calls
    the vendor's `dispatch`, and appends what the request changed to the store (`LogStore`).

    What changed is what the vendor code marks: `mark_changed(table, key)` after it inserts, replaces,
    mutates or deletes `state[table][key]`, `mark_changed(name)` for a whole top-level entry;
    `mark_changed()` alone rewrites the whole store (correct, and slow for large stores). Top-level scalars
    (`seq`, `tokenGeneration`) are noticed without a mark. The marks also tell `view` which sorted views
    to rebuild.
    """

    routes: ClassVar[tuple[Route, ...]] = ()
    not_found: ClassVar[str] = "Resource not found"     # the vendor's 404 detail for a path it has no route for
    routing_titles: ClassVar[dict[int, str]] = {}       # the vendor's own titles for its 404 and 405, if any
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
        self._changes = ChangeSet()
        self._epoch = 0                                   # bumped when the whole state may have changed
        self._generations: dict[str, int] = {}            # per table, bumped by `mark_changed(table, …)`
        self._views: dict[tuple[str, str], SortedView] = {}
        self.faults = FaultInjector()
        self._store = LogStore(store_path, self.store_format, self.store_version) if store_path is not None else None
        if self._store is None:
            self.state = self.new_state()
        else:
            created: list[dict[str, Any]] = []

            def fresh() -> dict[str, Any]:
                created.append(self.new_state())
                return created[0]

            loaded = self._store.open(fresh)
            self.state = created[0] if created and loaded == created[0] else self.load_state(loaded)
        self._saved_scalars = scalars(self.state)

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

    def route_of(self, request: httpx.Request, match: RouteMatch) -> Route:
        """The matched route; else 405 with `Allow` when the path has other methods, 404 when it has none."""
        if match.route is not None:
            return match.route
        if match.allowed:
            raise SimulatorError(405, f"Method {request.method} is not allowed here",
                                 title=self.routing_titles.get(405), headers={"Allow": ", ".join(match.allowed)})
        raise SimulatorError(404, self.not_found, title=self.routing_titles.get(404))

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
    def mark_changed(self, *path: str) -> None:
        """Note a change to `state[path[0]][path[1]]…` (a record, or with one name a top-level entry), to
        be written after the request; no path: anything may have changed (the whole store is rewritten)."""
        self._changes.mark(path)
        if path:
            self._generations[path[0]] = self._generations.get(path[0], 0) + 1
        else:
            self._epoch += 1

    def mark_appended(self, name: str) -> None:
        """Note that an item was appended to the top-level list `state[name]` (a log): only the new
        items are written."""
        self._changes.mark_appended((name,), len(self.state[name]) - 1)
        self._generations[name] = self._generations.get(name, 0) + 1

    def view(self, table: str, key: SortKey, name: str = "") -> SortedView:
        """`state[table]` sorted by `key` (`name` tells keys of one table apart), rebuilt only after a
        change to the table was marked."""
        records = self.state[table]
        stamp = (self._epoch, self._generations.get(table, 0), len(records))
        cached = self._views.get((table, name))
        if cached is None or cached.stamp != stamp:
            cached = self._views[(table, name)] = SortedView(records.values(), key, stamp)
        return cached

    def _records(self) -> int:
        return sum(len(v) for v in self.state.values() if isinstance(v, (dict, list)))

    def _save_if_changed(self) -> None:
        now_scalars = scalars(self.state)
        scalar_ops = [["set", [k], v] for k, v in now_scalars.items() if self._saved_scalars.get(k, _MISSING) != v]
        if not self._changes and not scalar_ops:
            return
        if self._store is not None:
            if self._changes.everything or self._store.orphaned or self._store.should_compact(self._records()):
                self._store.rewrite(self.state)
            else:
                self._store.append(self._changes.ops(self.state) + scalar_ops)
        self._changes.clear()
        self._saved_scalars = now_scalars

    def _enter(self) -> None:
        """Take the store lock and catch up with other processes' writes."""
        self._lock.acquire()
        if self._store is None:
            return
        try:
            self._store.lock()
            try:
                fresh = self._store.refresh(self.state)
            except BaseException:
                self._store.unlock()
                raise
        except BaseException:
            self._lock.release()
            raise
        if fresh is not None:
            logger.debug("sandbox store caught up path=%s", self._store.path)
            self.state = self.load_state(fresh)
            self._epoch += 1
            self._saved_scalars = scalars(self.state)

    def _exit(self) -> None:
        try:
            self._save_if_changed()
        finally:
            if self._store is not None:
                self._store.unlock()
            self._lock.release()

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
        self._enter()
        try:
            response = self.dispatch(request, match)
        except SimulatorError as error:
            response = self.render_error(error)
        finally:
            self._exit()
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
        self._sim._enter()
        return self._sim

    def __exit__(self, *exc: object) -> None:
        self._sim._exit()
