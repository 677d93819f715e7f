"""The provider workflow every vendor shares; vendor modules fill small hooks.

The CLI builds one provider per policy system through `providers.factory`; the planner never sees
providers, only the `Resource`s that `read()` returns; the applier calls `apply()` for each change.

A vendor subclass MUST:
- set `vendor` and `capabilities`, keep its endpoint table in one place, and map fields both ways so that
  live attributes use exactly the keys and formats the policy expansion produces;
- implement `read_live(desired)` with bulk list calls only (no GET per resource where a list exists),
  marking each live resource `managed` when policy or state knows it;
- declare `handlers`, its apply table: `(Action.CREATE, kind)` → a method returning the state record to
  remember (at least `{"id": ...}`) or None, `(Action.UPDATE, kind)` → `(want, live, changed)`,
  `(Action.DELETE, kind)` → `(live)`; it is checked when the class is defined (`__init_subclass__`). A
  class that declares none gets one from its `create_<kind>`/`update_<kind>`/`delete_<kind>` methods,
  built and checked then too;
- fill the HTTP client's hooks: `http_headers()` (sent on every request), `_login(http)` when the vendor
  has a login (returns the auth headers and their lifetime), `describe_error(response)` (an error body in
  one line) and `secrets()` (what the redactor hides; every credential by default). The base class builds
  `self.http` and `self.redactor` from them and closes the client in `close()`;
- make every non-idempotent create safe against a lost answer: record an intent with
  `self.intend()` before sending, and on an ambiguous error look the object up before giving up.
A vendor subclass MUST NOT open its own HTTP client, print, or write state outside these helpers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

import httpx

from reconciler.errors import VendorError
from reconciler.plan import Action, Change, Note
from reconciler.providers.answers import NotInEffect, check_not_emptied
from reconciler.providers.http import MAX_ANSWER_BYTES, Deadline, HttpClient, Redactor, describe_plain
from reconciler.providers.settings import VendorSettings
from reconciler.resources import Capabilities, Kind, Resource, digest, format_time
from reconciler.secret import Secret
from reconciler.state import StateStore
from reconciler.state.local import KNOWN

log = logging.getLogger(__name__)

DEFAULT_DEADLINE = 120.0   # seconds: reads of one system, and apply without any answer from it

HandlerTable = Mapping[tuple[Action, str], Callable[..., Any]]
VERBS = {Action.CREATE: ("create", 1), Action.UPDATE: ("update", 3), Action.DELETE: ("delete", 1)}   # arity

# Credential and setting names that say which account or tenant a system is (never a rotating key).
ACCOUNT_NAMES = ("user_id", "email", "client_id", "lock_holder_id", "partner_id")


@dataclass
class ReadResult:
    resources: list[Resource] = field(default_factory=list)
    warnings: list[Note] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)   # problems that make the plan impossible, one line each
    # Addresses the vendor still lists that are no live object (a key the lock owner revoked): not lost, for
    # `check_listing`, though the plan sees no grant there.
    listed: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Event:
    """One entry of a lock's audit trail, as `reconciler events` shows it."""

    time: str
    action: str
    person: str = ""
    detail: str = ""


