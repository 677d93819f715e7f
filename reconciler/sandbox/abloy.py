"""Simulator of the Abloy Keyless (CUMULUS/BEAT) Administration API v2.

`AbloySimulator.handle(request)` answers like the vendor: the same paths (API-SURFACE.md §1), headers,
JWT login, pagination with opaque tokens, field limits, RFC 7807 problems and asynchronous truths
(cascading deletes, permissions vanishing 14 days after their end, gateways activating after a claim).
The provider factory plugs it into `httpx.MockTransport` for `url: sandbox`; `reconciler sandbox serve`
mounts it under `/abloy-keyless`; tests drive it directly and through its admin hooks.

Where the vendor document is silent, this module decides (and the clients must cope with any of it):
- Order of checks: X-Api-Key (403), rate limit (429), Accept (406), unknown path (404) / method (405),
  bearer token (401), Content-Type (415), body (400), referenced and path ids (404), conflicts (409).
- Creates answer 201, login 200, PATCH/PUT/DELETE 204 without a body (the document shows no body).
- A permission, invitation or association that refers to an unknown user, locking device or gateway
  is 404 (the referenced thing is missing, the request itself is well formed). A malformed id is 400.
- Durations follow `java.time.Duration` (the vendor's problem bodies suggest a JVM service; assumed):
  `PnDTnHnMnS`, a day is 24 h, no years, months, weeks or signs. `PT24H` equals `P1D` and is valid; durations are echoed canonically
  (`P8D`, `P1DT12H`). Date-times must be RFC 3339 with an offset and are echoed in UTC with `Z`.
- Invitations: `phoneNumber` is required for SMS and optional for NONE; a NONE invitation also returns
  an `invitationCode`. Revoking an accepted invitation is 409, an unknown or revoked one 404.
- Deleting the authenticated administrator itself is 409; logging in as a USER-role user is 403.
- A seeded legacy operating device (not invited through v2) cannot be deleted on its own: 409.
- Deleting a gateway frees its claiming code (the vendor allows re-claiming after a factory reset).
- Duplicate permissions are allowed (nothing says the vendor deduplicates, so clients must check before
  they create); duplicate associations are 409.
- Background work (the 14-day purge, gateway activation 30 s after a claim) happens lazily before each
  request, by the simulator clock.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import httpx
import jwt

from reconciler.sandbox.common import (
    E164,
    UUID_TEXT,
    PageTokens,
    Route,
    RouteMatch,
    Simulator,
    SimulatorError,
    format_datetime,
    json_object,
    json_response,
    paginate,
    parse_datetime,
    parse_limit,
    read_json_body,
    utc_now,
)

logger = logging.getLogger(__name__)

MEDIA_TYPE = "application/vnd.assaabloy.keyless.administration-2+json"
JSON = "application/json"
JSON_PATCH = "application/json-patch+json"

# The one endpoint table. `handler` names the `_op_<handler>` method below.
ROUTES: tuple[Route, ...] = (
    Route("POST", "/login", "login", auth=False, body=JSON),
    Route("GET", "/user", "list_users"),
    Route("POST", "/user", "create_user", body=JSON),
    Route("GET", "/user/{user_id}", "get_user"),
    Route("DELETE", "/user/{user_id}", "delete_user"),
    Route("POST", "/operating-device-invitation", "invite", body=JSON),
    Route("DELETE", "/operating-device-invitation/{invitation_id}", "revoke_invitation"),
    Route("GET", "/operating-device", "list_operating_devices"),
    Route("DELETE", "/operating-device/{operating_device_id}", "delete_operating_device"),
    Route("GET", "/locking-device", "list_locking_devices"),
    Route("POST", "/locking-device", "create_locking_device", body=JSON),
    Route("GET", "/locking-device/{locking_device_id}", "get_locking_device"),
    Route("PATCH", "/locking-device/{locking_device_id}", "rename_locking_device", body=JSON_PATCH),
    Route("DELETE", "/locking-device/{locking_device_id}", "delete_locking_device"),
    Route("GET", "/permission", "list_permissions"),
    Route("POST", "/permission", "create_permission", body=JSON),
    Route("GET", "/permission/{permission_id}", "get_permission"),
    Route("PUT", "/permission/{permission_id}", "update_permission", body=JSON),
    Route("DELETE", "/permission/{permission_id}", "delete_permission"),
    Route("POST", "/gateway-device", "claim_gateway", body=JSON),
    Route("GET", "/gateway-device", "list_gateways"),
    Route("GET", "/gateway-device/{gateway_device_id}", "get_gateway"),
    Route("DELETE", "/gateway-device/{gateway_device_id}", "delete_gateway"),
    Route("POST", "/gateway-device-association", "create_association", body=JSON),
    Route("GET", "/gateway-device-association", "list_associations"),
    Route("GET", "/gateway-device-association/{association_id}", "get_association"),
    Route("DELETE", "/gateway-device-association/{association_id}", "delete_association"),
    Route("GET", "/locking-device-audit-log", "list_audit_log"),
)

# Vendor limits (from the document unless noted).
PAGE_DEFAULT, PAGE_MAX = 50, 100
NAME_MAX = 255
MAX_ASSOCIATIONS_PER_GATEWAY = 6          # "currently allows 6" [doc]; the policy stays within 5 (DESIGN)
PERMISSION_RETENTION = timedelta(days=14)
KEY_VALIDITY_MIN, KEY_VALIDITY_MAX, KEY_VALIDITY_DEFAULT = timedelta(days=1), timedelta(days=31), "P8D"
INVITATION_MAX, INVITATION_DEFAULT = timedelta(days=365), "PT24H"
ROLES = ("USER", "ADMIN")
OPERATION_TYPES = ("OPEN", "UPDATE_FIRMWARE", "UPDATE_TIME")
PERMISSION_TYPES = ("SINGLE_INTERVAL",)
DELIVERY_MECHANISMS = ("SMS", "NONE")
INVITATION_FORMATS = ("INVITATION_LINK", "INVITATION_CODE")
CLAIMING_STATUSES = ("UNCLAIMED", "CLAIMED")
TOKEN_ISSUER = "reconciler-sandbox/abloy-keyless"
STORE_FORMAT, STORE_VERSION = "reconciler-sandbox/abloy-keyless", 1

# --- seed data: fixed, so that a demo policy can adopt devices by id and docs can quote credentials.
_NS = uuid.UUID("3b0f6c52-4f0e-4d7a-9a44-6a1f2a9e5c01")


def _seed_id(name: str) -> str:
    return str(uuid.uuid5(_NS, name))


ADMIN_USER_ID = _seed_id("user/admin")
ADMIN_ACCESS_KEY = base64.b64encode(hashlib.sha256(b"reconciler sandbox abloy admin").digest()).decode()
API_KEY = "sbx-" + hashlib.sha256(b"reconciler sandbox abloy api key").hexdigest()[:40]
SEED_DEVICES: dict[str, str] = {name: _seed_id(f"locking-device/{name}") for name in (
    "Main Entrance", "Bike Storage", "Server Room", "Loading Dock", "Roof Access", "Mail Room", "Archive", "Gym")}
# USER-role users that no policy declares, so that the first plan shows unmanaged objects.
SEED_USERS: dict[str, str] = {"contractor": _seed_id("user/contractor"),
                              "former-tenant": _seed_id("user/former-tenant")}
GATEWAY_CLAIMING_CODES: tuple[str, ...] = ("2K7H-ASR3", "7QXM-4P2D", "9VNC-6TLE", "4B8J-WK3R")
GATEWAY_ACTIVATION_DELAY = timedelta(seconds=30)


@dataclass
class _Call:
    """What a handler needs: the request, its path parameters, its parsed body and who is calling."""

    request: httpx.Request
    params: dict[str, str]
    body: Any
    caller: str | None

    def query(self, name: str) -> str | None:
        return self.request.url.params.get(name)


def _public(record: dict[str, Any]) -> dict[str, Any]:
    """A stored record without the simulator's own bookkeeping (keys starting with `_`)."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


