"""A sixth vendor, `toy`, that lives outside the reconciler package: one provider class and a tiny simulator.

`tests/test_registry.py` installs it the way a vendor package would be installed (a `toy_vendor-0.dist-info`
whose `entry_points.txt` registers `ToyProvider` under `reconciler.vendors`) and runs the CLI against it:
validate, plan and apply with `url: sandbox`, without any edit to `reconciler/`.

The toy API: `GET /sites/{site}/locks`, `GET /sites/{site}/keys`, `PUT /sites/{site}/keys/{id}` (the client
chooses the id, so a repeated create is harmless) and `DELETE /sites/{site}/keys/{id}`, every request with
`Authorization: Bearer <token>`.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import httpx
from pydantic import field_validator

from reconciler.providers.base import Provider, ReadResult
from reconciler.providers.settings import VendorSettings
from reconciler.resources import Capabilities, Kind, Resource, address_of, grant_schema_of, unknown_name

SANDBOX_TOKEN = "toy-sandbox-token"
SEED_LOCKS = {"lock-1": "Front door", "lock-2": "Back door"}


class ToySettings(VendorSettings):
    site: str                          # the site whose locks the keys open

    @field_validator("site")
    @classmethod
    def _site(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", value):
            raise ValueError(f"'{value}' is not a site code: lower-case letters, digits and -")
        return value


class ToyProvider(Provider):
    capabilities = Capabilities(vendor="toy", grant_kind=Kind.KEY, needs_email=True,
                                attributes={Kind.KEY: grant_schema_of(immutable_grants=True)},
                                creates_devices=False, device_fields=frozenset(),
                                device_id_pattern=r"lock-[0-9]+", credentials=frozenset({"token"}))
    vendor = capabilities.vendor
    default_url = "https://api.toy.invalid"
    settings_model = ToySettings
    settings: ToySettings
    simulator = "toy_vendor:ToySimulator"
    credential_variables: ClassVar[Mapping[str, str]] = {"token": "TOY_TOKEN"}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.site = self.settings.site

    def http_headers(self) -> dict[str, str]:     # the base class builds, shares and closes the client
        return {"Authorization": f"Bearer {self.credentials['token'].reveal()}"}

    def read_live(self, desired: list[Resource]) -> ReadResult:
        result = ReadResult()
        locks = self.http.request("GET", f"/sites/{self.site}/locks").json()["locks"]
        devices: dict[str, str] = {}          # lock id → device name
        for device in (r for r in desired if r.kind == Kind.DEVICE):
            lock = self.ids.get(device.address)
            if lock in locks:
                devices[lock] = device.name
                result.resources.append(Resource(self.name, Kind.DEVICE, device.name, {}, id=lock))
        people = {r.meta.get("email"): r.name.split("/")[0] for r in desired if r.kind == Kind.KEY}
        ours = {key_id: address for address, key_id in self.ids.items()}     # what state knows we made
        prefix = address_of(self.name, Kind.KEY, "")
        for key in self.http.request("GET", f"/sites/{self.site}/keys").json()["keys"]:
            user, device = people.get(key["email"]), devices.get(key["lock"])
            if key["id"] in ours and ours[key["id"]].startswith(prefix):
                name = ours[key["id"]].removeprefix(prefix)
            else:
                name = f"{user}/{device}" if user and device else unknown_name(key["id"])
            attributes = {"end": key["end"]} if key["start"] is None else {"start": key["start"], "end": key["end"]}
            result.resources.append(Resource(self.name, Kind.KEY, name, attributes, id=key["id"],
                                             managed=key["id"] in ours))
        return result

    def create_key(self, desired: Resource) -> dict[str, Any]:
        device = desired.name.split("/")[1]
        key_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"toy:{self.name}/{desired.name}@{desired.attributes}"))
        body = {"lock": self.ids[address_of(self.name, Kind.DEVICE, device)], "email": desired.meta["email"],
                "start": desired.attributes.get("start"), "end": desired.attributes.get("end")}
        self.http.request("PUT", f"/sites/{self.site}/keys/{key_id}", json=body, idempotent=True)
        return {"id": key_id}

    def delete_key(self, live: Resource) -> None:
        self.http.request("DELETE", f"/sites/{self.site}/keys/{live.id}", expect=(404,))


class ToySimulator:
    """The toy API in memory, kept in one JSON file between CLI runs."""

    credentials: ClassVar[dict[str, str]] = {"token": SANDBOX_TOKEN}

    def __init__(self, store_path: Path | None = None, *, clock: Callable[[], datetime] | None = None,
                 rate_limit: int | None = None):
        self.path = store_path
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {"vendor": "toy", "sites": {"main": {"locks": dict(SEED_LOCKS), "keys": {}}}}
        if store_path is not None and store_path.exists():
            data = json.loads(store_path.read_text())
            if data.get("vendor") != "toy":
                raise ValueError("not a toy store")
            self.data = data

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.headers.get("Authorization") != f"Bearer {SANDBOX_TOKEN}":
            return httpx.Response(401, json={"error": "unknown token"})
        match = re.fullmatch(r"/sites/([^/]+)/(locks|keys)(?:/([^/]+))?", request.url.path)
        with self.lock:
            site = self.data["sites"].get(match.group(1)) if match else None
            if match is None or site is None:
                return httpx.Response(404, json={"error": "no such site or path"})
            what, key_id = match.group(2), match.group(3)
            if request.method == "GET" and key_id is None:
                if what == "locks":
                    return httpx.Response(200, json={"locks": site["locks"]})
                keys = [{"id": i, **k} for i, k in sorted(site["keys"].items())]
                return httpx.Response(200, json={"keys": keys})
            if what != "keys" or key_id is None:
                return httpx.Response(405, json={"error": "method not allowed"})
            if request.method == "PUT":
                body = json.loads(request.content)
                if body.get("lock") not in site["locks"] or "@" not in str(body.get("email")):
                    return httpx.Response(422, json={"error": "unknown lock or no email"})
                site["keys"][key_id] = {k: body.get(k) for k in ("lock", "email", "start", "end")}
                self._save()
                return httpx.Response(200, json={"id": key_id})
            if request.method == "DELETE":
                if site["keys"].pop(key_id, None) is None:
                    return httpx.Response(404, json={"error": "no such key"})
                self._save()
                return httpx.Response(204)
            return httpx.Response(405, json={"error": "method not allowed"})

    def _save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True))
