"""The Unloc Partner provider against its simulator, through the httpx transport seam, and the simulator's
refusals; one CLI run against `reconciler sandbox serve`.

Each provider test plans and applies the way the CLI does and then looks at the vendor with raw requests
or the simulator's own hooks, so a pass means the vendor really holds what the policy says, once.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
from datetime import timedelta

import httpx
import pytest
from conftest import NOW, reconciler_command, serve_sandboxes
from harness import UNLOC_PARTNER, VendorHarness

from reconciler import run
from reconciler.errors import PlanError, VendorError
from reconciler.sandbox.unloc_partner import DENIED_LOCK, PARTNER_ID, SEED_LOCKS, UnlocPartnerSimulator
from reconciler.state import LocalState

BASE = "https://api.unloc.test"
APARTMENT = SEED_LOCKS["Hjemme"]         # opt-out
FRONT = SEED_LOCKS["Hovedinngang"]       # opt-out
CABIN = SEED_LOCKS["Hytte"]              # opt-in
ALICE, BOB = "+4790000001", "+4790000002"
KEYS = f"/v1/partners/{PARTNER_ID}/keys"

POLICY = f"""\
users:
  alice: {{name: Alice Hansen, phone: "{ALICE}"}}
  bob: {{name: Bob Nilsen, phone: "{BOB}"}}
devices:
  apartment: {{system: rentals, id: "{APARTMENT}"}}
  front: {{system: rentals, id: "{FRONT}"}}
permissions:
  - users: [alice]
    devices: [apartment]
  - users: [bob]
    devices: [apartment, front]
    start: 2026-11-20T15:00:00Z
    end: 2026-11-27T11:00:00Z
"""

CABIN_POLICY = f"""\
users:
  alice: {{phone: "{ALICE}"}}
devices:
  cabin: {{system: rentals, id: "{CABIN}"}}
permissions:
  - users: [alice]
    devices: [cabin]
    start: 2026-12-01T15:00:00Z
    end: 2026-12-08T11:00:00Z
