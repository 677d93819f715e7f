"""The Sentry Interactive (Doordeck) provider against its simulator, the simulator's signature checks,
and one CLI run against `reconciler sandbox serve`.

Provider tests plan and apply the way the CLI does and then look at the vendor through the simulator's
own hooks or raw requests; every request body sent is captured on the way, so that the signed operations
themselves are checked: what they do, that they verify with the key the sandbox registered, and that no
`jti` repeats. Security tests drive the simulator directly with hand-made tokens.
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import os
import re
import subprocess
import textwrap
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import jwt
import pytest
from conftest import reconciler_command, serve_sandboxes
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from harness import SENTRY, VendorHarness

from reconciler import run
from reconciler.errors import PlanError, PolicyError
from reconciler.policy import load_policy
from reconciler.providers.factory import capabilities
from reconciler.render import render_json, render_markdown, render_text
from reconciler.sandbox.common import read_store
from reconciler.sandbox.sentry import (
    MEDIA_V2,
    OPERATOR_EMAIL,
    OPERATOR_ID,
    OPERATOR_PASSWORD,
    SEED_LOCKS,
    SEED_PEOPLE,
    SentrySimulator,
)

BASE = "https://api.sentry.test"
MEETING = SEED_LOCKS["Meeting Room"]      # BATCH_SHARING_25 supported
FRONT = SEED_LOCKS["Front Door"]          # no batch sharing
STORAGE = SEED_LOCKS["Storage"]           # no batch sharing
ROOF = SEED_LOCKS["Roof Hatch"]           # the operator is only a USER
STAFF = [f"staff{n:02d}" for n in range(1, 31)]
WINDOW = "    start: 2026-01-01T00:00:00Z\n    end: 2027-12-31T23:59:59Z\n"


def staff_policy(lock_key: str, lock_id: str, people: list[str], extra: str = "") -> str:
    users = "".join(f"  {p}: {{email: {p}@example.com}}\n" for p in people)
    return (f"users:\n{users}devices:\n  {lock_key}: {{system: office, id: {lock_id}}}\n{extra}"
            f"permissions:\n  - users: [{', '.join(people)}]\n    devices: [{lock_key}]\n{WINDOW}")


def sent_bodies(h: VendorHarness) -> list[tuple[str, str, bytes]]:
    """(method, path, content) of every request the provider sent."""
    return [(request.method, request.url.path, request.content) for request, _ in h.exchanges]


def issued_tokens(h: VendorHarness) -> list[str]:
    """The auth and refresh tokens the platform handed out."""
    return [value for request, response in h.exchanges
            if request.url.path.endswith("/auth/token") and response is not None and response.status_code == 200
            for value in response.json().values() if isinstance(value, str)]


def executes(h: VendorHarness, lock_id: str | None = None) -> list[dict]:
    """The claims of every signed operation sent (to one lock), unverified."""
    return [jwt.decode(content, options={"verify_signature": False}) for method, path, content in sent_bodies(h)
            if method == "POST" and path.endswith("/execute") and (lock_id is None or f"/{lock_id}/" in path)]


def operations(h: VendorHarness, lock_id: str | None = None) -> collections.Counter:
    return collections.Counter(claims["operation"]["type"] for claims in executes(h, lock_id))


@pytest.fixture
def h(tmp_path) -> VendorHarness:
    return VendorHarness(tmp_path, SENTRY)


def assert_converged(h: VendorHarness) -> None:
    plan = h.plan()
    assert not plan.has_changes, [c.address for c in plan.changes]


def holders(h: VendorHarness, lock_id: str) -> dict[str, dict]:
    """Who holds the lock, as the vendor says, without the operator."""
    return {email: m for email, m in h.sim.shares(lock_id).items() if email != OPERATOR_EMAIL}


# ------------------------------------------------------------------------------------------- shares

def test_thirty_users_on_a_batch_lock_take_two_batch_operations(h):
    h.write(staff_policy("meeting-room", MEETING, STAFF))
    first = h.plan()
    assert first.summary()["create"] == 30
    # The seeded outsider's share on a managed lock is undeclared: revoked.
    assert [c.address for c in first.changes if c.effect == "revoke"] == [
        f"office/share/id:{SEED_PEOPLE['mallory@example.com']}/meeting-room"]
    _, report = h.apply()
    assert report.ok, report.lines()
    assert operations(h, MEETING) == {"BATCH_ADD_USER": 2, "REMOVE_USER": 1}
    assert sorted(len(c["operation"]["users"]) for c in executes(h, MEETING)
                  if c["operation"]["type"] == "BATCH_ADD_USER") == [5, 25]
    shares = holders(h, MEETING)
    assert sorted(shares) == sorted(f"{p}@example.com" for p in STAFF)
    assert {(m["role"], m["start"], m["end"]) for m in shares.values()} == {("USER", 1767225600, 1830297599)}
    assert_converged(h)


def test_thirty_users_on_a_lock_without_batch_support_take_one_add_user_each(h):
    h.write(staff_policy("front-door", FRONT, STAFF))
    _, report = h.apply()
    assert report.ok, report.lines()
    assert operations(h, FRONT) == {"ADD_USER": 30, "REMOVE_USER": 1}     # victor, seeded, revoked
    assert sorted(holders(h, FRONT)) == sorted(f"{p}@example.com" for p in STAFF)
    assert_converged(h)


def test_removed_users_are_revoked_in_one_remove_user_per_lock(h):
    ten = STAFF[:10]
    users = "".join(f"  {p}: {{email: {p}@example.com}}\n" for p in ten)

    def policy(people):
        return (f"users:\n{users}devices:\n  meeting-room: {{system: office, id: {MEETING}}}\n"
                f"  front-door: {{system: office, id: {FRONT}}}\npermissions:\n"
                f"  - users: [{', '.join(people)}]\n    devices: [meeting-room, front-door]\n{WINDOW}")
    h.write(policy(ten))
    _, report = h.apply()
    assert report.ok, report.lines()
    h.exchanges.clear()
    h.write(policy(ten[:8]))
    plan = h.plan()
    assert (plan.revocations, plan.managed_grants) == (4, 20)
    _, report = h.apply()
    assert report.ok, report.lines()
    removes = [c for c in executes(h) if c["operation"]["type"] == "REMOVE_USER"]
    assert len(removes) == 2 and {c["sub"] for c in removes} == {MEETING, FRONT}
    gone = {SEED_PEOPLE[f"{p}@example.com"] for p in ten[8:]}
    assert all(set(c["operation"]["users"]) == gone for c in removes)
    assert operations(h) == {"REMOVE_USER": 2}
    for lock in (MEETING, FRONT):
        assert sorted(holders(h, lock)) == sorted(f"{p}@example.com" for p in ten[:8])
    # Revocations read by name in the plan (the state remembers who each share was for).
    assert all("id:" not in c.address for c in plan.changes)
    assert_converged(h)


def test_changed_role_or_window_is_an_add_user_upsert_shown_as_update(h):
    people = ["alice", "bob", "carol"]
    h.write(staff_policy("meeting-room", MEETING, people))
    h.apply()
    h.exchanges.clear()
    text = staff_policy("meeting-room", MEETING, people).replace("end: 2027-12-31T23:59:59Z",
                                                                  "end: 2028-06-30T00:00:00Z")
    h.write(text.replace("permissions:\n", "permissions:\n  - users: [dag]\n    devices: [meeting-room]\n"
                         "    role: ADMIN\n").replace("users:\n", "users:\n  dag: {email: dag@example.com}\n", 1))
    plan = h.plan()
    assert sorted((c.action, c.address) for c in plan.changes) == [
        ("create", "office/share/dag/meeting-room"), *[("update", f"office/share/{p}/meeting-room") for p in people]]
    assert {c.changed for c in plan.changes if c.action == "update"} == {("end",)}
    _, report = h.apply()
    assert report.ok, report.lines()
    assert operations(h) == {"BATCH_ADD_USER": 1}        # three updates and a create, one batch
    shares = holders(h, MEETING)
    assert shares["dag@example.com"] == {"role": "ADMIN", "start": None, "end": None}
    assert {shares[f"{p}@example.com"]["end"] for p in people} == {1845936000}
    # Now only bob's window changes: one lone ADD_USER, even on a batch-capable lock.
    h.exchanges.clear()
    text = (h.policy_dir / "policy.yaml").read_text().replace("users: [alice, bob, carol]", "users: [alice, carol]")
    h.write(text + "  - users: [bob]\n    devices: [meeting-room]\n    start: 2026-03-01T00:00:00Z\n")
    _, report = h.apply()
    assert report.ok, report.lines()
    assert operations(h) == {"ADD_USER": 1}
    assert holders(h, MEETING)["bob@example.com"] == {"role": "USER", "start": 1772323200, "end": None}
    assert_converged(h)


def test_property_changes_are_one_put_each_with_only_the_changed_fields(h):
    h.write(f"""\
