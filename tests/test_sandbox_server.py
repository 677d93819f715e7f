"""Simulators served over real sockets on 127.0.0.1, under path prefixes, with lost responses."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Iterator

import httpx
import pytest

from reconciler.sandbox.abloy import MEDIA_TYPE, SEED_DEVICES, AbloySimulator
from reconciler.sandbox.server import SandboxHTTPServer, make_server, start_in_thread

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


@pytest.fixture
def sims() -> dict[str, AbloySimulator]:
    return {"/abloy-keyless": AbloySimulator(clock=lambda: NOW), "/branch": AbloySimulator(clock=lambda: NOW)}


@pytest.fixture
def served(sims: dict[str, AbloySimulator]) -> Iterator[tuple[SandboxHTTPServer, str]]:
    server, base_url = start_in_thread("127.0.0.1", 0, {prefix: sim.handle for prefix, sim in sims.items()})
    with server:
        yield server, base_url


def logged_in(sim: AbloySimulator, base_url: str) -> httpx.Client:
    headers = {"Accept": MEDIA_TYPE, "X-Api-Key": sim.credentials["api_key"]}
    creds = sim.credentials
    token = httpx.post(f"{base_url}/login", headers=headers, timeout=5,
                       json={"userId": creds["user_id"], "accessKey": creds["access_key"]}).json()["token"]
    return httpx.Client(base_url=base_url, headers={**headers, "Authorization": f"Bearer {token}"}, timeout=5)


def test_login_and_list_over_a_socket(served: tuple[SandboxHTTPServer, str], sims: dict[str, AbloySimulator]) -> None:
    server, base_url = served
    assert base_url.startswith("http://127.0.0.1:") and server.urls()["/abloy-keyless"] == base_url + "/abloy-keyless"
    sim = sims["/abloy-keyless"]
    with logged_in(sim, base_url + "/abloy-keyless") as client:
        page = client.get("/locking-device", params={"limit": 5})
        assert page.status_code == 200
        assert page.headers["content-type"] == MEDIA_TYPE
        rest = client.get("/locking-device", params={"limit": 5, "next-page-token": page.json()["nextPageToken"]})
        names = [d["name"] for d in page.json()["items"] + rest.json()["items"]]
        assert names == list(SEED_DEVICES)
        assert client.post("/user", json={"role": "USER"}).status_code == 201
        assert client.delete(f"/locking-device/{SEED_DEVICES['Gym']}").status_code == 204
        problem = client.get(f"/locking-device/{SEED_DEVICES['Gym']}")
        assert problem.status_code == 404 and problem.headers["content-type"] == "application/problem+json"
    assert [r.path for r in sim.requests][-2:] == [f"/locking-device/{SEED_DEVICES['Gym']}"] * 2
    assert sims["/branch"].requests == []          # mounts are independent


def test_refusals_keep_their_status_and_headers(served: tuple[SandboxHTTPServer, str]) -> None:
    _, base_url = served
    response = httpx.get(f"{base_url}/abloy-keyless/user", headers={"Accept": MEDIA_TYPE}, timeout=5)
    assert response.status_code == 403 and response.json()["status"] == 403
    response = httpx.put(f"{base_url}/abloy-keyless/user", timeout=5,
                         headers={"Accept": MEDIA_TYPE, "X-Api-Key": AbloySimulator().credentials["api_key"]})
    assert response.status_code == 405 and response.headers["allow"] == "GET, POST"


def test_lost_response_closes_the_connection(served: tuple[SandboxHTTPServer, str],
                                             sims: dict[str, AbloySimulator]) -> None:
    _, base_url = served
    sim = sims["/abloy-keyless"]
    with logged_in(sim, base_url + "/abloy-keyless") as client:
        sim.faults.add("POST", r"^/locking-device$", commit=True)
        with pytest.raises(httpx.TransportError):
            client.post("/locking-device", json={"name": "Side Door"})
        names = [d["name"] for d in client.get("/locking-device", params={"limit": 100}).json()["items"]]
        assert "Side Door" in names                 # it happened; only the answer was lost
        sim.faults.add("GET", r"^/user$", commit=True, lost="502")
        assert client.get("/user").status_code == 502


def test_unknown_mount_is_404(served: tuple[SandboxHTTPServer, str]) -> None:
    _, base_url = served
    for path in ("/unloc/locks", "/abloy-keylessX/login", "/"):
        response = httpx.get(base_url + path, timeout=5)
        assert response.status_code == 404 and response.json()["status"] == 404


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "example.com", "::"])
def test_refuses_non_loopback_hosts(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        make_server(host, 0, {})


def test_localhost_is_served_on_127_0_0_1() -> None:
    sim = AbloySimulator()
    server, base_url = start_in_thread("localhost", 0, {"abloy-keyless": sim.handle})
    with server:
        assert base_url.startswith("http://127.0.0.1:")
        assert httpx.get(base_url + "/abloy-keyless/user", timeout=5).status_code == 403
