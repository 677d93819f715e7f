"""Intent records of constant size: a create without a natural key records which ids existed before it was sent
(`Provider.intend`), and the set is stored once per system and kind (the note `known/<system>/<kind>`), shared by
the intents that name its digest, dropped when none does. What settling a lost create proves stays the same;
without its set nothing is adopted. Against the Abloy simulator with its fault injection."""

from __future__ import annotations

import json

from reconciler.state import LocalState
from test_abloy_provider import vendor

NOW_TEXT = "2026-11-22T10:00:00Z"
DEVICE_POLICY = """\
devices:
  annex: {system: hq, name: Annex Door}
"""


def _state(h) -> LocalState:
    return LocalState(h.tmp_path / "state" / "state.json")


def _people(count: int) -> str:
    return "users:\n" + "".join(f"  u{i}: {{phone: \"+47900000{i:02d}\"}}\n" for i in range(count))


def _devices(h) -> list[dict]:
    return [d for d in vendor(h, "/locking-device") if d.get("name") == "Annex Door"]


def test_intents_of_one_apply_share_one_known_set_and_stay_small(harness):
    strangers = {harness.sim.add_user("USER") for _ in range(200)}
    harness.write(_people(3))
    harness.sim.faults.add("POST", r"/user$", commit=True, lost="502", times=None)   # every answer lost
    _, report = harness.apply()
    assert sorted(c.address for c, _ in report.uncertain) == ["hq/user/u0", "hq/user/u1", "hq/user/u2"]
    state = _state(harness)
    intents = {a: r for a, r in state.items("hq/user/") if r.get("intent") == "create"}
    assert len(intents) == 3
    for record in intents.values():
        assert "known" not in record
        assert len(json.dumps(record)) < 200, record       # 200 users known, and the record does not grow
    [ref] = {r["known_ref"] for r in intents.values()}
    sets = state.note("known/hq/user")
    assert set(sets) == {ref}                               # one set, written once for the three
    assert strangers <= set(sets[ref])                      # every account that existed before
    # The intents are still what settles the lost creates: none can be proven (accounts have no natural key).
    harness.sim.faults.clear()
    plan = harness.plan()
    assert {n.address for n in plan.warnings if dict(n.details).get("uncertain")} == set(intents)
    # Once no intent references the set (`state forget` of each), the next apply drops it.
    with state:
        for address in intents:
            state.delete(address)
    harness.write(DEVICE_POLICY)
    _, report = harness.apply()
    assert report.ok, report.lines()
    assert not _state(harness).note("known/hq/user")


def _lost_device_create(harness) -> None:
    """The create of `annex` lands, its answer is lost, and the lookup fails too: an intent is left."""
    harness.write(DEVICE_POLICY)

    def lookups_fail() -> None:
        harness.sim.faults.add("GET", r"/locking-device$", status=500, times=None)

    harness.sim.faults.add("POST", r"/locking-device$", commit=True, lost="502", then=lookups_fail)
    _, report = harness.apply()
    assert [c.address for c, _ in report.uncertain] == ["hq/device/annex"]
    harness.sim.faults.clear()
    record = _state(harness).get("hq/device/annex")
    assert record["intent"] == "create" and "known_ref" in record and "known" not in record


def test_a_lost_create_is_settled_through_the_shared_set(harness):
    _lost_device_create(harness)
    [landed] = _devices(harness)
    plan = harness.plan()
    assert "hq/device/annex" not in {c.address for c in plan.changes}     # found: the one new device, ours
    harness.converge()
    assert _state(harness).id_of("hq/device/annex") == landed["id"]
    assert len(_devices(harness)) == 1
    assert not _state(harness).note("known/hq/device")                   # no intent left: the set is gone


def test_without_its_known_set_a_lost_create_is_uncertain_never_adopted_nor_sent_again(harness):
    _lost_device_create(harness)
    state = _state(harness)
    with state:
        state.set_note("known/hq/device", None)
    plan = harness.plan()
    assert "hq/device/annex" not in {c.address for c in plan.changes}     # not created a second time ...
    [note] = [n for n in [*plan.warnings, *plan.pending] if n.address == "hq/device/annex"]
    assert "no longer holds which devices existed" in note.message        # ... nor adopted on a guess
    _, report = harness.apply()
    assert len(_devices(harness)) == 1
    assert _state(harness).id_of("hq/device/annex") is None


def test_a_set_written_without_its_intent_is_dropped_by_the_next_apply(harness):
    """A crash between the two writes: the set is in the state, its intent never was."""
    harness.write(DEVICE_POLICY)
    state = _state(harness)
    with state:
        state.set_note("known/hq/device", {"sha256:orphan": ["0b3a"]})
    _, report = harness.apply()
    assert report.ok, report.lines()
    assert not _state(harness).note("known/hq/device")
    assert len(_devices(harness)) == 1


def test_an_old_inline_intent_is_still_read(harness):
    """State written by earlier versions keeps the known ids inline: a lost create is still settled."""
    _lost_device_create(harness)
    state = _state(harness)
    with state:
        record = state.get("hq/device/annex")
        known = state.note("known/hq/device")[record["known_ref"]]
        state.put("hq/device/annex", {"intent": "create", "known": known, "at": record["at"]})
        state.set_note("known/hq/device", None)
    assert "hq/device/annex" not in {c.address for c in harness.plan().changes}
    harness.converge()
    assert len(_devices(harness)) == 1
