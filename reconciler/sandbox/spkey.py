"""Simulator of SmartphoneKey's temporary-key API for B2B organisations (vendor `spkey`).

`SpkeySimulator.handle(request)` answers like the vendor on the endpoints pinned in API-SURFACE.md §4,
strictly per the vendor's own OpenAPI 3.1 document (`smartphonekey-b2c-openapi.json`): the request bodies
are validated against the document's schemas (the `REQUEST_SCHEMAS` below are copied from it verbatim and
a test keeps them equal), and every response has the document's envelope (`success`, `aggregateId`,
`version`, `event`, plus `tempKeyUuid` on create). The provider factory plugs it into
`httpx.MockTransport` for `url: sandbox`; `reconciler sandbox serve` mounts it under `/spkey`; tests drive
it directly and through its admin hooks (`use_key`, `add_temp_key`).

Where the documents are silent, this module decides (clients must cope with any of it):
- Auth: only B2B `X-API-Key`. An `Authorization` header is a B2C JWT this sandbox cannot verify: 401
  even next to a valid API key (clients send one scheme, never both). No or an unknown key: 401.
- Order of checks: rate limit (429), auth (401), unknown path (404) / method (405), lock id in the path
  (400 unless an integer > 0), unknown lock (404), another organisation's lock (403), Content-Type and
  JSON (400), body schema (400), rules (400), unknown temp key (404), repeated `tempKeyUuid` (400: the
  document lists only 200, 400 and 401 for create-temp-key).
- Errors are `{error, message}` (the 404 of temp-key lists adds `code`, as the excerpt shows); except
  where the document says otherwise: `basic-info` 404 is `{success: false, errors: [{code, message}]}`
  and `users/by-email` errors are `{error}`.
- Unknown body fields are dropped, not refused (the document does not close its objects; the vendor's
  validator strips them), so `description` sent to update-temp-key is silently ignored: it can only be
  set on create, and no list returns it.
- `tempKeyUuid` is unique across all locks (the vendor opens keys at `/temp-keys/{uuid}`); a deleted
  key's uuid may be used again. Rules beyond the schema: `validUntil` after `validFrom`; a
  `user-whitelist` key needs at least one user, and every user id must be a known user.
- Times are echoed the way JavaScript prints them (`2026-11-23T08:00:00.000Z`); clients normalise.
- Status, by the simulator clock: `expired` once `validUntil` has passed, else `used-up` when
  `usedCount` reached `maxUses`, else `not-yet-valid` before `validFrom`, else `valid`.
- An update that changes nothing answers `event: null` and keeps the version.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, ClassVar

import httpx

from reconciler.sandbox.common import (
    Route,
    RouteMatch,
    Simulator,
    SimulatorError,
    json_response,
    parse_datetime,
)

logger = logging.getLogger(__name__)

JSON = "application/json"
STORE_FORMAT, STORE_VERSION = "reconciler-sandbox/spkey", 1

# The one endpoint table (API-SURFACE §4, plus the vendor's own use-temp-key command).
ROUTES: tuple[Route, ...] = (
    Route("GET", "/locks/{id}/temp-keys", "list_temp_keys"),
    Route("POST", "/locks/{id}/create-temp-key", "create_temp_key", body=JSON),
    Route("POST", "/locks/{id}/update-temp-key", "update_temp_key", body=JSON),
    Route("POST", "/locks/{id}/delete-temp-key", "delete_temp_key", body=JSON),
    Route("POST", "/locks/{id}/use-temp-key", "use_temp_key", body=JSON),
    Route("GET", "/locks/{id}/basic-info", "basic_info"),
    Route("GET", "/users/by-email", "user_by_email"),
)

# Request bodies, verbatim from the vendor's OpenAPI document (tests/test_spkey.py keeps them equal).
_ACCESS_MODE = {"type": "string", "enum": ["public", "user-whitelist"]}
_MAX_USES = {"type": ["integer", "null"], "exclusiveMinimum": 0}
REQUEST_SCHEMAS: dict[str, dict[str, Any]] = {
    "create_temp_key": {
        "type": "object",
        "properties": {
            "tempKeyUuid": {"type": "string"},
            "accessMode": _ACCESS_MODE,
            "allowedUserIds": {"type": "array", "items": {"type": "string"}, "default": []},
            "validFrom": {"type": "string", "format": "date-time"},
            "validUntil": {"type": "string", "format": "date-time"},
            "maxUses": _MAX_USES,
            "description": {"type": "string", "maxLength": 2000},
        },
        "required": ["tempKeyUuid", "accessMode", "validFrom", "validUntil"],
    },
    "update_temp_key": {
        "type": "object",
        "properties": {
            "tempKeyUuid": {"type": "string"},
            "validFrom": {"type": "string", "format": "date-time"},
            "validUntil": {"type": "string", "format": "date-time"},
            "maxUses": _MAX_USES,
            "allowedUserIds": {"type": "array", "items": {"type": "string"}},
            "accessMode": _ACCESS_MODE,
        },
        "required": ["tempKeyUuid"],
    },
    "delete_temp_key": {
        "type": "object", "properties": {"tempKeyUuid": {"type": "string"}}, "required": ["tempKeyUuid"],
    },
    "use_temp_key": {
        "type": "object", "properties": {"tempKeyUuid": {"type": "string"}, "userId": {"type": "string"}},
        "required": ["tempKeyUuid"],
    },
}
UPDATABLE = ("validFrom", "validUntil", "maxUses", "allowedUserIds", "accessMode")

# --- seed data: fixed, so that policies can adopt locks by id and tests can name people.
_NS = uuid.UUID("6f1d3c8e-2b7a-4e0f-9c51-8d2e4a7b3f60")


def _seed_uuid(name: str) -> str:
    return str(uuid.uuid5(_NS, name))


API_KEY = "spk_sbx_" + uuid.uuid5(_NS, "api-key/demo-org").hex
OTHER_API_KEY = "spk_sbx_" + uuid.uuid5(_NS, "api-key/other-org").hex
ORG_ID = _seed_uuid("org/demo")
OTHER_ORG_ID = _seed_uuid("org/other")
# Locks of the organisation whose API key the sandbox hands out: name → numeric lock id.
SEED_LOCKS: dict[str, int] = {"Guest Flat 1": 121, "Guest Flat 2": 122, "Guest Flat 3": 123,
                              "Guest Flat 4": 124, "Bike Room": 130}
OTHER_ORG_LOCK = 900          # belongs to another organisation: 403 for our key
# SmartphoneKey accounts: email → user uuid.
SEED_USERS: dict[str, str] = {email: _seed_uuid(f"user/{email}") for email in (
    "alice@example.com", "bob@example.com", "carol@example.com", "dave@example.com",
    "maria@cleanco.example", "jonas@cleanco.example", "lena@cleanco.example")}
# A key the owner made in the app on Guest Flat 2 (not by reconciler): plans show it as `id:<uuid>`.
SEED_APP_KEY = _seed_uuid("temp-key/app/guest-flat-2")


def js_time(moment: datetime) -> str:
    """How the vendor (JavaScript's `toISOString`) prints a time: milliseconds and `Z`."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


# ------------------------------------------------------------------------------------------ validation

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    # JSON has one number type: 3.0 is an integer (as in JSON Schema and the vendor's JavaScript).
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
}


