"""Shared state in PostgreSQL: many runners, one state, a lock that works across machines.

Chosen by `--state postgresql://USER@HOST:PORT/DB[?schema=NAME][&lease=SECONDS]` (or `RECONCILER_STATE`)
through `reconciler.state.open_state`; run.py and the providers use it exactly like `LocalState`.

The promises of the local journal, across machines:
- Every change the vendor confirmed is committed before the worker that made it sends anything else: during
  an apply, `put`, `delete` and `mark_applied` queue their statement, and `sync()` (which the providers call
  before every request that may change a vendor) commits everything queued so far, from every worker, in one
  transaction sent as one query (`_set_based`: a few set-based statements, each row's last write): one round
  trip covers the records of all the workers that waited for it (group
  commit). A background tick also commits what is queued, so a record waits at most a tick for its commit even
  when its worker sends nothing more; the lock is released only after the last commit. Outside an apply (no
  lock) each write is one committed statement before the call returns.
- One apply per system at a time: a session-level advisory lock per system, whose key derives from the schema
  and the system's name, taken in sorted order under the whole state's lock taken shared (`state push` and
  `state forget` take that one exclusively), all held on the very connection every write goes through. They
  are released when the holder's session ends, however it ends, and a write that succeeds proves they are
  still held. Who holds each (host, process, since, last renewal) is its `locks` row. Plans never take them:
  they read one snapshot and close their connection. Runners applying different systems run in parallel.
- Waiters are served in order of arrival: each takes a ticket (a `waiters` row of its own session) and tries
  the lock only when no live waiter holds an older ticket for it.
- A lease: the holder renews its rows every quarter of its lease (default 60 s, `lease=` in the URL), on the
  monotonic clock, from a background thread. A waiter finding a holder whose last renewal is older than the
  holder's own lease (by the server's clock) takes the lock over: it ends the holder's database session and
  moves the lock's epoch on, and says whose lock it took. A live holder renews long before its lease ends and
  is never taken over.
- A connection lost mid-apply is opened again and the lock taken again only if nobody took it in between
  (the holder row's `epoch` is still ours); otherwise, or while the server stays unreachable, the commit
  raises `StateUnavailableError` and the applier stops sending.
The tables live in their own schema (default `reconciler`), created on first use; the schema version is
recorded in `meta` and migrated forward under a transaction-level advisory lock, so runners starting at
once do not race. The password comes from libpq's environment (`PGPASSWORD`, `~/.pgpass`); one given in
the URL is used but never shown: messages name the state by `display`, which has none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qsl, unquote, urlsplit

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from reconciler.errors import LockedError, StateError
from reconciler.state.local import (
    EVIDENCE,
    KNOWN,
    RESIDUAL,
    REVISION,
    StateRecords,
    of_system,
    pause,
    select_system,
    system_note,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4
WHOLE = "*"                   # the name of the whole state's lock in `locks` (systems use their own name)
DEFAULT_SCHEMA = "reconciler"
NOTE = "note:"                # `meta` keys holding the state's notes (`StateRecords.note`)
WAIT_NOTICE_SECONDS = 30.0    # a waiting runner says who holds the lock, then again this often
RECONNECT_SECONDS = 30.0      # how long a lost connection is tried again before the apply stops
LEASE_SECONDS = 60.0          # a holder that has not renewed its lease this long may be taken over
TICK_SECONDS = 0.05           # the holder's background tick: commit what is queued, renew the lease when due
COMMIT_CONNECTIONS = 2        # commits in flight at once during an apply, each on a connection of its own
POLL_SECONDS = 0.2            # a waiter tries the lock this often
WAITER_STALE_SECONDS = 10.0   # a waiter not seen this long (stopped) is passed over until it polls again
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# One entry per schema version; each runs once, in order, in the transaction that records its number.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (   # 1: records (ids the vendors cannot give back), what apply last made each address look like, the lock
        "CREATE TABLE {s}.meta (key text PRIMARY KEY, value text NOT NULL)",
        "CREATE TABLE {s}.resources (address text PRIMARY KEY, record jsonb NOT NULL)",
        "CREATE TABLE {s}.applied (address text PRIMARY KEY, digest text NOT NULL)",
        "CREATE TABLE {s}.systems (name text PRIMARY KEY, identity jsonb NOT NULL)",
        "CREATE TABLE {s}.lock_holder (id int PRIMARY KEY CHECK (id = 1), host text NOT NULL, pid int NOT NULL,"
        " since timestamptz NOT NULL, backend_pid int NOT NULL, epoch bigint NOT NULL)",
    ),
    (   # 2: which runner wrote each record last, and when (server time): who to ask when a record puzzles
        "ALTER TABLE {s}.resources ADD COLUMN written_by text, ADD COLUMN written_at timestamptz",
    ),
    (   # 3: a lock per system: who holds each (a system's name, or '*' for the whole state), and its epoch
        "CREATE TABLE {s}.locks (name text PRIMARY KEY, host text NOT NULL, pid int NOT NULL,"
        " since timestamptz NOT NULL, backend_pid int NOT NULL, epoch bigint NOT NULL)",
    ),
    (   # 4: leases (the holder's session, last renewal, lease in seconds) and the waiters' queue, in order
        "ALTER TABLE {s}.locks ADD COLUMN backend_start timestamptz, ADD COLUMN renewed_at timestamptz,"
        " ADD COLUMN lease double precision",
        "CREATE TABLE {s}.waiters (ticket bigserial PRIMARY KEY, name text NOT NULL, host text NOT NULL,"
        " pid int NOT NULL, backend_pid int NOT NULL, backend_start timestamptz NOT NULL,"
        " since timestamptz NOT NULL, seen_at timestamptz NOT NULL)",
        "CREATE INDEX ON {s}.waiters (name, ticket)",
    ),
)
assert len(MIGRATIONS) == SCHEMA_VERSION


class StateUnavailableError(StateError):
    """The state database cannot be written (unreachable, or the lock was lost): the apply must stop,
    because a change sent now could not be recorded."""


class StateLocation:
    """A parsed `postgresql://` state URL: connection parameters, the schema, and a display form without
    the password."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise StateError("a state URL starts with postgresql://")
        try:
            port = parts.port or 5432
        except ValueError:
            raise StateError("the state URL has an invalid port") from None
        self.host = parts.hostname or "127.0.0.1"
        self.port = port
        self.user = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.dbname = unquote(parts.path.lstrip("/")) or None
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        self.schema = options.pop("schema", DEFAULT_SCHEMA)
        if not _SCHEMA_NAME.match(self.schema):
            raise StateError(f"state URL: schema must be a lower-case SQL name (letters, digits, _), "
                             f"got {self.schema[:70]!r}")
        self.lease = _lease(options.pop("lease", None))
        self.options = options          # libpq options (sslmode, ...), passed on as they are
        user = f"{self.user}@" if self.user else ""
        db = f"/{self.dbname}" if self.dbname else ""
        self.display = f"postgresql://{user}{self.host}:{self.port}{db}?schema={self.schema}"
        # Advisory locks are per database; the keys derive from the schema, so states in other schemas of
        # the same database never contend.
        self.lock_key = _key(f"reconciler apply {self.schema}")
        self.migration_key = _key(f"reconciler schema {self.schema}")

    def system_key(self, system: str) -> int:
        """The advisory lock of one system of this state (schema + system name)."""
        return _key(f"reconciler apply {self.schema} system {system}")

    def connect(self, *, application: str = "reconciler") -> psycopg.Connection[Any]:
        params: dict[str, Any] = {"host": self.host, "port": self.port, "application_name": application[:63],
                                  "connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30,
                                  "keepalives_interval": 10, "keepalives_count": 3, **self.options}
        if self.user:
            params["user"] = self.user
        if self.dbname:
            params["dbname"] = self.dbname
        if self.password:
            params["password"] = self.password
        try:
            conn = psycopg.connect(autocommit=True, **params)
        except psycopg.Error as exc:
            raise StateUnavailableError(f"cannot reach the state database {self.display}: {self.reason(exc)}") \
                from None
        try:
            # A commit returns only once it is durable, whatever the server's default; and the server notices
            # a vanished runner within about a minute and releases its lock.
            conn.execute("SET synchronous_commit = on")
            conn.execute("SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; "
                         "SET tcp_keepalives_count = 3")
        except psycopg.Error as exc:
            conn.close()
            raise StateUnavailableError(f"cannot set up the state session on {self.display}: {self.reason(exc)}") \
                from None
        return conn

    def reason(self, exc: BaseException) -> str:
        text = " ".join(str(exc).split()) or type(exc).__name__
        if self.password:
            text = text.replace(self.password, "***")
        return text[:300]


