"""Simulator of the Unloc Integrator API v1 (keys on a lock holder's locks).

`UnlocSimulator.handle(request)` answers like the vendor: the same paths (API-SURFACE.md §2), OAuth2
client-credentials tokens scoped to one lock holder and expiring, `{error, errorDescription}` error bodies,
E.164 and recurrence validation, `limit`/`startAfterId` paging, and keys that are made asynchronously
(`creating`, then `scheduled` or `active` a short while later by the simulator clock). The provider factory
plugs it into `httpx.MockTransport` for `url: sandbox`; `reconciler sandbox serve` mounts it under `/unloc`;
tests drive it directly and through its admin hooks (`fail_key`, `settle`, `add_key`, `expire_tokens`).

Where the vendor documents are silent, this module decides (and the clients must cope with any of it):
- Order of checks: unknown path (404) / method (405), bearer token (401), the token's scope against the
  lock holder in the path (403), Content-Type (415), body (400), lock and key ids (404).
- Paths are exact, with the trailing slash the document shows (`/auth/v1/token/`, `/locks/{id}/keys/`,
  `/roles/{userId}/`); without it, or with one added elsewhere, a path is 404.
- The token request is the documented JSON body (`scope` a list, API-SURFACE §2 [doc]); any other
  Content-Type, the OAuth2 form included, is 415.
- Token errors follow OAuth2 names: an unknown client or wrong secret is 401 `invalid_client`, a scope the
  client may not have is 403 `invalid_scope`, a malformed request 400 `invalid_request`. Other errors are
  named `ValidationError` (400), `UnauthorizedError` (401, no token), `JsonWebTokenError` (401, bad or
  expired token [doc]), `Forbidden`, `NotFound`, `TooManyRequests` (with Retry-After).
- Key creation answers 201 `{key}`. `start`, `end` and `userId` must all be present (`null` start = now,
  `null` end = never); unknown fields are refused. `end` must be after the (effective) start.
- Recurrence: 1..7 spans, each exactly `{weekday, startHour, startMinute, endHour, endMinute}`, integers,
  hours 0..24 (24 only as 24:00), minutes 0..59, end after start, at most one span per weekday.
- Timestamps are echoed in UTC with milliseconds (`2026-01-01T08:00:00.000Z`), as in the vendor's examples.
- The lock holder's key list holds keys created through the API [doc], ordered by id; `limit` is 1..500
  (default 100) and the answer carries `startAfterId` when more keys follow. Keys made by hand in the Unloc
  app (`add_key(..., via="app")`) appear only in their lock's list.
- A key in `error` carries the reason as `errorDescription`.
- Two keys for the same phone on the same lock are both accepted (nothing says the vendor refuses them), so
  a client must look before it sends a create again.
- Revoking (`PATCH {state: revoked}`, nothing else may be set) is allowed in any state and repeats
  harmlessly; a revoked key stays listed with `state: revoked`. Keys pass to `expired` when their end passes.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import httpx
import jwt

from reconciler.sandbox.common import (
    E164,
    UUID_TEXT,
    Route,
    RouteMatch,
    Simulator,
    SimulatorError,
    json_response,
    parse_datetime,
    read_json_body,
    utc_now,
)

logger = logging.getLogger(__name__)

JSON = "application/json"
_LH = "/integrators/v1/lock-holders/{lock_holder_id}"

# The one endpoint table. `handler` names the `_op_<handler>` method below.
ROUTES: tuple[Route, ...] = (
    Route("POST", "/auth/v1/token/", "token", auth=False),     # JSON only [doc]: see _token_request
    Route("GET", _LH + "/locks", "list_locks"),
    Route("GET", _LH + "/keys", "list_keys"),
    Route("GET", _LH + "/locks/{lock_id}/keys/", "list_lock_keys"),
    Route("POST", _LH + "/locks/{lock_id}/keys/", "create_key", body=JSON),
    Route("PATCH", _LH + "/locks/{lock_id}/keys/{key_id}", "update_key", body=JSON),
    Route("PUT", _LH + "/locks/{lock_id}/roles/{user_id}/", "set_role", body=JSON),
)

# Vendor limits (from the documents unless noted).
PAGE_DEFAULT, PAGE_MAX = 100, 500          # pinned
TOKEN_TTL = 3600                           # expires_in [doc]
CREATION_DELAY = timedelta(seconds=2)      # creating → scheduled/active (pinned: "a short delay")
WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
SPAN_FIELDS = frozenset({"weekday", "startHour", "startMinute", "endHour", "endMinute"})
KEY_FIELDS = frozenset({"userId", "start", "end", "recurrence", "skipInviteNotification"})
STATES = ("creating", "scheduled", "active", "expired", "error", "revoked")
SCOPE = re.compile(r"^lockHolder\.admin:(.+)$")
TOKEN_ISSUER = "reconciler-sandbox/unloc"
STORE_FORMAT, STORE_VERSION = "reconciler-sandbox/unloc", 1

# --- seed data: fixed, so that a demo policy can adopt locks by id. The lock holder and the first two
# locks are the ids of the vendor's own examples.
_NS = uuid.UUID("6f1d3a0e-2b7c-4e55-9c1a-3d8e5b7a9f21")


def _seed_id(name: str) -> str:
    return str(uuid.uuid5(_NS, name))


LOCK_HOLDER_ID = "866b8a35-4184-44c5-8ffd-448a77e5a91c"
CLIENT_ID = "sbx-unloc-integrator"
CLIENT_SECRET = "sbx-" + hashlib.sha256(b"reconciler sandbox unloc client secret").hexdigest()[:40]
SEED_LOCKS: dict[str, str] = {
    "Cabin 7": "0634f1ba-e175-49e8-98bc-32b11505107b",
    "Cabin 3": "ba193242-3cb2-4ac7-beef-d41668a009bb",
    **{name: _seed_id(f"lock/{name}") for name in ("Cabin 12", "Sauna", "Boathouse", "Main Gate")},
}
# A key nobody's policy declares (made by an earlier integration), so the first plan has one to revoke.
SEED_KEY_ID = _seed_id("key/former-caretaker")
SEED_KEY_PHONE = "+523377360555"


def _state_at(key: dict[str, Any], now: float) -> str:
    """The state a key has reached by `now` on its own (creating → scheduled → active → expired)."""
    state = key["state"]
    if state == "creating":
        if now < key["_settleAt"]:
            return state
        state = "scheduled"
    if state == "scheduled" and now >= key["_startTs"]:
        state = "active"
    if state == "active" and key["_endTs"] is not None and now >= key["_endTs"]:
        state = "expired"
    return state


def _next_change(key: dict[str, Any]) -> float | None:
    """When the key may next change state on its own; None: never (revoked, expired, error, no end)."""
    return {"creating": key["_settleAt"], "scheduled": key["_startTs"],
            "active": key["_endTs"]}.get(key["state"])


def _by_id(record: dict[str, Any]) -> str:
    return record["id"]


def _by_seq(record: dict[str, Any]) -> int:
    return record["_seq"]


def _public(record: dict[str, Any]) -> dict[str, Any]:
    """A stored record without the simulator's own bookkeeping (keys starting with `_`)."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def format_instant(value: datetime) -> str:
    """The vendor's timestamp form: UTC with milliseconds, `2021-06-24T11:59:14.926Z`."""
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def refusal(status: int, error: str, description: str, headers: dict[str, str] | None = None) -> SimulatorError:
    """A refusal rendered as `{error, errorDescription}`; `error` travels as the title."""
    return SimulatorError(status, description, title=error, headers=headers)


