"""The Unloc Integrator provider against the Unloc simulator, the simulator's refusals, and the CLI end to end.

Provider tests plan and apply the way the CLI does (`reconciler.run` through the httpx transport seam) and
then look at the vendor with raw requests, so a pass means the vendor really holds one key per grant.
The simulator tests drive it directly with the requests a client would send.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import NOW, reconciler_command, serve_sandboxes
from harness import UNLOC, VendorHarness

from reconciler import run
from reconciler.applier import apply_plan
from reconciler.errors import PolicyError, VendorError
from reconciler.render import render_text
from reconciler.sandbox.unloc import (
    CLIENT_ID,
    CLIENT_SECRET,
    LOCK_HOLDER_ID,
    SEED_KEY_ID,
    SEED_KEY_PHONE,
    SEED_LOCKS,
    UnlocSimulator,
)
from reconciler.state import LocalState

BASE = "https://unloc.test"
LH = f"/integrators/v1/lock-holders/{LOCK_HOLDER_ID}"
CABIN7, CABIN3, GATE = SEED_LOCKS["Cabin 7"], SEED_LOCKS["Cabin 3"], SEED_LOCKS["Main Gate"]
ALICE, BOB, CAROL = "+4790000001", "+4790000002", "+4790000003"
OFFICE_SPANS = [{"weekday": d, "startHour": 8, "startMinute": 0, "endHour": 18, "endMinute": 0}
                for d in ("mon", "tue", "wed", "thu", "fri")]

POLICY = f"""\
users:
  alice: {{phone: "{ALICE}"}}
  bob: {{phone: "{BOB}"}}
  carol: {{phone: "{CAROL}"}}
groups:
  cleaners: [alice, bob]
devices:
  cabin-7: {{system: cabins, id: {CABIN7}}}
  cabin-3: {{system: cabins, id: {CABIN3}}}
  gate: {{system: cabins, id: {GATE}}}
schedules:
  office-hours:
    - {{days: [mon, tue, wed, thu, fri], from: "08:00", to: "18:00"}}
  weekend:
    - {{days: [sat], from: "14:45", to: "16:30"}}
    - {{days: [sun], from: "10:00", to: "24:00"}}
permissions:
  - groups: [cleaners]
    devices: [cabin-7, cabin-3]
    schedule: office-hours
    start: 2026-01-01T00:00:00Z
    end: 2027-12-31T23:59:59Z
  - users: [carol]
    devices: [cabin-7]
  - users: [carol]
    devices: [gate]
  - users: [carol]
    devices: [cabin-3]
    schedule: weekend
    end: 2027-06-30T00:00:00Z
