"""Every request each provider can send, checked against its vendor document.

Per vendor, a table of the documented operations (method, path, headers, query and body fields, from
`vendor-docs/` and API-SURFACE.md; for SmartphoneKey the vendor's OpenAPI, checked in test_spkey.py) and a
scenario that drives the provider through plan, apply, updates, removals, events and lost answers. Every
request that reaches the simulator must match one row exactly (no undocumented path, query parameter or
body field, the documented headers, and no header the document rules out), and every row must be hit:
a request the provider can send but the scenario misses fails as loudly as a wrong one. A last check ties
each table to the provider's own endpoint table, so an endpoint added there without a row here fails.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable
from urllib.parse import parse_qsl

import httpx
import jwt
import pytest
from harness import ABLOY, SENTRY, UNLOC, UNLOC_PARTNER, VendorHarness
from test_abloy_provider import POLICY as ABLOY_POLICY
from test_spkey import FLAT3, GUESTS, check_request, check_response, keys_yaml
from test_unloc import POLICY as UNLOC_POLICY
from test_unloc_partner import POLICY as PARTNER_POLICY

from reconciler import run
from reconciler.providers import abloy, sentry, spkey, unloc, unloc_partner
from reconciler.sandbox.abloy import GATEWAY_CLAIMING_CODES, SEED_DEVICES
from reconciler.sandbox.sentry import BATCH_CAPABLE
from reconciler.sandbox.sentry import SEED_LOCKS as SENTRY_LOCKS
from reconciler.state import LocalState

UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
E164 = r"\+[1-9]\d{1,14}"
INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
DURATION = re.compile(r"^P(?:\d+D)?(?:T(?:\d+H)?(?:\d+M)?(?:\d+S)?)?$")
SEGMENTS = {"uuid": UUID, "phone": re.escape("+") + r"[1-9]\d{1,14}", "any": r"[^/]+"}


def is_uuid(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(UUID, value) is not None


def is_instant(value: Any) -> bool:
    return isinstance(value, str) and INSTANT.match(value) is not None


def one_of(*values: Any) -> Callable[[Any], bool]:
    return lambda value: value in values


@dataclass(frozen=True)
class Operation:
    """One documented request. `path` names its segments `{name:uuid}`, `{name:phone}` or `{name}`;
    `headers`: exact values (a regex when it starts with ^); `absent`: headers the document rules out;
    `query`: allowed parameters and their checks, `required_query` those that must be there; `body`:
    None (no body), or (media type, required fields, optional fields); `fields`: checks per field."""

    name: str
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    absent: frozenset[str] = frozenset()
    query: dict[str, Callable[[str], bool]] = field(default_factory=dict)
    required_query: frozenset[str] = frozenset()
    body: tuple[str, frozenset[str], frozenset[str]] | None = None
    fields: dict[str, Callable[[Any], bool]] = field(default_factory=dict)
    check: Callable[[Any], None] | None = None      # whole-body check (JWS claims, JSON Patch, ...)

    def regex(self) -> str:
        def segment(match: re.Match[str]) -> str:
            name, _, kind = match.group(1).partition(":")
            return f"(?P<{name}>{SEGMENTS[kind or 'any']})"
        return "^" + re.sub(r"\{([^}]+)\}", segment, re.escape(self.path).replace(r"\{", "{").replace(r"\}", "}")) + "$"


class Recorder:
    """A simulator's handler with every raw request kept."""

    def __init__(self, handle: Callable[[httpx.Request], httpx.Response]):
        self.handle = handle
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return self.handle(request)


