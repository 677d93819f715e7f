"""SmartphoneKey provider, vendor `spkey`: the policy's `temp_keys` as per-lock temporary keys.

Endpoints, field mapping and capabilities only; the workflow is `Provider`'s. Locks are adopted by their
numeric id (SmartphoneKey cannot create them). Authentication is the organisation's B2B `X-API-Key` and
nothing else: a request never carries a bearer token too.

Identity needs no state: a key's `tempKeyUuid` is a UUIDv5 of the system, the lock and the key's name,
chosen by us. A create whose answer was lost is looked up by that uuid in the lock's list before it is
sent again (the vendor's OpenAPI lists no 409 for a repeated uuid, so a repeat cannot be relied on to say
it landed); a key found there is checked and, if it differs, updated. State only remembers names
and descriptions, so that a key removed from the policy is still shown by name and a description (which
the vendor never returns) can be compared.

Where the vendor documents are silent, this module decides:
- People are SmartphoneKey accounts found by email (`/users/by-email?searchOnly=true`, so that a lookup
  never creates anybody); an email without an account makes the plan impossible (ReadResult.errors).
- `description` can only be set on create (update-temp-key has no such field, and lists do not return
  it): a changed description is reported by the planner (the schema marks it `FIXED`), never silently dropped.
- The vendor computes each key's status; `used-up` and `expired` keys the policy declares are reported
  as plan warnings with their uses; they are never re-created (the planner does not create a grant whose
  end has passed, and a used-up key still exists, so raising `max_uses` is an in-place update).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import httpx

from reconciler.errors import VendorError
from reconciler.plan import Action, Note
from reconciler.providers.answers import Id, adapter, created, error_body, listing, model, parse, uncertain, where
from reconciler.providers.base import HandlerTable, Provider, ReadResult
from reconciler.resources import (
    Attribute,
    Capabilities,
    Kind,
    KindSchema,
    Meta,
    OnChange,
    Resource,
    Status,
    normalise_time,
    unknown_name,
)

log = logging.getLogger(__name__)

MAX_READERS = 8
DESCRIPTION_MAX = 2000
# Fixed forever: changing it would give every key a new uuid, so each would be deleted and created again.
TEMP_KEY_NAMESPACE = uuid.UUID("0b6f4f0e-5a43-5c2e-9d2b-7c1e3b8a4f25")

# The one endpoint table (API-SURFACE §4): a path correction is a one-line change.
PATHS = {
    "temp_keys": "/locks/{id}/temp-keys",
    "create": "/locks/{id}/create-temp-key",
    "update": "/locks/{id}/update-temp-key",
    "delete": "/locks/{id}/delete-temp-key",
    "user_by_email": "/users/by-email",
}

CAPABILITIES = Capabilities(
    vendor="spkey",
    grant_kind=Kind.TEMP_KEY,
    temp_keys=True,
    needs_email=True,
    creates_devices=False,
    device_fields=frozenset(),
    device_id_pattern=r"[1-9]\d*",     # the OpenAPI's lock id: an integer, exclusiveMinimum 0
    credentials=frozenset({"api_key"}),
    attributes={
        # update-temp-key cannot change the description, and lists never return it: set on create only.
        Kind.TEMP_KEY: KindSchema({"access": Attribute(str, choices=frozenset({"public", "users"})),
                                   "users": Attribute(list), "start": Attribute(str), "end": Attribute(str),
                                   "max_uses": Attribute(int, default=None),
                                   "description": Attribute(str, default=None, on_change=OnChange.FIXED)}),
    },
)

# The answers' shapes (the vendor's OpenAPI): strict on what the tool relies on, lenient on the rest.
TEMP_KEY = model("TempKey", {"uuid": Id, "allowedUserIds": list[str] | None, "usedCount": int | None},
                 optional=("allowedUserIds", "usedCount"))
USER = adapter(model("User", {"uuid": Id}))
CREATE_ANSWER = adapter(model("Created", {"success": bool, "tempKeyUuid": Id}))

ACCESS_MODES = {"public": "public", "users": "user-whitelist"}
ACCESS_OF_MODE = {mode: access for access, mode in ACCESS_MODES.items()}
UPDATABLE = ("access", "users", "start", "end", "max_uses")   # what update-temp-key can change
CREATED = (*UPDATABLE, "description")


def temp_key_uuid(system: str, lock_id: str, name: str) -> str:
    """Our `tempKeyUuid` for a key. The lock is part of it because the vendor keeps these uuids unique
    across all organisations: two policies with the same system and key names would otherwise collide."""
    return str(uuid.uuid5(TEMP_KEY_NAMESPACE, f"{system}/{lock_id}/{name}"))


def describe_error(response: httpx.Response) -> str:
    """`{error, message}` (or basic-info's `{errors: [{message}]}`) → `404 Not Found: Lock not found`."""
    body = error_body(response)
    if isinstance(body, dict):
        if isinstance(body.get("error"), str):
            message = body.get("message")
            return f"{response.status_code} {body['error']}" + (f": {message}" if message else "")
        errors = body.get("errors")
        if isinstance(errors, list) and errors:
            return f"{response.status_code} " + "; ".join(str(e.get("message", e)) if isinstance(e, dict) else str(e)
                                                          for e in errors)
    return f"HTTP {response.status_code} {response.reason_phrase}".strip()


class SpkeyProvider(Provider):
    capabilities = CAPABILITIES
    vendor = CAPABILITIES.vendor       # its name, stated once here; registered under it in pyproject.toml
    default_url = "https://api.spkey.co"
    simulator = "reconciler.sandbox.spkey:SpkeySimulator"
    credential_variables: ClassVar[Mapping[str, str]] = {"api_key": "SPKEY_API_KEY"}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.user_ids: dict[str, str] = {}    # email (as the policy writes it) → SmartphoneKey user uuid
        self.emails: dict[str, str] = {}      # user uuid → email

    def secrets(self) -> list[str]:
        return [self.credentials["api_key"].reveal()]

    def http_headers(self) -> dict[str, str]:
        return {"X-API-Key": self.credentials["api_key"].reveal(), "Accept": "application/json"}

    def describe_error(self, response: httpx.Response) -> str:
        return describe_error(response)

    # -- reading -------------------------------------------------------------------------------------
    def read_live(self, desired: list[Resource]) -> ReadResult:
        result = ReadResult()
        keys = self._expressible(desired, result)
        locks: dict[str, str] = {}        # device name → lock id, for the devices whose keys we read
        for declared in (r for r in desired if r.kind == Kind.DEVICE):
            if declared.status is Status.ABSENT:
                result.warnings.append(Note(declared.address, "SmartphoneKey cannot delete locks: decommissioning "
                                            "only stops managing its keys", self.name, Kind.DEVICE))
            elif self.ids.get(declared.address):
                locks[declared.name] = self.ids[declared.address]

        # One list per lock and one lookup per person, all at once: the vendor has no bulk endpoint.
        emails = sorted({email for key in keys for email in key.attributes.get("users") or ()})
        work = len(set(locks.values())) + len(emails)
        with ThreadPoolExecutor(max(1, min(MAX_READERS, work))) as pool:
            listed_futures = {lock: pool.submit(self._list_keys, lock) for lock in sorted(set(locks.values()))}
            user_futures = {email: pool.submit(self._find_user, email) for email in emails}
            listed = {lock: future.result() for lock, future in listed_futures.items()}
            found = {email: future.result() for email, future in user_futures.items()}
        self.user_ids = {email: uid for email, uid in found.items() if uid}
        self.emails = {uid: email for email, uid in self.user_ids.items()}
        for key in keys:
            for email in key.attributes.get("users") or ():
                if email not in self.user_ids:
                    result.errors.append(f"{key.address}: no SmartphoneKey account has the email {email} (a user "
                                         f"of temp key '{key.name}'); they must sign up before a key can name them")

        by_device: dict[str, list[Resource]] = {}
        for key in keys:
            by_device.setdefault(self._device_of(key), []).append(key)
        for device, lock in sorted(locks.items()):
            outcome, items = listed[lock]
            waiting = sorted(key.name for key in by_device.get(device, ()))
            if outcome == "forbidden":
                result.errors.append(f"{self.name}/device/{device}: lock {lock} belongs to another SmartphoneKey "
                                     "organisation; this API key cannot manage it")
            elif outcome == "missing" and waiting:
                result.errors.append(f"{self.name}/device/{device}: lock {lock} was not found at SmartphoneKey; "
                                     f"temp keys {', '.join(waiting)} need it")
            elif outcome == "ok":
                # (A missing lock without keys is left out: the planner reports the adopted id not found.)
                result.resources.append(Resource(self.name, Kind.DEVICE, device, {}, id=lock))
                self._live_keys(lock, items, by_device.get(device, []), {k.name for k in keys}, result)
        return result

    def _expressible(self, desired: list[Resource], result: ReadResult) -> list[Resource]:
        """The desired temp keys this vendor can hold; the others become plan errors."""
        keys = []
        for key in (r for r in desired if r.kind == Kind.TEMP_KEY):
            if "access" not in key.attributes:
                # A `permissions:` entry on an spkey lock, which the policy checks do not refuse (yet).
                result.errors.append(f"{key.address}: SmartphoneKey has only temporary keys; declare this access "
                                     f"under `temp_keys:` instead of `permissions:`"
                                     + (f" ({key.source})" if key.source else ""))
            elif len(key.attributes.get("description") or "") > DESCRIPTION_MAX:
                result.errors.append(f"{key.address}: description is longer than SmartphoneKey's "
                                     f"{DESCRIPTION_MAX} characters")
            else:
                keys.append(key)
        return keys

    def _live_keys(self, lock: str, items: list[dict[str, Any]], declared: list[Resource], desired_names: set[str],
                   result: ReadResult) -> None:
        """One lock's listed keys as live resources: ours by their derived uuid, removed ones by the name
        state remembers, anybody else's as `id:<uuid>`. All are managed: the lock is the policy's."""
        ours = {temp_key_uuid(self.name, lock, key.name): key for key in declared}
        prefix = f"{self.name}/{Kind.TEMP_KEY}/"
        # A remembered name that the policy still declares belongs to its new uuid (the key moved locks).
        remembered = {vid: address[len(prefix):] for address, vid in self.ids.items()
                      if address.startswith(prefix) and address[len(prefix):] not in desired_names}
        for item in items:
            key_uuid = str(item.get("uuid"))
            want = ours.get(key_uuid)
            name = want.name if want else remembered.get(key_uuid) or unknown_name(key_uuid)
            record = self.state.get(f"{prefix}{name}") or {}
            if "description" in record:
                description, known = record["description"], True
            else:   # never returned by the vendor: without a record, assume it is what the policy says
                description, known = (want.attributes.get("description") if want else None), want is not None
            live = self._resource(name, item, lock, description, known=known)
            result.resources.append(live)
            note = _status_note(want, live) if want is not None else None
            if note is not None:
                result.warnings.append(note)

    def _list_keys(self, lock: str) -> tuple[str, list[dict[str, Any]]]:
        """`("ok", items)`, or `("missing", [])` for an unknown lock, `("forbidden", [])` for a foreign one."""
        response = self.http.request("GET", PATHS["temp_keys"].format(id=lock), expect=(403, 404))
        if response.status_code == 404:
            return "missing", []
        if response.status_code == 403:
            return "forbidden", []
        return "ok", listing(response, "tempKeys", self.name, key="uuid", fold=True, item=TEMP_KEY)

    def _find_user(self, email: str) -> str | None:
        # searchOnly=true: without it the vendor creates an account for an unknown email.
        response = self.http.request("GET", PATHS["user_by_email"], params={"email": email, "searchOnly": "true"},
                                     expect=(404,))
        return None if response.status_code == 404 else parse(response, USER, self.name)["uuid"]

    def _device_of(self, key: Resource) -> str:
        device_prefix = f"{self.name}/{Kind.DEVICE}/"
        return next((d[len(device_prefix):] for d in key.depends_on if d.startswith(device_prefix)), "")

    def _lock_of(self, key: Resource) -> str:
        lock = self.ids.get(f"{self.name}/{Kind.DEVICE}/{self._device_of(key)}")
        if not lock:
            raise VendorError(f"{self.name}: temp key {key.name}: its device has no lock id")
        return lock

    def _attributes(self, item: dict[str, Any], description: str | None, *, known: bool) -> dict[str, Any]:
        mode = item.get("accessMode")
        max_uses = item.get("maxUses")
        attributes = {
            "access": ACCESS_OF_MODE.get(str(mode), mode),
            # A user we did not look up (not in any declared key) shows by uuid, and differs.
            "users": sorted(self.emails.get(u) or unknown_name(u) for u in item.get("allowedUserIds") or ()),
            "start": _time(item.get("validFrom")),
            "end": _time(item.get("validUntil")),
            "max_uses": _count(max_uses),
        }
        if known:
            attributes["description"] = description
        return attributes

    def _resource(self, name: str, item: dict[str, Any], lock: str, description: str | None, *,
                  known: bool) -> Resource:
        meta: Meta = {"status": item.get("status"), "uses": item.get("usedCount"), "lock": lock,
                "created_by": item.get("createdBy")}
        return Resource(self.name, Kind.TEMP_KEY, name, self._attributes(item, description, known=known),
                        id=str(item.get("uuid")), meta=meta, schema=CAPABILITIES.schema(Kind.TEMP_KEY))

    # -- temp keys -----------------------------------------------------------------------------------
    def _fields(self, attributes: Any, names: Iterable[str]) -> dict[str, Any]:
        body: dict[str, Any] = {}
        for name in names:
            value = attributes.get(name)
            if name == "access":
                body["accessMode"] = ACCESS_MODES[value]
            elif name == "users":
                body["allowedUserIds"] = [self._user_id(email) for email in value or ()]
            elif name == "start":
                body["validFrom"] = value
            elif name == "end":
                body["validUntil"] = value
            elif name == "max_uses":
                body["maxUses"] = value
            elif name == "description" and value is not None:
                body["description"] = value
        return body

    def _user_id(self, email: str) -> str:
        uid = self.user_ids.get(email)
        if uid is None:
            raise VendorError(f"{self.name}: no SmartphoneKey account is known for {email}")
        return uid

    def create_temp_key(self, want: Resource) -> dict[str, Any]:
        lock = self._lock_of(want)
        key_uuid = temp_key_uuid(self.name, lock, want.name)
        body = {"tempKeyUuid": key_uuid, **self._fields(want.attributes, CREATED)}

        def send() -> httpx.Response:
            return self.http.request("POST", PATHS["create"].format(id=lock), json=body, idempotent=False)

        def find() -> bool | None:
            # The answer was lost: the lock's list says whether the key landed (by our uuid).
            outcome, items = self._list_keys(lock)
            item = next((i for i in items if str(i.get("uuid")) == key_uuid), None)
            if outcome != "ok" or item is None:
                return None
            self._settle_existing(want, lock, key_uuid, item)
            return True
        answer = self.create_checked(send, find)
        if isinstance(answer, httpx.Response):
            # Parsed after the send, not inside it: a malformed answer leaves the create uncertain (the next
            # read finds the key by its uuid), never looked up and sent again in the same breath.
            key = created(answer, CREATE_ANSWER, self.name)
            if key["tempKeyUuid"].lower() != key_uuid.lower() or key["success"] is not True:
                method, path = where(answer)
                raise uncertain(self.name, method, path, f"the answer to creating temp key {want.name} names "
                                f"{key['tempKeyUuid'][:80]} (success: {key['success']}), not {key_uuid}")
        return {"id": key_uuid, "lock": lock, "description": want.attributes.get("description")}

    def _settle_existing(self, want: Resource, lock: str, key_uuid: str, item: dict[str, Any]) -> None:
        """The key exists (an earlier answer was lost). Check it, and update what differs."""
        live = self._attributes(item, None, known=False)
        changed = [k for k in UPDATABLE if live.get(k) != want.attributes.get(k)]
        log.info("temp key already existed system=%s key=%s uuid=%s differing=%s", self.name, want.name, key_uuid,
                 ",".join(changed) or "-")
        if changed:
            self._update(lock, key_uuid, self._fields(want.attributes, changed))

    def update_temp_key(self, want: Resource, live: Resource, changed: tuple[str, ...]) -> None:
        fields = self._fields(want.attributes, [k for k in changed if k in UPDATABLE])
        if fields:
            assert live.id is not None
            self._update(str(live.meta["lock"]), live.id, fields)

    def _update(self, lock: str, key_uuid: str, fields: dict[str, Any]) -> None:
        self.http.request("POST", PATHS["update"].format(id=lock), json={"tempKeyUuid": key_uuid, **fields},
                          idempotent=True)

    def revoked_still_there(self, live: Resource) -> bool | None:
        if live.kind != Kind.TEMP_KEY or not live.id:
            return None
        outcome, items = self._list_keys(str(live.meta["lock"]))
        return outcome == "ok" and any(str(i["uuid"]).lower() == str(live.id).lower() for i in items)

    def delete_temp_key(self, live: Resource) -> None:
        # 404: already gone (an earlier answer was lost, or someone deleted it meanwhile).
        self.http.request("POST", PATHS["delete"].format(id=live.meta["lock"]), json={"tempKeyUuid": live.id},
                          idempotent=True, expect=(404,))

    handlers: ClassVar[HandlerTable] = {
        (Action.CREATE, Kind.TEMP_KEY): create_temp_key, (Action.UPDATE, Kind.TEMP_KEY): update_temp_key,
        (Action.DELETE, Kind.TEMP_KEY): delete_temp_key,
    }


def _time(text: Any) -> Any:
    """The vendor's time in the policy's format; a time without an offset is taken as UTC, and what is
    not a time at all is kept as it is (it then differs, and the plan corrects it)."""
    if not isinstance(text, str):
        return text
    try:
        return normalise_time(text)
    except ValueError:
        try:
            return normalise_time(text + "Z")
        except ValueError:
            return text


def _count(value: Any) -> Any:
    """`maxUses` as a number; the vendor's own excerpt shows it as the string "null" too."""
    if value is None or value == "null":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def _status_note(want: Resource, live: Resource) -> Note | None:
    """A plan warning for a declared key that no longer opens: used up or expired."""
    status, uses = live.meta.get("status"), live.meta.get("uses")
    have = live.attributes
    details = (("status", status), ("uses", uses), ("max_uses", have.get("max_uses")), ("id", live.id))
    limit = have.get("max_uses")
    used = f"{uses} of {limit} uses" if limit is not None else f"{uses} use{'' if uses == 1 else 's'}"
    if status == "used-up":
        wanted = want.attributes.get("max_uses")
        if wanted != limit and (wanted is None or wanted > (uses or 0)):
            then = f"the plan raises max_uses to {wanted}" if wanted is not None else "the plan lifts its limit"
            message = f"used up ({used}); {then}, so it opens again"
        else:
            message = f"used up ({used}); it no longer opens: raise max_uses in the policy to let it open again"
    elif status == "expired":
        message = f"expired (valid until {have.get('end')}, {used}); it no longer opens and is not created again"
        if want.attributes.get("end") != have.get("end"):
            message += f"; the plan moves its end to {want.attributes.get('end')}"
    else:
        return None
    return Note(want.address, message, want.system, want.kind, details)
