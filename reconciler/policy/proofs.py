"""The policy's own tests: `assertions:` (who can or cannot open a door, and when) and `rules:` (invariants).

`schema.parse` hands the two sections here; each item is validated on its own and kept with its place, so that
`reconciler.assertions` can evaluate it against the expanded policy and name its `file:line`. Times in an
assertion are read with their offset, an IANA zone written after them ("2026-12-07T08:30:00 Europe/Oslo"), or,
without either, in the time zone of the device's system (`timezone:`, default UTC).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from reconciler.errors import Diagnostic, Location

from .schema import Declarations, Entry, Place, _Model, _validate, plain
from .yamlio import Seq

PERIOD_RE = re.compile(r"^P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?)?$")
ZONE_SUFFIX_RE = re.compile(r"^(\S+)\s+([A-Za-z][A-Za-z0-9_+-]*(?:/[A-Za-z0-9_+-]+)*)$")


def zone(name: str) -> tzinfo:
    """An IANA time zone by name, or ValueError in words."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"'{name}' is not an IANA time zone (e.g. Europe/Oslo, UTC)") from None


def period(value: str) -> timedelta:
    """`P14D`, `PT12H`, `P1DT6H`: a duration; ValueError in words otherwise."""
    match = PERIOD_RE.match(value) if isinstance(value, str) else None
    if match is None or value in ("P", "PT") or not any(match.groups()):
        raise ValueError(f"'{value}' is not a period: write ISO 8601 days and hours, e.g. P14D, PT12H")
    days, hours, minutes = (int(g or 0) for g in match.groups())
    return timedelta(days=days, hours=hours, minutes=minutes)


def _at(value: Any) -> Any:
    """An assertion time: a datetime (with or without offset), or an ISO text, optionally followed by a zone."""
    if value is None or isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError("expected a date and time, e.g. \"2026-12-07T08:30:00 Europe/Oslo\"")
    text, zone_name = value.strip(), None
    match = ZONE_SUFFIX_RE.match(text)
    if match:
        text, zone_name = match.groups()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"'{value}' is not a date and time: write ISO 8601, e.g. 2026-12-07T08:30:00+01:00 or "
                         "2026-12-07T08:30:00 Europe/Oslo") from None
    if zone_name is not None:
        if moment.tzinfo is not None:
            raise ValueError(f"'{value}' gives both an offset and a zone: give one")
        moment = moment.replace(tzinfo=zone(zone_name))
    return moment


class Subject(_Model):
    user: Annotated[str, Field(min_length=1)] | None = None
    group: Annotated[str, Field(min_length=1)] | None = None
    device: Annotated[str, Field(min_length=1)]
    at: datetime | str | None = None     # ISO 8601 with an offset, or a zone after it, or read in the site's zone
    reason: str | None = None

    @field_validator("at", mode="before")
    @classmethod
    def _time(cls, value: Any) -> Any:
        return _at(value)

    @model_validator(mode="after")
    def _one_subject(self) -> Subject:
        if (self.user is None) == (self.group is None):
            raise ValueError("an assertion names one `user:` or one `group:`")
        return self


class AssertionModel(_Model):
    can: Subject | None = None
    cannot: Subject | None = None

    @model_validator(mode="after")
    def _one(self) -> AssertionModel:
        if (self.can is None) == (self.cannot is None):
            raise ValueError("an assertion is one `can:` or one `cannot:`")
        return self


def _period(value: str) -> str:
    period(value)
    return value


class OnlyRule(_Model):
    devices: Annotated[list[str], Field(min_length=1)]
    groups: list[str] = Field(default_factory=list)
    users: list[str] = Field(default_factory=list)


class PeriodRule(_Model):
    devices: Annotated[list[str], Field(min_length=1)]
    period: str

    @field_validator("period")
    @classmethod
    def _valid(cls, value: str) -> str:
        return _period(value)


class DevicesRule(_Model):
    devices: Annotated[list[str], Field(min_length=1)]


class MinAdminsRule(_Model):
    system: str
    count: Annotated[int, Field(ge=1)]


class RuleModel(_Model):
    only: OnlyRule | None = None
    max_duration: PeriodRule | None = None
    require_end: DevicesRule | None = None
    min_admins: MinAdminsRule | None = None
    max_key_validity: PeriodRule | None = None

    @model_validator(mode="after")
    def _one(self) -> RuleModel:
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a rule is exactly one of: " + ", ".join(type(self).model_fields))
        return self

    @property
    def kind(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)

    @property
    def body(self) -> Any:
        return getattr(self, self.kind)


def _parse_list(section: str, place: Place, body: Any, model: Any, noun: str,
                entries: list[Entry[Any]]) -> list[Diagnostic]:
    if not isinstance(body, Seq):
        return [Diagnostic(place.at(), f"expected a list of {section} (each item starts with -)")]
    diagnostics: list[Diagnostic] = []
    for index in range(len(body)):
        entry_place = Place(place.path, body, index)
        parsed, problems, dropped = _validate(model, plain(body[index]), entry_place, noun)
        diagnostics += problems
        location = entry_place.at()
        entries.append(Entry(f"{location.path}:{location.line}", entry_place, None if problems else parsed,
                             dropped=dropped))
    return diagnostics