def conform(recorder: Recorder, table: list[Operation], *, base: str = "") -> set[str]:
    """Assert every recorded request matches one row; returns the names of the rows hit."""
    hit: set[str] = set()
    assert recorder.requests, "the scenario sent nothing"
    for request in recorder.requests:
        path = request.url.path
        assert path.startswith(base), path
        path = path[len(base):]
        what = f"{request.method} {path}"
        rows = [op for op in table if op.method == request.method and re.match(op.regex(), path)]
        assert len(rows) == 1, f"{what}: matches {len(rows)} documented operations"
        op = rows[0]
        hit.add(op.name)
        for name, expected in op.headers.items():
            value = request.headers.get(name)
            assert value is not None, f"{what}: header {name} missing"
            ok = re.match(expected, value) if expected.startswith("^") else value == expected
            assert ok, f"{what}: header {name} is {value!r}, the document says {expected!r}"
        for name in op.absent:
            assert name not in request.headers, f"{what}: header {name} must not be sent"
        query = dict(request.url.params)
        assert len(query) == len(request.url.params.multi_items()), f"{what}: a repeated query parameter"
        for name, value in query.items():
            assert name in op.query, f"{what}: undocumented query parameter {name}"
            assert op.query[name](value), f"{what}: query {name}={value!r} is not what the document allows"
        missing = op.required_query - set(query)
        assert not missing, f"{what}: required query {sorted(missing)} missing"
        if op.body is None:
            assert not request.content, f"{what}: a body where the document has none"
            continue
        media, required, optional = op.body
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        assert content_type == media, f"{what}: Content-Type {content_type!r}, the document says {media}"
        body: Any
        if media == "application/x-www-form-urlencoded":
            pairs = parse_qsl(request.content.decode("ascii"), keep_blank_values=True, strict_parsing=True)
            body = dict(pairs)
            assert len(body) == len(pairs), f"{what}: a repeated form field"
        elif media == "application/jwt":
            body = request.content.decode("ascii")
        else:
            body = json.loads(request.content)
        if op.check is not None:
            op.check(body)
        if isinstance(body, dict) and (required or optional):
            assert required <= set(body), f"{what}: required field(s) {sorted(required - set(body))} missing"
            extra = set(body) - required - optional
            assert not extra, f"{what}: undocumented field(s) {sorted(extra)}"
            for name, ok in op.fields.items():
                if name in body:
                    assert ok(body[name]), f"{what}: {name}={body[name]!r} is not what the document allows"
    return hit


def events_since(session: run.Session, system: str, device: str, since: datetime) -> None:
    """A provider's `events(..., since=)`, which the CLI does not offer yet."""
    policy = run.validate(session)
    providers = run.build_providers(session, policy, LocalState(session.state_path))
    try:
        provider = providers[system]
        provider.read(policy.resources)
        wanted = next(r for r in policy.resources if r.system == system and r.kind == "device" and r.name == device)
        provider.events(wanted, since=since)
    finally:
        for provider in providers.values():
            provider.close()


def covers(table: list[Operation], paths: dict[str, str]) -> None:
    """Every path of the provider's endpoint table has a row (placeholders aside)."""
    def shape(path: str) -> str:
        return re.sub(r"\{[^}]+\}", "{}", path)
    rows = {shape(op.path) for op in table}
    for name, path in paths.items():
        assert shape(path) in rows, f"endpoint {name} ({path}) has no row in the conformance table"


# ------------------------------------------------------------------------------------------------- Abloy
# Document 002 and API-SURFACE §1: Accept and X-Api-Key on every call, a bearer token on all but login,
# JSON bodies (JSON Patch for the rename), lists with `limit` 1..100 and `next-page-token`.

A_MEDIA = abloy.MEDIA_TYPE
A_AUTH = {"accept": A_MEDIA, "x-api-key": "^.+$", "authorization": r"^Bearer \S+$"}
JSON = "application/json"
PAGE = {"limit": lambda v: v.isdigit() and 1 <= int(v) <= 100, "next-page-token": lambda v: bool(v)}


def _json_patch(body: Any) -> None:
    assert isinstance(body, list) and body, body
    for item in body:
        assert item.get("op") == "replace" and item.get("path") == "/name" and set(item) == {"op", "path", "value"}
        assert isinstance(item["value"], str) and 1 <= len(item["value"]) <= 255


def _duration(low_days: float, high_days: float) -> Callable[[Any], bool]:
    from reconciler.resources import duration_seconds

    def ok(value: Any) -> bool:
        seconds = duration_seconds(value) if isinstance(value, str) and DURATION.match(value) else None
        return seconds is not None and low_days * 86400 <= seconds <= high_days * 86400
    return ok


