"""Unloc Partner API v1 provider, vendor `unloc-partner`.

Endpoints, field mapping and capabilities only; the workflow is `Provider`'s. The provider factory builds
it for a policy system with `vendor: unloc-partner`; the planner sees only the `Resource`s it reads.

A partner issues keys on locks whose owners let it in. The lock list (`GET .../locks`) says per lock
whether the owner must approve each new key (`auth: opt-in`) or not (`opt-out`); locks whose owner denies
the partner are absent, so a grant on one is a plan error (nothing could be sent). Locks are adopted by id
only: the partner cannot create, rename or delete them.

The partner API has no list of keys. The id of every key this provider creates is remembered in state
under the grant's own address (`{"id", "phone", "lock"}`), and `read_live` reads those keys back one by
one (`GET .../keys/{keyId}`, concurrently): the one place in this project where a GET per resource is
right, because there is nothing to list. A key revoked (by us or by the lock owner, who may opt out at
any time), expired, denied by the owner or unknown to the vendor is no live grant: a grant still declared
is created again, and the state record of one no longer declared is forgotten when the next apply commits
its reads. A key waiting for the owner's approval on an opt-in lock (`state: pending-approval`) is
`Status.PENDING`: the plan lists it as pending, never as a change to repeat. Keys are immutable: a changed
window is revoke + create (the planner's `replace`), and a key whose phone or lock no longer matches the
policy is shown under `<address>#<key id>`, so that it is revoked and the grant created afresh.

Lost answers: a create whose answer is lost cannot be checked against a key list. Before sending, the
provider records an intent in state (`intend`, with the phone, the lock and the time). On an ambiguous
error it reads the lock's event log (`GET .../locks/{lockId}/events`; events carry `keyId` and `msn`)
for a key first seen for that phone at or after the intent's time (less `CLOCK_SKEW`), not revoked
or denied since, that no state record claims: exactly one is adopted; none means the create did not
land, and it is sent again; several stop with an error rather than guess. An intent left by a run that died mid-create is settled the same
way by the next read. This relies on the vendor logging an event when a key is created; creates for one
phone on one lock run one at a time, so that the new key is ours.

`events(device)` reads the same event log for `reconciler events`.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
from pydantic import field_validator

from reconciler.errors import VendorError
from reconciler.plan import Action, Note
from reconciler.providers.answers import Id, adapter, created, fault, listing, model, parse
from reconciler.providers.base import Event, HandlerTable, Provider, ReadResult
from reconciler.providers.http import json_error
from reconciler.providers.settings import VendorSettings
from reconciler.resources import (
    Attribute,
    Capabilities,
    Enforcement,
    Kind,
    KindSchema,
    Meta,
    Resource,
    Status,
    address_of,
    compact,
    format_time,
    grant_parts,
    normalise_time,
    parse_time,
    unknown_name,
)

log = logging.getLogger(__name__)

READ_WORKERS = 8                      # concurrent per-key reads
CLOCK_SKEW = timedelta(minutes=2)     # our clock against the vendor's when matching a lost create
PARTNER_ID_PATTERN = re.compile(r"^[A-Za-z0-9._~-]+$")

# The one endpoint table (API-SURFACE §3): a path correction is a one-line change.
PATHS = {
    "locks": "/v1/partners/{partner}/locks",
    "events": "/v1/partners/{partner}/locks/{lock}/events",
    "keys": "/v1/partners/{partner}/keys",
    "key": "/v1/partners/{partner}/keys/{key}",
}

# Key states [doc + pinned]. Unknown states count as live: better shown than created twice.
PENDING_STATES = frozenset({"pending-approval"})
GONE_STATES = frozenset({"revoked", "expired", "denied"})
ENDED_ACTIONS = frozenset({"revoked", "denied"})   # event actions after which a key opens nothing [pinned]
PENDING_MESSAGE = "waiting for the lock owner's approval (opt-in lock)"

# On an opt-in lock the key "cannot be used unless the lock owner has accepted the key" [doc]; on opt-out it is
# approved at once. Nothing is documented about when a revoked key stops opening.
ENFORCEMENT = Enforcement(grant="in force once the lock owner approves it (opt-in locks; opt-out: at once)",
                          pending=PENDING_STATES, failed=frozenset({"denied"}))

CAPABILITIES = Capabilities(
    vendor="unloc-partner",
    grant_kind=Kind.KEY,
    needs_phone=True,
    creates_devices=False,
    device_fields=frozenset(),
    device_id_pattern=r"[A-Za-z0-9][A-Za-z0-9:._-]*",   # `danalock-00:00:00:00:00:01`, UUIDs
    credentials=frozenset({"api_key"}),
    several_windows=True,
    attributes={
        # `end` is optional on create [doc]; a key cannot be updated, so any change is revoke + create.
        Kind.KEY: KindSchema({"start": Attribute(str), "end": Attribute(str, default=None)}, immutable=True,
                             enforcement=ENFORCEMENT),
    },
)


describe_error = json_error("error", "errorDescription")

# The answers' shapes [doc]: strict on what the tool relies on, lenient on the rest.
KEY = adapter(model("Key", {"id": Id, "lockId": str | None, "state": str | None, "start": str | None,
                            "end": str | None}, optional=("lockId", "state", "start", "end")))
EVENT = model("Event", {"keyId": str | None, "action": str | None, "name": str | None, "msn": str | None,
                        "created": str | None}, optional=("keyId", "action", "name", "msn", "created"))
EVENTS = adapter(model("Events", {"events": list[EVENT]}))    # type: ignore[valid-type]
CREATED = adapter(model("Created", {"id": Id}))


def _segment(value: str) -> str:
    return quote(value, safe=":@")


class UnlocPartnerSettings(VendorSettings):
    partner_id: str                    # the partner id Unloc gave you

    @field_validator("partner_id")
    @classmethod
    def _partner(cls, value: str) -> str:
        if not PARTNER_ID_PATTERN.match(value):
            raise ValueError(f"'{value}' is not a partner id: letters, digits and . _ ~ - only")
        return value


class UnlocPartnerProvider(Provider):
    capabilities = CAPABILITIES
    vendor = CAPABILITIES.vendor       # its name, stated once here; registered under it in pyproject.toml
    default_url = "https://api.unloc.app"
    settings_model = UnlocPartnerSettings
    settings: UnlocPartnerSettings
    simulator = "reconciler.sandbox.unloc_partner:UnlocPartnerSimulator"
    credential_variables: ClassVar[Mapping[str, str]] = {"api_key": "UNLOC_PARTNER_KEY"}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.partner = self.settings.partner_id
        self.locks: dict[str, dict[str, Any]] = {}          # lock id → lock, from the last read
        self._settled: dict[str, dict[str, Any] | None] = {}  # state records the last read settled
        self._guard = threading.Lock()
        self._serial: dict[tuple[str, str], threading.Lock] = {}

    def secrets(self) -> list[str]:
        return [self.credentials["api_key"].reveal()]

    def http_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credentials['api_key'].reveal()}", "Accept": "application/json"}

    def describe_error(self, response: httpx.Response) -> str:
        return describe_error(response)

    def _path(self, endpoint: str, **ids: str) -> str:
        return PATHS[endpoint].format(partner=_segment(self.partner), **{k: _segment(v) for k, v in ids.items()})

    # -- reading -------------------------------------------------------------------------------------
    def _list_locks(self) -> list[dict[str, Any]]:
        return listing(self.http.request("GET", self._path("locks")), "locks", self.name, fold=True)

    def _lock_events(self, lock: str) -> list[dict[str, Any]]:
        response = self.http.request("GET", self._path("events", lock=lock))
        events: list[dict[str, Any]] = parse(response, EVENTS, self.name)["events"]
        try:
            for event in events:
                event["created"] = normalise_time(event.get("created"))
        except ValueError as exc:
            raise fault(self.name, "GET", self._path("events", lock=lock), f"event {event.get('id')}: {exc}") from None
        return events

    def _get_key(self, key_id: str) -> dict[str, Any] | None:
        response = self.http.request("GET", self._path("key", key=key_id), expect=(404,))
        if response.status_code == 404:
            return None
        key: dict[str, Any] = parse(response, KEY, self.name)
        try:
            key["start"], key["end"] = normalise_time(key.get("start")), normalise_time(key.get("end"))
        except ValueError as exc:
            raise fault(self.name, "GET", self._path("key", key=key_id), f"key {key['id']}: {exc}") from None
        return key

    def read_live(self, desired: list[Resource]) -> ReadResult:
        self._settled.clear()
        result = ReadResult()
        prefix = f"{self.name}/{Kind.KEY}/"
        records = dict(self.state.items(prefix))
        known = {a: r for a, r in records.items() if r.get("id")}
        intents = {a: r for a, r in records.items() if r.get("intent") == "create" and not r.get("id")}
        with ThreadPoolExecutor(READ_WORKERS) as pool:
            locks_read = pool.submit(self._list_locks)
            reads: dict[str, Future[dict[str, Any] | None]] = {
                a: pool.submit(self._get_key, r["id"]) for a, r in known.items()}
            # Intents only: a create whose answer was lost is looked for in its lock's event log.
            logs = {lock: pool.submit(self._events_or_none, lock)
                    for lock in sorted({str(r["lock"]) for r in intents.values() if r.get("lock")})}
            found, notes = self._settle(intents, {lock: f.result() for lock, f in logs.items()})
            result.warnings += notes
            for address, record in found.items():
                known[address] = record
                reads[address] = pool.submit(self._get_key, record["id"])
            locks = locks_read.result()
            keys = {address: future.result() for address, future in reads.items()}
        self.locks = {lock["id"]: lock for lock in locks if lock.get("id")}

        devices = {vid: address[len(f"{self.name}/{Kind.DEVICE}/"):] for address, vid in self.ids.items()
                   if address.startswith(f"{self.name}/{Kind.DEVICE}/")}
        for lock_id, lock in self.locks.items():
            name = devices.get(lock_id)
            meta = compact(Meta(auth=lock.get("auth"), data=lock.get("data")))
            result.resources.append(Resource(self.name, Kind.DEVICE, name or unknown_name(lock_id),
                                             {"name": lock.get("name")}, id=lock_id, managed=name is not None,
                                             meta=meta))
        live: set[str] = set()
        for address, key in sorted(keys.items()):
            resource = self._key_resource(address, known[address], key, result)
            if resource is not None:
                result.resources.append(resource)
                live.add(resource.address)
        for want in desired:
            if want.kind == Kind.KEY and want.address not in live:
                self._check_create(want, result)
        return result

    def _events_or_none(self, lock: str) -> list[dict[str, Any]] | None:
        try:
            return self._lock_events(lock)
        except VendorError as exc:
            if exc.temporary:
                raise
            return None     # the lock is gone from the partner's reach: nothing to look at

    def _settle(self, intents: Mapping[str, Mapping[str, Any]], logs: Mapping[str, list[dict[str, Any]] | None]
                ) -> tuple[dict[str, dict[str, Any]], list[Note]]:
        """Match intents left by creates whose answer was lost against the locks' event logs."""
        found: dict[str, dict[str, Any]] = {}
        notes: list[Note] = []
        claimed = set(self.ids.values())
        for address, record in sorted(intents.items()):
            lock, phone = record.get("lock"), record.get("phone")
            events = logs.get(lock) if lock else None
            if events is None or not phone:
                notes.append(Note(address, "a create whose answer was lost cannot be checked (the lock's event "
                                  "log is out of reach); check the vendor system", self.name, Kind.KEY))
                continue
            candidates = _new_keys(events, phone, record.get("at"), claimed)
            if len(candidates) == 1:
                found[address] = {"id": candidates[0], "phone": phone, "lock": lock}
                self._settled[address] = found[address]
                self.ids[address] = candidates[0]
                claimed.add(candidates[0])
                log.info("create with lost answer found address=%s id=%s", address, candidates[0])
            elif not candidates:
                self._settled[address] = None   # it never landed: the plan creates it again
            else:
                notes.append(Note(address, f"a create whose answer was lost matches {len(candidates)} new keys "
                                  f"({', '.join(candidates)}); none adopted, check the vendor system",
                                  self.name, Kind.KEY))
        return found, notes

    def _key_resource(self, address: str, record: Mapping[str, Any], key: dict[str, Any] | None,
                      result: ReadResult) -> Resource | None:
        name = address[len(f"{self.name}/{Kind.KEY}/"):]
        state = (key or {}).get("state")
        if key is None or state in GONE_STATES:
            # Not a live grant any more: forget it when apply commits; a declared grant is created again.
            self._settled[address] = None
            if key is not None:
                result.listed.add(address)      # still there (revoked, expired, denied): not lost
            if state == "denied" and address in self.desired:
                result.warnings.append(Note(address, f"the lock owner denied key {record['id']}; apply asks "
                                            "for a new one", self.name, Kind.KEY,
                                            (("id", str(record["id"])), ("state", "denied"))))
            return None
        lock = key.get("lockId") or record.get("lock")
        meta: Meta = {"state": state, "lock": lock}
        status = Status.PRESENT
        if state in PENDING_STATES:
            status = Status.PENDING
            meta["pending"] = PENDING_MESSAGE
        want = self.desired.get(address)
        if want is not None and (record.get("phone") != want.meta.get("phone")
                                 or lock != self.ids.get(self._device_address(want))):
            # Issued to another phone or lock than the policy now names: revoke it, create the grant anew.
            name = f"{name}#{key['id']}"
        attributes = {"start": normalise_time(key.get("start")), "end": normalise_time(key.get("end"))}
        return Resource(self.name, Kind.KEY, name, attributes, id=key["id"], status=status, meta=meta)

    def _check_create(self, want: Resource, result: ReadResult) -> None:
        """A grant the plan will create: refuse it when its lock is out of reach, and say when the new key
        will wait for the owner."""
        lock_id = self.ids.get(self._device_address(want))
        lock = self.locks.get(lock_id or "")
        if lock is None:
            result.errors.append(f"{want.address}: lock {lock_id or '(no id)'} is not among partner {self.partner}'s locks "
                                 "(its owner has not let the partner in, or the id is wrong); no key can be "
                                 "issued on it")
        elif lock.get("auth") == "opt-in":
            result.warnings.append(Note(want.address, f"lock {lock.get('name') or lock_id} is opt-in: the new key "
                                        "waits for the lock owner's approval in the Unloc app", self.name, Kind.KEY))

    def commit_reads(self) -> None:
        super().commit_reads()
        for address, record in sorted(self._settled.items()):
            if record is None:
                self.forget(address)
            else:
                self.remember(address, record)
        self._settled.clear()

    # -- keys ----------------------------------------------------------------------------------------
    def create_key(self, want: Resource) -> dict[str, Any]:
        lock = self.ids.get(self._device_address(want))
        phone = want.meta.get("phone")
        if not lock:
            raise VendorError(f"{want.address}: the lock has no id")
        if not phone:
            raise VendorError(f"{want.address}: the user has no phone number; unloc-partner keys go to a phone")
        body: dict[str, Any] = {"lockId": lock, "msn": phone,
                                "start": want.attributes.get("start") or format_time(self.clock())}
        if want.attributes.get("end"):
            body["end"] = want.attributes["end"]
        with self._serial_lock(lock, phone):
            self.intend(want.address, [], phone=phone, lock=lock)
            since = (self.state.get(want.address) or {}).get("at")
            maybe_landed = False

            def send() -> httpx.Response:
                nonlocal maybe_landed
                try:
                    return self.http.request("POST", self._path("keys"), json=body, idempotent=False)
                except VendorError as exc:
                    maybe_landed = maybe_landed or exc.ambiguous
                    raise

            def find() -> dict[str, Any] | None:
                candidates = _new_keys(self._lock_events(lock), phone, since, set(self.ids.values()))
                if len(candidates) > 1:
                    raise VendorError(f"{want.address}: a create lost its answer and {len(candidates)} new keys "
                                      "match; not sent again, the next plan settles it")
                return {"id": candidates[0]} if candidates else None
            try:
                found = self.create_checked(send, find)
            except VendorError:
                if not maybe_landed:
                    self.forget(want.address)    # refused outright: nothing to look for later
                raise
            # Read after the send, not inside it: a malformed answer (no id, not JSON) leaves the key uncertain,
            # its intent in the state for the next read to settle from the lock's event log; never sent again
            # here, never recorded on a guess.
            answer = created(found, CREATED, self.name) if isinstance(found, httpx.Response) else found
            # Claimed before the lock is released, so the next create's lookup cannot mistake it for its own.
            self.ids[want.address] = answer["id"]
        log.info("key created address=%s id=%s", want.address, answer["id"])
        return {"id": answer["id"], "phone": phone, "lock": lock}

    def revoked_still_there(self, live: Resource) -> bool | None:
        if live.kind != Kind.KEY or not live.id:
            return None
        key = self._get_key(str(live.id))
        return key is not None and key.get("state") not in GONE_STATES

    def delete_key(self, live: Resource) -> None:
        # The vendor keeps a revoked key (`state: revoked`); 404: it is gone already.
        self.http.request("DELETE", self._path("key", key=str(live.id)), expect=(404,))

    # -- audit ---------------------------------------------------------------------------------------
    def events(self, device: Resource, *, since: datetime | None = None) -> list[Event]:
        lock = self.ids.get(device.address) or device.id
        if not lock:
            raise VendorError(f"{self.name}: device {device.name} has no lock id")
        people = self._people()
        rows = []
        for item in sorted(self._lock_events(lock), key=lambda e: e.get("created") or ""):
            when = normalise_time(item.get("created")) or ""
            if since is not None and when and parse_time(when) <= since:
                continue
            msn = item.get("msn") or ""
            person = people.get(msn) or item.get("name") or msn
            rows.append(Event(time=when, action=item.get("action") or "", person=person,
                              detail=f"key {item.get('keyId')}" if item.get("keyId") else ""))
        return rows

    def _people(self) -> dict[str, str]:
        """Phone → policy user, from the declared grants and the keys in state."""
        people: dict[str, str] = {}
        prefix = f"{self.name}/{Kind.KEY}/"
        for address, record in self.state.items(prefix):
            if record.get("phone"):
                people.setdefault(record["phone"], address[len(prefix):].split("/")[0])
        for want in self.desired.values():
            if want.kind == Kind.KEY and want.meta.get("phone"):
                people[want.meta["phone"]] = want.name.split("/")[0]
        return people

    # -- helpers -------------------------------------------------------------------------------------
    def _device_address(self, grant: Resource) -> str:
        return address_of(self.name, Kind.DEVICE, grant_parts(grant.name)[1])

    def _serial_lock(self, lock: str, phone: str) -> threading.Lock:
        with self._guard:
            return self._serial.setdefault((lock, phone), threading.Lock())

    handlers: ClassVar[HandlerTable] = {(Action.CREATE, Kind.KEY): create_key, (Action.DELETE, Kind.KEY): delete_key}


def _new_keys(events: Iterable[Mapping[str, Any]], phone: str, since: str | None, claimed: set[str]) -> list[str]:
    """Keys first seen in an event log for `phone` at or after `since` (less the clock skew) that no
    state record claims, oldest first."""
    first: dict[str, tuple[str, str | None]] = {}     # key id → (first event time, msn)
    ended: set[str] = set()
    for event in events:
        key_id, created = event.get("keyId"), normalise_time(event.get("created"))
        if key_id and created and (key_id not in first or created < first[key_id][0]):
            first[key_id] = (created, event.get("msn"))
        if key_id and event.get("action") in ENDED_ACTIONS:
            # Not the key just created (a key we revoked a moment ago in a replace, say); and were it
            # ours, it grants nothing: sending again is right either way.
            ended.add(key_id)
    floor = format_time(parse_time(since) - CLOCK_SKEW) if since else ""
    return [key_id for key_id, (created, msn) in sorted(first.items(), key=lambda item: item[1][0])
            if msn == phone and created >= floor and key_id not in claimed and key_id not in ended]
