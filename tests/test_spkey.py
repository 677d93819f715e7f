"""SmartphoneKey (`vendor: spkey`): the provider against the simulator, the simulator against the vendor's
OpenAPI document, and the CLI against `reconciler sandbox serve`.

Provider tests plan and apply the way the CLI does and then look at the vendor with raw requests. Every
request the provider sends and every answer the simulator gives is captured at the transport and checked
against the vendor's own OpenAPI 3.1 document (the excerpt kept in tests/data/spkey/), so the provider
cannot pass by speaking to a lenient fake.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from conftest import reconciler_command, serve_sandboxes
from harness import SPKEY, VendorHarness

from reconciler.errors import PlanError, PolicyError, VendorError
from reconciler.providers.spkey import CAPABILITIES, temp_key_uuid
from reconciler.render import render_json, render_text
from reconciler.sandbox.spkey import (
    API_KEY,
    OTHER_API_KEY,
    OTHER_ORG_LOCK,
    REQUEST_SCHEMAS,
    SEED_APP_KEY,
    SEED_LOCKS,
    SEED_USERS,
    SpkeySimulator,
)

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
DOCUMENT = json.loads((Path(__file__).parent / "data" / "spkey" / "openapi-temp-keys.json").read_text())
FLAT1, FLAT2, FLAT3 = SEED_LOCKS["Guest Flat 1"], SEED_LOCKS["Guest Flat 2"], SEED_LOCKS["Guest Flat 3"]
BASE = "https://spkey.test"

PEOPLE = f"""\
users:
  maria: {{name: Maria Lopez, email: maria@cleanco.example}}
  jonas: {{name: Jonas Berg, email: jonas@cleanco.example}}
  lena: {{name: Lena Falk, email: lena@cleanco.example}}
devices:
  flat-1: {{system: guests, id: {FLAT1}}}
  flat-3: {{system: guests, id: {FLAT3}}}
"""
WITH_FLAT2 = PEOPLE + f"  flat-2: {{system: guests, id: {FLAT2}}}\n"     # the lock with the app-made key


def keys_yaml(*, end: str = "2026-11-29T18:00:00Z", users: str = "[maria, jonas]", max_uses: int = 1,
              description: str = "Cleaning crew, week 48", delivery: bool = True, cleaning_device: str = "flat-3",
              extra: str = "") -> str:
    text = f"""\
temp_keys:
  cleaning-week-48:
    device: {cleaning_device}
    access: users
    users: {users}
    start: 2026-11-23T08:00:00Z
    end: {end}
    max_uses: 30
    description: {description}
"""
    if delivery:
        text += f"""\
  sofa-delivery:
    device: flat-3
    access: public
    start: 2026-11-24T09:00:00Z
    end: 2026-11-24T17:00:00Z
    max_uses: {max_uses}