def _invitation(body: Any) -> None:
    assert body["deliveryMechanism"] != "SMS" or "phoneNumber" in body, "SMS delivery needs phoneNumber [doc]"


PERMISSION_FIELDS: dict[str, Callable[[Any], bool]] = {
    "permissionType": one_of("SINGLE_INTERVAL"), "userId": is_uuid, "lockingDeviceId": is_uuid,
    "operationType": one_of("OPEN", "UPDATE_FIRMWARE", "UPDATE_TIME"),
    "operatingKeyValidityDuration": _duration(1, 31), "start": is_instant, "end": is_instant}
PERMISSION_BODY = (JSON, frozenset({"permissionType", "userId", "lockingDeviceId", "operationType", "start", "end"}),
                   frozenset({"operatingKeyValidityDuration"}))

ABLOY_TABLE = [
    Operation("login", "POST", "/login", {"accept": A_MEDIA, "x-api-key": "^.+$"}, absent=frozenset({"authorization"}),
              body=(JSON, frozenset({"userId", "accessKey"}), frozenset()), fields={"userId": is_uuid}),
    Operation("list users", "GET", "/user", A_AUTH, query=PAGE),
    Operation("create user", "POST", "/user", A_AUTH, body=(JSON, frozenset({"role"}), frozenset()),
              fields={"role": one_of("USER", "ADMIN")}),
    Operation("delete user", "DELETE", "/user/{id:uuid}", A_AUTH),
    Operation("invite", "POST", "/operating-device-invitation", A_AUTH,
              body=(JSON, frozenset({"userId", "deliveryMechanism"}), frozenset({"phoneNumber", "validityDuration", "format"})),
              fields={"userId": is_uuid, "deliveryMechanism": one_of("SMS", "NONE"),
                      "phoneNumber": lambda v: isinstance(v, str) and re.fullmatch(E164, v) is not None,
                      "validityDuration": _duration(1 / 86400, 365), "format": one_of("INVITATION_LINK", "INVITATION_CODE")},
              check=_invitation),
    Operation("revoke invitation", "DELETE", "/operating-device-invitation/{id:uuid}", A_AUTH),
    Operation("list operating devices", "GET", "/operating-device", A_AUTH, query={**PAGE, "user-id": is_uuid}),
    Operation("delete operating device", "DELETE", "/operating-device/{id:uuid}", A_AUTH),
    Operation("list locking devices", "GET", "/locking-device", A_AUTH,
              query={**PAGE, "claiming-status": one_of("UNCLAIMED", "CLAIMED"), "serial-number": bool}),
    Operation("create locking device", "POST", "/locking-device", A_AUTH, body=(JSON, frozenset({"name"}), frozenset()),
              fields={"name": lambda v: isinstance(v, str) and 1 <= len(v) <= 255}),
    Operation("rename locking device", "PATCH", "/locking-device/{id:uuid}", A_AUTH,
              body=("application/json-patch+json", frozenset(), frozenset()), check=_json_patch),
    Operation("delete locking device", "DELETE", "/locking-device/{id:uuid}", A_AUTH),
    Operation("list permissions", "GET", "/permission", A_AUTH, query=PAGE),
    Operation("grant permission", "POST", "/permission", A_AUTH, body=PERMISSION_BODY, fields=PERMISSION_FIELDS),
    Operation("update permission", "PUT", "/permission/{id:uuid}", A_AUTH, body=PERMISSION_BODY, fields=PERMISSION_FIELDS),
    Operation("revoke permission", "DELETE", "/permission/{id:uuid}", A_AUTH),
    Operation("get permission", "GET", "/permission/{id:uuid}", A_AUTH),   # reading a revocation back
    Operation("claim gateway", "POST", "/gateway-device", A_AUTH, body=(JSON, frozenset({"claimingCode"}), frozenset())),
    Operation("list gateways", "GET", "/gateway-device", A_AUTH, query=PAGE),
    Operation("delete gateway", "DELETE", "/gateway-device/{id:uuid}", A_AUTH),
    Operation("create association", "POST", "/gateway-device-association", A_AUTH,
              body=(JSON, frozenset({"gatewayDeviceId", "lockingDeviceId"}), frozenset()),
              fields={"gatewayDeviceId": is_uuid, "lockingDeviceId": is_uuid}),
    Operation("list associations", "GET", "/gateway-device-association", A_AUTH,
              query={**PAGE, "gateway-device-id": is_uuid}),
    Operation("delete association", "DELETE", "/gateway-device-association/{id:uuid}", A_AUTH),
    Operation("audit log", "GET", "/locking-device-audit-log", A_AUTH,
              query={**PAGE, "locking-device-id": is_uuid, "after-datetime": is_instant,
                     "sort-direction": one_of("ASC", "DESC")}),
]


