"""Simulator of the Sentry Interactive (Doordeck) API, vendor `sentry`.

`SentrySimulator.handle(request)` answers like the platform (API-SURFACE.md §5): email/password login,
ephemeral Ed25519 keys registered for a certificate chain issued by the simulator's own CA, and every
share, revocation and setting change as a signed operation (a compact JWS, `Content-Type: application/jwt`)
that is verified against the chain it issued and the key that was registered. The provider factory plugs
it into `httpx.MockTransport` for `url: sandbox`; `reconciler sandbox serve` mounts it under `/sentry`;
tests drive it directly and through its admin hooks (`set_offline`, `registered_keys`, `shares`, …).

Where the documents are silent, this module decides (and clients must cope with any of it):
- Errors are `{code, message}` with `code` the HTTP status. Order of checks: unknown path (404) / method
  (405), bearer token (401), lock visibility (404: a lock the caller has no role on does not exist for
  them), Content-Type (415), body (400), then for signed operations: the JWS (400 when it is not one),
  `alg`, chain, registered key, signature, `iss`/`sub` and the time window (403 each), a replayed `jti`
  (409), the caller's ADMIN role (403), the lock being online (503), the operation itself (400/404).
- A `jti` is spent as soon as its signature and claims hold, whatever the operation's fate; `jti` is
  required (the platform only recommends it; the reconciler always sends one). Spent ids are forgotten
  once their token has expired, since an expired token is refused anyway.
- `ephemeralKey` is the base64 of the raw 32-byte Ed25519 key (the vendor's JS SDKs) or of its X.509
  SubjectPublicKeyInfo DER (the JVM SDK); both are accepted. Certificates live 7 days.
- Lock `name`, `favourite` and `colour` are the calling user's view (the vendor documents `name` as the
  user's alias); a user without an alias sees `settings.defaultName`.
- ADD_USER for a user who already has access replaces role and window (API-SURFACE pins this). A share
  with yourself, or removing yourself, is 400. REMOVE_USER ignores listed users without access.
- Directory v1 (`{email}`) answers `{id, publicKey}`, 404 when unknown. v2 (`Accept:
  application/vnd.doordeck.api-v2+json`) takes several query keys, the identifier *types* of one person
  (`email`, `telephone`, `foreignKey`, each a string; document 000's "multiple query keys", as the
  vendor's public documentation describes them), and answers `[{id, email, publicKey}]`; a list of
  addresses is not a lookup shape the document names: 400. Sandbox people have emails only, so a
  telephone or foreign key finds nobody (404).
- The audit log is the caller's for locks they administer; v2 (Accept v2) gives issuer and subject and
  requires `start` and `end` (epoch seconds; 400 without them); v1 only the user id, filters optional;
  newest first.
- `/auth/certificate` answers 423 while the account still needs secondary authentication (the
  `require_secondary_auth` hook), as the platform does before it certifies a key.
- MUTATE_SETTING takes `unlockDuration` (whole seconds, 1..3600 pinned here), the one setting the
  documents give; anything else in the operation is 400.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
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
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from reconciler.sandbox.common import (
    UUID_TEXT,
    Route,
    RouteMatch,
    Simulator,
    SimulatorError,
    json_object,
    json_response,
    read_json_body,
    utc_now,
)

logger = logging.getLogger(__name__)

MEDIA_V2 = "application/vnd.doordeck.api-v2+json"
JSON = "application/json"
JWT_MEDIA = "application/jwt"

# The one endpoint table. `handler` names the `_op_<handler>` method below; `/device/shareable` comes
# before `/device/{lock_id}` so that it wins.
ROUTES: tuple[Route, ...] = (
    Route("POST", "/auth/token", "login", auth=False, body=JSON),
    Route("POST", "/auth/certificate", "register_key", body=JSON),
    Route("GET", "/device", "list_locks"),
    Route("GET", "/device/shareable", "shareable_locks"),
    Route("GET", "/device/{lock_id}", "get_lock"),
    Route("PUT", "/device/{lock_id}", "update_lock", body=JSON),
    Route("GET", "/device/{lock_id}/users", "lock_users"),
    Route("GET", "/device/{lock_id}/log", "lock_log"),
    Route("POST", "/device/{lock_id}/execute", "execute", body=JWT_MEDIA),
    Route("GET", "/user/{user_id}/log", "user_log"),
    Route("POST", "/directory/query", "directory_query", body=JSON),
)

ROLES = ("USER", "ADMIN")
MAX_BATCH = 25
LOOKUP_KEYS = frozenset({"email", "telephone", "foreignKey"})   # directory v2: identifier types of one person
MAX_LIFETIME = 60                      # seconds between iat and exp of a signed operation
CERTIFICATE_TTL = timedelta(days=7)
NAME_MAX = 255
COLOUR = re.compile(r"^#[0-9a-fA-F]{6}$")
TOKEN_ISSUER = "reconciler-sandbox/sentry"
STORE_FORMAT, STORE_VERSION = "reconciler-sandbox/sentry", 1
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")   # X.509 SubjectPublicKeyInfo header of Ed25519

# --- seed data: fixed, so that examples can adopt locks by id and tests can name people.
_NS = uuid.UUID("8f6b1f0e-5d8c-4c47-9a3e-1d2f7c9e4b21")


def _seed_id(name: str) -> str:
    return str(uuid.uuid5(_NS, name))


OPERATOR_EMAIL = "ops@example.com"
OPERATOR_PASSWORD = "sbx-" + hashlib.sha256(b"reconciler sandbox sentry operator").hexdigest()[:24]
OPERATOR_ID = _seed_id("user/operator")
# The lock the DESIGN example adopts keeps the id printed there.
SEED_LOCKS: dict[str, str] = {
    "Meeting Room": "3f1c9a52-0e7b-4d2e-9b1a-5f0c2d7e8a11",   # batch sharing, operator ADMIN
    "Front Door": _seed_id("lock/front-door"),                # no batch sharing, operator ADMIN
    "Server Room": _seed_id("lock/server-room"),              # batch sharing, operator ADMIN
    "Storage": _seed_id("lock/storage"),                      # no batch sharing, operator ADMIN
    "Roof Hatch": _seed_id("lock/roof-hatch"),                # batch sharing, operator only a USER
}
BATCH_CAPABLE = frozenset({"Meeting Room", "Server Room", "Roof Hatch"})
# The directory: the demo organisation, three outsiders, and 30 staff for large shares.
_NAMED = ("alice", "bob", "carol", "dag", "eva", "frode", "guro", "henrik", "ingrid", "jonas", "kari", "lars",
          "mallory", "victor", "heidi")
SEED_PEOPLE: dict[str, str] = {f"{name}@example.com": _seed_id(f"user/{name}") for name in _NAMED}
SEED_PEOPLE.update({f"staff{n:02d}@example.com": _seed_id(f"user/staff{n:02d}") for n in range(1, 31)})


def _person_key(email: str) -> str:
    """A person's long-term public key (base64 SPKI DER), derived from the email so seeds are fixed."""
    private = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"sentry person {email}".encode()).digest())
    return base64.b64encode(private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()


def _hash_password(password: str) -> str:
    return hashlib.sha256(f"sentry-sandbox:{password}".encode()).hexdigest()


def _display_name(email: str) -> str:
    return email.split("@", 1)[0].replace(".", " ").title()


@dataclass
class _Call:
    request: httpx.Request
    params: dict[str, str]
    caller: str | None

    def query(self, name: str) -> str | None:
        return self.request.url.params.get(name)

    @property
    def v2(self) -> bool:
        return MEDIA_V2 in self.request.headers.get("accept", "")


def _uuid(value: Any, name: str) -> str:
    if not isinstance(value, str) or not UUID_TEXT.match(value):
        raise SimulatorError(400, f"{name} must be a UUID")
    return value.lower()


def _epoch(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SimulatorError(400, f"{name} must be a Unix timestamp in seconds or null")
    return value


def _public_key_bytes(text: Any) -> bytes:
    """The raw 32-byte Ed25519 key from base64 of the raw key or of its SubjectPublicKeyInfo DER."""
    if not isinstance(text, str):
        raise SimulatorError(400, "ephemeralKey must be a base64 string")
    try:
        raw = base64.b64decode(text.encode(), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise SimulatorError(400, "ephemeralKey is not valid base64") from None
    if len(raw) == 44 and raw.startswith(_SPKI_PREFIX):
        raw = raw[len(_SPKI_PREFIX):]
    if len(raw) != 32:
        raise SimulatorError(400, "ephemeralKey must be an Ed25519 public key")
    return raw


# ------------------------------------------------------------------------------------------ simulator

class SentrySimulator(Simulator):
    """The Sentry Interactive (Doordeck) API, in memory, optionally persisted to `store_path`.

    - `clock`: the platform's time (token and certificate expiry, the signed-operation window).
    - `rate_limit`: requests per rolling second before 429 with Retry-After; None = unlimited.
    - `token_ttl`: seconds an auth token lives. `base_path`: "" finds the API's prefix by itself.

    Admin hooks (Python, not HTTP): `credentials`, `set_offline`, `registered_keys`, `shares`,
    `grant`, `expire_tokens`, `set_clock`/`advance`, `requests`/`reset_log`/`count`, `faults`.
    """

    routes: ClassVar[tuple[Route, ...]] = ROUTES
    store_format, store_version = STORE_FORMAT, STORE_VERSION

    def __init__(self, store_path: Path | None = None, *, clock: Callable[[], datetime] = utc_now,
                 rate_limit: int | None = None, token_ttl: int = 3600, base_path: str = "",
                 monotonic: Callable[[], float] = time.monotonic):
        self.token_ttl = token_ttl
        self._ca_key: Ed25519PrivateKey | None = None
        self._ca_der = b""
        super().__init__(store_path, clock=clock, rate_limit=rate_limit, base_path=base_path,
                         monotonic=monotonic)

    # ------------------------------------------------------------------------------------ store
    def new_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": STORE_FORMAT, "version": STORE_VERSION,
            # Random per store: tokens and certificates of another sandbox are "not issued here".
            "secret": secrets.token_bytes(32).hex(), "tokenGeneration": 0,
            "users": {}, "locks": {}, "log": [], "jtis": {},
        }
        self._seed_into(state)
        self._load_ca(state)
        return state

    def load_state(self, data: dict[str, Any]) -> dict[str, Any]:
        self._load_ca(data)
        return data

    def _load_ca(self, state: dict[str, Any]) -> None:
        """The CA that signs ephemeral-key certificates, derived from the store secret so that every
        process serving this store issues and verifies with the same one (Ed25519 signing is
        deterministic, so the certificate comes out byte for byte the same)."""
        seed = hashlib.sha256(bytes.fromhex(state["secret"]) + b"ca").digest()
        self._ca_key = Ed25519PrivateKey.from_private_bytes(seed)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Sentry Interactive Sandbox CA")])
        certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                       .public_key(self._ca_key.public_key()).serial_number(1)
                       .not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
                       .not_valid_after(datetime(2100, 1, 1, tzinfo=UTC))
                       .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                       .sign(self._ca_key, None))
        self._ca_der = certificate.public_bytes(serialization.Encoding.DER)

    def _seed_into(self, state: dict[str, Any]) -> None:
        users = state["users"]
        users[OPERATOR_ID] = {"id": OPERATOR_ID, "email": OPERATOR_EMAIL, "displayName": "Facilities Operator",
                              "publicKey": _person_key(OPERATOR_EMAIL), "_password": _hash_password(OPERATOR_PASSWORD),
                              "_keys": {}}
        for email, user_id in SEED_PEOPLE.items():
            users[user_id] = {"id": user_id, "email": email, "displayName": _display_name(email),
                              "publicKey": _person_key(email), "_keys": {}}
        colours = {"Meeting Room": "#57355d", "Front Door": "#24bd9a", "Server Room": "#ffaacc",
                   "Storage": "#888888", "Roof Hatch": "#336699"}
        heidi, mallory, victor = (SEED_PEOPLE[f"{n}@example.com"] for n in ("heidi", "mallory", "victor"))
        for name, lock_id in SEED_LOCKS.items():
            members: dict[str, dict[str, Any]] = {OPERATOR_ID: {"role": "ADMIN", "start": None, "end": None}}
            if name == "Roof Hatch":
                members = {heidi: {"role": "ADMIN", "start": None, "end": None},
                           OPERATOR_ID: {"role": "USER", "start": None, "end": None}}
            if name == "Meeting Room":
                members[mallory] = {"role": "USER", "start": None, "end": None}
            if name == "Front Door":
                members[victor] = {"role": "USER", "start": 1735689600, "end": 1893456000}   # 2025..2030
            state["locks"][lock_id] = {
                "id": lock_id, "connected": True, "locked": True,
                "settings": {"unlockTime": 5, "defaultName": name, "permittedAddresses": [], "usageRequirements": {},
                             "capabilities": {
                                 "BATCH_SHARING_25": "SUPPORTED" if name in BATCH_CAPABLE else "UNSUPPORTED",
                                 "CONSOLE_UNLOCK": "UNSUPPORTED", "TIME_RESTRICTIONS": "SUPPORTED"}},
                "_users": members,
                "_prefs": {OPERATOR_ID: {"colour": colours[name], "favourite": name == "Meeting Room"}},
            }
        operator = OPERATOR_ID
        seeded = (
            ("Meeting Room", 1741000000, "LOCK_SHARED", operator, mallory, None),
            ("Meeting Room", 1741003092, "DOOR_UNLOCK", operator, None, None),
            ("Meeting Room", 1741003120, "DOOR_LOCK", None, None, None),
            ("Meeting Room", 1741086000, "DOOR_UNLOCK", mallory, None, "outside permitted hours"),
            ("Front Door", 1741089005, "DOOR_UNLOCK", victor, None, None),
            ("Front Door", 1741089030, "DOOR_LOCK", None, None, None),
        )
        for lock, stamp, kind, issuer, subject, rejected in seeded:
            state["log"].append({"deviceId": SEED_LOCKS[lock], "timestamp": stamp, "type": kind, "issuer": issuer,
                                 "subject": subject, "rejected": rejected is not None, "rejectionReason": rejected})

    # ------------------------------------------------------------------------------------ HTTP
    def render_error(self, error: SimulatorError) -> httpx.Response:
        return json_response(error.status, {"code": error.status, "message": error.detail}, headers=error.headers)

    def dispatch(self, request: httpx.Request, match: RouteMatch) -> httpx.Response:
        route = self.route_of(request, match)
        caller = self._authenticate(request) if route.auth else None
        handler: Callable[[_Call], httpx.Response] = getattr(self, f"_op_{route.handler}")
        return handler(_Call(request, match.params, caller))

    def _now(self) -> float:
        return self.now().timestamp()

    def _authenticate(self, request: httpx.Request) -> str:
        """The calling user's id, or 401."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise SimulatorError(401, "Missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        try:
            claims = jwt.decode(token.strip(), bytes.fromhex(self.state["secret"]), algorithms=["HS256"],
                                issuer=TOKEN_ISSUER, options={"verify_exp": False, "verify_iat": False,
                                                              "require": ["sub", "iat", "exp"]})
        except jwt.PyJWTError:
            raise SimulatorError(401, "Invalid auth token", headers={"WWW-Authenticate": "Bearer"}) from None
        if (claims.get("gen") != self.state["tokenGeneration"] or claims.get("refresh")
                or claims["sub"] not in self.state["users"]):
            raise SimulatorError(401, "Invalid auth token", headers={"WWW-Authenticate": "Bearer"})
        if self._now() >= claims["exp"]:
            raise SimulatorError(401, "Auth token expired", headers={"WWW-Authenticate": "Bearer"})
        return claims["sub"]

    def _token(self, user: dict[str, Any], *, refresh: bool) -> str:
        issued = int(self._now())
        ttl = self.token_ttl * (24 if refresh else 1)
        claims = {"sub": user["id"], "email": user["email"], "iat": issued, "exp": issued + ttl,
                  "iss": TOKEN_ISSUER, "session": secrets.token_hex(8), "refresh": refresh,
                  "gen": self.state["tokenGeneration"]}
        return jwt.encode(claims, bytes.fromhex(self.state["secret"]), algorithm="HS256")

    def _find_lock(self, call: _Call) -> tuple[dict[str, Any], str]:
        """The lock in the path and the caller's role on it; 404 when the caller has none."""
        lock = self.state["locks"].get(_uuid(call.params["lock_id"], "lock id"))
        member = lock["_users"].get(call.caller) if lock is not None else None
        if lock is None or member is None:
            raise SimulatorError(404, "Lock not found")
        return lock, member["role"]

    def _admin(self, call: _Call) -> dict[str, Any]:
        lock, role = self._find_lock(call)
        if role != "ADMIN":
            raise SimulatorError(403, "You are not an administrator of this lock")
        return lock

    def _view(self, lock: dict[str, Any], user_id: str) -> dict[str, Any]:
        """A lock as `user_id` sees it."""
        member = lock["_users"][user_id]
        prefs = lock["_prefs"].get(user_id, {})
        settings = lock["settings"]
        return {"id": lock["id"], "name": prefs.get("name") or settings["defaultName"],
                "colour": prefs.get("colour"), "favourite": bool(prefs.get("favourite", False)),
                "role": member["role"], "start": member["start"], "end": member["end"],
                "settings": json.loads(json.dumps(settings)),
                "state": {"locked": lock["locked"], "connected": lock["connected"], "duration": settings["unlockTime"]},
                "unlockTime": settings["unlockTime"], "unlockForever": False}

    # --- auth
    def _op_login(self, call: _Call) -> httpx.Response:
        body = json_object(read_json_body(call.request, JSON), {"email", "password"})
        email, password = body["email"], body["password"]
        if not isinstance(email, str) or not isinstance(password, str):
            raise SimulatorError(400, "email and password must be strings")
        user = next((u for u in self.state["users"].values() if u["email"].lower() == email.lower()), None)
        if user is None or "_password" not in user or not hmac.compare_digest(user["_password"],
                                                                               _hash_password(password)):
            raise SimulatorError(401, "Invalid email or password")
        answer = {"authToken": self._token(user, refresh=False)}
        if call.v2:
            answer["refreshToken"] = self._token(user, refresh=True)
        return json_response(200, answer)

    def _op_register_key(self, call: _Call) -> httpx.Response:
        body = json_object(read_json_body(call.request, JSON), {"ephemeralKey"})
        raw = _public_key_bytes(body["ephemeralKey"])
        assert call.caller is not None and self._ca_key is not None
        if self.state["users"][call.caller].get("_secondaryAuth"):
            raise SimulatorError(423, "Secondary authentication required before a key can be certified")
        now = self.now().replace(microsecond=0)
        expires = now + CERTIFICATE_TTL
        issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Sentry Interactive Sandbox CA")])
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, call.caller)]))
                .issuer_name(issuer).public_key(Ed25519PublicKey.from_public_bytes(raw))
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=1)).not_valid_after(expires)
                .sign(self._ca_key, None))
        user = self.state["users"][call.caller]
        keys = {k: v for k, v in user["_keys"].items() if v > self._now()}
        keys[base64.b64encode(raw).decode()] = expires.timestamp()
        user["_keys"] = keys
        self.mark_changed("users", call.caller)
        chain = [base64.b64encode(leaf.public_bytes(serialization.Encoding.DER)).decode(),
                 base64.b64encode(self._ca_der).decode()]
        return json_response(200, {"certificateChain": chain, "userId": call.caller})

    # --- locks
    def _op_list_locks(self, call: _Call) -> httpx.Response:
        assert call.caller is not None
        return json_response(200, [self._view(lock, call.caller) for lock in self.state["locks"].values()
                                   if call.caller in lock["_users"]])

    def _op_shareable_locks(self, call: _Call) -> httpx.Response:
        assert call.caller is not None
        views = [self._view(lock, call.caller) for lock in self.state["locks"].values()
                 if lock["_users"].get(call.caller, {}).get("role") == "ADMIN"]
        return json_response(200, [{"id": v["id"], "name": v["name"]} for v in views])

    def _op_get_lock(self, call: _Call) -> httpx.Response:
        lock, _ = self._find_lock(call)
        assert call.caller is not None
        return json_response(200, self._view(lock, call.caller))

    def _op_update_lock(self, call: _Call) -> httpx.Response:
        lock, _ = self._find_lock(call)
        body = json_object(read_json_body(call.request, JSON), set(), {"name", "favourite", "colour"})
        if not body:
            raise SimulatorError(400, "Nothing to update: give name, favourite or colour")
        if "name" in body and (not isinstance(body["name"], str) or not 1 <= len(body["name"]) <= NAME_MAX):
            raise SimulatorError(400, f"name must be a string of 1..{NAME_MAX} characters")
        if "favourite" in body and not isinstance(body["favourite"], bool):
            raise SimulatorError(400, "favourite must be true or false")
        if "colour" in body and body["colour"] is not None and (
                not isinstance(body["colour"], str) or not COLOUR.match(body["colour"])):
            raise SimulatorError(400, "colour must be a hex colour such as #57355D")
        assert call.caller is not None
        lock["_prefs"].setdefault(call.caller, {}).update(body)
        self.mark_changed("locks", lock["id"])
        return httpx.Response(204)

    def _op_lock_users(self, call: _Call) -> httpx.Response:
        lock = self._admin(call)
        users = []
        for user_id, member in lock["_users"].items():
            user = self.state["users"][user_id]
            entry = {"userId": user_id, "email": user["email"], "publicKey": user["publicKey"],
                     "displayName": user["displayName"], "orphan": False, "role": member["role"]}
            entry.update({k: member[k] for k in ("start", "end") if member[k] is not None})
            users.append(entry)
        return json_response(200, users)

    # --- audit
    def _window(self, call: _Call, *, required: bool = False) -> tuple[float, float]:
        bounds = []
        for name, default in (("start", float("-inf")), ("end", float("inf"))):
            raw = call.query(name)
            if raw is None and required:
                raise SimulatorError(400, f"{name} is required (a Unix timestamp in seconds)")
            if raw is None:
                bounds.append(default)
            elif re.fullmatch(r"[0-9]+(\.[0-9]+)?", raw):
                bounds.append(float(raw))
            else:
                raise SimulatorError(400, f"{name} must be a Unix timestamp in seconds")
        if bounds[0] > bounds[1]:
            raise SimulatorError(400, "start must not be after end")
        return bounds[0], bounds[1]

    def _person(self, user_id: str | None, *, full: bool) -> dict[str, Any] | None:
        if user_id is None:
            return None
        user = self.state["users"].get(user_id, {})
        if not full:
            return {"userId": user_id}
        return {"userId": user_id, "email": user.get("email"), "displayName": user.get("displayName")}

    def _entries(self, call: _Call, wanted: Callable[[dict[str, Any]], bool], *,
                 window_required: bool = False) -> httpx.Response:
        start, end = self._window(call, required=window_required)
        rows = sorted((e for e in self.state["log"] if wanted(e) and start <= e["timestamp"] <= end),
                      key=lambda e: e["timestamp"], reverse=True)
        out = []
        for e in rows:
            if call.v2:
                item = {"deviceId": e["deviceId"], "timestamp": e["timestamp"], "type": e["type"],
                        "issuer": self._person(e["issuer"], full=True), "rejected": e["rejected"]}
                if e["subject"]:
                    item["subject"] = self._person(e["subject"], full=True)
                if e["rejectionReason"]:
                    item["rejectionReason"] = e["rejectionReason"]
            else:
                item = {"timestamp": e["timestamp"], "type": e["type"], "user": e["issuer"],
                        "message": e["type"].replace("_", " ").capitalize()}
            out.append(item)
        return json_response(200, out, content_type=MEDIA_V2 if call.v2 else JSON)

    def _op_lock_log(self, call: _Call) -> httpx.Response:
        lock = self._admin(call)
        return self._entries(call, lambda e: e["deviceId"] == lock["id"], window_required=call.v2)

    def _op_user_log(self, call: _Call) -> httpx.Response:
        user_id = _uuid(call.params["user_id"], "user id")
        if user_id not in self.state["users"]:
            raise SimulatorError(404, "User not found")
        administered = {lock_id for lock_id, lock in self.state["locks"].items()
                        if lock["_users"].get(call.caller, {}).get("role") == "ADMIN"}
        return self._entries(call, lambda e: e["deviceId"] in administered and user_id in (e["issuer"], e["subject"]))

    # --- directory
    def _op_directory_query(self, call: _Call) -> httpx.Response:
        by_email = {u["email"].lower(): u for u in self.state["users"].values()}
        if call.v2:
            body = json_object(read_json_body(call.request, JSON), set(), LOOKUP_KEYS)
            if not body:
                raise SimulatorError(400, f"Give at least one query key: {', '.join(sorted(LOOKUP_KEYS))}")
            for key, value in body.items():
                if not isinstance(value, str):
                    raise SimulatorError(400, f"{key} must be a string: one identifier of one person "
                                              "(several people are looked up one request each)")
            user = by_email.get(body["email"].lower()) if "email" in body else None
            if user is None:
                raise SimulatorError(404, "User not found")
            answer = [{"id": user["id"], "email": user["email"], "publicKey": user["publicKey"]}]
            return json_response(200, answer, content_type=MEDIA_V2)
        body = json_object(read_json_body(call.request, JSON), {"email"})
        email = body["email"]
        if not isinstance(email, str):
            raise SimulatorError(400, "email must be a string (v1; send Accept: " + MEDIA_V2 + " for a list)")
        user = by_email.get(email.lower())
        if user is None:
            raise SimulatorError(404, "User not found")
        return json_response(200, {"id": user["id"], "publicKey": user["publicKey"]})

    # --- signed operations
    def _op_execute(self, call: _Call) -> httpx.Response:
        lock, role = self._find_lock(call)
        content_type = call.request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != JWT_MEDIA:
            raise SimulatorError(415, f"Content-Type must be {JWT_MEDIA}")
        claims = self._verify(call.request.content, lock["id"], call.caller)
        if role != "ADMIN":
            raise SimulatorError(403, "You are not an administrator of this lock")
        if not lock["connected"]:
            raise SimulatorError(503, "Device offline")
        operation = claims.get("operation")
        kind = operation.get("type") if isinstance(operation, dict) else None
        assert call.caller is not None
        if kind == "ADD_USER":
            self._add_users(lock, call.caller, [json_object(operation, {"type", "user", "publicKey"},
                                                        {"role", "start", "end"})])
            return httpx.Response(204)
        if kind == "BATCH_ADD_USER":
            body = json_object(operation, {"type", "users"})
            if lock["settings"]["capabilities"].get("BATCH_SHARING_25") != "SUPPORTED":
                raise SimulatorError(400, "This lock does not support BATCH_ADD_USER (capability BATCH_SHARING_25)")
            users = body["users"]
            if not isinstance(users, list) or not 1 <= len(users) <= MAX_BATCH:
                raise SimulatorError(400, f"users must be a list of 1..{MAX_BATCH} shares")
            self._add_users(lock, call.caller, [json_object(u, {"user", "publicKey"}, {"role", "start", "end"})
                                                for u in users])
            return httpx.Response(204)
        if kind == "REMOVE_USER":
            body = json_object(operation, {"type", "users"})
            ids = body["users"]
            if not isinstance(ids, list) or not ids:
                raise SimulatorError(400, "users must be a non-empty list of user ids")
            ids = [_uuid(i, "user") for i in ids]
            if call.caller in ids:
                raise SimulatorError(400, "You cannot remove your own access")
            unknown = [i for i in ids if i not in self.state["users"]]
            if unknown:
                raise SimulatorError(404, f"User {unknown[0]} not found")
            for user_id in dict.fromkeys(ids):
                if lock["_users"].pop(user_id, None) is not None:
                    self._audit(lock, "LOCK_REVOKED", call.caller, user_id)
            self.mark_changed("locks", lock["id"])
            return httpx.Response(200)
        if kind == "MUTATE_SETTING":
            body = json_object(operation, {"type", "unlockDuration"})
            duration = body["unlockDuration"]
            if isinstance(duration, bool) or not isinstance(duration, int) or not 1 <= duration <= 3600:
                raise SimulatorError(400, "unlockDuration must be whole seconds between 1 and 3600")
            lock["settings"]["unlockTime"] = duration
            self.mark_changed("locks", lock["id"])
            return httpx.Response(200)
        raise SimulatorError(400, "operation.type must be one of ADD_USER, BATCH_ADD_USER, REMOVE_USER, MUTATE_SETTING")

    def _add_users(self, lock: dict[str, Any], caller: str, shares: list[dict[str, Any]]) -> None:
        """Validate every share first, then apply all: a batch succeeds or fails as a whole."""
        checked = []
        for share in shares:
            user_id = _uuid(share["user"], "user")
            user = self.state["users"].get(user_id)
            if user is None:
                raise SimulatorError(404, f"User {user_id} not found")
            if user_id == caller:
                raise SimulatorError(400, "You cannot share a lock with yourself")
            if share["publicKey"] != user["publicKey"]:
                raise SimulatorError(400, f"publicKey does not belong to user {user_id}")
            role = share.get("role") or "USER"
            if role not in ROLES:
                raise SimulatorError(400, f"role must be one of {', '.join(ROLES)}")
            start, end = _epoch(share.get("start"), "start"), _epoch(share.get("end"), "end")
            if start is not None and end is not None and end <= start:
                raise SimulatorError(400, "end must be after start")
            checked.append((user_id, {"role": role, "start": start, "end": end}))
        if len({user_id for user_id, _ in checked}) != len(checked):
            raise SimulatorError(400, "A user appears more than once in the batch")
        for user_id, member in checked:
            before = lock["_users"].get(user_id)
            lock["_users"][user_id] = member
            if before is None:
                self._audit(lock, "LOCK_SHARED", caller, user_id)
            elif before["role"] != member["role"]:
                self._audit(lock, "USER_PROMOTED" if member["role"] == "ADMIN" else "USER_DEMOTED", caller, user_id)
        self.mark_changed("locks", lock["id"])

    def _audit(self, lock: dict[str, Any], kind: str, issuer: str | None, subject: str | None) -> None:
        self.state["log"].append({"deviceId": lock["id"], "timestamp": round(self._now(), 3), "type": kind,
                                  "issuer": issuer, "subject": subject, "rejected": False, "rejectionReason": None})
        self.mark_appended("log")

    def _verify(self, content: bytes, lock_id: str, caller: str | None) -> dict[str, Any]:
        """The claims of a signed operation, once its chain, key, signature, claims and freshness hold."""
        try:
            token = content.decode("ascii").strip()
            header = jwt.get_unverified_header(token)
        except (UnicodeDecodeError, jwt.PyJWTError):
            raise SimulatorError(400, "The body must be a compact JWS") from None
        if header.get("alg") != "EdDSA":
            raise SimulatorError(403, "Only EdDSA signatures with a registered ephemeral key are accepted")
        certificate = self._check_chain(header.get("x5c"))
        subject = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        signer = str(subject[0].value) if subject else ""
        key = certificate.public_key()
        if not isinstance(key, Ed25519PublicKey):
            raise SimulatorError(403, "The certificate does not hold an Ed25519 key")
        raw = base64.b64encode(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
        registered = self.state["users"].get(signer, {}).get("_keys", {})
        if registered.get(raw, 0) <= self._now():
            raise SimulatorError(403, "The signing key is not registered (or its registration expired)")
        try:
            # Time claims are judged below by the simulator clock, not the host's.
            claims = jwt.decode(token, key, algorithms=["EdDSA"],
                                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                                         "verify_aud": False, "verify_iss": False, "verify_sub": False,
                                         "verify_jti": False})
        except jwt.InvalidSignatureError:
            raise SimulatorError(403, "Invalid signature") from None
        except jwt.PyJWTError:
            raise SimulatorError(400, "The body must be a compact JWS with a JSON payload") from None
        for name in ("iat", "nbf", "exp"):
            if isinstance(claims.get(name), bool) or not isinstance(claims.get(name), int):
                raise SimulatorError(400, f"Claim {name} must be a Unix timestamp in seconds")
        for name in ("iss", "sub", "jti"):
            if not isinstance(claims.get(name), str) or not claims[name]:
                raise SimulatorError(400, f"Claim {name} is required")
        if not isinstance(claims.get("operation"), dict):
            raise SimulatorError(400, "Claim operation must be an object")
        if claims["iss"].lower() != signer.lower():
            raise SimulatorError(403, "iss does not match the signing certificate")
        if claims["iss"].lower() != (caller or "").lower():
            raise SimulatorError(403, "iss is not the authenticated user")
        if claims["sub"].lower() != lock_id.lower():
            raise SimulatorError(403, "sub does not match the lock in the path")
        now = self._now()
        if claims["exp"] - claims["iat"] > MAX_LIFETIME:
            raise SimulatorError(403, f"A signed operation may be valid for at most {MAX_LIFETIME} seconds")
        if claims["exp"] <= now:
            raise SimulatorError(403, "The signed operation has expired")
        if claims["nbf"] > now or claims["iat"] > now:
            raise SimulatorError(403, "The signed operation is not valid yet")
        spent = {j: exp for j, exp in self.state["jtis"].items() if exp > now}
        if claims["jti"] in spent:
            raise SimulatorError(409, "This jti has already been used")
        spent[claims["jti"]] = claims["exp"]
        self.state["jtis"] = spent
        self.mark_changed("jtis")
        return claims

    def _check_chain(self, chain: Any) -> x509.Certificate:
        """The leaf of an `x5c` chain this platform issued, valid now; 403 otherwise."""
        if not isinstance(chain, list) or len(chain) != 2 or not all(isinstance(c, str) for c in chain):
            raise SimulatorError(403, "x5c must be the certificate chain returned by /auth/certificate")
        try:
            leaf = x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
            root = base64.b64decode(chain[1], validate=True)
        except (binascii.Error, ValueError):
            raise SimulatorError(403, "x5c holds an unreadable certificate") from None
        assert self._ca_key is not None
        if root != self._ca_der:
            raise SimulatorError(403, "The certificate chain was not issued by this platform")
        try:
            self._ca_key.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes)
        except InvalidSignature:
            raise SimulatorError(403, "The certificate was not issued by this platform") from None
        now = self.now()
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise SimulatorError(403, "The certificate is not valid at this time")
        return leaf

    # ------------------------------------------------------------------------------- admin hooks
    @property
    def credentials(self) -> dict[str, str]:
        """The seeded operator's login (what `CAPABILITIES.credentials` names)."""
        return {"email": OPERATOR_EMAIL, "password": OPERATOR_PASSWORD}

    def set_offline(self, lock_id: str, offline: bool = True) -> None:
        """Take a lock off the network (signed operations on it answer 503) or bring it back."""
        with self.mutate():
            lock = self.state["locks"][lock_id]
            lock["connected"] = not offline
            self.mark_changed("locks", lock_id)
            self._audit(lock, "DEVICE_DISCONNECTED" if offline else "DEVICE_CONNECTED", None, None)

    def registered_keys(self, user_id: str = OPERATOR_ID) -> list[Ed25519PublicKey]:
        """The ephemeral public keys registered for a user (tests verify signatures with them)."""
        with self.mutate():
            keys = list(self.state["users"][user_id]["_keys"])
        return [Ed25519PublicKey.from_public_bytes(base64.b64decode(k)) for k in keys]

    def shares(self, lock_id: str) -> dict[str, dict[str, Any]]:
        """Who holds access to a lock: email → {role, start, end} (epoch seconds or None)."""
        with self.mutate():
            lock = self.state["locks"][lock_id]
            return {self.state["users"][u]["email"]: dict(m) for u, m in lock["_users"].items()}

    def grant(self, lock_id: str, email: str, role: str = "USER", start: int | None = None,
              end: int | None = None) -> None:
        """Someone shares a lock outside the reconciler (an app user, another admin)."""
        with self.mutate():
            user_id = next(u["id"] for u in self.state["users"].values() if u["email"] == email)
            lock = self.state["locks"][lock_id]
            lock["_users"][user_id] = {"role": role, "start": start, "end": end}
            self.mark_changed("locks", lock_id)
            self._audit(lock, "LOCK_SHARED", None, user_id)

    def require_secondary_auth(self, required: bool = True, user_id: str = OPERATOR_ID) -> None:
        """The account must pass secondary authentication before `/auth/certificate` certifies a key (423)."""
        with self.mutate():
            self.state["users"][user_id]["_secondaryAuth"] = required
            self.mark_changed("users", user_id)

    def expire_tokens(self) -> None:
        """Invalidate every auth token issued so far (the next call with one gets 401)."""
        with self.mutate():
            self.state["tokenGeneration"] += 1     # a top-level scalar: written without a mark

    @property
    def ca_certificate(self) -> bytes:
        """The DER of the CA that issues ephemeral-key certificates."""
        return self._ca_der
