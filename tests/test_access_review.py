"""Access review that cannot be gamed: effect by access, the mass-revoke guard before merge, several windows
per person and door, and the first plan's "not in policy"."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from reconciler.errors import PolicyError, RefusedError
from reconciler.plan import Action
from reconciler.planner import plan
from reconciler.policy import load_policy
from reconciler.providers.factory import capabilities
from reconciler.render import render_json, render_markdown, render_text
from reconciler.resources import Resource, digest
from reconciler.sandbox.abloy import SEED_DEVICES

from conftest import NOW

ENTRANCE = SEED_DEVICES["Main Entrance"]
GYM = SEED_DEVICES["Gym"]
NOW_TEXT = "2026-11-22T10:00:00Z"


def grant(user="alice", device="door", **attrs):
    window = {"start": "2026-01-01T00:00:00Z", "end": "2027-12-31T23:59:59Z", "key_validity": "P8D", **attrs}
    return Resource("hq", "permission", f"{user}/{device}/OPEN", window, meta={"via": ("user",)},
                    source="policies/access.yaml:3")


# -- effect by access ------------------------------------------------------------------------------------

def test_new_admin_account_is_a_granting_privilege_change_in_text_markdown_and_json():
    admin = Resource("hq", "user", "kari", {"role": "ADMIN"}, source="policies/people.yaml:7")
    result = plan([admin, Resource("hq", "user", "lars", {"role": "USER"})], [], now=NOW)
    data = json.loads(render_json(result))
    by_address = {c["address"]: c for c in data["changes"]}
    assert by_address["hq/user/kari"]["effect"] == "grant" and by_address["hq/user/kari"]["privilege"] is True
    assert by_address["hq/user/lars"]["effect"] == "none" and by_address["hq/user/lars"]["privilege"] is None
    assert data["effects"] == {"grant": 1, "revoke": 0}
    text = render_text(result)
    assert "+ hq/user/kari  [grant, privilege]" in text
    assert "(1 granting access, 0 revoking access)" in text
    markdown = render_markdown(result)
    access = markdown.split("#### Access changes", 1)[1].split("<details>", 1)[0]
    assert "- **privilege**: **kari** gets an ADMIN account on `hq`: can grant itself access to any door" in access
    assert "1 granting access" in markdown.splitlines()[1]


def test_admin_share_and_role_changes_are_privilege_listed_first():
    def share(user, role, **attrs):
        return Resource("office", "share", f"{user}/room", {"start": None, "end": None, "role": role, **attrs},
                        meta={"via": ("user",)})
    result = plan([share("alice", "ADMIN"), share("bob", "USER"), share("carol", "USER")],
                  [share("alice", "USER"), share("bob", "ADMIN")], now=NOW)
    effects = {c.address: (c.effect, sorted(c.effects), c.privilege) for c in result.changes}
    assert effects["office/share/alice/room"] == ("grant", ["grant"], True)     # raised to ADMIN
    assert effects["office/share/bob/room"] == ("revoke", ["revoke"], True)     # lowered to USER
    assert effects["office/share/carol/room"] == ("grant", ["grant"], False)
    access = render_markdown(result).split("#### Access changes", 1)[1].splitlines()
    assert access[1].startswith("- **privilege**: ") and access[2].startswith("- **privilege**: ")


@pytest.mark.parametrize(("live", "desired", "expected"), [
    ({}, {"start": "2030-01-01T00:00:00Z"}, ["revoke"]),                              # start moved past now
    ({}, {"end": "2027-01-31T00:00:00Z"}, ["revoke"]),                                # end moved earlier
    ({}, {"end": "2028-12-31T00:00:00Z"}, ["grant"]),                                 # end moved later
    ({}, {"start": "2027-01-01T00:00:00Z", "end": "2028-12-31T00:00:00Z"}, ["grant", "revoke"]),   # shifted
    ({}, {"start": "2026-06-01T00:00:00Z"}, []),                                      # a past start moved: nothing now
    ({}, {"key_validity": "P3D"}, []),
    ({"end": "2026-11-01T00:00:00Z"}, {"end": "2026-11-15T00:00:00Z"}, []),           # past on both sides
])
def test_window_changes_are_judged_by_access_at_plan_time(live, desired, expected):
    [change] = plan([grant(**desired)], [grant(**live)], now=NOW).changes
    assert sorted(str(e) for e in change.effects) == expected
    data = change.to_dict()
    assert data["effect"] == ("revoke" if "revoke" in expected else expected[0] if expected else "none")
    assert data.get("access") == (expected if len(expected) == 2 else None)


def test_a_change_both_granting_and_revoking_says_so_and_counts_as_revoking():
    [change] = plan([grant(start="2027-01-01T00:00:00Z", end="2028-12-31T00:00:00Z")], [grant()], now=NOW).changes
    data = change.to_dict()
    assert (data["effect"], data["access"]) == ("revoke", ["grant", "revoke"])
    shifted = plan([grant(start="2027-01-01T00:00:00Z", end="2028-12-31T00:00:00Z")], [grant()], now=NOW)
    assert "~ hq/permission/alice/door/OPEN  [grant + revoke]" in render_text(shifted)
    assert shifted.effects() == {"grant": 1, "revoke": 1} and shifted.revocations == 1


def test_narrowed_schedule_revokes_and_widened_schedule_grants():
    week = [{"day": d, "from": "08:00", "to": "18:00"} for d in ("mon", "tue", "wed", "thu", "fri")]

    def key(schedule):
        return Resource("cabins", "key", "eva/cabin", {"start": None, "end": None, "schedule": schedule},
                        replace_on_change=True)
    [narrowed] = plan([key(week[:2])], [key(week)], now=NOW).changes
    [widened] = plan([key(week)], [key(week[:2])], now=NOW).changes
    [dropped] = plan([key(None)], [key(week)], now=NOW).changes
    assert (narrowed.effect, widened.effect, dropped.effect) == ("revoke", "grant", "grant")


def test_deleting_an_ended_grant_revokes_nothing():
    [change] = plan([], [grant(end="2026-11-01T00:00:00Z")], now=NOW).changes
    assert change.action is Action.DELETE and change.effect == "none"


# -- omitted start means from now -------------------------------------------------------------------------

def test_a_grant_without_start_is_satisfied_by_a_past_start_but_not_by_a_future_one():
    without = Resource("hq", "permission", "alice/door/OPEN", {"end": "2027-12-31T23:59:59Z", "key_validity": "P8D"})
    assert plan([without], [grant()], now=NOW).changes == ()
    [change] = plan([without], [grant(start="2030-01-01T00:00:00Z")], now=NOW).changes
    assert change.changed == ("start",) and change.effect == "grant"
    # Unless the last apply made it from exactly this policy: the vendor started it when apply ran, which
    # is later than a --now in the past.
    applied = {without.address: digest(dict(without.attributes))}
    assert plan([without], [grant(start="2030-01-01T00:00:00Z")], now=NOW, applied=applied).changes == ()


# -- the mass-revoke guard ---------------------------------------------------------------------------------

def twelve(start="2026-01-01T00:00:00Z", *, count=12, system_extra=""):
    users = "".join(f"  u{n:02d}: {{}}\n" for n in range(12))
    start_line = f"    start: {start}\n" if start else ""
    return (f"users:\n{users}devices:\n  entrance: {{system: hq, id: {ENTRANCE}}}\npermissions:\n"
            f"  - users: [{', '.join(f'u{n:02d}' for n in range(count))}]\n    devices: [entrance]\n"
            f"{start_line}    end: 2031-12-31T23:59:59Z\n")


def entrance_windows(h):
    return sorted((p["start"], p["end"]) for p in h.sim.state["permissions"].values()
                  if p["lockingDeviceId"] == ENTRANCE)


def test_moving_every_window_past_now_is_revoking_and_the_plan_shows_the_guard(harness):
    harness.write(twelve())
    harness.converge()
    harness.write(twelve(start="2030-01-01T00:00:00Z"))
    result = harness.plan()
    assert result.summary()["update"] == 12
    assert result.effects() == {"grant": 0, "revoke": 12} and result.revocations == 12
    [guard] = result.guards
    assert (guard.system, guard.revoking, guard.managed, guard.trips, guard.refuses) == ("hq", 12, 12, True, True)
    text = render_text(result)
    assert "(0 granting access, 12 revoking access)" in text
    assert "Mass-revoke guard:" in text and "hq: the plan revokes 12 of 12 managed grants" in text
    assert "apply will refuse it" in text and guard.token in text
    markdown = render_markdown(result)
    assert markdown.index("Apply will refuse this plan (mass-revoke guard)") < markdown.index("#### Access changes")
    assert json.loads(render_json(result))["guard"][0]["refuses"] is True
    before = entrance_windows(harness)
    with pytest.raises(RefusedError, match="revokes 12 of 12 managed grants"):
        harness.apply()
    assert entrance_windows(harness) == before      # nothing was sent


def test_a_reviewed_acknowledgement_in_the_policy_lets_exactly_that_plan_through(harness):
    harness.write(twelve())
    harness.converge()
    harness.write(twelve(start="2030-01-01T00:00:00Z"))
    token = harness.plan().guards[0].token
    # Another set of revocations (one grant fewer moved) does not match the acknowledgement: still refused.
    other = twelve(start="2030-01-01T00:00:00Z", count=11) + "  - users: [u11]\n    devices: [entrance]\n" \
        "    start: 2026-01-01T00:00:00Z\n    end: 2031-12-31T23:59:59Z\n"
    harness.write(other, system_extra=f"mass_revoke: {{acknowledge: {token}}}\n")
    stale = harness.plan()
    assert stale.guards[0].refuses and "is for other revocations" in stale.guards[0].message()
    with pytest.raises(RefusedError):
        harness.apply()
    harness.write(twelve(start="2030-01-01T00:00:00Z"), system_extra=f"mass_revoke: {{acknowledge: {token}}}\n")
    reviewed = harness.plan()
    assert reviewed.guards[0].trips and not reviewed.guards[0].refuses
    assert re.search(r"acknowledged in the policy \(\S*systems\.yaml:9\): apply proceeds", render_text(reviewed))
    _, report = harness.apply()
    assert report.ok
    assert {(s[:19], e[:19]) for s, e in entrance_windows(harness)} == {("2030-01-01T00:00:00", "2031-12-31T23:59:59")}


def test_removing_start_afterwards_opens_from_now_and_converges(harness):
    harness.write(twelve(start="2030-01-01T00:00:00Z"))
    harness.converge()
    harness.write(twelve(start=None))
    result = harness.plan()
    assert [c.changed for c in result.changes] == [("start",)] * 12
    assert 'start: "2030-01-01T00:00:00Z" -> now' in render_text(result)
    assert all(c.effect == "grant" for c in result.changes)
    _, report = harness.apply()
    assert report.ok, report.lines()
    assert all(start[:19] <= NOW_TEXT[:19] for start, _ in entrance_windows(harness))
    assert not harness.plan().has_changes


def test_thresholds_are_per_system(harness):
    harness.write(twelve())
    harness.converge()
    harness.write(twelve(count=9))                     # 3 of 12: within the default 25 %
    assert not harness.plan().guards[0].trips
    harness.write(twelve(count=9), system_extra="mass_revoke: {percent: 20, minimum: 5}\n")
    [guard] = harness.plan().guards
    assert guard.refuses and "more than 20 % of at least 5" in guard.message()
    harness.write(twelve(count=2), system_extra="mass_revoke: {percent: 100}\n")
    assert not harness.plan().guards[0].trips


def test_guard_settings_are_checked_at_validation(harness):
    harness.write(twelve(), system_extra="mass_revoke: {percent: 120, acknowledge: yes-please}\n")
    with pytest.raises(PolicyError) as caught:
        harness.plan()
    lines = caught.value.lines()
    assert any(re.search(r"systems\.yaml:\d+:\d+: percent must be at most 100", line) for line in lines), lines
    assert any("acknowledge" in line or "pattern" in line for line in lines), lines


# -- several windows per person and door ------------------------------------------------------------------

SPLIT = f"""\
users:
  alice: {{}}
