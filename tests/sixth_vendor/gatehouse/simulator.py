"""The Gatehouse Access API in memory (and in a store file between CLI runs), on the simulator base.

- `GET /v1/doors`, `GET /v1/users`, `GET /v1/grants`: pages of `{"data": [...], "next_cursor": str | null}`;
  `limit` 1..100 (default 50), `cursor` the `next_cursor` of the previous page (the last id served).
- `POST /v1/users {email, name}`: both required (422 otherwise); an email taken is 409. `PATCH`, `DELETE`
  `/v1/users/{id}`; deleting a user deletes their grants.
- `POST /v1/grants {user_id, door_id, starts_at, ends_at, pin_required}`: one grant per user and door (409);
  `PATCH`, `DELETE` `/v1/grants/{id}`.
- Every request carries `Authorization: Bearer <api token>` (401 otherwise). Errors are `{"error": ...}`.
"""

from __future__ import annotations

import hmac
import re
import uuid
from typing import Any, ClassVar

import httpx

from reconciler.sandbox.common import (
    Route,
    RouteMatch,
    Simulator,
    SimulatorError,
    json_response,
    parse_datetime,
    parse_limit,
    read_json_body,
)

API_TOKEN = "gh_sbx_" + "7" * 32
SEED_DOORS = {"door-1": "Main entrance", "door-2": "Bike shed", "door-3": "Server room",
              **{f"door-{n}": f"Locker {n}" for n in range(4, 151)}}    # more than one page of doors
SEED_USERS = {"usr-seed": {"email": "pat@visitor.example", "name": "Pat Visitor"}}   # not the policy's
JSON = "application/json"
EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")

ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/doors", "list_doors"),
    Route("GET", "/v1/users", "list_users"),
    Route("POST", "/v1/users", "create_user", body=JSON),
    Route("PATCH", "/v1/users/{id}", "update_user", body=JSON),
    Route("DELETE", "/v1/users/{id}", "delete_user"),
    Route("GET", "/v1/grants", "list_grants"),
    Route("POST", "/v1/grants", "create_grant", body=JSON),
    Route("PATCH", "/v1/grants/{id}", "update_grant", body=JSON),
    Route("DELETE", "/v1/grants/{id}", "delete_grant"),
)


def _by_id(record: dict[str, Any]) -> str:
    return record["id"]


