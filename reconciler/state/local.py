"""Local JSON state file with a write-ahead journal and an exclusive lock.

Called by the CLI (open, lock) and the applier (record every successful change). Each change is appended
to `<state>.journal` and handed to the operating system at once, so an apply killed at any point loses
nothing; `sync()` makes what was appended durable on disk (group commit: one fsync covers every entry
written before it, from any thread), and providers call it before each request that changes a vendor, so
every change a vendor confirmed is on disk before the next one is sent; `save()` folds the journal into the snapshot with an atomic replace, keeping the snapshot it
replaces as `<state>.prev` so that a damaged file can be rolled back. The state also records which vendor
system each policy system name was applied to (`systems()`); `reconciler.state.trust` refuses a state of
another system.

Locks, as on PostgreSQL: an apply takes the state's lock file (`<state>.lock`) shared, then one lock file per
system (`<state>.<system>.lock`) exclusively, in sorted order; `state forget` takes the state's lock
exclusively. Two processes applying disjoint systems of one state run in parallel: each journal entry is one
`O_APPEND` write, so their entries interleave whole, and the journal holds both. A second apply of a system
is refused at once, naming the holder's process (or waits, `--lock-timeout`). The journal is folded into the
snapshot only by a process alone on the state (it takes the state's lock exclusively, without waiting, after
reading every process's entries from disk); otherwise the last one out folds it, or the next apply does.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Self

from reconciler.errors import LockedError, StateError

log = logging.getLogger(__name__)

STATE_VERSION = 1


def pause(seconds: float) -> None:
    """Wait `seconds`. A plain sleep, never a timed lock or event wait: under faketime, which moves the
    monotonic clock too, a timed wait's deadline lands years away and it never returns."""
    time.sleep(seconds)


def is_database_url(spec: str) -> bool:
    return spec.startswith(("postgresql://", "postgres://"))


DATA_DIR = Path(".reconciler")   # where the policy directory `policies/` keeps its state and sandbox data
STATE_FILE = "state.json"


def default_state_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    spec = env.get("RECONCILER_STATE") or ""
    return Path(spec) if spec and not is_database_url(spec) else DATA_DIR / STATE_FILE


RESIDUAL = "residual"     # the notes of revocations not yet in force (run.py): `residual/SYSTEM`, entries by address
REVISION = "revision"     # the notes of the revision last applied (run.py): `revision/SYSTEM`


EVIDENCE = "evidence"     # what identified each user, device and gateway (run.py): `evidence/SYSTEM/BUCKET`
EVIDENCE_BUCKETS = 64     # a system's evidence spread over this many notes: adding a user rewrites one of them
KNOWN = "known"           # the known-id sets intents share (providers/base.py): `known/SYSTEM/KIND`


def evidence_note(system: str, address: str) -> str:
    """The note that holds `address`'s evidence: one of the system's EVIDENCE_BUCKETS, by a digest of the
    address, so that an apply adding one user rewrites a 64th of the system's evidence, not all of it."""
    bucket = int.from_bytes(hashlib.sha256(address.encode()).digest()[:4], "big") % EVIDENCE_BUCKETS
    return f"{EVIDENCE}/{system}/{bucket:02x}"


def evidence_notes(system: str) -> list[str]:
    """Every note a system's evidence may be in: the one note of earlier versions, then the buckets."""
    return [f"{EVIDENCE}/{system}"] + [f"{EVIDENCE}/{system}/{b:02x}" for b in range(EVIDENCE_BUCKETS)]


def is_system_note(key: str, system: str) -> bool:
    """Whether a note belongs to one system (moved by `state push/pull --target`): its evidence, known-id
    sets, residual access and revision."""
    return key in (f"{EVIDENCE}/{system}", system_note(RESIDUAL, system), system_note(REVISION, system)) or \
        key.startswith((f"{EVIDENCE}/{system}/", f"{KNOWN}/{system}/"))


def of_system(entry: Any, system: str) -> bool:
    return isinstance(entry, dict) and str(entry.get("address", "")).startswith(system + "/")


