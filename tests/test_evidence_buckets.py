"""#23 (records of constant size): what identified each user, device and gateway (the rename clues of #24) is
kept in EVIDENCE_BUCKETS notes per system, so an apply that adds one user rewrites one bucket, not the whole
system's evidence; a state written by an earlier version (one `evidence/SYSTEM` note) still flags a rename."""

from __future__ import annotations

import json

from test_abloy_provider import POLICY
from test_day_two import RENAME_USER

from reconciler.state.local import EVIDENCE_BUCKETS, evidence_note

MANY = POLICY.replace('  carol: {role: ADMIN}\n', '  carol: {role: ADMIN}\n' + "".join(
    f'  p{n:02d}: {{phone: "+47911000{n:02d}"}}\n' for n in range(40)))


def _notes(h) -> dict:
    return json.loads((h.tmp_path / "state" / "state.json").read_text())["notes"]


def _evidence(notes: dict) -> dict:
    return {k: v for k, v in notes.items() if k.startswith("evidence/hq")}


def test_evidence_is_kept_in_buckets_and_one_new_user_rewrites_one_of_them(harness):
    h = harness
    h.write(MANY)
    h.converge()
    before = _evidence(_notes(h))
    assert "evidence/hq" not in before and len(before) > EVIDENCE_BUCKETS // 4
    assert all(address.startswith("hq/") and evidence_note("hq", address) == name
               for name, bucket in before.items() for address in bucket)
    h.write(MANY.replace('  carol: {role: ADMIN}\n', '  carol: {role: ADMIN}\n  dora: {phone: "+4791200001"}\n'))
    h.converge()
    after = _evidence(_notes(h))
    changed = sorted(k for k in after.keys() | before.keys() if after.get(k) != before.get(k))
    assert changed == [evidence_note("hq", "hq/user/dora")]
    assert "hq/user/dora" in after[changed[0]]


def test_a_state_of_an_earlier_version_with_one_evidence_note_still_flags_a_rename(harness):
    h = harness
    h.write(POLICY)
    h.converge()
    path = h.tmp_path / "state" / "state.json"
    state = json.loads(path.read_text())
    whole: dict = {}
    for name in [k for k in state["notes"] if k.startswith("evidence/hq/")]:
        whole.update(state["notes"].pop(name))
    state["notes"]["evidence/hq"] = whole           # as earlier versions wrote it
    path.write_text(json.dumps(state))
    h.write(RENAME_USER.replace(", previously: [alice]", ""))
    data = h.plan().to_dict()
    assert [c["looks_like"] for c in data["changes"] if c["address"] == "hq/user/alice.hansen"] == \
        ["looks like a rename of alice (same phone)"]
