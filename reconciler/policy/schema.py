"""The policy format v1 (DESIGN §3) as pydantic models, and the merge of many files into one declaration set.

`load_policy` calls `parse` with the documents `yamlio` read. Every named entry is validated on its own, so
one bad entry does not hide the errors of the others; each pydantic error is mapped back to the YAML node it
is about (`file:line:col`) and reworded in plain words. What can be judged from one entry alone is checked
here (formats, `end` after `start`, schedule spans); what needs other entries or a vendor's capabilities is
in `checks.py`. The result types of the whole package, `SystemConfig` and `Policy`, live here too.
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import cache, cached_property, lru_cache
from typing import Annotated, Any, Generic, Literal, TypeVar, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import ErrorDetails

from reconciler import vendors
from reconciler.errors import Diagnostic, Location
from reconciler.plan import Acknowledgement, Rename, RevokeThreshold
from reconciler.resources import Resource
from reconciler.secret import Secret
from reconciler.urls import SANDBOX

from .yamlio import Document, Map, Seq, locate, plain

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
E164_RE = re.compile(r"^\+[1-9]\d{7,14}$")
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]+$")
COLOUR_RE = re.compile(r"^#[0-9a-fA-F]{6}$")
DURATION_RE = re.compile(r"^P(\d+)D$")
TIME_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
# Keys of a system entry that every vendor has; any other key is a vendor setting, checked against the vendor's
# capabilities and settings model (`checks._check_settings`): the entry is a union discriminated on `vendor`.
SYSTEM_KEYS = ("vendor", "url", "credentials", "unmanaged", "concurrency", "deadline", "mass_revoke", "offboarding",
               "timezone")

Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
Role = Literal["USER", "ADMIN"]


# ---------------------------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class SystemConfig:
    """One vendor connection, ready for the provider factory: credentials resolved from the environment."""

    name: str
    vendor: str
    url: str | None                      # None: the vendor's production URL; "sandbox"; or an http(s) URL
    credentials: dict[str, Secret]
    unmanaged: Literal["revoke", "report"] = "revoke"
    settings: dict[str, Any] = field(default_factory=dict)
    concurrency: int = 8
    deadline: int = 120                  # seconds: reads, and apply without any answer, give up after it
    source: Location = Location("")
    mass_revoke: RevokeThreshold = RevokeThreshold()
    offboarding: Acknowledgement = Acknowledgement()
    timezone: str = "UTC"                # IANA name: weekly schedules and times without an offset are read in it

    @property
    def is_sandbox(self) -> bool:
        return self.url == SANDBOX


@dataclass(frozen=True)
class Policy:
    """A valid policy: its systems, the desired resources (sorted by address) and non-fatal warnings."""

    systems: dict[str, SystemConfig]
    resources: list[Resource]
    warnings: list[Diagnostic]
    files: list[str]
    emails: dict[str, str] = field(default_factory=dict)     # email → user name, to name people vendors know by email
    renames: list[Rename] = field(default_factory=list)      # `previously:`, per system the entry exists on
    ignore: tuple[str, ...] = ()                             # `ignore:` patterns
    evidence: dict[str, dict[str, str]] = field(default_factory=dict)   # address → what identifies it (digests)
    assertions: list[Any] = field(default_factory=list)      # `assertions:` resolved (`proofs.Assertion`)
    rules: list[Any] = field(default_factory=list)           # `rules:` resolved (`proofs.Rule`)


# ----------------------------------------------------------------------------------------------------- models

class _Model(BaseModel):
    # strict: YAML already gives typed values, and coercing "yes" into True or 1 into "1" would hide mistakes.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Open(_Model):
    """An entry whose vendor may declare more keys (a grant or device attribute in its schema): keys besides
    the model's are kept (`model_extra`) and checked against the vendors' schemas once the systems are known
    (`checks.check_declared_keys`): type-checked where the entry's vendor declares the key, an error at the key
    where it does not, `unknown key` where no vendor does."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


def _instant(value: Any, name: str) -> datetime:
    example = "e.g. 2026-01-01T00:00:00Z"
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, date):
        raise ValueError(f"{name} needs a time and a timezone, {example}")
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"'{value}' is not a date and time; write ISO 8601, {example}") from None
    else:
        raise ValueError(f"expected a date and time for {name}, {example}")
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValueError(f"{name} needs a timezone: add Z or an offset such as +01:00, {example}")
    return parsed.astimezone(UTC)


