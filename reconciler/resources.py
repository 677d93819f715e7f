"""The one type desired and live state share, and what each vendor can express.

The policy loader and every provider produce `Resource`s; the planner diffs them by `address`.
`Capabilities` is what a provider declares it can do; the policy checks read it so that a policy asking
a vendor for what it cannot do fails at validation, before any request.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any


class Kind(StrEnum):
    USER = "user"
    DEVICE = "device"
    GATEWAY = "gateway"
    ASSOCIATION = "association"
    INVITATION = "invitation"
    PERMISSION = "permission"
    KEY = "key"
    SHARE = "share"
    TEMP_KEY = "temp_key"


GRANT_KINDS = frozenset({Kind.PERMISSION, Kind.KEY, Kind.SHARE, Kind.TEMP_KEY})


class Status(StrEnum):
    PRESENT = "present"   # live and in force (or, for desired, should exist)
    PENDING = "pending"   # the vendor is still working on it (async create, approval, sent invitation)
    ABSENT = "absent"     # desired only: must not exist (decommission)


def address_of(system: str, kind: str, name: str) -> str:
    return f"{system}/{kind}/{name}"


# A grant's name is `user/device[/OPERATION]`; a person with several windows on one door has one grant per
# window, named `<slot>@<start>` (`@now` for the window without a start). The slot is what the vendor keys on.
WINDOW_MARK = "@"


def grant_slot(name: str) -> str:
    """`alice/front-gate/OPEN@2026-03-01T00:00:00Z` → `alice/front-gate/OPEN` (also drops a `#<id>` suffix)."""
    return name.split("#", 1)[0].split(WINDOW_MARK, 1)[0]


def grant_parts(name: str) -> list[str]:
    """A grant name's parts without its window: `[user, device]` or `[user, device, operation]`."""
    return grant_slot(name).split("/")


def unknown_name(vendor_id: str) -> str:
    """Name for a live object that neither policy nor state knows: `id:<vendor id>`."""
    return f"id:{vendor_id}"


@dataclass(frozen=True)
class Resource:
    """A thing in a vendor system, desired or live.

    - `name`: the part of the address after the kind: `alice`, `lobby/front-gate`, `alice/front-gate/OPEN`.
    - `attributes`: the comparable part; desired and live must use the same keys and value formats.
    - `meta`: shown but never compared (serial numbers, vendor states, expiry of a pending invitation).
    - `id`: the vendor's id where known.
    - `managed`: live only; whether this object belongs to the policy (known through state or policy),
      which decides between revoking/deleting it and only listing it.
    - `depends_on`: addresses that must exist before this one is created.
    - `source`: `file:line` of the policy entry that declared it.
    """

    system: str
    kind: str
    name: str
    attributes: Mapping[str, Any] = field(default_factory=dict)
    id: str | None = None
    status: Status = Status.PRESENT
    meta: Mapping[str, Any] = field(default_factory=dict)
    managed: bool = True
    depends_on: tuple[str, ...] = ()
    source: str | None = None
    replace_on_change: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    @property
    def address(self) -> str:
        return address_of(self.system, self.kind, self.name)

    @property
    def is_grant(self) -> bool:
        return self.kind in GRANT_KINDS


@dataclass(frozen=True)
class Capabilities:
    """What a vendor can express; checked against the policy before any request is sent."""

    vendor: str
    grant_kind: Kind                                   # what a permission becomes on this vendor
    user_accounts: bool = False                        # users are accounts created in the system
    requires_end: bool = False                         # every grant needs an end
    schedules: bool = False                            # weekly schedules
    operations: frozenset[str] = frozenset()           # permission operations; empty: none accepted
    key_validity: bool = False                         # operating key validity P1D..P31D
    share_roles: frozenset[str] = frozenset()          # permission `role`; empty: not accepted
    gateways: bool = False
    max_associations: int = 0
    temp_keys: bool = False
    creates_devices: bool = False                      # False: a device entry needs `id` (adopt)
    device_fields: frozenset[str] = frozenset({"name"})  # optional device fields besides system/id
    device_id_pattern: str | None = None               # regex an adopted id must match
    mobile_key: bool = False
    needs_phone: bool = False                          # grants go to the user's phone
    needs_email: bool = False                          # grants go to the user's email
    immutable_grants: bool = False                     # a changed grant is revoke + create
    settings: frozenset[str] = frozenset()             # system keys besides vendor/url/credentials/unmanaged
    required_settings: frozenset[str] = frozenset()    # of those, the ones a system must give
    credentials: frozenset[str] = frozenset()          # credential names the vendor needs
    # Alternative complete sets of credentials (e.g. email+password, or an operator token); when given,
    # any name from them is accepted and one set must be complete. Empty: `credentials` is the one set.
    credential_sets: tuple[frozenset[str], ...] = ()
    open_ended: bool = True                            # a grant may omit `end`
    several_windows: bool = False                      # several grants per person and device (split shifts)
    production_url: str = ""                           # the vendor's production base URL (default `url`)
    grant_notify: bool = False                         # a permission may say `notify:` for its grants
    setting_durations: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # setting → seconds (min, max)


def digest(value: Any) -> str:
    """A short stable digest of JSON-able data (attributes, a resource's live form): `sha256:<hex>`."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def format_time(moment: datetime) -> str:
    """The one timestamp format of attributes, state and plans: UTC, whole seconds, `Z`."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """Parse an ISO 8601 timestamp with a zone (`Z` or an offset) as vendors send it."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp without a timezone: {text!r}")
    return moment.astimezone(UTC)


_DURATION = re.compile(r"^P(?:(\d+)D)?(?:T(?=\d)(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$")


def duration_seconds(text: str) -> int | None:
    """Seconds of an ISO 8601 duration of days and time (`P7D`, `PT24H`, `P1DT12H`); None when it is not
    one (months and years have no fixed length, so they are not accepted)."""
    match = _DURATION.match(text)
    if not match or text in ("P", "PT") or not any(match.groups()):
        return None
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def normalise_time(text: str | None) -> str | None:
    return None if text is None else format_time(parse_time(text))
