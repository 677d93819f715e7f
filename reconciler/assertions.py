"""The policy's tests, evaluated: assertions against effective access, rules against the desired grants.

`run.test` calls `evaluate_assertions` with the rows `access.rows_from_policy` (or, `--live`, `rows_from_live`)
gives; `run.validate` calls `check_rules` on every loaded policy, so that validate, plan and test refuse a policy
that breaks a rule, at the violating entry's line and at the rule's. Pure: no I/O and no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from fnmatch import fnmatchcase

from reconciler.access import AccessRow, Admin, is_open, rows_from_policy
from reconciler.errors import Diagnostic, Location
from reconciler.policy import Policy
from reconciler.policy.proofs import Assertion, Rule, period
from reconciler.resources import GRANT_KINDS, Kind, Resource, Status, grant_parts, parse_time
from reconciler.text import printable


@dataclass(frozen=True)
class Result:
    """One assertion's outcome: `detail` says why it failed (or, passed, what proved it)."""

    assertion: Assertion
    passed: bool
    detail: str

    @property
    def source(self) -> str:
        return self.assertion.source

    def to_dict(self) -> dict[str, object]:
        return {"assertion": self.assertion.title, "source": self.source, "passed": self.passed,
                "detail": self.detail, "reason": self.assertion.reason}


def _opens(row: AccessRow, at: datetime | None, zones: Mapping[str, tzinfo]) -> bool:
    if row.status != "present":
        return False
    if at is None:
        return True
    return is_open(row, at, zones.get(row.system, UTC))


def evaluate_assertions(assertions: Iterable[Assertion], rows: Iterable[AccessRow],
                        zones: Mapping[str, tzinfo]) -> list[Result]:
    """Each assertion against the rows: `can` holds when every person it names has a row on the device open at
    its time (any time when none is given); `cannot` when no person it names has one."""
    rows = list(rows)
    results = []
    for assertion in assertions:
        opening = {person: [r for r in rows if r.user == person and r.device == assertion.device
                            and _opens(r, assertion.at, zones)] for person in assertion.users}
        if assertion.can:
            missing = [person for person, found in opening.items() if not found]
            if not assertion.users:
                results.append(Result(assertion, False, "the group has no members"))
            elif missing:
                results.append(Result(assertion, False, f"no grant lets {', '.join(missing)} in"))
            else:
                results.append(Result(assertion, True, "; ".join(
                    f"{p} via {found[0].via} ({found[0].source})" for p, found in opening.items())))
        else:
            holders = {person: found for person, found in opening.items() if found}
            if holders:
                results.append(Result(assertion, False, "; ".join(
                    f"{p} can, via {found[0].via} ({found[0].source or 'live only'})"
                    for p, found in holders.items())))
            else:
                results.append(Result(assertion, True, "nobody it names can"))
    return results


def zones_of(policy: Policy) -> dict[str, tzinfo]:
    from zoneinfo import ZoneInfo

    return {name: ZoneInfo(system.timezone) for name, system in policy.systems.items()}


# ------------------------------------------------------------------------------------------------------ rules

def _location(source: str | None) -> Location:
    if not source:
        return Location("")
    path, _, line = source.rpartition(":")
    return Location(path, int(line), 1) if line.isdigit() else Location(source)


def _matches(device: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(device, pattern) for pattern in patterns)


def _violation(rule: Rule, source: str | None, message: str) -> list[Diagnostic]:
    """One violation, said at both places: the entry that breaks the rule, and the rule."""
    return [Diagnostic(_location(source), f"{message} (breaks the rule `{rule.kind}` at {rule.source})"),
            Diagnostic(rule.location, f"rule `{rule.kind}` is broken by {source}: {message}")]


def _grant_resources(resources: Iterable[Resource]) -> dict[tuple[str | None, str, str], Resource]:
    """Desired grants by (source, user, device), to read attributes the access rows do not carry."""
    found: dict[tuple[str | None, str, str], Resource] = {}
    for resource in resources:
        if resource.kind in GRANT_KINDS and resource.status is not Status.ABSENT:
            parts = grant_parts(resource.name)
            if len(parts) >= 2:
                found.setdefault((resource.source, parts[0], parts[1]), resource)
    return found


def check_rules(policy: Policy) -> list[Diagnostic]:
    """Every violation of the policy's rules, each at the violating entry and at the rule."""
    if not policy.rules:
        return []
    rows, admins = rows_from_policy(policy.resources, policy.emails)
    grants = _grant_resources(policy.resources)
    problems: list[Diagnostic] = []
    for rule in policy.rules:
        problems += _check(rule, rows, admins, grants)
    return sorted(set(problems))


