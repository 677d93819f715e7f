"""Sentry Interactive (Doordeck) provider, vendor `sentry`: shares through signed operations.

Endpoints, field mapping and capabilities only; the workflow is `Provider`'s. A permission on a sentry
device is a share `(user, lock, role, start, end)`. People are found by email in the vendor's directory
(`/directory/query`, v1 `{email}`: one person per request, run concurrently; document 000's "multiple
query keys" of v2 are identifier types of one person, not a list of people); locks are adopted by id and
their unlock duration is set with a signed `MUTATE_SETTING`. Every change to a share is a signed
operation: a compact JWS (EdDSA) made with an Ed25519 key pair generated in memory for this run and
registered with `/auth/certificate`, whose private half never leaves this object (not in state, logs or
plans). Grants on locks with the `BATCH_SHARING_25` capability go 25 to a `BATCH_ADD_USER`, elsewhere
one `ADD_USER` each; all revocations of a lock are one `REMOVE_USER` (`batches`/`apply_batch`).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, NotRequired

import httpx
from pydantic import ConfigDict, Field, TypeAdapter
from typing_extensions import TypedDict

from reconciler.errors import VendorError
from reconciler.plan import Action, Change
from reconciler.providers.answers import Id, NotInEffect, adapter, error_body, fault, model, parse, unique
from reconciler.providers.base import Event, HandlerTable, Provider, ReadResult
from reconciler.providers.http import HttpClient, token_lifetime
from reconciler.resources import (
    Attribute,
    Capabilities,
    Kind,
    KindSchema,
    Resource,
    address_of,
    format_time,
    parse_time,
    unknown_name,
)

log = logging.getLogger(__name__)


# The answers' shapes: strict on what the tool relies on, lenient on the rest.
class _Settings(TypedDict):
    __pydantic_config__ = ConfigDict(extra="allow")   # type: ignore[misc]
    capabilities: NotRequired[dict[str, Any] | None]


class _Lock(TypedDict):
    __pydantic_config__ = ConfigDict(extra="allow")   # type: ignore[misc]
    id: Id
    role: NotRequired[str | None]
    settings: NotRequired[_Settings | None]


# Epoch seconds as the platform gives them: a number that is a date (not a string, not past year 9999).
Epoch = Annotated[float, Field(ge=0, le=253402300799)]


class _Member(TypedDict):
    __pydantic_config__ = ConfigDict(extra="allow")   # type: ignore[misc]
    userId: Id
    start: NotRequired[Epoch | None]
    end: NotRequired[Epoch | None]
    role: NotRequired[str | None]
    email: NotRequired[str | None]


LOCKS: TypeAdapter[Any] = TypeAdapter(list[_Lock])
MEMBERS: TypeAdapter[Any] = TypeAdapter(list[_Member])
LOCK: TypeAdapter[Any] = TypeAdapter(_Lock)
LOGIN = adapter(model("Login", {"authToken": str, "refreshToken": str | None}, optional=("refreshToken",)))
CERTIFICATE = adapter(model("Certificate", {"certificateChain": list[str], "userId": Id}))
PERSON = adapter(model("Person", {"id": Id, "publicKey": str | None}, optional=("publicKey",)))
ENTRY = model("Entry", {"timestamp": Epoch | None, "type": str | None, "rejected": bool | None,
                        "rejectionReason": str | None, "issuer": dict[str, Any] | None, "subject": dict[str, Any] | None},
              optional=("timestamp", "type", "rejected", "rejectionReason", "issuer", "subject"))
LOG = adapter(list[ENTRY])    # type: ignore[valid-type]

MEDIA_V2 = "application/vnd.doordeck.api-v2+json"
JWT_MEDIA = "application/jwt"
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
BATCH_SIZE = 25                 # BATCH_ADD_USER takes at most 25
SIGNATURE_LIFETIME = 60         # seconds; the platform refuses signed operations valid for longer
READ_CONCURRENCY = 8
SEND_ATTEMPTS = 4               # signed operations: tries, each freshly signed, before giving up
RATE_LIMIT_WAITS = 6

PROPERTIES = ("name", "favourite", "colour")     # `PUT /device/{id}`; the unlock duration is a signed setting

# The one endpoint table (API-SURFACE §5): a path correction is a one-line change.
PATHS = {
    "login": "/auth/token",
    "certificate": "/auth/certificate",
    "locks": "/device",
    "lock": "/device/{id}",
    "lock_users": "/device/{id}/users",
    "lock_log": "/device/{id}/log",
    "execute": "/device/{id}/execute",
    "directory": "/directory/query",
}

CAPABILITIES = Capabilities(
    vendor="sentry",
    grant_kind=Kind.SHARE,
    needs_email=True,
    creates_devices=False,
    device_fields=frozenset({"name", "favourite", "colour", "unlock_duration"}),
    device_id_pattern=UUID_PATTERN,
    # Or an operator token as `token` instead; the policy checks require every name listed here, so
    # only the login pair is declared (see the provider's `_login`).
    credentials=frozenset({"email", "password"}),
    credential_sets=(frozenset({"email", "password"}), frozenset({"token"})),
    attributes={
        # No per-user weekly schedules on the platform; a share may be open-ended and has a role.
        Kind.SHARE: KindSchema({"start": Attribute(str), "end": Attribute(str, default=None),
                                "role": Attribute(str, default="USER", choices=frozenset({"USER", "ADMIN"}))}),
    },
)


def describe_error(response: httpx.Response) -> str:
    """`{code, message}` → `403: message`."""
    body = error_body(response)
    if isinstance(body, dict) and body.get("message"):
        return f"{response.status_code}: {body['message']}"
    return f"HTTP {response.status_code} {response.reason_phrase}".strip()


def _epoch(text: str | None) -> int | None:
    return None if text is None else int(parse_time(text).timestamp())


def _utc(seconds: Any) -> str | None:
    if seconds is None:
        return None
    return format_time(datetime.fromtimestamp(float(seconds), UTC))


class SentryProvider(Provider):
    capabilities = CAPABILITIES
    vendor = CAPABILITIES.vendor       # its name, stated once here; registered under it in pyproject.toml
    default_url = "https://api.doordeck.com"
    simulator = "reconciler.sandbox.sentry:SentrySimulator"
    credential_variables: ClassVar[Mapping[str, str]] = {"email": "SENTRY_EMAIL", "password": "SENTRY_PASSWORD"}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        secret = {k: v.reveal() for k, v in self.credentials.items()}
        self._token = secret.get("token")
        self._email = secret.get("email")
        self._password = secret.get("password")
        # Generated per run and held only here: never serialised, logged or written anywhere. (cryptography and JWT
        # are imported where a Sentry provider is built, not by validate or --help.)
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self._signing_key = Ed25519PrivateKey.generate()
        self._certificate: tuple[list[str], str] | None = None     # (x5c chain, acting user id)
        self._certificate_lock = threading.Lock()
        self._operator_ids: set[str] = set()
        self.locks: dict[str, dict[str, Any]] = {}                  # lock id → lock, from the last read
        self.directory: dict[str, dict[str, Any]] = {}              # lower-case email → {id, publicKey}

    def secrets(self) -> list[str]:
        return [self.credentials[n].reveal() for n in ("token", "password") if n in self.credentials]

    def http_headers(self) -> dict[str, str]:
        return {"Accept": "application/json"}

    def describe_error(self, response: httpx.Response) -> str:
        return describe_error(response)

    # -- auth ----------------------------------------------------------------------------------------
    def _login(self, http: HttpClient) -> tuple[dict[str, str], float | None]:
        if self._token:
            token = self._token      # an operator token from the environment: no login
        else:
            body = {"email": self._email, "password": self._password}
            try:
                response = http.request("POST", PATHS["login"], json=body, headers={"Accept": MEDIA_V2},
                                        idempotent=True, authenticated=False)
            except VendorError as exc:
                detail = str(exc).removeprefix(f"{self.name}: ")
                raise VendorError(f"{self.name}: login failed: {detail}", status=exc.status,
                                  temporary=exc.temporary) from None
            answer = parse(response, LOGIN, self.name)
            token = answer["authToken"]
            self.redactor.add(token)
            self.redactor.add(answer.get("refreshToken"))
        import jwt

        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            claims = {}   # not a JWT we can read: rely on the 401 → login-again path
        if claims.get("sub"):
            self._operator_ids.add(str(claims["sub"]).lower())
        return {"Authorization": f"Bearer {token}"}, token_lifetime(claims)

    def _ensure_certificate(self) -> tuple[list[str], str]:
        """Register this run's public key once; the answer is the chain for `x5c` and who we act as."""
        from cryptography.hazmat.primitives import serialization

        with self._certificate_lock:
            if self._certificate is None:
                public = self._signing_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                                    serialization.PublicFormat.Raw)
                response = self.http.request("POST", PATHS["certificate"], idempotent=True, expect=(423,),
                                             json={"ephemeralKey": base64.b64encode(public).decode()})
                if response.status_code == 423:
                    raise VendorError(self.redactor(
                        f"{self.name}: POST {PATHS['certificate']}: {describe_error(response)}; the operator "
                        "account must complete secondary authentication (verification code) before it can "
                        "sign operations; nothing was changed"), status=423)
                answer = parse(response, CERTIFICATE, self.name)
                chain, user_id = answer["certificateChain"], answer["userId"]
                if not chain:
                    raise fault(self.name, "POST", PATHS["certificate"], "certificateChain: an empty list")
                self._certificate = (list(chain), str(user_id))
                self._operator_ids.add(str(user_id).lower())
                log.info("signing key registered system=%s user=%s", self.name, user_id)
            return self._certificate

    def _sign(self, lock_id: str, operation: dict[str, Any]) -> str:
        import jwt

        chain, user_id = self._ensure_certificate()
        # The platform checks the window against its own clock, so it is taken from the platform's answers
        # (their `Date`); the session's clock only where the platform sends none.
        vendor_now = self.http.vendor_time()
        now = int(vendor_now if vendor_now is not None else self.clock().timestamp())
        claims = {"iss": user_id, "sub": lock_id, "iat": now, "nbf": now, "exp": now + SIGNATURE_LIFETIME,
                  "jti": str(uuid.uuid4()), "operation": operation}
        return jwt.encode(claims, self._signing_key, algorithm="EdDSA", headers={"typ": "JWT", "x5c": chain})

    def _send_signed(self, lock_id: str, operation: dict[str, Any]) -> None:
        """One signed operation. Every attempt is signed afresh (a new jti and window): the platform
        refuses a replayed jti, so a request is never repeated byte for byte."""
        path = PATHS["execute"].format(id=lock_id)
        headers = {"Content-Type": JWT_MEDIA}
        if operation.get("type") == "BATCH_ADD_USER":
            headers["Accept"] = MEDIA_V2
        for attempt in range(1, RATE_LIMIT_WAITS + 1):
            body = self._sign(lock_id, operation).encode()
            response = self.http.request("POST", path, content=body, headers=headers, idempotent=False,
                                         expect=(429, 503))
            if response.status_code == 503:
                raise VendorError(self.redactor(f"{self.name}: POST {path}: {describe_error(response)}"),
                                  status=503, temporary=True)
            if response.status_code != 429:
                return
            delay = min(60.0, 0.5 * 2 ** attempt)
            with contextlib.suppress(ValueError):
                delay = float(response.headers.get("Retry-After", delay))
            log.info("rate limited; signing again after the wait system=%s path=%s delay=%.2f",
                     self.name, path, delay)
            self.sleep(delay)
        raise VendorError(f"{self.name}: POST {path}: still rate limited after {RATE_LIMIT_WAITS} attempts",
                          status=429, temporary=True)

    def _execute(self, lock_id: str, operation: dict[str, Any], landed: Callable[[], bool]) -> None:
        """Send a signed operation; when its answer is lost or the lock is offline, look at the lock's
        users before sending again (every operation here is an upsert or a removal, so sending again
        after a look that shows it did not land can never duplicate anything)."""
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                self._send_signed(lock_id, operation)
                return
            except VendorError as exc:
                if not (exc.ambiguous or exc.status == 503):
                    raise
                if landed():
                    log.info("signed operation with lost answer had landed system=%s lock=%s", self.name, lock_id)
                    return
                if attempt == SEND_ATTEMPTS:
                    raise
                log.info("signed operation did not land; sending again system=%s lock=%s attempt=%d",
                         self.name, lock_id, attempt)
                self.sleep(min(8.0, 0.5 * 2 ** attempt))

    # -- reading -------------------------------------------------------------------------------------
    def read_live(self, desired: list[Resource]) -> ReadResult:
        result = ReadResult()
        listed = unique(parse(self.http.request("GET", PATHS["locks"]), LOCKS, self.name), system=self.name,
                        what=f"GET {PATHS['locks']}", fold=True)
        locks = {lock["id"].lower(): lock for lock in listed}
        self.locks = locks
        if not self._operator_ids and not self._email:
            # An opaque operator token names nobody; the key registration says who we act as, so that
            # our own membership of each lock is never taken for a share to revoke.
            self._ensure_certificate()
        device_names = self._names(Kind.DEVICE)
        shares = [r for r in desired if r.kind == Kind.SHARE]
        emails = sorted({str(r.meta["email"]).lower() for r in shares if r.meta.get("email")})
        managed = [lock_id for lock_id in locks if lock_id in device_names and locks[lock_id].get("role") == "ADMIN"]

        # The directory (one person per lookup) and the per-lock user lists (no bulk endpoint) at once.
        with ThreadPoolExecutor(READ_CONCURRENCY) as pool:
            found = pool.map(self._lookup, emails)
            members = dict(zip(managed, pool.map(self._lock_users, managed), strict=False))
            self.directory = {email: entry for email, entry in zip(emails, found, strict=False) if entry is not None}

        for lock_id, lock in locks.items():
            name = device_names.get(lock_id)
            add = result.resources.append
            add(Resource(self.name, Kind.DEVICE, name or unknown_name(lock_id), _lock_attributes(lock), id=lock_id,
                         managed=name is not None, meta={"role": lock.get("role"), "batch_sharing": _batch(lock)}))

        user_names = self._user_names(shares)
        operator_emails = {self._email.lower()} if self._email else set()
        for lock_id, users in members.items():
            device = device_names[lock_id]
            for item in users:
                uid = str(item.get("userId", "")).lower()
                if uid in self._operator_ids or str(item.get("email", "")).lower() in operator_emails:
                    continue    # the account we act as: never ours to revoke
                user = user_names.get(uid) or unknown_name(uid)
                result.resources.append(Resource(
                    self.name, Kind.SHARE, f"{user}/{device}",
                    {"start": _utc(item.get("start")), "end": _utc(item.get("end")), "role": item.get("role")},
                    id=uid, meta={"email": item.get("email")}))
        result.errors += self._check_shares(shares, locks, operator_emails)
        return result

    def _lookup(self, email: str) -> dict[str, Any] | None:
        """The directory entry `{id, publicKey}` of one email (v1), or None when nobody has it (404)."""
        response = self.http.request("POST", PATHS["directory"], json={"email": email}, idempotent=True,
                                     expect=(404,))
        if response.status_code == 404:
            return None
        return {**parse(response, PERSON, self.name), "email": email}

    def _lock_users(self, lock_id: str) -> list[dict[str, Any]]:
        path = PATHS["lock_users"].format(id=lock_id)
        return unique(parse(self.http.request("GET", path), MEMBERS, self.name), system=self.name,
                      what=f"GET {path}", key="userId", fold=True)

    def _names(self, kind: str) -> dict[str, str]:
        prefix = f"{self.name}/{kind}/"
        return {vid.lower(): address[len(prefix):] for address, vid in self.ids.items() if address.startswith(prefix)}

    def _user_names(self, shares: list[Resource]) -> dict[str, str]:
        """Vendor user id → policy user name: through the directory for declared people, through state
        for people this policy shared with before (so that their revocation reads by name)."""
        names: dict[str, str] = {}
        prefix = f"{self.name}/{Kind.SHARE}/"
        for address, record in self.state.items(prefix):
            # `id`: a share whose revocation was not in effect is recorded by its user id (`confirm_revoked`).
            user = record.get("user") or record.get("id")
            if user:
                names[str(user).lower()] = address[len(prefix):].split("/", 1)[0]
        for share in shares:
            entry = self.directory.get(str(share.meta.get("email", "")).lower())
            if entry:
                names[str(entry["id"]).lower()] = share.name.split("/", 1)[0]
        return names

    def _check_shares(self, shares: list[Resource], locks: dict[str, dict[str, Any]],
                      operator_emails: set[str]) -> list[str]:
        """Problems that make the plan impossible, one line per grant, naming user and device."""
        errors = []
        for share in sorted(shares, key=lambda r: r.address):
            user, device = share.name.split("/", 1)
            email = str(share.meta.get("email", ""))
            entry = self.directory.get(email.lower())
            lock_id = self.ids.get(address_of(self.name, Kind.DEVICE, device), "").lower()
            lock = locks.get(lock_id)
            if entry is None:
                errors.append(f"{share.address}: user '{user}' ({email}) has no Sentry Interactive account: "
                              "nobody with that email is in the directory")
            elif str(entry.get("id", "")).lower() in self._operator_ids or email.lower() in operator_emails:
                errors.append(f"{share.address}: user '{user}' is the account reconciler acts as; it cannot "
                              "share a lock with itself")
            if lock is None:
                errors.append(f"{share.address}: device '{device}' (lock {lock_id or '?'}) is not visible to the "
                              "operator account, so it cannot be shared")
            elif lock.get("role") != "ADMIN":
                errors.append(f"{share.address}: the operator account is not an ADMIN of device '{device}' "
                              f"(its role is {lock.get('role')}), so it cannot share it")
        return errors

    # -- locks ---------------------------------------------------------------------------------------
    def update_device(self, want: Resource, live: Resource, changed: tuple[str, ...]) -> None:
        body = {key: want.attributes[key] for key in changed if key in PROPERTIES}
        if body:
            self.http.request("PUT", PATHS["lock"].format(id=live.id), json=body)
        if "unlock_duration" in changed:
            seconds = int(want.attributes["unlock_duration"])
            lock_id = str(live.id).lower()

            def landed() -> bool:
                lock = parse(self.http.request("GET", PATHS["lock"].format(id=lock_id)), LOCK, self.name)
                return _unlock_duration(lock) == seconds
            self._execute(lock_id, {"type": "MUTATE_SETTING", "unlockDuration": seconds}, landed)

    # -- shares --------------------------------------------------------------------------------------
    def batches(self, changes: list[Change]) -> list[list[Change]]:
        """Revocations: one unit per lock (one REMOVE_USER). Grants: chunks of 25 per lock that can
        batch, else one unit each. Everything else: one change per unit."""
        units: list[list[Change]] = []
        revokes: dict[str, list[Change]] = defaultdict(list)
        grants: dict[str, list[Change]] = defaultdict(list)
        for change in changes:
            lock_id = self._lock_of(change.resource) if change.kind == Kind.SHARE else None
            if lock_id is None:
                units.append([change])      # not a share, or no lock id: fails on its own in apply
            elif change.action is Action.DELETE:
                revokes[lock_id].append(change)
            else:
                grants[lock_id].append(change)
        units += revokes.values()
        for lock_id, group in grants.items():
            if _batch(self.locks.get(lock_id, {})):
                units += [group[i:i + BATCH_SIZE] for i in range(0, len(group), BATCH_SIZE)]
            else:
                units += [[change] for change in group]
        return units

    def apply_batch(self, batch: list[Change]) -> None:
        if not batch or batch[0].kind != Kind.SHARE:
            for change in batch:
                self.apply(change)
            return
        lock_id = self._share_lock(batch[0].resource)
        if batch[0].action is Action.DELETE:
            self._revoke(lock_id, [c.live for c in batch if c.live is not None])
            # Read back once for the whole lock: the members still there were not revoked.
            members = {str(m.get("userId", "")).lower() for m in self._lock_users(lock_id)}
            survivors = [c for c in batch if c.live is not None and str(c.live.id).lower() in members]
            for change in batch:
                if change not in survivors:
                    self.forget(change.address)
            # Every survivor is marked (the next plan says "not in effect" for each), then the unit fails.
            refused: list[str] = []
            for change in survivors:
                try:
                    self.confirm_revoked(change, still=True)
                except NotInEffect as exc:
                    refused.append(str(exc))
            if refused:
                raise NotInEffect("; ".join(refused))
            return
        self._grant(lock_id, [c.desired for c in batch if c.desired is not None])

    def create_share(self, want: Resource) -> None:
        self._grant(self._share_lock(want), [want])

    def update_share(self, want: Resource, live: Resource, changed: tuple[str, ...]) -> None:
        self._grant(self._share_lock(want), [want])    # ADD_USER replaces role and window

    def revoked_still_there(self, live: Resource) -> bool | None:
        if live.kind != Kind.SHARE or not live.id:
            return None
        members = self._lock_users(self._share_lock(live))
        return any(str(m.get("userId", "")).lower() == str(live.id).lower() for m in members)

    def delete_share(self, live: Resource) -> None:
        self._revoke(self._share_lock(live), [live])

    def _grant(self, lock_id: str, wants: list[Resource]) -> None:
        bodies = [self._share_body(want) for want in wants]
        if len(bodies) == 1:
            operation: dict[str, Any] = {"type": "ADD_USER", **bodies[0]}
        else:
            operation = {"type": "BATCH_ADD_USER", "users": bodies}

        def landed() -> bool:
            live = {str(u.get("userId", "")).lower(): u for u in self._lock_users(lock_id)}
            return all(_same_share(live.get(body["user"].lower()), body) for body in bodies)
        self._execute(lock_id, operation, landed)
        for want, body in zip(wants, bodies, strict=False):
            self.remember(want.address, {"user": body["user"], "lock": lock_id})

    def _revoke(self, lock_id: str, lives: list[Resource]) -> None:
        user_ids = sorted({str(live.id) for live in lives if live.id})
        if not user_ids:
            return

        def landed() -> bool:
            present = {str(u.get("userId", "")).lower() for u in self._lock_users(lock_id)}
            return not present & set(user_ids)
        self._execute(lock_id, {"type": "REMOVE_USER", "users": user_ids}, landed)

    def _share_body(self, want: Resource) -> dict[str, Any]:
        email = str(want.meta.get("email", "")).lower()
        entry = self.directory.get(email)
        if entry is None:
            raise VendorError(f"{self.name}: {want.address}: nobody with email {email or '?'} in the directory")
        attrs = want.attributes
        return {"user": str(entry["id"]), "publicKey": entry.get("publicKey"), "role": attrs.get("role", "USER"),
                "start": _epoch(attrs.get("start")), "end": _epoch(attrs.get("end"))}

    def _lock_of(self, resource: Resource) -> str | None:
        device = resource.name.split("/", 1)[-1].split("#", 1)[0]
        lock_id = self.ids.get(address_of(self.name, Kind.DEVICE, device))
        return lock_id.lower() if lock_id else None

    def _share_lock(self, resource: Resource) -> str:
        lock_id = self._lock_of(resource)
        if not lock_id:
            raise VendorError(f"{self.name}: {resource.address}: its device has no lock id")
        return lock_id

    # -- audit ---------------------------------------------------------------------------------------
    def events(self, device: Resource, *, since: datetime | None = None) -> list[Event]:
        lock_id = self.ids.get(device.address)
        if not lock_id:
            raise VendorError(f"{self.name}: device {device.name} has no lock id")
        # The v2 log needs both ends of the window [doc]; without --since, from the epoch: the whole trail.
        start = int(since.timestamp()) if since is not None else 0
        params = {"start": str(start), "end": str(math.ceil(self.clock().timestamp()))}
        entries = parse(self.http.request("GET", PATHS["lock_log"].format(id=lock_id.lower()), params=params,
                                          headers={"Accept": MEDIA_V2}), LOG, self.name)
        people = {str(e.get("id", "")).lower(): email for email, e in self.directory.items()}
        names = {email: r.name.split("/", 1)[0] for r in self.desired.values()
                 if r.kind == Kind.SHARE and (email := str(r.meta.get("email", "")).lower())}

        def who(party: Any) -> str:
            if not isinstance(party, dict) or not party.get("userId"):
                return ""
            email = str(party.get("email") or people.get(str(party["userId"]).lower()) or "").lower()
            return names.get(email) or email or unknown_name(str(party["userId"]))

        rows = []
        for entry in sorted(entries, key=lambda e: float(e.get("timestamp") or 0)):
            detail = []
            if who(entry.get("subject")):
                detail.append(who(entry.get("subject")))
            if entry.get("rejected"):
                detail.append("rejected" + (f": {entry['rejectionReason']}" if entry.get("rejectionReason") else ""))
            rows.append(Event(time=_utc(entry.get("timestamp")) or "", action=str(entry.get("type", "")),
                              person=who(entry.get("issuer")), detail="; ".join(detail)))
        return rows

    handlers: ClassVar[HandlerTable] = {
        (Action.UPDATE, Kind.DEVICE): update_device,
        (Action.CREATE, Kind.SHARE): create_share, (Action.UPDATE, Kind.SHARE): update_share,
        (Action.DELETE, Kind.SHARE): delete_share,
    }


def _batch(lock: dict[str, Any]) -> bool:
    capabilities = (lock.get("settings") or {}).get("capabilities") or {}
    return capabilities.get("BATCH_SHARING_25") == "SUPPORTED"


def _lock_attributes(lock: dict[str, Any]) -> dict[str, Any]:
    colour = lock.get("colour")
    return {"name": lock.get("name"), "favourite": bool(lock.get("favourite")),
            "colour": colour.lower() if isinstance(colour, str) else colour,
            "unlock_duration": _unlock_duration(lock)}


def _unlock_duration(lock: dict[str, Any]) -> int | None:
    """Seconds a lock stays open, from `settings.unlockTime` (what MUTATE_SETTING's unlockDuration sets)."""
    value = (lock.get("settings") or {}).get("unlockTime")
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _same_share(live: dict[str, Any] | None, body: dict[str, Any]) -> bool:
    return live is not None and live.get("role") == body["role"] and all(
        (None if live.get(k) is None else int(live[k])) == body[k] for k in ("start", "end"))
