"""Tests of the policy loader: a full valid policy expands to the expected resources, and each failure mode in
`tests/data/invalid/` (one file or folder per mode) fails with located, plain-words messages (syrupy snapshots).

The capabilities here are fakes declared for these tests only; the real ones belong to the providers.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from reconciler.errors import PolicyError
from reconciler.policy import Policy, SystemConfig, load_policy
from reconciler.resources import Capabilities, Kind, Resource, Status, grant_schema_of
from reconciler.secret import Secret

DATA = Path(__file__).parent / "data"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"

ABLOY = Capabilities(
    vendor="abloy-keyless", grant_kind=Kind.PERMISSION, user_accounts=True,
    attributes={Kind.PERMISSION: grant_schema_of(requires_end=True, open_ended=False, key_validity=True)},
    operations=frozenset({"OPEN", "UPDATE_FIRMWARE", "UPDATE_TIME"}), gateways=True,
    max_associations=5, creates_devices=True, device_fields=frozenset({"name"}), mobile_key=True,
    settings=frozenset({"invitation_validity"}), setting_durations={"invitation_validity": (1, 365 * 86400)},
    credentials=frozenset({"user_id", "access_key", "api_key"}),
)
UNLOC = Capabilities(
    vendor="unloc", grant_kind=Kind.KEY, needs_phone=True,
    attributes={Kind.KEY: grant_schema_of(schedules=True, immutable_grants=True, grant_notify=True)},
    device_fields=frozenset(), device_id_pattern=UUID, settings=frozenset({"lock_holder_id"}),
    credentials=frozenset({"client_id", "client_secret"}),
)
UNLOC_PARTNER = Capabilities(
    vendor="unloc-partner", grant_kind=Kind.KEY, needs_phone=True, device_fields=frozenset(),
    settings=frozenset({"partner_id"}), credentials=frozenset({"api_key"}),
)
SPKEY = Capabilities(
    vendor="spkey", grant_kind=Kind.TEMP_KEY, temp_keys=True, needs_email=True, device_fields=frozenset(),
    device_id_pattern=r"\d+", credentials=frozenset({"api_key"}),
)
SENTRY = Capabilities(
    vendor="sentry", grant_kind=Kind.SHARE, needs_email=True,
    attributes={Kind.SHARE: grant_schema_of(share_roles=frozenset({"USER", "ADMIN"}))},
    device_fields=frozenset({"name", "favourite", "colour", "unlock_duration"}), device_id_pattern=UUID,
    credentials=frozenset({"email", "password"}),
)
CAPABILITIES = {c.vendor: c for c in (ABLOY, UNLOC, UNLOC_PARTNER, SPKEY, SENTRY)}

ENV = {
    "ABLOY_USER_ID": "abloy-user", "ABLOY_ACCESS_KEY": "abloy-access", "ABLOY_API_KEY": "abloy-api",
    "UNLOC_CLIENT_ID": "unloc-id", "UNLOC_CLIENT_SECRET": "unloc-secret", "UNLOC_PARTNER_KEY": "partner-key",
    "SPKEY_API_KEY": "spkey-key", "SENTRY_EMAIL": "ops@example.com", "SENTRY_PASSWORD": "sentry-password",
}

# The failure modes the brief requires, each with its own file or folder under tests/data/invalid/.
REQUIRED_MODES = {
    "yaml-syntax", "unknown-key", "wrong-type", "bad-e164", "bad-duration", "end-before-start", "unknown-user",
    "unknown-group", "unknown-device", "unknown-schedule", "unknown-system", "group-cycle", "duplicate-name",
    "too-many-associations", "literal-secret", "missing-env", "open-ended-abloy", "schedule-on-abloy",
    "naive-datetime", "conflicting-grants", "two-spans-one-day", "unsupported-vendor",
}
INVALID = sorted(p.name for p in (DATA / "invalid").iterdir())
LOCATED = re.compile(r"^[\w./-]+:\d+:\d+: [a-z'`]")


@pytest.fixture(autouse=True)
def in_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    # Messages show paths relative to the working directory: run from tests/data so snapshots read
    # `invalid/x.yaml:3:5` wherever pytest is started.
    monkeypatch.chdir(DATA)


def load(path: str, capabilities: dict[str, Capabilities] | None = None,
         env: dict[str, str] | None = None, **options: Any) -> Policy:
    return load_policy(Path(path), CAPABILITIES if capabilities is None else capabilities,
                       ENV if env is None else env, **options)


def errors_of(path: str, **kwargs: Any) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load(path, **kwargs)
    return caught.value.lines()


def as_dict(resource: Resource) -> dict[str, Any]:
    return {
        "address": resource.address, "attributes": dict(resource.attributes), "id": resource.id,
        "status": str(resource.status), "meta": dict(resource.meta), "depends_on": list(resource.depends_on),
        "source": resource.source, "replace_on_change": resource.replace_on_change,
    }


# ------------------------------------------------------------------------------------------------ valid

def test_full_policy_expands_to_desired_resources(snapshot: Any) -> None:
    policy = load("valid/full")

    assert policy.files == ["valid/full/people/staff.yml", "valid/full/policy.yaml"]
    assert [as_dict(r) for r in policy.resources] == snapshot
    assert [str(w) for w in policy.warnings] == snapshot
    assert [r.address for r in policy.resources] == sorted(r.address for r in policy.resources)


def test_full_policy_systems() -> None:
    systems = load("valid/full").systems

    assert sorted(systems) == ["cabins", "guests", "hq", "office", "rentals"]
    hq = systems["hq"]
    assert isinstance(hq, SystemConfig)
    assert (hq.vendor, hq.url, hq.unmanaged, hq.concurrency) == ("abloy-keyless", "sandbox", "revoke", 8)
    assert hq.credentials == {"user_id": Secret("abloy-user"), "access_key": Secret("abloy-access"),
                              "api_key": Secret("abloy-api")}
    assert str(hq.source) == "valid/full/policy.yaml:3:3"
    assert systems["cabins"].settings == {"lock_holder_id": "866b8a35-4184-44c5-8ffd-448a77e5a91c"}
    assert systems["cabins"].url is None
    assert systems["rentals"].settings == {"partner_id": "abcpartner"}
    assert systems["office"].credentials["password"].reveal() == "sentry-password"
    assert "sentry-password" not in repr(systems)


def test_sandbox_needs_no_environment() -> None:
    env = {k: v for k, v in ENV.items() if not k.startswith("ABLOY_")}

    policy = load("valid/full", env=env)

    assert policy.systems["hq"].credentials == {}


def test_single_file_and_url() -> None:
    policy = load("valid/single/policy.yaml", allowed_hosts=["abloy.example.com"])

    hq = policy.systems["hq"]
    assert hq.url == "https://abloy.example.com/administration"
    assert (hq.unmanaged, hq.concurrency) == ("report", 4)
    assert [r.address for r in policy.resources] == [
        "hq/device/front-gate", "hq/permission/alice/front-gate/OPEN", "hq/user/alice"]
    device = policy.resources[0]
    assert (dict(device.attributes), device.id, device.status) == ({"name": "front-gate"}, None, Status.PRESENT)


def test_identical_grants_merge_and_keep_both_reasons() -> None:
    grants = {r.address: r for r in load("valid/full").resources}

    alice = grants["hq/permission/alice/front-gate/OPEN"]
    assert alice.meta["reason"] == "FAC-1234"
    assert alice.depends_on == ("hq/user/alice", "hq/device/front-gate")


def test_paths_outside_the_working_directory_are_shown_as_given(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    target = DATA / "invalid" / "unknown-key.yaml"

    [line] = errors_of(str(target))

    assert line.startswith(f"{target.as_posix()}:11:5: unknown key 'emial'")


# ---------------------------------------------------------------------------------------------- invalid

def test_every_required_failure_mode_has_a_data_file() -> None:
    assert REQUIRED_MODES <= {Path(name).stem for name in INVALID}


@pytest.mark.parametrize("name", INVALID)
def test_invalid_policy_fails_with_located_messages(name: str, snapshot: Any) -> None:
    capabilities = CAPABILITIES
    if name == "unsupported-vendor.yaml":
        capabilities = {k: v for k, v in CAPABILITIES.items() if k != "unloc"}

    lines = errors_of(f"invalid/{name}", capabilities=capabilities)

    assert lines, "a policy error must say what is wrong"
    for line in lines:
        assert LOCATED.match(line), f"not `file:line:col: message`: {line}"
    assert lines == sorted(lines, key=_location_key)
    assert lines == snapshot


def _location_key(line: str) -> tuple[str, int, int]:
    path, row, col, _ = line.split(":", 3)
    return path, int(row), int(col)


def test_literal_secret_is_never_echoed() -> None:
    lines = errors_of("invalid/literal-secret.yaml")

    text = "\n".join(lines)
    assert "hunter2" not in text
    assert "$ABLOY_API_KEY" not in text
    assert len(lines) == 2


def test_missing_environment_variable_is_named() -> None:
    [line] = errors_of("invalid/missing-env.yaml")

    assert "ABLOY_API_KEY_NOT_SET" in line


def test_a_syntax_error_does_not_hide_other_files() -> None:
    lines = errors_of("invalid/syntax-and-schema")

    assert [line.split(":")[0] for line in lines] == ["invalid/syntax-and-schema/broken.yaml",
                                                      "invalid/syntax-and-schema/other.yaml"]


def test_every_entry_is_checked_not_just_the_first(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("users:\n  a: {phone: '1'}\n  b: {email: x}\ndevices:\n  d: {sistem: hq}\n")

    lines = errors_of(str(policy))

    assert len(lines) == 4  # a bad phone, a bad email, an unknown key and the missing `system`


def test_missing_policy_path() -> None:
    [line] = errors_of("no-such-folder")

    assert line == "no-such-folder: no such file or directory"


def test_policy_package_imports_neither_http_nor_providers_nor_sandbox() -> None:
    code = ("import sys, reconciler.policy; "
            "print([m for m in sys.modules if m == 'httpx' or m.startswith(('reconciler.providers', "
            "'reconciler.sandbox'))])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "[]"


def test_an_unquoted_reference_in_a_flow_mapping_shows_the_quoted_form() -> None:
    [line] = errors_of("invalid/unquoted-env-reference.yaml")

    assert line.startswith("invalid/unquoted-env-reference.yaml:3:50: ")
    assert line.endswith('quote it, "${SPKEY_API_KEY}"')


def test_a_block_reference_is_plain_yaml_and_needs_no_rewrite(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("systems:\n  guests:\n    vendor: spkey\n    credentials:\n      api_key: ${SPKEY_API_KEY}\n"
                      "  other: {vendor: spkey, url: sandbox, credentials: {api_key: '${SPKEY_API_KEY}'}}\n")

    loaded = load_policy(policy, CAPABILITIES, ENV)

    assert {name: system.vendor for name, system in loaded.systems.items()} == {"guests": "spkey", "other": "spkey"}


@pytest.mark.parametrize("written", ["+47 900 00 001", "+47 900-00-001", " +47 (900) 00 001 ", "+4790000001"])
def test_phone_numbers_are_accepted_as_people_write_them_and_kept_in_e164(tmp_path: Path, written: str) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("systems:\n  cabins: {vendor: unloc, url: sandbox, lock_holder_id: 866b8a35-4184-44c5-8ffd-448a77e5a91c}\n"
                      f"users:\n  alice: {{phone: \"{written}\"}}\n"
                      "devices:\n  cabin: {system: cabins, id: 0634f1ba-e175-49e8-98bc-32b11505107b}\n"
                      "permissions:\n  - {users: [alice], devices: [cabin]}\n")

    loaded = load_policy(policy, CAPABILITIES, ENV)

    text = repr([as_dict(r) for r in loaded.resources])
    assert "+4790000001" in text and written.strip() not in text.replace("+4790000001", "")


@pytest.mark.parametrize("written, reason", [
    ("+47 900", "'+47 900' is not a possible phone number: too few digits for its country"),
    ("+47 900 00 001 23", "too many digits for its country"),
    ("+999 1234 5678", "the country code after + does not exist"),
    ("900 00 001", "has no country code: write it in international form"),
    ("0047 900 00 001", "starts with 00: write the country code after +"),
    ("call me", "has no country code"),
])
def test_impossible_phone_numbers_are_refused_with_the_reason_at_their_place(tmp_path: Path, written: str,
                                                                             reason: str) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(f"users:\n  alice: {{name: Alice, phone: \"{written}\"}}\n")

    [line] = errors_of(str(policy))

    assert line.startswith(f"{policy.as_posix()}:2:") and reason in line


def test_all_errors_at_once_so_fixing_them_leaves_none(tmp_path: Path) -> None:
    """Schema, reference, vendor and syntax errors come in one run: after fixing exactly what was reported,
    the policy is valid (no second round of errors)."""
    lines = errors_of("invalid/all-at-once")
    reported = "\n".join(lines)
    for expected in ("not a possible phone number", "is not an email address", "unknown key 'emial'",
                     "unloc devices have no 'colour'", "'red' is not a colour", "requires an end",
                     "unknown user 'nobody'", "unknown device 'ghost'", "has no weekly schedules", "'P99D'",
                     "user 'carol' has no phone", "has no operations to choose", "start needs a time",
                     "broken.yaml:4:1: invalid YAML"):
        assert expected in reported, expected
    assert len(lines) == 14

    fixed = tmp_path / "fixed"
    fixed.mkdir()
    source = (DATA / "invalid" / "all-at-once" / "policy.yaml").read_text()
    for wrong, right in [('"+47 900", email: bad', '"+47 900 00 001", email: alice@example.com'),
                         ("emial", "email"), (", colour: red", ""), ("alice, bob, nobody", "alice, bob"),
                         ("door, ghost", "door"), ("    schedule: sch\n", "    end: 2027-01-01T00:00:00Z\n"),
                         ("P99D", "P9D"), ("carol: {}", 'carol: {phone: "+47 900 00 003"}'),
                         ("    operations: [UPDATE_FIRMWARE]\n", ""), ("start: 2026-01-01\n", "start: 2026-01-01T00:00:00Z\n")]:
        assert wrong in source
        source = source.replace(wrong, right)
    (fixed / "policy.yaml").write_text(source)
    (fixed / "broken.yaml").write_text("users:\n  dave: {}\n")

    assert load_policy(fixed, CAPABILITIES, ENV).resources