def _by_seq(record: dict[str, Any]) -> tuple[int]:
    return (record["_seq"],)


def _by_occurrence(entry: dict[str, Any]) -> tuple[float, str]:
    return (parse_datetime(entry["occurrenceDatetime"]).timestamp(), entry["id"])  # type: ignore[union-attr]


def _hash_key(access_key: str) -> str:
    return hashlib.sha256(access_key.encode()).hexdigest()


# ------------------------------------------------------------------------------------------ validation

def _string(body: dict[str, Any], name: str, *, max_len: int | None = None) -> str:
    value = body[name]
    if not isinstance(value, str):
        raise SimulatorError(400, f"{name} must be a string")
    if max_len is not None and not 1 <= len(value) <= max_len:
        raise SimulatorError(400, f"{name} must be 1..{max_len} characters")
    return value


def _enum(body: dict[str, Any], name: str, allowed: tuple[str, ...]) -> str:
    value = body[name]
    if value not in allowed:
        raise SimulatorError(400, f"{name} must be one of {', '.join(allowed)}")
    return value


def _uuid_text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not UUID_TEXT.match(value):
        raise SimulatorError(400, f"{name} must be a UUID")
    return value.lower()


def _datetime(body: dict[str, Any], name: str) -> datetime:
    parsed = parse_datetime(body[name])
    if parsed is None:
        raise SimulatorError(400, f"{name} must be an ISO 8601 date-time with an offset, e.g. 2026-01-01T08:00:00Z")
    return parsed


_DURATION = re.compile(r"^P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)(?:\.(\d{1,9}))?S)?)?$")


def parse_duration(value: Any) -> timedelta | None:
    """An ISO 8601 duration in `java.time.Duration` form (`P8D`, `PT24H`, `P1DT12H`); None if not one."""
    if not isinstance(value, str):
        return None
    m = _DURATION.match(value)
    if not m or value in ("P", "PT") or value.endswith("T"):
        return None
    days, hours, minutes, whole, fraction = m.groups()
    try:
        return timedelta(days=int(days or 0), hours=int(hours or 0), minutes=int(minutes or 0),
                         seconds=int(whole or 0), microseconds=int((fraction or "0").ljust(6, "0")[:6]))
    except OverflowError:
        return None