def parse_assertions(place: Place, body: Any, declarations: Declarations) -> list[Diagnostic]:
    return _parse_list("assertions", place, body, AssertionModel, "assertion", declarations.assertions)


def parse_rules(place: Place, body: Any, declarations: Declarations) -> list[Diagnostic]:
    return _parse_list("rules", place, body, RuleModel, "rule", declarations.rules)


# --------------------------------------------------------------------------------------------------- resolved

@dataclass(frozen=True)
class Assertion:
    """One assertion, resolved: the people it is about (a group's members), read for evaluation."""

    can: bool
    subject: str               # "alice" or "group staff"
    users: tuple[str, ...]
    device: str
    at: datetime | None        # aware; None: at any time
    at_text: str | None        # as written
    reason: str | None
    location: Location

    @property
    def source(self) -> str:
        return f"{self.location.path}:{self.location.line}"

    @property
    def title(self) -> str:
        verb = "can" if self.can else "cannot"
        when = f" at {self.at_text}" if self.at_text else " at any time"
        return f"{self.subject} {verb} open {self.device}{when}"


@dataclass(frozen=True)
class Rule:
    kind: str
    body: Any
    location: Location
    members: frozenset[str] = frozenset()     # `only`: every user the rule allows

    @property
    def source(self) -> str:
        return f"{self.location.path}:{self.location.line}"


def _members(declarations: Declarations, group: str) -> set[str]:
    from .expand import members_of

    return members_of(declarations, group)


def resolve(declarations: Declarations, zones: dict[str, tzinfo]
            ) -> tuple[list[Assertion], list[Rule], list[Diagnostic]]:
    """Assertions and rules with their references checked (unknown users, groups, devices and systems are
    errors at the key); `zones` is each system's time zone, for times written without an offset."""
    problems: list[Diagnostic] = []
    assertions: list[Assertion] = []
    for entry in declarations.assertions:
        model = entry.model
        if model is None:
            continue
        can = model.can is not None
        subject = model.can or model.cannot
        assert subject is not None
        key = "can" if can else "cannot"
        bad = False
        if subject.user is not None and subject.user not in declarations.users:
            problems.append(Diagnostic(entry.place.at(key, "user"), f"unknown user '{subject.user}'"))
            bad = True
        if subject.group is not None and subject.group not in declarations.groups:
            problems.append(Diagnostic(entry.place.at(key, "group"), f"unknown group '{subject.group}'"))
            bad = True
        device = declarations.devices.get(subject.device)
        if device is None:
            problems.append(Diagnostic(entry.place.at(key, "device"), f"unknown device '{subject.device}'"))
            bad = True
        if bad:
            continue
        at, at_text = subject.at, None
        if at is not None:
            at_text = _written(entry, key)
            if at.tzinfo is None:
                system = device.model.system if device is not None and device.model is not None else ""
                at = at.replace(tzinfo=zones.get(system) or zone("UTC"))
        users = ((subject.user,) if subject.user is not None
                 else tuple(sorted(_members(declarations, subject.group or ""))))
        who = subject.user if subject.user is not None else f"group {subject.group}"
        assertions.append(Assertion(can, str(who), users, subject.device, at, at_text, subject.reason,
                                    entry.place.at()))
    rules: list[Rule] = []
    for entry in declarations.rules:
        model = entry.model
        if model is None:
            continue
        kind, body = model.kind, model.body
        members: set[str] = set()
        if kind == "only":
            for index, group in enumerate(body.groups):
                if group not in declarations.groups:
                    problems.append(Diagnostic(entry.place.at(kind, "groups", index), f"unknown group '{group}'"))
                members |= _members(declarations, group)
            for index, user in enumerate(body.users):
                if user not in declarations.users:
                    problems.append(Diagnostic(entry.place.at(kind, "users", index), f"unknown user '{user}'"))
                members.add(user)
        if kind == "min_admins" and body.system not in declarations.systems:
            problems.append(Diagnostic(entry.place.at(kind, "system"), f"unknown system '{body.system}'"))
            continue
        rules.append(Rule(kind, body, entry.place.at(), frozenset(members)))
    return assertions, rules, problems


def _written(entry: Entry[Any], key: str) -> str:
    value = plain(entry.place.container[entry.place.key][key]["at"])
    return value if isinstance(value, str) else value.isoformat() if isinstance(value, datetime) else str(value)


def at_in_zone(value: str) -> datetime:
    """`--at` with an IANA zone after it: an aware datetime, or ValueError in words."""
    moment = _at(value)
    if moment.tzinfo is None:
        raise ValueError(f"'{value}' needs an offset or an IANA zone after it, e.g. 2026-12-07T08:30:00 Europe/Oslo")
    return moment