"""
GRANTS = 2 * 2 + 2 + 1


def posts(h: VendorHarness) -> list[Any]:
    """The key creations that reached the vendor."""
    return [r for r in h.sim.requests if r.method == "POST" and r.path.endswith("/keys")]


@pytest.fixture
def h(tmp_path: Path) -> VendorHarness:
    return VendorHarness(tmp_path, UNLOC)


def client(sim: UnlocSimulator, *, token: bool = True) -> httpx.Client:
    """A raw client, not the provider under test."""
    headers = {}
    if token:
        with httpx.Client(transport=httpx.MockTransport(sim.handle), base_url=BASE) as c:
            headers["Authorization"] = f"Bearer {get_token(c)}"
    return httpx.Client(transport=httpx.MockTransport(sim.handle), base_url=BASE, headers=headers)


def get_token(c: httpx.Client, **overrides: Any) -> str:
    response = c.post("/auth/v1/token/", json=token_body(**overrides))
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def token_body(**overrides: Any) -> dict[str, Any]:
    return {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
            "scope": [f"lockHolder.admin:{LOCK_HOLDER_ID}"], **overrides}


def lock_keys(sim: UnlocSimulator, lock_id: str) -> list[dict[str, Any]]:
    with client(sim) as c:
        response = c.get(f"{LH}/locks/{lock_id}/keys/")
        assert response.status_code == 200, response.text
        return response.json()["keys"]


def working_keys(sim: UnlocSimulator) -> collections.Counter[tuple[str, str]]:
    keys = [k for lock in SEED_LOCKS.values() for k in lock_keys(sim, lock)]
    return collections.Counter((k["toUser"]["id"], k["lockId"]) for k in keys
                               if k["state"] in ("creating", "scheduled", "active"))


def assert_converged(h: VendorHarness, grants: int = GRANTS) -> None:
    plan = h.plan()
    assert not plan.has_changes, [(c.address, c.action, c.changed) for c in plan.changes]
    keys = working_keys(h.sim)
    assert all(n == 1 for n in keys.values()), keys
    assert len(keys) == grants


def refusal(response: httpx.Response, status: int, error: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "errorDescription"}, body
    if error is not None:
        assert body["error"] == error, body
    return body["errorDescription"]


# ------------------------------------------------------------------------------------------------ provider

def test_plan_apply_plan_converges_with_recurrences(h):
    h.write(POLICY)
    first = h.plan()
    actions = {c.address: c.action for c in first.changes}
    assert sorted(a for a, act in actions.items() if act == "create") == sorted(
        f"cabins/key/{user}/{device}" for user, device in [
            ("alice", "cabin-7"), ("alice", "cabin-3"), ("bob", "cabin-7"), ("bob", "cabin-3"),
            ("carol", "cabin-7"), ("carol", "gate"), ("carol", "cabin-3")])
    # The seeded key of a former caretaker, on an adopted lock and in nobody's policy: revoked.
    assert [c.address for c in first.changes if c.effect == "revoke"] == [f"cabins/key/id:{SEED_KEY_PHONE}/cabin-7"]
    assert {n.address for n in first.unmanaged} == {
        f"cabins/device/id:{lock}" for name, lock in SEED_LOCKS.items()
        if name not in ("Cabin 7", "Cabin 3", "Main Gate")}
    _, report = h.apply()
    assert report.ok, report.lines()

    # Right after apply the keys are still being made: pending, not drift, and nothing to do.
    again = h.plan()
    assert not again.has_changes
    assert len(again.pending) == GRANTS
    assert {n.message for n in again.pending} == {"key being created by Unloc"}
    assert_converged(h)

    h.now += timedelta(seconds=3)          # the vendor finishes making them
    settled = h.plan()
    assert not settled.has_changes and not settled.pending
    assert_converged(h)
    keys = {(k["toUser"]["id"], k["lockId"]): k for lock in SEED_LOCKS.values() for k in lock_keys(h.sim, lock)}
    assert keys[(ALICE, CABIN7)]["recurrence"] == {"timeSpans": OFFICE_SPANS}
    assert keys[(ALICE, CABIN7)]["state"] == "active"
    assert (keys[(ALICE, CABIN7)]["start"], keys[(ALICE, CABIN7)]["end"]) == (
        "2026-01-01T00:00:00.000Z", "2027-12-31T23:59:59.000Z")
    assert keys[(CAROL, GATE)]["end"] is None and "recurrence" not in keys[(CAROL, GATE)]
    assert sorted(keys[(CAROL, CABIN3)]["recurrence"]["timeSpans"], key=lambda s: s["weekday"]) == [
        {"weekday": "sat", "startHour": 14, "startMinute": 45, "endHour": 16, "endMinute": 30},
        {"weekday": "sun", "startHour": 10, "startMinute": 0, "endHour": 24, "endMinute": 0}]
    assert keys[(SEED_KEY_PHONE, CABIN7)]["state"] == "revoked"


def test_a_second_apply_while_keys_are_creating_sends_no_create(h):
    h.write(POLICY)
    h.apply()
    assert len(posts(h)) == GRANTS
    h.sim.reset_log()
    plan, report = h.apply()
    assert report is None and not plan.has_changes
    assert posts(h) == []
    assert {r.method for r in h.sim.requests} <= {"GET", "POST"}    # reads and a token, nothing else


def test_a_changed_window_replaces_exactly_that_key(h):
    h.write(POLICY)
    h.converge()
    h.sim.settle()
    old = {k["toUser"]["id"]: k["id"] for k in lock_keys(h.sim, GATE)}[CAROL]
    h.write(POLICY.replace("    devices: [gate]\n", "    devices: [gate]\n    end: 2027-03-31T00:00:00Z\n"))
    plan = h.plan()
    assert [(c.address, c.action, c.changed) for c in plan.changes] == [
        ("cabins/key/carol/gate", "replace", ("end",))]
    text = render_text(plan)      # the plan says it is a revoke + create, and why
    assert "-/+ cabins/key/carol/gate  [revoke]" in text   # an end moved earlier takes access away
    assert 'end: null -> "2027-03-31T00:00:00Z"' in text
    h.sim.reset_log()
    _, report = h.apply()
    assert report.ok, report.lines()
    patches = [r for r in h.sim.requests if r.method == "PATCH"]
    assert [(r.path.rsplit("/", 1)[-1], r.body) for r in patches] == [(old, {"state": "revoked"})]
    assert len(posts(h)) == 1 and posts(h)[0].body["end"] == "2027-03-31T00:00:00Z"
    gate = {k["id"]: k for k in lock_keys(h.sim, GATE)}
    assert gate[old]["state"] == "revoked"
    assert [k["end"] for k in gate.values() if k["state"] == "creating"] == ["2027-03-31T00:00:00.000Z"]
    assert_converged(h)


def test_a_changed_schedule_is_a_replace_too(h):
    h.write(POLICY)
    h.converge()
    h.sim.settle()
    h.write(POLICY.replace('from: "14:45", to: "16:30"', 'from: "14:45", to: "17:00"'))
    plan = h.plan()
    assert [(c.address, c.action, c.changed) for c in plan.changes] == [
        ("cabins/key/carol/cabin-3", "replace", ("schedule",))]
    h.converge()
    assert_converged(h)


def test_a_key_in_error_is_reported_and_created_again(h):
    h.write(POLICY)
    h.converge()
    failed = {k["toUser"]["id"]: k["id"] for k in lock_keys(h.sim, GATE)}[CAROL]
    h.sim.fail_key(failed, "Lock firmware rejected the key")
    plan = h.plan()
    assert [(c.address, c.action) for c in plan.changes] == [("cabins/key/carol/gate", "create")]
    [warning] = plan.warnings
    assert warning.address == "cabins/key/carol/gate"
    assert "Lock firmware rejected the key" in warning.message and "creates it again" in warning.message
    h.converge()
    after = h.plan()
    assert not after.has_changes and not after.warnings    # the failed key is replaced: nothing left to say
    assert_converged(h)
    states = collections.Counter(k["state"] for k in lock_keys(h.sim, GATE))
    assert states == {"error": 1, "creating": 1}


def test_expired_token_mid_run_leads_to_exactly_one_new_token(tmp_path):
    h = VendorHarness(tmp_path, UNLOC, token_ttl=300)
    h.write(POLICY)
    session = h.session()
    policy = run.validate(session)
    providers = run.build_providers(session, policy, LocalState(session.state_path))
    try:
        plan = run.make_plan(session, policy, providers)
        assert h.sim.count("POST", "/auth/v1/token") == 1
        h.now += timedelta(minutes=10)       # between the read and the writes, the token runs out
        report = apply_plan(plan, providers)
        assert report.ok, report.lines()
    finally:
        for provider in providers.values():
            provider.close()
    assert h.sim.count("POST", "/auth/v1/token") == 2
    expired = [r for r in h.sim.requests if r.status == 401]
    assert expired, "the vendor must have refused the expired token"
    assert_converged(h)


def test_rate_limit_is_waited_out_honouring_retry_after(tmp_path):
    clock = [0.0]
    h = VendorHarness(tmp_path, UNLOC, rate_limit=3, monotonic=lambda: clock[0])

    def sleep(seconds: float) -> None:
        h.sleeps.append(seconds)
        clock[0] += seconds

    h.sleep = sleep
    h.write(POLICY)
    _, report = h.apply()
    assert report.ok, report.lines()
    limited = [r for r in h.sim.requests if r.status == 429]
    assert limited
    assert h.sleeps and all(s >= 1 for s in h.sleeps)       # Retry-After, in whole seconds
    assert not h.plan().has_changes
    working = [k for k in h.sim.keys() if k["state"] == "creating"]
    assert len(working) == len({(k["toUser"]["id"], k["lockId"]) for k in working}) == GRANTS


@pytest.mark.parametrize("lost", ["timeout", "502"])
def test_a_lost_answer_on_create_leaves_exactly_one_key(h, lost):
    h.write(POLICY)
    h.sim.faults.add("POST", rf"/locks/{CABIN3}/keys$", commit=True, lost=lost, times=1)
    _, report = h.apply()
    assert report.ok, report.lines()
    assert h.sim.faults.fired
    # The lost create is looked up among the lock's keys (and found) instead of being sent again.
    lookups = [r for r in h.sim.requests if r.method == "GET" and r.path.endswith(f"/locks/{CABIN3}/keys")]
    assert len(lookups) == 1
    assert_converged(h)


def test_a_refused_create_that_did_not_land_is_sent_again_once(h):
    h.write(POLICY)
    h.sim.faults.add("POST", rf"/locks/{GATE}/keys$", status=503, times=1)
    _, report = h.apply()
    assert report.ok, report.lines()
    gate_posts = [r for r in posts(h) if f"/locks/{GATE}/" in r.path]
    assert [r.status for r in gate_posts] == [503, 201]
    assert_converged(h)


def test_every_recurrence_sent_has_the_documented_shape(h):
    h.write(POLICY)
    h.apply()
    recurrences = [r.body["recurrence"] for r in posts(h) if "recurrence" in r.body]
    assert len(recurrences) == 5
    for recurrence in recurrences:
        assert set(recurrence) == {"timeSpans"}
        days = [span["weekday"] for span in recurrence["timeSpans"]]
        assert len(days) == len(set(days)), "at most one span per weekday"
        for span in recurrence["timeSpans"]:
            assert set(span) == {"weekday", "startHour", "startMinute", "endHour", "endMinute"}
            assert span["weekday"] in ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
            assert all(type(span[k]) is int for k in ("startHour", "startMinute", "endHour", "endMinute"))
            assert 0 <= span["startHour"] <= 24 and 0 <= span["endHour"] <= 24
            assert 0 <= span["startMinute"] <= 59 and 0 <= span["endMinute"] <= 59
            start, end = span["startHour"] * 60 + span["startMinute"], span["endHour"] * 60 + span["endMinute"]
            assert start < end <= 24 * 60
    for body in (r.body for r in posts(h)):
        assert set(body) <= {"userId", "start", "end", "recurrence", "skipInviteNotification"}
        assert {"userId", "start", "end"} <= set(body)
        assert re.fullmatch(r"\+[1-9]\d{1,14}", body["userId"])


@pytest.mark.parametrize("spans, message", [
    ('    - {days: [mon, tue], from: "08:00", to: "12:00"}\n    - {days: [tue], from: "13:00", to: "16:00"}\n',
     "'tue' already has a span"),
    ('    - {days: [fri], from: "22:00", to: "06:00"}\n', "cannot cross midnight"),
])
def test_malformed_schedules_fail_validation_with_location_and_send_nothing(h, spans, message):
    h.write(f"users:\n  alice: {{phone: \"{ALICE}\"}}\ndevices:\n  cabin-7: {{system: cabins, id: {CABIN7}}}\n"
            f"schedules:\n  shifts:\n{spans}permissions:\n  - users: [alice]\n    devices: [cabin-7]\n"
            "    schedule: shifts\n")
    with pytest.raises(PolicyError) as caught:
        h.plan()
    [line] = caught.value.lines()
    assert re.match(r"^\S+policy\.yaml:\d+:\d+: ", line) and message in line, line
    assert h.sim.requests == []


def test_notify_false_creates_keys_without_the_invitation(h):
    h.write(POLICY, system_extra="notify: false\n")
    h.apply()
    assert posts(h) and all(r.body["skipInviteNotification"] is True for r in posts(h))


def test_notify_by_default_sends_no_skip_flag(h):
    h.write(POLICY)
    h.apply()
    assert posts(h) and all("skipInviteNotification" not in r.body for r in posts(h))


def test_notify_false_on_a_permission_overrides_the_systems_default(h):
    quiet_gate = POLICY.replace("  - users: [carol]\n    devices: [gate]\n", "  - users: [carol]\n    devices: [gate]\n"
                                "    notify: false\n")
    assert quiet_gate != POLICY
    h.write(quiet_gate)
    h.apply()
    skipped = {(r.path.split("/")[-2], r.body["userId"]) for r in posts(h) if r.body.get("skipInviteNotification")}
    assert skipped == {(GATE, CAROL)} and len(posts(h)) > 2


def test_notify_true_on_a_permission_overrides_a_quiet_system(h):
    loud = POLICY.replace("  - users: [carol]\n    devices: [cabin-7]\n", "  - users: [carol]\n    devices: [cabin-7]\n"
                          "    notify: true\n")
    h.write(loud, system_extra="notify: false\n")
    h.apply()
    notified = {(r.path.split("/")[-2], r.body["userId"]) for r in posts(h) if "skipInviteNotification" not in r.body}
    assert notified == {(CABIN7, CAROL)} and len(posts(h)) > 2


def test_notify_on_a_permission_elsewhere_is_refused(tmp_path, monkeypatch):
    from reconciler.policy import load_policy
    from reconciler.providers.factory import capabilities
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        systems:
          office: {vendor: sentry, url: sandbox}
        users:
          alice: {email: alice@example.com}
        devices:
          room: {system: office, id: 3f1c9a52-0e7b-4d2e-9b1a-5f0c2d7e8a11}
        permissions:
          - users: [alice]
            devices: [room]
            notify: false
        """))
    with pytest.raises(PolicyError, match=r"p.yaml:10:5: sentry cannot choose per grant whether the person is "
                                          r"notified"):
        load_policy(tmp_path, capabilities(), env={})