def test_abloy_requests_follow_document_002(tmp_path):
    h = VendorHarness(tmp_path, ABLOY)
    recorder = Recorder(h.sim.handle)
    h.sim.handle = recorder                       # type: ignore[method-assign]
    h.write(ABLOY_POLICY, system_extra="invitation_validity: PT48H\n")
    # A lost association answer: the provider looks it up by gateway before anything is sent again.
    h.sim.faults.add("POST", r"/gateway-device-association$", commit=True, lost="timeout")
    h.converge()
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    # Updates: a renamed device, a moved end; and mobile_key off while the invitation is pending.
    changed = ABLOY_POLICY.replace("name: Annex Door", "name: Annex Door B").replace(
        "end: 2027-06-30T00:00:00Z", "end: 2027-05-31T00:00:00Z").replace("mobile_key: true", "mobile_key: false")
    h.write(changed)
    h.converge()
    # mobile_key back on, the person enrols, then off again: the operating device is deleted.
    h.write(changed.replace("mobile_key: false", "mobile_key: true"))
    h.converge()
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    h.sim.accept_invitation(state["resources"]["hq/invitation/alice"]["id"])
    h.write(changed)
    h.converge()
    run.events(h.session(), "hq", "gym")
    events_since(h.session(), "hq", "gym", h.now - timedelta(days=1))
    # Removals: bob offboarded, the annex decommissioned, the gateway too.
    reduced = (changed.replace('  bob: {phone: "+4790000002"}\n', "").replace("staff: [alice, bob]", "staff: [alice]")
               .replace("annex: {system: hq, name: Annex Door B}", "annex: {system: hq, name: Annex Door B, decommission: true}")
               .replace("devices: [entrance, annex]\n    start", "devices: [entrance]\n    start")
               .replace(f"claiming_code: {GATEWAY_CLAIMING_CODES[0]}, devices: [entrance, annex]",
                        f"claiming_code: {GATEWAY_CLAIMING_CODES[0]}, devices: [entrance], decommission: true"))
    h.write(reduced)
    h.converge()
    assert not h.plan().has_changes
    assert conform(recorder, ABLOY_TABLE, base="/administration") == {op.name for op in ABLOY_TABLE}
    assert SEED_DEVICES


# ------------------------------------------------------------------------------------------------- Unloc
# Document 004 and API-SURFACE §2: the token as an OAuth2 form (RFC 6749 §4.4.2; the document does not
# say which body, the standard one is sent), then bearer tokens; keys under `/locks/{lockId}/keys/`.

U_AUTH = {"authorization": r"^Bearer \S+$"}
LH = "/integrators/v1/lock-holders/{lh:uuid}"


def _token_json(body: Any) -> None:
    # Unloc's documentation: a JSON body, `scope` an array (API-SURFACE §2 [doc]).
    assert body["grant_type"] == "client_credentials"
    assert isinstance(body["scope"], list) and len(body["scope"]) == 1, body["scope"]
    assert re.fullmatch(r"lockHolder\.admin:" + UUID, body["scope"][0]), body["scope"]