def invalid(description: str) -> SimulatorError:
    return refusal(400, "ValidationError", description)


@dataclass
class _Call:
    """What a handler needs: the request, its path parameters, its parsed body and the token's claims."""

    request: httpx.Request
    params: dict[str, str]
    body: Any
    claims: dict[str, Any] | None

    def query(self, name: str) -> str | None:
        return self.request.url.params.get(name)


# ------------------------------------------------------------------------------------------ validation

def _instant(body: dict[str, Any], name: str) -> datetime | None:
    value = body[name]
    if value is None:
        return None
    parsed = parse_datetime(value)
    if parsed is None:
        raise invalid(f"{name} must be an ISO-8601 date-time with a timezone (e.g. 2026-01-01T08:00:00.000Z) "
                      "or null")
    return parsed


def validate_recurrence(value: Any) -> dict[str, Any] | None:
    """The recurrence as stored, or None for `null`; `SimulatorError(400)` for anything the vendor refuses."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"timeSpans"}:
        raise invalid("recurrence must be an object with exactly one field, timeSpans")
    spans = value["timeSpans"]
    if not isinstance(spans, list) or not 1 <= len(spans) <= len(WEEKDAYS):
        raise invalid("recurrence.timeSpans must be a list of 1 to 7 time spans")
    seen: set[str] = set()
    clean = []
    for index, span in enumerate(spans):
        where = f"recurrence.timeSpans[{index}]"
        if not isinstance(span, dict) or set(span) != SPAN_FIELDS:
            raise invalid(f"{where} must have exactly weekday, startHour, startMinute, endHour and endMinute")
        if span["weekday"] not in WEEKDAYS:
            raise invalid(f"{where}.weekday must be one of {', '.join(WEEKDAYS)}")
        for name in ("startHour", "endHour", "startMinute", "endMinute"):
            number = span[name]
            high = 24 if name.endswith("Hour") else 59
            if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number <= high:
                raise invalid(f"{where}.{name} must be an integer between 0 and {high}")
        start = span["startHour"] * 60 + span["startMinute"]
        end = span["endHour"] * 60 + span["endMinute"]
        if start >= 24 * 60 or end > 24 * 60:
            raise invalid(f"{where}: the latest time of day is 24:00 (endHour 24, endMinute 0)")
        if end <= start:
            raise invalid(f"{where}: the span must end after it starts (spans cannot cross midnight)")
        if span["weekday"] in seen:
            raise invalid(f"{where}: {span['weekday']} already has a time span; at most one span per weekday")
        seen.add(span["weekday"])
        clean.append({k: span[k] for k in ("weekday", "startHour", "startMinute", "endHour", "endMinute")})
    return {"timeSpans": clean}


# ------------------------------------------------------------------------------------------ simulator

class UnlocSimulator(Simulator):
    """The Unloc Integrator API v1, in memory, optionally persisted to `store_path`.

    - `store_path`: the store (`common.LogStore`), loaded when it exists (seeded only when new); each change is appended.
    - `clock`: the vendor's time (token expiry, key creation, key expiry).
    - `rate_limit`: requests per rolling second before 429 with Retry-After; None = unlimited.
    - `token_ttl`: seconds a token lives (`expires_in`). `creation_delay`: how long a key stays `creating`.
    - `seed=False`: the client and lock holder only, no locks or keys.
    - `base_path`: the prefix before the API's paths; "" finds it by itself. `monotonic`: the rate
      limiter's clock (tests).

    Hooks for tests and demos (Python, not HTTP): `credentials`, `fail_key`, `settle`, `add_key`,
    `keys`, `expire_tokens`, `set_clock`/`advance`, `requests`/`reset_log`/`count`, `faults`.
    """

    routes: ClassVar[tuple[Route, ...]] = ROUTES
    routing_titles: ClassVar[dict[int, str]] = {404: "NotFound", 405: "MethodNotAllowed"}
    store_format, store_version = STORE_FORMAT, STORE_VERSION

    def __init__(self, store_path: Path | None = None, *, clock: Callable[[], datetime] = utc_now,
                 rate_limit: int | None = None, token_ttl: int = TOKEN_TTL,
                 creation_delay: timedelta = CREATION_DELAY, seed: bool = True, base_path: str = "",
                 monotonic: Callable[[], float] = time.monotonic):
        self.token_ttl = token_ttl
        self.creation_delay = creation_delay
        self._seed = seed
        # When each key may next change state by itself: a heap of (moment, key id), and the moment each
        # key is due (entries that disagree with it are stale). None: rebuilt from the keys when needed.
        self._agenda: list[tuple[float, str]] | None = None
        self._due_at: dict[str, float] = {}
        super().__init__(store_path, clock=clock, rate_limit=rate_limit, base_path=base_path,
                         monotonic=monotonic)

    # ------------------------------------------------------------------------------------ store
    def new_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": STORE_FORMAT, "version": STORE_VERSION,
            # Random per store: a token from another sandbox is "not issued by this one".
            "secret": secrets.token_bytes(32).hex(), "tokenGeneration": 0, "seq": 0,
            "clients": {CLIENT_ID: {"secretHash": _hash(CLIENT_SECRET), "lockHolders": [LOCK_HOLDER_ID]}},
            "lockHolders": {LOCK_HOLDER_ID: {"id": LOCK_HOLDER_ID, "name": "Fjord Cabins AS"}},
            "locks": {}, "keys": {}, "roles": {},
        }
        if self._seed:
            for _n, (name, lock_id) in enumerate(SEED_LOCKS.items(), start=1):
                state["seq"] += 1
                state["locks"][lock_id] = {"id": lock_id, "name": name, "lockHolderId": LOCK_HOLDER_ID,
                                           "timezone": "Europe/Oslo", "_seq": state["seq"]}
            state["seq"] += 1
            state["keys"][SEED_KEY_ID] = {
                "id": SEED_KEY_ID, "toUser": {"id": SEED_KEY_PHONE, "name": "Former caretaker"},
                "lockId": SEED_LOCKS["Cabin 7"], "start": "2025-06-01T00:00:00.000Z", "end": None,
                "created": "2025-05-28T09:12:44.310Z", "state": "active",
                "_seq": state["seq"], "_origin": "api", "_lockHolderId": LOCK_HOLDER_ID,
                "_settleAt": None, "_startTs": datetime(2025, 6, 1, tzinfo=UTC).timestamp(), "_endTs": None}
        return state

    def load_state(self, data: dict[str, Any]) -> dict[str, Any]:
        self._agenda = None           # another process may have written keys
        return data

    def _next_id(self, table: str) -> tuple[str, int]:
        self.state["seq"] += 1
        seq = self.state["seq"]
        # Deterministic ids (a counter that persists with the store) keep demo output reproducible.
        return str(uuid.uuid5(_NS, f"{table}/{seq}")), seq

    def _maintain(self) -> None:
        """Keys move on by themselves (creating → scheduled → active → expired), by the simulator clock.
        Done lazily before each request, for the keys that are due only (an agenda, not a scan of every key)."""
        now = self.now().timestamp()
        if self._agenda is None:
            self._due_at = {}
            self._agenda = []
            for key in self.state["keys"].values():
                due = _next_change(key)
                if due is not None:
                    self._due_at[key["id"]] = due
                    self._agenda.append((due, key["id"]))
            heapq.heapify(self._agenda)
        agenda = self._agenda
        while agenda and agenda[0][0] <= now:
            due, key_id = heapq.heappop(agenda)
            key = self.state["keys"].get(key_id)
            if key is None or self._due_at.get(key_id) != due:
                continue                # deleted, or rescheduled since
            del self._due_at[key_id]
            state = _state_at(key, now)
            if state != key["state"]:
                logger.debug("sandbox unloc key state key=%s from=%s to=%s", key["id"], key["state"], state)
                key["state"] = state
                self.mark_changed("keys", key["id"])
            self._schedule(key_id, _next_change(key))

    def _schedule(self, key_id: str, due: float | None) -> None:
        if due is None or self._agenda is None or self._due_at.get(key_id) == due:
            return
        self._due_at[key_id] = due
        heapq.heappush(self._agenda, (due, key_id))

    # ------------------------------------------------------------------------------------ HTTP
    def render_error(self, error: SimulatorError) -> httpx.Response:
        # Our refusals carry the vendor's error name as their title; the base's (429, 415, injected faults)
        # carry the HTTP phrase, which becomes a name: `Too Many Requests` → `TooManyRequests`.
        code = error.title.replace(" ", "")
        return json_response(error.status, {"error": code, "errorDescription": error.detail},
                             headers=error.headers)

    def dispatch(self, request: httpx.Request, match: RouteMatch) -> httpx.Response:
        route = self.route_of(request, match)
        self._maintain()
        claims = None
        if route.auth:
            claims = self._authenticate(request)
            lock_holder = match.params["lock_holder_id"].lower()
            if f"lockHolder.admin:{lock_holder}" not in claims["scope"]:
                raise refusal(403, "Forbidden", f"The token's scope does not cover lock holder {lock_holder}")
        body = read_json_body(request, route.body) if route.body else None
        handler: Callable[[_Call], httpx.Response] = getattr(self, f"_op_{route.handler}")
        return handler(_Call(request, match.params, body, claims))

    def _ok(self, body: Any, status: int = 200) -> httpx.Response:
        return json_response(status, body)

    # --- auth
    def _authenticate(self, request: httpx.Request) -> dict[str, Any]:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise refusal(401, "UnauthorizedError", "No authorization token was found")
        try:
            claims = jwt.decode(token.strip(), bytes.fromhex(self.state["secret"]), algorithms=["HS256"],
                                issuer=TOKEN_ISSUER,
                                # expiry is judged by the simulator clock below, not the host's
                                options={"verify_exp": False, "verify_iat": False,
                                         "require": ["sub", "iat", "exp", "scope"]})
        except jwt.PyJWTError:
            raise refusal(401, "JsonWebTokenError", "invalid token") from None
        if claims.get("gen") != self.state["tokenGeneration"] or claims["sub"] not in self.state["clients"]:
            raise refusal(401, "JsonWebTokenError", "invalid token")
        if self.now().timestamp() >= claims["exp"]:
            raise refusal(401, "JsonWebTokenError", "JWT expired")
        return claims

    def _op_token(self, call: _Call) -> httpx.Response:
        body = _token_request(call.request)
        if body.get("grant_type") != "client_credentials":
            raise refusal(400, "unsupported_grant_type", "grant_type must be client_credentials")
        client_id, secret = body.get("client_id"), body.get("client_secret")
        if not isinstance(client_id, str) or not isinstance(secret, str):
            raise refusal(400, "invalid_request", "client_id and client_secret are required")
        client = self.state["clients"].get(client_id)
        if client is None or not hmac.compare_digest(client["secretHash"], _hash(secret)):
            raise refusal(401, "invalid_client", "Client authentication failed")
        scope = body.get("scope")
        if not isinstance(scope, list) or not scope or not all(isinstance(s, str) for s in scope):
            raise refusal(400, "invalid_request", 'scope is required: ["lockHolder.admin:<id>"]')
        for item in scope:
            match = SCOPE.match(item)
            if match is None:
                raise refusal(400, "invalid_scope", f"Unknown scope {item!r}; use lockHolder.admin:<id>")
            if match.group(1).lower() not in client["lockHolders"]:
                raise refusal(403, "invalid_scope", f"The client may not act for lock holder {match.group(1)}")
        issued = int(self.now().timestamp())
        claims = {"sub": client_id, "scope": [_canonical_scope(s) for s in scope],
                  "iat": issued, "exp": issued + self.token_ttl, "iss": TOKEN_ISSUER, "jti": secrets.token_hex(8),
                  "gen": self.state["tokenGeneration"]}
        token = jwt.encode(claims, bytes.fromhex(self.state["secret"]), algorithm="HS256")
        return self._ok({"access_token": token, "token_type": "bearer", "expires_in": self.token_ttl})

    # --- locks
    def _find_lock(self, call: _Call) -> dict[str, Any]:
        lock_id = call.params["lock_id"].lower()
        lock = self.state["locks"].get(lock_id)
        if lock is None or lock["lockHolderId"] != call.params["lock_holder_id"].lower():
            raise refusal(404, "NotFound", f"Lock {call.params['lock_id']} not found")
        return lock

    def _op_list_locks(self, call: _Call) -> httpx.Response:
        holder = call.params["lock_holder_id"].lower()
        locks = sorted((lock for lock in self.state["locks"].values() if lock["lockHolderId"] == holder),
                       key=lambda lock: lock["_seq"])
        return self._ok({"locks": [_public(lock) for lock in locks]})

    # --- keys
    def _op_list_keys(self, call: _Call) -> httpx.Response:
        holder = call.params["lock_holder_id"].lower()
        raw_limit = call.query("limit")
        if raw_limit is not None and (not re.fullmatch(r"[0-9]+", raw_limit) or not 1 <= int(raw_limit) <= PAGE_MAX):
            raise invalid(f"limit must be an integer between 1 and {PAGE_MAX}")
        limit = int(raw_limit) if raw_limit is not None else PAGE_DEFAULT
        cursor = call.query("startAfterId")
        if cursor is not None and not UUID_TEXT.match(cursor):
            raise invalid("startAfterId must be a key id")
        page, more = self.view("keys", _by_id, "id").page(
            after=None if cursor is None else cursor.lower(), limit=limit,
            where=lambda k: k["_lockHolderId"] == holder and k["_origin"] == "api")
        body: dict[str, Any] = {"keys": [_public(k) for k in page]}
        if more:
            body["startAfterId"] = page[-1]["id"]
        return self._ok(body)

    def _op_list_lock_keys(self, call: _Call) -> httpx.Response:
        lock = self._find_lock(call)
        keys = self.view("keys", _by_seq, "seq").group("lockId").get(lock["id"], [])
        return self._ok({"keys": [_public(k) for k in keys]})

    def _op_create_key(self, call: _Call) -> httpx.Response:
        body = call.body
        if not isinstance(body, dict):
            raise invalid("The request body must be a JSON object")
        unknown = sorted(set(body) - KEY_FIELDS)
        if unknown:
            raise invalid(f"Unknown field(s): {', '.join(unknown)}")
        missing = sorted({"userId", "start", "end"} - set(body))
        if missing:
            raise invalid(f"Missing field(s): {', '.join(missing)} (send null for no start or no end)")
        phone = body["userId"]
        if not isinstance(phone, str) or not E164.match(phone):
            raise invalid("userId must be a mobile phone number in E.164 format, e.g. +4790000001")
        start, end = _instant(body, "start"), _instant(body, "end")
        recurrence = validate_recurrence(body.get("recurrence"))
        skip = body.get("skipInviteNotification", False)
        if not isinstance(skip, bool):
            raise invalid("skipInviteNotification must be true or false")
        lock = self._find_lock(call)
        now = self.now()
        effective_start = start or now
        if end is not None and end <= effective_start:
            raise invalid("end must be after start")
        key = self._insert_key(lock, phone, effective_start, end, recurrence, origin="api", state="creating",
                               skip_notification=skip)
        return self._ok({"key": _public(key)}, 201)

    def _insert_key(self, lock: dict[str, Any], phone: str, start: datetime, end: datetime | None,
                    recurrence: dict[str, Any] | None, *, origin: str, state: str,
                    skip_notification: bool = False) -> dict[str, Any]:
        key_id, seq = self._next_id("keys")
        now = self.now()
        key: dict[str, Any] = {
            "id": key_id, "toUser": {"id": phone}, "lockId": lock["id"], "start": format_instant(start),
            "end": None if end is None else format_instant(end), "created": format_instant(now), "state": state,
            "_seq": seq, "_origin": origin, "_lockHolderId": lock["lockHolderId"],
            "_settleAt": (now + self.creation_delay).timestamp(), "_startTs": start.timestamp(),
            "_endTs": None if end is None else end.timestamp(), "_skipInviteNotification": skip_notification}
        if recurrence is not None:
            key["recurrence"] = recurrence
        self.state["keys"][key_id] = key
        self._schedule(key_id, key["_settleAt"] if state == "creating" else now.timestamp())
        self.mark_changed("keys", key_id)
        return key

    def _op_update_key(self, call: _Call) -> httpx.Response:
        body = call.body
        if not isinstance(body, dict) or set(body) != {"state"}:
            raise invalid("Only the key's state can be changed: send {\"state\": \"revoked\"}")
        if body["state"] != "revoked":
            raise invalid("state can only be set to revoked")
        lock = self._find_lock(call)
        key = self.state["keys"].get(call.params["key_id"].lower())
        if key is None or key["lockId"] != lock["id"]:
            raise refusal(404, "NotFound", f"Key {call.params['key_id']} not found")
        if key["state"] not in ("revoked", "expired"):
            key["state"] = "revoked"
            key.pop("errorDescription", None)
            self.mark_changed("keys", key["id"])
        return self._ok({"key": _public(key)})

    def _op_set_role(self, call: _Call) -> httpx.Response:
        lock = self._find_lock(call)
        user = call.params["user_id"]
        if not E164.match(user):
            raise invalid("userId must be a mobile phone number in E.164 format")
        body = call.body
        if not isinstance(body, dict) or not set(body) <= {"userName", "canShare"} or "canShare" not in body:
            raise invalid("The body must be {userName?, canShare}")
        if not isinstance(body["canShare"], bool) or not isinstance(body.get("userName", ""), str):
            raise invalid("canShare must be true or false and userName a string")
        role = {"lockId": lock["id"], "userId": user, "canShare": body["canShare"], **(
            {"userName": body["userName"]} if "userName" in body else {})}
        self.state["roles"][f"{lock['id']}/{user}"] = role
        self.mark_changed("roles", f"{lock['id']}/{user}")
        return self._ok({"role": role})

    # ------------------------------------------------------------------------------- admin hooks
    @property
    def credentials(self) -> dict[str, str]:
        """The sandbox integrator's client credentials (test values, not secrets)."""
        return {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}

    def keys(self) -> list[dict[str, Any]]:
        """Every key the vendor holds (all lock holders, all states, API or app), oldest first."""
        with self.mutate():
            self._maintain()
            return [_public(k) for k in self.view("keys", _by_seq, "seq").records]

    def fail_key(self, key_id: str, reason: str = "Lock could not be reached") -> None:
        """The vendor gives up making a key: it goes to `error` with `reason`."""
        with self.mutate():
            key = self.state["keys"][key_id]
            key["state"] = "error"
            key["errorDescription"] = reason
            self.mark_changed("keys", key_id)

    def settle(self) -> None:
        """Every key still `creating` reaches its final state now, whatever the creation delay."""
        with self.mutate():
            now = self.now().timestamp()
            for key in self.state["keys"].values():
                if key["state"] == "creating":
                    key["_settleAt"] = now
                    self.mark_changed("keys", key["id"])
            self._agenda = None
            self._maintain()

    def add_key(self, lock_id: str, phone: str, *, start: datetime | None = None, end: datetime | None = None,
                recurrence: dict[str, Any] | None = None, via: str = "app", state: str = "active") -> str:
        """A key made outside this API client: by hand in the Unloc app (`via="app"`, listed only under its
        lock) or by another integration (`via="api"`). Returns its id."""
        if via not in ("app", "api") or state not in STATES:
            raise ValueError(f"via must be app or api and state one of {', '.join(STATES)}")
        with self.mutate():
            lock = self.state["locks"][lock_id]
            return self._insert_key(lock, phone, start or self.now(), end, validate_recurrence(recurrence),
                                    origin=via, state=state)["id"]

    def expire_tokens(self) -> None:
        """Invalidate every token issued so far (the next call with one gets 401)."""
        with self.mutate():
            self.state["tokenGeneration"] += 1     # a top-level scalar: written without a mark


def _token_request(request: httpx.Request) -> dict[str, Any]:
    """The token request's fields. Unloc's documentation ("Getting an access token", Integrator) shows a JSON
    body `{grant_type, client_id, client_secret, scope: [...]}` (API-SURFACE §2 [doc]); the vendor answers
    any other body, a form included, with 415."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != JSON:
        raise refusal(415, "invalid_request", f"Content-Type must be {JSON}")
    body = read_json_body(request, JSON)
    if not isinstance(body, dict):
        raise refusal(400, "invalid_request", "The request body must be a JSON object")
    return body


def _canonical_scope(scope: str) -> str:
    prefix, _, holder = scope.partition(":")
    return f"{prefix}:{holder.lower()}"