"""
    return text + extra


# ---------------------------------------------------------------------------------------- conformance

def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})", value):
        return False
    datetime.fromisoformat(value.replace("Z", "+00:00"))
    return True


FORMATS = jsonschema.FormatChecker()
FORMATS.checks("date-time", raises=ValueError)(_date_time)   # rfc3339-validator is not installed


def _closed(schema: Any) -> Any:
    """The schema with every object closed: nothing beyond its named properties (the vendor drops the rest,
    so a client sending more would believe in changes that never happen)."""
    if isinstance(schema, dict):
        closed = {k: _closed(v) for k, v in schema.items()}
        if "properties" in schema:
            closed["additionalProperties"] = False
        return closed
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def _validate(schema: dict[str, Any], value: Any, what: str) -> None:
    errors = sorted(jsonschema.Draft202012Validator(schema, format_checker=FORMATS).iter_errors(value), key=str)
    assert not errors, f"{what}: {errors[0].message} at {list(errors[0].absolute_path)} in {value!r}"


def _operation(method: str, path: str) -> tuple[str, dict[str, Any], dict[str, str]]:
    for template, item in DOCUMENT["paths"].items():
        regex = "^(?:/[^/]+)*?" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$"
        match = re.match(regex, path)
        if match and method.lower() in item:
            return template, item[method.lower()], match.groupdict()
    raise AssertionError(f"{method} {path} is not in the vendor's OpenAPI document")


ERROR_SCHEMA = DOCUMENT["paths"]["/locks/{id}/create-temp-key"]["post"]["responses"]["400"]["content"][
    "application/json"]["schema"]


def check_request(request: httpx.Request) -> str:
    """Assert that a request is one the document describes, as the provider must send it."""
    template, operation, params = _operation(request.method, request.url.path)
    what = f"{request.method} {request.url.path}"
    assert request.headers.get("x-api-key"), f"{what}: no X-API-Key"
    assert "authorization" not in request.headers, f"{what}: a second auth scheme (Authorization) was sent"
    declared = {p["name"]: p for p in operation.get("parameters", [])}
    for name, raw in params.items():
        value: Any = int(raw) if declared[name]["schema"]["type"] == "integer" and raw.isdigit() else raw
        _validate(declared[name]["schema"], value, f"{what}: path parameter {name}")
    query = dict(request.url.params)
    for name, value in query.items():
        assert name in declared and declared[name]["in"] == "query", f"{what}: undocumented query {name}"
        _validate(declared[name]["schema"], value, f"{what}: query {name}")
    for name, parameter in declared.items():
        if parameter["in"] == "query" and parameter.get("required"):
            assert name in query, f"{what}: required query {name} missing"
    body_spec = operation.get("requestBody")
    if body_spec is None:
        assert not request.content, f"{what}: a body where the document has none"
    else:
        assert request.headers.get("content-type", "").startswith("application/json"), what
        schema = body_spec["content"]["application/json"]["schema"]
        body = json.loads(request.content)
        _validate(schema, body, f"{what}: request body")
        _validate(_closed(schema), body, f"{what}: request body (fields the vendor would drop)")
    return template


def check_response(request: httpx.Request, response: httpx.Response) -> None:
    """Assert that an answer has the document's shape for its status (undocumented statuses: `{error,
    message}`, the document's error object)."""
    template, operation, _ = _operation(request.method, request.url.path)
    what = f"{request.method} {request.url.path} → {response.status_code}"
    assert response.headers.get("content-type", "").startswith("application/json"), what
    body = response.json()
    documented = operation["responses"].get(str(response.status_code))
    schema = documented["content"]["application/json"]["schema"] if documented else ERROR_SCHEMA
    _validate(schema, body, what)


class Recorder:
    """The simulator's handler with every exchange kept, for the conformance checks."""

    def __init__(self, sim: SpkeySimulator):
        self.sim = sim
        self.exchanges: list[tuple[httpx.Request, httpx.Response | None]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        try:
            response = self.sim.handle(request)
        except httpx.TransportError:
            self.exchanges.append((request, None))
            raise
        self.exchanges.append((request, response))
        return response

    def check_all(self) -> int:
        return check_all(self.exchanges)


def check_all(exchanges: list[tuple[httpx.Request, httpx.Response | None]]) -> int:
    """Every request, and every answer that arrived, against the vendor's OpenAPI document."""
    for request, response in exchanges:
        check_request(request)
        if response is not None:
            check_response(request, response)
    return len(exchanges)


# -------------------------------------------------------------------------------------------- harness

GUESTS = replace(SPKEY, files={"people.yaml": PEOPLE})


def posts(h: VendorHarness, operation: str) -> list[dict[str, Any]]:
    """Bodies of the provider's POSTs to `/locks/{id}/<operation>` that reached the vendor."""
    return [r.body for r in h.sim.requests if r.method == "POST" and r.path.endswith(f"/{operation}")]


def raw(h: VendorHarness, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return h.raw(method, path, headers={"X-API-Key": API_KEY}, **kwargs)


def temp_keys(h: VendorHarness, lock: int = FLAT3) -> list[dict[str, Any]]:
    """The lock's temp keys as the vendor lists them (a raw request, not the provider under test)."""
    response = raw(h, "GET", f"/locks/{lock}/temp-keys")
    assert response.status_code == 200, response.text
    return response.json()["tempKeys"]


def uuid_of(name: str, lock: int = FLAT3) -> str:
    return temp_key_uuid("guests", str(lock), name)


@pytest.fixture
def spk(tmp_path) -> VendorHarness:
    return VendorHarness(tmp_path, GUESTS)


def converged(h: VendorHarness) -> None:
    plan = h.plan()
    assert not plan.has_changes, [(c.address, c.action, c.changed) for c in plan.changes]


# ------------------------------------------------------------------------------------ provider: basics

def test_capabilities_are_what_the_policy_checks_read():
    assert CAPABILITIES.vendor == "spkey" and CAPABILITIES.temp_keys and CAPABILITIES.needs_email
    assert CAPABILITIES.grant_kind == "temp_key" and not CAPABILITIES.creates_devices
    assert CAPABILITIES.device_id_pattern == r"[1-9]\d*" and CAPABILITIES.credentials == {"api_key"}
    assert not CAPABILITIES.operations and not CAPABILITIES.schedules and not CAPABILITIES.share_roles


def test_plan_apply_plan_converges_and_the_vendor_holds_exactly_the_policy(spk):
    spk.write(keys_yaml())
    first = spk.plan()
    assert sorted((c.address, c.action) for c in first.changes) == [
        ("guests/temp_key/cleaning-week-48", "create"), ("guests/temp_key/sofa-delivery", "create")]
    _, report = spk.apply()
    assert report.ok, report.lines()
    converged(spk)
    keys = {k["uuid"]: k for k in temp_keys(spk)}
    assert set(keys) == {uuid_of("cleaning-week-48"), uuid_of("sofa-delivery")}
    cleaning = keys[uuid_of("cleaning-week-48")]
    assert cleaning["accessMode"] == "user-whitelist"
    assert sorted(cleaning["allowedUserIds"]) == sorted([SEED_USERS["maria@cleanco.example"],
                                                         SEED_USERS["jonas@cleanco.example"]])
    assert (cleaning["validFrom"], cleaning["validUntil"]) == ("2026-11-23T08:00:00.000Z", "2026-11-29T18:00:00.000Z")
    assert cleaning["maxUses"] == 30 and cleaning["status"] == "not-yet-valid"
    delivery = keys[uuid_of("sofa-delivery")]
    assert (delivery["accessMode"], delivery["allowedUserIds"], delivery["maxUses"]) == ("public", [], 1)
    described = {k["uuid"]: k["description"] for k in spk.sim.temp_keys(FLAT3)}
    assert described[uuid_of("cleaning-week-48")] == "Cleaning crew, week 48"
    assert check_all(spk.exchanges) > 0


def test_identity_needs_no_state(spk):
    spk.write(keys_yaml())
    spk.apply()
    spk.state_path.unlink()
    converged(spk)


def test_reads_are_one_list_per_lock_and_one_lookup_per_email(spk):
    spk.write(keys_yaml(users="[maria, jonas, lena]", extra="""\
  second-crew:
    device: flat-1
    access: users
    users: [maria, lena]
    start: 2026-11-23T08:00:00Z
    end: 2026-11-24T08:00:00Z
"""))
    spk.plan()
    gets = [(r.path, r.query.get("email")) for r in spk.sim.requests if r.method == "GET"]
    assert sorted(gets) == sorted([(f"/locks/{FLAT1}/temp-keys", None), (f"/locks/{FLAT3}/temp-keys", None),
                                   ("/users/by-email", "jonas@cleanco.example"),
                                   ("/users/by-email", "lena@cleanco.example"),
                                   ("/users/by-email", "maria@cleanco.example")])
    assert all(r.query.get("searchOnly") == "true" for r in spk.sim.requests if r.path == "/users/by-email")
    assert not [r for r in spk.sim.requests if r.method != "GET"]


def test_only_the_api_key_is_sent_never_a_bearer_too(spk):
    spk.write(keys_yaml())
    spk.apply()
    for request, _ in spk.exchanges:
        assert request.headers["x-api-key"] == API_KEY
        assert "authorization" not in request.headers


# ------------------------------------------------------------------------------------ provider: changes

@pytest.mark.parametrize("change, field, expected", [
    (dict(end="2026-11-30T18:00:00Z"), "validUntil", "2026-11-30T18:00:00Z"),
    (dict(users="[maria, lena]"), "allowedUserIds",
     sorted([SEED_USERS["maria@cleanco.example"], SEED_USERS["lena@cleanco.example"]])),
])
def test_a_change_is_exactly_one_update_with_only_that_field(spk, change, field, expected):
    spk.write(keys_yaml())
    spk.apply()
    spk.write(keys_yaml(**change))
    plan = spk.plan()
    assert [(c.address, c.action) for c in plan.changes] == [("guests/temp_key/cleaning-week-48", "update")]
    spk.sim.reset_log()
    _, report = spk.apply()
    assert report.ok, report.lines()
    [body] = posts(spk, "update-temp-key")
    assert not posts(spk, "create-temp-key") and not posts(spk, "delete-temp-key")
    assert set(body) == {"tempKeyUuid", field}
    assert body["tempKeyUuid"] == uuid_of("cleaning-week-48")
    assert (sorted(body[field]) if isinstance(expected, list) else body[field]) == expected
    converged(spk)
    check_all(spk.exchanges)


def test_public_to_users_sends_mode_and_users(spk):
    spk.write(keys_yaml())
    spk.apply()
    text = keys_yaml().replace("    access: public\n", "    access: users\n    users: [lena]\n")
    spk.write(text)
    spk.sim.reset_log()
    spk.apply()
    [body] = posts(spk, "update-temp-key")
    assert body == {"tempKeyUuid": uuid_of("sofa-delivery"), "accessMode": "user-whitelist",
                    "allowedUserIds": [SEED_USERS["lena@cleanco.example"]]}
    converged(spk)


def test_removing_a_key_sends_one_delete(spk):
    spk.write(keys_yaml())
    spk.apply()
    spk.write(keys_yaml(delivery=False))
    plan = spk.plan()
    assert [(c.address, c.action, c.effect) for c in plan.changes] == [
        ("guests/temp_key/sofa-delivery", "delete", "revoke")]     # named from state
    spk.sim.reset_log()
    _, report = spk.apply()
    assert report.ok
    assert posts(spk, "delete-temp-key") == [{"tempKeyUuid": uuid_of("sofa-delivery")}]
    assert len(spk.sim.requests) - len([r for r in spk.sim.requests if r.method == "GET"]) == 1
    assert [k["uuid"] for k in temp_keys(spk)] == [uuid_of("cleaning-week-48")]
    converged(spk)


def test_removed_key_without_state_is_revoked_by_uuid(spk):
    spk.write(keys_yaml())
    spk.apply()
    spk.state_path.unlink()
    spk.write(keys_yaml(delivery=False))
    plan = spk.plan()
    assert [(c.address, c.action) for c in plan.changes] == [
        (f"guests/temp_key/id:{uuid_of('sofa-delivery')}", "delete")]


def test_keys_nobody_declared_follow_the_unmanaged_mode(spk):
    spk.write(keys_yaml(delivery=False, cleaning_device="flat-2"), people=WITH_FLAT2)
    plan = spk.plan()
    app_key = f"guests/temp_key/id:{SEED_APP_KEY}"
    assert (app_key, "delete") in [(c.address, c.action) for c in plan.changes]
    spk.write(keys_yaml(delivery=False, cleaning_device="flat-2"), people=WITH_FLAT2, unmanaged="report")
    plan = spk.plan()
    assert app_key not in [c.address for c in plan.changes]
    assert [n.address for n in plan.unmanaged] == [app_key]
    spk.apply()
    assert SEED_APP_KEY in {k["uuid"] for k in temp_keys(spk, FLAT2)}


def test_moving_a_key_to_another_lock_deletes_there_and_creates_here(spk):
    spk.write(keys_yaml(delivery=False))
    spk.apply()
    spk.write(keys_yaml(delivery=False, cleaning_device="flat-1"))
    plan = spk.plan()
    old = f"guests/temp_key/id:{uuid_of('cleaning-week-48')}"
    assert sorted((c.address, c.action) for c in plan.changes) == sorted([
        (old, "delete"), ("guests/temp_key/cleaning-week-48", "create")])
    _, report = spk.apply()
    assert report.ok, report.lines()
    assert temp_keys(spk, FLAT3) == []
    assert [k["uuid"] for k in temp_keys(spk, FLAT1)] == [uuid_of("cleaning-week-48", FLAT1)]
    converged(spk)


def test_a_changed_description_is_reported_not_silently_dropped(spk):
    spk.write(keys_yaml())
    spk.apply()
    spk.write(keys_yaml(description="Cleaning crew, week 48 (deep clean)"))
    plan = spk.plan()
    assert not plan.has_changes
    [warning] = [n for n in plan.warnings if n.address == "guests/temp_key/cleaning-week-48"]
    assert "description cannot be changed in place" in warning.message


# ------------------------------------------------------------------------------ provider: lost answers

@pytest.mark.parametrize("lost", ["502", "timeout"])
def test_a_lost_create_answer_is_looked_up_not_sent_again(spk, lost):
    # The OpenAPI lists no 409 for a repeated tempKeyUuid: the lock's list, not a repeat, says it landed.
    spk.write(keys_yaml(delivery=False))
    spk.sim.faults.add("POST", r"/create-temp-key$", commit=True, lost=lost)
    _, report = spk.apply()
    assert report.ok, report.lines()
    statuses = [r.status for r in spk.sim.requests if r.path.endswith("/create-temp-key")]
    assert statuses == [502 if lost == "502" else None]
    assert spk.sim.count("GET", f"/locks/{FLAT3}/temp-keys") == 2    # the plan's read, then the look-up
    assert [k["uuid"] for k in temp_keys(spk)] == [uuid_of("cleaning-week-48")]
    assert not posts(spk, "update-temp-key")    # the key that landed matches: nothing to correct
    converged(spk)
    check_all(spk.exchanges)


def test_lost_answers_until_the_run_gives_up_then_a_rerun_leaves_one_key(spk):
    spk.write(keys_yaml(delivery=False))
    # Every create is lost before it lands: each is looked up, found missing, and sent again, until the run
    # gives up; nothing is duplicated, and a rerun makes the one key.
    spk.sim.faults.add("POST", r"/create-temp-key$", lost="502", times=None)
    _, report = spk.apply()
    assert not report.ok and "502" in report.lines()[0]
    assert temp_keys(spk) == []
    assert spk.sim.count("POST", f"/locks/{FLAT3}/create-temp-key") == 4
    spk.sim.faults.clear()
    _, report = spk.apply()
    assert report is None or report.ok
    assert [k["uuid"] for k in temp_keys(spk)] == [uuid_of("cleaning-week-48")]
    converged(spk)
    check_all(spk.exchanges)


def test_a_key_that_landed_with_other_fields_is_corrected_in_place(spk):
    spk.write(keys_yaml(delivery=False))
    # The key already exists (made by an earlier run whose answer and state were lost), with an older end:
    # found by its uuid, it is updated, never created a second time.
    raw(spk, "POST", f"/locks/{FLAT3}/create-temp-key", json={
        "tempKeyUuid": uuid_of("cleaning-week-48"), "accessMode": "user-whitelist",
        "allowedUserIds": [SEED_USERS["maria@cleanco.example"], SEED_USERS["jonas@cleanco.example"]],
        "validFrom": "2026-11-23T08:00:00Z", "validUntil": "2026-11-28T18:00:00Z", "maxUses": 30})
    plan = spk.plan()
    assert [(c.address, c.action) for c in plan.changes] == [("guests/temp_key/cleaning-week-48", "update")]
    spk.sim.reset_log()
    _, report = spk.apply()
    assert report.ok, report.lines()
    assert not posts(spk, "create-temp-key")
    assert posts(spk, "update-temp-key") == [{"tempKeyUuid": uuid_of("cleaning-week-48"),
                                             "validUntil": "2026-11-29T18:00:00Z"}]
    converged(spk)


def test_transient_errors_on_update_and_delete_are_retried(spk):
    spk.write(keys_yaml())
    spk.apply()
    spk.write(keys_yaml(end="2026-11-30T18:00:00Z", delivery=False))
    spk.sim.faults.add("POST", r"/update-temp-key$", status=503, times=2)
    spk.sim.faults.add("POST", r"/delete-temp-key$", commit=True, lost="502")
    _, report = spk.apply()
    assert report.ok, report.lines()
    converged(spk)


# ------------------------------------------------------------------------------- provider: refusals

def test_unknown_email_is_a_plan_error_naming_email_and_key_and_nothing_is_sent(spk):
    people = PEOPLE.replace("devices:", "  zoe: {email: zoe@nowhere.example}\ndevices:")
    spk.write(keys_yaml(users="[maria, zoe]"), people=people)
    with pytest.raises(PlanError) as caught:
        spk.apply()
    [line] = caught.value.lines()
    assert "zoe@nowhere.example" in line and "cleaning-week-48" in line
    assert not [r for r in spk.sim.requests if r.method == "POST"]
    # searchOnly=true: looking somebody up never creates an account.
    assert raw(spk, "GET", "/users/by-email", params={"email": "zoe@nowhere.example",
                                                      "searchOnly": "true"}).status_code == 404


def test_another_organisations_lock_is_a_plan_error(spk):
    people = PEOPLE.replace(f"id: {FLAT3}", f"id: {OTHER_ORG_LOCK}")
    spk.write(keys_yaml(), people=people)
    with pytest.raises(PlanError, match=f"lock {OTHER_ORG_LOCK} belongs to another SmartphoneKey organisation"):
        spk.plan()


def test_an_unknown_lock_stops_the_plan_only_when_keys_need_it(spk):
    spk.write(keys_yaml(), people=PEOPLE.replace(f"id: {FLAT3}", "id: 4242"))
    with pytest.raises(PlanError, match="lock 4242 was not found.*cleaning-week-48, sofa-delivery"):
        spk.plan()
    spk.write("temp_keys: {}\n", people=PEOPLE.replace(f"id: {FLAT3}", "id: 4242"))
    plan = spk.plan()
    assert any("4242 was not found" in n.message for n in plan.warnings)


def test_a_permission_on_an_spkey_lock_is_refused(spk):
    spk.write("permissions:\n  - users: [maria]\n    devices: [flat-3]\n    end: 2026-12-01T00:00:00Z\n")
    with pytest.raises(PolicyError, match=r"only temporary keys .*declare this access under `temp_keys:`"):
        spk.plan()
    assert spk.sim.requests == []     # refused at validation: nothing sent


def test_a_wrong_api_key_is_one_line_without_the_key(spk):
    spk.write(keys_yaml())
    spk.env = {"SPKEY_API_KEY": "wrong-key-value-123"}
    with pytest.raises(VendorError) as caught:
        spk.plan()
    assert "401" in str(caught.value) and "wrong-key-value-123" not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_no_secret_in_state_plans_or_the_request_log(spk):
    spk.write(keys_yaml())
    plan = spk.plan()
    spk.apply()
    assert API_KEY not in spk.state_path.read_text()
    assert API_KEY not in render_text(plan) + render_json(plan)
    assert all(API_KEY not in json.dumps(r.headers) for r in spk.sim.requests)


# -------------------------------------------------------------------------- provider: vendor status

def test_a_key_whose_end_has_passed_is_reported_and_never_created_again(spk):
    spk.write(keys_yaml())
    spk.apply()
    spk.now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)       # the delivery ended yesterday
    plan = spk.plan()
    assert not plan.has_changes
    [note] = [n for n in plan.warnings if n.address == "guests/temp_key/sofa-delivery"]
    assert note.message.startswith("expired") and dict(note.details)["status"] == "expired"
    # The vendor forgets it (or someone deletes it): still not created again.
    raw(spk, "POST", f"/locks/{FLAT3}/delete-temp-key", json={"tempKeyUuid": uuid_of("sofa-delivery")})
    plan = spk.plan()
    assert not plan.has_changes
    assert any(n.address == "guests/temp_key/sofa-delivery" and "end 2026-11-24T17:00:00Z has passed" in n.message
               for n in plan.warnings)
    spk.sim.reset_log()
    _, report = spk.apply()
    assert report is None and not [r for r in spk.sim.requests if r.method == "POST"]


def test_a_used_up_key_is_reported_and_raising_max_uses_updates_it(spk):
    spk.write(keys_yaml())
    spk.apply()
    spk.now = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    assert spk.sim.use_key(FLAT3, uuid_of("sofa-delivery")) == 1
    with pytest.raises(ValueError, match="used-up"):
        spk.sim.use_key(FLAT3, uuid_of("sofa-delivery"))
    plan = spk.plan()
    assert not plan.has_changes                                  # used up is not gone: nothing re-created
    [note] = [n for n in plan.warnings if n.address == "guests/temp_key/sofa-delivery"]
    assert "used up (1 of 1 uses)" in note.message
    assert dict(note.details) == {"status": "used-up", "uses": 1, "max_uses": 1,
                                  "id": uuid_of("sofa-delivery")}
    assert {"address": "guests/temp_key/sofa-delivery", "status": "used-up", "uses": 1}.items() <= \
        json.loads(render_json(plan))["warnings"][0].items()

    spk.write(keys_yaml(max_uses=2))
    plan = spk.plan()
    assert [(c.address, c.action, c.changed) for c in plan.changes] == [
        ("guests/temp_key/sofa-delivery", "update", ("max_uses",))]
    assert any("the plan raises max_uses to 2" in n.message for n in plan.warnings)
    spk.sim.reset_log()
    _, report = spk.apply()
    assert report.ok
    assert posts(spk, "update-temp-key") == [{"tempKeyUuid": uuid_of("sofa-delivery"), "maxUses": 2}]
    status = {k["uuid"]: (k["status"], k["usedCount"]) for k in temp_keys(spk)}
    assert status[uuid_of("sofa-delivery")] == ("valid", 1)
    plan = spk.plan()
    assert not plan.has_changes and not plan.warnings
    check_all(spk.exchanges)


def test_a_key_declared_after_its_end_is_not_created(spk):
    spk.now = datetime(2026, 12, 1, tzinfo=UTC)
    spk.write(keys_yaml(delivery=True))
    plan = spk.plan()
    assert not plan.has_changes
    assert len([n for n in plan.warnings if "has passed" in n.message]) == 2


# ---------------------------------------------------------------------------- sandbox: the document

def test_the_kept_excerpt_names_its_source_and_matches_the_vendor_document():
    info = DOCUMENT["info"]
    assert "SmartphoneKey" in info["x-source"] and "B2C OpenAPI 3.1 document" in info["x-source"]
    assert DOCUMENT["openapi"].startswith("3.1")
    assert "$ref" not in json.dumps(DOCUMENT["paths"])
    for path in ("/locks/{id}/temp-keys", "/locks/{id}/create-temp-key", "/locks/{id}/update-temp-key",
                 "/locks/{id}/delete-temp-key", "/locks/{id}/basic-info", "/users/by-email"):
        assert path in DOCUMENT["paths"]
    vendors = Path(__file__).resolve().parents[2] / "shared" / "research" / "vendors"
    original = vendors / "smartphonekey-b2c-openapi.json"
    if original.exists():   # beside the repository in this workplace; the excerpt must not drift from it
        full = json.loads(original.read_text())
        for path, item in DOCUMENT["paths"].items():
            assert full["paths"][path] == item


def test_the_simulators_request_schemas_are_the_documents():
    operations = {"create_temp_key": "/locks/{id}/create-temp-key", "update_temp_key": "/locks/{id}/update-temp-key",
                  "delete_temp_key": "/locks/{id}/delete-temp-key", "use_temp_key": "/locks/{id}/use-temp-key"}
    for handler, path in operations.items():
        documented = DOCUMENT["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert REQUEST_SCHEMAS[handler] == documented, handler


def create_body(**overrides: Any) -> dict[str, Any]:
    body = {"tempKeyUuid": "7d4f3a52-54a8-4c55-a1d5-5b0b3c6f0a11", "accessMode": "public", "allowedUserIds": [],
            "validFrom": "2026-11-23T08:00:00Z", "validUntil": "2026-11-24T08:00:00Z", "maxUses": 2}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


@pytest.fixture
def sandbox() -> Recorder:
    return Recorder(SpkeySimulator(clock=lambda: NOW))


def call(recorder: Recorder, method: str, path: str, *, key: str | None = API_KEY, bearer: bool = False,
         **kwargs: Any) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    if bearer:
        headers["Authorization"] = "Bearer eyJhbGciOiJIUzI1NiJ9.e30.x"
    with httpx.Client(transport=httpx.MockTransport(recorder), base_url=BASE, headers=headers) as client:
        response = client.request(method, path, **kwargs)
    check_response(response.request, response)
    return response


@pytest.mark.parametrize("body, message", [
    (create_body(validFrom=...), "body.validFrom is required"),
    (create_body(maxUses=0), "body.maxUses must be greater than 0"),
    (create_body(maxUses=-3), "greater than 0"),
    (create_body(maxUses=1.5), "body.maxUses must be of type integer or null"),
    (create_body(maxUses="2"), "integer or null"),
    (create_body(validUntil="2026-11-24"), "body.validUntil must be an ISO 8601 date-time"),
    (create_body(validUntil="2026-11-24T08:00:00"), "date-time"),
    (create_body(accessMode="everyone"), "body.accessMode must be one of public, user-whitelist"),
    (create_body(description="x" * 2001), "at most 2000 characters"),
    (create_body(allowedUserIds=[1]), "body.allowedUserIds[0] must be of type string"),
    (create_body(validUntil="2026-11-23T08:00:00Z"), "validUntil must be after validFrom"),
    (create_body(accessMode="user-whitelist"), "needs at least one allowed user"),
    (create_body(accessMode="user-whitelist", allowedUserIds=["not-a-user"]), "Unknown user id"),
    ([create_body()], "body must be of type object"),
])
def test_schema_violations_are_400_with_error_and_message(sandbox, body, message):
    response = call(sandbox, "POST", f"/locks/{FLAT1}/create-temp-key", json=body)
    assert response.status_code == 400
    assert set(response.json()) == {"error", "message"} and message in response.json()["message"]
    assert sandbox.sim.temp_keys(FLAT1) == []


def test_max_uses_may_be_null_and_create_answers_the_documented_envelope(sandbox):
    response = call(sandbox, "POST", f"/locks/{FLAT1}/create-temp-key", json=create_body(maxUses=None,
                                                                                          description="Viewing"))
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"success", "aggregateId", "version", "event", "tempKeyUuid"}
    assert body["success"] is True and body["tempKeyUuid"] == create_body()["tempKeyUuid"]
    assert body["event"]["type"] == "TempKeyCreated"
    assert body["event"]["data"]["maxUses"] is None and body["event"]["data"]["lockId"] == FLAT1
    [key] = call(sandbox, "GET", f"/locks/{FLAT1}/temp-keys").json()["tempKeys"]
    assert set(key) == {"uuid", "lockId", "lockUuid", "accessMode", "allowedUserIds", "validFrom", "validUntil",
                        "maxUses", "usedCount", "createdAt", "createdBy", "status"}
    assert (key["maxUses"], key["usedCount"], key["status"]) == (None, 0, "not-yet-valid")


def test_a_repeated_temp_key_uuid_is_400_on_any_lock(sandbox):
    assert call(sandbox, "POST", f"/locks/{FLAT1}/create-temp-key", json=create_body()).status_code == 200
    for lock in (FLAT1, FLAT2):
        again = call(sandbox, "POST", f"/locks/{lock}/create-temp-key", json=create_body(maxUses=5))
        assert again.status_code == 400 and set(again.json()) == {"error", "message"}
    [key] = sandbox.sim.temp_keys(FLAT1)
    assert key["maxUses"] == 2
    # Deleted, the uuid is free again.
    call(sandbox, "POST", f"/locks/{FLAT1}/delete-temp-key", json={"tempKeyUuid": key["uuid"]})
    assert call(sandbox, "POST", f"/locks/{FLAT2}/create-temp-key", json=create_body()).status_code == 200


def test_auth_is_the_api_key_alone(sandbox):
    path = f"/locks/{FLAT1}/temp-keys"
    assert call(sandbox, "GET", path, key=None).status_code == 401
    assert call(sandbox, "GET", path, key="spk_wrong").status_code == 401
    assert call(sandbox, "GET", path, key=None, bearer=True).status_code == 401
    assert call(sandbox, "GET", path, bearer=True).status_code == 401   # one scheme, never both
    assert call(sandbox, "GET", path).status_code == 200
    assert call(sandbox, "GET", "/users/by-email", key=None, params={"email": "a@b.co"}).status_code == 401


def test_locks_unknown_foreign_or_malformed(sandbox):
    missing = call(sandbox, "GET", "/locks/4242/temp-keys")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found", "message": "Lock not found",
                                                              "code": 404}
    info = call(sandbox, "GET", "/locks/4242/basic-info")
    assert info.status_code == 404 and info.json() == {"success": False,
                                                       "errors": [{"code": 404, "message": "Lock not found"}]}
    for method, path in (("GET", "temp-keys"), ("GET", "basic-info")):
        assert call(sandbox, method, f"/locks/{OTHER_ORG_LOCK}/{path}").status_code == 403
    assert call(sandbox, "POST", f"/locks/{OTHER_ORG_LOCK}/create-temp-key", json=create_body()).status_code == 403
    with httpx.Client(transport=httpx.MockTransport(sandbox.sim.handle), base_url=BASE,
                      headers={"X-API-Key": OTHER_API_KEY}) as other:
        assert other.get(f"/locks/{OTHER_ORG_LOCK}/temp-keys").status_code == 200
        assert other.get(f"/locks/{FLAT1}/temp-keys").status_code == 403
    for bad in ("0", "abc", "-1"):
        assert call(sandbox, "GET", f"/locks/{bad}/temp-keys").status_code == 400
    ok = call(sandbox, "GET", f"/locks/{FLAT1}/basic-info").json()
    assert ok["lockId"] == FLAT1 and ok["orgId"] == ok["organizationId"]


def test_update_changes_only_what_is_sent_and_drops_unknown_fields(sandbox):
    call(sandbox, "POST", f"/locks/{FLAT1}/create-temp-key", json=create_body(description="Viewing"))
    uuid = create_body()["tempKeyUuid"]
    response = call(sandbox, "POST", f"/locks/{FLAT1}/update-temp-key",
                    json={"tempKeyUuid": uuid, "validUntil": "2026-11-25T08:00:00Z", "description": "ignored"})
    body = response.json()
    assert response.status_code == 200 and set(body) == {"success", "aggregateId", "version", "event"}
    assert body["event"]["type"] == "TempKeyUpdated"
    assert body["event"]["data"]["changes"] == {"validUntil": "2026-11-25T08:00:00.000Z"}
    [key] = sandbox.sim.temp_keys(FLAT1)
    assert key["validUntil"] == "2026-11-25T08:00:00.000Z" and key["description"] == "Viewing"
    same = call(sandbox, "POST", f"/locks/{FLAT1}/update-temp-key", json={"tempKeyUuid": uuid, "maxUses": 2})
    assert same.json()["event"] is None and same.json()["version"] == body["version"]
    assert call(sandbox, "POST", f"/locks/{FLAT1}/update-temp-key", json={"tempKeyUuid": uuid, "maxUses": 0}
                ).status_code == 400
    assert call(sandbox, "POST", f"/locks/{FLAT2}/update-temp-key", json={"tempKeyUuid": uuid, "maxUses": 3}
                ).status_code == 404
    deleted = call(sandbox, "POST", f"/locks/{FLAT1}/delete-temp-key", json={"tempKeyUuid": uuid})
    assert deleted.json()["event"]["type"] == "TempKeyDeleted"
    assert call(sandbox, "POST", f"/locks/{FLAT1}/delete-temp-key", json={"tempKeyUuid": uuid}).status_code == 404


def test_status_follows_the_clock_and_uses(sandbox):
    uuid = create_body()["tempKeyUuid"]
    call(sandbox, "POST", f"/locks/{FLAT1}/create-temp-key", json=create_body())

    def status() -> tuple[str, int]:
        [key] = call(sandbox, "GET", f"/locks/{FLAT1}/temp-keys").json()["tempKeys"]
        return key["status"], key["usedCount"]

    assert status() == ("not-yet-valid", 0)
    with pytest.raises(ValueError, match="not-yet-valid"):
        sandbox.sim.use_key(FLAT1, uuid)
    sandbox.sim.advance(timedelta(days=1))                      # 2026-11-23T10:00Z: inside the window
    assert status() == ("valid", 0)
    assert sandbox.sim.use_key(FLAT1, uuid) == 1
    used = call(sandbox, "POST", f"/locks/{FLAT1}/use-temp-key", json={"tempKeyUuid": uuid})
    assert used.json()["event"]["data"]["usedCount"] == 2
    assert status() == ("used-up", 2)
    assert call(sandbox, "POST", f"/locks/{FLAT1}/use-temp-key", json={"tempKeyUuid": uuid}).status_code == 400
    sandbox.sim.advance(timedelta(days=2))
    assert status() == ("expired", 2)


def test_a_whitelist_key_opens_for_its_users(sandbox):
    maria, lena = SEED_USERS["maria@cleanco.example"], SEED_USERS["lena@cleanco.example"]
    body = create_body(accessMode="user-whitelist", allowedUserIds=[maria], validFrom="2026-11-22T08:00:00Z",
                       maxUses=None)
    call(sandbox, "POST", f"/locks/{FLAT1}/create-temp-key", json=body)
    uuid = body["tempKeyUuid"]
    assert sandbox.sim.use_key(FLAT1, uuid, maria) == 1
    assert sandbox.sim.use_key(FLAT1, uuid) == 2            # the open flow already checked who it was
    with pytest.raises(ValueError, match="does not open for user"):
        sandbox.sim.use_key(FLAT1, uuid, lena)
    refused = call(sandbox, "POST", f"/locks/{FLAT1}/use-temp-key", json={"tempKeyUuid": uuid, "userId": lena})
    assert refused.status_code == 400


def test_users_by_email(sandbox):
    found = call(sandbox, "GET", "/users/by-email", params={"email": "MARIA@cleanco.example", "searchOnly": "true"})
    assert found.json()["uuid"] == SEED_USERS["maria@cleanco.example"]
    missing = call(sandbox, "GET", "/users/by-email", params={"email": "new@example.com", "searchOnly": "true"})
    assert missing.status_code == 404 and set(missing.json()) == {"error"}
    assert call(sandbox, "GET", "/users/by-email", params={"email": "new@example.com", "searchOnly": "yes"}
                ).status_code == 400
    assert call(sandbox, "GET", "/users/by-email", params={"searchOnly": "true"}).status_code == 400
    created = call(sandbox, "GET", "/users/by-email", params={"email": "new@example.com"})
    assert created.status_code == 200 and created.json()["email"] == "new@example.com"
    assert call(sandbox, "GET", "/users/by-email", params={"email": "new@example.com", "searchOnly": "true"}
                ).json()["uuid"] == created.json()["uuid"]


def test_the_store_persists_and_is_reloaded(tmp_path):
    first = SpkeySimulator(store_path=tmp_path / "spkey.json", clock=lambda: NOW)
    with httpx.Client(transport=httpx.MockTransport(first.handle), base_url=BASE,
                      headers={"X-API-Key": first.credentials["api_key"]}) as client:
        assert client.post(f"/locks/{FLAT1}/create-temp-key", json=create_body()).status_code == 200
    second = SpkeySimulator(store_path=tmp_path / "spkey.json", clock=lambda: NOW)
    assert [k["uuid"] for k in second.temp_keys(FLAT1)] == [create_body()["tempKeyUuid"]]
    assert API_KEY not in json.dumps([r.headers for r in first.requests])


def test_rate_limit_answers_429_in_the_error_shape():
    sim = SpkeySimulator(clock=lambda: NOW, rate_limit=1, monotonic=lambda: 0.0)
    recorder = Recorder(sim)
    assert call(recorder, "GET", f"/locks/{FLAT1}/temp-keys").status_code == 200
    limited = call(recorder, "GET", f"/locks/{FLAT1}/temp-keys")
    assert limited.status_code == 429 and "retry-after" in limited.headers


def test_every_exchange_of_a_full_scenario_conforms(spk):
    """plan, apply, change, use up, raise, expire, remove, with lost answers: all requests and answers
    validate against the vendor's document."""
    spk.write(keys_yaml())
    spk.sim.faults.add("POST", r"/create-temp-key$", commit=True, lost="502")
    spk.apply()
    spk.write(keys_yaml(end="2026-11-30T18:00:00Z", users="[lena]"))
    spk.apply()
    spk.now = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    spk.sim.use_key(FLAT3, uuid_of("sofa-delivery"))
    spk.write(keys_yaml(end="2026-11-30T18:00:00Z", users="[lena]", max_uses=3))
    spk.apply()
    spk.write(keys_yaml(delivery=False, end="2026-11-30T18:00:00Z", users="[lena]"))
    spk.apply()
    spk.now = datetime(2026, 12, 5, tzinfo=UTC)
    converged(spk)
    templates = {check_request(request) for request, _ in spk.exchanges}
    assert templates == {"/locks/{id}/temp-keys", "/locks/{id}/create-temp-key", "/locks/{id}/update-temp-key",
                         "/locks/{id}/delete-temp-key", "/users/by-email"}
    assert check_all(spk.exchanges) > 20


# ------------------------------------------------------------------------- CLI against a served sandbox

@pytest.fixture
def served_spkey(tmp_path):
    with serve_sandboxes(tmp_path) as (root, printed):
        yield f"{root}/spkey", printed["SPKEY_API_KEY"]


def test_cli_end_to_end_against_served_sandbox(tmp_path, served_spkey):
    url, key = served_spkey
    policy = tmp_path / "policies"
    policy.mkdir()
    (policy / "systems.yaml").write_text(
        f"systems:\n  guests:\n    vendor: spkey\n    url: {url}\n    credentials: {{api_key: \"${{SPKEY_API_KEY}}\"}}\n")
    (policy / "people.yaml").write_text(PEOPLE)
    (policy / "keys.yaml").write_text(keys_yaml())
    env = {**os.environ, "SPKEY_API_KEY": key, "RECONCILER_STATE": str(tmp_path / "state.json")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*reconciler_command(), *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=120)

    first = cli("plan", "--detailed-exitcode", "--now", "2026-11-22T10:00:00Z")
    assert first.returncode == 2, first.stdout + first.stderr
    assert "+ guests/temp_key/cleaning-week-48  [grant]" in first.stdout
    applied = cli("apply", "--auto-approve", "--now", "2026-11-22T10:00:00Z")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    final = cli("plan", "--detailed-exitcode", "--format", "json", "--now", "2026-11-22T10:00:00Z")
    assert final.returncode == 0, final.stdout + final.stderr
    assert json.loads(final.stdout)["changes"] == []
    for output in (first, applied, final):
        assert key not in output.stdout + output.stderr
    assert key not in (tmp_path / "state.json").read_text()
    with httpx.Client(base_url=url, headers={"X-API-Key": key}) as client:
        listed = client.get(f"/locks/{FLAT3}/temp-keys").json()["tempKeys"]
    assert sorted(k["uuid"] for k in listed) == sorted(
        temp_key_uuid("guests", str(FLAT3), name) for name in ("cleaning-week-48", "sofa-delivery"))
    env["SPKEY_API_KEY"] = "wrong-key-value-123"
    wrong = cli("plan", "--now", "2026-11-22T10:00:00Z")
    assert wrong.returncode == 1 and "401" in wrong.stderr and "Traceback" not in wrong.stderr
    assert "wrong-key-value-123" not in wrong.stderr