class GatehouseSimulator(Simulator):
    routes: ClassVar[tuple[Route, ...]] = ROUTES
    store_format, store_version = "reconciler-sandbox/gatehouse", 1
    not_found = "no such resource"

    @property
    def credentials(self) -> dict[str, str]:
        return {"api_token": API_TOKEN}

    def new_state(self) -> dict[str, Any]:
        return {"format": self.store_format, "version": self.store_version, "seq": 0,
                "doors": {i: {"id": i, "name": n} for i, n in SEED_DOORS.items()},
                "users": {i: {"id": i, **u} for i, u in SEED_USERS.items()}, "grants": {}}

    def render_error(self, error: SimulatorError) -> httpx.Response:
        return json_response(error.status, {"error": error.detail}, headers=error.headers)

    def dispatch(self, request: httpx.Request, match: RouteMatch) -> httpx.Response:
        route = self.route_of(request, match)        # 404/405 as the simulator base answers them
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), API_TOKEN.encode()):
            raise SimulatorError(401, "missing or unknown API token")
        body = read_json_body(request, JSON) if route.body else None
        if route.body and not isinstance(body, dict):
            raise SimulatorError(422, "the body must be a JSON object")
        return getattr(self, f"_{route.handler}")(request, match.params.get("id"), body)

    # --- listings: cursor paging
    def _page(self, request: httpx.Request, table: str) -> httpx.Response:
        limit = parse_limit(request.url.params.get("limit"), default=50, maximum=100)
        page, more = self.view(table, _by_id).page(after=request.url.params.get("cursor"), limit=limit)
        return json_response(200, {"data": [dict(r) for r in page], "next_cursor": page[-1]["id"] if more else None})

    def _list_doors(self, request: httpx.Request, _: None, __: None) -> httpx.Response:
        return self._page(request, "doors")

    def _list_users(self, request: httpx.Request, _: None, __: None) -> httpx.Response:
        return self._page(request, "users")

    def _list_grants(self, request: httpx.Request, _: None, __: None) -> httpx.Response:
        return self._page(request, "grants")

    # --- users
    def _new_id(self, prefix: str) -> str:
        self.state["seq"] += 1
        seq = self.state["seq"]
        return f"{prefix}-{uuid.uuid5(uuid.NAMESPACE_URL, f'gatehouse/{seq}').hex[:12]}"

    def _user_fields(self, body: dict[str, Any], *, partial: bool) -> dict[str, str]:
        fields = {k: body[k] for k in ("email", "name") if k in body}
        for key in ("email", "name"):
            if key not in fields and not partial:
                raise SimulatorError(422, f"{key} is required")
        for key, value in fields.items():
            if not isinstance(value, str) or not value.strip():
                raise SimulatorError(422, f"{key} must be a non-empty string")
        if "email" in fields and not EMAIL.fullmatch(fields["email"]):
            raise SimulatorError(422, "email is not an email address")
        return fields

    def _email_taken(self, email: str, but: str | None = None) -> None:
        if any(u["email"].lower() == email.lower() and u["id"] != but for u in self.state["users"].values()):
            raise SimulatorError(409, "a user with this email exists")

    def _create_user(self, _: httpx.Request, __: None, body: dict[str, Any]) -> httpx.Response:
        fields = self._user_fields(body, partial=False)
        self._email_taken(fields["email"])
        user = {"id": self._new_id("usr"), **fields}
        self.state["users"][user["id"]] = user
        self.mark_changed("users", user["id"])
        return json_response(201, user)

    def _user(self, user_id: str) -> dict[str, Any]:
        user = self.state["users"].get(user_id)
        if user is None:
            raise SimulatorError(404, "no such user")
        return user

    def _update_user(self, _: httpx.Request, user_id: str, body: dict[str, Any]) -> httpx.Response:
        user = self._user(user_id)
        fields = self._user_fields(body, partial=True)
        if "email" in fields:
            self._email_taken(fields["email"], but=user_id)
        user.update(fields)
        self.mark_changed("users", user_id)
        return json_response(200, user)

    def _delete_user(self, _: httpx.Request, user_id: str, __: None) -> httpx.Response:
        self._user(user_id)
        del self.state["users"][user_id]
        self.mark_changed("users", user_id)
        for grant_id in [g["id"] for g in self.state["grants"].values() if g["user_id"] == user_id]:
            del self.state["grants"][grant_id]
            self.mark_changed("grants", grant_id)
        return httpx.Response(204)

    # --- grants
    def _grant_fields(self, body: dict[str, Any], *, partial: bool) -> dict[str, Any]:
        fields = {k: body[k] for k in ("starts_at", "ends_at", "pin_required") if k in body}
        if not partial:
            fields.setdefault("starts_at", None)
            fields.setdefault("ends_at", None)
            fields.setdefault("pin_required", True)
        for key in ("starts_at", "ends_at"):
            if key in fields and fields[key] is not None and parse_datetime(fields[key]) is None:
                raise SimulatorError(422, f"{key} must be an ISO 8601 date-time or null")
        if "pin_required" in fields and not isinstance(fields["pin_required"], bool):
            raise SimulatorError(422, "pin_required must be true or false")
        return fields

    def _create_grant(self, _: httpx.Request, __: None, body: dict[str, Any]) -> httpx.Response:
        user_id, door_id = body.get("user_id"), body.get("door_id")
        if user_id not in self.state["users"] or door_id not in self.state["doors"]:
            raise SimulatorError(422, "user_id and door_id must name an existing user and door")
        if any(g["user_id"] == user_id and g["door_id"] == door_id for g in self.state["grants"].values()):
            raise SimulatorError(409, "this user has a grant on this door")
        grant = {"id": self._new_id("grt"), "user_id": user_id, "door_id": door_id,
                 **self._grant_fields(body, partial=False)}
        self.state["grants"][grant["id"]] = grant
        self.mark_changed("grants", grant["id"])
        return json_response(201, grant)

    def _update_grant(self, _: httpx.Request, grant_id: str, body: dict[str, Any]) -> httpx.Response:
        grant = self.state["grants"].get(grant_id)
        if grant is None:
            raise SimulatorError(404, "no such grant")
        grant.update(self._grant_fields(body, partial=True))
        self.mark_changed("grants", grant_id)
        return json_response(200, grant)

    def _delete_grant(self, _: httpx.Request, grant_id: str, __: None) -> httpx.Response:
        if self.state["grants"].pop(grant_id, None) is None:
            raise SimulatorError(404, "no such grant")
        self.mark_changed("grants", grant_id)
        return httpx.Response(204)
