"""Abloy Keyless (CUMULUS/BEAT) Administration API v2 provider, vendor `abloy-keyless`.

Endpoints, field mapping and capabilities only; the workflow is `Provider`'s. Users carry no name at the
vendor (just `{id, role}`), so user, created-device and gateway ids live in state; permissions and
associations are found by their natural keys (user, device, operation) and (gateway, device).

What proves a created object is ours when the answer to its create was lost: a device, the name we gave
it (one new unclaimed device with it); a permission or association, its natural key. A user has nothing
but a role, and a gateway does not show the claiming code it was claimed with, so nothing can prove a new
one ours: such a create is *uncertain* until an operator adopts one (`ids:`, `id:`) or tells reconciler
none is (`reconciler state forget`); it is never adopted and never given anything. Invitations (no list endpoint) get an
intent before they are sent: one whose answer was lost is shown as possibly sent until it would expire,
and no second code is sent meanwhile.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, ClassVar, NotRequired

import httpx
from pydantic import ConfigDict, TypeAdapter, field_validator
from typing_extensions import TypedDict

from reconciler.errors import VendorError
from reconciler.plan import Action
from reconciler.providers.answers import MAX_PAGES, Id, VendorFault, created, fault, model, parse, unique
from reconciler.providers.base import CreateGate, Event, HandlerTable, Provider, ReadResult
from reconciler.providers.http import DeadlineExceeded, HttpClient, Interrupted, json_error, token_lifetime
from reconciler.providers.settings import VendorSettings
from reconciler.resources import (
    ROLE_ORDER,
    Attribute,
    Capabilities,
    Enforcement,
    Kind,
    KindSchema,
    Meta,
    OnChange,
    Resource,
    Status,
    address_of,
    compact,
    duration_seconds,
    format_time,
    grant_parts,
    normalise_time,
    unknown_name,
)
from reconciler.text import printable

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/vnd.assaabloy.keyless.administration-2+json"
PAGE_SIZE = 100
INVITATION_VALIDITY = "P7D"     # the system's `invitation_validity:` overrides it; the vendor's range below
INVITATION_RANGE = (1, 365 * 86400)  # seconds: "greater than 0 seconds and less than or equal to 365 days" [doc]
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"

# The one endpoint table (API-SURFACE §1): a path correction is a one-line change.
PATHS = {
    "login": "/login",
    "users": "/user",
    "user": "/user/{id}",
    "invitations": "/operating-device-invitation",
    "invitation": "/operating-device-invitation/{id}",
    "operating_devices": "/operating-device",
    "operating_device": "/operating-device/{id}",
    "devices": "/locking-device",
    "device": "/locking-device/{id}",
    "permissions": "/permission",
    "permission": "/permission/{id}",
    "gateways": "/gateway-device",
    "gateway": "/gateway-device/{id}",
    "audit_log": "/locking-device-audit-log",
    "associations": "/gateway-device-association",
    "association": "/gateway-device-association/{id}",
}

# When a permission is in force [doc 002, `operatingKeyValidityDuration`]: a phone downloads operating keys for
# offline use, valid `key_validity` (P8D by default); "revoking a permission does not affect the already
# downloaded operating key".
ENFORCEMENT = Enforcement(
    grant="from its start, once the phone has fetched its operating keys", grant_at_start=True,
    revoke="online at once; offline until the last downloaded operating key expires", revoke_offline="key_validity",
    shorten="a shorter key_validity on this door's permissions (P1D..P31D), set ahead of time, bounds the "
            "offline exposure of a revocation")

CAPABILITIES = Capabilities(
    vendor="abloy-keyless",
    grant_kind=Kind.PERMISSION,
    user_accounts=True,
    operations=frozenset({"OPEN", "UPDATE_FIRMWARE", "UPDATE_TIME"}),
    gateways=True,
    max_associations=5,
    creates_devices=True,
    device_fields=frozenset({"name"}),
    device_id_pattern=UUID_PATTERN,
    mobile_key=True,
    setting_durations={"invitation_validity": INVITATION_RANGE},
    credentials=frozenset({"user_id", "access_key", "api_key"}),
    several_windows=True,
    attributes={
        # Every permission needs an end; the operating key's validity is per permission (P1D..P31D).
        Kind.PERMISSION: KindSchema({"start": Attribute(str), "end": Attribute(str, required=True),
                                     "key_validity": Attribute(str, default="P8D")}, enforcement=ENFORCEMENT),
        # A user is `{id, role}` and the API has no call that changes a role; ADMIN can grant itself any door.
        Kind.USER: KindSchema({"role": Attribute(str, on_change=OnChange.FIXED, access=ROLE_ORDER,
                                                 privilege=frozenset({"ADMIN"}))}),
    },
)


describe_problem = json_error("title", "detail")   # RFC 7807 problem+json

LENIENT = ConfigDict(extra="allow")   # fields the tool does not use are kept and ignored


# The answers' shapes: strict on what the tool relies on, lenient on the rest.
class _Item(TypedDict):
    __pydantic_config__ = LENIENT   # type: ignore[misc]
    id: Id


class _Permission(_Item):
    userId: Id
    lockingDeviceId: Id
    operationType: str


class _Association(_Item):
    gatewayDeviceId: Id
    lockingDeviceId: Id


# An audit-log entry: what `events` reads of it, each optional, of the documented type when present.
_Event = model("_Event", {"id": Id, "occurrenceDatetime": str | None, "eventName": str | None, "granted": bool | None,
                          "client": model("_Client", {"userId": str | None, "type": str | None},
                                          optional=("userId", "type")) | None},
               optional=("occurrenceDatetime", "eventName", "granted", "client"))


class _Page(TypedDict):
    __pydantic_config__ = LENIENT   # type: ignore[misc]
    items: list[_Item]
    nextPageToken: NotRequired[str | None]


class _Permissions(_Page):
    items: list[_Permission]     # type: ignore[misc]


class _Associations(_Page):
    items: list[_Association]    # type: ignore[misc]


class _Events(_Page):
    items: list[_Event]          # type: ignore[misc, valid-type]


PAGES: dict[str, TypeAdapter[Any]] = {"permissions": TypeAdapter(_Permissions),
                                       "associations": TypeAdapter(_Associations),
                                       "audit_log": TypeAdapter(_Events)}
PAGE: TypeAdapter[Any] = TypeAdapter(_Page)


class _Login(TypedDict):
    __pydantic_config__ = LENIENT   # type: ignore[misc]
    token: str                      # a JWT: longer than an id


class _Invitation(_Item):
    expirationDatetime: str


CREATED: TypeAdapter[Any] = TypeAdapter(_Item)
LOGIN: TypeAdapter[Any] = TypeAdapter(_Login)
INVITATION: TypeAdapter[Any] = TypeAdapter(_Invitation)


class AbloySettings(VendorSettings):
    # How long an SMS invitation stays valid (ISO 8601); its range is `setting_durations` in the capabilities.
    invitation_validity: str | None = None

    @field_validator("invitation_validity")
    @classmethod
    def _within_range(cls, value: str | None) -> str | None:
        seconds = duration_seconds(value) if value is not None else INVITATION_RANGE[0]
        if seconds is None or not INVITATION_RANGE[0] <= seconds <= INVITATION_RANGE[1]:
            raise ValueError(f"'{value}' is not an ISO 8601 duration from PT1S to P365D")
        return value

    @property
    def invitation(self) -> str:
        """The validity sent with each invitation: the system's, or the vendor's default."""
        return self.invitation_validity or INVITATION_VALIDITY

    @property
    def invitation_lifetime(self) -> timedelta:
        return timedelta(seconds=duration_seconds(self.invitation) or 0)


class AbloyProvider(Provider):
    capabilities = CAPABILITIES
    vendor = CAPABILITIES.vendor       # its name, stated once here; registered under it in pyproject.toml
    default_url = "https://eu-api.keyless.assaabloy.com/administration"
    settings_model = AbloySettings
    settings: AbloySettings
    simulator = "reconciler.sandbox.abloy:AbloySimulator"
    credential_variables: ClassVar[Mapping[str, str]] = {
        "user_id": "ABLOY_USER_ID", "access_key": "ABLOY_ACCESS_KEY", "api_key": "ABLOY_API_KEY"}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._secret = {k: v.reveal() for k, v in self.credentials.items()}
        self.live_ids: dict[str, set[str]] = {}
        self.invitation_validity = self.settings.invitation
        self._invitation_validity = self.settings.invitation_lifetime
        self._create_gates = {kind: CreateGate() for kind in ("user", "device", "gateway")}

    def http_headers(self) -> dict[str, str]:
        return {"Accept": MEDIA_TYPE, "X-Api-Key": self.credentials["api_key"].reveal()}

    def describe_error(self, response: httpx.Response) -> str:
        return describe_problem(response)

    # -- auth ----------------------------------------------------------------------------------------
    def _login(self, http: HttpClient) -> tuple[dict[str, str], float | None]:
        body = {"userId": self._secret["user_id"], "accessKey": self._secret["access_key"]}
        try:
            response = http.request("POST", PATHS["login"], json=body, idempotent=True, authenticated=False)
        except (DeadlineExceeded, Interrupted):
            raise
        except VendorError as exc:
            raise VendorError(f"{self.name}: login failed: {exc}".replace(f"login failed: {self.name}: ", "login failed: "),
                              status=exc.status, temporary=exc.temporary) from None
        token = parse(response, LOGIN, self.name)["token"]
        self.redactor.add(token)
        import jwt  # here, not at the top: JWT pulls in cryptography, which validate and --help do not need

        try:
            claims = jwt.decode(token, options={"verify_signature": False, "verify_exp": False})
        except jwt.PyJWTError:
            claims = {}   # not a JWT we can read: rely on the 401 → login-again path
        return {"Authorization": f"Bearer {token}"}, token_lifetime(claims)

    # -- reading -------------------------------------------------------------------------------------
    def list_all(self, key: str, **params: str) -> list[dict[str, Any]]:
        """Every item of a list endpoint: `limit=100`, following `nextPageToken` to the end."""
        items: list[dict[str, Any]] = []
        query: dict[str, Any] = {**params, "limit": PAGE_SIZE}
        adapter = PAGES.get(key, PAGE)
        tokens: set[str] = set()
        while True:
            body = parse(self.http.request("GET", PATHS[key], params=query), adapter, self.name)
            items.extend(body["items"])
            token = body.get("nextPageToken")
            if not token:
                return unique(items, system=self.name, what=f"GET {PATHS[key]}")
            if token in tokens:
                raise VendorFault(f"{self.name}: GET {PATHS[key]}: the vendor sent page token "
                                  f"{printable(token)[:60]} twice; refusing to page in a loop")
            if len(tokens) >= MAX_PAGES:
                raise VendorFault(f"{self.name}: GET {PATHS[key]}: more than {MAX_PAGES} pages; refusing to "
                                  "page on")
            tokens.add(token)
            query = {**params, "limit": PAGE_SIZE, "next-page-token": token}

    def read_live(self, desired: list[Resource]) -> ReadResult:
        keys = ("users", "devices", "permissions", "gateways", "associations", "operating_devices")
        with ThreadPoolExecutor(len(keys)) as pool:
            lists = dict(zip(keys, pool.map(self.list_all, keys), strict=False))
        me = self._secret["user_id"]
        users = {u["id"]: u for u in lists["users"] if u["id"] != me}
        devices = {d["id"]: d for d in lists["devices"]}
        gateways = {g["id"]: g for g in lists["gateways"]}
        self.live_ids = {"user": set(users), "device": set(devices), "gateway": set(gateways)}

        result = ReadResult()
        result.warnings += self.settle_intents(
            Kind.USER, users, lambda want, item: want is None or item.get("role") == want.attributes.get("role"),
            provable=False)
        result.warnings += self.settle_intents(
            Kind.DEVICE, devices, lambda want, item: item.get("claimingStatus") == "UNCLAIMED" and (
                want is None or item.get("name") == want.attributes.get("name")))
        # A claim's code is not on the gateway it made: a new gateway proves nothing either.
        result.warnings += self.settle_intents(Kind.GATEWAY, gateways, lambda want, item: True, provable=False)

        user_names = self._names(Kind.USER)
        device_names = self._names(Kind.DEVICE)
        gateway_names = self._names(Kind.GATEWAY)
        add = result.resources.append
        for address, why in sorted(self.uncertain.items()):
            want = self.desired.get(address)
            if want is not None:
                add(Resource(self.name, want.kind, want.name, want.attributes, status=Status.PENDING,
                             meta={"uncertain": why, "candidates": self.candidates.get(address, [])}))

        for uid, item in users.items():
            name = user_names.get(uid)
            add(Resource(self.name, Kind.USER, name or unknown_name(uid), {"role": item.get("role")}, id=uid,
                         managed=name is not None, schema=CAPABILITIES.schema(Kind.USER)))
        for did, item in devices.items():
            name = device_names.get(did)
            meta = compact(Meta(claiming_status=item.get("claimingStatus"), serial_number=item.get("serialNumber")))
            add(Resource(self.name, Kind.DEVICE, name or unknown_name(did), {"name": item.get("name")}, id=did,
                         managed=name is not None, meta=meta))
        for gid, item in gateways.items():
            name = gateway_names.get(gid)
            meta = compact(Meta(serial_number=item.get("serialNumber"),
                                activation_status=item.get("activationStatus")))
            add(Resource(self.name, Kind.GATEWAY, name or unknown_name(gid), {}, id=gid,
                         managed=name is not None, meta=meta))
        for item in lists["associations"]:
            gateway = gateway_names.get(item.get("gatewayDeviceId"))
            if gateway is None:
                continue
            device = device_names.get(item.get("lockingDeviceId")) or unknown_name(str(item.get("lockingDeviceId")))
            add(Resource(self.name, Kind.ASSOCIATION, f"{gateway}/{device}", {}, id=item["id"]))
        for item in lists["permissions"]:
            held = device_names.get(item.get("lockingDeviceId"))
            if held is None:
                continue    # not a device this policy manages: not ours to judge
            user = user_names.get(item.get("userId")) or unknown_name(str(item.get("userId")))
            add(Resource(self.name, Kind.PERMISSION, f"{user}/{held}/{item.get('operationType')}",
                         self._permission_attributes(item), id=item["id"]))
        for want in desired:
            if want.kind == Kind.GATEWAY and want.status is Status.PRESENT and want.address not in self.ids \
                    and not want.meta.get("claiming_code"):
                result.errors.append(f"{want.source or want.address}: gateway '{want.name}' is not in "
                                     f"{self.name} yet and has no claiming_code to claim it with")
        devices_by_user = {d.get("userId"): d["id"] for d in lists["operating_devices"]}
        for want in desired:
            if want.kind == Kind.INVITATION:
                found = self._invitation(want, devices_by_user)
                if found is not None:
                    add(found)
        return result

    def _permission_attributes(self, item: dict[str, Any]) -> dict[str, Any]:
        """A listed permission's attributes; a date that does not parse is the vendor's fault, in one line."""
        try:
            return _permission_attributes(item)
        except (TypeError, ValueError) as exc:
            raise fault(self.name, "GET", PATHS["permissions"], f"permission {item['id']}: {exc}") from None

    def _names(self, kind: str) -> dict[Any, str]:
        """vendor id → our name, for `kind`; looked up with ids as the vendor's JSON gives them."""
        prefix = f"{self.name}/{kind}/"
        return {vid: address[len(prefix):] for address, vid in self.ids.items() if address.startswith(prefix)}

    def _invitation(self, want: Resource, devices_by_user: dict[Any, str]) -> Resource | None:
        uid = self.ids.get(address_of(self.name, Kind.USER, want.name))
        if uid and uid in devices_by_user:
            return Resource(self.name, Kind.INVITATION, want.name, want.attributes,
                            id=devices_by_user[uid], meta={"operating_device": devices_by_user[uid]})
        record = self.state.get(want.address)
        if uid and record and record.get("expires") and record.get("user") == uid:
            phone = record.get("phone")
            if record.get("intent") or not record.get("id"):
                why = (f"an invitation to {phone} may have been sent at {record.get('at', '?')} (its answer was "
                       f"lost, or the run stopped while sending it); the vendor cannot list invitations, so it "
                       f"can be neither confirmed nor revoked. No second code is sent while it may be valid; "
                       f"a new one is sent after {record['expires']} unless the person accepts it first (or, once "
                       f"you know it did not arrive, run `reconciler state forget {want.address}`)")
                return Resource(self.name, Kind.INVITATION, want.name, {"phone": phone}, status=Status.PENDING,
                                meta={"expires": record["expires"], "uncertain": why})
            return Resource(self.name, Kind.INVITATION, want.name, {"phone": phone}, id=record.get("id"),
                            status=Status.PENDING,
                            meta={"expires": record["expires"],
                                  "pending": f"invitation sent by SMS to {phone}; waiting for the user to "
                                             f"accept it (expires {record['expires']})"})
        return None

    # -- users ---------------------------------------------------------------------------------------
    def create_user(self, want: Resource) -> dict[str, Any]:
        def find() -> str | None:
            # An account is only {id, role}: a new one proves nothing, so any candidate is uncertain.
            return self._find_new("users", "user", lambda item: item.get("role") == want.attributes["role"],
                                  provable=False, name=want.name)
        body = self._create(want.address, "user", find,
                            lambda: self.http.request("POST", PATHS["users"],
                                                              json={"role": want.attributes["role"]},
                                                              idempotent=False))
        # The answer holds the user's accessKey: a secret we neither keep nor show.
        return {"id": body["id"]}

    def delete_user(self, live: Resource) -> None:
        self.http.request("DELETE", PATHS["user"].format(id=live.id), expect=(404,))
        self.forget(address_of(self.name, Kind.INVITATION, live.name))

    # -- locking devices -----------------------------------------------------------------------------
    def create_device(self, want: Resource) -> dict[str, Any]:
        name = want.attributes["name"]

        def find() -> str | None:
            return self._find_new("devices", "device", name=want.name,
                                  matches=lambda item: item.get("name") == name
                                  and item.get("claimingStatus") == "UNCLAIMED")
        body = self._create(want.address, "device", find,
                            lambda: self.http.request("POST", PATHS["devices"], json={"name": name},
                                                              idempotent=False))
        return {"id": body["id"]}

    def update_device(self, want: Resource, live: Resource, changed: tuple[str, ...]) -> None:
        patch = [{"op": "replace", "path": "/name", "value": want.attributes["name"]}]
        self.http.request("PATCH", PATHS["device"].format(id=live.id), content=json.dumps(patch).encode(),
                          headers={"Content-Type": "application/json-patch+json"}, idempotent=True)

    def delete_device(self, live: Resource) -> None:
        self.http.request("DELETE", PATHS["device"].format(id=live.id), expect=(404,))

    # -- gateways and associations -------------------------------------------------------------------
    def create_gateway(self, want: Resource) -> dict[str, Any]:
        code = want.meta.get("claiming_code")
        if not code:
            raise VendorError(f"{want.address}: a gateway needs `claiming_code` to be claimed")

        def find() -> str | None:
            return self._find_new("gateways", "gateway", lambda item: True, provable=False, name=want.name)

        def claim() -> httpx.Response | dict[str, Any]:
            response = self.http.request("POST", PATHS["gateways"], json={"claimingCode": code},
                                         idempotent=False, expect=(409,))
            if response.status_code == 409:
                # Already claimed: by us, if an earlier answer was lost; otherwise by somebody else.
                found = find()
                if found:
                    return {"id": found}
                raise VendorError(self.redactor(f"{self.name}: claim gateway {want.name}: "
                                                f"{describe_problem(response)}"), status=409)
            return response
        body = self._create(want.address, "gateway", find, claim)
        return {"id": body["id"]}

    def delete_gateway(self, live: Resource) -> None:
        self.http.request("DELETE", PATHS["gateway"].format(id=live.id), expect=(404,))

    def create_association(self, want: Resource) -> None:
        gateway, device = want.name.split("/", 1)
        gateway_id = self._id(Kind.GATEWAY, gateway)
        device_id = self._id(Kind.DEVICE, device)

        def send() -> httpx.Response | bool:
            response = self.http.request("POST", PATHS["associations"], idempotent=False, expect=(409,),
                                         json={"gatewayDeviceId": gateway_id, "lockingDeviceId": device_id})
            if response.status_code == 409:
                if not find():
                    raise VendorError(self.redactor(f"{self.name}: associate {want.name}: "
                                                    f"{describe_problem(response)}"), status=409)
                return True
            return response

        def find() -> bool | None:
            existing = self.list_all("associations", **{"gateway-device-id": gateway_id})
            return True if any(a.get("lockingDeviceId") == device_id for a in existing) else None
        answer = self.create_checked(send, find)
        if isinstance(answer, httpx.Response):
            created(answer, CREATED, self.name)    # malformed: uncertain; the next read finds it by its natural key

    def delete_association(self, live: Resource) -> None:
        self.http.request("DELETE", PATHS["association"].format(id=live.id), expect=(404,))

    # -- permissions ---------------------------------------------------------------------------------
    def _permission_body(self, want: Resource) -> dict[str, Any]:
        user, device, operation = grant_parts(want.name)
        attrs = want.attributes
        # No `start:` in the policy means from now, never "keep what the vendor has": a start left in the
        # future would keep the door shut (and an earlier end would then be refused as before the start).
        start = attrs.get("start") or format_time(self.clock())
        return {"permissionType": "SINGLE_INTERVAL", "userId": self._id(Kind.USER, user),
                "lockingDeviceId": self._id(Kind.DEVICE, device), "operationType": operation,
                "operatingKeyValidityDuration": attrs.get("key_validity", "P8D"),
                "start": start, "end": attrs["end"]}

    def create_permission(self, want: Resource) -> None:
        body = self._permission_body(want)
        key = (body["userId"], body["lockingDeviceId"], body["operationType"])
        end = normalise_time(body["end"])

        def find() -> bool | None:
            # One person may hold several windows on one lock: the one sent is the one with its end.
            return True if any((p.get("userId"), p.get("lockingDeviceId"), p.get("operationType")) == key
                               and normalise_time(p.get("end")) == end
                               for p in self.list_all("permissions")) else None
        answer = self.create_checked(lambda: self.http.request("POST", PATHS["permissions"], json=body,
                                                               idempotent=False), find)
        if isinstance(answer, httpx.Response):
            created(answer, CREATED, self.name)    # malformed: uncertain; the next read finds it by its natural key

    def update_permission(self, want: Resource, live: Resource, changed: tuple[str, ...]) -> None:
        self.http.request("PUT", PATHS["permission"].format(id=live.id), json=self._permission_body(want))

    def delete_permission(self, live: Resource) -> None:
        self.http.request("DELETE", PATHS["permission"].format(id=live.id), expect=(404,))

    def revoked_still_there(self, live: Resource) -> bool | None:
        if live.kind != Kind.PERMISSION:
            return None
        response = self.http.request("GET", PATHS["permission"].format(id=live.id), expect=(404,))
        return response.status_code != 404

    # -- operating-device invitations ----------------------------------------------------------------
    def create_invitation(self, want: Resource) -> dict[str, Any]:
        """Intent first, then the SMS: a restart after a kill or a lost answer finds the intent and sends
        no second code while the first may be live (the vendor has no list of invitations to look in)."""
        user_id = self._id(Kind.USER, want.name)
        phone = want.attributes["phone"]
        body = {"userId": user_id, "deliveryMechanism": "SMS", "phoneNumber": phone,
                "validityDuration": self.invitation_validity}
        sent_at = self.clock()
        self.state.put(want.address, {"intent": "create", "user": user_id, "phone": phone,
                                      "at": format_time(sent_at),
                                      "expires": format_time(sent_at + self._invitation_validity)})
        try:
            answer = created(self.http.request("POST", PATHS["invitations"], json=body, idempotent=False),
                             INVITATION, self.name)
        except VendorError as exc:
            if not exc.ambiguous:
                self.state.delete(want.address)    # refused (429/503 after retries, 4xx): nothing was sent
            raise
        return {"id": answer["id"], "user": user_id, "phone": phone,
                "expires": normalise_time(answer["expirationDatetime"])}

    def update_invitation(self, want: Resource, live: Resource, changed: tuple[str, ...]) -> None:
        self.delete_invitation(live)
        self.remember(want.address, self.create_invitation(want))

    def delete_invitation(self, live: Resource) -> None:
        """A pending invitation is revoked; an enrolled operating device (`mobile_key: false`) is deleted."""
        if live.status is Status.PENDING and live.id:
            self.http.request("DELETE", PATHS["invitation"].format(id=live.id), expect=(404, 409))
        elif live.meta.get("operating_device"):
            response = self.http.request("DELETE", PATHS["operating_device"].format(id=live.meta["operating_device"]),
                                         expect=(404, 409))
            if response.status_code == 409:
                # A device enrolled before API v2 invitations goes only with its user [doc].
                raise VendorError(self.redactor(f"{self.name}: {live.address}: the operating device cannot be "
                                                f"deleted on its own ({describe_problem(response)}); Abloy "
                                                "removes a legacy device only with its user"), status=409)

    # -- audit ---------------------------------------------------------------------------------------
    def events(self, device: Resource, *, since: datetime | None = None) -> list[Event]:
        device_id = self._id(Kind.DEVICE, device.name)
        params = {"locking-device-id": device_id, "sort-direction": "ASC"}
        if since is not None:
            params["after-datetime"] = format_time(since)
        names = self._names(Kind.USER)
        rows = []
        for item in self.list_all("audit_log", **params):
            client = item.get("client") or {}
            user = client.get("userId")
            person = names.get(user) or (unknown_name(str(user)) if user else client.get("type", ""))
            granted = item.get("granted")
            try:
                when = normalise_time(item.get("occurrenceDatetime")) or ""
            except ValueError as exc:
                raise fault(self.name, "GET", PATHS["audit_log"], f"event {item['id']}: {exc}") from None
            rows.append(Event(time=when, action=item.get("eventName") or "",
                              person=person, detail="" if granted is None else ("granted" if granted else "denied")))
        return rows

    # -- helpers -------------------------------------------------------------------------------------
    def _id(self, kind: str, name: str) -> str:
        vid = self.ids.get(address_of(self.name, kind, name))
        if not vid:
            raise VendorError(f"{self.name}: {kind} {name} has no id yet (was its create applied?)")
        return vid

    def _create(self, address: str, kind: str, find: Callable[[], str | None],
                send: Callable[[], httpx.Response | dict[str, Any]]) -> dict[str, Any]:
        """A create without a natural key: record the intent, then send; the id comes from the answer.

        Creates of one kind run concurrently. A lost answer is looked up alone (`CreateGate`): the lookup
        tells our object from others only by its being the one new unclaimed id, which holds only once no
        other create of that kind is in flight and each answered one has claimed its id."""
        gate = self._create_gates[kind]
        with gate.sending():
            self.intend(address, sorted(self.live_ids.get(kind, set())))
            try:
                answer = send()
            except VendorError as exc:
                if not exc.ambiguous:
                    self.state.delete(address)    # refused outright: nothing to look for later
                    raise
                lost: VendorError | None = exc
            else:
                # Claimed before the gate is left, so a lookup never mistakes it for a lost create's object.
                # A malformed answer raises here: uncertain, the intent stays for the next read to settle.
                self.ids[address] = self._created(answer)["id"]
                return {"id": self.ids[address]}
        with gate.recovering():
            def look() -> dict[str, Any] | None:
                found = find()
                return {"id": found} if found else None
            try:
                answer = self.create_checked(send, look, lost=lost)
            except VendorError as exc:
                if not exc.ambiguous:
                    self.state.delete(address)
                raise
            self.ids[address] = self._created(answer)["id"]
            return {"id": self.ids[address]}

    def _created(self, answer: httpx.Response | dict[str, Any]) -> dict[str, Any]:
        """The id a create's answer holds (`created`: a malformed answer leaves the create uncertain), or what
        a lookup found."""
        if isinstance(answer, httpx.Response):
            body: dict[str, Any] = created(answer, CREATED, self.name)
            return body
        return answer

    def _find_new(self, key: str, kind: str, matches: Callable[[dict[str, Any]], bool], *,
                  provable: bool = True, name: str = "") -> str | None:
        """The one new object a lost create made, when `matches` is a natural key we set (`provable`);
        None when nothing new matches (it did not land: send again). Anything else is uncertain: neither
        a stranger's object is adopted nor is the create sent again."""
        # The administrator we log in as is nobody's new object.
        known = self.live_ids.get(kind, set()) | set(self.ids.values()) | {self._secret["user_id"]}
        candidates = [item["id"] for item in self.list_all(key) if item["id"] not in known and matches(item)]
        if not candidates or (provable and len(candidates) == 1):
            return candidates[0] if candidates else None
        raise VendorError(f"{self.name}: the answer to creating {kind} {name} was lost and {len(candidates)} "
                          f"new {kind}(s) appeared since; none can be proven ours, so none is adopted and it is "
                          "not sent again; the next plan says how to resolve it", temporary=True, ambiguous=True)

    handlers: ClassVar[HandlerTable] = {
        (Action.CREATE, Kind.USER): create_user, (Action.DELETE, Kind.USER): delete_user,
        (Action.CREATE, Kind.DEVICE): create_device, (Action.UPDATE, Kind.DEVICE): update_device,
        (Action.DELETE, Kind.DEVICE): delete_device,
        (Action.CREATE, Kind.GATEWAY): create_gateway, (Action.DELETE, Kind.GATEWAY): delete_gateway,
        (Action.CREATE, Kind.ASSOCIATION): create_association, (Action.DELETE, Kind.ASSOCIATION): delete_association,
        (Action.CREATE, Kind.PERMISSION): create_permission, (Action.UPDATE, Kind.PERMISSION): update_permission,
        (Action.DELETE, Kind.PERMISSION): delete_permission,
        (Action.CREATE, Kind.INVITATION): create_invitation, (Action.UPDATE, Kind.INVITATION): update_invitation,
        (Action.DELETE, Kind.INVITATION): delete_invitation,
    }


_DURATION = re.compile(r"^P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$")


def normalise_days(text: str | None) -> str:
    """`PT192H`, `P8DT0H` and `P8D` are one validity; compare them as `P<n>D` (the policy's form)."""
    match = _DURATION.match(text or "")
    if not text or not match:
        return text or "P8D"
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    return f"P{total // 86400}D" if total % 86400 == 0 else text


def _permission_attributes(item: dict[str, Any]) -> dict[str, Any]:
    return {"start": normalise_time(item.get("start")), "end": normalise_time(item.get("end")),
            "key_validity": normalise_days(item.get("operatingKeyValidityDuration"))}