def format_duration(value: timedelta) -> str:
    """Canonical form: whole days as `P8D`, otherwise `P1DT12H`, `PT90M` → `PT1H30M`."""
    days, rest = value.days, value - timedelta(days=value.days)
    hours, remainder = divmod(int(rest.total_seconds()), 3600)
    minutes, seconds = divmod(remainder, 60)
    text = f"P{days}D" if days else "P"
    time_part = "".join(f"{n}{unit}" for n, unit in ((hours, "H"), (minutes, "M")) if n)
    if seconds or rest.microseconds:
        fraction = f".{rest.microseconds:06d}".rstrip("0") if rest.microseconds else ""
        time_part += f"{seconds}{fraction}S"
    if time_part:
        text += "T" + time_part
    return text if text != "P" else "PT0S"


def _duration(body: dict[str, Any], name: str, default: str, low: timedelta, high: timedelta,
              *, low_inclusive: bool, bounds: str) -> str:
    parsed = parse_duration(body.get(name, default))
    if parsed is None:
        raise SimulatorError(400, f"{name} must be an ISO 8601 duration such as P8D or PT24H")
    if not (parsed >= low if low_inclusive else parsed > low) or parsed > high:
        raise SimulatorError(400, f"{name} must be {bounds}")
    return format_duration(parsed)


def _validate_permission(body: Any) -> dict[str, Any]:
    """The permission as stored and echoed, from a create or full-replace body."""
    body = json_object(body, {"permissionType", "userId", "lockingDeviceId", "operationType", "start", "end"},
                   {"operatingKeyValidityDuration"})
    permission_type = _enum(body, "permissionType", PERMISSION_TYPES)
    user_id = _uuid_text(body["userId"], "userId")
    device_id = _uuid_text(body["lockingDeviceId"], "lockingDeviceId")
    operation = _enum(body, "operationType", OPERATION_TYPES)
    validity = _duration(body, "operatingKeyValidityDuration", KEY_VALIDITY_DEFAULT, KEY_VALIDITY_MIN,
                         KEY_VALIDITY_MAX, low_inclusive=True, bounds="between P1D and P31D")
    start, end = _datetime(body, "start"), _datetime(body, "end")
    if end <= start:
        raise SimulatorError(400, "end must be after start")
    return {"permissionType": permission_type, "userId": user_id, "lockingDeviceId": device_id,
            "operationType": operation, "operatingKeyValidityDuration": validity,
            "start": format_datetime(start), "end": format_datetime(end),
            "_endTs": end.timestamp()}  # the purge runs on every request: no parsing there


def _validate_patch(body: Any) -> str:
    """The new name from a JSON Patch; the vendor supports nothing but `replace /name`."""
    if not isinstance(body, list) or not body:
        raise SimulatorError(400, "JSON Patch body must be a non-empty array of operations")
    name = None
    for op in body:
        if not isinstance(op, dict) or set(op) != {"op", "path", "value"}:
            raise SimulatorError(400, "Each JSON Patch operation must have exactly op, path and value")
        if op["op"] != "replace" or op["path"] != "/name":
            raise SimulatorError(400, "Only the operation replace on path /name is supported")
        name = _string(op, "value", max_len=NAME_MAX)
    assert name is not None
    return name


# ------------------------------------------------------------------------------------------ simulator

