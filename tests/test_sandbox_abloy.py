"""The Abloy Keyless simulator refuses what the vendor refuses and keeps the vendor's asynchronous truths.

Driven through `httpx.MockTransport(sim.handle)`, the same seam the provider tests use.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Iterator

import httpx
import jwt
import pytest

from reconciler.sandbox.abloy import (
    GATEWAY_CLAIMING_CODES,
    MEDIA_TYPE,
    SEED_DEVICES,
    SEED_USERS,
    AbloySimulator,
    format_duration,
    parse_duration,
)

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
BASE_URL = "https://sandbox.test"


def make_client(sim: AbloySimulator, *, login: bool = True, base_url: str = BASE_URL) -> httpx.Client:
    headers = {"Accept": MEDIA_TYPE, "X-Api-Key": sim.credentials["api_key"]}
    if login:
        # a throwaway client: httpx refuses `with` on a client that has already sent a request
        with httpx.Client(transport=httpx.MockTransport(sim.handle), base_url=base_url, headers=headers) as c:
            headers["Authorization"] = f"Bearer {login_token(c, sim)}"
    return httpx.Client(transport=httpx.MockTransport(sim.handle), base_url=base_url, headers=headers)


def login_token(client: httpx.Client, sim: AbloySimulator) -> str:
    creds = sim.credentials
    response = client.post("/login", json={"userId": creds["user_id"], "accessKey": creds["access_key"]})
    assert response.status_code == 200, response.text
    return response.json()["token"]


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert set(body) == {"type", "title", "status", "detail"}
    assert body["status"] == status
    return body


@pytest.fixture
def sim() -> AbloySimulator:
    return AbloySimulator(clock=lambda: NOW)


@pytest.fixture
def client(sim: AbloySimulator) -> Iterator[httpx.Client]:
    with make_client(sim) as c:
        yield c


def create_user(client: httpx.Client, role: str = "USER") -> str:
    response = client.post("/user", json={"role": role})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def permission_body(user_id: str, device_id: str = SEED_DEVICES["Main Entrance"], **overrides: Any) -> dict[str, Any]:
    body = {"permissionType": "SINGLE_INTERVAL", "userId": user_id, "lockingDeviceId": device_id,
            "operationType": "OPEN", "operatingKeyValidityDuration": "P8D",
            "start": "2026-12-01T00:00:00Z", "end": "2026-12-31T23:59:59Z"}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def create_permission(client: httpx.Client, user_id: str, **overrides: Any) -> str:
    response = client.post("/permission", json=permission_body(user_id, **overrides))
    assert response.status_code == 201, response.text
    return response.json()["id"]


def all_items(client: httpx.Client, path: str, **params: Any) -> list[dict[str, Any]]:
    items, token = [], None
    while True:
        query = {**params, **({"next-page-token": token} if token else {})}
        body = client.get(path, params=query).json()
        items += body["items"]
        token = body.get("nextPageToken")
        if not token:
            return items


# ---------------------------------------------------------------------------------------- login, auth

def test_login_returns_a_jwt_whose_exp_clients_can_read(client: httpx.Client, sim: AbloySimulator) -> None:
    token = client.headers["Authorization"].removeprefix("Bearer ")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == sim.credentials["user_id"]
    assert claims["iat"] == int(NOW.timestamp())
    assert claims["exp"] == claims["iat"] + 3600


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/login"), ("GET", "/user"), ("GET", f"/locking-device/{SEED_DEVICES['Gym']}"),
    ("DELETE", f"/permission/{SEED_DEVICES['Gym']}"), ("GET", "/gateway-device-association")])
@pytest.mark.parametrize("api_key", [None, "wrong-key"])
def test_missing_or_wrong_api_key_is_403(client: httpx.Client, method: str, path: str, api_key: str | None) -> None:
    del client.headers["X-Api-Key"]
    headers = {"X-Api-Key": api_key} if api_key else {}
    response = client.request(method, path, headers=headers, json={} if method == "POST" else None)
    assert_problem(response, 403)


@pytest.mark.parametrize("accept", [None, "application/json", "*/*",
                                    "application/vnd.assaabloy.keyless.administration-1+json"])
def test_accept_must_be_the_vendor_media_type(client: httpx.Client, accept: str | None) -> None:
    client.headers.pop("accept")
    headers = {"Accept": accept} if accept else {}
    assert_problem(client.get("/user", headers=headers), 406)
    assert_problem(client.post("/login", headers=headers, json={}), 406)


def test_bearer_token_is_required_and_checked(sim: AbloySimulator, client: httpx.Client) -> None:
    good = client.headers["Authorization"]
    other = AbloySimulator(clock=lambda: NOW)
    with make_client(other) as other_client:
        foreign = other_client.headers["Authorization"]
    for bad in ["", "Bearer", "Bearer not-a-jwt", good.replace("Bearer", "Basic"), good[:-4] + "abcd", foreign]:
        assert_problem(client.get("/user", headers={"Authorization": bad}), 401)
    client.headers.pop("authorization")
    body = assert_problem(client.get("/permission"), 401)
    assert body["title"] == "Unauthorized"


def test_token_expires_by_the_simulator_clock(sim: AbloySimulator, client: httpx.Client) -> None:
    sim.advance(timedelta(seconds=3599))
    assert client.get("/user").status_code == 200
    sim.advance(timedelta(seconds=1))
    assert assert_problem(client.get("/user"), 401)["detail"] == "Token expired"
    client.headers["Authorization"] = f"Bearer {login_token(client, sim)}"
    assert client.get("/user").status_code == 200


def test_expire_tokens_hook_invalidates_issued_tokens(sim: AbloySimulator, client: httpx.Client) -> None:
    sim.expire_tokens()
    assert_problem(client.get("/user"), 401)


def test_short_token_ttl(sim: AbloySimulator) -> None:
    short = AbloySimulator(clock=lambda: NOW, token_ttl=60)
    with make_client(short) as c:
        claims = jwt.decode(c.headers["Authorization"][7:], options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == 60


def test_login_with_wrong_credentials_is_401(client: httpx.Client, sim: AbloySimulator) -> None:
    creds = sim.credentials
    assert_problem(client.post("/login", json={"userId": creds["user_id"], "accessKey": "nope"}), 401)
    assert_problem(client.post("/login", json={"userId": SEED_USERS["contractor"], "accessKey": "x"}), 401)
    assert_problem(client.post("/login", json={"userId": creds["user_id"]}), 400)


def test_created_admin_can_log_in_and_user_role_cannot(client: httpx.Client) -> None:
    for role, status in (("ADMIN", 200), ("USER", 403)):
        created = client.post("/user", json={"role": role}).json()
        assert created["role"] == role and len(created["accessKey"]) >= 40
        response = client.post("/login", json={"userId": created["id"], "accessKey": created["accessKey"]})
        assert response.status_code == status


# ---------------------------------------------------------------------------------------- pagination

@pytest.mark.parametrize("limit", ["0", "101", "-1", "abc", "1.5", ""])
def test_limit_outside_1_to_100_is_400(client: httpx.Client, limit: str) -> None:
    assert_problem(client.get("/locking-device", params={"limit": limit}), 400)


def test_default_page_is_50_and_max_is_100(client: httpx.Client) -> None:
    for _ in range(120):
        create_user(client)
    assert len(client.get("/user").json()["items"]) == 50
    assert len(client.get("/user", params={"limit": 100}).json()["items"]) == 100


def test_pagination_across_250_permissions() -> None:
    sim = AbloySimulator(clock=lambda: NOW, seed=False)
    with make_client(sim) as client:
        user = create_user(client)
        device = client.post("/locking-device", json={"name": "Door"}).json()["id"]
        created = [create_permission(client, user, lockingDeviceId=device) for _ in range(250)]
        bodies = [client.get("/permission", params={"limit": 100}).json()]
        while "nextPageToken" in bodies[-1]:
            token = bodies[-1]["nextPageToken"]
            bodies.append(client.get("/permission", params={"limit": 100, "next-page-token": token}).json())
    pages = [body["items"] for body in bodies]
    assert [len(page) for page in pages] == [100, 100, 50]
    assert [item["id"] for page in pages for item in page] == created  # creation order, nothing twice


def test_paging_survives_deletes_between_pages(client: httpx.Client) -> None:
    user = create_user(client)
    ids = [create_permission(client, user) for _ in range(6)]
    first = client.get("/permission", params={"limit": 3}).json()
    client.delete(f"/permission/{ids[3]}")
    rest = client.get("/permission", params={"limit": 3, "next-page-token": first["nextPageToken"]}).json()
    seen = [i["id"] for i in first["items"] + rest["items"]]
    assert set(ids) - {ids[3]} <= set(seen) and len(seen) == len(set(seen))


def test_tampered_foreign_or_cross_list_page_token_is_400(client: httpx.Client) -> None:
    token = client.get("/locking-device", params={"limit": 2}).json()["nextPageToken"]
    assert client.get("/locking-device", params={"limit": 2, "next-page-token": token}).status_code == 200
    flipped = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    for bad in [flipped, "VHpVZEpDeVg1N2RYNFFoSWk4bkIycGVGWTZWRThqcQ==", "not base64!", ""]:
        assert_problem(client.get("/locking-device", params={"next-page-token": bad}), 400)
    assert_problem(client.get("/user", params={"next-page-token": token}), 400)
    assert_problem(client.get("/locking-device", params={"next-page-token": token,
                                                         "claiming-status": "CLAIMED"}), 400)


# ---------------------------------------------------------------------------------------- bodies

@pytest.mark.parametrize("phone", ["4790000001", "+0790000001", "+4", "+1234567890123456", "+47 9000 0001",
                                   "+47-90000001", 4790000001])
def test_invitation_phone_must_be_e164(client: httpx.Client, phone: Any) -> None:
    user = create_user(client)
    response = client.post("/operating-device-invitation",
                           json={"userId": user, "deliveryMechanism": "SMS", "phoneNumber": phone})
    assert_problem(response, 400)


def test_invitation_defaults_to_24_hours_and_respects_bounds(client: httpx.Client) -> None:
    user = create_user(client)
    body = {"userId": user, "deliveryMechanism": "SMS", "phoneNumber": "+4790000001"}
    created = client.post("/operating-device-invitation", json=body)
    assert created.status_code == 201
    assert created.json()["expirationDatetime"] == "2026-11-23T10:00:00Z"
    assert set(created.json()) == {"id", "expirationDatetime"}
    year = client.post("/operating-device-invitation", json={**body, "validityDuration": "P365D"})
    assert year.json()["expirationDatetime"] == "2027-11-22T10:00:00Z"
    for bad in ["PT0S", "P366D", "P1Y", "-PT1H", "tomorrow"]:
        assert_problem(client.post("/operating-device-invitation", json={**body, "validityDuration": bad}), 400)
    assert_problem(client.post("/operating-device-invitation", json={**body, "deliveryMechanism": "EMAIL"}), 400)
    assert_problem(client.post("/operating-device-invitation", json={**body, "format": "QR"}), 400)
    no_phone = {"userId": user, "deliveryMechanism": "SMS"}
    assert_problem(client.post("/operating-device-invitation", json=no_phone), 400)
    code = client.post("/operating-device-invitation", json={"userId": user, "deliveryMechanism": "NONE"})
    assert code.status_code == 201 and "invitationCode" in code.json()


def test_invitation_for_unknown_user_is_404(client: httpx.Client) -> None:
    body = {"userId": "00000000-0000-4000-8000-000000000000", "deliveryMechanism": "SMS",
            "phoneNumber": "+4790000001"}
    assert_problem(client.post("/operating-device-invitation", json=body), 404)


@pytest.mark.parametrize(("value", "ok"), [
    ("P1D", True), ("P31D", True), ("P8D", True), ("PT24H", True), ("P1DT12H", True), ("PT744H", True),
    ("PT23H59M", False), ("P32D", False), ("P0D", False), ("PT745H", False), ("P1W", False), ("P1M", False),
    ("-P1D", False), ("P-1D", False), ("8 days", False), ("P", False), ("PT", False), (8, False)])
def test_operating_key_validity_is_p1d_to_p31d(client: httpx.Client, value: Any, ok: bool) -> None:
    user = create_user(client)
    response = client.post("/permission", json=permission_body(user, operatingKeyValidityDuration=value))
    if ok:
        assert response.status_code == 201
        echoed = client.get(f"/permission/{response.json()['id']}").json()["operatingKeyValidityDuration"]
        assert parse_duration(echoed) == parse_duration(value)
    else:
        assert_problem(response, 400)


def test_durations_are_echoed_canonically(client: httpx.Client) -> None:
    assert format_duration(timedelta(hours=24)) == "P1D"
    assert format_duration(timedelta(hours=36)) == "P1DT12H"
    assert format_duration(timedelta(minutes=90)) == "PT1H30M"
    user = create_user(client)
    default = client.post("/permission", json=permission_body(user, operatingKeyValidityDuration=None))
    assert client.get(f"/permission/{default.json()['id']}").json()["operatingKeyValidityDuration"] == "P8D"


@pytest.mark.parametrize(("start", "end"), [
    ("2026-12-02T00:00:00Z", "2026-12-01T00:00:00Z"),        # end before start
    ("2026-12-01T00:00:00Z", "2026-12-01T00:00:00Z"),        # end equal to start
    ("2026-12-01T02:00:00+02:00", "2026-12-01T00:00:00Z"),   # equal instants in different zones
    ("2026-12-01", "2026-12-31T00:00:00Z"),                  # a date, not a date-time
    ("2026-12-01T00:00:00", "2026-12-31T00:00:00Z"),         # no offset
    ("next monday", "2026-12-31T00:00:00Z"),
])
def test_start_and_end_must_be_ordered_date_times(client: httpx.Client, start: str, end: str) -> None:
    user = create_user(client)
    assert_problem(client.post("/permission", json=permission_body(user, start=start, end=end)), 400)


def test_date_times_are_echoed_in_utc(client: httpx.Client) -> None:
    user = create_user(client)
    pid = create_permission(client, user, start="2026-12-01T08:00:00+02:00", end="2026-12-01T18:00:00.500Z")
    permission = client.get(f"/permission/{pid}").json()
    assert (permission["start"], permission["end"]) == ("2026-12-01T06:00:00Z", "2026-12-01T18:00:00.5Z")


@pytest.mark.parametrize("overrides", [
    {"permissionType": "RECURRING"}, {"permissionType": None}, {"operationType": "CLOSE"},
    {"operationType": "open"}, {"userId": "not-a-uuid"}, {"userId": 42}, {"extra": True},
    {"start": None}, {"lockingDeviceId": None},
])
def test_permission_body_is_strict(client: httpx.Client, overrides: dict[str, Any]) -> None:
    user = create_user(client)
    assert_problem(client.post("/permission", json=permission_body(user, **overrides)), 400)


def test_permission_refers_to_existing_user_and_device(client: httpx.Client) -> None:
    user = create_user(client)
    missing = "00000000-0000-4000-8000-000000000000"
    assert_problem(client.post("/permission", json=permission_body(missing)), 404)
    assert_problem(client.post("/permission", json=permission_body(user, lockingDeviceId=missing)), 404)
    pid = create_permission(client, user)
    assert_problem(client.put(f"/permission/{pid}", json=permission_body(missing)), 404)


def test_permission_put_replaces_everything_and_keeps_the_id(client: httpx.Client) -> None:
    user = create_user(client)
    pid = create_permission(client, user)
    new = permission_body(user, SEED_DEVICES["Archive"], operationType="UPDATE_TIME",
                          operatingKeyValidityDuration="P2D", end="2027-01-31T00:00:00Z")
    response = client.put(f"/permission/{pid}", json=new)
    assert response.status_code == 204 and response.content == b""
    assert client.get(f"/permission/{pid}").json() == {"id": pid, **new}
    assert_problem(client.put(f"/permission/{SEED_DEVICES['Gym']}", json=new), 404)


@pytest.mark.parametrize(("name", "ok"), [("A", True), ("x" * 255, True), ("", False), ("x" * 256, False),
                                          (None, False), (7, False)])
def test_locking_device_name_is_1_to_255_characters(client: httpx.Client, name: Any, ok: bool) -> None:
    response = client.post("/locking-device", json={"name": name})
    if ok:
        assert response.status_code == 201
        assert response.json() == {"id": response.json()["id"], "name": name, "claimingStatus": "UNCLAIMED"}
    else:
        assert_problem(response, 400)


def test_user_role_must_be_user_or_admin(client: httpx.Client) -> None:
    for bad in [{"role": "OWNER"}, {"role": "user"}, {}, {"role": "USER", "name": "x"}, ["USER"]]:
        assert_problem(client.post("/user", json=bad), 400)


@pytest.mark.parametrize("patch", [
    [{"op": "add", "path": "/name", "value": "X"}],
    [{"op": "test", "path": "/name", "value": "X"}],
    [{"op": "replace", "path": "/claimingStatus", "value": "CLAIMED"}],
    [{"op": "replace", "path": "/name", "value": ""}],
    [{"op": "replace", "path": "/name", "value": "x" * 256}],
    [{"op": "replace", "path": "/name"}],
    [{"op": "replace", "path": "/name", "value": "X", "from": "/a"}],
    {"op": "replace", "path": "/name", "value": "X"},
    [],
])
def test_json_patch_only_replaces_name(client: httpx.Client, patch: Any) -> None:
    url = f"/locking-device/{SEED_DEVICES['Gym']}"
    response = client.patch(url, json=patch, headers={"Content-Type": "application/json-patch+json"})
    assert_problem(response, 400)
    assert client.get(url).json()["name"] == "Gym"


def test_json_patch_renames(client: httpx.Client) -> None:
    url = f"/locking-device/{SEED_DEVICES['Gym']}"
    patch = [{"op": "replace", "path": "/name", "value": "Fitness Room"}]
    response = client.patch(url, json=patch, headers={"Content-Type": "application/json-patch+json"})
    assert response.status_code == 204
    assert client.get(url).json()["name"] == "Fitness Room"
    assert_problem(client.patch(url, json=patch), 415)   # httpx sends application/json


def test_wrong_content_type_is_415(client: httpx.Client) -> None:
    assert_problem(client.post("/user", content=b'{"role": "USER"}', headers={"Content-Type": "text/plain"}), 415)
    assert_problem(client.post("/user", content=b'{"role": "USER"}'), 415)
    assert_problem(client.post("/user", content=b'{"role": "USER"}',
                               headers={"Content-Type": "application/json-patch+json"}), 415)
    ok = client.post("/user", content=b'{"role": "USER"}', headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 201
    assert_problem(client.post("/user", content=b"{not json", headers={"Content-Type": "application/json"}), 400)


def test_unknown_ids_paths_and_methods(client: httpx.Client) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    for path in ["/user", "/locking-device", "/permission", "/gateway-device", "/gateway-device-association"]:
        body = assert_problem(client.get(f"{path}/{missing}"), 404)
        assert body["detail"] == "Resource not found"
        assert_problem(client.delete(f"{path}/{missing}"), 404)
    assert_problem(client.delete(f"/operating-device/{missing}"), 404)
    assert_problem(client.delete(f"/operating-device-invitation/{missing}"), 404)
    assert_problem(client.get("/user/not-a-uuid"), 400)
    assert_problem(client.get("/offline-key"), 404)
    response = client.put("/user", json={})
    assert_problem(response, 405)
    assert response.headers["allow"] == "GET, POST"


# ---------------------------------------------------------------------------------- gateways, conflicts

def claim(client: httpx.Client, code: str = GATEWAY_CLAIMING_CODES[0]) -> dict[str, Any]:
    response = client.post("/gateway-device", json={"claimingCode": code})
    assert response.status_code == 201, response.text
    return response.json()


def test_gateway_claim_and_activation(client: httpx.Client, sim: AbloySimulator) -> None:
    gateway = claim(client)
    assert gateway["activationStatus"] == "PENDING_ACTIVATION"
    assert gateway["creationDatetime"] == "2026-11-22T10:00:00Z"
    assert gateway["serialNumber"].startswith("BGWA")
    assert_problem(client.post("/gateway-device", json={"claimingCode": GATEWAY_CLAIMING_CODES[0]}), 409)
    assert_problem(client.post("/gateway-device", json={"claimingCode": "AAAA-BBBB"}), 409)
    sim.advance(timedelta(seconds=30))
    activated = client.get(f"/gateway-device/{gateway['id']}").json()
    assert activated["activationStatus"] == "ACTIVATED"
    assert activated["activationDatetime"] == "2026-11-22T10:00:30Z"


def test_at_most_six_associations_per_gateway_and_no_duplicates(client: httpx.Client) -> None:
    # Document 002: "The Keyless Platform currently allows 6 associations per gateway device." The policy
    # stays within 5 (DESIGN), so the sandbox refuses only what the vendor refuses: a seventh.
    gateway = claim(client)["id"]
    devices = list(SEED_DEVICES.values())
    for device in devices[:6]:
        response = client.post("/gateway-device-association",
                               json={"gatewayDeviceId": gateway, "lockingDeviceId": device})
        assert response.status_code == 201
        assert set(response.json()) == {"id", "gatewayDeviceId", "lockingDeviceId", "creationDatetime"}
    seventh = {"gatewayDeviceId": gateway, "lockingDeviceId": devices[6]}
    assert_problem(client.post("/gateway-device-association", json=seventh), 409)
    duplicate = {"gatewayDeviceId": gateway, "lockingDeviceId": devices[0]}
    assert_problem(client.post("/gateway-device-association", json=duplicate), 409)
    other = claim(client, GATEWAY_CLAIMING_CODES[1])["id"]
    assert client.post("/gateway-device-association",
                       json={"gatewayDeviceId": other, "lockingDeviceId": devices[0]}).status_code == 201
    assert len(client.get("/gateway-device-association", params={"gateway-device-id": gateway}).json()["items"]) == 6
    unknown = {"gatewayDeviceId": "00000000-0000-4000-8000-000000000000", "lockingDeviceId": devices[0]}
    assert_problem(client.post("/gateway-device-association", json=unknown), 404)


def test_deleting_a_gateway_removes_its_associations_and_frees_the_code(client: httpx.Client) -> None:
    gateway = claim(client)["id"]
    client.post("/gateway-device-association",
                json={"gatewayDeviceId": gateway, "lockingDeviceId": SEED_DEVICES["Gym"]})
    assert client.delete(f"/gateway-device/{gateway}").status_code == 204
    assert client.get("/gateway-device-association").json()["items"] == []
    assert claim(client)["id"] != gateway


# ---------------------------------------------------------------------------------- cascades, purge

def test_deleting_a_user_removes_permissions_devices_and_invitations(client: httpx.Client, sim: AbloySimulator) -> None:
    user, bystander = create_user(client), create_user(client)
    invite = {"userId": user, "deliveryMechanism": "SMS", "phoneNumber": "+4790000001"}
    accepted = client.post("/operating-device-invitation", json=invite).json()["id"]
    pending = client.post("/operating-device-invitation", json=invite).json()["id"]
    phone = sim.accept_invitation(accepted)
    assert client.get("/operating-device", params={"user-id": user}).json()["items"] == [{"id": phone, "userId": user}]
    assert_problem(client.delete(f"/operating-device-invitation/{accepted}"), 409)
    with pytest.raises(ValueError):
        sim.accept_invitation(pending)   # one operating device per user
    mine = [create_permission(client, user, lockingDeviceId=d) for d in list(SEED_DEVICES.values())[:3]]
    theirs = create_permission(client, bystander)

    assert client.delete(f"/user/{user}").status_code == 204

    ids = {p["id"] for p in all_items(client, "/permission")}
    assert theirs in ids and not ids & set(mine)
    assert client.get("/operating-device", params={"user-id": user}).json()["items"] == []
    assert_problem(client.delete(f"/operating-device-invitation/{pending}"), 404)
    assert_problem(client.get(f"/user/{user}"), 404)


def test_revoking_invitations_and_deleting_operating_devices(client: httpx.Client, sim: AbloySimulator) -> None:
    user = create_user(client)
    invite = {"userId": user, "deliveryMechanism": "SMS", "phoneNumber": "+4790000001"}
    first = client.post("/operating-device-invitation", json=invite).json()["id"]
    assert client.delete(f"/operating-device-invitation/{first}").status_code == 204
    with pytest.raises(KeyError):
        sim.accept_invitation(first)
    phone = sim.accept_invitation(client.post("/operating-device-invitation", json=invite).json()["id"])
    assert client.delete(f"/operating-device/{phone}").status_code == 204
    legacy = client.get("/operating-device", params={"user-id": SEED_USERS["contractor"]}).json()["items"][0]
    assert_problem(client.delete(f"/operating-device/{legacy['id']}"), 409)


def test_deleting_a_locking_device_removes_its_permissions_and_associations(client: httpx.Client) -> None:
    user = create_user(client)
    device = client.post("/locking-device", json={"name": "Temp"}).json()["id"]
    gone = create_permission(client, user, lockingDeviceId=device)
    kept = create_permission(client, user)
    gateway = claim(client)["id"]
    client.post("/gateway-device-association", json={"gatewayDeviceId": gateway, "lockingDeviceId": device})
    assert client.delete(f"/locking-device/{device}").status_code == 204
    ids = {p["id"] for p in all_items(client, "/permission")}
    assert kept in ids and gone not in ids
    assert client.get("/gateway-device-association").json()["items"] == []


def test_cannot_delete_the_authenticated_admin(client: httpx.Client, sim: AbloySimulator) -> None:
    assert_problem(client.delete(f"/user/{sim.credentials['user_id']}"), 409)


def test_past_permissions_vanish_14_days_after_end(client: httpx.Client, sim: AbloySimulator) -> None:
    user = create_user(client)
    pid = create_permission(client, user, start="2026-11-01T00:00:00Z", end="2026-11-23T10:00:00Z")
    sim.advance(timedelta(days=15))                     # end + 14 days exactly: still listed
    client.headers["Authorization"] = f"Bearer {login_token(client, sim)}"
    assert client.get(f"/permission/{pid}").status_code == 200
    sim.advance(timedelta(seconds=1))
    assert_problem(client.get(f"/permission/{pid}"), 404)
    assert pid not in {p["id"] for p in all_items(client, "/permission")}


def test_claim_locking_device_hook_and_filters(client: httpx.Client, sim: AbloySimulator) -> None:
    device = client.post("/locking-device", json={"name": "Side Door"}).json()["id"]
    unclaimed = client.get("/locking-device", params={"claiming-status": "UNCLAIMED"}).json()["items"]
    assert [d["id"] for d in unclaimed] == [device]
    serial = sim.claim_locking_device(device, serial="BPLAD999999")
    claimed = client.get("/locking-device", params={"serial-number": serial}).json()["items"]
    assert [d["id"] for d in claimed] == [device] and claimed[0]["claimingStatus"] == "CLAIMED"
    assert len(all_items(client, "/locking-device", **{"claiming-status": "CLAIMED"})) == 9
    assert_problem(client.get("/locking-device", params={"claiming-status": "claimed"}), 400)


def test_seed_data(client: httpx.Client) -> None:
    devices = all_items(client, "/locking-device")
    assert {d["name"]: d["id"] for d in devices} == SEED_DEVICES
    assert all(d["serialNumber"].startswith("BPLAD") and "operationalCertificate" in d for d in devices)
    users = all_items(client, "/user")
    assert {u["id"] for u in users if u["role"] == "USER"} == set(SEED_USERS.values())
    assert GATEWAY_CLAIMING_CODES[0] == "2K7H-ASR3" and len(GATEWAY_CLAIMING_CODES) == 4
    log = client.get("/locking-device-audit-log",
                     params={"locking-device-id": SEED_DEVICES["Main Entrance"], "sort-direction": "DESC"}).json()
    assert [e["eventName"] for e in log["items"]] == ["lock", "unlock"]
    assert_problem(client.get("/locking-device-audit-log", params={"sort-direction": "UP"}), 400)


# ---------------------------------------------------------------------------------- rate limit, faults

def test_rate_limit_answers_429_with_retry_after() -> None:
    ticks = [100.0]
    sim = AbloySimulator(clock=lambda: NOW, rate_limit=3, monotonic=lambda: ticks[0])
    with make_client(sim) as client:               # the login is request 1
        assert client.get("/user").status_code == 200
        assert client.get("/user").status_code == 200
        limited = client.get("/user")
        assert_problem(limited, 429)
        assert limited.headers["Retry-After"] == "1"
        ticks[0] += 1.0
        assert client.get("/user").status_code == 200


def test_fault_with_commit_performs_then_loses_the_response(client: httpx.Client, sim: AbloySimulator) -> None:
    user = create_user(client)
    sim.faults.add("POST", r"^/permission$", commit=True)
    with pytest.raises(httpx.ReadTimeout):
        client.post("/permission", json=permission_body(user))
    assert len([p for p in all_items(client, "/permission") if p["userId"] == user]) == 1
    sim.faults.add("POST", r"^/permission$", commit=True, lost="502")
    assert_problem(client.post("/permission", json=permission_body(user)), 502)
    assert len([p for p in all_items(client, "/permission") if p["userId"] == user]) == 2
    assert [r.fault for r in sim.requests if r.fault] == ["lost", "lost"]


def test_fault_without_commit_does_nothing(client: httpx.Client, sim: AbloySimulator) -> None:
    sim.faults.add("*", r"^/user$", status=503, times=2)
    assert_problem(client.post("/user", json={"role": "USER"}), 503)
    assert_problem(client.get("/user"), 503)
    assert client.get("/user").status_code == 200
    assert len(client.get("/user").json()["items"]) == 3
    sim.faults.add("DELETE", r"^/user/", lost="timeout")
    with pytest.raises(httpx.ReadTimeout):
        client.delete(f"/user/{SEED_USERS['contractor']}")
    assert client.get(f"/user/{SEED_USERS['contractor']}").status_code == 200


def test_injected_429_says_when_to_retry(client: httpx.Client, sim: AbloySimulator) -> None:
    sim.faults.add("GET", r"^/permission$", status=429)
    limited = client.get("/permission")
    assert_problem(limited, 429)
    assert limited.headers["Retry-After"] == "1"


def test_random_faults_are_seeded(sim: AbloySimulator, client: httpx.Client) -> None:
    def run() -> list[str]:
        outcomes = []
        sim.faults.random_rate(0.5, seed=7, statuses=(500, 503), commit_ratio=0.5)
        for _ in range(40):
            try:
                outcomes.append(str(client.get("/locking-device").status_code))
            except httpx.ReadTimeout:
                outcomes.append("lost")
        sim.faults.clear()
        return outcomes

    first, second = run(), run()
    assert first == second
    assert {"200", "lost"} <= set(first) and {"500", "503"} & set(first)


# ---------------------------------------------------------------------------------- persistence, log

def test_store_persists_across_instances(tmp_path: Path) -> None:
    store = tmp_path / ".reconciler" / "sandbox" / "hq.json"
    first = AbloySimulator(store, clock=lambda: NOW)
    later_reader = AbloySimulator(store, clock=lambda: NOW)     # loaded before the change below
    with make_client(first) as client:
        user = create_user(client)
        pid = create_permission(client, user)
        token = client.headers["Authorization"]
    assert [p.name for p in store.parent.iterdir()] == ["hq.json"]   # no temporary files left behind
    second = AbloySimulator(store, clock=lambda: NOW)
    with make_client(second, login=False) as client:
        client.headers["Authorization"] = token                    # same store, same signing secret
        assert client.get(f"/permission/{pid}").json()["userId"] == user
        assert len(all_items(client, "/user")) == 4                 # seeded once, not again
    with make_client(later_reader) as client:
        assert client.get(f"/user/{user}").status_code == 200       # picked up the other process's write
        assert client.delete(f"/user/{user}").status_code == 204
    with make_client(AbloySimulator(store, clock=lambda: NOW)) as client:
        assert_problem(client.get(f"/user/{user}"), 404)


def test_hooks_persist(tmp_path: Path) -> None:
    store = tmp_path / "hq.json"
    sim = AbloySimulator(store, clock=lambda: NOW)
    with make_client(sim) as client:
        device = client.post("/locking-device", json={"name": "New"}).json()["id"]
    sim.claim_locking_device(device)
    with make_client(AbloySimulator(store, clock=lambda: NOW)) as client:
        assert client.get(f"/locking-device/{device}").json()["claimingStatus"] == "CLAIMED"


def test_request_log_redacts_secrets_and_counts(client: httpx.Client, sim: AbloySimulator) -> None:
    create_user(client)
    login = sim.requests[0]
    assert (login.method, login.path, login.status) == ("POST", "/login", 200)
    assert login.body == {"userId": sim.credentials["user_id"], "accessKey": "REDACTED"}
    assert login.headers["x-api-key"] == "REDACTED"
    assert sim.requests[1].headers["authorization"] == "REDACTED"
    assert sim.credentials["api_key"] not in repr(sim.requests)
    client.get("/user", params={"limit": 5})
    assert sim.requests[-1].query == {"limit": "5"}
    assert sim.count("POST", "/user") == 1 and sim.count("*", "/") == 3 and sim.count("GET") == 1
    sim.reset_log()
    assert sim.requests == []


@pytest.mark.parametrize("prefix", ["", "/administration", "/abloy-keyless", "/a/b"])
def test_works_under_any_path_prefix(sim: AbloySimulator, prefix: str) -> None:
    with make_client(sim, base_url=BASE_URL + prefix) as client:
        assert client.get(f"/user/{SEED_USERS['contractor']}").status_code == 200
        assert client.get("/user").status_code == 200
    assert (sim.requests[-1].path, sim.requests[-1].full_path) == ("/user", f"{prefix}/user")
    assert sim.count("GET", "/user") == sim.count("GET", f"{prefix}/user") == 2


def test_explicit_base_path() -> None:
    sim = AbloySimulator(clock=lambda: NOW, base_path="/administration")
    with make_client(sim, base_url=BASE_URL + "/administration") as client:
        assert client.get("/user").status_code == 200
    with make_client(sim, base_url=BASE_URL, login=False) as client:
        assert_problem(client.post("/login", json={}), 404)


def test_concurrent_writes_are_all_kept(client: httpx.Client, sim: AbloySimulator) -> None:
    user = create_user(client)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(15):
                create_permission(client, user)
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ids = [p["id"] for p in all_items(client, "/permission", limit=100) if p["userId"] == user]
    assert len(ids) == len(set(ids)) == 120
