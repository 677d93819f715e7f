"""Identity by evidence: a system known only by a digest of its key (SmartphoneKey) may rotate the key. The state
is accepted when the live system holds the objects it recorded ("found N of M") and the new identity is
recorded; against a foreign system (nothing found) it is refused as before, and nothing is sent. Unloc Partner
names its system by `partner_id`, so its key rotates without any of this."""

from __future__ import annotations

import json

import pytest
from harness import UNLOC_PARTNER, VendorHarness
from test_spkey import GUESTS, keys_yaml
from test_unloc_partner import POLICY as PARTNER_POLICY

from reconciler.errors import PlanError, RefusedError
from reconciler.resources import Resource
from reconciler.sandbox.spkey import ORG_ID, OTHER_API_KEY
from reconciler.state import LocalState
from reconciler.state.trust import check_state

WRITES = ("POST", "PUT", "PATCH", "DELETE")


def _writes(h) -> int:
    return len([r for r in h.sim.requests if r.method in WRITES])


def _identity(path) -> dict:
    return json.loads(path.read_text())["systems"]


def test_a_rotated_smartphonekey_key_is_accepted_on_evidence(tmp_path):
    h = VendorHarness(tmp_path, GUESTS)
    h.write(keys_yaml())
    _, report = h.apply()
    assert report.ok
    before = _identity(h.state_path)["guests"]["account"]
    rotated = "spk_sbx_" + "f" * 32
    h.sim.state["apiKeys"][rotated] = ORG_ID                    # the vendor issued a new key for the same org
    del h.sim.state["apiKeys"][h.env["SPKEY_API_KEY"]]          # and revoked the old one
    h.env = {"SPKEY_API_KEY": rotated}
    plan = h.plan()
    assert not plan.has_changes
    said = [n.message for n in plan.warnings if n.address == "guests"]
    assert len(said) == 1 and "found 2 of 2" in said[0] and "the key changed" in said[0]
    assert rotated not in json.dumps(plan.to_dict())
    sent = _writes(h)
    h.apply()
    assert _writes(h) == sent
    after = _identity(h.state_path)["guests"]["account"]
    assert after != before and rotated not in h.state_path.read_text()
    assert not [n for n in h.plan().warnings if n.address == "guests"]     # recorded: said once


def test_a_foreign_smartphonekey_system_is_refused_and_nothing_is_sent(tmp_path):
    h = VendorHarness(tmp_path, GUESTS)
    h.write(keys_yaml())
    h.apply()
    h.env = {"SPKEY_API_KEY": OTHER_API_KEY}                   # another organisation's key
    sent = _writes(h)
    with pytest.raises((RefusedError, PlanError)):
        h.apply()
    assert _writes(h) == sent
    assert OTHER_API_KEY not in h.state_path.read_text()


def test_the_guard_refuses_a_changed_digest_when_the_live_system_holds_nothing_it_recorded(tmp_path):
    state = LocalState(tmp_path / "state.json")
    state.put("guests/temp_key/a", {"id": "uuid-a"})
    state.put("guests/temp_key/b", {"id": "uuid-b"})
    state.set_system("guests", {"vendor": "spkey", "url": "https://spkey.test", "account": "sha256:old"})
    now = {"vendor": "spkey", "url": "https://spkey.test", "account": "sha256:new"}
    foreign = [Resource("guests", "temp_key", "x", {}, id="uuid-x")]
    with pytest.raises(RefusedError) as refused:
        check_state(state, {"guests": now}, [], foreign, by_secret=["guests"])
    assert "found 0 of the 2 objects" in str(refused.value)
    ours = [Resource("guests", "temp_key", "a", {}, id="uuid-a"), Resource("guests", "temp_key", "b", {}, id="uuid-b")]
    accepted = check_state(state, {"guests": now}, [], ours, by_secret=["guests"])
    assert "found 2 of 2" in accepted[0]
    with pytest.raises(RefusedError):     # an account-named system is never taken on evidence
        check_state(state, {"guests": now}, [], ours)
    moved = {"vendor": "spkey", "url": "https://elsewhere.test", "account": "sha256:new"}
    with pytest.raises(RefusedError):     # another endpoint is another system
        check_state(state, {"guests": moved}, [], ours, by_secret=["guests"])


def test_a_rotated_unloc_partner_key_keeps_the_state(tmp_path):
    h = VendorHarness(tmp_path, UNLOC_PARTNER)
    h.write(PARTNER_POLICY)
    h.converge()
    before = _identity(h.state_path)["rentals"]
    rotated = "unloc_partner_sbx_" + "e" * 32
    h.sim.state["apiKey"] = rotated
    h.env = {"UNLOC_PARTNER_KEY": rotated}
    plan = h.plan()
    assert not plan.has_changes
    writes_before = sum(h.sim.count(m) for m in WRITES)
    h.apply()
    assert sum(h.sim.count(m) for m in WRITES) == writes_before
    assert _identity(h.state_path)["rentals"] == before and rotated not in h.state_path.read_text()
