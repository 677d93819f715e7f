"""Markdown plans for pull-request comments: access changes in words first, the rest folded, bounded size."""

from __future__ import annotations

from datetime import UTC, datetime

from reconciler.planner import plan
from reconciler.render import COMMENT_LIMIT, render_markdown
from reconciler.resources import Resource, Status, digest

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
OFFICE = [{"day": d, "from": "08:00", "to": "18:00"} for d in ("mon", "tue", "wed", "thu", "fri")]


def permission(user, device, op="OPEN", via=("group:staff",), **attrs):
    window = {"start": "2026-01-01T00:00:00Z", "end": "2027-12-31T23:59:59Z", "key_validity": "P8D", **attrs}
    return Resource("hq", "permission", f"{user}/{device}/{op}", window, meta={"via": via, "reason": "FAC-1"},
                    source="policies/access.yaml:4")


def key(user, device, **attrs):
    return Resource("cabins", "key", f"{user}/{device}", {"start": "2026-12-01T00:00:00Z", "end": None, **attrs},
                    meta={"via": ("user",)}, replace_on_change=True, source="policies/cabins.yaml:9")


def sample_plan():
    desired = [
        permission("alice", "front-gate"),                                    # grant
        permission("carol", "server-room", "UPDATE_FIRMWARE", via=("user",)),
        permission("dave", "front-gate", end="2028-06-30T00:00:00Z"),         # update
        key("erin", "cabin-7", schedule=OFFICE),                              # replace (schedule changed)
        Resource("hq", "invitation", "alice", {"phone": "+4790000001"}),     # pending
        permission("gus", "front-gate", end="2026-01-31T00:00:00Z"),          # ended: warning
        Resource("guests", "temp_key", "cleaning-week-48", {"access": "users", "users": ["carol@example.com"],
                 "start": "2026-11-23T08:00:00Z", "end": "2026-11-29T18:00:00Z", "max_uses": 10,
                 "description": "cleaning"}, source="policies/guests.yaml:2"),
    ]
    live = [
        permission("dave", "front-gate"),
        permission("id:7c1e", "front-gate"),                                  # revoke: granted outside git
        permission("bob", "front-gate"),                                      # revoke: removed from policy
        Resource("hq", "user", "bob", {"role": "USER"}, id="u-bob"),          # offboarding
        key("erin", "cabin-7", schedule=OFFICE[:3]),
        Resource("hq", "invitation", "alice", {"phone": "+4790000001"}, status=Status.PENDING,
                 meta={"pending": "invitation sent by SMS; waiting for the user", "expires": "2026-11-29T00:00:00Z"}),
        Resource("hq", "device", "id:99", {"name": "Roof Access"}, id="99", managed=False),
    ]
    applied = {"hq/permission/bob/front-gate/OPEN": digest(dict(permission("bob", "front-gate").attributes))}
    return plan(desired, live, now=NOW, applied=applied)


def test_markdown_plan_snapshot(snapshot):
    text = render_markdown(sample_plan())
    assert text == snapshot


def test_markdown_states_totals_and_access_first():
    text = render_markdown(sample_plan())
    lines = text.splitlines()
    assert lines[0] == "### reconciler plan"
    assert lines[1].startswith("**3 to create, 1 to update, 3 to delete, 1 to replace**")
    assert text.index("#### Access changes") < text.index("<details>")
    assert "**alice** gains access to **front-gate** (`hq`), from 2026-01-01 00:00 UTC, until 2027-12-31 23:59 UTC, " \
           "through group `staff`" in text
    assert "**bob** is removed from `hq`" in text
    assert "granted outside git" in text
    assert "Mon–Fri 08:00–18:00" in text


def test_ten_thousand_changes_fit_in_one_comment():
    desired = [permission(f"user{n:05d}", f"door{n % 400:03d}") for n in range(10_000)]
    big = plan(desired, [], now=NOW)
    text = render_markdown(big)
    assert len(text) <= COMMENT_LIMIT
    assert "**10000 to create, 0 to update, 0 to delete, 0 to replace**" in text.splitlines()[1]
    assert text.index("#### Access changes") < 300
    assert "more: see the full plan in the `plan.json` artifact" in text
