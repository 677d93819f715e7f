"""#21 finding 8 beyond Abloy: an Unloc revocation the vendor acknowledges and does not carry out is
reported "not in effect" (apply exits 1), and the next plan says so rather than "drift"."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
from harness import UNLOC, VendorHarness

from reconciler.plan import Action
from reconciler.sandbox.unloc import SEED_LOCKS

POLICY = f"""\
users:
  bob: {{phone: "+4790000002"}}
devices:
  cabin: {{system: cabins, id: {SEED_LOCKS["Cabin 7"]}}}
permissions:
  - users: [bob]
    devices: [cabin]
"""


def test_an_unloc_revocation_the_vendor_does_not_carry_out_is_not_in_effect(tmp_path):
    h = VendorHarness(tmp_path, UNLOC)
    h.write(POLICY)
    h.converge()
    h.write(POLICY.replace("  - users: [bob]\n    devices: [cabin]\n", "").replace("permissions:\n", "permissions: []\n"))
    honest = h.sim.handle
    ignored = []

    def handle(request):
        if request.method == "PATCH" and "/keys/" in request.url.path:
            ignored.append(request.url.path)       # acknowledged with the key as it is, and not done
            return httpx.Response(204)
        return honest(request)
    h.sim.handle = handle
    plan, report = h.apply()
    assert ignored and [c for c in plan.changes if c.action is Action.DELETE and c.kind == "key"]
    assert not report.ok and all("not in effect" in why for _, why in report.failed), report.failed
    again = h.plan()
    assert [c for c in again.changes if c.action is Action.DELETE and c.origin == "not in effect"]
    h.sim.handle = honest
    h.converge()
    assert not h.plan().has_changes


# -- Sentry, SmartphoneKey and Unloc Partner: every vendor whose sandbox can revoke (Abloy: test_hostile_vendor.py)

def _operation(request: httpx.Request) -> str:
    """The type of a Sentry signed operation (the JWS payload's `operation.type`)."""
    payload = request.content.split(b".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))["operation"]["type"]


def _sentry():
    from harness import SENTRY
    from test_sentry import FRONT, STAFF, staff_policy

    return (SENTRY, staff_policy("front", FRONT, STAFF[:3]), staff_policy("front", FRONT, STAFF[:2]), "share",
            lambda r: r.method == "POST" and r.url.path.endswith(f"/device/{FRONT}/execute")
            and _operation(r) == "REMOVE_USER", httpx.Response(200))


def _spkey():
    from harness import SPKEY
    from test_spkey import FLAT3

    def keys(*names):
        return f"devices:\n  flat: {{system: guests, id: {FLAT3}}}\ntemp_keys:\n" + "".join(
            f"  {n}:\n    device: flat\n    access: public\n    start: 2026-11-24T09:00:00Z\n"
            "    end: 2026-11-24T17:00:00Z\n    max_uses: 3\n" for n in names)
    return (SPKEY, keys("a", "b"), keys("a"), "temp_key",
            lambda r: r.method == "POST" and r.url.path.endswith("/delete-temp-key"),
            httpx.Response(200, json={"success": True, "aggregateId": "x", "version": 1, "event": None}))


def _unloc_partner():
    from harness import UNLOC_PARTNER
    from test_unloc_partner import POLICY as PARTNER

    narrowed = PARTNER.replace("    devices: [apartment, front]\n", "    devices: [apartment]\n")
    return (UNLOC_PARTNER, PARTNER, narrowed, "key", lambda r: r.method == "DELETE" and "/keys/" in r.url.path,
            httpx.Response(200, json={"response": "OK"}))


@pytest.mark.parametrize("setup", [_sentry, _spkey, _unloc_partner], ids=["sentry", "spkey", "unloc-partner"])
def test_a_revocation_the_vendor_does_not_carry_out_is_not_in_effect_on_every_vendor(tmp_path, setup):
    vendor, before, after, kind, is_revocation, acknowledgement = setup()
    h = VendorHarness(tmp_path, vendor)
    h.write(before)
    h.converge()
    h.write(after)
    honest = h.sim.handle
    ignored = []

    def handle(request):
        if is_revocation(request):
            ignored.append(request.url.path)      # acknowledged, and not done
            return acknowledgement
        return honest(request)
    h.sim.handle = handle
    plan, report = h.apply()
    assert ignored and [c for c in plan.changes if c.action is Action.DELETE and c.kind == kind]
    assert not report.ok and report.failed and not report.done
    assert all("not in effect" in why for _, why in report.failed), report.failed
    again = h.plan()
    survivors = [c for c in again.changes if c.action is Action.DELETE and c.kind == kind]
    assert survivors and all(c.origin == "not in effect" for c in survivors), [(c.address, c.origin) for c in survivors]
    assert any("not in effect" in n.message for n in again.warnings)
    # Once the vendor does carry it out, the mark goes.
    h.sim.handle = honest
    h.converge()
    assert not h.plan().has_changes