def test_keys_are_read_in_pages_of_500(h):
    h.write(POLICY)
    h.converge()
    for n in range(620):    # made by another integration on a lock nobody adopts, plus a few on ours
        h.sim.add_key(SEED_LOCKS["Boathouse"] if n >= 3 else GATE, f"+4798{n:06d}", via="api")
    h.sim.reset_log()
    plan = h.plan()
    assert sorted(c.address for c in plan.changes) == sorted(
        f"cabins/key/id:+4798{n:06d}/gate" for n in range(3))
    key_reads = [r for r in h.sim.requests if r.method == "GET" and r.path.endswith("/keys")]
    assert [r.query.get("limit") for r in key_reads] == ["500", "500"]
    assert "startAfterId" in key_reads[1].query
    assert all(r.path.endswith(("/locks", f"{LOCK_HOLDER_ID}/keys")) for r in h.sim.requests if r.method == "GET")


def test_a_schedule_dropped_from_the_policy_replaces_the_key(h):
    h.write(POLICY)
    h.converge()
    h.write(POLICY.replace("    schedule: weekend\n", ""))
    plan = h.plan()
    assert [(c.address, c.action, c.changed) for c in plan.changes] == [
        ("cabins/key/carol/cabin-3", "replace", ("schedule",))]
    h.converge()
    assert not h.plan().has_changes