devices:
  gym: {{system: hq, id: {GYM}}}
permissions:
  - users: [alice]
    devices: [gym]
    start: 2027-03-01T06:00:00Z
    end: 2027-05-31T12:00:00Z
    reason: spring mornings
  - users: [alice]
    devices: [gym]
    start: 2027-09-01T16:00:00Z
    end: 2027-11-30T22:00:00Z
    reason: autumn evenings
"""


def gym_windows(h):
    return sorted((p["start"][:19], p["end"][:19]) for p in h.sim.state["permissions"].values()
                  if p["lockingDeviceId"] == GYM and p["userId"] != h.sim.credentials["user_id"])


def test_two_windows_for_one_person_and_door_converge_on_abloy(harness):
    harness.write(SPLIT)
    first = harness.plan()
    assert sorted(c.address for c in first.changes if c.kind == "permission" and "alice" in c.address) == [
        "hq/permission/alice/gym/OPEN@2027-03-01T06:00:00Z", "hq/permission/alice/gym/OPEN@2027-09-01T16:00:00Z"]
    harness.converge()
    ours = [w for w in gym_windows(harness) if w[0].startswith("2027")]
    assert ours == [("2027-03-01T06:00:00", "2027-05-31T12:00:00"), ("2027-09-01T16:00:00", "2027-11-30T22:00:00")]
    assert not harness.plan().has_changes
    # Moving one window updates that grant in place; the other is untouched.
    harness.write(SPLIT.replace("2027-11-30T22:00:00Z", "2027-12-15T22:00:00Z"))
    [change] = [c for c in harness.plan().changes if "alice" in c.address]
    assert (change.action, change.changed, change.effect) == (Action.UPDATE, ("end",), "grant")
    harness.converge()
    assert not harness.plan().has_changes
    # Back to one window: the other grant is revoked, the remaining one keeps its address.
    one = SPLIT.split("  - users: [alice]\n    devices: [gym]\n    start: 2027-09-01")[0]
    harness.write(one)
    [change] = [c for c in harness.plan().changes if "alice" in c.address]
    assert (change.address, change.action, change.effect) == (
        f"hq/permission/alice/gym/OPEN#{change.live.id}", Action.DELETE, "revoke")
    assert change.live.attributes["start"] == "2027-09-01T16:00:00Z"
    harness.converge()
    assert [w for w in gym_windows(harness) if w[0].startswith("2027")] == [("2027-03-01T06:00:00",
                                                                             "2027-05-31T12:00:00")]
    assert not harness.plan().has_changes


def load(tmp_path: Path, text: str):
    (tmp_path / "p.yaml").write_text(textwrap.dedent(text))
    return load_policy(tmp_path / "p.yaml", capabilities(), {})


def test_overlapping_windows_are_still_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PolicyError) as caught:
        load(tmp_path, SPLIT.replace("2027-09-01T16:00:00Z", "2027-05-01T16:00:00Z").replace(
            "users:\n", "systems:\n  hq: {vendor: abloy-keyless, url: sandbox}\nusers:\n", 1))
    [line] = caught.value.lines()
    assert "alice's OPEN on 'gym' is also granted at" in line and "windows that do not overlap" in line


def test_sentry_holds_one_share_per_person_and_lock_and_refuses_two_windows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PolicyError) as caught:
        load(tmp_path, """\
            systems:
              office: {vendor: sentry, url: sandbox}
            users:
              alice: {email: alice@example.com}
            devices:
              room: {system: office, id: 3f1c9a52-0e7b-4d2e-9b1a-5f0c2d7e8a11}
            permissions:
              - users: [alice]
                devices: [room]
                start: 2027-01-01T00:00:00Z
                end: 2027-02-01T00:00:00Z
              - users: [alice]
                devices: [room]
                start: 2027-06-01T00:00:00Z
                end: 2027-07-01T00:00:00Z
            """)
    assert caught.value.lines() == [
        "p.yaml:12:5: alice's access to 'room' is also granted at p.yaml:8:5 in another window; sentry holds one "
        "grant per person and lock, so it cannot hold two windows: merge them into one window"]


def test_unloc_holds_two_windows_as_two_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    policy = load(tmp_path, """\
        systems:
          cabins: {vendor: unloc, url: sandbox, lock_holder_id: 866b8a35-4184-44c5-8ffd-448a77e5a91c}
        users:
          eva: {phone: "+4790000005"}
        devices:
          cabin: {system: cabins, id: 0634f1ba-e175-49e8-98bc-32b11505107b}
        permissions:
          - {users: [eva], devices: [cabin], end: 2027-01-01T00:00:00Z}
          - {users: [eva], devices: [cabin], start: 2027-06-01T00:00:00Z}
        """)
    assert [r.name for r in policy.resources if r.kind == "key"] == ["eva/cabin@2027-06-01T00:00:00Z", "eva/cabin@now"]


# -- the first plan ------------------------------------------------------------------------------------------

def test_first_plan_calls_undeclared_access_not_in_policy_and_later_plans_drift():
    stranger = grant("id:7c1e")
    first = plan([], [stranger], now=NOW)
    assert first.changes[0].origin == "unmanaged"
    assert "[not in policy]" in render_text(first) and "[drift" not in render_text(first)
    markdown = render_markdown(first)
    assert "Drift" not in markdown and "— not in the policy" in markdown
    later = plan([], [stranger], now=NOW, applied={"hq/permission/bob/door/OPEN": "sha256:x"})
    assert later.changes[0].origin == "drift" and "[drift: changed outside git]" in render_text(later)


def test_a_group_gaining_doors_is_one_line_with_the_people_folded():
    desired = [Resource("hq", "permission", f"u{n:02d}/{door}/OPEN", {"start": None, "end": "2027-12-31T23:59:59Z"},
                        meta={"via": ("group:ops",)}, source="policies/access.yaml:9")
               for n in range(40) for door in ("lab-1", "main-entrance")]
    text = render_markdown(plan(desired, [], now=NOW))
    access = text.split("#### Access changes", 1)[1].split("<details><summary>All changes", 1)[0]
    [line] = [line for line in access.splitlines() if line.startswith("- ")]
    assert line.startswith("- group `ops` (40 people) gains access to **lab-1**, **main-entrance** (`hq`), "
                           "until 2027-12-31 23:59 UTC — `policies/access.yaml:9` <details><summary>40 people")


def test_two_windows_for_one_person_and_lock_converge_on_unloc(tmp_path):
    from harness import UNLOC, VendorHarness
    from test_unloc import CAROL, GATE, lock_keys

    h = VendorHarness(tmp_path, UNLOC)
    split = """\
        users:
          carol: {phone: "%s"}
        devices:
          gate: {system: cabins, id: %s}
        permissions:
          - {users: [carol], devices: [gate], start: 2027-03-01T06:00:00Z, end: 2027-05-31T12:00:00Z}
          - {users: [carol], devices: [gate], start: 2027-09-01T16:00:00Z, end: 2027-11-30T22:00:00Z}
        """ % (CAROL, GATE)
    h.write(textwrap.dedent(split))
    h.converge()
    h.sim.settle()
    mine = sorted((k["start"][:19], k["end"][:19]) for k in lock_keys(h.sim, GATE)
                  if k["toUser"]["id"] == CAROL and k["state"] in ("scheduled", "active"))
    assert mine == [("2027-03-01T06:00:00", "2027-05-31T12:00:00"), ("2027-09-01T16:00:00", "2027-11-30T22:00:00")]
    assert not h.plan().has_changes
    h.write(textwrap.dedent(split).replace("2027-11-30T22:00:00Z", "2027-12-15T22:00:00Z"))
    [change] = h.plan().changes
    assert (change.address, change.action, change.effect) == (
        "cabins/key/carol/gate@2027-09-01T16:00:00Z", Action.REPLACE, "grant")
    h.converge()
    h.sim.settle()
    assert not h.plan().has_changes


def test_a_narrowing_update_runs_with_the_revocations():
    result = plan([grant(end="2027-01-31T00:00:00Z"), grant("bob")], [grant()], now=NOW)
    phases = {c.address: c.phase for c in result.changes}
    assert phases == {"hq/permission/alice/door/OPEN": 0, "hq/permission/bob/door/OPEN": 4}


def test_an_admin_account_on_abloy_is_a_granting_privilege_change_end_to_end(harness):
    harness.write("users:\n  kari: {role: ADMIN}\n  lars: {}\n")
    result = harness.plan()
    data = json.loads(render_json(result))
    kari = next(c for c in data["changes"] if c["address"] == "hq/user/kari")
    assert (kari["action"], kari["effect"], kari.get("privilege")) == ("create", "grant", True)
    assert "(1 granting access, 0 revoking access)" in render_text(result)
    assert "**privilege**: **kari** gets an ADMIN account on `hq`" in render_markdown(result)
    harness.converge()
    assert not harness.plan().has_changes
