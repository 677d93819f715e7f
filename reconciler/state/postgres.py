"""Shared state in PostgreSQL: many runners, one state, a lock that works across machines.

Chosen by `--state postgresql://USER@HOST:PORT/DB[?schema=NAME]` (or `RECONCILER_STATE`) through
`reconciler.state.open_state`; run.py and the providers use it exactly like `LocalState`.

The promises of the local journal, across machines:
- Every `put`, `delete` and `mark_applied` is one committed statement before the call returns, so a change
  the vendor confirmed is in the database before the worker that made it sends anything else.
- One apply per system at a time: a session-level advisory lock per system, whose key derives from the schema
  and the system's name, taken in sorted order under the whole state's lock taken shared (`state push` and
  `state forget` take that one exclusively), all held on the very connection every write goes through. They
  are released when the holder's session ends, however it ends, and a write that succeeds proves they are
  still held. Who holds each (host, process, since) is its `locks` row. Plans never take them: they read one
  snapshot and close their connection. Runners applying different systems of one state run in parallel.
- A connection lost mid-apply is opened again and the lock taken again only if nobody took it in between
  (the holder row's `epoch` is still ours); otherwise, or while the server stays unreachable, the write
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
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qsl, unquote, urlsplit

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from reconciler.errors import LockedError, StateError
from reconciler.state.local import StateRecords, pause

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
WHOLE = "*"                   # the name of the whole state's lock in `locks` (systems use their own name)
DEFAULT_SCHEMA = "reconciler"
NOTE = "note:"                # `meta` keys holding the state's notes (`StateRecords.note`)
WAIT_NOTICE_SECONDS = 30.0    # a waiting runner says who holds the lock, then again this often
RECONNECT_SECONDS = 30.0      # how long a lost connection is tried again before the apply stops
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
        self._mutex = threading.Lock()         # the in-memory copy
        self._conn_mutex = threading.RLock()   # the connection: one statement at a time, reconnects
        self._conn: psycopg.Connection[Any] | None = None
        self._epoch: int | None = None          # set while we hold the lock
        self._epochs: dict[str, int] = {}       # each lock held (a system, or WHOLE) → its epoch
        self._held: list[tuple[str, int, bool]] = []   # (name, advisory key, exclusive) in the order taken
        self._lost: str | None = None           # why the lock was lost mid-apply: no write goes through after
        self._who = f"{socket.gethostname()[:100]} pid {os.getpid()}"
        with self._connection() as conn:
            ensure_schema(conn, self.server)
            self._load(conn)

    @property
    def location(self) -> str:
        """Where this state is, as messages name it (no password)."""
        return self.server.display

    def __str__(self) -> str:
        return self.location

    # -- writing: each call is committed before it returns ----------------------------------------------
    def put(self, address: str, record: Mapping[str, Any]) -> None:
        record = dict(record)
        self._write("INSERT INTO {s}.resources (address, record, written_by, written_at) "
                    "VALUES (%s, %s, %s, now()) ON CONFLICT (address) DO UPDATE SET record = EXCLUDED.record, "
                    "written_by = EXCLUDED.written_by, written_at = EXCLUDED.written_at",
                    (address, Jsonb(record), self._who))
        with self._mutex:
            self._records[address] = record

    def delete(self, address: str) -> None:
        with self._mutex:
            known = address in self._records
        if known:
            self._write("DELETE FROM {s}.resources WHERE address = %s", (address,))
            with self._mutex:
                self._records.pop(address, None)

    def set_system(self, name: str, identity: Mapping[str, str]) -> None:
        identity = {str(k): str(v) for k, v in identity.items()}
        with self._mutex:
            if self._systems.get(name) == identity:
                return
        self._write("INSERT INTO {s}.systems (name, identity) VALUES (%s, %s) "
                    "ON CONFLICT (name) DO UPDATE SET identity = EXCLUDED.identity", (name, Jsonb(identity)))
        with self._mutex:
            self._systems[name] = identity

    def set_note(self, key: str, value: Any) -> None:
        """Kept in `meta` as `note:<key>` (JSON text): no new table, no schema migration."""
        with self._mutex:
            if self._notes.get(key) == value:
                return
        self._write("INSERT INTO {s}.meta (key, value) VALUES (%s, %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", (NOTE + key, json.dumps(value)))
        with self._mutex:
            self._notes[key] = value

    def mark_applied(self, address: str, attributes_digest: str | None) -> None:
        with self._mutex:
            current = self._applied.get(address)
        if attributes_digest is None:
            if current is not None:
                self._write("DELETE FROM {s}.applied WHERE address = %s", (address,))
                with self._mutex:
                    self._applied.pop(address, None)
        elif current != attributes_digest:
            self._write("INSERT INTO {s}.applied (address, digest) VALUES (%s, %s) "
                        "ON CONFLICT (address) DO UPDATE SET digest = EXCLUDED.digest", (address, attributes_digest))
            with self._mutex:
                self._applied[address] = attributes_digest

    @property
    def previous_path(self) -> Path | None:
        """No previous snapshot: the database keeps its own backups."""
        return None

    def sync(self) -> None:
        """Nothing to make durable: every write is committed before it returns."""

    def save(self) -> None:
        """Nothing to fold: every write is already committed."""

    def replace(self, snapshot: Mapping[str, Any]) -> None:
        """Replace the whole state with `snapshot` (the local file's format) in one transaction; `state push`
        calls it under the lock."""
        resources = {str(a): dict(r) for a, r in (snapshot.get("resources") or {}).items()}
        applied = {str(a): str(d) for a, d in (snapshot.get("applied") or {}).items()}
        systems = {str(n): {str(k): str(v) for k, v in i.items()} for n, i in (snapshot.get("systems") or {}).items()}
        notes = {str(k): v for k, v in (snapshot.get("notes") or {}).items()}
        s = self.server.schema
        with self._conn_mutex:
            conn = self._require_conn()
            try:
                with conn.transaction():
                    conn.execute(_q("DELETE FROM {s}.resources", s))
                    conn.execute(_q("DELETE FROM {s}.applied", s))
                    conn.execute(_q("DELETE FROM {s}.systems", s))
                    conn.execute(_q("DELETE FROM {s}.meta WHERE key LIKE 'note:%%'", s))
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
        with self._mutex:
            self._records, self._applied, self._systems, self._notes = resources, applied, systems, notes

    # -- locking -------------------------------------------------------------------------------------
    def lock(self, systems: Iterable[str] | None = None) -> None:
        """Take the apply lock, waiting up to `lock_timeout` seconds (0: refuse at once, naming the holder).

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
                    self._wait_for(conn, name, key, exclusive, deadline, taken)
                    taken.append((name, key, exclusive))
                epochs: dict[str, int] = {}
                with conn.transaction():
                    for name, _, exclusive in taken:
                        if not exclusive:
                            continue
                        row = conn.execute(_q(
                            "INSERT INTO {s}.locks AS h (name, host, pid, since, backend_pid, epoch) "
                            "VALUES (%s, %s, %s, now(), pg_backend_pid(), 1) ON CONFLICT (name) DO UPDATE SET "
                            "host = EXCLUDED.host, pid = EXCLUDED.pid, since = now(), "
                            "backend_pid = pg_backend_pid(), epoch = h.epoch + 1 RETURNING epoch",
                            self.server.schema), (name, socket.gethostname()[:255], os.getpid()))
                        epochs[name] = int(_scalar(row))
                self._held = taken
                self._epochs = epochs
                self._epoch = max(epochs.values())
                self._load(conn)   # what the previous holders wrote is now final
            except psycopg.Error as exc:
                self._close()
                raise StateUnavailableError(f"state {self.location}: cannot take the lock: "
                                            f"{self.server.reason(exc)}") from None
        log.info("state locked state=%s locks=%s", self.location, ",".join(sorted(self._epochs)))

    def _wait_for(self, conn: psycopg.Connection[Any], name: str, key: int, exclusive: bool, deadline: float,
                  taken: list[tuple[str, int, bool]]) -> None:
        """Take one advisory lock, polling with short sleeps until `deadline`; on timeout release what
        `taken` holds and refuse, naming the holder."""
        take = "pg_try_advisory_lock(%s)" if exclusive else "pg_try_advisory_lock_shared(%s)"
        what = f"system {name!r} of state {self.location}" if name and name != WHOLE else f"state {self.location}"
        lock_id = name or WHOLE
        said: float | None = None
        while not _scalar(conn.execute(f"SELECT {take}", (key,))):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                holder = self._holder(conn, key)
                self._close()       # the session ends, and every lock taken so far with it
                if self.lock_timeout:
                    waited = f" after waiting {self.lock_timeout:g}s"
                    how = "wait longer with a larger --lock-timeout"
                else:
                    waited, how = "", "wait for it to finish, or pass --lock-timeout to wait for it"
                raise LockedError(f"{what} is locked by another apply{waited}: {holder}; {how}; if its holder is "
                                  f"stuck, `reconciler state unlock {lock_id}` breaks the lock")
            if said is None or time.monotonic() - said >= WAIT_NOTICE_SECONDS:
                said = time.monotonic()
                log.warning("waiting for the lock of %s (lock id %s), held by %s; up to %ds more", what, lock_id,
                            self._holder(conn, key), int(remaining))
            self.sleep(min(0.2, remaining))

    def unlock(self) -> None:
        with self._conn_mutex:
            if self._conn is not None and self._epoch is not None and not self._conn.broken:
                try:
                    for _, key, exclusive in reversed(self._held):
                        self._conn.execute("SELECT pg_advisory_unlock(%s)" if exclusive else
                                           "SELECT pg_advisory_unlock_shared(%s)", (key,))
                except psycopg.Error:
                    pass       # the session is gone, and its lock with it
            self._epoch = None
            self._epochs = {}
            self._held = []
            self._lost = None
            self._close()

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
                conn.execute(_q("UPDATE {s}.locks SET epoch = epoch + 1 WHERE name = %s", self.server.schema),
                             (lock_id or WHOLE,))
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

    # -- internals -----------------------------------------------------------------------------------
    def _holder(self, conn: psycopg.Connection[Any], key: int | None = None) -> str:
        """Who holds the lock `key` (default: the whole state's): the holder row when it belongs to the session
        holding the lock, else what the server knows of that session."""
        key = (self.server.lock_key if key is None else key) & 0xFFFFFFFFFFFFFFFF
        row = conn.execute(_q(
            "SELECT l.pid, h.host, h.pid, h.since, a.client_addr::text, a.backend_start "
            "FROM pg_locks l LEFT JOIN {s}.locks h ON h.backend_pid = l.pid "
            "LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
            "AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "ORDER BY h.since NULLS LAST LIMIT 1",
            self.server.schema), (key >> 32, key & 0xFFFFFFFF)).fetchone()
        if row is None:
            return "the holder has just released it; try again"
        backend, host, pid, since, client, started = row
        if host is not None:
            return f"host {_printable(host)}, process {pid}, since {_iso(since)}"
        where = f" from {client}" if client else ""
        when = f", connected since {_iso(started)}" if started else ""
        return f"database session {backend}{where}{when}"

    def _connection(self) -> _Borrowed:
        return _Borrowed(self)

    def _require_conn(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = self.server.connect()
        return self._conn

    def _write(self, statement: str, params: tuple[Any, ...]) -> None:
        query = _q(statement, self.server.schema)
        with self._conn_mutex:
            if self._lost:
                raise StateUnavailableError(self._lost)
            if self._epoch is None:
                # Outside an apply (no lock): one short connection per write.
                with self._connection() as short:
                    self._execute(short, query, params)
                return
            for attempt in (1, 2):
                conn = self._conn
                if conn is None or conn.broken or conn.closed:
                    self._reconnect()
                    conn = self._conn
                assert conn is not None
                try:
                    conn.execute(query, params)     # autocommit: committed when it returns
                    return
                except psycopg.OperationalError as exc:
                    if not conn.broken or attempt == 2:
                        raise StateUnavailableError(f"state {self.location}: write failed: "
                                                    f"{self.server.reason(exc)}") from None
                    log.warning("state connection lost; reconnecting state=%s error=%s", self.location,
                                self.server.reason(exc))
                except psycopg.Error as exc:
                    raise StateUnavailableError(f"state {self.location}: write failed: "
                                                f"{self.server.reason(exc)}") from None

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
        self._close()
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
            conn.execute(_q("UPDATE {s}.locks SET backend_pid = pg_backend_pid() WHERE name = ANY(%s)",
                            self.server.schema), (list(self._epochs),))
        except psycopg.Error as exc:
            conn.close()
            raise StateUnavailableError(f"state {self.location}: cannot take the lock back: "
                                        f"{self.server.reason(exc)}") from None
        self._conn = conn
        log.warning("state connection restored; lock held again state=%s epoch=%s", self.location, self._epoch)

    def _close(self) -> None:
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


def _iso(moment: Any) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if moment is not None else "?"


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:100]