def test_keys_on_locks_the_policy_does_not_adopt_are_left_alone(h):
    h.write(POLICY)
    h.sim.add_key(SEED_LOCKS["Sauna"], "+4791234567", via="api")
    plan = h.plan()
    assert not [c for c in plan.changes if "sauna" in c.address.lower() or "+4791234567" in c.address]


def test_missing_lock_holder_id_is_one_clear_error(h):
    h.write(POLICY)
    (h.policy_dir / "systems.yaml").write_text(
        (h.policy_dir / "systems.yaml").read_text().replace(f"    lock_holder_id: {LOCK_HOLDER_ID}\n", ""))
    with pytest.raises(PolicyError, match=r"systems.yaml:\d+:\d+: system 'cabins' \(unloc\) needs `lock_holder_id:`"):
        h.plan()
    assert h.sim.requests == []


def test_wrong_client_secret_is_one_line_without_the_secret(h):
    h.write(POLICY)
    h.env["UNLOC_CLIENT_SECRET"] = "wrong-secret-value"
    with pytest.raises(VendorError) as caught:
        h.plan()
    text = str(caught.value)
    assert "401 invalid_client" in text and "token request failed" in text and "\n" not in text
    assert "wrong-secret-value" not in text


def test_no_secret_reaches_the_request_log_or_the_state(h):
    h.write(POLICY)
    h.converge()
    logged = json.dumps([(r.headers, r.body) for r in h.sim.requests])
    assert CLIENT_SECRET not in logged and "Bearer ey" not in logged
    state = (h.tmp_path / "state" / "state.json").read_text() if (h.tmp_path / "state" / "state.json").exists() else ""
    assert CLIENT_SECRET not in state and "eyJ" not in state