# Why `phonenumbers` finds a number impossible, in words (ValidationResult and NumberParseException codes).
_PHONE_REASONS = {
    "INVALID_COUNTRY_CODE": "the country code after + does not exist",
    "TOO_SHORT": "too few digits for its country",
    "TOO_LONG": "too many digits for its country",
    "INVALID_LENGTH": "the wrong number of digits for its country",
    "IS_POSSIBLE_LOCAL_ONLY": "a local number only: add the area code",
    "NOT_A_NUMBER": "not a phone number",
    "TOO_SHORT_NSN": "too few digits",
    "TOO_SHORT_AFTER_IDD": "too few digits after the international prefix",
}


def normalise_phone(value: Any) -> Any:
    """A phone number as people write it (`"+47 900 00 001"`, `"+47 (0)900-00-001"`) → E.164 (`+4790000001`),
    which is what is stored, compared and sent. Without a country code, or impossible for its country, it is
    refused with the reason. phonenumbers is imported here, when a policy has a phone, not at start-up."""
    if isinstance(value, int) and not isinstance(value, bool):
        # Unquoted, `+4790000001` is read by YAML as the number 4790000001: the + is gone.
        raise ValueError(f'a phone number must be a quoted string, e.g. "+{value}" '
                         "(unquoted YAML reads it as a number)")
    if not isinstance(value, str):
        return value
    import phonenumbers

    written = value.strip()
    if written.startswith("00"):
        raise ValueError(f"'{value}' starts with 00: write the country code after +, e.g. +47 900 00 001")
    if not written.startswith("+"):
        raise ValueError(f"'{value}' has no country code: write it in international form, e.g. +47 900 00 001")
    try:
        number = phonenumbers.parse(written, None)
    except phonenumbers.NumberParseException as exc:
        kinds = {getattr(phonenumbers.NumberParseException, name): name for name in _PHONE_REASONS
                 if hasattr(phonenumbers.NumberParseException, name)}
        reason = _PHONE_REASONS.get(kinds.get(exc.error_type, ""), "not a phone number")
        raise ValueError(f"'{value}' is not a possible phone number: {reason}") from None
    result = phonenumbers.is_possible_number_with_reason(number)
    if result != phonenumbers.ValidationResult.IS_POSSIBLE:
        names = {getattr(phonenumbers.ValidationResult, name): name for name in _PHONE_REASONS
                 if hasattr(phonenumbers.ValidationResult, name)}
        reason = _PHONE_REASONS.get(names.get(result, ""), "not a possible number")
        raise ValueError(f"'{value}' is not a possible phone number: {reason}")
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    if not E164_RE.match(e164):
        raise ValueError(f"'{value}' is not an E.164 phone number (+ and 8..15 digits)")
    return e164


def _earlier_keys(value: list[str] | None) -> list[str] | None:
    """`previously:`: keys this entry had before, each a valid name."""
    for name in value or ():
        if not NAME_RE.match(name):
            raise ValueError(f"'{name}' is not a valid key: `previously:` lists the keys this entry had before "
                             "(lower-case letters, digits, '.', '_' and '-')")
    return value


class MassRevokeModel(_Model):
    """The system's mass-revoke guard: apply refuses a plan revoking more than `percent` % of its managed
    grants (once there are at least `minimum`) unless `acknowledge` quotes the token that plan shows."""

    percent: Annotated[float | int, Field(ge=0, le=100)] = 25
    minimum: Annotated[int, Field(ge=0)] = 10
    acknowledge: Annotated[str, Field(pattern=r"^revoke-[0-9a-f]{16}$")] | None = None


class OffboardingModel(_Model):
    """Suspected renames (a user leaving, another with the same email or phone arriving) that really are one
    leaving and one arriving: `acknowledge` quotes the token the plan shows for exactly those pairs."""

    acknowledge: Annotated[str, Field(pattern=r"^offboard-[0-9a-f]{16}$")]