def system_note(key: str, system: str) -> str:
    """A note kept per system (`residual/hq`), so that runners applying other systems at once never write it."""
    return f"{key}/{system}"


def residual_of(note: Callable[[str], Any], system: str) -> list[dict[str, Any]]:
    """A system's residual-access entries (`note`: a state's, or a snapshot's `notes.get`): its own note, or,
    until it has one, its entries of the whole note earlier versions kept."""
    own = note(system_note(RESIDUAL, system))
    entries = own if own is not None else [r for r in note(RESIDUAL) or [] if of_system(r, system)]
    return [r for r in entries if isinstance(r, dict)]


def revision_of(note: Callable[[str], Any], system: str) -> Any:
    """The revision last applied to a system: its own note, or the whole note of earlier versions."""
    own = note(system_note(REVISION, system))
    return own if own is not None else note(REVISION)


def select_system(snapshot: Mapping[str, Any], system: str) -> dict[str, Any]:
    """One system's part of a state snapshot (the local file's format): its records and applied digests (by
    address), its identity, its evidence and revision notes and its residual entries (as its own notes, read
    from the whole notes of earlier versions when it has none)."""
    prefix = system + "/"
    notes = snapshot.get("notes") or {}
    part: dict[str, Any] = {
        "version": snapshot.get("version", 1),
        "systems": {n: i for n, i in (snapshot.get("systems") or {}).items() if n == system},
        "resources": {a: r for a, r in (snapshot.get("resources") or {}).items() if str(a).startswith(prefix)},
        "applied": {a: d for a, d in (snapshot.get("applied") or {}).items() if str(a).startswith(prefix)}}
    kept = {k: v for k, v in notes.items() if is_system_note(str(k), system) and k != system_note(RESIDUAL, system)}
    residual = residual_of(notes.get, system)
    if residual or system_note(RESIDUAL, system) in notes:
        kept[system_note(RESIDUAL, system)] = residual
    if system_note(REVISION, system) in notes:
        kept[system_note(REVISION, system)] = notes[system_note(REVISION, system)]
    if kept:
        part["notes"] = kept
    return part


