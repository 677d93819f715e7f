"""The editor schema, whole: `schema/policy.schema.json` is loaded as an editor or check-jsonschema loads it (the
`jsonschema` and `referencing` libraries, every reference resolved, no language server needed), no `$ref`
dangles, and it accepts every policy file in the repository, every policy snippet in the README and a file that
uses every documented key, while it refuses closed values out of their sets (enums, patterns, ranges)."""

from __future__ import annotations

import copy
import json
import re
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import referencing
import referencing.jsonschema
from ruamel.yaml import YAML

from reconciler import run
from reconciler.policy.yamlio import plain

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "schema" / "policy.schema.json"
SECTIONS = {"systems", "users", "devices", "gateways", "groups", "schedules", "temp_keys", "permissions",
            "assertions", "rules"}
# Every YAML file in the repository that is a policy: all but the workflows, the pre-commit hooks and the
# deliberately invalid test policies.
NOT_POLICIES = (".github/", ".pre-commit-hooks.yaml", "tests/data/invalid/", ".venv/", ".reconciler/")
POLICY_FILES = sorted(p for p in ROOT.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()
                      and not any(p.relative_to(ROOT).as_posix().startswith(skip) for skip in NOT_POLICIES))


def _load(text: str) -> Any:
    """The text as yaml-language-server reads it (YAML 1.2: a timestamp is a string)."""
    def strings(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strings(v) for k, v in node.items()}
        if isinstance(node, list):
            return [strings(v) for v in node]
        if isinstance(node, datetime):
            return node.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") if node.tzinfo else node.isoformat()
        if isinstance(node, date):
            return node.isoformat()
        return node
    return strings(plain(YAML(typ="rt").load(text)))


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(COMMITTED.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def registry(schema) -> referencing.Registry:
    resource = referencing.Resource.from_contents(schema, default_specification=referencing.jsonschema.DRAFT202012)
    return referencing.Registry().with_resource(schema["$id"], resource)


@pytest.fixture(scope="module")
def validator(schema, registry) -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry, format_checker=jsonschema.FormatChecker())