def test_field_mapping_round_trips_schedules_and_reads_bare_phone_numbers():
    from reconciler.providers.unloc import phone_of, schedule_of, time_spans

    schedule = [{"day": "mon", "from": "08:00", "to": "12:30"}, {"day": "sun", "from": "00:00", "to": "24:00"}]
    spans = time_spans(schedule)
    assert spans[1] == {"weekday": "sun", "startHour": 0, "startMinute": 0, "endHour": 24, "endMinute": 0}
    assert schedule_of({"timeSpans": list(reversed(spans))}) == schedule     # Monday first, like the policy
    assert phone_of({"toUser": {"id": 61452912456}}) == "+61452912456"       # as in the vendor's own example
    assert phone_of({"toUser": {"id": "+4790000001"}}) == "+4790000001"


# --------------------------------------------------------------------------------------------- simulator

@pytest.fixture
def sim() -> UnlocSimulator:
    return UnlocSimulator(clock=lambda: NOW)


def create(c: httpx.Client, lock: str = CABIN7, **body: Any) -> httpx.Response:
    return c.post(f"{LH}/locks/{lock}/keys/", json={"userId": ALICE, "start": None, "end": None, **body})


def test_token_refusals(sim):
    with httpx.Client(transport=httpx.MockTransport(sim.handle), base_url=BASE) as c:
        assert "authentication failed" in refusal(
            c.post("/auth/v1/token/", json=token_body(client_secret="nope")), 401, "invalid_client")
        refusal(c.post("/auth/v1/token/", json=token_body(client_id="someone-else")), 401, "invalid_client")
        foreign = ["lockHolder.admin:11111111-2222-3333-4444-555555555555"]
        refusal(c.post("/auth/v1/token/", json=token_body(scope=foreign)), 403, "invalid_scope")
        refusal(c.post("/auth/v1/token/", json=token_body(scope=["admin"])), 400, "invalid_scope")
        refusal(c.post("/auth/v1/token/", json=token_body(scope=f"lockHolder.admin:{LOCK_HOLDER_ID}")),
                400, "invalid_request")
        refusal(c.post("/auth/v1/token/", json=token_body(grant_type="password")), 400, "unsupported_grant_type")
        answer = c.post("/auth/v1/token/", json=token_body())
        assert answer.status_code == 200
        assert answer.json()["token_type"] == "bearer" and answer.json()["expires_in"] == 3600