def _recurrence(value: Any) -> bool:
    if not isinstance(value, dict) or set(value) != {"timeSpans"}:
        return False
    days = [s.get("weekday") for s in value["timeSpans"]]
    return len(days) == len(set(days)) and all(
        set(s) == {"weekday", "startHour", "startMinute", "endHour", "endMinute"}
        and s["weekday"] in ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
        and 0 <= s["startHour"] <= 24 and 0 <= s["endHour"] <= 24 and 0 <= s["startMinute"] <= 59
        and 0 <= s["endMinute"] <= 59 for s in value["timeSpans"])


UNLOC_TABLE = [
    Operation("token", "POST", "/auth/v1/token/", absent=frozenset({"authorization"}),
              body=(JSON, frozenset({"grant_type", "client_id", "client_secret", "scope"}),
                    frozenset()), check=_token_json),
    Operation("list locks", "GET", LH + "/locks", U_AUTH),
    Operation("list keys", "GET", LH + "/keys", U_AUTH,
              query={"limit": lambda v: v.isdigit() and 1 <= int(v) <= 500, "startAfterId": is_uuid}),
    Operation("list lock keys", "GET", LH + "/locks/{lock:uuid}/keys/", U_AUTH),
    Operation("create key", "POST", LH + "/locks/{lock:uuid}/keys/", U_AUTH,
              body=(JSON, frozenset({"userId", "start", "end"}), frozenset({"recurrence", "skipInviteNotification"})),
              fields={"userId": lambda v: isinstance(v, str) and re.fullmatch(E164, v) is not None,
                      "start": lambda v: v is None or is_instant(v), "end": lambda v: v is None or is_instant(v),
                      "recurrence": _recurrence, "skipInviteNotification": lambda v: v is True}),
    Operation("revoke key", "PATCH", LH + "/locks/{lock:uuid}/keys/{key:uuid}", U_AUTH,
              body=(JSON, frozenset({"state"}), frozenset()), fields={"state": one_of("revoked")}),
]


def test_unloc_requests_follow_document_004(tmp_path):
    h = VendorHarness(tmp_path, UNLOC)
    recorder = Recorder(h.sim.handle)
    h.sim.handle = recorder                       # type: ignore[method-assign]
    quiet = UNLOC_POLICY.replace("    devices: [gate]\n", "    devices: [gate]\n    notify: false\n")
    h.write(quiet)
    h.sim.faults.add("POST", r"/keys/?$", commit=True, lost="timeout")   # a lost create: looked up by lock
    h.converge()
    h.sim.settle()
    h.write(quiet.replace('from: "08:00", to: "18:00"', 'from: "07:00", to: "18:00"'))   # revoke + create
    h.converge()
    h.sim.settle()
    h.sim.expire_tokens()                          # a second token request
    h.write(quiet.replace("  - users: [carol]\n    devices: [gate]\n    notify: false\n", ""))
    h.converge()
    assert conform(recorder, UNLOC_TABLE) == {op.name for op in UNLOC_TABLE}


# ---------------------------------------------------------------------------------------- Unloc Partner
# Document 005 and API-SURFACE §3: a static bearer key; keys created, read and revoked by id.

P_AUTH = {"authorization": r"^Bearer \S+$"}
PARTNER_TABLE = [
    Operation("list locks", "GET", "/v1/partners/{partner}/locks", P_AUTH),
    Operation("lock events", "GET", "/v1/partners/{partner}/locks/{lock}/events", P_AUTH),
    Operation("create key", "POST", "/v1/partners/{partner}/keys", P_AUTH,
              body=(JSON, frozenset({"lockId", "msn", "start"}), frozenset({"end"})),
              fields={"msn": lambda v: isinstance(v, str) and re.fullmatch(E164, v) is not None,
                      "start": is_instant, "end": is_instant, "lockId": lambda v: isinstance(v, str) and bool(v)}),
    Operation("get key", "GET", "/v1/partners/{partner}/keys/{key}", P_AUTH),
    Operation("revoke key", "DELETE", "/v1/partners/{partner}/keys/{key}", P_AUTH),
]