def _errors(validator: jsonschema.Draft202012Validator, document: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def _refs(node: Any, path: str = "#") -> list[tuple[str, str]]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.append((path, value))
            else:
                found += _refs(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _refs(value, f"{path}/{index}")
    return found


def test_the_committed_schema_is_the_generated_one(schema):
    assert schema == run.schema(), "run `reconciler schema --out schema/policy.schema.json`"


def test_no_ref_dangles(schema, registry):
    refs = _refs(schema)
    assert len(refs) > 10
    resolver = registry.resolver(base_uri=schema["$id"])
    dangling = []
    for where, ref in refs:
        try:
            resolved = resolver.lookup(ref).contents
        except referencing.exceptions.Unresolvable as exc:
            dangling.append(f"{where}: {ref} ({type(exc).__name__})")
            continue
        assert isinstance(resolved, dict) and resolved, (where, ref)
    assert dangling == []
    # and the same without the registry's help: every local reference names a definition that is there
    assert {ref for _, ref in refs} <= {f"#/$defs/{name}" for name in schema["$defs"]}


def test_no_pydantic_words_for_ranges(schema):
    """`ge`/`le` are pydantic's; a JSON Schema validator ignores them, so the range would not be checked."""
    def keywords(node: Any, inside_properties: bool = False) -> set[str]:
        if isinstance(node, list):
            return set().union(*(keywords(v) for v in node)) if node else set()
        if not isinstance(node, dict):
            return set()
        found = set() if inside_properties else set(node)
        for key, value in node.items():
            if key in ("properties", "$defs") and isinstance(value, dict):
                found |= set().union(*(keywords(v) for v in value.values())) if value else set()
            else:
                found |= keywords(value)
        return found
    assert not keywords(schema) & {"ge", "le", "gt", "lt"}


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_policy_file_in_the_repository_is_valid(validator, path):
    assert _errors(validator, _load(path.read_text(encoding="utf-8"))) == []


def test_the_repository_has_the_policy_files_expected():
    names = {p.relative_to(ROOT).as_posix() for p in POLICY_FILES}
    assert {"policies/access.yaml", "examples/quickstart/policy.yaml"} <= names
    assert any(name.startswith("tests/data/valid/") for name in names)


def _readme_policies() -> list[tuple[int, str]]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    snippets = []
    for match in re.finditer(r"^```ya?ml\n(.*?)^```", readme, re.M | re.S):
        text = match.group(1)
        document = YAML(typ="safe").load(text)
        if isinstance(document, dict) and set(document) <= SECTIONS:
            snippets.append((readme.count("\n", 0, match.start()) + 1, text))
    return snippets


README_POLICIES = _readme_policies()


def test_the_readme_has_policy_snippets():
    assert len(README_POLICIES) >= 2
    assert any("mass_revoke:" in text for _, text in README_POLICIES)


@pytest.mark.parametrize("line, text", README_POLICIES, ids=[f"README.md:{line}" for line, _ in README_POLICIES])
def test_every_readme_policy_snippet_is_valid(validator, line, text):
    assert _errors(validator, _load(text)) == []


EVERY_KEY = """\
systems:
  hq:
    vendor: abloy-keyless
    url: sandbox
    credentials: {user_id: "${ABLOY_USER_ID}", access_key: "${ABLOY_ACCESS_KEY}", api_key: "${ABLOY_API_KEY}"}
    unmanaged: report
    concurrency: 4
    deadline: 60
    max_answer_mb: 128
    mass_revoke: {percent: 12.5, minimum: 20, acknowledge: revoke-3f2a9c1b4d5e6f70}
    offboarding: {acknowledge: offboard-3f2a9c1b4d5e6f70}
    invitation_validity: P1DT12H
    timezone: Europe/Oslo
  cabins:
    vendor: unloc
    lock_holder_id: 866b8a35-0000-4000-8000-000000000000
    notify: false
    credentials: {client_id: "${UNLOC_CLIENT_ID}", client_secret: "${UNLOC_CLIENT_SECRET}"}
  rentals: {vendor: unloc-partner, partner_id: abcpartner, credentials: {api_key: "${UNLOC_PARTNER_KEY}"}}
  guests: {vendor: spkey, credentials: {api_key: "${SPKEY_API_KEY}"}}
  office: {vendor: sentry, credentials: {email: "${SENTRY_EMAIL}", password: "${SENTRY_PASSWORD}",
                                         token: "${SENTRY_TOKEN}"}}
users:
  alice:
    name: Alice Hansen
    email: alice@example.com
    phone: "+47 900 00 001"
    role: ADMIN
    mobile_key: true
    systems: [hq, office]
    ids: {hq: 5869ca5a-9423-48f5-8d5f-4a2945a203ec}
    previously: [alice.hansen]
devices:
  front-gate: {system: hq, name: Front Gate, previously: [main-gate]}
  old-door: {system: hq, id: 210c8aec-6872-549e-bdbf-e92afae32322, decommission: true}
  meeting-room: {system: office, id: 3f1c9a52, name: Meeting Room, favourite: true, colour: "#2266aa",
                 unlock_duration: 7}
gateways:
  lobby: {system: hq, claiming_code: 2K7H-ASR3, devices: [front-gate], previously: [hall]}
  annex: {system: hq, id: c78afb03-a06e-4da9-afca-edce82ffad9f, decommission: false}
groups:
  staff: [alice]
schedules:
  office-hours:
    - {days: [mon, tue, wed, thu, fri], from: "08:00", to: "18:00"}
    - {days: [sat], from: "10:00", to: "24:00"}
permissions:
  - groups: [staff]
    users: [alice]
    devices: [front-gate]
    operations: [OPEN, UPDATE_FIRMWARE, UPDATE_TIME]
    start: 2026-01-01T00:00:00Z
    end: 2026-12-31T23:59:59Z
    key_validity: P8D
    reason: FAC-1234
  - users: [alice]
    devices: [cabin-7]
    schedule: office-hours
    notify: false
  - users: [alice]
    devices: [meeting-room]
    role: USER
temp_keys:
  cleaning:
    device: guest-flat-3
    access: users
    users: [alice]
    start: 2026-11-23T08:00:00Z
    end: 2026-11-29T18:00:00Z
    max_uses: 10
    description: weekly cleaning
ignore:
  - hq/user/id:5869ca5a-9423-48f5-8d5f-4a2945a203ed
  - hq/device/roof-*
  - hq/permission/*/archive/**
assertions:
  - can: {user: alice, device: front-gate, at: "2026-12-07T08:30:00 Europe/Oslo", reason: SEC-1}
  - cannot: {group: staff, device: old-door}
rules:
  - only: {devices: [front-gate], groups: [staff], users: [alice]}
  - max_duration: {devices: [guest-*], period: P14D}
  - require_end: {devices: [guest-*]}
  - min_admins: {system: hq, count: 1}
  - max_key_validity: {devices: [front-gate], period: P8D}
"""


def _used_keys(document: dict[str, Any]) -> dict[str, set[str]]:
    used: dict[str, set[str]] = {"top": set(document)}
    for section, definition in (("users", "User"), ("devices", "Device"), ("gateways", "Gateway"),
                                ("temp_keys", "TempKey")):
        used[definition] = set().union(*(set(v) for v in document[section].values()))
    used["Permission"] = set().union(*(set(p) for p in document["permissions"]))
    used["Span"] = set().union(*(set(s) for spans in document["schedules"].values() for s in spans))
    used["MassRevoke"] = set().union(*(set(s.get("mass_revoke") or {}) for s in document["systems"].values()))
    used["Offboarding"] = set().union(*(set(s.get("offboarding") or {}) for s in document["systems"].values()))
    used["Assertion"] = set().union(*(set(a) for a in document["assertions"]))
    used["Subject"] = set().union(*(set(v) for a in document["assertions"] for v in a.values()))
    used["Rule"] = set().union(*(set(r) for r in document["rules"]))
    rule_defs = {"only": "OnlyRule", "max_duration": "PeriodRule", "max_key_validity": "PeriodRule",
                 "require_end": "DevicesRule", "min_admins": "MinAdminsRule"}
    for rule in document["rules"]:
        for kind, body in rule.items():
            used.setdefault(rule_defs[kind], set()).update(body)
    for system in document["systems"].values():
        used.setdefault(system["vendor"], set()).update(system)
        used.setdefault(system["vendor"] + "/credentials", set()).update(system.get("credentials") or {})
    return used


def test_a_file_with_every_documented_key_is_valid(validator, schema):
    document = _load(EVERY_KEY)
    assert _errors(validator, document) == []

    # ... and it does use every key the schema knows, so that no key goes unchecked
    used = _used_keys(document)
    assert used["top"] == set(schema["properties"])
    for name, definition in schema["$defs"].items():
        if "properties" in definition:
            assert used[name] == set(definition["properties"]), name
    common = used["abloy-keyless"]     # the keys every vendor has are used on hq; each vendor's own on its system
    for branch in schema["$defs"]["System"]["oneOf"]:
        assert used[branch["title"]] | common >= set(branch["properties"]), branch["title"]
        assert used[branch["title"]] >= set(branch["properties"]) - common, branch["title"]
        assert used[branch["title"] + "/credentials"] == set(branch["properties"]["credentials"]["properties"])


@pytest.mark.parametrize("where, value, message", [
    (("systems", "hq", "mass_revoke", "percent"), 150, "maximum"),
    (("systems", "hq", "mass_revoke", "percent"), -1, "minimum"),
    (("systems", "hq", "mass_revoke", "minimum"), -3, "minimum"),
    (("systems", "hq", "mass_revoke", "acknowledge"), "revoke-everything", "pattern"),
    (("systems", "hq", "invitation_validity"), "7 days", "pattern"),
    (("systems", "hq", "invitation_validity"), "P1M", "pattern"),
    (("systems", "hq", "invitation_validity"), "PT", "pattern"),
    (("systems", "hq", "deadline"), 7200, "maximum"),
    (("permissions", 0, "operations"), ["open"], "enum"),
    (("permissions", 0, "operations"), ["OPEN", "UNLOCK"], "enum"),
    (("permissions", 0, "key_validity"), "8 days", "pattern"),
    (("permissions", 2, "role"), "OWNER", "enum"),
    (("users", "alice", "role"), "admin", "enum"),
    (("schedules", "office-hours", 0, "days"), ["monday"], "enum"),
    (("systems", "hq", "unmanaged"), "ignore", "enum"),
    (("temp_keys", "cleaning", "access"), "everyone", "enum"),
    (("temp_keys", "cleaning", "max_uses"), 0, "minimum"),
    (("devices", "meeting-room", "unlock_duration"), 0, "minimum"),
])
def test_closed_values_are_checked(validator, where, value, message):
    document = copy.deepcopy(_load(EVERY_KEY))
    node = document
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value

    errors = list(validator.iter_errors(document))

    assert errors, f"{'/'.join(map(str, where))} = {value!r} was accepted"
    # the system branches are a oneOf: the reason is in the branch of the system's vendor
    def below(error: jsonschema.ValidationError) -> list[jsonschema.ValidationError]:
        return [error, *(e for sub in error.context or [] for e in below(sub))]
    reasons = [e for error in errors for e in below(error)]
    assert any(e.validator == message or message in e.message for e in reasons), [e.message for e in reasons]


def test_a_file_using_mass_revoke_is_checked_not_crashed(validator):
    """check-jsonschema crashed on any file with `mass_revoke:` (the reference dangled)."""
    document = {"systems": {"hq": {"vendor": "abloy-keyless", "url": "sandbox",
                                   "mass_revoke": {"percent": 30, "minimum": 5, "bogus": 1}}}}
    errors = _errors(validator, document)

    assert errors and any("bogus" in e for e in errors)