def test_token_takes_the_documented_json_body_at_its_exact_path_and_refuses_a_form(sim):
    # Unloc's documentation shows a JSON body with `scope` an array; a form body is answered 415.
    body = {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
            "scope": [f"lockHolder.admin:{LOCK_HOLDER_ID}"]}
    with httpx.Client(transport=httpx.MockTransport(sim.handle), base_url=BASE) as c:
        answer = c.post("/auth/v1/token/", json=body)
        assert answer.status_code == 200, answer.text
        token = answer.json()["access_token"]
        assert c.get(f"{LH}/locks", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        refusal(c.post("/auth/v1/token/", json={**body, "client_secret": "nope"}), 401, "invalid_client")
        refusal(c.post("/auth/v1/token/", json={**body, "scope": ["admin"]}), 400, "invalid_scope")
        refusal(c.post("/auth/v1/token/", data={**body, "scope": body["scope"][0]}), 415)
        refusal(c.post("/auth/v1/token/", content=b"<token/>", headers={"Content-Type": "text/xml"}), 415)
        refusal(c.post("/auth/v1/token", json=body), 404, "NotFound")     # the path ends with a slash [doc]
        refusal(c.get(f"{LH}/locks/", headers={"Authorization": f"Bearer {token}"}), 404, "NotFound")
        refusal(c.get(f"{LH}/locks/{CABIN7}/keys", headers={"Authorization": f"Bearer {token}"}), 404)


def test_bad_missing_and_expired_tokens_are_401(sim):
    with httpx.Client(transport=httpx.MockTransport(sim.handle), base_url=BASE) as c:
        refusal(c.get(f"{LH}/locks"), 401, "UnauthorizedError")
        refusal(c.get(f"{LH}/locks", headers={"Authorization": "Bearer not-a-token"}), 401, "JsonWebTokenError")
        token = get_token(c)
        assert c.get(f"{LH}/locks", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        sim.advance(timedelta(seconds=3600))
        assert refusal(c.get(f"{LH}/locks", headers={"Authorization": f"Bearer {token}"}),
                       401, "JsonWebTokenError") == "JWT expired"
        other = UnlocSimulator(clock=lambda: NOW)
        with httpx.Client(transport=httpx.MockTransport(other.handle), base_url=BASE) as foreign:
            stranger = get_token(foreign)
        refusal(c.get(f"{LH}/locks", headers={"Authorization": f"Bearer {stranger}"}), 401, "JsonWebTokenError")


def test_the_lock_holder_in_the_path_must_be_the_tokens(sim):
    with client(sim) as c:
        other = "/integrators/v1/lock-holders/11111111-2222-3333-4444-555555555555"
        refusal(c.get(f"{other}/locks"), 403, "Forbidden")
        refusal(c.post(f"{other}/locks/{CABIN7}/keys/", json={"userId": ALICE, "start": None, "end": None}), 403)


@pytest.mark.parametrize("phone", ["4790000001", "+47 90000001", "+0479000000", "+47900000011234567", 4790000001, None])
def test_userid_must_be_e164(sim, phone):
    with client(sim) as c:
        assert "E.164" in refusal(create(c, userId=phone), 400, "ValidationError")
    assert not [k for k in sim.keys() if k["id"] != SEED_KEY_ID]


@pytest.mark.parametrize("body, words", [
    ({"start": "2026-01-01"}, "ISO-8601"),
    ({"start": "2026-01-01T00:00:00"}, "ISO-8601"),
    ({"start": "2026-02-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"}, "end must be after start"),
    ({"end": "2026-11-22T09:00:00Z"}, "end must be after start"),      # start null = now, which is later
    ({"colour": "red"}, "Unknown field"),
    ({"skipInviteNotification": "yes"}, "skipInviteNotification"),
])
def test_key_windows_are_validated(sim, body, words):
    with client(sim) as c:
        assert words in refusal(create(c, **body), 400, "ValidationError")


def test_start_and_end_must_be_sent_even_when_null(sim):
    with client(sim) as c:
        response = c.post(f"{LH}/locks/{CABIN7}/keys/", json={"userId": ALICE})
        assert "Missing field(s): end, start" in refusal(response, 400)


def span(**overrides: Any) -> dict[str, Any]:
    return {"weekday": "mon", "startHour": 8, "startMinute": 0, "endHour": 18, "endMinute": 0, **overrides}


@pytest.mark.parametrize("recurrence, words", [
    ({"timeSpans": [span(weekday="monday")]}, "weekday must be one of sun, mon"),
    ({"timeSpans": [span(startHour=25)]}, "startHour must be an integer between 0 and 24"),
    ({"timeSpans": [span(endMinute=60)]}, "endMinute must be an integer between 0 and 59"),
    ({"timeSpans": [span(endHour=24, endMinute=30)]}, "latest time of day is 24:00"),
    ({"timeSpans": [span(startHour=22, endHour=6)]}, "cannot cross midnight"),
    ({"timeSpans": [span(startHour=9, endHour=9)]}, "end after it starts"),
    ({"timeSpans": [span(), span(startHour=19, endHour=20)]}, "at most one span per weekday"),
    ({"timeSpans": [span(startHour="8")]}, "must be an integer"),
    ({"timeSpans": [span(startHour=True)]}, "must be an integer"),
    ({"timeSpans": [{"weekday": "mon", "startHour": 8}]}, "exactly weekday"),
    ({"timeSpans": []}, "1 to 7"),
    ({"spans": []}, "timeSpans"),
])
def test_recurrences_are_validated(sim, recurrence, words):
    with client(sim) as c:
        assert words in refusal(create(c, recurrence=recurrence), 400, "ValidationError")


def test_a_valid_recurrence_is_kept_and_24_00_is_the_end_of_the_day(sim):
    spans = [span(weekday="sat", startHour=14, startMinute=45, endHour=16, endMinute=30),
             span(weekday="sun", startHour=0, endHour=24)]
    with client(sim) as c:
        key = create(c, recurrence={"timeSpans": spans}).json()["key"]
    assert key["recurrence"] == {"timeSpans": spans}


def test_keys_are_made_asynchronously_by_the_simulator_clock(sim):
    with client(sim) as c:
        now_key = create(c).json()["key"]
        later_key = create(c, userId=BOB, start="2026-12-01T00:00:00Z", end="2026-12-02T00:00:00Z").json()["key"]
    assert now_key["state"] == later_key["state"] == "creating"
    assert now_key["start"] == now_key["created"] == "2026-11-22T10:00:00.000Z" and now_key["end"] is None

    def states() -> tuple[str, str]:
        # Read through the API, with a fresh token each time: the clock moves on by days here.
        keys = {k["id"]: k["state"] for k in lock_keys(sim, CABIN7)}
        return keys[now_key["id"]], keys[later_key["id"]]

    sim.advance(timedelta(seconds=1))
    assert states() == ("creating", "creating")
    sim.advance(timedelta(seconds=1))
    assert states() == ("active", "scheduled")
    sim.advance(timedelta(days=8, hours=14))
    assert states() == ("active", "active")
    sim.advance(timedelta(days=1))
    assert states() == ("active", "expired")


def test_settle_and_fail_key_hooks(sim):
    with client(sim) as c:
        first = create(c).json()["key"]["id"]
        second = create(c, userId=BOB).json()["key"]["id"]
        sim.fail_key(second, "Lock offline")
        sim.settle()
        keys = {k["id"]: k for k in c.get(f"{LH}/locks/{CABIN7}/keys/").json()["keys"]}
    assert keys[first]["state"] == "active"
    assert (keys[second]["state"], keys[second]["errorDescription"]) == ("error", "Lock offline")


def test_revoke_is_the_only_change_and_repeats_harmlessly(sim):
    with client(sim) as c:
        key = create(c).json()["key"]["id"]
        path = f"{LH}/locks/{CABIN7}/keys/{key}"
        refusal(c.patch(path, json={"state": "active"}), 400, "ValidationError")
        refusal(c.patch(path, json={"state": "revoked", "end": None}), 400)
        refusal(c.patch(f"{LH}/locks/{CABIN3}/keys/{key}", json={"state": "revoked"}), 404, "NotFound")
        refusal(c.patch(f"{LH}/locks/{CABIN7}/keys/{SEED_LOCKS['Sauna']}", json={"state": "revoked"}), 404)
        for _ in range(2):
            answer = c.patch(path, json={"state": "revoked"})
            assert answer.status_code == 200 and answer.json()["key"]["state"] == "revoked"
        assert {k["id"]: k["state"] for k in c.get(f"{LH}/locks/{CABIN7}/keys/").json()["keys"]}[key] == "revoked"


def test_roles_on_a_lock(sim):
    with client(sim) as c:
        answer = c.put(f"{LH}/locks/{CABIN7}/roles/{ALICE}/", json={"userName": "Alice", "canShare": True})
        assert answer.status_code == 200 and answer.json()["role"]["canShare"] is True
        refusal(c.put(f"{LH}/locks/{CABIN7}/roles/4790000001/", json={"canShare": True}), 400, "ValidationError")
        refusal(c.put(f"{LH}/locks/{CABIN7}/roles/{ALICE}/", json={"canShare": "yes"}), 400, "ValidationError")


def test_unknown_lock_path_and_method(sim):
    with client(sim) as c:
        refusal(c.get(f"{LH}/locks/{SEED_LOCKS['Sauna'][:-1]}0/keys/"), 404, "NotFound")
        refusal(create(c, lock="00000000-0000-0000-0000-000000000000"), 404, "NotFound")
        refusal(c.get(f"{LH}/nothing-here"), 404, "NotFound")
        refusal(c.delete(f"{LH}/locks/{CABIN7}/keys/{SEED_KEY_ID}"), 405, "MethodNotAllowed")
        refusal(c.post(f"{LH}/locks/{CABIN7}/keys/", content=b"userId=+4790000001",
                       headers={"Content-Type": "application/x-www-form-urlencoded"}), 415)


def test_paging_of_the_lock_holders_keys(sim):
    for n in range(7):
        sim.add_key(SEED_LOCKS["Sauna"], f"+47911{n:05d}", via="api")
    sim.add_key(SEED_LOCKS["Sauna"], "+4792222222", via="app")     # made in the app: not in the API list
    with client(sim) as c:
        for limit in ("0", "501", "ten", "-1"):
            assert "between 1 and 500" in refusal(c.get(f"{LH}/keys", params={"limit": limit}), 400, "ValidationError")
        refusal(c.get(f"{LH}/keys", params={"startAfterId": "not-an-id"}), 400)
        seen, params = [], {"limit": "3"}
        while True:
            body = c.get(f"{LH}/keys", params=params).json()
            seen += [k["id"] for k in body["keys"]]
            if "startAfterId" not in body:
                break
            assert len(body["keys"]) == 3
            params = {"limit": "3", "startAfterId": body["startAfterId"]}
        assert len(seen) == len(set(seen)) == 8       # seven plus the seeded one; never the app's
        assert seen == sorted(seen)
        everything = c.get(f"{LH}/keys", params={"limit": "500"}).json()
        assert "startAfterId" not in everything and len(everything["keys"]) == 8
        on_sauna = c.get(f"{LH}/locks/{SEED_LOCKS['Sauna']}/keys/").json()["keys"]
        assert len(on_sauna) == 8 and "+4792222222" in {k["toUser"]["id"] for k in on_sauna}


def test_rate_limit_answers_429_with_retry_after():
    sim = UnlocSimulator(clock=lambda: NOW, rate_limit=2, monotonic=lambda: 5.0)
    with httpx.Client(transport=httpx.MockTransport(sim.handle), base_url=BASE) as c:
        statuses = [c.post("/auth/v1/token/", json=token_body()) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert statuses[2].headers["Retry-After"] == "1"
    refusal(statuses[2], 429, "TooManyRequests")


def test_the_request_log_redacts_the_client_secret_and_tokens(sim):
    with client(sim) as c:
        c.get(f"{LH}/locks")
    token_request = next(r for r in sim.requests if r.path.startswith("/auth"))
    assert token_request.body["client_secret"] == "REDACTED"
    assert all(r.headers.get("authorization", "REDACTED") == "REDACTED" for r in sim.requests)


def test_the_store_persists_and_is_seeded_once(tmp_path):
    store = tmp_path / "unloc.json"
    first = UnlocSimulator(store, clock=lambda: NOW)
    with client(first) as c:
        key = create(c).json()["key"]["id"]
    second = UnlocSimulator(store, clock=lambda: NOW)
    assert {k["id"] for k in second.keys()} == {SEED_KEY_ID, key}
    with client(second) as c:
        assert [lock["id"] for lock in c.get(f"{LH}/locks").json()["locks"]] == list(SEED_LOCKS.values())


# ---------------------------------------------------------------------------------------- CLI, served

def test_cli_end_to_end_against_the_served_sandbox(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with serve_sandboxes(tmp_path) as (root, printed):
        credentials = {k: v for k, v in printed.items() if k in ("UNLOC_CLIENT_ID", "UNLOC_CLIENT_SECRET")}
        policy = tmp_path / "policies"
        policy.mkdir()
        (policy / "systems.yaml").write_text(
            f"systems:\n  cabins:\n    vendor: unloc\n    url: {root}/unloc\n"
            f"    lock_holder_id: {LOCK_HOLDER_ID}\n    credentials:\n"
            "      client_id: \"${UNLOC_CLIENT_ID}\"\n      client_secret: \"${UNLOC_CLIENT_SECRET}\"\n")
        (policy / "access.yaml").write_text(POLICY)
        run_env = {**env, **credentials, "RECONCILER_STATE": str(tmp_path / "state.json")}

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            # The served sandbox's clock starts at NOW; the CLI plans as of the same moment.
            return subprocess.run([*reconciler_command(), *args, "--now", NOW.strftime("%Y-%m-%dT%H:%M:%SZ")],
                                  capture_output=True, text=True, env=run_env, cwd=tmp_path, timeout=120)

        first = cli("plan", "--detailed-exitcode")
        assert first.returncode == 2, first.stdout + first.stderr
        assert "+ cabins/key/alice/cabin-7  [grant]" in first.stdout
        applied = cli("apply", "--auto-approve")
        assert applied.returncode == 0, applied.stdout + applied.stderr
        final = cli("plan", "--detailed-exitcode")
        assert final.returncode == 0, final.stdout + final.stderr
        assert "key being created by Unloc" in final.stdout or "No changes." in final.stdout
        for output in (first, applied, final):
            assert CLIENT_SECRET not in output.stdout + output.stderr
        assert CLIENT_SECRET not in (tmp_path / "state.json").read_text()
        wrong = subprocess.run([*reconciler_command(), "plan"], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                               env={**run_env, "UNLOC_CLIENT_SECRET": "wrong-secret-value"})
        assert wrong.returncode == 1 and "invalid_client" in wrong.stderr and "Traceback" not in wrong.stderr
        assert "wrong-secret-value" not in wrong.stderr
