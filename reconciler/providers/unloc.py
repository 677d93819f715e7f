"""Unloc Integrator API v1 provider, vendor `unloc`: keys on a lock holder's locks.

Endpoints, field mapping and capabilities only; the workflow is `Provider`'s. The CLI builds it through
`providers.factory` for every policy system with `vendor: unloc`.

- Auth: OAuth2 client credentials (`POST /auth/v1/token/`, a JSON body, `scope` an array) scoped to one lock holder
  (`lockHolder.admin:<lock_holder_id>`, the system setting `lock_holder_id`). The token is kept until its
  `expires_in` runs out and requested again when the vendor answers 401 (`JWT expired`).
- Locks cannot be created: devices adopt an existing lock by `id`. A permission on a lock becomes one key
  per person and lock, addressed `<user>/<device>`, sent to the person's E.164 phone (`userId`). Keys
  have a natural key (phone, lock), so nothing about them needs state: a live key is mapped back to the
  policy user whose phone it was sent to (`id:<phone>` when nobody's).
- Keys are immutable: a changed window or weekly schedule is revoke + create (the plan says `replace`).
  A key is revoked with `PATCH {state: revoked}`; it stays at the vendor in that state.
- Creation is asynchronous (`creating`, then `scheduled`/`active`); a `creating` key is pending, not
  drift. A key the vendor failed to make (`error`) is reported and created again; `revoked` and `expired`
  keys are history, not access.
- Reads: the lock list and the lock holder's key list, paged with the largest page (500) to the end.
  That list holds the keys created through the API, which is how this tool creates them; keys made by
  hand in the Unloc app do not appear in it, so this provider neither sees nor revokes them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import httpx
from pydantic import field_validator

from reconciler.errors import VendorError
from reconciler.plan import Action, Note
from reconciler.providers.answers import (
    MAX_PAGES,
    Id,
    VendorFault,
    adapter,
    created,
    fault,
    listing,
    model,
    page_of,
    parse,
    unique,
)
from reconciler.providers.base import HandlerTable, Provider, ReadResult
from reconciler.providers.http import HttpClient, json_error
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
    grant_parts,
    grant_slot,
    normalise_time,
    unknown_name,
)
from reconciler.text import printable

log = logging.getLogger(__name__)

PAGE_SIZE = 500                 # the largest page the key list allows (API-SURFACE §2)
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
WEEK = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")   # the policy's order of days, for comparison

# The one endpoint table (API-SURFACE §2): a path correction is a one-line change.
PATHS = {
    "token": "/auth/v1/token/",
    "locks": "/integrators/v1/lock-holders/{lh}/locks",
    "keys": "/integrators/v1/lock-holders/{lh}/keys",
    "lock_keys": "/integrators/v1/lock-holders/{lh}/locks/{lock}/keys/",
    "key": "/integrators/v1/lock-holders/{lh}/locks/{lock}/keys/{key}",
}

# Key states [doc]. Anything else (a state added later) is taken as access in force: creating a second
# key because a state is new to us would be worse than listing one we do not understand.
CREATING, ERROR = "creating", "error"
HISTORY = frozenset({"revoked", "expired"})
WORKING = frozenset({CREATING, "scheduled", "active"})
PENDING_MESSAGE = "key being created by Unloc"

# A key starts in `creating` and Unloc moves it to `scheduled`/`active` later, or to `error` [doc]; the
# documents say nothing about when a revoked key stops opening the lock.
ENFORCEMENT = Enforcement(grant="in force once Unloc moves the key out of `creating`",
                          pending=frozenset({CREATING}), failed=frozenset({ERROR}))

CAPABILITIES = Capabilities(
    vendor="unloc",
    grant_kind=Kind.KEY,
    needs_phone=True,
    creates_devices=False,
    device_fields=frozenset(),
    device_id_pattern=UUID_PATTERN,
    credentials=frozenset({"client_id", "client_secret"}),
    several_windows=True,
    attributes={
        # A key cannot be updated: any change is a revoke and a new key. `notify` goes with the create
        # and is never read back.
        Kind.KEY: KindSchema({"start": Attribute(str), "end": Attribute(str, default=None),
                              "schedule": Attribute(list, default=None),
                              "notify": Attribute(bool, compared=False)}, immutable=True,
                             enforcement=ENFORCEMENT),
    },
)


describe_error = json_error("error", "errorDescription")

# The answers' shapes [doc]: strict on what the tool relies on, lenient on the rest.
SPAN = model("Span", {"weekday": str, "startHour": int, "startMinute": int, "endHour": int, "endMinute": int},
             optional=("startHour", "startMinute", "endHour", "endMinute"))
RECURRENCE = model("Recurrence", {"timeSpans": list[SPAN] | None}, optional=("timeSpans",))   # type: ignore[valid-type]
KEY = model("Key", {"id": Id, "lockId": str, "state": str, "start": str | None, "end": str | None,
                    "recurrence": RECURRENCE | None, "toUser": dict[str, Any] | None},
            optional=("lockId", "state", "start", "end", "recurrence", "toUser"))
CREATED = adapter(model("Created", {"key": KEY}))
TOKEN = adapter(model("Token", {"access_token": str, "expires_in": float | str | None}, optional=("expires_in",)))


class UnlocSettings(VendorSettings):
    lock_holder_id: str                # the lock holder whose locks the keys open
    notify: bool = True                # false: keys are created without the SMS/push invitation

    @field_validator("lock_holder_id")
    @classmethod
    def _uuid(cls, value: str) -> str:
        if not re.fullmatch(UUID_PATTERN, value):
            raise ValueError(f"'{value}' is not a UUID: lock_holder_id is the id of the lock holder, "
                             "e.g. 866b8a35-4184-44c5-8ffd-448a77e5a91c")
        return value


class UnlocProvider(Provider):
    capabilities = CAPABILITIES
    vendor = CAPABILITIES.vendor       # its name, stated once here; registered under it in pyproject.toml
    default_url = "https://api.unloc.app"
    settings_model = UnlocSettings
    settings: UnlocSettings
    simulator = "reconciler.sandbox.unloc:UnlocSimulator"
    credential_variables: ClassVar[Mapping[str, str]] = {"client_id": "UNLOC_CLIENT_ID",
                                                         "client_secret": "UNLOC_CLIENT_SECRET"}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lock_holder = self.settings.lock_holder_id.lower()
        self.notify = self.settings.notify
        self._secret = {k: v.reveal() for k, v in self.credentials.items()}
        self._seen: set[str] = set()     # key ids the last read saw: never "found" as a lost create's result

    def http_headers(self) -> dict[str, str]:
        return {"Accept": "application/json"}

    def describe_error(self, response: httpx.Response) -> str:
        return describe_error(response)

    # -- auth ----------------------------------------------------------------------------------------
    def _login(self, http: HttpClient) -> tuple[dict[str, str], float | None]:
        # The documented JSON body, `scope` an array (Unloc's "Getting an access token", Integrator; API-SURFACE
        # §2 [doc]): the vendor answers a form body with 415.
        body = {"grant_type": "client_credentials", "client_id": self._secret["client_id"],
                "client_secret": self._secret["client_secret"], "scope": [f"lockHolder.admin:{self.lock_holder}"]}
        try:
            # Asking for a token twice is harmless: safe to repeat after a lost answer.
            response = http.request("POST", PATHS["token"], json=body, idempotent=True, authenticated=False)
        except VendorError as exc:
            message = str(exc).removeprefix(f"{self.name}: ")
            raise VendorError(f"{self.name}: token request failed: {message}", status=exc.status,
                              temporary=exc.temporary) from None
        answer = parse(response, TOKEN, self.name)
        token = answer["access_token"]
        self.redactor.add(token)
        if not token:
            raise VendorError(f"{self.name}: token request failed: the answer has no access_token")
        expires_in = answer.get("expires_in")
        # The HTTP client renews ahead of this lifetime; without `expires_in`, only on a 401.
        try:
            lifetime: float | None = float(expires_in) if float(expires_in) > 0 else None
        except (TypeError, ValueError):
            lifetime = None
        log.info("token obtained system=%s expires_in=%s", self.name, expires_in)
        return {"Authorization": f"Bearer {token}"}, lifetime

    # -- reading -------------------------------------------------------------------------------------
    def _path(self, endpoint: str, **ids: str) -> str:
        return PATHS[endpoint].format(lh=self.lock_holder, **ids)

    def list_locks(self) -> list[dict[str, Any]]:
        return listing(self.http.request("GET", self._path("locks")), "locks", self.name, fold=True)

    def list_keys(self) -> list[dict[str, Any]]:
        """Every key of the lock holder: `limit=500`, following `startAfterId` to the end."""
        keys: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": PAGE_SIZE}
        shape = page_of("keys", extra={"startAfterId": str | None}, item=KEY)
        cursors: set[str] = set()
        path = self._path("keys")
        while True:
            body = parse(self.http.request("GET", path, params=params), shape, self.name)
            page = body["keys"]
            keys.extend(page)
            cursor = body.get("startAfterId")
            if not cursor or not page:
                return unique(keys, system=self.name, what=f"GET {path}", fold=True)
            if cursor in cursors:
                raise VendorFault(f"{self.name}: GET {path}: the vendor sent page token {printable(cursor)[:60]} "
                                  "twice; refusing to page in a loop")
            if len(cursors) >= MAX_PAGES:
                raise VendorFault(f"{self.name}: GET {path}: more than {MAX_PAGES} pages; refusing to page on")
            cursors.add(cursor)
            params = {"limit": PAGE_SIZE, "startAfterId": cursor}

    def read_live(self, desired: list[Resource]) -> ReadResult:
        with ThreadPoolExecutor(2) as pool:
            locks_read, keys_read = pool.submit(self.list_locks), pool.submit(self.list_keys)
            locks, keys = locks_read.result(), keys_read.result()
        self._seen = {str(k.get("id")) for k in keys}
        devices = self._device_names()
        people = self._people(desired)
        result = ReadResult()
        add = result.resources.append

        for lock in locks:
            lock_id = str(lock.get("id", "")).lower()
            name = devices.get(lock_id)
            add(Resource(self.name, Kind.DEVICE, name or unknown_name(lock_id), {"name": lock.get("name")},
                         id=lock_id, managed=name is not None))

        working: set[tuple[str, str]] = set()
        failed: list[dict[str, Any]] = []
        for key in keys:
            lock_id = str(key.get("lockId", "")).lower()
            device = devices.get(lock_id)
            state = key.get("state")
            if device is None:
                continue    # not a lock this policy manages
            phone = phone_of(key)
            if state in HISTORY:     # no longer access, but still listed: not lost (`check_listing`)
                result.listed.add(address_of(self.name, Kind.KEY, f"{people.get(phone) or unknown_name(phone)}/{device}"))
                continue
            if state == ERROR:
                failed.append(key)
                continue
            working.add((phone, lock_id))
            user = people.get(phone) or unknown_name(phone)
            meta: Meta = {"state": state, "lock_id": lock_id}
            status = Status.PRESENT
            if state == CREATING:
                status = Status.PENDING
                meta["pending"] = PENDING_MESSAGE
            elif state not in WORKING:
                log.warning("unknown key state taken as in force system=%s key=%s state=%s", self.name,
                            key.get("id"), state)
            live = Resource(self.name, Kind.KEY, f"{user}/{device}", self._key_attributes(key, self._path("keys")),
                            id=str(key["id"]), status=status, meta=meta)
            add(live)

        for key in failed:
            phone, lock_id = phone_of(key), str(key.get("lockId", "")).lower()
            if (phone, lock_id) in working:
                continue    # a later key for the same person and lock works: nothing left to do
            address = address_of(self.name, Kind.KEY, f"{people.get(phone) or unknown_name(phone)}/{devices[lock_id]}")
            reason = key.get("errorDescription") or key.get("error") or "no reason given"
            declared = address in self.desired or any(grant_slot(a) == address for a in self.desired)
            then = ("the plan creates it again" if declared else "it is not in the policy, so it is left alone")
            result.warnings.append(Note(address, f"Unloc failed to create this key ({reason}); {then}",
                                        self.name, Kind.KEY, (("id", str(key.get("id"))), ("state", ERROR))))
        return result

    def _device_names(self) -> dict[str, str]:
        prefix = f"{self.name}/{Kind.DEVICE}/"
        return {vid.lower(): address[len(prefix):] for address, vid in self.ids.items() if address.startswith(prefix)}

    def _people(self, desired: list[Resource]) -> dict[str, str]:
        """Phone → policy user, from the desired keys (the policy puts each user's phone in their meta)."""
        people: dict[str, str] = {}
        for want in sorted(desired, key=lambda r: r.address):
            phone = want.meta.get("phone")
            if want.kind == Kind.KEY and phone:
                people.setdefault(phone, want.name.split("/", 1)[0])
        return people

    # -- keys ----------------------------------------------------------------------------------------
    def create_key(self, want: Resource) -> None:
        _, device = grant_parts(want.name)
        lock_id = self._lock_id(device)
        phone = want.meta.get("phone")
        if not phone:
            raise VendorError(f"{want.address}: the user has no phone; Unloc sends keys to a phone number")
        attrs = want.attributes
        body: dict[str, Any] = {"userId": phone, "start": attrs.get("start"), "end": attrs.get("end")}
        if attrs.get("schedule"):
            body["recurrence"] = {"timeSpans": time_spans(attrs["schedule"])}
        # `notify:` on the permission decides for its keys; the system's `notify:` is the default.
        if not want.meta.get("notify", self.notify):
            body["skipInviteNotification"] = True
        path = self._path("lock_keys", lock=lock_id)
        expected = {"start": attrs.get("start"), "end": attrs.get("end"), "schedule": attrs.get("schedule")}

        def send() -> httpx.Response:
            return self.http.request("POST", path, json=body, idempotent=False)

        def find() -> dict[str, Any] | None:
            # Keys have no idempotency key: a lost answer is looked up among the lock's keys by what makes
            # this key ours (phone, lock, window, schedule) and by being new since the plan's read.
            claimed = self._seen | set(self.ids.values())
            for key in listing(self.http.request("GET", path), "keys", self.name, fold=True, item=KEY):
                if (str(key.get("id")) not in claimed and key.get("state") in WORKING
                        and phone_of(key) == phone and str(key.get("lockId", "")).lower() == lock_id
                        and _same_window(self._key_attributes(key, path), expected)):
                    return dict(key)
            return None

        answer = self.create_checked(send, find)
        # The answer is read after the send, not inside it: a malformed one leaves the key uncertain (the next
        # read finds it by its phone, lock and window), never looked up and sent again in the same breath.
        key = created(answer, CREATED, self.name)["key"] if isinstance(answer, httpx.Response) else answer
        self._seen.add(str(key.get("id")))
        log.info("key created system=%s address=%s key=%s state=%s", self.name, want.address, key.get("id"),
                 key.get("state"))

    def delete_key(self, live: Resource) -> None:
        lock_id = live.meta.get("lock_id") or self._lock_id(grant_parts(live.name)[1])
        self.http.request("PATCH", self._path("key", lock=lock_id, key=str(live.id)), json={"state": "revoked"},
                          idempotent=True, expect=(404,))

    def revoked_still_there(self, live: Resource) -> bool | None:
        if live.kind != Kind.KEY or not live.id:
            return None
        lock_id = live.meta.get("lock_id") or self._lock_id(grant_parts(live.name)[1])
        keys = listing(self.http.request("GET", self._path("lock_keys", lock=lock_id)), "keys", self.name, fold=True,
                       item=KEY)
        return any(str(k["id"]).lower() == str(live.id).lower() and k.get("state") not in HISTORY for k in keys)

    def _key_attributes(self, key: Mapping[str, Any], path: str) -> dict[str, Any]:
        """A listed key's attributes; a time that does not parse is the vendor's fault, in one line."""
        try:
            return key_attributes(key)
        except ValueError as exc:
            raise fault(self.name, "GET", path, f"key {key.get('id')}: {exc}") from None

    def _lock_id(self, device: str) -> str:
        lock_id = self.ids.get(address_of(self.name, Kind.DEVICE, device))
        if not lock_id:
            raise VendorError(f"{self.name}: device {device} has no lock id (unloc adopts locks by `id:`)")
        return lock_id.lower()

    handlers: ClassVar[HandlerTable] = {(Action.CREATE, Kind.KEY): create_key, (Action.DELETE, Kind.KEY): delete_key}


# -- field mapping -----------------------------------------------------------------------------------------

def phone_of(key: Mapping[str, Any]) -> str:
    """The key holder's phone in E.164. The vendor's own example lists one as a bare number
    (`61452912456`); the API takes and answers `+…`, so a bare number gets its `+` back."""
    user = key.get("toUser") or {}
    raw = str(user.get("id", "") if isinstance(user, Mapping) else "").replace(" ", "")
    return f"+{raw}" if raw.isdigit() else raw


def key_attributes(key: Mapping[str, Any]) -> dict[str, Any]:
    """A key as the policy expresses a grant: `start`, `end` (None: open-ended), `schedule` when the key
    has a recurrence (the policy's normalised list of `{day, from, to}`)."""
    try:
        attrs: dict[str, Any] = {"start": normalise_time(key.get("start") or None),
                                 "end": normalise_time(key.get("end") or None)}
    except ValueError as exc:
        raise ValueError(f"unreadable time ({exc})") from None
    schedule = schedule_of(key.get("recurrence"))
    if schedule:
        attrs["schedule"] = schedule
    return attrs


def schedule_of(recurrence: Any) -> list[dict[str, str]]:
    """`{timeSpans: [{weekday, startHour, startMinute, endHour, endMinute}]}` → the policy's form:
    one `{day, from, to}` per span, in weekday order (Monday first), `HH:MM`, `24:00` for end of day."""
    if not isinstance(recurrence, Mapping):
        return []
    spans = []
    for span in recurrence.get("timeSpans") or []:
        day = str(span.get("weekday", "")).lower()
        spans.append({"day": day,
                      "from": f"{int(span.get('startHour', 0)):02d}:{int(span.get('startMinute', 0)):02d}",
                      "to": f"{int(span.get('endHour', 0)):02d}:{int(span.get('endMinute', 0)):02d}"})
    return sorted(spans, key=lambda s: (WEEK.index(s["day"]) if s["day"] in WEEK else 7, s["from"], s["to"]))


def time_spans(schedule: list[Mapping[str, str]]) -> list[dict[str, Any]]:
    """The policy's `{day, from, to}` spans → Unloc `timeSpans` (`24:00` is endHour 24, endMinute 0)."""
    spans = []
    for span in schedule:
        start_hour, start_minute = (int(part) for part in span["from"].split(":"))
        end_hour, end_minute = (int(part) for part in span["to"].split(":"))
        spans.append({"weekday": span["day"], "startHour": start_hour, "startMinute": start_minute,
                      "endHour": end_hour, "endMinute": end_minute})
    return spans


def describe_schedule(schedule: list[Mapping[str, str]]) -> str:
    return ", ".join(f"{s['day']} {s['from']}-{s['to']}" for s in schedule)


def _same_window(live: Mapping[str, Any], expected: Mapping[str, Any]) -> bool:
    # A key sent without a start starts when Unloc makes it: any start matches then.
    if expected["start"] is not None and live.get("start") != expected["start"]:
        return False
    return live.get("end") == expected["end"] and (live.get("schedule") or None) == (expected["schedule"] or None)