def schema_problem(schema: dict[str, Any], value: Any, where: str = "body") -> str | None:
    """The first way `value` breaks `schema` (the JSON Schema subset the document uses), or None."""
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_TYPES[name](value) for name in names):
            return f"{where} must be of type {' or '.join(names)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {', '.join(map(str, schema['enum']))}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "exclusiveMinimum" in schema and not value > schema["exclusiveMinimum"]:
            return f"{where} must be greater than {schema['exclusiveMinimum']}"
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return f"{where} must be at most {schema['maxLength']} characters"
        if schema.get("format") == "date-time" and parse_datetime(value) is None:
            return f"{where} must be an ISO 8601 date-time with an offset, e.g. 2026-11-23T08:00:00Z"
    if isinstance(value, dict):
        for name in schema.get("required", ()):
            if name not in value:
                return f"{where}.{name} is required"
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                problem = schema_problem(sub, value[name], f"{where}.{name}")
                if problem:
                    return problem
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            problem = schema_problem(schema["items"], item, f"{where}[{index}]")
            if problem:
                return problem
    return None


def _known_fields(schema: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """What the vendor keeps of a body: the fields its schema names (others are dropped silently)."""
    return {k: v for k, v in body.items() if k in schema["properties"]}


# ------------------------------------------------------------------------------------------ simulator

class SpkeySimulator(Simulator):
    """SmartphoneKey's temp-key API, in memory, optionally persisted to `store_path`.

    - `store_path`: the store (`common.LogStore`), loaded when it exists (seeded only when new); each change is appended.
    - `clock`: the vendor's time (key status, timestamps). `rate_limit`: requests per rolling second
      before 429 with Retry-After; None = unlimited. `base_path`: the prefix before the API's paths.

    Hooks for tests and demos (Python, not HTTP): `credentials`, `use_key`, `add_temp_key`, `temp_keys`,
    `set_clock`/`advance`, `requests`/`reset_log`/`count`, `faults` (see `common.FaultInjector`).
    """

    routes: ClassVar[tuple[Route, ...]] = ROUTES
    not_found: ClassVar[str] = "The requested resource was not found"
    store_format, store_version = STORE_FORMAT, STORE_VERSION
    _emails: dict[str, str] | None = None   # email → user uuid, built from the users when first needed

    def load_state(self, data: dict[str, Any]) -> dict[str, Any]:
        self._emails = None                 # another process may have added users
        return data

    # ------------------------------------------------------------------------------------ store
    def new_state(self) -> dict[str, Any]:
        created = "2026-01-05T09:00:00.000Z"
        state: dict[str, Any] = {
            "format": STORE_FORMAT, "version": STORE_VERSION,
            "apiKeys": {API_KEY: ORG_ID, OTHER_API_KEY: OTHER_ORG_ID},
            "users": {uid: {"uuid": uid, "email": email, "created_at": created} for email, uid in SEED_USERS.items()},
            "locks": {}, "tempKeys": {},
        }
        owner = SEED_USERS["alice@example.com"]
        for n, (_name, lock_id) in enumerate(sorted(SEED_LOCKS.items(), key=lambda item: item[1])):
            state["locks"][str(lock_id)] = self._lock_record(lock_id, ORG_ID, owner, f"SPK-{20260000 + n + 1}")
        state["locks"][str(OTHER_ORG_LOCK)] = self._lock_record(OTHER_ORG_LOCK, OTHER_ORG_ID,
                                                                SEED_USERS["dave@example.com"], "SPK-30990001")
        lock = state["locks"][str(SEED_LOCKS["Guest Flat 2"])]
        lock["version"] += 1
        state["tempKeys"][SEED_APP_KEY] = {
            "uuid": SEED_APP_KEY, "lockId": lock["lockId"], "lockUuid": lock["uuid"], "accessMode": "public",
            "allowedUserIds": [], "validFrom": "2026-01-10T10:00:00.000Z", "validUntil": "2026-01-10T18:00:00.000Z",
            "maxUses": None, "usedCount": 3, "createdAt": "2026-01-09T16:12:44.000Z", "createdBy": owner,
            "_description": "Plumber (made in the app)"}
        return state

    @staticmethod
    def _lock_record(lock_id: int, org: str, owner: str, serial: str) -> dict[str, Any]:
        lock_uuid = _seed_uuid(f"lock/{lock_id}")
        return {"id": lock_uuid, "lockId": lock_id, "uuid": lock_uuid, "version": 1, "serialNumber": serial,
                "ownerId": owner, "orgId": org, "organizationId": org,
                "doId": uuid.uuid5(_NS, f"do/{lock_id}").hex * 2, "r2Prefix": f"locks/{lock_uuid}/events/"}

    # ------------------------------------------------------------------------------------ HTTP
    def render_error(self, error: SimulatorError) -> httpx.Response:
        if isinstance(error, _BasicInfoNotFound):
            return json_response(404, {"success": False, "errors": [{"code": 404, "message": error.detail}]})
        body: dict[str, Any] = {"error": error.title, "message": error.detail}
        if isinstance(error, _LockNotFound):
            body["code"] = 404
        return json_response(error.status, body, headers=error.headers)

    def dispatch(self, request: httpx.Request, match: RouteMatch) -> httpx.Response:
        org = self._authenticate(request)
        route = self.route_of(request, match)
        handler: Callable[..., httpx.Response] = getattr(self, f"_op_{route.handler}")
        if route.handler == "user_by_email":
            return handler(request)
        lock = self._find_lock(match.params["id"], org, route.handler)
        if route.body is None:
            return handler(lock)
        body = self._body(request, route.handler)
        return handler(lock, body, org)

    def _authenticate(self, request: httpx.Request) -> str:
        """The calling organisation, or 401."""
        if "authorization" in request.headers:
            raise SimulatorError(401, "Invalid or expired token: B2B clients authenticate with X-API-Key only")
        key = request.headers.get("x-api-key", "")
        for known, org in self.state["apiKeys"].items():
            if key and hmac.compare_digest(key.encode(), known.encode()):
                return org
        raise SimulatorError(401, "Missing or invalid API key")

    def _find_lock(self, raw_id: str, org: str, handler: str) -> dict[str, Any]:
        if not re.fullmatch(r"[1-9][0-9]{0,15}", raw_id):
            raise SimulatorError(400, "Lock ID must be a positive integer")
        lock = self.state["locks"].get(raw_id)
        if lock is None:
            if handler == "basic_info":
                raise _BasicInfoNotFound()
            raise _LockNotFound()
        if lock["orgId"] != org:
            raise SimulatorError(403, "This lock belongs to another organization")
        return lock

    def _body(self, request: httpx.Request, handler: str) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != JSON:
            raise SimulatorError(400, "Content-Type must be application/json")
        try:
            body = json.loads(request.content)
        except (ValueError, UnicodeDecodeError):
            raise SimulatorError(400, "Request body is not valid JSON") from None
        schema = REQUEST_SCHEMAS[handler]
        problem = schema_problem(schema, body)
        if problem:
            raise SimulatorError(400, problem)
        return _known_fields(schema, body)

    # --- temp keys
    def _status(self, key: dict[str, Any]) -> str:
        now = self.now()
        if now >= parse_datetime(key["validUntil"]):  # type: ignore[operator]
            return "expired"
        if key["maxUses"] is not None and key["usedCount"] >= key["maxUses"]:
            return "used-up"
        if now < parse_datetime(key["validFrom"]):  # type: ignore[operator]
            return "not-yet-valid"
        return "valid"

    def _public(self, key: dict[str, Any]) -> dict[str, Any]:
        return {**{k: v for k, v in key.items() if not k.startswith("_")}, "status": self._status(key)}

    def _stamp(self) -> str:
        return js_time(self.now())

    def _check_rules(self, key: dict[str, Any]) -> None:
        if parse_datetime(key["validUntil"]) <= parse_datetime(key["validFrom"]):  # type: ignore[operator]
            raise SimulatorError(400, "validUntil must be after validFrom")
        if key["accessMode"] == "user-whitelist" and not key["allowedUserIds"]:
            raise SimulatorError(400, "A user-whitelist key needs at least one allowed user")
        unknown = [u for u in key["allowedUserIds"] if u not in self.state["users"]]
        if unknown:
            raise SimulatorError(400, f"Unknown user id(s) in allowedUserIds: {', '.join(unknown)}")

    def _key_on(self, lock: dict[str, Any], key_uuid: str) -> dict[str, Any]:
        key = self.state["tempKeys"].get(key_uuid)
        if key is None or key["lockId"] != lock["lockId"]:
            raise SimulatorError(404, f"Temporary key {key_uuid} not found on lock {lock['lockId']}")
        return key

    def _envelope(self, lock: dict[str, Any], event: dict[str, Any] | None, **extra: Any) -> httpx.Response:
        return json_response(200, {"success": True, "aggregateId": lock["uuid"], "version": lock["version"],
                                   "event": event, **extra})

    def _bump(self, lock: dict[str, Any], key_uuid: str) -> None:
        """A write to one of the lock's temp keys: the lock's aggregate version moves on."""
        lock["version"] += 1
        self.mark_changed("locks", str(lock["lockId"]))
        self.mark_changed("tempKeys", key_uuid)

    def _op_list_temp_keys(self, lock: dict[str, Any]) -> httpx.Response:
        keys = self.view("tempKeys", _by_creation, "created").group("lockId").get(lock["lockId"], [])
        return json_response(200, {"tempKeys": [self._public(k) for k in keys]})

    def _op_create_temp_key(self, lock: dict[str, Any], body: dict[str, Any], org: str) -> httpx.Response:
        key_uuid = body["tempKeyUuid"]
        if not key_uuid.strip():
            raise SimulatorError(400, "body.tempKeyUuid must not be empty")
        key = {"uuid": key_uuid, "lockId": lock["lockId"], "lockUuid": lock["uuid"],
               "accessMode": body["accessMode"], "allowedUserIds": list(body.get("allowedUserIds", [])),
               "validFrom": js_time(parse_datetime(body["validFrom"])),  # type: ignore[arg-type]
               "validUntil": js_time(parse_datetime(body["validUntil"])),  # type: ignore[arg-type]
               "maxUses": _count(body.get("maxUses")), "usedCount": 0, "createdAt": self._stamp(),
               "createdBy": f"org:{org}", "_description": body.get("description")}
        self._check_rules(key)
        if key_uuid in self.state["tempKeys"]:
            raise SimulatorError(400, f"Temporary key {key_uuid} already exists")
        self.state["tempKeys"][key_uuid] = key
        self._bump(lock, key_uuid)
        data = {k: key[k] for k in ("lockId", "lockUuid", "accessMode", "allowedUserIds", "validFrom",
                                    "validUntil", "maxUses", "createdBy")}
        event = {"type": "TempKeyCreated", "data": {"tempKeyUuid": key_uuid, **data, "timestamp": key["createdAt"]}}
        logger.debug("sandbox spkey temp key created lock=%s uuid=%s", lock["lockId"], key_uuid)
        return self._envelope(lock, event, tempKeyUuid=key_uuid)

    def _op_update_temp_key(self, lock: dict[str, Any], body: dict[str, Any], org: str) -> httpx.Response:
        key = self._key_on(lock, body["tempKeyUuid"])
        proposed = dict(key)
        for name in UPDATABLE:
            if name in body:
                value = body[name]
                if name in ("validFrom", "validUntil"):
                    value = js_time(parse_datetime(value))  # type: ignore[arg-type]
                elif name == "maxUses":
                    value = _count(value)
                proposed[name] = value
        self._check_rules(proposed)
        changes = {name: proposed[name] for name in UPDATABLE if proposed[name] != key[name]}
        if not changes:
            return self._envelope(lock, None)
        key.update(changes)
        self._bump(lock, key["uuid"])
        event = {"type": "TempKeyUpdated", "data": {"tempKeyUuid": key["uuid"], "lockId": lock["lockId"],
                                                    "lockUuid": lock["uuid"], "changes": changes,
                                                    "updatedBy": f"org:{org}", "timestamp": self._stamp()}}
        return self._envelope(lock, event)

    def _op_delete_temp_key(self, lock: dict[str, Any], body: dict[str, Any], org: str) -> httpx.Response:
        key = self._key_on(lock, body["tempKeyUuid"])
        del self.state["tempKeys"][key["uuid"]]
        self._bump(lock, key["uuid"])
        event = {"type": "TempKeyDeleted", "data": {"tempKeyUuid": key["uuid"], "lockId": lock["lockId"],
                                                    "lockUuid": lock["uuid"], "deletedBy": f"org:{org}",
                                                    "timestamp": self._stamp()}}
        return self._envelope(lock, event)

    def _op_use_temp_key(self, lock: dict[str, Any], body: dict[str, Any], org: str) -> httpx.Response:
        key = self._key_on(lock, body["tempKeyUuid"])
        status = self._status(key)
        if status != "valid":
            raise SimulatorError(400, f"Temporary key {key['uuid']} cannot be used: it is {status}")
        user = body.get("userId")
        # The open flow has already checked who opens; a named user must still be on the whitelist.
        if user is not None and key["accessMode"] == "user-whitelist" and user not in key["allowedUserIds"]:
            raise SimulatorError(400, "This key opens only for the users on its whitelist")
        key["usedCount"] += 1
        self._bump(lock, key["uuid"])
        data = {"tempKeyUuid": key["uuid"], "lockId": lock["lockId"], "lockUuid": lock["uuid"],
                "usedCount": key["usedCount"], "timestamp": self._stamp()}
        if user is not None:
            data["userId"] = user
        return self._envelope(lock, {"type": "TempKeyUsed", "data": data})

    def _op_basic_info(self, lock: dict[str, Any]) -> httpx.Response:
        return json_response(200, dict(lock))

    # --- users
    def _op_user_by_email(self, request: httpx.Request) -> httpx.Response:
        params = request.url.params
        email = (params.get("email") or "").strip()
        search_only = params.get("searchOnly", "false")
        if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", email):
            return json_response(400, {"error": "Query parameter email must be an email address"})
        if search_only not in ("true", "false"):
            return json_response(400, {"error": "Query parameter searchOnly must be true or false"})
        wanted = email.lower()
        if self._emails is None:
            self._emails = {}
            for known in self.state["users"].values():
                self._emails.setdefault(known["email"], known["uuid"])
        found = self.state["users"].get(self._emails.get(wanted, ""))
        if found is not None:
            return json_response(200, dict(found))
        if search_only == "true":
            return json_response(404, {"error": "User not found"})
        requested = params.get("uuid")
        if requested is not None and requested in self.state["users"]:
            return json_response(409, {"error": "Requested UUID already exists"})
        user_uuid = requested or str(uuid.uuid5(_NS, f"user/{wanted}"))
        user = {"uuid": user_uuid, "email": wanted, "created_at": self._stamp()}
        self.state["users"][user_uuid] = user
        self.mark_changed("users", user_uuid)
        self._emails[wanted] = user_uuid
        return json_response(200, dict(user))

    # ------------------------------------------------------------------------------- admin hooks
    @property
    def credentials(self) -> dict[str, str]:
        """The B2B API key of the organisation that owns `SEED_LOCKS`."""
        return {"api_key": API_KEY}

    def use_key(self, lock_id: int, temp_key_uuid: str, user_id: str | None = None) -> int:
        """Someone opens the lock with a temp key (the vendor's open flow): returns the new `usedCount`.
        A key that is not valid now (expired, used up, not yet valid), or a `user_id` that a whitelist key
        does not name, raises ValueError."""
        with self.mutate():
            lock = self.state["locks"].get(str(lock_id))
            key = self.state["tempKeys"].get(temp_key_uuid)
            if lock is None or key is None or key["lockId"] != lock["lockId"]:
                raise KeyError(f"no temp key {temp_key_uuid} on lock {lock_id}")
            status = self._status(key)
            if status != "valid":
                raise ValueError(f"temp key {temp_key_uuid} is {status}")
            if user_id is not None and key["accessMode"] == "user-whitelist" and user_id not in key["allowedUserIds"]:
                raise ValueError(f"temp key {temp_key_uuid} does not open for user {user_id}")
            key["usedCount"] += 1
            self._bump(lock, temp_key_uuid)
            return key["usedCount"]

    def add_temp_key(self, lock_id: int, **fields: Any) -> str:
        """A key made outside reconciler (the owner's app): `validFrom`, `validUntil`, optional
        `accessMode`, `allowedUserIds`, `maxUses`, `uuid`. Returns its uuid."""
        with self.mutate():
            lock = self.state["locks"][str(lock_id)]
            key_uuid = fields.pop("uuid", None) or str(uuid.uuid4())
            key = {"uuid": key_uuid, "lockId": lock["lockId"], "lockUuid": lock["uuid"],
                   "accessMode": fields.pop("accessMode", "public"),
                   "allowedUserIds": fields.pop("allowedUserIds", []),
                   "validFrom": js_time(parse_datetime(fields.pop("validFrom"))),  # type: ignore[arg-type]
                   "validUntil": js_time(parse_datetime(fields.pop("validUntil"))),  # type: ignore[arg-type]
                   "maxUses": fields.pop("maxUses", None), "usedCount": 0, "createdAt": self._stamp(),
                   "createdBy": lock["ownerId"], "_description": fields.pop("description", None)}
            if fields:
                raise TypeError(f"unknown temp key fields: {', '.join(sorted(fields))}")
            self.state["tempKeys"][key_uuid] = key
            self._bump(lock, key_uuid)
            return key_uuid

    def temp_keys(self, lock_id: int | None = None) -> list[dict[str, Any]]:
        """Every stored temp key (of one lock), as the list endpoint shows it, plus its `description`."""
        with self.mutate():
            return [{**self._public(k), "description": k["_description"]} for k in self.state["tempKeys"].values()
                    if lock_id is None or k["lockId"] == lock_id]


def _by_creation(key: dict[str, Any]) -> tuple[str, str]:
    return (key["createdAt"], key["uuid"])


def _count(value: Any) -> int | None:
    return None if value is None else int(value)


class _LockNotFound(SimulatorError):
    """The 404 of the lock's temp-key endpoints, with the `code` the vendor's excerpt shows."""

    def __init__(self) -> None:
        super().__init__(404, "Lock not found")


class _BasicInfoNotFound(SimulatorError):
    """`basic-info` answers 404 in another envelope: `{success: false, errors: [{code, message}]}`."""

    def __init__(self) -> None:
        super().__init__(404, "Lock not found")