def test_unloc_partner_requests_follow_document_005(tmp_path):
    h = VendorHarness(tmp_path, UNLOC_PARTNER)
    recorder = Recorder(h.sim.handle)
    h.sim.handle = recorder                       # type: ignore[method-assign]
    h.write(PARTNER_POLICY)
    h.sim.faults.add("POST", r"/keys$", commit=True, lost="timeout")     # a lost create: found in the events
    h.converge()
    devices = [name for name in ("apartment", "front")]
    for device in devices:
        run.events(h.session(), "rentals", device)
    h.write(PARTNER_POLICY.replace("  - users: [alice]\n    devices: [apartment]\n", ""))
    h.converge()
    assert conform(recorder, PARTNER_TABLE) == {op.name for op in PARTNER_TABLE}


# ------------------------------------------------------------------------------------------------ Sentry
# Document 000 and API-SURFACE §5 (Doordeck's public documentation for paths and signing).

S_AUTH = {"authorization": r"^Bearer \S+$"}
MEDIA_V2 = sentry.MEDIA_V2
SIGNED_FIELDS = {"iss", "sub", "iat", "nbf", "exp", "jti", "operation"}
SHARE_FIELDS = {"user", "publicKey", "role", "start", "end"}


def _share(body: Any) -> None:
    assert set(body) == SHARE_FIELDS, body
    assert is_uuid(body["user"]) and body["role"] in ("USER", "ADMIN")
    assert all(body[k] is None or (isinstance(body[k], int) and body[k] >= 0) for k in ("start", "end"))


def _signed(token: Any) -> None:
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA" and header["typ"] == "JWT" and isinstance(header["x5c"], list) and header["x5c"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert set(claims) == SIGNED_FIELDS, claims
    assert claims["iat"] == claims["nbf"] and 0 < claims["exp"] - claims["iat"] <= 60
    assert is_uuid(claims["jti"]) and is_uuid(claims["sub"]) and is_uuid(claims["iss"])
    operation = claims["operation"]
    kind = operation["type"]
    if kind == "ADD_USER":
        _share({k: v for k, v in operation.items() if k != "type"})
    elif kind == "BATCH_ADD_USER":
        assert set(operation) == {"type", "users"} and 1 <= len(operation["users"]) <= 25
        for share in operation["users"]:
            _share(share)
    elif kind == "REMOVE_USER":
        assert set(operation) == {"type", "users"} and operation["users"] and all(map(is_uuid, operation["users"]))
    elif kind == "MUTATE_SETTING":
        assert set(operation) == {"type", "unlockDuration"} and isinstance(operation["unlockDuration"], int)
    else:
        raise AssertionError(f"undocumented operation {kind}")


SENTRY_TABLE = [
    Operation("login", "POST", "/auth/token", {"accept": MEDIA_V2}, absent=frozenset({"authorization"}),
              body=(JSON, frozenset({"email", "password"}), frozenset())),
    Operation("register key", "POST", "/auth/certificate", S_AUTH, body=(JSON, frozenset({"ephemeralKey"}), frozenset())),
    Operation("list locks", "GET", "/device", S_AUTH),
    Operation("get lock", "GET", "/device/{id:uuid}", S_AUTH),
    Operation("update lock", "PUT", "/device/{id:uuid}", S_AUTH,
              body=(JSON, frozenset(), frozenset({"name", "favourite", "colour"}))),
    Operation("users of a lock", "GET", "/device/{id:uuid}/users", S_AUTH),
    # v1 `{email}`: one person per lookup (the v2 "multiple query keys" are identifier types of one person).
    Operation("look up user", "POST", "/directory/query", {**S_AUTH, "accept": "application/json"},
              body=(JSON, frozenset({"email"}), frozenset()),
              fields={"email": lambda v: isinstance(v, str) and "@" in v}),
    Operation("signed operation", "POST", "/device/{id:uuid}/execute", S_AUTH,
              body=("application/jwt", frozenset(), frozenset()), check=_signed),
    Operation("audit v2", "GET", "/device/{id:uuid}/log", {**S_AUTH, "accept": MEDIA_V2},
              query={"start": str.isdigit, "end": str.isdigit}, required_query=frozenset({"start", "end"})),
]