class SystemModel(_Model):
    vendor: str
    url: str | None = None
    credentials: dict[str, Any] | None = None
    unmanaged: Literal["revoke", "report"] = "revoke"
    concurrency: Annotated[int, Field(ge=1)] = 8
    deadline: Annotated[int, Field(ge=1, le=3600)] = 120
    mass_revoke: MassRevokeModel | None = None
    offboarding: OffboardingModel | None = None
    timezone: str = "UTC"     # IANA time zone of the site: weekly schedules are local times in it

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"'{value}' is not an IANA time zone (e.g. Europe/Oslo, UTC)") from None
        return value

    @field_validator("vendor")
    @classmethod
    def _known_vendor(cls, value: str) -> str:
        known = vendors.names()     # the registered vendors (reconciler.vendors), read from the metadata only
        if value not in known:
            raise ValueError(f"unknown vendor '{value}'{did_you_mean(value, known)}; use one of {', '.join(known)}")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None or value == SANDBOX:
            return value
        parts = urlsplit(value)
        if parts.username or parts.password:
            # Do not echo it: the URL carries a secret.
            raise ValueError("a URL must not carry credentials; put them under `credentials:` as ${ENV_VAR}")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"'{value}' is not a URL: use sandbox or an http(s) URL")
        return value.rstrip("/")


@dataclass(frozen=True)
class UserField:
    """Marks a user field that becomes an attribute of the person's account on vendors whose user schema
    (`Capabilities.schema("user")`) declares it (`role` on one vendor; `email`, `name`, `phone` on another).
    Expansion and export read that schema, so an account carries exactly what its vendor declares."""


USER_FIELD = UserField()


class UserModel(_Model):
    name: Annotated[str | None, Field(min_length=1, max_length=255), USER_FIELD] = None
    email: Annotated[str | None, USER_FIELD] = None
    phone: Annotated[str | None, USER_FIELD] = None
    role: Annotated[Role, USER_FIELD] = "USER"
    mobile_key: bool | None = None     # None: operating devices are left alone; false removes one
    systems: list[str] | None = None
    ids: dict[str, Annotated[str, Field(min_length=1)]] | None = None   # adopt existing accounts: system → vendor id
    previously: Annotated[list[str] | None, AfterValidator(_earlier_keys)] = None   # earlier keys: a rename

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value is not None and not EMAIL_RE.match(value):
            raise ValueError(f"'{value}' is not an email address")
        return value

    @field_validator("phone", mode="before")
    @classmethod
    def _phone(cls, value: Any) -> Any:
        return normalise_phone(value)


@dataclass(frozen=True)
class DeviceField:
    """Marks a device field that becomes an attribute of the device on vendors whose device schema
    (`Capabilities.schema("device")`) declares it; elsewhere giving it is an error at its key."""


DEVICE_FIELD = DeviceField()


