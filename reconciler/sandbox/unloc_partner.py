"""Simulator of the Unloc Partner API v1 (vendor `unloc-partner`).

`UnlocPartnerSimulator.handle(request)` answers like the vendor: the paths of API-SURFACE.md §3, a static
partner API key as a bearer token, `{error, errorDescription}` error bodies, locks that only appear when
their owner lets the partner in (`auth: opt-in | opt-out`), keys created with 202 that wait for the
owner's approval on opt-in locks, revocation that keeps the key (`state: revoked`), and per-lock event
logs. The provider factory plugs it into `httpx.MockTransport` for `url: sandbox`; `reconciler sandbox
serve` mounts it under `/unloc-partner`; tests drive it directly and through its admin hooks.

Where the vendor document is silent, this module decides (and the clients must cope with any of it):
- Order of checks: unknown path (404) / method (405), bearer key (401: missing or wrong), partner id in
  the path against the key (403), Content-Type (415), body (400), lock (404 unknown, 403 denied), key (404).
- A lock whose owner denies the partner is absent from the lock list; creating a key for it, or reading
  its events, is 403 (the partner knows the id, the owner said no); an id no owner has is 404.
- Create key: `{lockId, msn, start, end?}` and nothing else (unknown fields are 400); `msn` E.164,
  `start`/`end` ISO 8601 with an offset, `end` after `start` and not in the past. Answers 202 `{id}`.
  Two keys for one phone on one lock are allowed: the vendor does not deduplicate, clients must.
- Key states: `pending-approval` on an opt-in lock until the owner answers (admin hooks `approve` /
  `deny`, the latter giving `denied`), then `scheduled` before `start`, `active` until `end`, `expired`
  after it; `revoked` after DELETE (by the partner) or `revoke_by_owner` (the owner opting out).
- DELETE answers 200 `{"response": "OK"}`, also for a key already revoked (nothing changes then).
- Keys and events echo times in UTC with milliseconds (`2026-01-01T08:00:00.000Z`), as the vendor's
  event example does. GET key answers `{id, lockId, state, start, end, events}`; `end` null = open-ended.
- Events (`created`, `approved`, `denied`, `revoked`, `unlocked`) are recorded on create, approval,
  denial, revocation and use (`use_key`), oldest first; `name` is the Unloc user's profile name for the
  phone (null when the phone has no Unloc profile).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

import httpx

from reconciler.sandbox.common import (
    E164,
    Route,
    RouteMatch,
    Simulator,
    SimulatorError,
    json_response,
    parse_datetime,
    read_json_body,
)

logger = logging.getLogger(__name__)

JSON = "application/json"

# The one endpoint table. `handler` names the `_op_<handler>` method below.
ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/partners/{partner_id}/locks", "list_locks"),
    Route("GET", "/v1/partners/{partner_id}/locks/{lock_id}/events", "list_events"),
    Route("POST", "/v1/partners/{partner_id}/keys", "create_key", body=JSON),
    Route("GET", "/v1/partners/{partner_id}/keys/{key_id}", "get_key"),
    Route("DELETE", "/v1/partners/{partner_id}/keys/{key_id}", "revoke_key"),
)

STORE_FORMAT, STORE_VERSION = "reconciler-sandbox/unloc-partner", 1
OPT_IN, OPT_OUT = "opt-in", "opt-out"
PENDING, APPROVED, DENIED, REVOKED = "pending-approval", "approved", "denied", "revoked"

# --- seed data: fixed, so that a demo policy can adopt locks by id and docs can quote the key.
PARTNER_ID = "abcpartner"
API_KEY = "sbx-" + hashlib.sha256(b"reconciler sandbox unloc partner api key").hexdigest()[:32]
_NS = uuid.UUID("8f4d2c1e-7a55-4b0e-9e61-2d7c9b3a6f10")

# name → lock id. The owner of the last one denies the partner: it never appears in the lock list.
SEED_LOCKS: dict[str, str] = {
    "Hjemme": "danalock-00:00:00:00:00:01",
    "Hovedinngang": "doora-00:00:00:00:00:01",
    "Hytte": "danalock-00:00:00:00:00:02",
    "Bod": "BA193202-3CB2-4AC7-8045-D41668A009BB",
    "Garasje": "danalock-00:00:00:00:00:03",
}
# lock id → what its owner allows this partner (None: denied).
SEED_LOCK_AUTH: dict[str, str | None] = {
    SEED_LOCKS["Hjemme"]: OPT_OUT, SEED_LOCKS["Hovedinngang"]: OPT_OUT,
    SEED_LOCKS["Hytte"]: OPT_IN, SEED_LOCKS["Bod"]: OPT_IN, SEED_LOCKS["Garasje"]: None,
}
DENIED_LOCK = SEED_LOCKS["Garasje"]
_SEED_LOCK_DETAILS: dict[str, dict[str, str]] = {
    "Hjemme": {"data": "customer-001", "street": "Parkveien 4", "postalCode": "0351", "city": "Oslo",
               "countryIso": "no"},
    "Hovedinngang": {"data": "customer-001"},
    "Hytte": {"data": "customer-002", "street": "Fjellvegen 12", "postalCode": "3580", "city": "Geilo",
              "countryIso": "no"},
    "Bod": {"data": "customer-003"},
    "Garasje": {"data": "customer-004"},
}
# Unloc app profiles: the `name` events carry for a phone.
SEED_PROFILES: dict[str, str] = {
    "+4790000001": "Alice Hansen", "+4790000002": "Bob Nilsen", "+4791234567": "Kari Nordmann",
    "+19175559999": "Franz Ferdinand",
}


def _seed_id(name: str) -> str:
    return str(uuid.uuid5(_NS, name))


def vendor_time(moment: datetime) -> str:
    """The vendor's timestamp form: UTC with milliseconds, `2019-08-07T13:14:47.350Z`."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass
class _Call:
    request: httpx.Request
    params: dict[str, str]
    body: Any


def _by_seq(record: dict[str, Any]) -> int:
    return record["_seq"]


def _by_time(event: dict[str, Any]) -> tuple[str, int]:
    return (event["created"], event["_seq"])


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")}


class UnlocPartnerSimulator(Simulator):
    """The Unloc Partner API v1, in memory, optionally persisted to `store_path`.

    - `store_path`: the store (`common.LogStore`), loaded when it exists (seeded only when new); each change is appended.
    - `clock`: the vendor's time (key states follow it). `rate_limit`: requests per rolling second
      before 429 with Retry-After; None = unlimited. `base_path`: "" finds the prefix by itself.

    Hooks for tests and demos (Python, not HTTP): `credentials`, `approve`, `deny`, `use_key`,
    `revoke_by_owner`, `set_partner_access`, `key_ids`, `set_clock`/`advance`,
    `requests`/`reset_log`/`count`, `faults` (see `common.FaultInjector`).
    """

    routes: ClassVar[tuple[Route, ...]] = ROUTES
    not_found: ClassVar[str] = "Not found"
    store_format, store_version = STORE_FORMAT, STORE_VERSION

    # ------------------------------------------------------------------------------------ store
    def new_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"format": STORE_FORMAT, "version": STORE_VERSION, "partnerId": PARTNER_ID,
                                 "apiKey": API_KEY, "seq": 0, "locks": {}, "keys": {}, "events": {},
                                 "profiles": dict(SEED_PROFILES)}
        for n, (name, lock_id) in enumerate(SEED_LOCKS.items()):
            state["locks"][lock_id] = {"id": lock_id, "name": name, **_SEED_LOCK_DETAILS[name],
                                       "_partnerAuth": SEED_LOCK_AUTH[lock_id], "_seq": n}
        # A key the partner issued before reconciler was used (no state knows it): history for `events`.
        key_id = _seed_id("key/kari/hjemme")
        lock = SEED_LOCKS["Hjemme"]
        state["keys"][key_id] = {"id": key_id, "lockId": lock, "msn": "+4791234567",
                                 "start": "2025-06-01T12:00:00.000Z", "end": "2025-06-08T10:00:00.000Z",
                                 "_status": APPROVED, "_seq": 0}
        for n, (action, when) in enumerate((("created", "2025-05-30T09:12:03.120Z"),
                                            ("unlocked", "2025-06-01T15:02:44.350Z"),
                                            ("unlocked", "2025-06-03T08:47:10.004Z"))):
            event_id = _seed_id(f"event/kari/{n}")
            state["events"][event_id] = {"id": event_id, "keyId": key_id, "action": action, "name": "Kari Nordmann",
                                         "msn": "+4791234567", "created": when, "_lockId": lock, "_seq": n}
        return state

    def _next_seq(self) -> int:
        self.state["seq"] += 1
        return self.state["seq"]

    def _event(self, key: dict[str, Any], action: str) -> None:
        seq = self._next_seq()
        event_id = str(uuid.uuid5(_NS, f"event/{seq}"))
        self.state["events"][event_id] = {
            "id": event_id, "keyId": key["id"], "action": action, "name": self.state["profiles"].get(key["msn"]),
            "msn": key["msn"], "created": vendor_time(self.now()), "_lockId": key["lockId"], "_seq": seq}
        self.mark_changed("events", event_id)

    def _key_state(self, key: dict[str, Any]) -> str:
        status = key["_status"]
        if status in (REVOKED, DENIED):
            return status
        now = self.now()
        if key["end"] is not None and now >= parse_datetime(key["end"]):  # type: ignore[operator]
            return "expired"
        if status == PENDING:
            return PENDING
        return "scheduled" if now < parse_datetime(key["start"]) else "active"  # type: ignore[operator]

    def _key_view(self, key: dict[str, Any]) -> dict[str, Any]:
        events = self.view("events", _by_time, "time").group("keyId").get(key["id"], [])
        return {"id": key["id"], "lockId": key["lockId"], "state": self._key_state(key), "start": key["start"],
                "end": key["end"], "events": [_public(e) for e in events]}

    # ------------------------------------------------------------------------------------ HTTP
    def render_error(self, error: SimulatorError) -> httpx.Response:
        code = re.sub(r"[^A-Za-z]", "", error.title)
        return json_response(error.status, {"error": code, "errorDescription": error.detail}, headers=error.headers)

    def dispatch(self, request: httpx.Request, match: RouteMatch) -> httpx.Response:
        route = self.route_of(request, match)
        self._authenticate(request)
        if match.params["partner_id"] != self.state["partnerId"]:
            raise SimulatorError(403, f"The API key is not valid for partner {match.params['partner_id']}")
        body = read_json_body(request, route.body) if route.body else None
        handler: Callable[[_Call], httpx.Response] = getattr(self, f"_op_{route.handler}")
        return handler(_Call(request, match.params, body))

    def _authenticate(self, request: httpx.Request) -> None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise SimulatorError(401, "Missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(key.strip().encode(), self.state["apiKey"].encode()):
            raise SimulatorError(401, "Invalid API key", headers={"WWW-Authenticate": "Bearer"})

    def _partner_lock(self, lock_id: str) -> dict[str, Any]:
        lock = self.state["locks"].get(lock_id)
        if lock is None:
            raise SimulatorError(404, f"Lock {lock_id} not found")
        if lock["_partnerAuth"] is None:
            raise SimulatorError(403, f"The owner of lock {lock_id} has not allowed partner "
                                 f"{self.state['partnerId']} to issue keys for it")
        return lock

    def _key(self, key_id: str) -> dict[str, Any]:
        key = self.state["keys"].get(key_id)
        if key is None:
            raise SimulatorError(404, f"Key {key_id} not found")
        return key

    # --- locks
    def _op_list_locks(self, call: _Call) -> httpx.Response:
        locks = sorted((lock for lock in self.state["locks"].values() if lock["_partnerAuth"] is not None),
                       key=lambda lock: lock["_seq"])
        return json_response(200, {"locks": [{"auth": lock["_partnerAuth"], **_public(lock)} for lock in locks]})

    def _op_list_events(self, call: _Call) -> httpx.Response:
        lock = self._partner_lock(call.params["lock_id"])
        events = self.view("events", _by_time, "time").group("_lockId").get(lock["id"], [])
        return json_response(200, {"events": [_public(e) for e in events]})

    # --- keys
    def _op_create_key(self, call: _Call) -> httpx.Response:
        body = call.body
        if not isinstance(body, dict):
            raise SimulatorError(400, "Request body must be a JSON object")
        unknown = sorted(set(body) - {"lockId", "msn", "start", "end"})
        if unknown:
            raise SimulatorError(400, f"Unknown field(s): {', '.join(unknown)}")
        missing = sorted({"lockId", "msn", "start"} - set(body))
        if missing:
            raise SimulatorError(400, f"Missing required field(s): {', '.join(missing)}")
        if not isinstance(body["lockId"], str) or not body["lockId"]:
            raise SimulatorError(400, "lockId must be a string")
        msn = body["msn"]
        if not isinstance(msn, str) or not E164.match(msn):
            raise SimulatorError(400, "msn must be a phone number in E.164 format, e.g. +4790000001")
        start = parse_datetime(body["start"])
        if start is None:
            raise SimulatorError(400, "start must be an ISO 8601 date-time with an offset")
        end = None
        if body.get("end") is not None:
            end = parse_datetime(body["end"])
            if end is None:
                raise SimulatorError(400, "end must be an ISO 8601 date-time with an offset")
            if end <= start:
                raise SimulatorError(400, "end must be after start")
            if end <= self.now():
                raise SimulatorError(400, "end must be in the future")
        lock = self._partner_lock(body["lockId"])
        seq = self._next_seq()
        key = {"id": str(uuid.uuid5(_NS, f"key/{seq}")), "lockId": lock["id"], "msn": msn,
               "start": vendor_time(start), "end": None if end is None else vendor_time(end),
               "_status": PENDING if lock["_partnerAuth"] == OPT_IN else APPROVED, "_seq": seq}
        self.state["keys"][key["id"]] = key
        self.mark_changed("keys", key["id"])
        self._event(key, "created")
        logger.debug("sandbox unloc-partner key created id=%s lock=%s state=%s", key["id"], lock["id"], key["_status"])
        return json_response(202, {"id": key["id"]})

    def _op_get_key(self, call: _Call) -> httpx.Response:
        return json_response(200, self._key_view(self._key(call.params["key_id"])))

    def _op_revoke_key(self, call: _Call) -> httpx.Response:
        key = self._key(call.params["key_id"])
        if key["_status"] != REVOKED:
            key["_status"] = REVOKED
            self.mark_changed("keys", key["id"])
            self._event(key, "revoked")
        return json_response(200, {"response": "OK"})

    # ------------------------------------------------------------------------------- admin hooks
    @property
    def credentials(self) -> dict[str, str]:
        """The partner API key (test value of the simulator, not a secret)."""
        return {"api_key": self.state["apiKey"]}

    @property
    def partner_id(self) -> str:
        return self.state["partnerId"]

    def key_ids(self, lock_id: str | None = None, *, msn: str | None = None) -> list[str]:
        """Ids of every key issued (any state), oldest first, optionally for one lock and phone."""
        with self.mutate():
            keys = self.view("keys", _by_seq, "seq").records
            return [k["id"] for k in keys if (lock_id is None or k["lockId"] == lock_id)
                    and (msn is None or k["msn"] == msn)]

    def key_state(self, key_id: str) -> str:
        with self.mutate():
            if key_id not in self.state["keys"]:
                raise KeyError(f"no key {key_id}")
            return self._key_state(self.state["keys"][key_id])

    def _answer(self, key_id: str, status: str, action: str) -> None:
        with self.mutate():
            key = self.state["keys"].get(key_id)
            if key is None:
                raise KeyError(f"no key {key_id}")
            if key["_status"] != PENDING:
                raise ValueError(f"key {key_id} is not waiting for approval (state {self._key_state(key)})")
            key["_status"] = status
            self.mark_changed("keys", key["id"])
            self._event(key, action)

    def approve(self, key_id: str) -> None:
        """The lock owner accepts the partner's key in the Unloc app (opt-in locks)."""
        self._answer(key_id, APPROVED, "approved")

    def deny(self, key_id: str) -> None:
        """The lock owner declines the partner's key in the Unloc app (opt-in locks)."""
        self._answer(key_id, DENIED, "denied")

    def revoke_by_owner(self, key_id: str) -> None:
        """The lock owner revokes the key in the app (opts out), outside the partner's reach."""
        with self.mutate():
            key = self.state["keys"].get(key_id)
            if key is None:
                raise KeyError(f"no key {key_id}")
            if key["_status"] != REVOKED:
                key["_status"] = REVOKED
                self.mark_changed("keys", key["id"])
                self._event(key, "revoked")

    def use_key(self, key_id: str) -> None:
        """The key holder unlocks the lock with the key; only an active key opens."""
        with self.mutate():
            key = self.state["keys"].get(key_id)
            if key is None:
                raise KeyError(f"no key {key_id}")
            state = self._key_state(key)
            if state != "active":
                raise ValueError(f"key {key_id} cannot open the lock (state {state})")
            self._event(key, "unlocked")

    def set_partner_access(self, lock_id: str, auth: str | None) -> None:
        """The lock owner changes what the partner may do: opt-in, opt-out, or None (deny)."""
        if auth not in (OPT_IN, OPT_OUT, None):
            raise ValueError("auth must be opt-in, opt-out or None")
        with self.mutate():
            self.state["locks"][lock_id]["_partnerAuth"] = auth
            self.mark_changed("locks", lock_id)