def test_sentry_requests_follow_document_000(tmp_path):
    h = VendorHarness(tmp_path, SENTRY)
    recorder = Recorder(h.sim.handle)
    h.sim.handle = recorder                       # type: ignore[method-assign]
    batch = next(name for name in SENTRY_LOCKS if name in BATCH_CAPABLE and name != "Roof Hatch")
    single = next(name for name in SENTRY_LOCKS if name not in BATCH_CAPABLE)
    people = ["alice", "bob", "carol"]
    users = "".join(f"  {p}: {{email: {p}@example.com}}\n" for p in people)

    def policy(role: str = "USER", unlock: int = 7, colour: str = "#2266aa") -> str:
        return (f"users:\n{users}devices:\n"
                f"  batch: {{system: office, id: {SENTRY_LOCKS[batch]}, name: Team Room, colour: \"{colour}\", "
                f"unlock_duration: {unlock}}}\n"
                f"  single: {{system: office, id: {SENTRY_LOCKS[single]}}}\n"
                f"permissions:\n  - users: [{', '.join(people)}]\n    devices: [batch, single]\n    role: {role}\n"
                "    start: 2026-01-01T00:00:00Z\n    end: 2027-01-01T00:00:00Z\n")
    h.write(policy())
    h.apply()
    # A lost answer to a signed setting: the lock is read to see whether it landed.
    h.sim.faults.add("POST", r"/execute$", commit=True, lost="timeout")
    h.write(policy(role="ADMIN", unlock=9, colour="#3377bb"))
    h.apply()
    run.events(h.session(), "office", "batch")
    h.write(policy(role="ADMIN", unlock=9, colour="#3377bb").replace(f"[{', '.join(people)}]", "[alice]"))
    h.apply()
    assert not h.plan().has_changes
    kinds = {jwt.decode(r.content, options={"verify_signature": False})["operation"]["type"]
             for r in recorder.requests if r.url.path.endswith("/execute")}
    assert kinds == {"ADD_USER", "BATCH_ADD_USER", "REMOVE_USER", "MUTATE_SETTING"}
    assert conform(recorder, SENTRY_TABLE) == {op.name for op in SENTRY_TABLE}


# --------------------------------------------------------------------------------------- SmartphoneKey
# The vendor's own OpenAPI 3.1 (check_request / check_response in test_spkey.py validate with jsonschema).

SPKEY_OPERATIONS = {("GET", "/locks/{id}/temp-keys"), ("POST", "/locks/{id}/create-temp-key"),
                    ("POST", "/locks/{id}/update-temp-key"), ("POST", "/locks/{id}/delete-temp-key"),
                    ("GET", "/users/by-email")}


def test_spkey_requests_follow_the_openapi(tmp_path):
    h = VendorHarness(tmp_path, GUESTS)
    h.write(keys_yaml())
    h.sim.faults.add("POST", r"/create-temp-key$", commit=True, lost="timeout")   # a lost create: looked up
    h.apply()
    h.write(keys_yaml(end="2026-11-30T18:00:00Z", delivery=False))                # an update and a delete
    h.apply()
    assert not h.plan().has_changes
    seen = set()
    for request, response in h.exchanges:
        seen.add((request.method, check_request(request)))
        if response is not None:
            assert response.status_code in (200, 404), f"{request.method} {request.url.path}: {response.status_code}"
            check_response(request, response)
    assert seen == SPKEY_OPERATIONS
    assert any(r.url.path == f"/locks/{FLAT3}/temp-keys" for r, _ in h.exchanges)


# ---------------------------------------------------------------------------------------------- tables

@pytest.mark.parametrize("table, paths", [
    (ABLOY_TABLE, abloy.PATHS), (UNLOC_TABLE, unloc.PATHS), (PARTNER_TABLE, unloc_partner.PATHS),
    (SENTRY_TABLE, sentry.PATHS),
    ([Operation(f"{m} {p}", m, p) for m, p in SPKEY_OPERATIONS], spkey.PATHS),
], ids=["abloy", "unloc", "unloc-partner", "sentry", "spkey"])
def test_every_endpoint_of_a_provider_has_a_documented_row(table, paths):
    covers(table, paths)