class AbloySimulator(Simulator):
    """The Abloy Keyless Administration API v2, in memory, optionally persisted to `store_path`.

    - `store_path`: the store (`common.LogStore`), loaded when it exists (seeded only when new); each change is appended.
    - `clock`: the vendor's time (token expiry, invitation expiry, purge, gateway activation).
    - `rate_limit`: requests per rolling second before 429 with Retry-After; None = unlimited.
    - `token_ttl`: seconds a login token lives. `seed=False`: only the administrator, no devices or users.
    - `base_path`: the prefix before the API's paths; "" finds it by itself. `monotonic`: the rate
      limiter's clock (tests).

    Hooks for tests and demos (Python, not HTTP): `credentials`, `add_user` (somebody else's create),
    `invitations`, `accept_invitation`, `claim_locking_device`, `expire_tokens`, `set_clock`/`advance`, `requests`/`reset_log`/`count`,
    `faults` (see `common.FaultInjector`).
    """

    routes: ClassVar[tuple[Route, ...]] = ROUTES
    store_format, store_version = STORE_FORMAT, STORE_VERSION
    gateway_activation_delay: timedelta | None = GATEWAY_ACTIVATION_DELAY  # None: gateways never activate

    def __init__(self, store_path: Path | None = None, *, clock: Callable[[], datetime] = utc_now,
                 rate_limit: int | None = None, token_ttl: int = 3600, seed: bool = True,
                 base_path: str = "", monotonic: Callable[[], float] = time.monotonic):
        self.token_ttl = token_ttl
        self._purge_floor = float("-inf")   # unknown until the first scan
        self._verified: dict[str, dict[str, Any]] = {}   # token → its claims, once its signature checked
        self._seed = seed
        super().__init__(store_path, clock=clock, rate_limit=rate_limit, base_path=base_path,
                         monotonic=monotonic)
        self._tokens = PageTokens(bytes.fromhex(self.state["secret"]))

    # ------------------------------------------------------------------------------------ store
    def new_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": STORE_FORMAT, "version": STORE_VERSION,
            # Random per store: page tokens and JWTs from another sandbox are "not issued by this one".
            "secret": secrets.token_bytes(32).hex(), "tokenGeneration": 0, "seq": 0, "apiKey": API_KEY,
            "users": {}, "invitations": {}, "operatingDevices": {}, "lockingDevices": {}, "permissions": {},
            "gatewayStock": {code: {"serialNumber": f"BGWA1DD2E{4 + i:05d}", "gatewayId": None}
                             for i, code in enumerate(GATEWAY_CLAIMING_CODES)},
            "gateways": {}, "associations": {}, "auditLog": {},
        }
        self._seed_into(state)
        return state

    def load_state(self, data: dict[str, Any]) -> dict[str, Any]:
        self._tokens = PageTokens(bytes.fromhex(data["secret"]))
        self._verified = {}                 # a store started over has another secret
        self._purge_floor = float("-inf")   # another process may have written permissions
        return data

    def _seed_into(self, state: dict[str, Any]) -> None:
        def add(table: str, record: dict[str, Any]) -> None:
            state["seq"] += 1
            state[table][record["id"]] = {**record, "_seq": state["seq"]}

        add("users", {"id": ADMIN_USER_ID, "role": "ADMIN", "_accessKeyHash": _hash_key(ADMIN_ACCESS_KEY)})
        if not self._seed:
            return
        for user_id in SEED_USERS.values():
            add("users", {"id": user_id, "role": "USER", "_accessKeyHash": _hash_key(secrets.token_urlsafe(32))})
        models = ("PADLOCK", "CYLINDER", "CONTROLLER", "PADLOCK", "CYLINDER", "CYLINDER", "CYLINDER", "CONTROLLER")
        for i, (name, device_id) in enumerate(SEED_DEVICES.items()):
            add("lockingDevices", {
                "id": device_id, "name": name, "claimingStatus": "CLAIMED", "serialNumber": f"BPLAD1{i + 1:05d}",
                "operationalCertificate": {"eligibleForReKeying": False,
                                           "expirationDatetime": "2028-07-16T08:00:00Z", "revoked": False},
                "manufacturingCertificate": {"eligibleForReKeying": False,
                                             "expirationDatetime": "2037-07-16T08:00:00Z", "revoked": False},
                "hardwareModel": models[i], "hardwareVersion": "3", "firmwareVersion": "1.4.2"})
        contractor = SEED_USERS["contractor"]
        phone_id = _seed_id("operating-device/contractor")
        # A legacy device (activated before API v2 invitations): the vendor deletes it only with its user.
        add("operatingDevices", {"id": phone_id, "userId": contractor, "_legacy": True})
        add("permissions", {
            "id": _seed_id("permission/contractor/gym"), "permissionType": "SINGLE_INTERVAL",
            "userId": contractor, "lockingDeviceId": SEED_DEVICES["Gym"], "operationType": "OPEN",
            "operatingKeyValidityDuration": "P8D", "start": "2025-01-01T00:00:00Z", "end": "2030-12-31T23:59:59Z",
            "_endTs": parse_datetime("2030-12-31T23:59:59Z").timestamp()})  # type: ignore[union-attr]
        for n, (device, event, when) in enumerate((
                ("Main Entrance", "unlock", "2025-03-03T07:58:12Z"), ("Main Entrance", "lock", "2025-03-03T07:58:40Z"),
                ("Gym", "unlock", "2025-03-04T18:30:05Z"))):
            add("auditLog", {
                "id": _seed_id(f"audit/{n}"), "lockingDeviceId": SEED_DEVICES[device], "eventName": event,
                "occurrenceDatetime": when, "sequenceNumber": n,
                "client": {"type": "OPERATING_DEVICE", "operatingDeviceId": phone_id, "userId": contractor},
                "granted": True})

    def _insert(self, table: str, record: dict[str, Any]) -> dict[str, Any]:
        self.state["seq"] += 1
        seq = self.state["seq"]
        # Deterministic ids (a counter that persists with the store) keep demo output reproducible.
        record = {"id": str(uuid.uuid5(_NS, f"{table}/{seq}")), **record, "_seq": seq}
        self.state[table][record["id"]] = record
        self.mark_changed(table, record["id"])
        return record

    def _delete_where(self, table: str, predicate: Callable[[dict[str, Any]], bool]) -> int:
        doomed = [key for key, record in self.state[table].items() if predicate(record)]
        for key in doomed:
            del self.state[table][key]
            self.mark_changed(table, key)
        return len(doomed)

    def _get(self, table: str, raw_id: str, name: str = "id") -> dict[str, Any]:
        record = self.state[table].get(_uuid_text(raw_id, name))
        if record is None:
            raise SimulatorError(404, "Resource not found")
        return record

    def _maintain(self) -> None:
        """The vendor's background work, done lazily before each request, by the simulator clock."""
        now = self.now()
        horizon = (now - PERMISSION_RETENTION).timestamp()
        # `_purge_floor` is at most the earliest end of any stored permission (every write lowers it), so
        # the scan runs only when something may be due: a full scan per request made large fleets quadratic.
        if self._purge_floor < horizon:
            purged = self._delete_where("permissions", lambda p: p["_endTs"] < horizon)
            if purged:
                logger.debug("sandbox abloy purged past permissions count=%d", purged)
            self._purge_floor = min((p["_endTs"] for p in self.state["permissions"].values()), default=float("inf"))
        if self.gateway_activation_delay is None:
            return
        for gateway in self.state["gateways"].values():
            created = parse_datetime(gateway["creationDatetime"])
            if created is None:
                continue
            activated_at = created + self.gateway_activation_delay
            if gateway["activationStatus"] == "PENDING_ACTIVATION" and now >= activated_at:
                gateway.update(activationStatus="ACTIVATED", activationDatetime=format_datetime(activated_at),
                               hardwareModel="BEAT_GW_A1", hardwareVersion="1.0.0", firmwareVersion="1.2.0")
                self.mark_changed("gateways", gateway["id"])

    # ------------------------------------------------------------------------------------ HTTP
    def dispatch(self, request: httpx.Request, match: RouteMatch) -> httpx.Response:
        if not hmac.compare_digest(request.headers.get("x-api-key", "").encode(), self.state["apiKey"].encode()):
            raise SimulatorError(403, "Missing or invalid API key")
        if request.headers.get("accept", "").strip() != MEDIA_TYPE:
            raise SimulatorError(406, f"Accept must be {MEDIA_TYPE}")
        route = self.route_of(request, match)
        self._maintain()
        caller = self._authenticate(request) if route.auth else None
        body = read_json_body(request, route.body) if route.body else None
        handler: Callable[[_Call], httpx.Response] = getattr(self, f"_op_{route.handler}")
        return handler(_Call(request, match.params, body, caller))

    def _stamp(self) -> datetime:
        """Now, in whole seconds, as the vendor's timestamps are."""
        return self.now().replace(microsecond=0)

    def _ok(self, body: Any, status: int = 200) -> httpx.Response:
        return json_response(status, body, content_type=MEDIA_TYPE)

    def _no_content(self) -> httpx.Response:
        return httpx.Response(204)

    def _page(self, call: _Call, table: str, scope: str,
              predicate: Callable[[dict[str, Any]], bool]) -> httpx.Response:
        limit = parse_limit(call.query("limit"), default=PAGE_DEFAULT, maximum=PAGE_MAX)
        items, next_token = paginate(
            self.view(table, _by_seq, "seq"), where=predicate,
            limit=limit, token=call.query("next-page-token"), scope=scope, tokens=self._tokens)
        body: dict[str, Any] = {"items": [_public(r) for r in items]}
        if next_token:
            body["nextPageToken"] = next_token
        return self._ok(body)

    def _filter_uuid(self, call: _Call, name: str) -> str | None:
        raw = call.query(name)
        return None if raw is None else _uuid_text(raw, name)

    # --- auth
    def _authenticate(self, request: httpx.Request) -> str:
        """The calling administrator's user id, or 401."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise SimulatorError(401, "Missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        # A token's signature is verified once (its claims kept); generation, user and expiry every time.
        claims = self._verified.get(token.strip())
        if claims is None:
            try:
                claims = jwt.decode(token.strip(), bytes.fromhex(self.state["secret"]), algorithms=["HS256"],
                                    issuer=TOKEN_ISSUER,
                                    # expiry is judged by the simulator clock below, not the host's
                                    options={"verify_exp": False, "verify_iat": False,
                                             "require": ["sub", "iat", "exp"]})
            except jwt.PyJWTError:
                raise SimulatorError(401, "Invalid token", headers={"WWW-Authenticate": "Bearer"}) from None
            if len(self._verified) >= 256:
                self._verified.clear()
            self._verified[token.strip()] = claims
        if claims.get("gen") != self.state["tokenGeneration"] or claims["sub"] not in self.state["users"]:
            raise SimulatorError(401, "Invalid token", headers={"WWW-Authenticate": "Bearer"})
        if self.now().timestamp() >= claims["exp"]:
            raise SimulatorError(401, "Token expired", headers={"WWW-Authenticate": "Bearer"})
        return claims["sub"]

    def _op_login(self, call: _Call) -> httpx.Response:
        body = json_object(call.body, {"userId", "accessKey"})
        user_id, access_key = _string(body, "userId").lower(), _string(body, "accessKey")
        user = self.state["users"].get(user_id)
        if user is None or not hmac.compare_digest(user["_accessKeyHash"], _hash_key(access_key)):
            raise SimulatorError(401, "Invalid credentials")
        if user["role"] != "ADMIN":
            raise SimulatorError(403, "Only ADMIN users may use the Administration API")
        issued = int(self.now().timestamp())
        claims = {"sub": user_id, "iat": issued, "exp": issued + self.token_ttl, "iss": TOKEN_ISSUER,
                  "jti": secrets.token_hex(8), "gen": self.state["tokenGeneration"]}
        token = jwt.encode(claims, bytes.fromhex(self.state["secret"]), algorithm="HS256")
        return self._ok({"token": token})

    # --- users
    def _op_list_users(self, call: _Call) -> httpx.Response:
        return self._page(call, "users", "user", lambda r: True)

    def _op_create_user(self, call: _Call) -> httpx.Response:
        role = _enum(json_object(call.body, {"role"}), "role", ROLES)
        access_key = base64.b64encode(secrets.token_bytes(32)).decode()
        user = self._insert("users", {"role": role, "_accessKeyHash": _hash_key(access_key)})
        return self._ok({"id": user["id"], "accessKey": access_key, "role": role}, 201)

    def _op_get_user(self, call: _Call) -> httpx.Response:
        return self._ok(_public(self._get("users", call.params["user_id"], "user-id")))

    def _op_delete_user(self, call: _Call) -> httpx.Response:
        user = self._get("users", call.params["user_id"], "user-id")
        if user["id"] == call.caller:
            raise SimulatorError(409, "The authenticated user cannot delete itself")
        user_id = user["id"]
        del self.state["users"][user_id]
        self.mark_changed("users", user_id)
        for table in ("permissions", "operatingDevices", "invitations"):
            self._delete_where(table, lambda r: r["userId"] == user_id)
        return self._no_content()

    # --- operating devices and invitations
    def _op_invite(self, call: _Call) -> httpx.Response:
        body = json_object(call.body, {"userId", "deliveryMechanism"}, {"phoneNumber", "validityDuration", "format"})
        user_id = _uuid_text(body["userId"], "userId")
        mechanism = _enum(body, "deliveryMechanism", DELIVERY_MECHANISMS)
        if mechanism == "SMS" and "phoneNumber" not in body:
            raise SimulatorError(400, "phoneNumber is required for delivery mechanism SMS")
        phone = body.get("phoneNumber")
        if phone is not None and (not isinstance(phone, str) or not E164.match(phone)):
            raise SimulatorError(400, "phoneNumber must be in E.164 format, e.g. +4790000001")
        validity = _duration(body, "validityDuration", INVITATION_DEFAULT, timedelta(0), INVITATION_MAX,
                             low_inclusive=False, bounds="greater than 0 and at most P365D")
        invitation_format = _enum(body, "format", INVITATION_FORMATS) if "format" in body else "INVITATION_LINK"
        if user_id not in self.state["users"]:
            raise SimulatorError(404, f"User {user_id} not found")
        expires = self._stamp() + parse_duration(validity)  # type: ignore[operator]
        record = self._insert("invitations", {
            "userId": user_id, "deliveryMechanism": mechanism, "phoneNumber": phone, "format": invitation_format,
            "validityDuration": validity, "expirationDatetime": format_datetime(expires), "_status": "PENDING",
            "_code": secrets.token_hex(6).upper()})
        answer = {"id": record["id"], "expirationDatetime": record["expirationDatetime"]}
        if mechanism == "NONE":
            answer["invitationCode"] = record["_code"]
        return self._ok(answer, 201)

    def _op_revoke_invitation(self, call: _Call) -> httpx.Response:
        invitation = self._get("invitations", call.params["invitation_id"], "invitation-id")
        if invitation["_status"] == "ACCEPTED":
            raise SimulatorError(409, "An accepted invitation cannot be revoked")
        del self.state["invitations"][invitation["id"]]
        self.mark_changed("invitations", invitation["id"])
        return self._no_content()

    def _op_list_operating_devices(self, call: _Call) -> httpx.Response:
        user_id = self._filter_uuid(call, "user-id")
        return self._page(call, "operatingDevices", f"operating-device?user-id={user_id}",
                          lambda r: user_id is None or r["userId"] == user_id)

    def _op_delete_operating_device(self, call: _Call) -> httpx.Response:
        device = self._get("operatingDevices", call.params["operating_device_id"], "operating-device-id")
        if device.get("_legacy"):
            raise SimulatorError(409, "A legacy operating device can only be deleted by deleting its user")
        del self.state["operatingDevices"][device["id"]]
        self.mark_changed("operatingDevices", device["id"])
        return self._no_content()

    # --- locking devices
    def _op_list_locking_devices(self, call: _Call) -> httpx.Response:
        status, serial = call.query("claiming-status"), call.query("serial-number")
        if status is not None and status not in CLAIMING_STATUSES:
            raise SimulatorError(400, f"claiming-status must be one of {', '.join(CLAIMING_STATUSES)}")
        return self._page(call, "lockingDevices", f"locking-device?claiming-status={status}&serial-number={serial}",
                          lambda r: (status is None or r["claimingStatus"] == status)
                          and (serial is None or r.get("serialNumber") == serial))

    def _op_create_locking_device(self, call: _Call) -> httpx.Response:
        name = _string(json_object(call.body, {"name"}), "name", max_len=NAME_MAX)
        device = self._insert("lockingDevices", {"name": name, "claimingStatus": "UNCLAIMED"})
        return self._ok(_public(device), 201)

    def _op_get_locking_device(self, call: _Call) -> httpx.Response:
        return self._ok(_public(self._get("lockingDevices", call.params["locking_device_id"], "locking-device-id")))

    def _op_rename_locking_device(self, call: _Call) -> httpx.Response:
        name = _validate_patch(call.body)
        device = self._get("lockingDevices", call.params["locking_device_id"], "locking-device-id")
        device["name"] = name
        self.mark_changed("lockingDevices", device["id"])
        return self._no_content()

    def _op_delete_locking_device(self, call: _Call) -> httpx.Response:
        device_id = self._get("lockingDevices", call.params["locking_device_id"], "locking-device-id")["id"]
        del self.state["lockingDevices"][device_id]
        self.mark_changed("lockingDevices", device_id)
        # "Any entities associated with the deleted locking device will be removed automatically."
        for table in ("permissions", "associations", "auditLog"):
            self._delete_where(table, lambda r: r["lockingDeviceId"] == device_id)
        return self._no_content()

    # --- permissions
    def _check_permission_refs(self, permission: dict[str, Any]) -> None:
        if permission["userId"] not in self.state["users"]:
            raise SimulatorError(404, f"User {permission['userId']} not found")
        if permission["lockingDeviceId"] not in self.state["lockingDevices"]:
            raise SimulatorError(404, f"Locking device {permission['lockingDeviceId']} not found")

    def _op_list_permissions(self, call: _Call) -> httpx.Response:
        return self._page(call, "permissions", "permission", lambda r: True)

    def _op_create_permission(self, call: _Call) -> httpx.Response:
        permission = _validate_permission(call.body)
        self._purge_floor = min(self._purge_floor, permission["_endTs"])
        self._check_permission_refs(permission)
        return self._ok({"id": self._insert("permissions", permission)["id"]}, 201)

    def _op_get_permission(self, call: _Call) -> httpx.Response:
        return self._ok(_public(self._get("permissions", call.params["permission_id"], "permission-id")))

    def _op_update_permission(self, call: _Call) -> httpx.Response:
        existing = self._get("permissions", call.params["permission_id"], "permission-id")
        permission = _validate_permission(call.body)
        self._purge_floor = min(self._purge_floor, permission["_endTs"])
        self._check_permission_refs(permission)
        existing.update(permission)
        self.mark_changed("permissions", existing["id"])
        return self._no_content()

    def _op_delete_permission(self, call: _Call) -> httpx.Response:
        permission_id = self._get("permissions", call.params["permission_id"], "permission-id")["id"]
        del self.state["permissions"][permission_id]
        self.mark_changed("permissions", permission_id)
        return self._no_content()

    # --- gateways and associations
    def _op_claim_gateway(self, call: _Call) -> httpx.Response:
        code = _string(json_object(call.body, {"claimingCode"}), "claimingCode")
        stock = self.state["gatewayStock"].get(code)
        if stock is None or stock["gatewayId"] is not None:
            raise SimulatorError(409, "Unknown or already claimed claiming code")
        gateway = self._insert("gateways", {"serialNumber": stock["serialNumber"],
                                            "activationStatus": "PENDING_ACTIVATION",
                                            "creationDatetime": format_datetime(self._stamp()),
                                            "_claimingCode": code})
        stock["gatewayId"] = gateway["id"]
        self.mark_changed("gatewayStock", code)
        return self._ok(_public(gateway), 201)

    def _op_list_gateways(self, call: _Call) -> httpx.Response:
        return self._page(call, "gateways", "gateway-device", lambda r: True)

    def _op_get_gateway(self, call: _Call) -> httpx.Response:
        return self._ok(_public(self._get("gateways", call.params["gateway_device_id"], "gateway-device-id")))

    def _op_delete_gateway(self, call: _Call) -> httpx.Response:
        gateway = self._get("gateways", call.params["gateway_device_id"], "gateway-device-id")
        del self.state["gateways"][gateway["id"]]
        self.state["gatewayStock"][gateway["_claimingCode"]]["gatewayId"] = None
        self.mark_changed("gateways", gateway["id"])
        self.mark_changed("gatewayStock", gateway["_claimingCode"])
        self._delete_where("associations", lambda r: r["gatewayDeviceId"] == gateway["id"])
        return self._no_content()

    def _op_create_association(self, call: _Call) -> httpx.Response:
        body = json_object(call.body, {"gatewayDeviceId", "lockingDeviceId"})
        gateway_id = _uuid_text(body["gatewayDeviceId"], "gatewayDeviceId")
        device_id = _uuid_text(body["lockingDeviceId"], "lockingDeviceId")
        if gateway_id not in self.state["gateways"]:
            raise SimulatorError(404, f"Gateway device {gateway_id} not found")
        if device_id not in self.state["lockingDevices"]:
            raise SimulatorError(404, f"Locking device {device_id} not found")
        existing = [a for a in self.state["associations"].values() if a["gatewayDeviceId"] == gateway_id]
        if any(a["lockingDeviceId"] == device_id for a in existing):
            raise SimulatorError(409, "The locking device is already associated with this gateway device")
        if len(existing) >= MAX_ASSOCIATIONS_PER_GATEWAY:
            raise SimulatorError(409, f"A gateway device can have at most {MAX_ASSOCIATIONS_PER_GATEWAY} associations")
        association = self._insert("associations", {"gatewayDeviceId": gateway_id, "lockingDeviceId": device_id,
                                                    "creationDatetime": format_datetime(self._stamp())})
        return self._ok(_public(association), 201)

    def _op_list_associations(self, call: _Call) -> httpx.Response:
        gateway_id = self._filter_uuid(call, "gateway-device-id")
        return self._page(call, "associations", f"gateway-device-association?gateway-device-id={gateway_id}",
                          lambda r: gateway_id is None or r["gatewayDeviceId"] == gateway_id)

    def _op_get_association(self, call: _Call) -> httpx.Response:
        return self._ok(_public(self._get("associations", call.params["association_id"],
                                          "gateway-device-association-id")))

    def _op_delete_association(self, call: _Call) -> httpx.Response:
        association = self._get("associations", call.params["association_id"], "gateway-device-association-id")
        del self.state["associations"][association["id"]]
        self.mark_changed("associations", association["id"])
        return self._no_content()

    # --- audit log
    def _op_list_audit_log(self, call: _Call) -> httpx.Response:
        device_id = self._filter_uuid(call, "locking-device-id")
        raw_after, raw_seq = call.query("after-datetime"), call.query("sequence-number-greater-than")
        direction = call.query("sort-direction") or "ASC"
        after = parse_datetime(raw_after) if raw_after is not None else None
        if raw_after is not None and after is None:
            raise SimulatorError(400, "after-datetime must be an ISO 8601 date-time")
        if raw_seq is not None and not re.fullmatch(r"[0-9]+", raw_seq):
            raise SimulatorError(400, "sequence-number-greater-than must be an integer >= 0")
        if direction not in ("ASC", "DESC"):
            raise SimulatorError(400, "sort-direction must be ASC or DESC")
        limit = parse_limit(call.query("limit"), default=PAGE_DEFAULT, maximum=PAGE_MAX)

        def wanted(entry: dict[str, Any]) -> bool:
            return ((device_id is None or entry["lockingDeviceId"] == device_id)
                    and (after is None or _by_occurrence(entry)[0] > after.timestamp())
                    and (raw_seq is None or entry["sequenceNumber"] > int(raw_seq)))

        scope = f"locking-device-audit-log?{device_id}&{raw_after}&{raw_seq}&{direction}"
        items, next_token = paginate(
            self.view("auditLog", _by_occurrence, "occurrence"), where=wanted,
            limit=limit, token=call.query("next-page-token"), scope=scope, tokens=self._tokens,
            descending=direction == "DESC")
        body: dict[str, Any] = {"items": [_public(e) for e in items]}
        if next_token:
            body["nextPageToken"] = next_token
        return self._ok(body)

    # ------------------------------------------------------------------------------- admin hooks
    @property
    def credentials(self) -> dict[str, str]:
        """The seeded administrator's API credentials and the system's API key."""
        return {"user_id": ADMIN_USER_ID, "access_key": ADMIN_ACCESS_KEY, "api_key": self.state["apiKey"]}

    def add_user(self, role: str = "USER") -> str:
        """Somebody else (the helpdesk, another tool) creates a user in this system; returns its id."""
        with self.mutate():
            return self._insert("users", {"role": role, "_accessKeyHash": _hash_key(secrets.token_urlsafe(32))})["id"]

    def invitations(self) -> list[dict[str, Any]]:
        """Every invitation the system holds (the SMS codes sent), as the vendor's back office sees them."""
        with self.mutate():
            return [dict(i) for i in self.state["invitations"].values()]

    def accept_invitation(self, invitation_id: str) -> str:
        """The phone accepts an invitation (Mobile API): creates the operating device, returns its id."""
        with self.mutate():
            invitation = self.state["invitations"].get(invitation_id)
            if invitation is None:
                raise KeyError(f"no invitation {invitation_id}")
            if invitation["_status"] != "PENDING":
                raise ValueError(f"invitation {invitation_id} is {invitation['_status'].lower()}")
            if parse_datetime(invitation["expirationDatetime"]) <= self.now():  # type: ignore[operator]
                raise ValueError(f"invitation {invitation_id} has expired")
            if any(d["userId"] == invitation["userId"] for d in self.state["operatingDevices"].values()):
                raise ValueError(f"user {invitation['userId']} already has an operating device")
            invitation["_status"] = "ACCEPTED"
            self.mark_changed("invitations", invitation_id)
            device = self._insert("operatingDevices", {"userId": invitation["userId"], "_invitationId": invitation_id})
            return device["id"]

    def claim_locking_device(self, device_id: str, serial: str | None = None) -> str:
        """A phone claims the physical lock for this placeholder (Mobile API); returns the serial number."""
        with self.mutate():
            device = self.state["lockingDevices"].get(device_id)
            if device is None:
                raise KeyError(f"no locking device {device_id}")
            if device["claimingStatus"] != "UNCLAIMED":
                raise ValueError(f"locking device {device_id} is already claimed")
            serial = serial or f"BPLAD2{device['_seq']:05d}"
            claimed = self.now()
            device.update(
                claimingStatus="CLAIMED", serialNumber=serial,
                operationalCertificate={"eligibleForReKeying": False, "revoked": False,
                                        "expirationDatetime": format_datetime(claimed + timedelta(days=730))},
                manufacturingCertificate={"eligibleForReKeying": False, "revoked": False,
                                          "expirationDatetime": format_datetime(claimed + timedelta(days=3650))},
                hardwareModel="PADLOCK", hardwareVersion="3", firmwareVersion="1.4.2")
            self.mark_changed("lockingDevices", device_id)
            return serial

    def expire_tokens(self) -> None:
        """Invalidate every token issued so far (the next call with one gets 401)."""
        with self.mutate():
            self.state["tokenGeneration"] += 1     # a top-level scalar: written without a mark