"""


def state_records(h: VendorHarness) -> dict[str, dict]:
    return dict(LocalState(h.state_path).items("rentals/key/"))


def key_id_of(h: VendorHarness, name: str) -> str:
    return state_records(h)[f"rentals/key/{name}"]["id"]


def partner_client(h: VendorHarness, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key or h.sim.credentials['api_key']}"}
    return httpx.Client(transport=httpx.MockTransport(h.sim.handle), base_url=BASE, headers=headers)


def vendor_key(h: VendorHarness, key_id: str) -> dict:
    with partner_client(h) as c:
        response = c.get(f"{KEYS}/{key_id}")
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture
def h(tmp_path) -> VendorHarness:
    return VendorHarness(tmp_path, UNLOC_PARTNER)


def posts(h) -> int:
    return h.sim.count("POST", KEYS)


# -- convergence ---------------------------------------------------------------------------------------------

def test_opt_out_lock_converges(h):
    h.write(POLICY)
    first = h.plan()
    assert [(c.address, c.action) for c in first.changes] == [
        ("rentals/key/alice/apartment", "create"), ("rentals/key/bob/apartment", "create"),
        ("rentals/key/bob/front", "create")]
    _, report = h.apply()
    assert report.ok, report.lines()
    again = h.plan()
    assert not again.has_changes and not again.pending, [c.address for c in again.changes]
    assert posts(h) == 3
    bodies = {r.body["lockId"] + " " + r.body["msn"]: r.body for r in h.sim.requests if r.method == "POST"}
    # Exactly the documented fields; no end for the open-ended grant, the window for bob's.
    assert bodies[f"{APARTMENT} {ALICE}"] == {"lockId": APARTMENT, "msn": ALICE, "start": "2026-11-22T10:00:00Z"}
    assert bodies[f"{FRONT} {BOB}"] == {"lockId": FRONT, "msn": BOB, "start": "2026-11-20T15:00:00Z",
                                        "end": "2026-11-27T11:00:00Z"}
    records = state_records(h)
    assert set(records) == {"rentals/key/alice/apartment", "rentals/key/bob/apartment", "rentals/key/bob/front"}
    assert records["rentals/key/bob/front"]["phone"] == BOB and records["rentals/key/bob/front"]["lock"] == FRONT
    for record in records.values():
        assert vendor_key(h, record["id"])["state"] == "active"
    assert h.sim.credentials["api_key"] not in h.state_path.read_text()


def test_opt_in_key_stays_pending_until_the_owner_approves(h):
    h.write(CABIN_POLICY)
    first = h.plan()
    assert [c.action for c in first.changes] == ["create"]
    assert any("opt-in" in w.message for w in first.warnings)
    h.converge()
    key_id = key_id_of(h, "alice/cabin")
    assert vendor_key(h, key_id)["state"] == "pending-approval"
    for _ in range(2):
        plan = h.plan()
        assert not plan.has_changes, [c.address for c in plan.changes]
        assert [(n.address, n.message) for n in plan.pending] == [
            ("rentals/key/alice/cabin", "waiting for the lock owner's approval (opt-in lock)")]
        assert dict(plan.pending[0].details)["state"] == "pending-approval"
        _, report = h.apply()
        assert report is None           # nothing to do: the pending key is not created again
    assert posts(h) == 1
    h.sim.approve(key_id)
    after = h.plan()
    assert not after.has_changes and not after.pending
    assert vendor_key(h, key_id)["state"] == "scheduled"     # approved; its window starts 2026-12-01


def test_a_denied_key_is_requested_again_with_a_warning(h):
    h.write(CABIN_POLICY)
    h.converge()
    first = key_id_of(h, "alice/cabin")
    h.sim.deny(first)
    plan = h.plan()
    assert [(c.address, c.action) for c in plan.changes] == [("rentals/key/alice/cabin", "create")]
    assert any("denied" in w.message for w in plan.warnings)
    h.converge()
    assert key_id_of(h, "alice/cabin") != first
    assert len(h.sim.key_ids(CABIN, msn=ALICE)) == 2


def test_changing_a_window_replaces_exactly_that_key(h):
    h.write(POLICY)
    h.converge()
    before = {name: key_id_of(h, name) for name in ("alice/apartment", "bob/apartment", "bob/front")}
    changed = POLICY.replace("devices: [apartment, front]", "devices: [front]") + (
        "  - users: [bob]\n    devices: [apartment]\n    start: 2026-11-20T15:00:00Z\n    end: 2026-11-29T11:00:00Z\n")
    h.write(changed)
    plan = h.plan()
    assert [(c.address, c.action, c.changed) for c in plan.changes] == [
        ("rentals/key/bob/apartment", "replace", ("end",))]
    h.sim.reset_log()
    _, report = h.apply()
    assert report.ok, report.lines()
    assert [(r.method, r.path) for r in h.sim.requests if r.method != "GET"] == [
        ("DELETE", f"{KEYS}/{before['bob/apartment']}"), ("POST", KEYS)]
    assert vendor_key(h, before["bob/apartment"])["state"] == "revoked"
    after = {name: key_id_of(h, name) for name in before}
    assert after["alice/apartment"] == before["alice/apartment"] and after["bob/front"] == before["bob/front"]
    assert after["bob/apartment"] != before["bob/apartment"]
    assert vendor_key(h, after["bob/apartment"])["end"].startswith("2026-11-29T11:00:00")
    assert not h.plan().has_changes


def test_a_new_phone_number_moves_the_key(h):
    h.write(POLICY)
    h.converge()
    old = key_id_of(h, "alice/apartment")
    h.write(POLICY.replace(ALICE, "+4790000011"))
    plan = h.plan()
    assert sorted((c.address, c.action) for c in plan.changes) == [
        ("rentals/key/alice/apartment", "create"), (f"rentals/key/alice/apartment#{old}", "delete")]
    h.converge()
    assert vendor_key(h, old)["state"] == "revoked"
    assert state_records(h)["rentals/key/alice/apartment"]["phone"] == "+4790000011"
    assert not h.plan().has_changes


def test_undeclared_key_is_revoked_and_forgotten(h):
    h.write(POLICY)
    h.converge()
    gone = key_id_of(h, "bob/front")
    h.write(POLICY.replace("devices: [apartment, front]", "devices: [apartment]"))
    plan = h.plan()
    assert [(c.address, c.action, str(c.effect)) for c in plan.changes] == [
        ("rentals/key/bob/front", "delete", "revoke")]
    h.converge()
    assert vendor_key(h, gone)["state"] == "revoked"
    assert "rentals/key/bob/front" not in state_records(h)
    assert not h.plan().has_changes


# -- reads -------------------------------------------------------------------------------------------------

def test_plan_reads_each_remembered_key_once_and_nothing_else_per_resource(h):
    h.write(POLICY.replace("devices:\n", f"devices:\n  cabin: {{system: rentals, id: \"{CABIN}\"}}\n")
            + "  - users: [alice, bob]\n    devices: [cabin]\n")
    h.converge()
    records = state_records(h)
    assert len(records) == 5
    h.sim.reset_log()
    plan = h.plan()
    assert not plan.has_changes and len(plan.pending) == 2
    gets = [r.path for r in h.sim.requests if r.method == "GET"]
    assert len(h.sim.requests) == len(gets)
    assert collections.Counter(gets) == collections.Counter(
        [f"/v1/partners/{PARTNER_ID}/locks"] + [f"{KEYS}/{r['id']}" for r in records.values()])


# -- lost answers -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", [
    {"commit": True, "lost": "timeout"},     # created, answer lost on the way back
    {"commit": True, "lost": "502"},         # created, a proxy answered 502
    {"status": 504},                         # never reached the vendor
], ids=["landed-timeout", "landed-502", "not-landed"])
def test_a_lost_answer_on_create_leaves_exactly_one_key(h, fault):
    h.write(POLICY)
    h.sim.faults.add("POST", r"/keys$", **fault)
    _, report = h.apply()
    assert report.ok, report.lines()
    for lock, phone in ((APARTMENT, ALICE), (APARTMENT, BOB), (FRONT, BOB)):
        assert len(h.sim.key_ids(lock, msn=phone)) == 1
    assert h.sim.faults.fired
    assert {r["id"] for r in state_records(h).values()} == set(h.sim.key_ids(APARTMENT)[1:] + h.sim.key_ids(FRONT))
    assert not h.plan().has_changes


def test_a_replace_whose_create_loses_its_answer_adopts_the_new_key_not_the_revoked_one(h):
    h.write(POLICY)
    h.converge()
    old = {lock: key_id_of(h, f"bob/{name}") for lock, name in ((APARTMENT, "apartment"), (FRONT, "front"))}
    h.write(POLICY.replace("end: 2026-11-27T11:00:00Z", "end: 2026-11-28T11:00:00Z"))
    # Both of bob's keys are replaced; the first create's answer is lost, a moment after the old key of
    # that lock was created and revoked: only the new key may be adopted.
    h.sim.faults.add("POST", r"/keys$", commit=True)
    _, report = h.apply()
    assert report.ok, report.lines()
    for lock, name in ((APARTMENT, "apartment"), (FRONT, "front")):
        new = key_id_of(h, f"bob/{name}")
        assert h.sim.key_ids(lock, msn=BOB) == [old[lock], new]
        assert vendor_key(h, old[lock])["state"] == "revoked" and vendor_key(h, new)["end"].startswith("2026-11-28T11:00:00")
    assert h.sim.faults.fired
    assert not h.plan().has_changes


def test_an_intent_left_by_a_broken_run_is_settled_by_the_next_read(h):
    h.write(CABIN_POLICY.replace("[cabin]", "[apartment]").replace(f'"{CABIN}"', f'"{APARTMENT}"')
            .replace("cabin:", "apartment:"))
    # The create lands but its answer is lost, and the event log cannot be read to check: apply fails.
    h.sim.faults.add("POST", r"/keys$", commit=True)
    h.sim.faults.add("GET", r"/events$", times=6)
    _, report = h.apply()
    assert not report.ok
    assert state_records(h)["rentals/key/alice/apartment"]["intent"] == "create"
    assert len(h.sim.key_ids(APARTMENT, msn=ALICE)) == 1
    plan = h.plan()                          # the next read finds the key in the lock's events
    assert not plan.has_changes, [c.address for c in plan.changes]
    h.apply()                                # nothing to change; the read's finding is committed
    assert key_id_of(h, "alice/apartment") == h.sim.key_ids(APARTMENT, msn=ALICE)[0]
    assert posts(h) == 1


def test_an_intent_that_never_landed_is_created_again(h):
    h.write(POLICY)
    h.sim.faults.add("POST", r"/keys$", status=502)
    h.sim.faults.add("GET", r"/events$", times=6)
    _, report = h.apply()
    assert len(report.uncertain) == 1       # 502, and the lookup failed too: it may have happened
    plan = h.plan()
    assert [c.action for c in plan.changes] == ["create"]
    h.converge()
    assert len(h.sim.key_ids(APARTMENT)) == 1 + 2 and len(h.sim.key_ids(FRONT)) == 1   # + the seeded key
    assert not h.plan().has_changes


# -- drift -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["owner", "api"])
def test_a_key_revoked_outside_the_tool_is_created_again(h, how):
    h.write(POLICY)
    h.converge()
    old = key_id_of(h, "bob/front")
    if how == "owner":
        h.sim.revoke_by_owner(old)
    else:
        with partner_client(h) as c:
            assert c.delete(f"{KEYS}/{old}").json() == {"response": "OK"}
    plan = h.plan()
    assert [(c.address, c.action) for c in plan.changes] == [("rentals/key/bob/front", "create")]
    h.converge()
    new = key_id_of(h, "bob/front")
    assert new != old and vendor_key(h, new)["state"] == "active"
    assert not h.plan().has_changes


def test_a_revoked_key_no_longer_declared_is_simply_forgotten(h):
    h.write(POLICY)
    h.converge()
    h.sim.revoke_by_owner(key_id_of(h, "bob/front"))
    h.write(POLICY.replace("devices: [apartment, front]", "devices: [apartment]"))
    plan = h.plan()
    assert not plan.has_changes, [c.address for c in plan.changes]
    assert "rentals/key/bob/front" in state_records(h)          # a plan changes nothing, state included
    _, report = h.apply()
    assert report is None and "rentals/key/bob/front" not in state_records(h)
    assert h.sim.count("DELETE") == 0


def test_a_grant_on_a_lock_the_owner_keeps_from_the_partner_is_a_plan_error(h):
    h.write(POLICY.replace(f'"{FRONT}"', f'"{DENIED_LOCK}"'))
    with pytest.raises(PlanError) as caught:
        h.plan()
    assert "rentals/key/bob/front" in str(caught.value) and DENIED_LOCK in str(caught.value)
    assert posts(h) == 0


def test_a_wrong_api_key_is_one_line_without_the_key(h):
    h.write(POLICY)
    h.env = {"UNLOC_PARTNER_KEY": "not-the-partner-key"}
    with pytest.raises(VendorError) as caught:
        h.plan()
    message = str(caught.value)
    assert "401" in message and "Invalid API key" in message and "\n" not in message
    assert "not-the-partner-key" not in message


def test_rate_limits_are_waited_out(tmp_path):
    ticks = [0.0]
    h = VendorHarness(tmp_path, UNLOC_PARTNER, rate_limit=2, monotonic=lambda: ticks[0])
    h.sleep = lambda seconds: (h.sleeps.append(seconds), ticks.__setitem__(0, ticks[0] + seconds))
    h.write(POLICY)
    h.converge()
    assert h.sim.count(status=429) > 0 and 1.0 in h.sleeps
    assert not h.plan().has_changes
    assert len(h.sim.key_ids(FRONT)) == 1


# -- events ----------------------------------------------------------------------------------------------

def test_events_show_action_person_and_time(h):
    h.write(POLICY)
    h.converge()
    h.now = NOW + timedelta(hours=2)
    h.sim.use_key(key_id_of(h, "alice/apartment"))
    events = run.events(h.session(), "rentals", "apartment")
    ours = sorted((e.time, e.action, e.person) for e in events if e.time >= "2026")   # creates run concurrently
    assert ours == [("2026-11-22T10:00:00Z", "created", "alice"), ("2026-11-22T10:00:00Z", "created", "bob"),
                    ("2026-11-22T12:00:00Z", "unlocked", "alice")]
    # A key issued before reconciler (not in any policy) is named as the vendor names its holder.
    assert [(e.action, e.person) for e in events[:2]] == [("created", "Kari Nordmann"), ("unlocked", "Kari Nordmann")]
    assert events[-1].detail == f"key {key_id_of(h, 'alice/apartment')}"


# -- the simulator's refusals --------------------------------------------------------------------------------

@pytest.fixture
def sim() -> UnlocPartnerSimulator:
    return UnlocPartnerSimulator(clock=lambda: NOW)


def raw(sim: UnlocPartnerSimulator, key: str | None = "valid") -> httpx.Client:
    token = sim.credentials["api_key"] if key == "valid" else key
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.Client(transport=httpx.MockTransport(sim.handle), base_url=BASE, headers=headers)


def assert_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "errorDescription"}
    return body["errorDescription"]


def test_sandbox_auth_and_partner(sim):
    with raw(sim, None) as c:
        assert "Missing" in assert_error(c.get(f"/v1/partners/{PARTNER_ID}/locks"), 401)
    with raw(sim, "wrong-key") as c:
        assert "Invalid" in assert_error(c.get(f"/v1/partners/{PARTNER_ID}/locks"), 401)
    with raw(sim) as c:
        assert_error(c.get("/v1/partners/otherpartner/locks"), 403)
        assert_error(c.get(f"/v1/partners/{PARTNER_ID}/nothing"), 404)
        assert_error(c.put(f"{KEYS}/x", json={}), 405)
        locks = c.get(f"/v1/partners/{PARTNER_ID}/locks").json()["locks"]
    assert {lock["id"] for lock in locks} == set(SEED_LOCKS.values()) - {DENIED_LOCK}
    assert {lock["id"]: lock["auth"] for lock in locks}[CABIN] == "opt-in"
    assert all({"id", "name", "auth", "data"} <= set(lock) for lock in locks)


@pytest.mark.parametrize("body, status, words", [
    ({"lockId": DENIED_LOCK, "msn": ALICE, "start": "2026-12-01T00:00:00Z"}, 403, "not allowed"),
    ({"lockId": "danalock-ff:ff:ff:ff:ff:ff", "msn": ALICE, "start": "2026-12-01T00:00:00Z"}, 404, "not found"),
    ({"lockId": APARTMENT, "msn": "90000001", "start": "2026-12-01T00:00:00Z"}, 400, "E.164"),
    ({"lockId": APARTMENT, "msn": ALICE, "start": "2026-12-01T00:00:00"}, 400, "start"),
    ({"lockId": APARTMENT, "msn": ALICE, "start": "2026-12-01T00:00:00Z", "end": "2026-11-30T00:00:00Z"}, 400,
     "after start"),
    ({"lockId": APARTMENT, "msn": ALICE, "start": "2025-12-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"}, 400,
     "future"),
    ({"lockId": APARTMENT, "msn": ALICE}, 400, "start"),
    ({"lockId": APARTMENT, "msn": ALICE, "start": "2026-12-01T00:00:00Z", "recurrence": {}}, 400, "recurrence"),
], ids=["denied-lock", "unknown-lock", "msn", "naive-start", "end-before-start", "end-passed", "no-start",
        "unknown-field"])
def test_sandbox_refuses_bad_keys(sim, body, status, words):
    with raw(sim) as c:
        assert words in assert_error(c.post(KEYS, json=body), status)
    assert sim.key_ids(msn=ALICE) == []


def test_sandbox_key_lifecycle(sim):
    with raw(sim) as c:
        assert_error(c.post(KEYS, content=b"{}", headers={"Content-Type": "text/plain"}), 415)
        created = c.post(KEYS, json={"lockId": APARTMENT, "msn": ALICE, "start": "2026-11-01T00:00:00+01:00"})
        assert created.status_code == 202 and set(created.json()) == {"id"}
        key_id = created.json()["id"]
        key = c.get(f"{KEYS}/{key_id}").json()
        assert {k: key[k] for k in ("id", "lockId", "state", "start", "end")} == {
            "id": key_id, "lockId": APARTMENT, "state": "active", "start": "2026-10-31T23:00:00.000Z", "end": None}
        later = c.post(KEYS, json={"lockId": CABIN, "msn": BOB, "start": "2026-12-01T00:00:00Z"}).json()["id"]
        assert c.get(f"{KEYS}/{later}").json()["state"] == "pending-approval"
        sim.approve(later)
        assert c.get(f"{KEYS}/{later}").json()["state"] == "scheduled"
        assert c.delete(f"{KEYS}/{key_id}").json() == {"response": "OK"}
        assert c.delete(f"{KEYS}/{key_id}").json() == {"response": "OK"}      # still there, still revoked
        revoked = c.get(f"{KEYS}/{key_id}").json()
        assert revoked["state"] == "revoked"
        assert [e["action"] for e in revoked["events"]] == ["created", "revoked"]
        assert_error(c.get(f"{KEYS}/00000000-0000-0000-0000-000000000000"), 404)
        assert_error(c.delete(f"{KEYS}/00000000-0000-0000-0000-000000000000"), 404)
        events = c.get(f"/v1/partners/{PARTNER_ID}/locks/{CABIN}/events").json()["events"]
        assert [(e["action"], e["msn"], e["name"], e["keyId"]) for e in events] == [
            ("created", BOB, "Bob Nilsen", later), ("approved", BOB, "Bob Nilsen", later)]
        assert set(events[0]) == {"id", "keyId", "action", "name", "msn", "created"}
        assert_error(c.get(f"/v1/partners/{PARTNER_ID}/locks/{DENIED_LOCK}/events"), 403)
    with pytest.raises(ValueError):
        sim.use_key(key_id)                  # a revoked key opens nothing


def test_sandbox_rate_limit_says_when_to_come_back():
    sim = UnlocPartnerSimulator(clock=lambda: NOW, rate_limit=1, monotonic=lambda: 5.0)
    with raw(sim) as c:
        assert c.get(f"/v1/partners/{PARTNER_ID}/locks").status_code == 200
        response = c.get(f"/v1/partners/{PARTNER_ID}/locks")
    assert_error(response, 429)
    assert response.headers["Retry-After"] == "1"


def test_sandbox_store_survives_a_restart(tmp_path):
    first = UnlocPartnerSimulator(tmp_path / "s.json", clock=lambda: NOW)
    with raw(first) as c:
        key_id = c.post(KEYS, json={"lockId": CABIN, "msn": ALICE, "start": "2026-12-01T00:00:00Z"}).json()["id"]
    again = UnlocPartnerSimulator(tmp_path / "s.json", clock=lambda: NOW)
    again.approve(key_id)
    assert first.key_state(key_id) == "scheduled"          # reloaded what the other instance wrote


# -- the CLI against a served sandbox ------------------------------------------------------------------------

@pytest.fixture
def served(tmp_path):
    with serve_sandboxes(tmp_path) as (root, printed):
        yield f"{root}/unloc-partner", printed["UNLOC_PARTNER_KEY"]


def test_cli_end_to_end_against_served_sandbox(tmp_path, served):
    url, key = served
    policy = tmp_path / "policies"
    policy.mkdir()
    (policy / "systems.yaml").write_text(
        f"systems:\n  rentals:\n    vendor: unloc-partner\n    url: {url}\n    partner_id: {PARTNER_ID}\n"
        "    credentials: {api_key: \"${UNLOC_PARTNER_KEY}\"}\n")
    # Ends in the future of the served sandbox's real clock, whatever the date; one key on an opt-in lock.
    text = POLICY.replace("end: 2026-11-27T11:00:00Z", "end: 2099-01-01T00:00:00Z").replace(
        "devices:\n", f"devices:\n  cabin: {{system: rentals, id: \"{CABIN}\"}}\n", 1) + \
        "  - users: [alice]\n    devices: [cabin]\n"
    (policy / "access.yaml").write_text(text)
    env = {**os.environ, "UNLOC_PARTNER_KEY": key, "RECONCILER_STATE": str(tmp_path / "state.json")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*reconciler_command(), *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=120)

    first = cli("plan", "--detailed-exitcode", "--now", "2026-11-22T10:00:00Z")
    assert first.returncode == 2, first.stderr
    assert "opt-in" in first.stdout
    applied = cli("apply", "--auto-approve", "--now", "2026-11-22T10:00:00Z")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    final = cli("plan", "--format", "json", "--detailed-exitcode", "--now", "2026-11-22T10:00:00Z")
    assert final.returncode == 0, final.stdout + final.stderr
    pending = json.loads(final.stdout)["pending"]
    assert [(p["address"], p["state"]) for p in pending] == [("rentals/key/alice/cabin", "pending-approval")]
    events = cli("events", "rentals", "apartment", "--directory", "policies")
    assert events.returncode == 0, events.stderr
    assert re.search(r"^\S+Z\s+created\s+alice\s+key ", events.stdout, re.M), events.stdout
    for output in (first, applied, final, events):
        assert key not in output.stdout + output.stderr
    assert key not in (tmp_path / "state.json").read_text()


def test_missing_partner_id_is_refused_at_validation_with_the_place(tmp_path):
    from reconciler.errors import PolicyError
    from reconciler.policy import load_policy
    from reconciler.providers.factory import capabilities

    (tmp_path / "p.yaml").write_text("systems:\n  rentals: {vendor: unloc-partner, url: sandbox}\n")
    with pytest.raises(PolicyError, match=r"p.yaml:2:3: system 'rentals' \(unloc-partner\) needs `partner_id:`"):
        load_policy(tmp_path / "p.yaml", capabilities(), {})