devices:
  meeting-room: {{system: office, id: {MEETING}, name: Board Room, favourite: false, colour: "#2266AA"}}
  front-door: {{system: office, id: {FRONT}, colour: "#24BD9A", favourite: true}}
  roof: {{system: office, id: {ROOF}, name: Roof}}
""")
    plan = h.plan()
    assert sorted((c.address, c.changed) for c in plan.changes if c.kind == "device") == [
        ("office/device/front-door", ("favourite",)),
        ("office/device/meeting-room", ("colour", "favourite", "name")),
        ("office/device/roof", ("name",))]
    _, report = h.apply()
    assert report.ok, report.lines()
    puts = {path.rsplit("/", 1)[-1]: json.loads(content) for method, path, content in sent_bodies(h) if method == "PUT"}
    assert puts == {MEETING: {"name": "Board Room", "favourite": False, "colour": "#2266aa"},
                    FRONT: {"favourite": True}, ROOF: {"name": "Roof"}}
    # Adopting a lock makes its shares managed: the seeded outsiders' are revoked (not on the roof hatch,
    # which the operator does not administer).
    assert operations(h) == {"REMOVE_USER": 2}
    assert_converged(h)


def test_every_signed_operation_verifies_with_the_registered_key_and_no_jti_repeats(h):
    h.write(staff_policy("meeting-room", MEETING, STAFF[:27]).replace(
        "devices:\n", f"devices:\n  front-door: {{system: office, id: {FRONT}}}\n", 1).replace(
        "devices: [meeting-room]", "devices: [meeting-room, front-door]"))
    h.apply()
    h.write(staff_policy("meeting-room", MEETING, STAFF[:3]).replace(
        "devices:\n", f"devices:\n  front-door: {{system: office, id: {FRONT}}}\n", 1).replace(
        "devices: [meeting-room]", "devices: [meeting-room, front-door]"))
    h.apply(allow_mass_revoke=True)
    keys = h.sim.registered_keys()
    assert len(keys) == 2                          # one key pair per run, generated in memory
    tokens = [(path, content.decode()) for method, path, content in sent_bodies(h)
              if method == "POST" and path.endswith("/execute")]
    assert len(tokens) == 2 + 27 + 2 + 2           # batches+adds, one removal per lock, twice
    jtis = []
    for path, token in tokens:
        header = jwt.get_unverified_header(token)
        assert header["alg"] == "EdDSA" and header["typ"] == "JWT" and len(header["x5c"]) == 2
        verified = []
        for key in keys:
            try:
                verified.append(jwt.decode(token, key, algorithms=["EdDSA"],
                                           options={"verify_exp": False, "verify_iat": False, "verify_nbf": False}))
            except jwt.InvalidSignatureError:
                continue
        assert len(verified) == 1, "signed with exactly one of the registered keys"
        claims = verified[0]
        assert claims["iss"] == OPERATOR_ID and claims["sub"] == path.split("/")[-2]
        assert claims["iat"] == claims["nbf"] and 0 < claims["exp"] - claims["iat"] <= 60
        assert uuid.UUID(claims["jti"]).version == 4
        # The certificate in x5c holds the same key the sandbox registered.
        leaf = x509.load_der_x509_certificate(base64.b64decode(header["x5c"][0]))
        assert leaf.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) in {
            k.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) for k in keys}
        jtis.append(claims["jti"])
    assert len(set(jtis)) == len(jtis)


def test_no_private_key_token_or_password_in_any_output(h, monkeypatch, caplog):
    generated: list[Ed25519PrivateKey] = []
    real = Ed25519PrivateKey.generate

    def capture() -> Ed25519PrivateKey:
        key = real()
        generated.append(key)
        return key
    monkeypatch.setattr(Ed25519PrivateKey, "generate", staticmethod(capture))
    caplog.set_level(logging.DEBUG)
    h.write(staff_policy("meeting-room", MEETING, STAFF[:5]))
    outputs = []
    first = h.plan()
    outputs += [render_text(first), render_json(first), render_markdown(first), repr(first.to_dict())]
    _, report = h.apply()
    outputs += report.lines()
    h.sim.set_offline(MEETING)
    h.write(staff_policy("meeting-room", MEETING, STAFF[:6]))
    _, failed = h.apply()
    assert not failed.ok
    outputs += failed.lines()
    h.sim.set_offline(MEETING, False)
    outputs += [(h.tmp_path / "state" / "state.json").read_text(), caplog.text]
    outputs += [json.dumps([r.__dict__ for r in h.sim.requests], default=str)]
    assert generated and issued_tokens(h)
    secrets = [OPERATOR_PASSWORD, *issued_tokens(h)]
    for key in generated:
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        secrets += [raw.hex(), base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode().rstrip("="),
                    pem.splitlines()[1]]
    text = "\n".join(outputs)
    for secret in secrets:
        assert secret not in text


def test_an_operator_token_works_without_a_login_and_never_revokes_the_operator(tmp_path):
    """The provider takes `token` instead of email/password (the policy checks cannot declare it yet);
    an opaque token names nobody, so the key registration tells who the operator is."""
    from reconciler.providers.sentry import SentryProvider
    from reconciler.resources import Resource
    from reconciler.secret import Secret
    from reconciler.state import LocalState

    sim = SentrySimulator()
    with httpx.Client(transport=httpx.MockTransport(sim.handle), base_url=BASE) as http:
        login = http.post("/auth/token", json={"email": OPERATOR_EMAIL, "password": OPERATOR_PASSWORD})
        token = login.json()["authToken"]
    sim.reset_log()

    class OpaqueToken(SentryProvider):
        def _login(self, http):
            answer = super()._login(http)
            self._operator_ids.clear()      # as with a token that is not a readable JWT
            return answer
    provider = OpaqueToken("office", url=BASE, credentials={"token": Secret(token)}, settings={},
                           state=LocalState(tmp_path / "state.json"), clock=sim.now,
                           transport=httpx.MockTransport(sim.handle))
    desired = [Resource("office", "device", "meeting-room", {}, id=MEETING)]
    try:
        result = provider.read(desired)
    finally:
        provider.close()
    assert not sim.count("POST", "/auth/token")
    assert sim.count("POST", "/auth/certificate") == 1
    shares = [r.name for r in result.resources if r.kind == "share"]
    assert shares == [f"id:{SEED_PEOPLE['mallory@example.com']}/meeting-room"]


# ------------------------------------------------------------------------------------ plan errors

def test_unknown_email_is_a_plan_error_naming_the_user_and_nothing_is_sent(h):
    h.write(staff_policy("meeting-room", MEETING, ["alice", "zoe"]).replace(
        "zoe: {email: zoe@example.com}", "zoe: {email: zoe@nowhere.example}"))
    with pytest.raises(PlanError) as caught:
        h.apply()
    assert caught.value.lines() == [
        "office/share/zoe/meeting-room: user 'zoe' (zoe@nowhere.example) has no Sentry Interactive account: "
        "nobody with that email is in the directory"]
    assert operations(h) == {}
    assert not [b for b in sent_bodies(h) if b[0] == "PUT"]
    assert holders(h, MEETING) == {"mallory@example.com": {"role": "USER", "start": None, "end": None}}


def test_directory_is_asked_one_email_at_a_time_with_the_v1_shape(h):
    # Document 000's v2 "multiple query keys" are identifier types of one person, not a list of people:
    # every lookup is v1 `{email}` for one address.
    h.write(staff_policy("meeting-room", MEETING, STAFF))
    h.plan()
    queries = [json.loads(c) for m, p, c in sent_bodies(h) if p.endswith("/directory/query")]
    assert sorted(q["email"] for q in queries) == sorted(f"{u}@example.com" for u in STAFF)
    assert all(set(q) == {"email"} for q in queries)
    lookups = [r for r in h.sim.requests if r.path.endswith("/directory/query")]
    assert lookups and all(MEDIA_V2 not in r.headers.get("accept", "") for r in lookups)


def test_shares_on_a_lock_the_operator_does_not_administer_are_a_plan_error(h):
    h.write(staff_policy("roof", ROOF, ["alice"]))
    with pytest.raises(PlanError, match=r"office/share/alice/roof: the operator account is not an ADMIN of device "
                                        r"'roof' \(its role is USER\)"):
        h.plan()
    assert not [p for m, p, c in sent_bodies(h) if p.endswith("/users")], "no user list read where it is refused"


def test_schedule_and_conflicting_windows_are_validation_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("p.yaml").write_text(textwrap.dedent(f"""\
        systems:
          office: {{vendor: sentry, url: sandbox}}
        users:
          alice: {{email: alice@example.com}}
          bob: {{email: bob@example.com}}
        devices:
          meeting-room: {{system: office, id: {MEETING}}}
        schedules:
          office-hours:
            - {{days: [mon, tue], from: "08:00", to: "18:00"}}
        permissions:
          - users: [bob]
            devices: [meeting-room]
            schedule: office-hours
          - users: [alice]
            devices: [meeting-room]
            start: 2026-01-01T00:00:00Z
          - users: [alice]
            devices: [meeting-room]
            start: 2026-02-01T00:00:00Z
        """))
    with pytest.raises(PolicyError) as caught:
        load_policy(Path("p.yaml"), capabilities(), {})
    lines = caught.value.lines()
    assert any(re.fullmatch(r"p\.yaml:14:5: sentry has no weekly schedules \(device 'meeting-room' is on system "
                            r"'office'\); remove `schedule:` or use start and end", line) for line in lines), lines
    assert any(re.fullmatch(r"p\.yaml:18:5: alice's access to 'meeting-room' is also granted at p\.yaml:15:5 with a "
                            r"different start; make the two identical or merge them", line) for line in lines), lines


# -------------------------------------------------------------------------------- faults and audit

def test_offline_lock_is_reported_and_a_rerun_converges(h):
    h.write(staff_policy("storage", STORAGE, ["alice", "bob"]))
    h.sim.set_offline(STORAGE)
    _, report = h.apply()
    assert not report.ok
    assert {c.address for c, _ in report.failed} == {"office/share/alice/storage", "office/share/bob/storage"}
    assert all("503: Device offline" in why for _, why in report.failed)
    assert holders(h, STORAGE) == {}
    h.sim.set_offline(STORAGE, False)
    _, report = h.apply()
    assert report.ok, report.lines()
    assert sorted(holders(h, STORAGE)) == ["alice@example.com", "bob@example.com"]
    assert_converged(h)


def test_lost_answer_of_a_batch_is_looked_up_not_sent_again(h):
    h.write(staff_policy("meeting-room", MEETING, STAFF[:4]))
    h.sim.faults.add("POST", rf"/device/{MEETING}/execute$", commit=True, times=2)   # the batch and the removal
    _, report = h.apply()
    assert report.ok, report.lines()
    assert operations(h, MEETING) == {"BATCH_ADD_USER": 1, "REMOVE_USER": 1}
    assert sorted(holders(h, MEETING)) == sorted(f"{p}@example.com" for p in STAFF[:4])
    assert_converged(h)


def test_an_execute_that_did_not_land_is_signed_again_with_a_fresh_jti(h):
    h.write(staff_policy("front-door", FRONT, ["alice"]))
    h.sim.faults.add("POST", rf"/device/{FRONT}/execute$", status=502, times=1)
    h.sim.faults.add("POST", rf"/device/{FRONT}/execute$", status=429, times=1)
    _, report = h.apply()
    assert report.ok, report.lines()
    claims = executes(h, FRONT)
    assert len({c["jti"] for c in claims}) == len(claims) == 4      # 502, 429, then both land
    assert_converged(h)


def test_events_show_the_audit_trail_oldest_first_with_policy_names(h):
    h.write(staff_policy("meeting-room", MEETING, ["alice"]))
    h.apply()
    events = run.events(h.session(), "office", "meeting-room")
    assert [e.action for e in events[:4]] == ["LOCK_SHARED", "DOOR_UNLOCK", "DOOR_LOCK", "DOOR_UNLOCK"]
    assert events[3].person == "mallory@example.com" and events[3].detail == "rejected: outside permitted hours"
    assert [(e.action, e.person, e.detail) for e in events[4:]] == [
        ("LOCK_REVOKED", OPERATOR_EMAIL, "mallory@example.com"), ("LOCK_SHARED", OPERATOR_EMAIL, "alice")]
    assert [e.time for e in events] == sorted(e.time for e in events)
    log = [r for r in h.sim.requests if r.path.endswith("/log")]
    assert log and all(r.headers.get("accept") == MEDIA_V2 for r in log)


# --------------------------------------------------------------------------- the simulator's refusals

class Client:
    """Raw requests to the simulator, logged in as the operator with one registered key."""

    def __init__(self, sim: SentrySimulator, key: Ed25519PrivateKey | None = None):
        self.sim = sim
        self.http = httpx.Client(transport=httpx.MockTransport(sim.handle), base_url=BASE)
        login = self.http.post("/auth/token", json={"email": OPERATOR_EMAIL, "password": OPERATOR_PASSWORD},
                               headers={"Accept": MEDIA_V2})
        assert login.status_code == 200 and set(login.json()) == {"authToken", "refreshToken"}
        self.auth = {"Authorization": f"Bearer {login.json()['authToken']}"}
        self.key = key or Ed25519PrivateKey.generate()
        raw = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        answer = self.http.post("/auth/certificate", json={"ephemeralKey": base64.b64encode(raw).decode()},
                                headers=self.auth).json()
        self.chain, self.user_id = answer["certificateChain"], answer["userId"]

    def claims(self, lock_id: str, operation: dict, **overrides) -> dict:
        now = int(time.time())
        return {"iss": self.user_id, "sub": lock_id, "iat": now, "nbf": now, "exp": now + 60,
                "jti": str(uuid.uuid4()), "operation": operation, **overrides}

    def sign(self, claims: dict, key=None, algorithm: str = "EdDSA", chain=None) -> str:
        return jwt.encode(claims, key or self.key, algorithm=algorithm,
                          headers={"typ": "JWT", "x5c": self.chain if chain is None else chain})

    def execute(self, lock_id: str, token: str, content_type: str = "application/jwt") -> httpx.Response:
        return self.http.post(f"/device/{lock_id}/execute", content=token.encode(),
                              headers={**self.auth, "Content-Type": content_type})

    def add(self, email: str, **fields) -> dict:
        entry = self.http.post("/directory/query", json={"email": email}, headers=self.auth).json()
        return {"type": "ADD_USER", "user": entry["id"], "publicKey": entry["publicKey"], "role": "USER", **fields}


@pytest.fixture
def client() -> Client:
    return Client(SentrySimulator())


def refused(response: httpx.Response, status: int, words: str) -> bool:
    body = response.json()
    return response.status_code == status and body["code"] == status and words in body["message"]


def test_a_good_signed_operation_is_accepted(client):
    response = client.execute(FRONT, client.sign(client.claims(FRONT, client.add("alice@example.com"))))
    assert response.status_code == 204, response.text
    assert "alice@example.com" in client.sim.shares(FRONT)


def test_a_forged_signature_is_refused(client):
    token = client.sign(client.claims(FRONT, client.add("alice@example.com")), key=Ed25519PrivateKey.generate())
    assert refused(client.execute(FRONT, token), 403, "Invalid signature")
    header, payload, signature = client.sign(client.claims(FRONT, client.add("alice@example.com"))).split(".")
    tampered = json.loads(base64.urlsafe_b64decode(payload + "=="))
    tampered["operation"]["role"] = "ADMIN"
    forged = base64.urlsafe_b64encode(json.dumps(tampered).encode()).decode().rstrip("=")
    assert refused(client.execute(FRONT, f"{header}.{forged}.{signature}"), 403, "Invalid signature")
    assert "alice@example.com" not in client.sim.shares(FRONT)


def test_a_wrong_key_with_a_home_made_chain_is_refused(client):
    intruder = Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Sentry Interactive Sandbox CA")])
    now = datetime.now(UTC)
    fake_ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(intruder.public_key())
               .serial_number(1).not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1))
               .sign(intruder, None))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, OPERATOR_ID)]))
            .issuer_name(name).public_key(intruder.public_key()).serial_number(2)
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1)).sign(intruder, None))
    der = [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in (leaf, fake_ca)]
    claims = client.claims(FRONT, client.add("alice@example.com"))
    assert refused(client.execute(FRONT, client.sign(claims, key=intruder, chain=der)), 403, "not issued by")
    # The platform's own CA with the intruder's leaf is still not one it issued.
    assert refused(client.execute(FRONT, client.sign(claims, key=intruder, chain=[der[0], client.chain[1]])),
                   403, "not issued by this platform")
    assert client.sim.shares(FRONT).keys() == {OPERATOR_EMAIL, "victor@example.com"}


def test_an_expired_or_too_long_token_is_refused(client):
    now = int(time.time())
    operation = client.add("alice@example.com")
    expired = client.claims(FRONT, operation, iat=now - 120, nbf=now - 120, exp=now - 60)
    assert refused(client.execute(FRONT, client.sign(expired)), 403, "expired")
    too_long = client.claims(FRONT, operation, exp=now + 3600)
    assert refused(client.execute(FRONT, client.sign(too_long)), 403, "at most 60 seconds")
    early = client.claims(FRONT, operation, iat=now + 30, nbf=now + 30, exp=now + 60)
    assert refused(client.execute(FRONT, client.sign(early)), 403, "not valid yet")
    # By the simulator's clock: a day later, a token made "now" is long expired.
    token = client.sign(client.claims(FRONT, operation))
    client.sim.advance(timedelta(days=1))
    response = client.execute(FRONT, token)
    assert response.status_code in (401, 403)    # the auth token or the signed operation, whichever first


def test_a_replayed_jti_is_refused_with_409(client):
    token = client.sign(client.claims(FRONT, client.add("alice@example.com")))
    assert client.execute(FRONT, token).status_code == 204
    assert refused(client.execute(FRONT, token), 409, "jti")
    again = client.sign(client.claims(FRONT, client.add("bob@example.com"), jti=jwt.decode(
        token, options={"verify_signature": False})["jti"]))
    assert refused(client.execute(FRONT, again), 409, "jti")


def test_iss_and_sub_must_match(client):
    operation = client.add("alice@example.com")
    wrong_iss = client.sign(client.claims(FRONT, operation, iss=SEED_PEOPLE["heidi@example.com"]))
    assert refused(client.execute(FRONT, wrong_iss), 403, "iss does not match")
    wrong_sub = client.sign(client.claims(MEETING, operation))
    assert refused(client.execute(FRONT, wrong_sub), 403, "sub does not match")


def test_only_eddsa_is_accepted(client):
    claims = client.claims(FRONT, client.add("alice@example.com"))
    hs256 = jwt.encode(claims, "shared-secret-of-at-least-32-bytes!!", algorithm="HS256",
                       headers={"x5c": client.chain})
    assert refused(client.execute(FRONT, hs256), 403, "Only EdDSA")
    none = jwt.encode(claims, None, algorithm="none", headers={"x5c": client.chain})
    assert refused(client.execute(FRONT, none), 403, "Only EdDSA")
    assert refused(client.execute(FRONT, "not a jws at all"), 400, "compact JWS")
    assert refused(client.execute(FRONT, client.sign(claims), content_type="application/json"), 415, "application/jwt")


def test_admin_role_capability_batch_size_and_offline_are_enforced(client):
    alice, bob = client.add("alice@example.com"), client.add("bob@example.com")
    assert refused(client.execute(ROOF, client.sign(client.claims(ROOF, alice))), 403, "not an administrator")
    batch = {"type": "BATCH_ADD_USER", "users": [{k: v for k, v in u.items() if k != "type"} for u in (alice, bob)]}
    assert refused(client.execute(FRONT, client.sign(client.claims(FRONT, batch))), 400, "BATCH_SHARING_25")
    staff = [client.add(f"staff{n:02d}@example.com") for n in range(1, 27)]
    big = {"type": "BATCH_ADD_USER", "users": [{k: v for k, v in u.items() if k != "type"} for u in staff]}
    assert refused(client.execute(MEETING, client.sign(client.claims(MEETING, big))), 400, "1..25")
    big["users"] = big["users"][:25]
    assert client.execute(MEETING, client.sign(client.claims(MEETING, big))).status_code == 204
    stolen_key = client.claims(MEETING, {**alice, "publicKey": bob["publicKey"]})
    assert refused(client.execute(MEETING, client.sign(stolen_key)), 400, "publicKey does not belong")
    client.sim.set_offline(STORAGE)
    assert refused(client.execute(STORAGE, client.sign(client.claims(STORAGE, alice))), 503, "offline")
    assert client.http.get(f"/device/{STORAGE}", headers=client.auth).json()["state"]["connected"] is False
    remove = {"type": "REMOVE_USER", "users": [alice["user"]]}
    assert client.execute(FRONT, client.sign(client.claims(FRONT, remove))).status_code == 200


def test_directory_v1_v2_and_unknown_emails(client):
    v1 = client.http.post("/directory/query", json={"email": "alice@example.com"}, headers=client.auth)
    assert v1.status_code == 200 and set(v1.json()) == {"id", "publicKey"}
    v2 = client.http.post("/directory/query", json={"email": "alice@example.com", "telephone": "+4790000001"},
                          headers={**client.auth, "Accept": MEDIA_V2})
    assert v2.status_code == 200 and [e["email"] for e in v2.json()] == ["alice@example.com"]
    assert refused(client.http.post("/directory/query", json={"email": "who@nowhere.example"}, headers=client.auth),
                   404, "not found")
    assert refused(client.http.post("/directory/query", json={"email": "who@nowhere.example"},
                                    headers={**client.auth, "Accept": MEDIA_V2}), 404, "not found")
    # A list of people is not a lookup shape the document names: 400, on v2 as on v1.
    for accept in (MEDIA_V2, "application/json"):
        assert refused(client.http.post("/directory/query", json={"email": ["alice@example.com", "bob@example.com"]},
                                        headers={**client.auth, "Accept": accept}), 400, "string")
    assert refused(client.http.post("/directory/query", json={"name": "Alice"},
                                    headers={**client.auth, "Accept": MEDIA_V2}), 400, "Unknown field")
    assert len(SEED_PEOPLE) >= 40


def test_login_token_and_rate_limit():
    sim = SentrySimulator(rate_limit=2)
    with httpx.Client(transport=httpx.MockTransport(sim.handle), base_url=BASE) as http:
        assert refused(http.post("/auth/token", json={"email": OPERATOR_EMAIL, "password": "wrong"}), 401, "Invalid")
        assert refused(http.get("/device"), 401, "bearer")
        limited = http.get("/device")
        assert refused(limited, 429, "Rate limit") and limited.headers["Retry-After"]


def test_shareable_and_lock_list_show_roles_and_capabilities(client):
    locks = {lock["id"]: lock for lock in client.http.get("/device", headers=client.auth).json()}
    assert set(locks) == set(SEED_LOCKS.values())
    assert locks[ROOF]["role"] == "USER" and locks[MEETING]["role"] == "ADMIN"
    assert locks[MEETING]["settings"]["capabilities"]["BATCH_SHARING_25"] == "SUPPORTED"
    assert locks[FRONT]["settings"]["capabilities"]["BATCH_SHARING_25"] == "UNSUPPORTED"
    shareable = client.http.get("/device/shareable", headers=client.auth).json()
    assert {s["id"] for s in shareable} == set(SEED_LOCKS.values()) - {ROOF}
    assert refused(client.http.get(f"/device/{ROOF}/users", headers=client.auth), 403, "not an administrator")


# ------------------------------------------------------------------------------------ CLI, served

@pytest.fixture
def served(tmp_path):
    with serve_sandboxes(tmp_path) as (root, printed):
        yield f"{root}/sentry", {k: v for k, v in printed.items() if k in ("SENTRY_EMAIL", "SENTRY_PASSWORD")}


def test_cli_end_to_end_against_served_sandbox(tmp_path, served):
    url, credentials = served
    policy = tmp_path / "policies"
    policy.mkdir()
    (policy / "systems.yaml").write_text(
        f"systems:\n  office:\n    vendor: sentry\n    url: {url}\n"
        "    credentials: {email: \"${SENTRY_EMAIL}\", password: \"${SENTRY_PASSWORD}\"}\n")
    (policy / "access.yaml").write_text(staff_policy("meeting-room", MEETING, STAFF[:27]).replace(
        "devices:\n", f"devices:\n  front-door: {{system: office, id: {FRONT}, favourite: true}}\n", 1)
        + "  - users: [staff01, staff02]\n    devices: [front-door]\n")
    env = {**os.environ, **credentials, "RECONCILER_STATE": str(tmp_path / "state.json")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*reconciler_command(), *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=120)

    first = cli("plan", "--detailed-exitcode", "--now", "2026-11-22T10:00:00Z")
    assert first.returncode == 2, first.stderr
    assert "Plan: 29 to create, 1 to update, 2 to delete" in first.stdout
    applied = cli("apply", "--auto-approve", "--now", "2026-11-22T10:00:00Z")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    final = cli("plan", "--detailed-exitcode", "--now", "2026-11-22T10:00:00Z")
    assert final.returncode == 0, final.stdout + final.stderr
    events = cli("events", "office", "meeting-room", "--directory", "policies")
    assert events.returncode == 0, events.stderr
    assert re.search(r"^\S+Z\s+LOCK_SHARED\s+ops@example.com\s+staff27$", events.stdout, re.M), events.stdout
    for output in (first, applied, final, events):
        assert credentials["SENTRY_PASSWORD"] not in output.stdout + output.stderr
    assert credentials["SENTRY_PASSWORD"] not in (tmp_path / "state.json").read_text()
    # The served store: two batches on the meeting room, one ADD_USER each on the front door.
    store = read_store(tmp_path / "vendor" / "sentry.json")
    shared = collections.Counter(e["deviceId"] for e in store["log"] if e["type"] == "LOCK_SHARED" and e["issuer"])
    assert shared[MEETING] == 27 + 1 and shared[FRONT] == 2     # +1: the seeded share of mallory


def test_sentry_takes_email_and_password_or_an_operator_token_at_validation(tmp_path):
    from reconciler.errors import PolicyError
    from reconciler.policy import load_policy
    from reconciler.providers.factory import capabilities

    def policy(credentials: str):
        (tmp_path / "p.yaml").write_text(f"systems:\n  office:\n    vendor: sentry\n    credentials: {credentials}\n")
        return load_policy(tmp_path / "p.yaml", capabilities(), {"SENTRY_T": "tok", "SENTRY_E": "ops@example.com", "SENTRY_P": "pw"})

    assert set(policy('{token: "${SENTRY_T}"}').systems["office"].credentials) == {"token"}
    assert set(policy('{email: "${SENTRY_E}", password: "${SENTRY_P}"}').systems["office"].credentials) == {"email", "password"}
    with pytest.raises(PolicyError, match="needs credentials email and password or token"):
        policy('{email: "${SENTRY_E}"}')


# ------------------------------------------------------------------- documented refusals and lock settings

def test_secondary_authentication_423_stops_the_apply_with_a_clear_reason(h):
    h.write(staff_policy("meeting-room", MEETING, ["alice"]))
    h.sim.require_secondary_auth()
    _, report = h.apply()
    assert not report.ok
    lines = [line for line in report.lines() if "423" in line]
    assert lines and all("secondary authentication" in line and OPERATOR_PASSWORD not in line for line in lines)
    assert not executes(h), "nothing signed without a certificate"
    h.sim.require_secondary_auth(False)
    _, report = h.apply()
    assert report.ok, report.lines()
    assert_converged(h)


def test_the_v2_lock_log_needs_start_and_end(client):
    v2 = {**client.auth, "Accept": MEDIA_V2}
    assert refused(client.http.get(f"/device/{MEETING}/log", headers=v2), 400, "start is required")
    assert refused(client.http.get(f"/device/{MEETING}/log", params={"start": "0"}, headers=v2), 400, "end is required")
    ok = client.http.get(f"/device/{MEETING}/log", params={"start": "0", "end": str(int(time.time()) + 1)}, headers=v2)
    assert ok.status_code == 200 and ok.json()
    assert client.http.get(f"/device/{MEETING}/log", headers=client.auth).status_code == 200   # v1: optional


def test_exact_paths_only(client):
    assert refused(client.http.get("/device/", headers=client.auth), 404, "")
    assert refused(client.http.get(f"/device/{MEETING}/users/", headers=client.auth), 404, "")


def test_mutate_setting_takes_only_the_documented_unlock_duration(client):
    ok = client.execute(FRONT, client.sign(client.claims(FRONT, {"type": "MUTATE_SETTING", "unlockDuration": 9})))
    assert ok.status_code == 200, ok.text
    window = {"type": "MUTATE_SETTING", "unlockDuration": 9, "unlockBetween": {"start": "08:00", "end": "18:00"}}
    assert refused(client.execute(FRONT, client.sign(client.claims(FRONT, window))), 400, "Unknown field")
    assert refused(client.execute(FRONT, client.sign(client.claims(FRONT, {"type": "MUTATE_SETTING"}))),
                   400, "unlockDuration")


def test_unlock_duration_from_the_policy_is_one_signed_setting_and_converges(h):
    h.write(f"devices:\n  meeting-room: {{system: office, id: {MEETING}, unlock_duration: 12}}\n")
    plan = h.plan()
    assert [(c.address, c.action, c.changed) for c in plan.changes if c.kind == "device"] == [
        ("office/device/meeting-room", "update", ("unlock_duration",))]
    _, report = h.apply()
    assert report.ok, report.lines()
    settings = [c["operation"] for c in executes(h, MEETING) if c["operation"]["type"] == "MUTATE_SETTING"]
    assert settings == [{"type": "MUTATE_SETTING", "unlockDuration": 12}]
    assert not [p for m, p, c in sent_bodies(h) if m == "PUT"], "the unlock duration is not a lock property"
    lock = h.sim.state["locks"][MEETING]
    assert lock["settings"]["unlockTime"] == 12
    assert_converged(h)


def test_unlock_duration_is_refused_where_the_vendor_has_none_and_out_of_range(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("p.yaml").write_text(textwrap.dedent(f"""\
        systems:
          office: {{vendor: sentry, url: sandbox}}
          cabins: {{vendor: unloc, url: sandbox, lock_holder_id: 866b8a35-4184-44c5-8ffd-448a77e5a91c}}
        devices:
          meeting-room: {{system: office, id: {MEETING}, unlock_duration: 0}}
          cabin: {{system: cabins, id: 0634f1ba-e175-49e8-98bc-32b11505107b, unlock_duration: 5}}
        """))
    with pytest.raises(PolicyError) as caught:
        load_policy(Path("."), capabilities(), env={})
    text = str(caught.value)
    assert "p.yaml:5:" in text and "unlock_duration" in text
    assert "p.yaml:6:" in text and "unloc devices have no 'unlock_duration'" in text
