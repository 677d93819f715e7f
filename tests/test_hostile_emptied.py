"""#21: a read that lost most of what the state recorded as existing is refused as suspicious, with the
numbers, for every kind a vendor holds: Abloy permissions, Sentry shares, Unloc keys, Unloc Partner keys
and SmartphoneKey temp keys (Abloy users, devices and gateways: tests/test_hostile_vendor.py). A new system
(nothing recorded) and grants whose end has passed are no loss; the operator accepts a real emptying with
RECONCILER_ACCEPT_EMPTIED for the run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest
from harness import ABLOY, SENTRY, SPKEY, UNLOC, UNLOC_PARTNER, Vendor, VendorHarness

from reconciler.errors import RefusedError
from reconciler.plan import Action
from reconciler.sandbox import sentry as sentry_sandbox
from reconciler.sandbox import unloc as unloc_sandbox
from reconciler.sandbox import unloc_partner as partner_sandbox
from reconciler.sandbox.abloy import SEED_DEVICES
from reconciler.sandbox.spkey import SEED_LOCKS as SPKEY_LOCKS

PEOPLE = [f"p{n:02d}" for n in range(12)]
FLAT = SPKEY_LOCKS["Guest Flat 3"]
CABIN = unloc_sandbox.SEED_LOCKS["Cabin 7"]
APARTMENT = partner_sandbox.SEED_LOCKS["Hjemme"]
FRONT = sentry_sandbox.SEED_LOCKS["Front Door"]


def _phones() -> str:
    return "".join(f"  {p}: {{phone: \"+47900000{n:02d}\"}}\n" for n, p in enumerate(PEOPLE))


def _grant(device: str, window: str = "") -> str:
    return f"permissions:\n  - users: [{', '.join(PEOPLE)}]\n    devices: [{device}]\n{window}"


WINDOW = "    start: 2026-01-01T00:00:00Z\n    end: 2027-12-31T23:59:59Z\n"
PAST = "    start: 2026-01-01T00:00:00Z\n    end: 2026-06-30T23:59:59Z\n"


def _keep_two(field: str | None) -> Callable[[httpx.Request, httpx.Response], httpx.Response]:
    """The listing's items cut to the first two (a listing glitch): `field` holds the list (None: a bare list)."""
    def rewrite(request: httpx.Request, response: httpx.Response) -> httpx.Response:
        body = json.loads(response.content)
        if field is None:
            body = body[:2]
        else:
            body[field] = body[field][:2]
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-encoding")}
        return httpx.Response(response.status_code, headers=headers, content=json.dumps(body).encode())
    return rewrite


def _not_found(request: httpx.Request, response: httpx.Response) -> httpx.Response:
    """Every key read back unknown (the partner API has no key list: each key is a GET)."""
    return httpx.Response(404, json={"error": "NotFound", "errorDescription": "no such key"})


@dataclass(frozen=True)
class Case:
    vendor: Vendor
    policy: Callable[[str], str]             # the policy, given the grants' window
    kind: str
    listing: Callable[[httpx.Request], bool]  # the GET that lists the kind
    rewrite: Callable[[httpx.Request, httpx.Response], httpx.Response]


def _temp_keys(window: str) -> str:
    keys = "".join(f"  key-{p}:\n    device: flat\n    access: public\n{window}    max_uses: 5\n" for p in PEOPLE)
    return f"devices:\n  flat: {{system: guests, id: {FLAT}}}\ntemp_keys:\n{keys}"


CASES = {
    "abloy permissions": Case(
        ABLOY, lambda w: "users:\n" + "".join(f"  {p}: {{}}\n" for p in PEOPLE)
        + f"devices:\n  gym: {{system: hq, id: {SEED_DEVICES['Gym']}}}\n" + _grant("gym", w), "permission",
        lambda r: r.url.path.endswith("/permission"), _keep_two("items")),
    "sentry shares": Case(
        SENTRY, lambda w: "users:\n" + "".join(f"  {p}: {{email: staff{n + 1:02d}@example.com}}\n"
                                               for n, p in enumerate(PEOPLE))
        + f"devices:\n  front: {{system: office, id: {FRONT}}}\n" + _grant("front", w), "share",
        lambda r: r.url.path.endswith(f"/device/{FRONT}/users"), _keep_two(None)),
    "unloc keys": Case(
        UNLOC, lambda w: "users:\n" + _phones() + f"devices:\n  cabin: {{system: cabins, id: {CABIN}}}\n"
        + _grant("cabin", w), "key", lambda r: r.url.path.endswith(f"/lock-holders/{unloc_sandbox.LOCK_HOLDER_ID}/keys"),
        _keep_two("keys")),
    "unloc-partner keys": Case(
        UNLOC_PARTNER, lambda w: "users:\n" + _phones() + f"devices:\n  apartment: {{system: rentals, id: \"{APARTMENT}\"}}\n"
        + _grant("apartment", w), "key", lambda r: "/keys/" in r.url.path, _not_found),
    "spkey temp keys": Case(SPKEY, _temp_keys, "temp_key", lambda r: r.url.path.endswith(f"/locks/{FLAT}/temp-keys"),
                            _keep_two("tempKeys")),
}