def _lease(text: str | None) -> float:
    """The `lease=` of a state URL: seconds (`90`, `90s`), at least 1 and at most a day."""
    if text is None:
        return LEASE_SECONDS
    try:
        seconds = float(text.strip().lower().removesuffix("s"))
    except ValueError:
        seconds = 0.0
    if not 1.0 <= seconds <= 86400.0:
        raise StateError(f"state URL: lease must be seconds between 1 and 86400 (e.g. lease=60), got {text[:30]!r}")
    return seconds


def _key(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big", signed=True)


def _q(statement: str, schema: str) -> sql.Composed:
    return sql.SQL(statement).format(s=sql.Identifier(schema))


def _scalar(cursor: Any) -> Any:
    """The first column of the one row a query always returns."""
    row = cursor.fetchone()
    if row is None:
        raise StateError("the state database returned no row where one is always expected")
    return row[0]


def schema_version(conn: psycopg.Connection[Any], schema: str) -> int:
    """The version recorded in `schema`, 0 when the tool never wrote there."""
    found = conn.execute("SELECT to_regclass(%s)", (f"{schema}.meta",)).fetchone()
    if not found or found[0] is None:
        return 0
    row = conn.execute(_q("SELECT value FROM {s}.meta WHERE key = 'schema_version'", schema)).fetchone()
    return int(row[0]) if row else 0


def ensure_schema(conn: psycopg.Connection[Any], location: StateLocation, target: int = SCHEMA_VERSION) -> int:
    """Create the tables on first use and migrate them forward to `target`; refuse a newer schema."""
    schema = location.schema
    version = schema_version(conn, schema)
    if version > SCHEMA_VERSION:
        raise StateError(f"state {location.display} has schema version {version}, written by a newer reconciler "
                         f"(this one knows up to {SCHEMA_VERSION}); upgrade reconciler")
    if version >= target:
        return version
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (location.migration_key,))
        conn.execute(_q("CREATE SCHEMA IF NOT EXISTS {s}", schema))
        version = schema_version(conn, schema)     # another runner may have migrated while we waited
        for number in range(version + 1, target + 1):
            for statement in MIGRATIONS[number - 1]:
                conn.execute(_q(statement, schema))
            conn.execute(_q("INSERT INTO {s}.meta (key, value) VALUES ('schema_version', %s) "
                            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", schema), (str(number),))
            log.info("state schema migrated schema=%s version=%d", schema, number)
    return max(version, target)


class PostgresState(StateRecords):
    """The state store of `LocalState`'s interface, kept in a PostgreSQL schema shared by many runners."""

    def __init__(self, url: str, *, lock_timeout: float = 0.0, sleep: Callable[[float], None] = pause):
        self.server = StateLocation(url)
        self.lock_timeout = lock_timeout
        self.sleep = sleep
        self._records: dict[str, dict[str, Any]] = {}
        self._applied: dict[str, str] = {}
        self._systems: dict[str, dict[str, str]] = {}   # system name → identity it was applied to
        self._notes: dict[str, Any] = {}
        self._mutex = threading.Lock()         # the in-memory copy and the queue of writes
        self._conn_mutex = threading.RLock()   # the connection: one statement at a time, reconnects
        self._conn: psycopg.Connection[Any] | None = None
        self._epoch: int | None = None          # set while we hold the lock
        self._epochs: dict[str, int] = {}       # each lock held (a system, or WHOLE) → its epoch
        self._held: list[tuple[str, int, bool]] = []   # (name, advisory key, exclusive) in the order taken
        self._lost: str | None = None           # why the lock was lost mid-apply: no write goes through after
        self._who = f"{socket.gethostname()[:100]} pid {os.getpid()}"
        # Writes queued during an apply, in the order made, for `sync()` to commit: (statement, parameters,
        # the row it writes). Numbered from 0 in that order: `_sent` of them are in commits sent, the first
        # `_synced` committed; `_done` the ranges committed beyond `_synced` (commits finish out of order).
        self._pending: list[tuple[str, tuple[Any, ...], str]] = []
        self._written = 0
        self._sent = 0
        self._synced = 0
        self._done: dict[int, int] = {}
        self._turn = threading.Condition(self._mutex)   # a commit finished, or the lock was lost
        # Commits go through several connections, so that some are in flight while the next is sent: the
        # lock's own (slot 0) and helpers (slots 1…), each commit fenced by the lock rows' epochs (`_commit`).
        self._free = list(range(COMMIT_CONNECTIONS))
        self._in_flight: dict[int, set[str]] = {}      # slot → rows its commit writes
        self._helpers: dict[int, psycopg.Connection[Any]] = {}
        self._helper_mutex = {slot: threading.Lock() for slot in range(1, COMMIT_CONNECTIONS)}
        self._keeper: threading.Thread | None = None
        self._keeping = threading.Event()       # set while the keeper should run (checked, never waited on)
        self.commits = 0                        # transactions `sync()` committed (the bench reports it)
        with self._connection() as conn:
            ensure_schema(conn, self.server)
            self._load(conn)

    @property
    def location(self) -> str:
        """Where this state is, as messages name it (no password)."""
        return self.server.display

    def __str__(self) -> str:
        return self.location

    # -- writing: queued under the lock and committed by `sync()`; outside it, committed at once ---------
    def put(self, address: str, record: Mapping[str, Any]) -> None:
        record = dict(record)
        self._change("INSERT INTO {s}.resources (address, record, written_by, written_at) "
                     "VALUES (%s, %s::jsonb, %s, now()) ON CONFLICT (address) DO UPDATE SET record = EXCLUDED.record, "
                     "written_by = EXCLUDED.written_by, written_at = EXCLUDED.written_at",
                     (address, json.dumps(record), self._who), lambda: self._records.__setitem__(address, record))

    def delete(self, address: str) -> None:
        with self._mutex:
            known = address in self._records
        if known:
            self._change("DELETE FROM {s}.resources WHERE address = %s", (address,),
                         lambda: self._records.pop(address, None))

    def set_system(self, name: str, identity: Mapping[str, str]) -> None:
        identity = {str(k): str(v) for k, v in identity.items()}
        with self._mutex:
            if self._systems.get(name) == identity:
                return
        self._change("INSERT INTO {s}.systems (name, identity) VALUES (%s, %s::jsonb) "
                     "ON CONFLICT (name) DO UPDATE SET identity = EXCLUDED.identity", (name, json.dumps(identity)),
                     lambda: self._systems.__setitem__(name, identity))

    def set_note(self, key: str, value: Any) -> None:
        """Kept in `meta` as `note:<key>` (JSON text): no new table, no schema migration."""
        with self._mutex:
            if self._notes.get(key) == value:
                return
        self._change("INSERT INTO {s}.meta (key, value) VALUES (%s, %s) "
                     "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", (NOTE + key, json.dumps(value)),
                     lambda: self._notes.__setitem__(key, value))

    def mark_applied(self, address: str, attributes_digest: str | None) -> None:
        with self._mutex:
            current = self._applied.get(address)
        if attributes_digest is None:
            if current is not None:
                self._change("DELETE FROM {s}.applied WHERE address = %s", (address,),
                             lambda: self._applied.pop(address, None))
        elif current != attributes_digest:
            self._change("INSERT INTO {s}.applied (address, digest) VALUES (%s, %s) "
                         "ON CONFLICT (address) DO UPDATE SET digest = EXCLUDED.digest", (address, attributes_digest),
                         lambda: self._applied.__setitem__(address, attributes_digest))

    @property
    def previous_path(self) -> Path | None:
        """No previous snapshot: the database keeps its own backups."""
        return None

    def sync(self) -> None:
        """Commit every write queued so far, whichever worker queued it: each commit takes everything queued
        when it starts, in one transaction sent as one query, and two commits may be in flight at once (on two
        connections) when they write different rows. Callers share commits: one sends, the others find
        their writes in it. Raises `StateUnavailableError` when it cannot, or once the lock was lost: then
        nothing may be sent."""
        if self._lost:
            raise StateUnavailableError(self._lost)
        with self._turn:
            wanted = self._written
        while True:
            with self._turn:
                while True:
                    if self._lost:
                        raise StateUnavailableError(self._lost)
                    if self._synced >= wanted:
                        return
                    rows = {row for _, _, row in self._pending}
                    if self._pending and self._free and not any(rows & busy for busy in self._in_flight.values()):
                        break
                    self._turn.wait()   # a commit in flight covers ours, or must finish first
                batch, self._pending = self._pending, []
                start, self._sent = self._sent, self._written
                upto = self._sent
                slot = self._free.pop(0)
                self._in_flight[slot] = rows
            try:
                self._commit([(statement, params) for statement, params, _ in batch], slot)
            finally:
                with self._turn:
                    self._free.append(slot)
                    self._free.sort()
                    del self._in_flight[slot]
                    if not self._lost:
                        self._done[start] = upto
                        while self._synced in self._done:
                            self._synced = self._done.pop(self._synced)
                    self._turn.notify_all()

    def check_writable(self) -> None:
        """Once the lock was lost (or the database could not be written), nothing may be sent."""
        if self._lost:
            raise StateUnavailableError(self._lost)

    def save(self) -> None:
        """Nothing to fold: commit what is queued."""
        self.sync()

    def replace(self, snapshot: Mapping[str, Any], *, system: str | None = None) -> None:
        """Replace the whole state with `snapshot` (the local file's format) in one transaction; `state push`
        calls it under the lock. `system`: replace only that system's records (its addresses, its identity,
        its evidence, revision and residual notes), leaving every other system's as they are (`state push
        --target`)."""
        part = select_system(snapshot, system) if system else snapshot
        resources = {str(a): dict(r) for a, r in (part.get("resources") or {}).items()}
        applied = {str(a): str(d) for a, d in (part.get("applied") or {}).items()}
        systems = {str(n): {str(k): str(v) for k, v in i.items()} for n, i in (part.get("systems") or {}).items()}
        notes = {str(k): v for k, v in (part.get("notes") or {}).items()}
        s = self.server.schema
        clear: list[tuple[str, tuple[Any, ...]]]
        if system:
            prefix = system.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "/%"
            keys = [f"evidence/{system}", system_note(RESIDUAL, system), system_note(REVISION, system)]
            with self._mutex:
                whole = self._notes.get(RESIDUAL)
            others = [r for r in whole or [] if not of_system(r, system)]
            if isinstance(whole, list) and len(others) != len(whole):
                # The whole note of earlier versions held entries of this system: they go with it.
                keys.append(RESIDUAL)
                if others:
                    notes[RESIDUAL] = others
            clear = [("DELETE FROM {s}.resources WHERE address LIKE %s", (prefix,)),
                     ("DELETE FROM {s}.applied WHERE address LIKE %s", (prefix,)),
                     ("DELETE FROM {s}.systems WHERE name = %s", (system,)),
                     ("DELETE FROM {s}.meta WHERE key = ANY(%s)", ([NOTE + k for k in keys],)),
                     # its evidence buckets and known-id sets (`is_system_note`)
                     ("DELETE FROM {s}.meta WHERE key LIKE %s OR key LIKE %s",
                      (f"{NOTE}{EVIDENCE}/{prefix}", f"{NOTE}{KNOWN}/{prefix}"))]
        else:
            clear = [("DELETE FROM {s}.resources", ()), ("DELETE FROM {s}.applied", ()),
                     ("DELETE FROM {s}.systems", ()), ("DELETE FROM {s}.meta WHERE key LIKE 'note:%%'", ())]
        self.sync()
        with self._conn_mutex:
            conn = self._require_conn()
            try:
                with conn.transaction():
                    for statement, params in clear:
                        conn.execute(_q(statement, s), params)
                    with conn.cursor() as cur:
                        cur.executemany(_q("INSERT INTO {s}.resources (address, record, written_by, written_at) "
                                           "VALUES (%s, %s, %s, now())", s),
                                        [(a, Jsonb(r), self._who) for a, r in sorted(resources.items())])
                        cur.executemany(_q("INSERT INTO {s}.applied (address, digest) VALUES (%s, %s)", s),
                                        sorted(applied.items()))
                        cur.executemany(_q("INSERT INTO {s}.systems (name, identity) VALUES (%s, %s)", s),
                                        [(n, Jsonb(i)) for n, i in sorted(systems.items())])
                        cur.executemany(_q("INSERT INTO {s}.meta (key, value) VALUES (%s, %s)", s),
                                        [(NOTE + k, json.dumps(v)) for k, v in sorted(notes.items())])
            except psycopg.Error as exc:
                raise StateUnavailableError(f"state {self.location}: the push was not written: "
                                            f"{self.server.reason(exc)}") from None
            self._load(conn)

    # -- locking -------------------------------------------------------------------------------------
    def lock(self, systems: Iterable[str] | None = None) -> None:
        """Take the apply lock, waiting up to `lock_timeout` seconds (0: refuse at once, naming the holder),
        in line behind the waiters that came first; a holder whose lease ran out is taken over.

        `systems`: one lock per system, taken in sorted order (so two runners never wait on each other in a
        circle), under the whole state's lock taken shared; None takes the whole state's lock exclusively
        (`state push`, `state forget`), which waits for every system's apply and excludes them all."""
        wanted = [(WHOLE, self.server.lock_key, True)] if systems is None else \
            [("", self.server.lock_key, False)] + [(n, self.server.system_key(n), True) for n in sorted(set(systems))]
        with self._conn_mutex:
            if self._conn is None:
                self._conn = self.server.connect(application=f"reconciler apply {self._who}")
            conn = self._conn
            deadline = time.monotonic() + self.lock_timeout
            taken: list[tuple[str, int, bool]] = []
            try:
                for name, key, exclusive in wanted:
                    self._wait_for(conn, name, key, exclusive, deadline)
                    taken.append((name, key, exclusive))
                epochs: dict[str, int] = {}
                with conn.transaction():
                    for name, _, exclusive in taken:
                        if not exclusive:
                            continue
                        row = conn.execute(_q(
                            "INSERT INTO {s}.locks AS h (name, host, pid, since, backend_pid, epoch, backend_start, "
                            "renewed_at, lease) VALUES (%s, %s, %s, now(), pg_backend_pid(), 1, "
                            "(SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()), now(), %s) "
                            "ON CONFLICT (name) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid, since = now(), "
                            "backend_pid = pg_backend_pid(), epoch = h.epoch + 1, "
                            "backend_start = EXCLUDED.backend_start, renewed_at = now(), lease = EXCLUDED.lease "
                            "RETURNING epoch", self.server.schema),
                            (name, socket.gethostname()[:255], os.getpid(), self.server.lease))
                        epochs[name] = int(_scalar(row))
                self._held = taken
                self._epochs = epochs
                self._epoch = max(epochs.values())
                self._load(conn)   # what the previous holders wrote is now final
            except psycopg.Error as exc:
                self._close()
                raise StateUnavailableError(f"state {self.location}: cannot take the lock: "
                                            f"{self.server.reason(exc)}") from None
        self._start_keeper()
        log.info("state locked state=%s locks=%s lease=%gs", self.location, ",".join(sorted(self._epochs)),
                 self.server.lease)

    def _wait_for(self, conn: psycopg.Connection[Any], name: str, key: int, exclusive: bool,
                  deadline: float) -> None:
        """Take one advisory lock in turn: at once when nobody waits for it; else with a ticket, trying it
        (every POLL_SECONDS, with short sleeps) only when no live waiter holds an older ticket, until
        `deadline`. A holder whose lease ran out is taken over. On timeout the session ends (releasing what
        this store took so far) and the refusal names the holder."""
        take = "pg_try_advisory_lock(%(k)s)" if exclusive else "pg_try_advisory_lock_shared(%(k)s)"
        what = f"system {name!r} of state {self.location}" if name and name != WHOLE else f"state {self.location}"
        lock_id = name or WHOLE
        live = ("SELECT 1 FROM {s}.waiters w JOIN pg_stat_activity a ON a.pid = w.backend_pid "
                "AND a.backend_start = w.backend_start WHERE w.name = %(q)s "
                "AND w.seen_at > now() - make_interval(secs => %(stale)s)")
        first = _q(f"SELECT CASE WHEN EXISTS ({live}) THEN false ELSE {take} END", self.server.schema)
        again = _q(f"WITH seen AS (UPDATE {{s}}.waiters SET seen_at = now() WHERE ticket = %(t)s RETURNING ticket) "
                   f"SELECT CASE WHEN EXISTS ({live} AND w.ticket < %(t)s) THEN false ELSE {take} END FROM seen",
                   self.server.schema)
        params: dict[str, Any] = {"q": lock_id, "k": key, "stale": WAITER_STALE_SECONDS, "t": None}
        said: float | None = None
        try:
            while True:
                row = conn.execute(first if params["t"] is None else again, params).fetchone()
                if row is not None and row[0]:
                    return
                if row is None or params["t"] is None:
                    params["t"] = self._ticket(conn, lock_id)     # in line (again, if our ticket was cleared)
                    continue
                if self._take_over(conn, what, key):
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    holder = self._holder(conn, key)
                    if self.lock_timeout:
                        waited = f" after waiting {self.lock_timeout:g}s"
                        how = "wait longer with a larger --lock-timeout"
                    else:
                        waited, how = "", "wait for it to finish, or pass --lock-timeout to wait for it"
                    self._close()       # the session ends, and every lock taken so far with it
                    raise LockedError(f"{what} is locked by another apply{waited}: {holder}; {how}; if its holder "
                                      f"is stuck, `reconciler state unlock {lock_id}` breaks the lock")
                if said is None or time.monotonic() - said >= WAIT_NOTICE_SECONDS:
                    said = time.monotonic()
                    ahead = _scalar(conn.execute(_q(f"SELECT count(*) FROM ({live} AND w.ticket < %(t)s) x",
                                                    self.server.schema), params))
                    log.warning("waiting for the lock of %s (lock id %s), held by %s; %d waiting before us; "
                                "up to %ds more", what, lock_id, self._holder(conn, key), ahead, int(remaining))
                self.sleep(min(POLL_SECONDS, max(0.0, remaining)))
        finally:
            if params["t"] is not None and not conn.closed:
                with contextlib.suppress(psycopg.Error):
                    conn.execute(_q("DELETE FROM {s}.waiters WHERE ticket = %s", self.server.schema), (params["t"],))

    def _ticket(self, conn: psycopg.Connection[Any], lock_id: str) -> int:
        """A place in the line for `lock_id`, after everyone already there; the tickets of ended sessions go."""
        s = self.server.schema
        conn.execute(_q("DELETE FROM {s}.waiters w WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity a "
                        "WHERE a.pid = w.backend_pid AND a.backend_start = w.backend_start)", s))
        return int(_scalar(conn.execute(_q(
            "INSERT INTO {s}.waiters (name, host, pid, backend_pid, backend_start, since, seen_at) "
            "SELECT %s, %s, %s, pg_backend_pid(), backend_start, now(), now() FROM pg_stat_activity "
            "WHERE pid = pg_backend_pid() RETURNING ticket", s), (lock_id, socket.gethostname()[:255], os.getpid()))))

    def _take_over(self, conn: psycopg.Connection[Any], what: str, key: int) -> bool:
        """End the session of a holder of `key` that stopped renewing its lease (its last renewal is older
        than its lease, by the server's clock), and move its locks' epochs on so that it cannot take them
        back should it wake. Returns whether a holder was taken over (the lock is then free, or about to be)."""
        mask = key & 0xFFFFFFFFFFFFFFFF
        rows = conn.execute(_q(
            "SELECT l.pid, a.backend_start, h.host, h.pid, min(h.since), "
            "min(extract(epoch FROM now() - h.renewed_at))::float8, max(h.lease) "
            "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "JOIN {s}.locks h ON h.backend_pid = l.pid AND h.backend_start = a.backend_start "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
            "AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND h.renewed_at IS NOT NULL AND h.lease IS NOT NULL AND l.pid <> pg_backend_pid() "
            "GROUP BY l.pid, a.backend_start, h.host, h.pid", self.server.schema),
            (mask >> 32, mask & 0xFFFFFFFF)).fetchall()
        taken = False
        for backend, started, host, pid, since, silent, lease in rows:
            if silent is None or lease is None or silent <= lease:
                continue
            conn.execute(_q("UPDATE {s}.locks SET epoch = epoch + 1, renewed_at = NULL "
                            "WHERE backend_pid = %s AND backend_start = %s", self.server.schema), (backend, started))
            conn.execute("SELECT pg_terminate_backend(%s)", (backend,))
            log.warning("took over the lock of %s from host %s, process %s (holding it since %s): it had not "
                        "renewed its lease for %ds (lease %gs); that apply stops when it wakes", what,
                        _printable(host), pid, _iso(since), int(silent), lease)
            taken = True
        return taken

    def unlock(self) -> None:
        """Commit what is queued, then release every lock (even when the commit fails: it raises after)."""
        self._stop_keeper()
        failed: StateError | None = None
        try:
            if self._epoch is not None and not self._lost:
                self.sync()
        except StateError as exc:
            failed = exc
        with self._conn_mutex:
            if self._conn is not None and self._epoch is not None and not self._conn.broken:
                try:
                    self._conn.execute(_q("UPDATE {s}.locks SET renewed_at = NULL WHERE name = ANY(%s) "
                                          "AND backend_pid = pg_backend_pid()", self.server.schema),
                                       (list(self._epochs),))
                    for _, key, exclusive in reversed(self._held):
                        self._conn.execute("SELECT pg_advisory_unlock(%s)" if exclusive else
                                           "SELECT pg_advisory_unlock_shared(%s)", (key,))
                except psycopg.Error:
                    pass       # the session is gone, and its lock with it
            self._epoch = None
            self._epochs = {}
            self._held = []
            self._lost = None
            with self._turn:
                self._pending = []
                self._sent = self._synced = self._written
                self._done = {}
            self._close()
        if failed is not None:
            raise failed

    def force_unlock(self, lock_id: str) -> str:
        """Terraform's force-unlock: end the database session holding lock `lock_id` (a system's name, or
        '*' for the whole state), which releases its locks, and move the lock's epoch on so that the stopped
        holder, should it wake, cannot take it back. Returns who held it."""
        key = self.server.lock_key if lock_id in (WHOLE, "") else self.server.system_key(lock_id)
        with self._connection() as conn:
            try:
                holder = self._holder(conn, key)
                mask = key & 0xFFFFFFFFFFFFFFFF
                ended = conn.execute(
                    "SELECT pg_terminate_backend(l.pid) FROM pg_locks l WHERE l.locktype = 'advisory' "
                    "AND l.granted AND l.objsubid = 1 AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid "
                    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                    "AND l.pid <> pg_backend_pid()", (mask >> 32, mask & 0xFFFFFFFF)).fetchall()
                conn.execute(_q("UPDATE {s}.locks SET epoch = epoch + 1, renewed_at = NULL WHERE name = %s",
                                self.server.schema), (lock_id or WHOLE,))
            except psycopg.Error as exc:
                raise StateUnavailableError(f"state {self.location}: cannot break lock {lock_id!r}: "
                                            f"{self.server.reason(exc)}") from None
        if not ended:
            raise StateError(f"lock {lock_id!r} of state {self.location} is not held; nothing was changed")
        log.warning("broke lock %s of state %s, held by %s", lock_id, self.location, holder)
        return holder

    def __enter__(self) -> Self:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()

    # -- the keeper: commits what is queued, renews the lease ------------------------------------------
    def _start_keeper(self) -> None:
        self._keeping.set()
        self._keeper = threading.Thread(target=self._keep, name="state-keeper", daemon=True)
        self._keeper.start()

    def _stop_keeper(self) -> None:
        self._keeping.clear()
        if self._keeper is not None:
            self._keeper.join()
            self._keeper = None

    def _keep(self) -> None:
        """While the lock is held: every tick, commit what the workers queued (so a record waits at most a
        tick even when its worker sends nothing more); every quarter of the lease, renew it. Monotonic time,
        short sleeps."""
        renewed = time.monotonic()
        while self._keeping.is_set():
            pause(TICK_SECONDS)
            if not self._keeping.is_set():
                return
            try:
                self.sync()
            except StateError as exc:
                log.debug("state keeper: commit failed error=%s", exc)   # sync() said so to the workers too
            if time.monotonic() - renewed >= self.server.lease / 4:
                renewed = time.monotonic()
                self._renew()

    def _renew(self) -> None:
        """Move our locks' `renewed_at` to the server's now. A broken connection is left to the next commit,
        which reconnects (or stops the apply)."""
        with self._conn_mutex:
            conn = self._conn
            if self._epoch is None or self._lost or conn is None or conn.broken or conn.closed:
                return
            try:
                done = conn.execute(_q("UPDATE {s}.locks SET renewed_at = now() WHERE name = ANY(%s) "
                                       "AND backend_pid = pg_backend_pid() AND epoch = ANY(%s)", self.server.schema),
                                    (list(self._epochs), list(self._epochs.values()))).rowcount
            except psycopg.Error as exc:
                log.warning("lease not renewed state=%s error=%s", self.location, self.server.reason(exc))
                return
        if done != len(self._epochs):
            log.warning("lease renewal found %d of %d locks ours state=%s", done, len(self._epochs), self.location)

    # -- internals -----------------------------------------------------------------------------------
    def _holder(self, conn: psycopg.Connection[Any], key: int | None = None) -> str:
        """Who holds the lock `key` (default: the whole state's): the holder row when it belongs to the session
        holding the lock, else what the server knows of that session."""
        key = (self.server.lock_key if key is None else key) & 0xFFFFFFFFFFFFFFFF
        row = conn.execute(_q(
            "SELECT l.pid, h.host, h.pid, h.since, a.client_addr::text, a.backend_start, "
            "extract(epoch FROM now() - h.renewed_at)::float8, h.lease "
            "FROM pg_locks l LEFT JOIN {s}.locks h ON h.backend_pid = l.pid "
            "LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
            "AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "ORDER BY h.since NULLS LAST LIMIT 1",
            self.server.schema), (key >> 32, key & 0xFFFFFFFF)).fetchone()
        if row is None:
            return "the holder has just released it; try again"
        backend, host, pid, since, client, started, silent, lease = row
        if host is not None:
            renewed = f", lease renewed {int(silent)}s ago (lease {lease:g}s)" if silent is not None and lease else ""
            return f"host {_printable(host)}, process {pid}, since {_iso(since)}{renewed}"
        where = f" from {client}" if client else ""
        when = f", connected since {_iso(started)}" if started else ""
        return f"database session {backend}{where}{when}"

    def _connection(self) -> _Borrowed:
        return _Borrowed(self)

    def _require_conn(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = self.server.connect()
        return self._conn

    def _change(self, statement: str, params: tuple[Any, ...], effect: Callable[[], Any]) -> None:
        """One write: queued (and its effect on the in-memory copy made) while the lock is held, for
        `sync()` to commit; outside an apply, committed at once, then made in memory."""
        if self._epoch is None:
            self._write(statement, params)
            with self._mutex:
                effect()
            return
        row = _table(statement) + "\0" + str(params[0])
        with self._mutex:
            effect()
            self._pending.append((statement, params, row))
            self._written += 1

    def _write(self, statement: str, params: tuple[Any, ...]) -> None:
        """Outside an apply (no lock): one short connection per write."""
        if self._lost:
            raise StateUnavailableError(self._lost)
        with self._conn_mutex, self._connection() as short:
            self._execute(short, _q(statement, self.server.schema), params)

    def _commit(self, batch: list[tuple[str, tuple[Any, ...]]], slot: int) -> None:
        """Commit `batch` (in order) in one transaction, one query: one round trip whatever its size. The
        transaction first takes our lock rows FOR SHARE at the epochs we hold them at (the fence): a runner
        taking the lock over moves them on, so a commit lands before it does, or fails. The statements are
        idempotent (upserts, deletes), so a batch whose commit was cut off with the connection is sent again
        whole on a new one (on the lock's own, once the lock is held again). On failure the apply stops."""
        if not batch:
            return
        s = self.server.schema
        mutex = self._conn_mutex if slot == 0 else self._helper_mutex[slot]
        with mutex:
            if self._lost:
                raise StateUnavailableError(self._lost)
            for attempt in (1, 2):
                conn = self._conn if slot == 0 else self._helpers.get(slot)
                try:
                    if conn is None or conn.broken or conn.closed:
                        if slot == 0:
                            self._reconnect()
                            conn = self._conn
                        else:
                            conn = self._helpers[slot] = self.server.connect(
                                application=f"reconciler apply {self._who}")
                    assert conn is not None
                    names, epochs = list(self._epochs), list(self._epochs.values())
                    # One round trip, one implicit transaction: the statements of one simple query run as a
                    # single transaction (an error in any rolls back all). Bound on the client to send them
                    # together; the fence comes first, so no row is written once the lock has moved on.
                    statements = [_q("SELECT CASE WHEN count(*) = %s THEN 1 ELSE 1 / (0 * count(*)) END FROM (SELECT 1 "
                                     "FROM {s}.locks WHERE (name, epoch) IN (SELECT * FROM unnest(%s::text[], "
                                     "%s::bigint[])) FOR SHARE) AS ours", s)]
                    params: list[Any] = [len(names), names, epochs]
                    for statement, values in _set_based(batch):
                        statements.append(_q(statement, s))
                        params.extend(values)
                    with psycopg.ClientCursor(conn) as cur:
                        cur.execute(sql.SQL("; ").join(statements), params)
                    self.commits += 1
                    return
                except psycopg.errors.DivisionByZero:
                    self._lost = (f"state {self.location}: another apply took the lock over (its epoch moved on); "
                                  "this apply stops")
                except psycopg.OperationalError as exc:
                    if conn is not None and conn.broken and attempt == 1:
                        log.warning("state connection lost; reconnecting state=%s error=%s", self.location,
                                    self.server.reason(exc))
                        continue
                    self._lost = f"state {self.location}: write failed: {self.server.reason(exc)}"
                except psycopg.Error as exc:
                    self._lost = f"state {self.location}: write failed: {self.server.reason(exc)}"
                except StateUnavailableError as exc:
                    self._lost = self._lost or str(exc)
                with contextlib.suppress(psycopg.Error):
                    if conn is not None and not conn.broken and not conn.closed:
                        conn.execute("ROLLBACK")
                raise StateUnavailableError(self._lost or "state write failed")

    def _execute(self, conn: psycopg.Connection[Any], query: sql.Composed, params: tuple[Any, ...]) -> None:
        try:
            conn.execute(query, params)
        except psycopg.Error as exc:
            raise StateUnavailableError(f"state {self.location}: write failed: {self.server.reason(exc)}") \
                from None

    def _reconnect(self) -> None:
        """Open the connection again and take the lock back, only if nobody held it meanwhile. On failure,
        every later write of this apply fails too: nothing may be written, or sent, without the lock."""
        try:
            self._take_back()
        except StateUnavailableError as exc:
            self._epoch = None
            self._lost = str(exc)
            raise

    def _take_back(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
        deadline = time.monotonic() + RECONNECT_SECONDS
        while True:
            try:
                conn = self.server.connect(application=f"reconciler apply {self._who}")
                break
            except StateUnavailableError as exc:
                if time.monotonic() >= deadline:
                    raise StateUnavailableError(f"{exc} (lost the connection during the apply; tried again "
                                                f"for {RECONNECT_SECONDS:g}s)") from None
                self.sleep(0.5)
        try:
            for name, key, exclusive in self._held:
                take = "pg_try_advisory_lock(%s)" if exclusive else "pg_try_advisory_lock_shared(%s)"
                got = _scalar(conn.execute(f"SELECT {take}", (key,)))
                row = conn.execute(_q("SELECT epoch FROM {s}.locks WHERE name = %s", self.server.schema),
                                   (name,)).fetchone() if exclusive else (0,)
                if not got or row is None or (exclusive and int(row[0]) != self._epochs.get(name)):
                    holder = self._holder(conn, key) if not got else "another apply held it in between"
                    conn.close()
                    raise StateUnavailableError(f"state {self.location}: lost the lock with the connection "
                                                f"({holder}); this apply stops")
            conn.execute(_q("UPDATE {s}.locks SET backend_pid = pg_backend_pid(), renewed_at = now(), "
                            "backend_start = (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()) "
                            "WHERE name = ANY(%s)", self.server.schema), (list(self._epochs),))
        except psycopg.Error as exc:
            conn.close()
            raise StateUnavailableError(f"state {self.location}: cannot take the lock back: "
                                        f"{self.server.reason(exc)}") from None
        self._conn = conn
        log.warning("state connection restored; lock held again state=%s epoch=%s", self.location, self._epoch)

    def _close(self) -> None:
        for slot, mutex in self._helper_mutex.items():
            with mutex:
                helper = self._helpers.pop(slot, None)
                if helper is not None:
                    with contextlib.suppress(psycopg.Error):
                        helper.close()
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def _load(self, conn: psycopg.Connection[Any]) -> None:
        s = self.server.schema
        try:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                records = {a: dict(r) for a, r in conn.execute(_q("SELECT address, record FROM {s}.resources", s))}
                applied = dict(conn.execute(_q("SELECT address, digest FROM {s}.applied", s)))
                systems = {n: dict(i) for n, i in conn.execute(_q("SELECT name, identity FROM {s}.systems", s))}
                notes = {k[len(NOTE):]: json.loads(v) for k, v in
                         conn.execute(_q("SELECT key, value FROM {s}.meta WHERE key LIKE 'note:%%'", s))}
        except psycopg.Error as exc:
            raise StateUnavailableError(f"cannot read state {self.location}: {self.server.reason(exc)}") from None
        with self._mutex:
            self._records = records
            self._applied = applied
            self._systems = systems
            self._notes = notes


class _Borrowed:
    """The store's connection while it holds one (the lock), or a short-lived one for a read or write."""

    def __init__(self, store: PostgresState):
        self.store = store
        self.own: psycopg.Connection[Any] | None = None

    def __enter__(self) -> psycopg.Connection[Any]:
        if self.store._conn is not None and not self.store._conn.closed:
            return self.store._conn
        self.own = self.store.server.connect()
        return self.own

    def __exit__(self, *exc: object) -> None:
        if self.own is not None:
            self.own.close()


def _set_based(batch: list[tuple[str, tuple[Any, ...]]]) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """The batch as a few set-based statements, one per kind of write, each carrying all its rows as one
    JSON parameter: a commit costs a handful of statements however many workers' writes it holds.

    Every write is an upsert or a delete of one row, named by its table and key (the first parameter), so
    the batch in order comes to the last write of each row; rows are independent, so those last writes may
    go in any order, and none of them touches a row twice (which one `ON CONFLICT` statement may not)."""
    last: dict[tuple[str, Any], tuple[str, tuple[Any, ...]]] = {}
    for statement, params in batch:
        last[(_table(statement), params[0])] = (statement, params)
    rows: dict[str, list[tuple[Any, ...]]] = {}
    for statement, params in last.values():
        rows.setdefault(statement, []).append(params)
    for statement, group in rows.items():
        if statement.startswith("DELETE"):
            yield _as_set(statement), ([str(r[0]) for r in group],)
        else:
            yield _as_set(statement), (json.dumps(group),)


def _table(statement: str) -> str:
    return statement.split("{s}.", 1)[1].split(" ", 1)[0]


_SET_FORMS: dict[str, str] = {}


def _as_set(statement: str) -> str:
    """One row's upsert or delete rewritten for many rows: `VALUES (%s, %s::jsonb, now())` becomes a
    SELECT over the JSON array's elements (`r->>0`, `(r->>1)::jsonb`, `now()`), `WHERE key = %s`
    becomes `WHERE key = ANY(%s::text[])`."""
    form = _SET_FORMS.get(statement)
    if form is None:
        if statement.startswith("DELETE"):
            head, _, tail = statement.rpartition("= %s")
            if tail.strip() or not head:
                raise ValueError(f"not a one-row delete: {statement}")
            form = head + "= ANY(%s::text[])"
        else:
            match = re.fullmatch(r"(INSERT INTO \S+ \([^)]*\)) VALUES \((.*?)\)( ON CONFLICT .*)", statement)
            if match is None:
                raise ValueError(f"not a one-row upsert: {statement}")
            values, n = [], 0
            for item in (v.strip() for v in match.group(2).split(",")):
                if item.startswith("%s"):
                    cast = item[2:]
                    values.append(f"(r->>{n}){cast}" if cast else f"r->>{n}")
                    n += 1
                else:
                    values.append(item)
            form = f"{match.group(1)} SELECT {', '.join(values)} FROM jsonb_array_elements(%s::jsonb) AS r{match.group(3)}"
        _SET_FORMS[statement] = form
    return form


def _iso(moment: Any) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if moment is not None else "?"


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:100]
