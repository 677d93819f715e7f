"""The provider base class owns the workflow: it builds the HTTP client from the vendor's hooks (headers,
login, error description, secrets), closes it, and dispatches apply through a handler table that is
checked when the class is defined."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from reconciler.errors import VendorError
from reconciler.plan import Action, Change
from reconciler.providers.base import Provider, ReadResult
from reconciler.providers.http import HttpClient
from reconciler.providers.spkey import SpkeyProvider
from reconciler.resources import Resource
from reconciler.secret import Secret
from reconciler.state.local import LocalState

NOW = datetime(2026, 11, 22, 10, tzinfo=UTC)
KEY = "toy-api-key-0123456789"


class Toy(Provider):
    vendor = "toy"
    capabilities = SpkeyProvider.capabilities      # one credential: api_key
    default_url = "https://toy.test/api"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.logins = 0
        self.made: list[str] = []

    def http_headers(self) -> dict[str, str]:
        return {"X-Toy-Key": self.credentials["api_key"].reveal()}

    def _login(self, http: HttpClient) -> tuple[dict[str, str], float | None]:
        self.logins += 1
        token = http.request("POST", "/login", authenticated=False).json()["token"]
        self.redactor.add(token)
        return {"Authorization": f"Bearer {token}"}, None

    def describe_error(self, response: httpx.Response) -> str:
        return f"{response.status_code} toy says: {response.json()['why']}"

    def read_live(self, desired: list[Resource]) -> ReadResult:
        return ReadResult()

    def make_door(self, want: Resource) -> dict[str, Any]:
        self.http.request("POST", "/doors", json={"name": want.name}, idempotent=False)
        self.made.append(want.name)
        return {"id": f"door-{want.name}"}

    def drop_door(self, live: Resource) -> None:
        self.http.request("DELETE", f"/doors/{live.id}")

    handlers = {(Action.CREATE, "device"): make_door, (Action.DELETE, "device"): drop_door}


def _toy(tmp_path, handle) -> Toy:
    return Toy("toy", url=None, credentials={"api_key": Secret(KEY)}, settings={},
               state=LocalState(tmp_path / "state.json"), clock=lambda: NOW, transport=httpx.MockTransport(handle),
               sleep=lambda s: None)


def test_the_client_is_built_from_the_hooks_and_closed(tmp_path) -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/api/login":
            return httpx.Response(200, json={"token": "tok-secret-42"})
        if request.url.path == "/api/doors/door-x":
            return httpx.Response(403, json={"why": "tok-secret-42 may not delete doors"})
        return httpx.Response(201, json={})

    toy = _toy(tmp_path, handle)
    toy.read([])
    toy.commit_reads()
    toy.apply(Change(Action.CREATE, Resource("toy", "device", "front", {}), None))
    assert toy.made == ["front"] and toy.ids["toy/device/front"] == "door-front"
    assert all(r.headers["X-Toy-Key"] == KEY for r in seen)
    assert seen[-1].headers["Authorization"] == "Bearer tok-secret-42" and toy.logins == 1
    with pytest.raises(VendorError) as refused:
        toy.apply(Change(Action.DELETE, None, Resource("toy", "device", "x", {}, id="door-x")))
    message = str(refused.value)
    assert "403 toy says: *** may not delete doors" in message    # the hook's words, the token redacted
    assert "tok-secret-42" not in message
    toy.close()
    assert toy.http.client.is_closed


def test_what_a_vendor_cannot_do_is_a_vendor_error(tmp_path) -> None:
    toy = _toy(tmp_path, lambda request: httpx.Response(200, json={}))
    live = Resource("toy", "device", "front", {"name": "a"}, id="door-front")
    with pytest.raises(VendorError, match="toy cannot update a device"):
        toy.apply(Change(Action.UPDATE, Resource("toy", "device", "front", {"name": "b"}), live, ("name",)))
    toy.close()


def test_a_wrong_table_fails_when_the_class_is_defined() -> None:
    with pytest.raises(TypeError, match="update handler takes 3 argument"):
        class WrongArity(Toy):
            def rename(self, want: Resource) -> None: ...
            handlers = {(Action.UPDATE, "device"): rename}
    with pytest.raises(TypeError, match="is not \\(Action.CREATE/UPDATE/DELETE, kind\\)"):
        class WrongVerb(Toy):
            handlers = {(Action.REPLACE, "device"): Toy.make_door}
    with pytest.raises(TypeError, match="is not a method of"):
        class Stranger(Toy):
            handlers = {(Action.CREATE, "device"): lambda self, want: None}


def test_a_subclass_inherits_the_table_and_its_overrides_are_called(tmp_path) -> None:
    class Louder(Toy):
        def make_door(self, want: Resource) -> dict[str, Any]:
            self.made.append("loud")
            return {"id": "loud"}

    louder = Louder("toy", url=None, credentials={"api_key": Secret(KEY)}, settings={},
                    state=LocalState(tmp_path / "state.json"), clock=lambda: NOW,
                    transport=httpx.MockTransport(lambda request: httpx.Response(200, json={})))
    louder.apply(Change(Action.CREATE, Resource("toy", "device", "front", {}), None))
    assert louder.made == ["loud"]
    louder.close()


def test_a_class_without_a_table_gets_one_from_its_methods() -> None:
    class Conventional(Toy):
        handlers = {}

    class Named(Provider):
        vendor = "named"
        capabilities = SpkeyProvider.capabilities
        default_url = "https://named.test"

        def create_user(self, want: Resource) -> None: ...
        def delete_user(self, live: Resource) -> None: ...

    assert Named._dispatch == {(Action.CREATE, "user"): "create_user", (Action.DELETE, "user"): "delete_user"}
    assert Conventional._dispatch == {}
