"""#21 finding 8 beyond Abloy: an Unloc revocation the vendor acknowledges and does not carry out is
reported "not in effect" (apply exits 1), and the next plan says so rather than "drift"."""

from __future__ import annotations

import httpx
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
