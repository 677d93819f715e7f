"""Gatehouse, a sixth vendor written outside reconciler: accounts with an email and a name, its own grant kind
(`access_grant`) with its own attribute (`pin_required`), and cursor paging.

Registered by its package metadata alone (`pyproject.toml`: entry point `gatehouse` in `reconciler.vendors`);
nothing under `reconciler/` names it. The declaration is the provider class's `capabilities`:

- accounts: `Kind.USER` declares the user fields `email` and `name`, so the policy's `email:` and `name:` of
  each person reach `create_user` (and a change of either is an update);
- the grant: `access_grant`, a kind of its own (`KindDef`), with `start`/`end` (the window) and
  `pin_required`, declared `access=(True, False)`: true is the narrower value, so turning it off is planned
  as granting access (and on as revoking it, which the mass-revoke guard counts);
- devices are adopted doors (`id: door-…`), never created.

The API is in `gatehouse/simulator.py` (also its sandbox: `url: sandbox`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NotRequired

from pydantic import TypeAdapter
from typing_extensions import TypedDict

from reconciler.plan import Action
from reconciler.providers.answers import LENIENT, Id, created, parse
from reconciler.providers.base import Provider, ReadResult
from reconciler.resources import (
    ACCESS_END,
    ACCESS_START,
    Attribute,
    Capabilities,
    Kind,
    KindDef,
    KindSchema,
    Resource,
    address_of,
    unknown_name,
)

ACCESS_GRANT = "access_grant"
GRANT = KindDef(ACCESS_GRANT, grant=True, owners=(Kind.USER, Kind.DEVICE), depends_on=(Kind.USER, Kind.DEVICE))
PAGE = 100


class _Door(TypedDict):
    __pydantic_config__ = LENIENT  # type: ignore[misc]
    id: Id
    name: str


class _User(TypedDict):
    __pydantic_config__ = LENIENT  # type: ignore[misc]
    id: Id
    email: str
    name: str


class _Grant(TypedDict):
    __pydantic_config__ = LENIENT  # type: ignore[misc]
    id: Id
    user_id: Id
    door_id: Id
    starts_at: str | None
    ends_at: str | None
    pin_required: bool


class _DoorPage(TypedDict):
    data: list[_Door]
    next_cursor: NotRequired[str | None]      # absent or null on the last page


class _UserPage(TypedDict):
    data: list[_User]
    next_cursor: NotRequired[str | None]


class _GrantPage(TypedDict):
    data: list[_Grant]
    next_cursor: NotRequired[str | None]


DOORS, USERS, GRANTS = TypeAdapter(_DoorPage), TypeAdapter(_UserPage), TypeAdapter(_GrantPage)
USER, GRANT_ANSWER = TypeAdapter(_User), TypeAdapter(_Grant)


class GatehouseProvider(Provider):
    capabilities = Capabilities(
        vendor="gatehouse", grant_kind=ACCESS_GRANT, kinds=(GRANT,), user_accounts=True,
        creates_devices=False, device_fields=frozenset(), device_id_pattern=r"door-[0-9a-z]+",
        credentials=frozenset({"api_token"}),
        attributes={
            Kind.USER: KindSchema({"email": Attribute(str, required=True), "name": Attribute(str, required=True)}),
            ACCESS_GRANT: KindSchema({
                "start": Attribute(str, access=ACCESS_START),
                "end": Attribute(str, default=None, access=ACCESS_END),
                "pin_required": Attribute(bool, default=True, access=(True, False)),   # off: wider access
            }),
        })
    vendor = capabilities.vendor
    default_url = "https://api.gatehouse.example"
    simulator = "gatehouse.simulator:GatehouseSimulator"
    credential_variables: ClassVar[Mapping[str, str]] = {"api_token": "GATEHOUSE_API_TOKEN"}

    def http_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credentials['api_token'].reveal()}"}

    # --- reading: every list is cursor-paged
    def _all(self, path: str, adapter: TypeAdapter[Any]) -> list[Any]:
        items: list[Any] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": PAGE, **({"cursor": cursor} if cursor else {})}
            page = parse(self.http.request("GET", path, params=params), adapter, self.name)
            items += page["data"]
            cursor = page.get("next_cursor")
            if not cursor:
                return items

    def _names(self, kind: str) -> dict[str, str]:
        """vendor id → policy name, for the objects of `kind` this system knows (policy `id`s and state)."""
        prefix = address_of(self.name, kind, "")
        return {i: a.removeprefix(prefix) for a, i in self.ids.items() if a.startswith(prefix)}

    def read_live(self, desired: list[Resource]) -> ReadResult:
        result = ReadResult()
        doors = {d["id"] for d in self._all("/v1/doors", DOORS)}
        devices = {i: n for i, n in self._names(Kind.DEVICE).items() if i in doors}
        result.resources += [Resource(self.name, Kind.DEVICE, n, {}, id=i) for i, n in devices.items()]
        users = self._names(Kind.USER)
        for user in self._all("/v1/users", USERS):
            name = users.get(user["id"])
            result.resources.append(Resource(self.name, Kind.USER, name or unknown_name(user["id"]),
                                             {"email": user["email"], "name": user["name"]}, id=user["id"],
                                             managed=name is not None))
        grants = self._names(ACCESS_GRANT)
        for grant in self._all("/v1/grants", GRANTS):
            name = grants.get(grant["id"])
            if name is None:   # not ours: named by its person and door when the policy knows both
                user, door = users.get(grant["user_id"]), devices.get(grant["door_id"])
                name = f"{user}/{door}" if user and door else unknown_name(grant["id"])
            attributes: dict[str, Any] = {"end": grant["ends_at"], "pin_required": grant["pin_required"]}
            if grant["starts_at"] is not None:
                attributes["start"] = grant["starts_at"]
            result.resources.append(Resource(self.name, ACCESS_GRANT, name, attributes, id=grant["id"],
                                             managed=grant["id"] in grants))
        return result

    # --- applying; a create's lost answer is looked up by its natural key before it is sent again
    def _find(self, path: str, adapter: TypeAdapter[Any], match: Callable[[Any], bool]) -> dict[str, Any] | None:
        found = [item for item in self._all(path, adapter) if match(item)]
        return {"id": found[0]["id"]} if found else None

    def create_user(self, desired: Resource) -> dict[str, Any]:
        body = {"email": desired.attributes.get("email"), "name": desired.attributes.get("name")}
        return self.create_checked(
            lambda: {"id": created(self.http.request("POST", "/v1/users", json=body), USER, self.name)["id"]},
            lambda: self._find("/v1/users", USERS, lambda u: u["email"].lower() == str(body["email"]).lower()))

    def update_user(self, desired: Resource, live: Resource, changed: tuple[str, ...]) -> None:
        self.http.request("PATCH", f"/v1/users/{live.id}", json={k: desired.attributes[k] for k in changed},
                          idempotent=True)

    def delete_user(self, live: Resource) -> None:
        self.http.request("DELETE", f"/v1/users/{live.id}", expect=(404,))

    def create_grant(self, desired: Resource) -> dict[str, Any]:
        person, door = desired.name.split("/")[:2]
        user_id = self.ids[address_of(self.name, Kind.USER, person)]
        door_id = self.ids[address_of(self.name, Kind.DEVICE, door)]
        body = {"user_id": user_id, "door_id": door_id, "starts_at": desired.attributes.get("start"),
                "ends_at": desired.attributes.get("end"), "pin_required": desired.attributes["pin_required"]}
        return self.create_checked(
            lambda: {"id": created(self.http.request("POST", "/v1/grants", json=body), GRANT_ANSWER,
                                   self.name)["id"]},
            lambda: self._find("/v1/grants", GRANTS, lambda g: (g["user_id"], g["door_id"]) == (user_id, door_id)))

    def update_grant(self, desired: Resource, live: Resource, changed: tuple[str, ...]) -> None:
        fields = {"start": "starts_at", "end": "ends_at", "pin_required": "pin_required"}
        self.http.request("PATCH", f"/v1/grants/{live.id}",
                          json={fields[k]: desired.attributes.get(k) for k in changed}, idempotent=True)

    def delete_grant(self, live: Resource) -> None:
        self.http.request("DELETE", f"/v1/grants/{live.id}", expect=(404,))

    # What apply calls for each (action, kind): the core's table names no kind of ours.
    handlers: ClassVar[Any] = {
        (Action.CREATE, Kind.USER): create_user, (Action.UPDATE, Kind.USER): update_user,
        (Action.DELETE, Kind.USER): delete_user,
        (Action.CREATE, ACCESS_GRANT): create_grant, (Action.UPDATE, ACCESS_GRANT): update_grant,
        (Action.DELETE, ACCESS_GRANT): delete_grant,
    }