def hostile_listing(h: VendorHarness, case: Case) -> dict[str, bool]:
    honest = h.sim.handle
    switch = {"on": True}

    def handle(request: httpx.Request) -> httpx.Response:
        response = honest(request)
        if switch["on"] and request.method == "GET" and case.listing(request) and response.status_code == 200:
            response.read()
            return case.rewrite(request, response)
        return response
    h.sim.handle = handle
    return switch


@pytest.mark.parametrize("name", list(CASES))
def test_a_read_that_lost_most_recorded_objects_of_a_kind_is_refused_with_the_numbers(tmp_path, monkeypatch, name):
    case = CASES[name]
    h = VendorHarness(tmp_path, case.vendor)
    h.write(case.policy(WINDOW))
    h.converge()
    assert not h.plan().has_changes
    switch = hostile_listing(h, case)
    with pytest.raises(RefusedError) as caught:
        h.plan()
    line = str(caught.value)
    assert line.startswith(f"{case.vendor.system}: refused as suspicious: the vendor listed "), line
    assert f"of the 12 {case.kind}s the state recorded as existing" in line and "RECONCILER_ACCEPT_EMPTIED" in line
    # The operator who knows the system was emptied says so for this run: the plan creates them again.
    monkeypatch.setenv("RECONCILER_ACCEPT_EMPTIED", case.vendor.system)
    plan = h.plan()
    assert len([c for c in plan.changes if c.kind == case.kind and c.action is Action.CREATE]) >= 10
    switch["on"] = False


@pytest.mark.parametrize("name", list(CASES))
def test_a_new_system_and_ended_grants_are_no_loss(tmp_path, monkeypatch, name):
    case = CASES[name]
    h = VendorHarness(tmp_path, case.vendor)
    h.write(case.policy(PAST))
    switch = hostile_listing(h, case)
    h.plan()                      # nothing recorded yet: a new system is never suspicious
    switch["on"] = False
    # Grants whose end has passed were made (the clock stood before their end), then the clock moved past it:
    # a vendor may drop them from its listings, and that is no loss.
    h.now = h.now.replace(month=6, day=1)
    h.converge()
    h.now = h.now.replace(month=11, day=22)
    switch["on"] = True
    h.plan()


def test_unloc_partner_keys_the_owner_revoked_are_listed_not_lost(tmp_path):
    """The lock owner revokes 10 of 12 keys (the vendor still answers each, `state: revoked`): no loss, the
    plan creates them again. Keys the vendor no longer knows at all (404) are the loss the check is for."""
    case = CASES["unloc-partner keys"]
    h = VendorHarness(tmp_path, case.vendor)
    h.write(case.policy(WINDOW))
    seeded = set(h.sim.key_ids(APARTMENT))
    h.converge()
    keys = [k for k in h.sim.key_ids(APARTMENT) if k not in seeded]
    assert len(keys) == 12
    for key in keys[:10]:
        h.sim.revoke_by_owner(key)
    plan = h.plan()
    assert len([c for c in plan.changes if c.kind == "key" and c.action is Action.CREATE]) == 10
    hostile_listing(h, case)          # now every key read back is unknown: lost
    with pytest.raises(RefusedError, match="refused as suspicious"):
        h.plan()


def test_unloc_keys_the_vendor_lists_as_revoked_or_expired_are_listed_not_lost(tmp_path):
    """Unloc keeps a revoked or expired key in its listing in that state: 10 of 12 keys revoked outside git
    are no loss (the plan creates them again); keys gone from the listing are the loss the check is for."""
    case = CASES["unloc keys"]
    h = VendorHarness(tmp_path, case.vendor)
    h.write(case.policy(WINDOW))
    h.converge()

    def revoke_all_but_two(request: httpx.Request, response: httpx.Response) -> httpx.Response:
        body = json.loads(response.content)
        ours = [k for k in body["keys"] if str(k.get("lockId", "")).lower() == CABIN.lower()]
        for n, key in enumerate(ours[2:]):
            key["state"] = "revoked" if n % 2 else "expired"
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-encoding")}
        return httpx.Response(response.status_code, headers=headers, content=json.dumps(body).encode())

    hostile_listing(h, Case(case.vendor, case.policy, case.kind, case.listing, revoke_all_but_two))
    plan = h.plan()
    assert len([c for c in plan.changes if c.kind == "key" and c.action is Action.CREATE]) == 10