class DeviceModel(_Open):
    system: str
    name: Annotated[str | None, Field(min_length=1, max_length=255), DEVICE_FIELD] = None
    id: str | int | None = None
    decommission: bool = False
    favourite: Annotated[bool | None, DEVICE_FIELD] = None
    colour: Annotated[str | None, DEVICE_FIELD] = None
    # seconds the lock stays open
    unlock_duration: Annotated[int | None, Field(ge=1, le=3600), DEVICE_FIELD] = None
    previously: Annotated[list[str] | None, AfterValidator(_earlier_keys)] = None   # earlier keys: a rename

    @field_validator("id", mode="before")
    @classmethod
    def _id(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError("expected the vendor's id of the device as a string")
        if isinstance(value, str) and not value.strip():
            raise ValueError("the device id is empty")
        return value

    @field_validator("colour", mode="before")
    @classmethod
    def _colour(cls, value: Any) -> Any:
        if value is None:
            raise ValueError('colour is empty: quote it, e.g. "#2266aa" (unquoted, # starts a YAML comment)')
        if isinstance(value, str) and not COLOUR_RE.match(value):
            raise ValueError(f"'{value}' is not a colour: write #rrggbb")
        return value.lower() if isinstance(value, str) else value


class GatewayModel(_Model):
    system: str
    claiming_code: Annotated[str, Field(min_length=1)] | None = None   # needed to claim; not to adopt
    id: Annotated[str, Field(min_length=1)] | None = None              # adopt an already claimed gateway
    devices: list[str] = []
    decommission: bool = False
    previously: Annotated[list[str] | None, AfterValidator(_earlier_keys)] = None   # earlier keys: a rename


class SpanModel(_Model):
    days: Annotated[list[Day], Field(min_length=1)]
    start: str = Field(alias="from")
    end: str = Field(alias="to")

    @field_validator("start", "end")
    @classmethod
    def _time(cls, value: str, info: ValidationInfo) -> str:
        if TIME_RE.match(value) or (value == "24:00" and info.field_name == "end"):
            return value
        allowed = "00:00..24:00" if info.field_name == "end" else "00:00..23:59"
        raise ValueError(f"'{value}' is not a time of day: write \"HH:MM\", {allowed}")


@dataclass(frozen=True)
class GrantField:
    """Marks a permission field that becomes an attribute of each grant, on the vendors whose grant schema
    (`Capabilities.grant_schema`) declares it: the checks, expansion and export read that schema, so a new
    field is this declaration plus the vendors that support it. The words complete the messages:
    "<vendor> <lacks> (device … is on system …); remove `<field>:`<instead>", "<vendor> requires <noun>",
    "'<value>' is not <noun> on <vendor>"."""

    lacks: str
    noun: str
    instead: str = ""


class PermissionModel(_Open):
    users: list[str] = []
    groups: list[str] = []
    devices: Annotated[list[str], Field(min_length=1)]
    operations: Annotated[list[str], Field(min_length=1)] | None = None
    start: Annotated[datetime | None, GrantField("has no start", "a start")] = None
    end: Annotated[datetime | None, GrantField("has no end", "an end")] = None
    key_validity: Annotated[str | None, GrantField("has no key validity", "a key validity")] = None
    reason: str | None = None
    schedule: Annotated[str | None, GrantField("has no weekly schedules", "a schedule",
                                               " or use start and end")] = None
    role: Annotated[Role | None, GrantField("has no roles on grants", "a role")] = None
    # tell the person about a new key (default: the system's notify), where a vendor declares it
    notify: Annotated[bool | None, GrantField("cannot choose per grant whether the person is notified",
                                              "a choice to notify")] = None

    @field_validator("start", "end", mode="before")
    @classmethod
    def _instants(cls, value: Any, info: ValidationInfo) -> Any:
        return None if value is None else _instant(value, info.field_name or "")

    @field_validator("key_validity")
    @classmethod
    def _key_validity(cls, value: str | None) -> str | None:
        if value is None:
            return value
        match = DURATION_RE.match(value)
        if not match or not 1 <= int(match.group(1)) <= 31:
            raise ValueError(f"'{value}' is not a key validity between P1D and P31D (write P<days>D, e.g. P8D)")
        return f"P{int(match.group(1))}D"


class TempKeyModel(_Model):
    device: str
    access: Literal["public", "users"]
    users: list[str] | None = None
    start: datetime
    end: datetime
    max_uses: Annotated[int, Field(gt=0)] | None = None
    description: str | None = None

    @field_validator("start", "end", mode="before")
    @classmethod
    def _instants(cls, value: Any, info: ValidationInfo) -> Any:
        return _instant(value, info.field_name or "")


def model_keys(model: type[BaseModel]) -> list[str]:
    """The keys an entry of `model` takes by itself (aliases where given)."""
    return [f.alias or name for name, f in model.model_fields.items()]


def user_fields() -> tuple[str, ...]:
    """The user fields that may become account attributes, in declaration order."""
    return _marked(UserModel, UserField)


def device_fields() -> tuple[str, ...]:
    """The device fields that become device attributes, in declaration order."""
    return _marked(DeviceModel, DeviceField)


def grant_fields() -> Mapping[str, GrantField]:
    """The permission fields that become grant attributes, in declaration order."""
    return _marks(PermissionModel, GrantField)


@cache
def _marks(model: type[BaseModel], mark: type) -> Mapping[str, Any]:
    """A model's fields that carry a mark of `mark`'s type, with it (read once per model: the checks ask for
    every grant)."""
    return types.MappingProxyType({name: each for name, info in model.model_fields.items()
                                   for each in info.metadata if isinstance(each, mark)})


def _marked(model: type[BaseModel], mark: type) -> tuple[str, ...]:
    return tuple(_marks(model, mark))


GroupModel = list[str]
ScheduleModel = Annotated[list[SpanModel], Field(min_length=1)]
# Sections whose entries are not mappings are validated through adapters, by the noun of the section.
_ADAPTERS: dict[str, TypeAdapter[Any]] = {"group": TypeAdapter(GroupModel), "schedule": TypeAdapter(ScheduleModel)}


# ------------------------------------------------------------------------------------------------ declarations

@dataclass(frozen=True)
class Place:
    """Where an entry sits: the YAML container holding it and its key (or index) there."""

    path: str
    container: Any
    key: str | int

    def at(self, *keys: Any, at_key: bool = False) -> Location:
        """Location of a part of this entry; with no keys, the entry itself (its name, or its list item)."""
        if not keys:
            return locate(self.path, self.container, [self.key], at_key=True)
        return locate(self.path, self.container, [self.key, *keys], at_key=at_key)

    @cached_property
    def source(self) -> str:
        # Every resource an entry expands to carries it: looked up once per entry.
        location = self.at()
        return f"{location.path}:{location.line}"


M = TypeVar("M")


NO_EXTRA: Mapping[str, Any] = types.MappingProxyType({})


@dataclass(frozen=True)
class Entry(Generic[M]):
    """One declared entry. When its keys fail validation, `model` holds the keys that passed (`dropped` names
    the others), so that references and vendor checks still run on it and every error is reported in one run;
    `model` is None when not even that validates (a required key is wrong). Its name counts as declared either
    way, so that references to it do not add noise to the errors already reported."""

    name: str
    place: Place
    model: M | None
    settings: dict[str, Any] = field(default_factory=dict)   # systems only: vendor-specific keys
    dropped: frozenset[str] = frozenset()                      # keys already reported as wrong
    extra: Mapping[str, Any] = field(default_factory=lambda: NO_EXTRA)   # keys besides the model's (`_Open`), as written

    def given(self, key: str) -> bool:
        """Whether the entry declares `key` (a value that failed validation still counts: it was written)."""
        return key in self.dropped or getattr(self.model, key, None) not in (None, "", [])


@dataclass
class Declarations:
    """Every file merged: named entries by name, permissions in file order."""

    files: list[str] = field(default_factory=list)
    systems: dict[str, Entry[SystemModel]] = field(default_factory=dict)
    users: dict[str, Entry[UserModel]] = field(default_factory=dict)
    devices: dict[str, Entry[DeviceModel]] = field(default_factory=dict)
    gateways: dict[str, Entry[GatewayModel]] = field(default_factory=dict)
    groups: dict[str, Entry[list[str]]] = field(default_factory=dict)
    schedules: dict[str, Entry[list[SpanModel]]] = field(default_factory=dict)
    temp_keys: dict[str, Entry[TempKeyModel]] = field(default_factory=dict)
    permissions: list[Entry[PermissionModel]] = field(default_factory=list)
    ignore: list[tuple[str, Place]] = field(default_factory=list)     # `ignore:` patterns, where each is written
    assertions: list[Entry[Any]] = field(default_factory=list)     # `assertions:` in file order (proofs.py)
    rules: list[Entry[Any]] = field(default_factory=list)          # `rules:` in file order (proofs.py)


# Named sections: the model that validates one entry, and the word messages use for it.
NAMED_SECTIONS: dict[str, tuple[Any, str]] = {
    "systems": (SystemModel, "system"),
    "users": (UserModel, "user"),
    "devices": (DeviceModel, "device"),
    "gateways": (GatewayModel, "gateway"),
    "groups": (GroupModel, "group"),
    "schedules": (ScheduleModel, "schedule"),
    "temp_keys": (TempKeyModel, "temp key"),
}
SECTIONS = (*NAMED_SECTIONS, "permissions", "ignore", "assertions", "rules")
# An `ignore:` item: an address (`system/kind/name`) whose parts may hold `*` (within a part) or `**`.
IGNORE_RE = re.compile(r"^[a-z0-9*][a-z0-9._*-]*/(user|device|gateway|association|invitation|permission|key|share|"
                       r"temp_key|\*)/[A-Za-z0-9._:@#*+=/-]+$")


def parse(documents: list[Document]) -> tuple[Declarations, list[Diagnostic]]:
    """Merge and validate every document; returns what parsed and every problem found."""
    declarations = Declarations(files=[doc.path for doc in documents])
    diagnostics: list[Diagnostic] = []
    for doc in documents:
        if doc.root is None:
            continue  # an empty file (or only comments) declares nothing
        if not isinstance(doc.root, Map):
            diagnostics.append(Diagnostic(Location(doc.path, 1, 1),
                                          f"expected a mapping of sections ({', '.join(SECTIONS)})"))
            continue
        for section in doc.root:
            place = Place(doc.path, doc.root, section)
            if section not in SECTIONS:
                hint = did_you_mean(str(section), SECTIONS)
                diagnostics.append(Diagnostic(place.at(), f"unknown key '{section}'{hint}; "
                                              f"the sections are {', '.join(SECTIONS)}"))
                continue
            body = doc.root[section]
            if body is None:
                continue
            if section == "permissions":
                diagnostics += _parse_permissions(place, body, declarations)
            elif section == "ignore":
                diagnostics += _parse_ignore(place, body, declarations)
            elif section in ("assertions", "rules"):
                from .proofs import parse_assertions, parse_rules

                parser = parse_assertions if section == "assertions" else parse_rules
                diagnostics += parser(place, body, declarations)
            else:
                diagnostics += _parse_section(section, place, body, declarations)
    return declarations, diagnostics


def _parse_section(section: str, place: Place, body: Any, declarations: Declarations) -> list[Diagnostic]:
    model, noun = NAMED_SECTIONS[section]
    if not isinstance(body, Map):
        return [Diagnostic(place.at(), f"expected a mapping of {noun} names to {noun} entries")]
    diagnostics: list[Diagnostic] = []
    entries: dict[str, Entry[Any]] = getattr(declarations, section)
    for name in body:
        entry_place = Place(place.path, body, name)
        if not isinstance(name, str):
            diagnostics.append(Diagnostic(entry_place.at(), f"a {noun} name must be a string: quote it"))
            continue
        if not NAME_RE.match(name):
            diagnostics.append(Diagnostic(entry_place.at(), f"'{name}' is not a valid {noun} name: use lower-case "
                                          "letters, digits, '.', '_' and '-', starting with a letter or digit, "
                                          "at most 63 characters"))
        if name in entries:
            diagnostics.append(Diagnostic(entry_place.at(), f"{noun} '{name}' is already defined at "
                                          f"{entries[name].place.at()}"))
            continue
        value = body[name]
        settings: dict[str, Any] = {}
        if section == "systems" and isinstance(value, dict):
            # Vendor settings (lock_holder_id, partner_id, ...) depend on the vendor's capabilities: keep them
            # out of the model, which forbids unknown keys, and let checks.py judge them.
            settings = {k: plain(v) for k, v in value.items() if k not in SYSTEM_KEYS}
            data = {k: plain(v) for k, v in value.items() if k in SYSTEM_KEYS}
        else:
            data = plain(value)
        parsed, problems, dropped = _validate(model, data, entry_place, noun)
        diagnostics += problems
        if parsed is not None and not problems:
            problems = _check_entry(section, name, parsed, entry_place)
            diagnostics += problems
            if problems:
                parsed = None
        entries[name] = Entry(name, entry_place, parsed, settings, dropped, _extra(model, data))
    return diagnostics


def _extra(model: Any, data: Any) -> Mapping[str, Any]:
    """The keys of an entry of an open model (`_Open`) that the model does not have: a vendor may declare them.
    Most entries have none: they share one empty mapping (a fleet has a hundred thousand entries)."""
    if not (isinstance(model, type) and issubclass(model, _Open) and isinstance(data, dict)):
        return NO_EXTRA
    own = _own_keys(model)
    return NO_EXTRA if own.issuperset(data) else {k: v for k, v in data.items() if k not in own}


@cache
def _own_keys(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(model_keys(model))


def _parse_permissions(place: Place, body: Any, declarations: Declarations) -> list[Diagnostic]:
    if not isinstance(body, Seq):
        return [Diagnostic(place.at(), "expected a list of permissions (each item starts with -)")]
    diagnostics: list[Diagnostic] = []
    for index in range(len(body)):
        entry_place = Place(place.path, body, index)
        data = plain(body[index])
        parsed, problems, dropped = _validate(PermissionModel, data, entry_place, "permission")
        diagnostics += problems
        if parsed is not None and not problems:
            problems = _check_permission(parsed, entry_place)
            diagnostics += problems
            if problems:
                parsed = None
        location = entry_place.at()
        declarations.permissions.append(Entry(f"{location.path}:{location.line}", entry_place, parsed,
                                              dropped=dropped, extra=_extra(PermissionModel, data)))
    return diagnostics


def _parse_ignore(place: Place, body: Any, declarations: Declarations) -> list[Diagnostic]:
    if not isinstance(body, Seq):
        return [Diagnostic(place.at(), "expected a list of addresses or patterns (each item starts with -), "
                           "e.g. - hq/device/roof-*")]
    diagnostics: list[Diagnostic] = []
    for index in range(len(body)):
        item_place = Place(place.path, body, index)
        value = plain(body[index])
        if not isinstance(value, str) or not IGNORE_RE.match(value):
            diagnostics.append(Diagnostic(item_place.at(), "an ignore item is an address or pattern "
                                          "SYSTEM/KIND/NAME, e.g. hq/user/id:1234, hq/device/roof-*, "
                                          "hq/permission/*/archive/* (kinds: user, device, gateway, association, "
                                          "invitation, permission, key, share, temp_key)"))
            continue
        declarations.ignore.append((value, item_place))
    return diagnostics


# --------------------------------------------------------------------------------------- single-entry checks

def _check_entry(section: str, name: str, parsed: Any, place: Place) -> list[Diagnostic]:
    if section == "schedules":
        return _check_schedule(parsed, place)
    if section == "temp_keys":
        return _check_window(parsed, place) + _check_temp_key_users(parsed, place)
    if section == "systems" and parsed.concurrency > 64:
        return [Diagnostic(place.at("concurrency"), "concurrency above 64 is refused: vendors rate-limit long "
                           "before that")]
    return []


def _check_window(parsed: PermissionModel | TempKeyModel, place: Place) -> list[Diagnostic]:
    if parsed.start is not None and parsed.end is not None and parsed.end <= parsed.start:
        return [Diagnostic(place.at("end"), f"end ({utc_text(parsed.end)}) must be after start "
                           f"({utc_text(parsed.start)})")]
    return []


def _check_permission(parsed: PermissionModel, place: Place) -> list[Diagnostic]:
    problems = _check_window(parsed, place)
    if not parsed.users and not parsed.groups:
        problems.append(Diagnostic(place.at(), "a permission needs `users:` or `groups:` (or both)"))
    return problems


def _check_temp_key_users(parsed: TempKeyModel, place: Place) -> list[Diagnostic]:
    if parsed.access == "users" and not parsed.users:
        return [Diagnostic(place.at("access"), "access: users needs a non-empty `users:` list")]
    if parsed.access == "public" and parsed.users is not None:
        return [Diagnostic(place.at("users"), "`users:` is only used with access: users; a public key opens "
                           "for anyone")]
    return []


def _check_schedule(spans: list[SpanModel], place: Place) -> list[Diagnostic]:
    problems: list[Diagnostic] = []
    first_span_on: dict[str, int] = {}
    for index, span in enumerate(spans):
        if span.start >= span.end:
            problems.append(Diagnostic(place.at(index, "to"), f"to ({span.end}) must be after from ({span.start}); "
                                       "a span cannot cross midnight: end it at \"24:00\" and continue the next day"))
        for day_index, day in enumerate(span.days):
            if day in first_span_on:
                # Vendors allow one recurrence span per weekday, so two are refused rather than merged.
                where = ("earlier in this span" if first_span_on[day] == index
                         else f"at {place.at(first_span_on[day])}")
                problems.append(Diagnostic(place.at(index, "days", day_index),
                                           f"'{day}' already has a span {where}; one span per day"))
            else:
                first_span_on[day] = index
    return problems


@lru_cache(maxsize=4096)     # a permission's start and end, once per grant it expands to: formatted once
def utc_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------ error translation

def _validate(model: Any, data: Any, place: Place, noun: str) -> tuple[Any, list[Diagnostic], frozenset[str]]:
    """The validated entry, its problems, and the keys dropped to get a partial entry when it has problems."""
    try:
        if noun in _ADAPTERS:
            return _ADAPTERS[noun].validate_python(data, strict=True), [], frozenset()
        if data is None:
            data = {}  # `alice:` with nothing after it: an entry with every default
        if not isinstance(data, dict):
            return None, [Diagnostic(place.at(), f"expected a mapping of {noun} keys")], frozenset()
        return model.model_validate(data), [], frozenset()
    except ValidationError as exc:
        problems = []
        wrong: set[str] = set()
        for error in exc.errors(include_url=False):
            loc = _loc_in_yaml(error["loc"])
            message, at_key = _reason(error, loc, model)
            problems.append(Diagnostic(place.at(*loc, at_key=at_key), message))
            if loc and isinstance(loc[0], str):
                wrong.add(loc[0])
                if error["type"] == "extra_forbidden":   # `emial:` is a misspelt `email:`, which counts as given
                    wrong.update(difflib.get_close_matches(loc[0], _keys_at(model, ()), n=1, cutoff=0.6))
        partial = _partial(model, data, wrong) if noun not in _ADAPTERS and isinstance(data, dict) else None
        return partial, sorted(set(problems)), frozenset(wrong)


def _partial(model: Any, data: dict[str, Any], wrong: set[str]) -> Any:
    """The entry without its wrong keys, for the checks that need other entries; None if that fails too."""
    try:
        return model.model_validate({k: v for k, v in data.items() if k not in wrong})
    except ValidationError:
        return None


def _loc_in_yaml(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic appends markers such as '[key]' or a union member's type name; they are not YAML keys.
    return tuple(part for part in loc if not (isinstance(part, str) and part.startswith("[")))


def _reason(error: ErrorDetails, loc: tuple[Any, ...], model: Any) -> tuple[str, bool]:
    """A plain-words reason for one pydantic error, and whether it is about the key rather than the value."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    key = loc[-1] if loc else None
    if kind == "extra_forbidden":
        allowed = _keys_at(model, loc[:-1])
        return f"unknown key '{key}'{did_you_mean(str(key), allowed)}", True
    if kind == "missing":
        return f"missing required key '{key}'", False
    if kind in ("list_type", "tuple_type"):
        hint = f": write [{value}]" if isinstance(value, str) else ""
        return f"expected a list{hint}", False
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "expected a mapping", False
    if kind == "string_type":
        hint = " (quote it)" if isinstance(value, (int, float, bool)) else ""
        return f"expected a string{hint}", False
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "expected a whole number", False
    if kind in ("bool_type", "bool_parsing"):
        return "expected true or false", False
    if kind in ("datetime_type", "datetime_parsing"):
        return "expected a date and time, e.g. 2026-01-01T00:00:00Z", False
    if kind == "literal_error":
        shown = f"'{value}'" if isinstance(value, str) else "this value"
        expected = str(ctx.get("expected", "")).replace("'", "")
        return f"{shown} is not one of: {expected.replace(' or ', ', ')}", False
    if kind == "too_short":
        return (f"{key} must not be empty" if ctx.get("min_length") == 1
                else f"{key} needs at least {ctx.get('min_length')} items"), False
    if kind == "string_too_short":
        return (f"{key} must not be empty" if ctx.get("min_length") == 1
                else f"{key} must be at least {ctx.get('min_length')} characters"), False
    if kind == "string_too_long":
        return f"{key} is longer than {ctx.get('max_length')} characters", False
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        words = {"greater_than": "greater than", "greater_than_equal": "at least",
                 "less_than": "less than", "less_than_equal": "at most"}[kind]
        bound = next(iter(ctx.values()), "")
        return f"{key} must be {words} {bound}", False
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"])), False
    message = error["msg"]
    return message[:1].lower() + message[1:], False


def _keys_at(model: Any, loc: tuple[Any, ...]) -> list[str]:
    """The keys a mapping at `loc` inside `model` accepts, for "did you mean" hints."""
    annotation: Any = model
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(part, int):
            args = get_args(annotation)
            if get_origin(annotation) is not list or not args:
                return []
            annotation = args[0]
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found = next((f for name, f in annotation.model_fields.items() if (f.alias or name) == part), None)
            if found is None:
                return []
            annotation = found.annotation
        else:
            return []
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [f.alias or name for name, f in annotation.model_fields.items()]
    return []


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