class StateRecords:
    """What every state backend holds in memory and how it is read: the records (by address), the digests
    last applied and each system's identity, under `_mutex`. A backend fills them and writes them through."""

    _records: dict[str, dict[str, Any]]
    _systems: dict[str, dict[str, str]]    # system name → identity it was applied to
    _applied: dict[str, str]               # address → digest of the desired attributes last applied
    _notes: dict[str, Any]                 # small named values: the revision last applied, evidence of names
    _mutex: threading.Lock

    # Written through by each backend.
    def put(self, address: str, record: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def delete(self, address: str) -> None:
        raise NotImplementedError

    def mark_applied(self, address: str, attributes_digest: str | None) -> None:
        raise NotImplementedError

    def get(self, address: str) -> dict[str, Any] | None:
        with self._mutex:
            record = self._records.get(address)
            return dict(record) if record is not None else None

    def items(self, prefix: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
        with self._mutex:
            snapshot = [(a, dict(r)) for a, r in self._records.items() if a.startswith(prefix)]
        return iter(sorted(snapshot))

    def id_of(self, address: str) -> str | None:
        record = self.get(address)
        return record.get("id") if record else None

    def applied(self) -> dict[str, str]:
        """What apply last made each address look like (digests): lets a plan tell drift, changes made
        outside git, from changes in the policy."""
        with self._mutex:
            return dict(self._applied)

    def systems(self) -> dict[str, dict[str, str]]:
        """The identity (vendor, endpoint, account) each system name was last applied to."""
        with self._mutex:
            return {name: dict(identity) for name, identity in self._systems.items()}

    def note(self, key: str) -> Any:
        """A small named value the state keeps besides the records (`revision`: what the last apply came
        from; `evidence`: what identified each user, device and gateway when it was last applied)."""
        with self._mutex:
            return self._notes.get(key)

    def moved(self, rename: Callable[[str], str | None]) -> list[tuple[str, str]]:
        """The records and applied digests a rename would move: (old address, new address) for every
        address `rename` maps elsewhere, unless the new address is taken already."""
        with self._mutex:
            known = set(self._records) | set(self._applied)
        pairs = []
        for address in sorted(known):
            target = rename(address)
            if target is not None and target != address and target not in known:
                pairs.append((address, target))
        return pairs

    def move(self, pairs: list[tuple[str, str]], *, persist: bool) -> None:
        """Move records and applied digests (`moved()`'s pairs). `persist=False` moves them in memory only,
        for a plan; `persist=True` writes them through (apply, under the lock)."""
        for old, new in pairs:
            with self._mutex:
                record = self._records.get(old)
                applied = self._applied.get(old)
            if not persist:
                with self._mutex:
                    if record is not None:
                        self._records[new] = self._records.pop(old)
                    if applied is not None:
                        self._applied[new] = self._applied.pop(old)
                continue
            if record is not None:
                self.put(new, record)
                self.delete(old)
            if applied is not None:
                self.mark_applied(new, applied)
                self.mark_applied(old, None)

    def snapshot(self) -> dict[str, Any]:
        """The whole state as the snapshot file holds it (what `state pull` writes)."""
        with self._mutex:
            data = {"version": STATE_VERSION, "systems": dict(sorted(self._systems.items())),
                    "resources": dict(sorted(self._records.items())),
                    "applied": dict(sorted(self._applied.items()))}
            if self._notes:
                data["notes"] = dict(sorted(self._notes.items()))
            return data


class LocalState(StateRecords):
    def __init__(self, path: Path, *, lock_timeout: float = 0.0):
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        self.journal_path = self.path.with_name(self.path.name + ".journal")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.previous_path = self.path.with_name(self.path.name + ".prev")
        self._records: dict[str, dict[str, Any]] = {}
        self._systems: dict[str, dict[str, str]] = {}   # system name → identity it was applied to
        self._applied: dict[str, str] = {}   # address → digest of the desired attributes last applied
        self._notes: dict[str, Any] = {}
        self._mutex = threading.Lock()
        self._lock_fd: int | None = None     # the state's lock file: shared (per-system apply) or exclusive
        self._shared = False
        self._system_fds: list[tuple[str, int]] = []
        self._written = 0                # entries appended so far; `_synced` of them are on disk
        self._synced = 0
        self._sync_lock = threading.Lock()
        self._load()

    # -- reading -------------------------------------------------------------------------------------
    @property
    def location(self) -> str:
        return str(self.path)

    def set_system(self, name: str, identity: Mapping[str, str]) -> None:
        with self._mutex:
            if self._systems.get(name) != dict(identity):
                self._systems[name] = dict(identity)
                self._append({"op": "system", "name": name, "identity": dict(identity)})

    # -- writing (journaled) -------------------------------------------------------------------------
    def set_note(self, key: str, value: Any) -> None:
        with self._mutex:
            if self._notes.get(key) != value:
                self._notes[key] = value
                self._append({"op": "note", "key": key, "value": value})

    def put(self, address: str, record: Mapping[str, Any]) -> None:
        with self._mutex:
            self._records[address] = dict(record)
            self._append({"op": "put", "address": address, "record": dict(record)})

    def delete(self, address: str) -> None:
        with self._mutex:
            if self._records.pop(address, None) is not None:
                self._append({"op": "delete", "address": address})

    def mark_applied(self, address: str, attributes_digest: str | None) -> None:
        with self._mutex:
            if attributes_digest is None:
                if self._applied.pop(address, None) is not None:
                    self._append({"op": "unapplied", "address": address})
            elif self._applied.get(address) != attributes_digest:
                self._applied[address] = attributes_digest
                self._append({"op": "applied", "address": address, "digest": attributes_digest})

    def save(self) -> None:
        """Fold the journal into the snapshot (atomic replace), then empty the journal. The snapshot it
        replaces stays as `<state>.prev` (only when the content changes, so a no-op run keeps it)."""
        data = self.snapshot()
        with self._mutex:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(data, indent=1, sort_keys=True)
            try:
                unchanged = self.path.read_text(encoding="utf-8") == text
            except (OSError, ValueError):
                unchanged = False
            if unchanged:
                self.journal_path.unlink(missing_ok=True)
                return
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(text)
                    handle.flush()
                    os.fsync(handle.fileno())
                self._keep_previous()
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self.journal_path.unlink(missing_ok=True)

    # -- locking -------------------------------------------------------------------------------------
    def lock(self, systems: Iterable[str] | None = None) -> None:
        """Take the apply lock, waiting up to `lock_timeout` seconds (0: refuse at once, naming the holder).
        `systems`: the state's lock file shared, then one lock file per system, in sorted order (two applies
        of disjoint systems run at once); None: the state's lock file exclusively (excludes every apply)."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout
        shared = systems is not None
        main = self._take(self.lock_path, f"state {self.path}", deadline, shared=shared)
        self._lock_fd, self._shared = main, shared
        try:
            for name in sorted(set(systems or ())):
                path = self.system_lock_path(name)
                fd = self._take(path, f"system {name!r} of state {self.path}", deadline, shared=False)
                self._system_fds.append((name, fd))
        except BaseException:
            self.unlock()
            raise
        self._load()  # what the previous holders wrote is now final

    def system_lock_path(self, system: str) -> Path:
        """The lock file of one system of this state (its name made safe for a file name)."""
        safe = re.sub(r"[^A-Za-z0-9_.-]", lambda m: f"%{ord(m.group()):02X}", system)[:100]
        return self.path.with_name(f"{self.path.name}.{safe}.lock")

    def _take(self, path: Path, what: str, deadline: float, *, shared: bool) -> int:
        """One lock file, polled with short sleeps until `deadline`; an exclusive holder's pid is written in it."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    pause(min(0.2, max(0.0, deadline - time.monotonic())))
                    continue
                try:
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                except OSError:
                    holder = ""
                os.close(fd)
                held = f" (process {holder})" if holder.isdigit() else ""
                if self.lock_timeout:
                    waited, how = f" after waiting {self.lock_timeout:g}s", "wait longer with a larger --lock-timeout"
                else:
                    waited, how = "", "wait for it to finish, or pass --lock-timeout to wait for it"
                raise LockedError(f"{what} is locked by another apply{held}{waited}; {how} "
                                  f"(lock file {path})") from None
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def unlock(self) -> None:
        for _, fd in reversed(self._system_fds):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._system_fds = []
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        self._shared = False

    def _alone(self) -> bool:
        """Whether this process may fold the journal: it holds the state's lock exclusively, or (holding it
        shared) can take it exclusively at once, having let go of its systems' locks; then every other
        process's entries are read from disk first, so the fold keeps them."""
        if self._lock_fd is None:
            return True            # no lock at all: a plain save (tests, tools)
        if not self._shared:
            return True
        for _, fd in reversed(self._system_fds):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._system_fds = []
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("state journal left for the last apply to fold path=%s", self.journal_path)
            return False
        self._shared = False
        self._load()
        return True

    def __enter__(self) -> Self:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.sync()
            if self._alone():
                self.save()
        finally:
            self.unlock()

    # -- internals -----------------------------------------------------------------------------------
    def _keep_previous(self) -> None:
        """Keep the snapshot about to be replaced as `<state>.prev`, and the journal being folded as
        `<state>.prev.journal`: together they replay to exactly the new snapshot, so a rollback loses
        nothing. Copies and renames only; the live pair (snapshot, journal) stays consistent throughout."""
        if not self.path.exists():
            return
        for source, target in ((self.path, self.previous_path), (self.journal_path, self._previous_journal)):
            tmp = target.with_name(target.name + ".tmp")
            if source.exists():
                tmp.write_bytes(source.read_bytes())
                os.replace(tmp, target)
            else:
                target.unlink(missing_ok=True)

    @property
    def _previous_journal(self) -> Path:
        return self.previous_path.with_name(self.previous_path.name + ".journal")

    def _unreadable(self, why: str) -> StateError:
        if self.previous_path.exists():
            journal = (f" && mv {self._previous_journal} {self.journal_path}"
                       if self._previous_journal.exists() else "")
            way_out = (f"the previous snapshot is {self.previous_path}, with the changes since in its journal; "
                       f"to roll back to it (losing nothing the last apply recorded), run "
                       f"`mv {self.previous_path} {self.path}{journal}`, then `reconciler plan`")
        else:
            way_out = (f"there is no previous snapshot ({self.previous_path}); restore the file from a backup "
                       "(for instance its git history), or move it aside and adopt the live systems with "
                       "`reconciler export SYSTEM`")
        return StateError(f"state {self.path} is unreadable ({why}); nothing was read or sent. {way_out}")

    def sync(self) -> None:
        """Make every entry appended so far durable: one fsync for all of them, whichever threads wrote
        them. Concurrent callers share it: one syncs, the others find their entries already covered."""
        with self._mutex:
            wanted = self._written
        if self._synced >= wanted:
            return
        with self._sync_lock:
            if self._synced >= wanted:
                return      # another caller's fsync covered these entries
            with self._mutex:
                upto = self._written
                try:
                    fd = os.open(self.journal_path, os.O_RDONLY)
                except FileNotFoundError:
                    self._synced = upto      # folded into the snapshot by save() meanwhile: on disk
                    return
                except OSError as exc:
                    raise StateError(f"state journal {self.journal_path} could not be synced: {exc}") from None
            try:
                os.fsync(fd)
            except OSError as exc:
                raise StateError(f"state journal {self.journal_path} could not be written to disk: {exc}") from None
            finally:
                os.close(fd)
            self._synced = upto

    def check_writable(self) -> None:
        """Nothing to check: a write fails, and says so, when it is made."""

    def _append(self, entry: dict[str, Any]) -> None:
        """Called under `_mutex`: written and handed to the system, so it survives the process being
        killed; `sync()` puts it on disk."""
        # One write of the whole line with O_APPEND: lines of processes applying other systems never mix.
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        try:
            self.journal_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, line)
            finally:
                os.close(fd)
            if written != len(line):
                raise OSError(f"short write ({written} of {len(line)} bytes)")
        except OSError as exc:
            raise StateError(f"state journal {self.journal_path} could not be written: {exc}") from None
        self._written += 1

    def _load(self) -> None:
        records: dict[str, dict[str, Any]] = {}
        applied: dict[str, str] = {}
        systems: dict[str, dict[str, str]] = {}
        notes: dict[str, Any] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise self._unreadable(str(exc)) from None
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                raise self._unreadable(f"not a reconciler state of version {STATE_VERSION}")
            try:
                records = {str(a): dict(r) for a, r in data.get("resources", {}).items()}
                applied = {str(a): str(d) for a, d in data.get("applied", {}).items()}
                systems = {str(n): {str(k): str(v) for k, v in i.items()}
                           for n, i in data.get("systems", {}).items()}
                notes = {str(k): v for k, v in data.get("notes", {}).items()}
            except (AttributeError, TypeError, ValueError) as exc:
                raise self._unreadable(f"malformed content: {exc}") from None
        if self.journal_path.exists():
            for number, line in enumerate(self.journal_path.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    entry = json.loads(line)
                except ValueError:
                    # A torn last line is what a crash mid-write leaves; everything before it holds.
                    log.warning("state journal line ignored path=%s line=%d", self.journal_path, number)
                    continue
                if entry.get("op") == "put":
                    records[entry["address"]] = entry["record"]
                elif entry.get("op") == "delete":
                    records.pop(entry["address"], None)
                elif entry.get("op") == "applied":
                    applied[entry["address"]] = entry["digest"]
                elif entry.get("op") == "unapplied":
                    applied.pop(entry["address"], None)
                elif entry.get("op") == "system":
                    systems[entry["name"]] = entry["identity"]
                elif entry.get("op") == "note":
                    notes[entry["key"]] = entry["value"]
        with self._mutex:
            self._notes = notes
            self._records = records
            self._applied = applied
            self._systems = systems