def _check(rule: Rule, rows: list[AccessRow], admins: list[Admin],
           grants: Mapping[tuple[str | None, str, str], Resource]) -> list[Diagnostic]:
    body = rule.body
    problems: list[Diagnostic] = []
    if rule.kind == "min_admins":
        held = sorted({a.user for a in admins if a.system == body.system})
        if len(held) < body.count:
            names = ", ".join(held) or "none"
            message = (f"system '{body.system}' would keep {len(held)} ADMIN account(s) ({names}); the rule "
                       f"asks for at least {body.count}")
            sources = sorted({a.source for a in admins if a.system == body.system and a.source})
            for source in sources:
                problems += _violation(rule, source, message)
            if not sources:
                problems.append(Diagnostic(rule.location, f"rule `min_admins`: {message}"))
        return problems
    for row in rows:
        if not _matches(row.device, body.devices):
            continue
        what = f"{row.user} on {row.device}"
        if rule.kind == "only" and row.user not in rule.members:
            problems += _violation(rule, row.source, f"{what}: only the rule's groups and users may hold access")
        elif rule.kind == "require_end" and not row.end:
            problems += _violation(rule, row.source, f"{what} has no end; give `end:`")
        elif rule.kind == "max_duration":
            limit = period(body.period)
            if not row.end or not row.start:
                problems += _violation(rule, row.source, f"{what} needs a start and an end within {body.period}")
            elif parse_time(row.end) - parse_time(row.start) > limit:
                problems += _violation(rule, row.source, f"{what} lasts {row.start} to {row.end}, longer than "
                                       f"{body.period}")
        elif rule.kind == "max_key_validity" and row.kind != Kind.TEMP_KEY:
            grant = grants.get((row.source, row.user, row.device))
            validity = grant.attributes.get("key_validity") if grant is not None else None
            if not isinstance(validity, str):
                problems += _violation(rule, row.source, f"{what} has no key validity to limit; give "
                                       f"`key_validity:` at most {body.period}")
            elif period(validity) > period(body.period):
                problems += _violation(rule, row.source, f"{what} has key validity {validity}, longer than "
                                       f"{body.period}")
    return problems


# ------------------------------------------------------------------------------------------------------ JUnit

def junit_xml(results: Iterable[Result], rules: Iterable[Rule]) -> str:
    """The results as JUnit XML (one test case per assertion, named by its words and `file:line`, and one
    per rule, which holds: a broken rule stops the run before this), for CI test reports."""
    from xml.etree import ElementTree as ET

    results, rules = list(results), list(rules)
    failures = sum(1 for r in results if not r.passed)
    suite = ET.Element("testsuite", name="reconciler test", tests=str(len(results) + len(rules)),
                       failures=str(failures), errors="0")
    for result in results:
        case = ET.SubElement(suite, "testcase", classname=result.assertion.location.path,
                             name=f"{result.assertion.title} ({result.source})", file=result.assertion.location.path,
                             line=str(result.assertion.location.line))
        if not result.passed:
            failure = ET.SubElement(case, "failure", message=printable(result.detail), type="AssertionFailed")
            failure.text = printable(f"{result.source}: {result.assertion.title}: {result.detail}")
    for rule in rules:
        ET.SubElement(suite, "testcase", classname=rule.location.path, name=f"rule {rule.kind} ({rule.source})",
                      file=rule.location.path, line=str(rule.location.line))
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


# --------------------------------------------------------------------------------------------------- markdown

def markdown(results: Iterable[Result], rules: Iterable[Rule]) -> str:
    """The policy's tests as a markdown section for the plan comment: each assertion passed or failed with its
    `file:line`, and the rules (which hold: a broken rule refuses the plan before this)."""
    from reconciler.render import code, md

    results, rules = list(results), list(rules)
    if not results and not rules:
        return ""
    failed = [r for r in results if not r.passed]
    head = (f"**{len(failed)} of {len(results)} assertions failed**" if failed
            else f"{len(results)} assertions passed")
    lines = ["", "### Policy tests", "", f"{head}; {len(rules)} rules hold.", ""]
    for result in results:
        mark = "passed" if result.passed else "**FAILED**"
        lines.append(f"- {mark} `{code(result.source)}`: {md(result.assertion.title)}"
                     + ("" if result.passed else f": {md(result.detail)}"))
    for rule in rules:
        lines.append(f"- held `{code(rule.source)}`: rule `{code(rule.kind)}`")
    return "\n".join(lines) + "\n"