class CreateGate:
    """Creates of one kind without a natural key: many may be in flight at once, but looking up a create
    whose answer was lost needs them all settled.

    The lookup tells the object a lost create made only by its being new and unclaimed; a create still
    in flight would add a new, unclaimed object of its own. So `recovering()` waits until no create of
    the kind is in flight (each has claimed its id from its answer, or lost its answer too) and lets no
    new one start until the lookup, and any resend, is done. Plain untimed waits: each in-flight request
    is bounded by the request timeout and the phase's deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._sending = 0
        self._recovering = False

    @contextlib.contextmanager
    def sending(self) -> Iterator[None]:
        """Around one create and the claiming of the id its answer holds."""
        with self._cond:
            while self._recovering:
                self._cond.wait()
            self._sending += 1
        try:
            yield
        finally:
            with self._cond:
                self._sending -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def recovering(self) -> Iterator[None]:
        """Alone: no other create of the kind in flight, none starting."""
        with self._cond:
            while self._recovering:
                self._cond.wait()
            self._recovering = True
            while self._sending:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._recovering = False
                self._cond.notify_all()


class Provider:
    # The vendor's declaration, read by the registry (`reconciler.vendors`, which explains each part).
    vendor: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    default_url: ClassVar[str]
    settings_model: ClassVar[type[VendorSettings]] = VendorSettings   # a pydantic model of its system settings
    simulator: ClassVar[str | None] = None                   # "module:Class" of its sandbox
    credential_variables: ClassVar[Mapping[str, str]] = {}   # credential key → the documented variable
    handlers: ClassVar[HandlerTable] = {}          # what apply calls, by action and kind (see the module doc)
    _dispatch: ClassVar[dict[tuple[Action, str], str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Check the apply table when the class is defined: a wrong verb, a missing method or a handler
        that takes the wrong arguments fails at import, not in the middle of an apply."""
        super().__init_subclass__(**kwargs)
        table: Mapping[tuple[Action, str], Any] | None = cls.__dict__.get("handlers")
        if table is None and not cls._dispatch:
            table = {(action, kind): getattr(cls, f"{verb}_{kind}") for action, (verb, _) in VERBS.items()
                     for kind in Kind if callable(getattr(cls, f"{verb}_{kind}", None))}
        if table is None:
            return      # inherited from a vendor class
        dispatch: dict[tuple[Action, str], str] = {}
        for key, handler in table.items():
            action, kind = key
            if action not in VERBS or not isinstance(kind, str) or not kind:
                raise TypeError(f"{cls.__name__}.handlers: {key!r} is not (Action.CREATE/UPDATE/DELETE, kind)")
            name = getattr(handler, "__name__", "")
            if not inspect.isfunction(handler) or getattr(cls, name, None) is not handler:
                raise TypeError(f"{cls.__name__}.handlers[{action.value}, {kind}]: {handler!r} is not a method "
                                f"of {cls.__name__}")
            parameters = list(inspect.signature(table[key]).parameters.values())[1:]
            positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            if len(positional) != VERBS[action][1]:
                raise TypeError(f"{cls.__name__}.{name}: a {action.value} handler takes "
                                f"{VERBS[action][1]} argument(s) besides self, not {len(positional)}")
            # By name on the instance at call time, so that a subclass's override is the one called.
            dispatch[(action, str(kind))] = name
        cls._dispatch = dispatch

    def __init__(self, name: str, *, url: str | None, credentials: Mapping[str, Secret],
                 settings: VendorSettings | Mapping[str, Any], state: StateStore,
                 clock: Callable[[], datetime], transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic, deadline: float | None = None,
                 trust_env: bool = False, concurrency: int | None = None):
        """`settings` is the system's settings as the vendor's `settings_model` validated them (the factory
        passes the instance `validate` checked; a mapping, from a test or a direct caller, is validated with
        the model here). `clock` is the session's (what time it is, for decisions); `sleep` and `monotonic`
        measure waits and token lifetimes. `concurrency`: the system's `concurrency:`, the requests in flight to
        the vendor at once (None: as many as there are threads sending)."""
        self.name = name
        self.url = url or self.default_url
        self.credentials = dict(credentials)
        sets = self.capabilities.credential_sets or (self.capabilities.credentials,)
        if not any(required <= self.credentials.keys() for required in sets):
            wanted = " or ".join(" and ".join(sorted(required)) for required in sets)
            raise VendorError(f"{name}: {self.vendor} needs credentials {wanted}")
        self.settings: VendorSettings = settings if isinstance(settings, VendorSettings) else \
            self.settings_model.model_validate(dict(settings))
        self.trust_env = trust_env      # the operator opted in to proxy and CA environment variables
        self.max_answer_bytes = (self.settings.max_answer_mb or 0) << 20 or MAX_ANSWER_BYTES
        self.state = state
        self.transport = transport
        self.sleep = sleep
        self.monotonic = monotonic
        self.clock = clock
        self.deadline_seconds = float(deadline or DEFAULT_DEADLINE)
        self.stop = threading.Event()          # set on Ctrl-C: nothing new is sent
        self.concurrency = concurrency
        self.halted: str | None = None         # why the apply stopped itself (`halt_sending`): no write is sent
        self.desired: dict[str, Resource] = {}
        self.ids: dict[str, str] = {}              # address → vendor id, from policy, state and reads
        self._resolved: dict[str, dict[str, Any] | None] = {}   # intents settled by the last read
        self.uncertain: dict[str, str] = {}        # address → why its lost create cannot be settled
        self.candidates: dict[str, list[str]] = {}  # address → the ids it might be
        self._known_lock = threading.Lock()        # one writer of the shared known-id sets at a time
        self._shared_known: set[str] = set()       # notes of known-id sets this run wrote (`intend`)
        self.redactor = Redactor(self.secrets())
        self._http: HttpClient | None = None
        self._http_lock = threading.Lock()

    # -- the HTTP client, built from the vendor's hooks ----------------------------------------------
    @property
    def http(self) -> HttpClient:
        """The one client of this system, shared by its workers; built on first use from the hooks below
        (after the vendor's `__init__` has read its settings)."""
        if self._http is None:
            with self._http_lock:
                if self._http is None:
                    logs_in = type(self)._login is not Provider._login
                    self._http = HttpClient(self.url, system=self.name, transport=self.transport,
                                            redactor=self.redactor, headers=self.http_headers(),
                                            authenticate=self._login if logs_in else None,
                                            describe=self.describe_error, sleep=self.sleep,
                                            monotonic=self.monotonic, clock=self.clock,
                                            trust_env=self.trust_env, max_answer_bytes=self.max_answer_bytes,
                                            max_in_flight=self.concurrency)
        return self._http

    def secrets(self) -> Iterable[str]:
        """What never appears in a message or log: every credential, unless the vendor says otherwise."""
        return [secret.reveal() for secret in self.credentials.values()]

    def http_headers(self) -> dict[str, str]:
        """Headers on every request (an API key, the media type)."""
        return {}

    def _login(self, http: HttpClient) -> tuple[dict[str, str], float | None]:
        """A vendor with a login overrides this: log in through `http.request(..., authenticated=False)`
        and return the auth headers and how long they stay valid (None: until a 401)."""
        raise NotImplementedError

    def describe_error(self, response: httpx.Response) -> str:
        """A vendor's error answer in one line."""
        return describe_plain(response)

    # -- workflow ------------------------------------------------------------------------------------
    def start_phase(self, phase: str) -> None:
        """Reads get one overall deadline; apply a deadline renewed by every answer (a long apply that
        keeps being answered is not hung). A failed login is shared within a phase, not repeated."""
        # Real waiting, on the real monotonic clock (a test's stepped clock for token lifetimes is not it).
        self.http.start_phase(Deadline(self.deadline_seconds, renewing=phase == "apply"), self.stop)
        self.http.before_write = self._make_durable
        self.http.may_write = self._may_write

    def _make_durable(self) -> None:
        """Before a request that may change the vendor: what the state recorded so far (the changes the
        vendor confirmed, the intent of the create about to go) is put on disk, in one go for all workers.
        Called before the request waits for one of the system's `concurrency` slots, so that a worker waiting
        on the state holds none."""
        self._may_write()
        self.state.sync()

    def _may_write(self) -> None:
        """Just before a request that may change the vendor is sent (its slot taken): refuse it once the apply
        stopped itself, or the state can no longer record what it does."""
        if self.halted is not None:
            raise VendorError(self.redactor(f"{self.name}: not sent: {self.halted}"), temporary=True)
        self.state.check_writable()

    def halt_sending(self, why: str) -> None:
        """The applier stopped the apply (`why`): no request that may change the vendor is sent from now on,
        including those of batches already started and waiting for a slot."""
        self.halted = why

    def read(self, desired: list[Resource]) -> ReadResult:
        self.start_phase("read")
        self.uncertain, self.candidates = {}, {}
        self.desired = {r.address: r for r in desired if r.system == self.name}
        for address, record in self.state.items(f"{self.name}/"):
            if record.get("id"):
                self.ids[address] = record["id"]
        for resource in self.desired.values():
            if resource.id:
                self.ids[resource.address] = resource.id
        result = self.read_live(list(self.desired.values()))
        self.check_listing(result)
        self._mark_not_in_effect(result)
        return result

    def _mark_not_in_effect(self, result: ReadResult) -> None:
        """A live object whose revocation the vendor acknowledged before, without effect, says so: the plan
        shows it as "not in effect", not as drift. Once it is gone, the mark is dropped at the next apply."""
        marks = {address: record for address, record in self.state.items(f"{self.name}/")
                 if record.get("not_in_effect")}
        if not marks:
            return
        seen = set()
        for i, resource in enumerate(result.resources):
            record = marks.get(resource.address)
            if record is not None and resource.id and str(resource.id).lower() == str(record.get("id", "")).lower():
                seen.add(resource.address)
                why = (f"the vendor acknowledged its revocation at {record['not_in_effect']}, but it is still "
                       "there: not in effect")
                result.resources[i] = dataclasses.replace(resource, meta={**resource.meta, "not_in_effect": why})
                result.warnings.append(Note(resource.address, f"not in effect: {why}", self.name, resource.kind))
        for address in marks.keys() - seen:
            self._resolved[address] = None      # gone now: the revocation took effect after all

    def revoked_still_there(self, live: Resource) -> bool | None:
        """After the vendor acknowledged revoking `live`: read it back (one GET, or its listing). True when
        it is still there, False when gone, None when this vendor cannot tell. Vendors override it."""
        return None

    def confirm_revoked(self, change: Change, still: bool | None = None) -> None:
        """Report a revocation done only once reading back shows it gone (`still`: what the caller read
        back already); one still there is recorded as "not in effect" (the next plan says so) and fails the
        change (apply exits 1)."""
        live = change.live
        if live is None or not live.is_grant:
            return
        if still is None:
            still = self.revoked_still_there(live)
        if still is not True:
            return
        at = self.clock().strftime("%Y-%m-%dT%H:%M:%SZ")
        self.state.put(change.address, {"id": live.id, "not_in_effect": at})
        raise NotInEffect(self.redactor(f"{self.name}: {change.address}: the vendor acknowledged the revocation, "
                                        "but reading it back shows it still there: not in effect"))

    # The kinds `check_listing` checks; None: every kind the state records for this system.
    CHECKED_KINDS: ClassVar[tuple[str, ...] | None] = None

    def check_listing(self, result: ReadResult) -> None:
        """Refuse a read that lost most of what the state recorded as existing (`answers.check_not_emptied`),
        kind by kind: users, devices, gateways, permissions, keys, shares, temp keys, and any kind a vendor
        declares. What the state recorded as existing is every object it holds an id for and every object
        the last apply made (its applied mark: Unloc keys and Sentry shares have no id of their own there),
        less the grants whose declared end has passed (a vendor may drop those from its listings). It is
        present when the read shows its address or its id, whatever its status: an object the vendor still
        lists as revoked, expired or denied (`ReadResult.listed`) is not lost; only an absent one is."""
        prefix = f"{self.name}/"
        recorded: dict[str, dict[str, str | None]] = {}       # kind → address → recorded id
        for address, record in self.state.items(prefix):
            if record.get("id"):
                recorded.setdefault(address.split("/", 2)[1], {})[address] = str(record["id"])
        for address in self.state.applied():
            if address.startswith(prefix):
                recorded.setdefault(address.split("/", 2)[1], {}).setdefault(address, None)
        if not recorded:
            return
        now = format_time(self.clock())
        listed: dict[str, set[str]] = {}
        for resource in result.resources:
            seen = listed.setdefault(resource.kind, set())
            seen.add(resource.address)
            if resource.id:
                seen.add(str(resource.id).lower())
        for address in result.listed:
            listed.setdefault(address.split("/", 2)[1] if address.count("/") >= 2 else "", set()).add(address)
        for kind, addresses in sorted(recorded.items()):
            if self.CHECKED_KINDS is not None and kind not in self.CHECKED_KINDS:
                continue
            expected = [a for a in addresses if not self._ended(a, now)]
            seen = listed.get(kind, set())
            present = [a for a in expected if a in seen or str(addresses[a] or "").lower() in seen]
            check_not_emptied(self.name, kind, expected, present)

    def _ended(self, address: str, now: str) -> bool:
        """A declared grant whose end has passed: its absence from a listing is no loss."""
        want = self.desired.get(address)
        if want is None or not want.is_grant:
            return False
        end = want.attributes.get("end")
        return isinstance(end, str) and end <= now

    def identity(self) -> dict[str, str]:
        """Which vendor system this is: vendor, endpoint and a digest of the account (the account's
        identifier, or the API key where a vendor has nothing else). The state records it; a state of
        another system is refused (`reconciler.state.trust`)."""
        values = [(n, self.credentials[n].reveal()) for n in ACCOUNT_NAMES if n in self.credentials]
        settings = self.settings.model_dump()
        values += [(n, str(settings[n])) for n in ACCOUNT_NAMES if settings.get(n)]
        if not values:
            values = sorted((n, s.reveal()) for n, s in self.credentials.items())
        return {"vendor": self.vendor, "url": self.url.rstrip("/"), "account": digest(values)[:23]}

    def identified_by_secret(self) -> bool:
        """Whether `identity()` digests a secret (no account identifier to name the system by): a rotated key
        then changes the identity, and the state trust check accepts it on the evidence of the objects it holds."""
        return not any(n in self.credentials for n in ACCOUNT_NAMES) and \
            not any(self.settings.model_dump().get(n) for n in ACCOUNT_NAMES)

    def commit_reads(self) -> None:
        """Persist what the last read settled (creates whose answer was lost); apply calls this under
        the state lock before changing anything: the apply phase starts here."""
        self.start_phase("apply")
        for address, record in sorted(self._resolved.items()):
            if record is None:
                self.state.delete(address)
            else:
                self.state.put(address, record)
        self._resolved.clear()
        self.drop_unused_known()

    def record_applied(self, change: Change) -> None:
        """Remember what apply made this address look like, so later plans can tell drift (a change made
        outside git) from a policy change. The applier calls it after each successful unit."""
        done = None if change.action is Action.DELETE or change.desired is None else \
            digest(dict(change.desired.attributes))
        self.state.mark_applied(change.address, done)

    def apply(self, change: Change) -> None:
        kind = change.kind
        if change.action in (Action.DELETE, Action.REPLACE):
            assert change.live is not None
            self._handler(Action.DELETE, kind)(change.live)
            self.confirm_revoked(change)
            self.forget(change.address)
        if change.action in (Action.CREATE, Action.REPLACE):
            assert change.desired is not None
            record = self._handler(Action.CREATE, kind)(change.desired)
            self.remember(change.address, record)
        elif change.action is Action.UPDATE:
            assert change.desired is not None and change.live is not None
            self._handler(Action.UPDATE, kind)(change.desired, change.live, change.changed)

    def batches(self, changes: list[Change]) -> list[list[Change]]:
        """Group one phase's changes of this system into units of work; each unit runs on one worker.
        Default: one change each. Vendors with batch operations (several grants in one request) override
        this and `apply_batch`."""
        return [[change] for change in changes]

    def apply_batch(self, batch: list[Change]) -> None:
        """Apply a unit from `batches()`. It succeeds or fails as a whole."""
        for change in batch:
            self.apply(change)

    def events(self, device: Resource, *, since: datetime | None = None) -> list[Event]:
        """The audit trail of a managed device, oldest first."""
        raise VendorError(f"{self.name}: {self.vendor} has no event log that reconciler can read")

    def close(self) -> None:
        if self._shared_known:
            # This run recorded known-id sets: those no intent references any more (every create was
            # answered) are dropped now, under the apply's lock, rather than at the next apply.
            try:
                self.drop_unused_known()
            except Exception as exc:    # the apply's own report says what failed; this is housekeeping
                log.warning("known-id sets not dropped system=%s error=%s", self.name, exc)
        with self._http_lock:
            if self._http is not None:
                self._http.close()

    # -- hooks for subclasses ------------------------------------------------------------------------
    def read_live(self, desired: list[Resource]) -> ReadResult:
        raise NotImplementedError

    def _handler(self, action: Action, kind: str) -> Callable[..., Any]:
        name = self._dispatch.get((action, kind))
        if name is None:
            raise VendorError(f"{self.name}: {self.vendor} cannot {VERBS[action][0]} a {kind}")
        handler: Callable[..., Any] = getattr(self, name)
        return handler

    # -- state helpers -------------------------------------------------------------------------------
    def remember(self, address: str, record: Mapping[str, Any] | None) -> None:
        if record is None:
            return
        self.state.put(address, record)
        if record.get("id"):
            self.ids[address] = record["id"]

    def forget(self, address: str) -> None:
        self.state.delete(address)
        self.ids.pop(address, None)

    def intend(self, address: str, known_ids: list[str], **extra: Any) -> None:
        """Record, before a create that has no natural key, which ids existed, so that a later read
        can tell the object a lost answer created from anybody else's.

        The intent stays the same size however large the system: the set of known ids is stored once per
        system and kind for every intent that shares it (the note `known/<system>/<kind>`, one entry per
        distinct set, named by its digest) and the intent names its digest (`known_ref`). The set is written
        before the intent, so a crash between the two leaves an unreferenced set (dropped later), never an
        intent without its set; sets no intent references are dropped when the apply ends and when the next
        one starts (`drop_unused_known`). State written by earlier versions keeps the set inline (`known`)."""
        record: dict[str, Any] = {"intent": "create"}
        if known_ids:
            record["known_ref"] = self._share_known(address.split("/")[1], known_ids)
        else:
            record["known"] = []
        record["at"] = self.clock().strftime("%Y-%m-%dT%H:%M:%SZ")
        self.state.put(address, {**record, **extra})

    def _known_note(self, kind: str) -> str:
        return f"{KNOWN}/{self.name}/{kind}"

    def _share_known(self, kind: str, known_ids: Iterable[str]) -> str:
        """Store the set `known_ids` once (if it is not stored yet) and return its digest."""
        ids = sorted(set(known_ids))
        ref = digest(ids)
        key = self._known_note(kind)
        with self._known_lock:
            current = self.state.note(key)
            sets = dict(current) if isinstance(current, dict) else {}
            if sets.get(ref) != ids:
                sets[ref] = ids
                self.state.set_note(key, sets)
                self._shared_known.add(key)
        return ref

    def _known_of(self, kind: str, record: Mapping[str, Any]) -> set[str] | None:
        """The ids that existed before an intent's create was sent: inline (earlier versions) or the shared
        set it names. None when the shared set is missing from the state: nothing new can be told apart."""
        if "known_ref" not in record:
            return set(record.get("known") or [])
        sets = self.state.note(self._known_note(kind))
        ids = sets.get(str(record["known_ref"])) if isinstance(sets, dict) else None
        return {str(i) for i in ids} if isinstance(ids, list) else None

    def drop_unused_known(self) -> None:
        """Drop the shared known-id sets of this system that no intent references any more."""
        referenced: dict[str, set[str]] = {}
        for address, record in self.state.items(f"{self.name}/"):
            if record.get("intent") == "create" and record.get("known_ref"):
                referenced.setdefault(address.split("/")[1], set()).add(str(record["known_ref"]))
        kinds = {*Kind, *self.capabilities.attributes, *referenced}
        kinds |= {key.rsplit("/", 1)[1] for key in self._shared_known}
        with self._known_lock:
            for kind in sorted(kinds):
                key = self._known_note(kind)
                current = self.state.note(key)
                if not current:
                    continue
                kept = {ref: ids for ref, ids in current.items() if ref in referenced.get(kind, set())} \
                    if isinstance(current, dict) else {}
                if kept != current:
                    self.state.set_note(key, kept or None)
            self._shared_known.clear()

    def create_checked(self, send: Callable[[], Any], find: Callable[[], Any], *, attempts: int = 4,
                       lost: VendorError | None = None) -> Any:
        """Send a non-idempotent create; when its answer is lost, look it up, and send again only once
        the lookup shows it did not land. Returns what `send` or `find` returned. `lost`: the first send
        was made already and its answer lost with this error: start with the lookup."""
        for attempt in range(1, attempts + 1):
            try:
                if lost is not None:
                    first, lost = lost, None
                    raise first
                return send()
            except VendorError as exc:
                if not exc.ambiguous:
                    raise
                try:
                    found = find()
                except VendorError as lookup:
                    if lookup.ambiguous:
                        raise
                    # Sent, and the lookup failed too (or was interrupted): still uncertain.
                    raise VendorError(f"{exc}; the lookup failed: {lookup}", status=exc.status, temporary=True,
                                      ambiguous=True) from None
                if found is not None:
                    log.info("create with lost answer had landed system=%s", self.name)
                    return found
                if attempt == attempts:
                    raise
                log.info("create with lost answer did not land; sending again system=%s attempt=%d",
                         self.name, attempt)
                self.sleep(min(8.0, 0.5 * 2 ** attempt))
        raise AssertionError("unreachable")

    def settle_intents(self, kind: str, live_ids: Mapping[str, Mapping[str, Any]],
                       matches: Callable[[Resource | None, Mapping[str, Any]], bool], *,
                       provable: bool = True) -> list[Note]:
        """Match intents of `kind` against live objects nobody claims. Called from `read_live` after the
        bulk lists.

        `provable=True`: `matches` tests a natural key reconciler set (a device's name): the one new object
        with it is ours. `provable=False`: nothing on the object ties it to our request (an account with
        only a role): any new object may be a stranger's, so none is adopted; the intent stays, and
        `self.uncertain[address]` says which candidates there are and how to resolve it. No candidate at
        all proves the create never landed: the plan creates it again."""
        notes: list[Note] = []
        prefix = f"{self.name}/{kind}/"
        claimed = set(self.ids.values())
        for address, record in self.state.items(prefix):
            if record.get("intent") != "create":
                continue
            want = self.desired.get(address)
            if want is not None and want.id:
                self._resolved[address] = None     # adopted in the policy (`ids:`): the intent is settled
                continue
            known = self._known_of(kind, record)
            # Without the set of ids that existed when it was sent (`known` None), no object can be told to be
            # new: any unclaimed match may be it, and none is adopted (only "none at all" still proves it
            # never landed).
            candidates = sorted(i for i, item in live_ids.items()
                                if (known is None or i not in known) and i not in claimed and matches(want, item))
            if not candidates:
                self._resolved[address] = None    # it never landed: plan creates it again
            elif provable and known is not None and len(candidates) == 1:
                self._resolved[address] = {"id": candidates[0]}
                self.ids[address] = candidates[0]
                claimed.add(candidates[0])
                log.info("create with lost answer found address=%s id=%s", address, candidates[0])
            else:
                name = address[len(prefix):]
                shown = ", ".join(f"id:{c}" for c in candidates[:5]) + (" …" if len(candidates) > 5 else "")
                adopt = (f"`ids: {{{self.name}: <id>}}` on users.{name}" if kind == "user"
                         else f"`id: <id>` on {kind}s.{name}")
                self.candidates[address] = candidates
                self.uncertain[address] = (
                    f"the answer to creating {kind} {name} (at {record.get('at', '?')}) was lost, and "
                    + (f"{len(candidates)} new {kind}(s) appeared since: {shown}. " if known is not None else
                       f"the state no longer holds which {kind}s existed before it was sent, so any of "
                       f"{len(candidates)} unclaimed {kind}(s) may be it: {shown}. ")
                    + f"None can be proven to be the one "
                    f"reconciler created, so none is adopted or given access, and {name} is not created again. "
                    f"Resolve it: if one is {name}'s, adopt it with {adopt} in the policy; if none is, run "
                    f"`reconciler state forget {address}` and {name} is created again")
                if want is None:     # otherwise the plan shows it as uncertain, with what depends on it
                    notes.append(Note(address, f"uncertain: {self.uncertain[address]}", self.name, kind,
                                      (("uncertain", True), ("candidates", candidates))))
        return notes
