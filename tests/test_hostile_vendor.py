"""A hostile or buggy vendor: every answer is input, checked like a policy file.

Each test puts a hostile transport between reconciler and the Abloy simulator (an httpx `MockTransport` that
rewrites the simulator's answers), and checks that one glitch in an answer takes nobody's access away, that
vendor text cannot write policy, and that a malformed answer is the vendor's fault in one line (exit 1).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest
import yaml
from test_abloy_provider import POLICY

from reconciler.errors import ExitCode, ReconcilerError, RefusedError, VendorError
from reconciler.export import export_system
from reconciler.plan import Action
from reconciler.providers.answers import VendorFault

Rewrite = Callable[[httpx.Request, httpx.Response], httpx.Response]


def hostile(h, rewrite: Rewrite) -> None:
    """Every answer of `h.sim` passes through `rewrite(request, response)` on its way to reconciler."""
    honest = h.sim.handle

    def handle(request: httpx.Request) -> httpx.Response:
        response = honest(request)
        response.read()
        return rewrite(request, response)
    h.sim.handle = handle


def with_body(response: httpx.Response, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-encoding")}
    return httpx.Response(response.status_code, headers=headers, content=content)


def listing(path: str, change: Callable[[dict], object]) -> Rewrite:
    """Rewrite the JSON page of GET `path` (the first page only, where the listing pages)."""
    def rewrite(request: httpx.Request, response: httpx.Response) -> httpx.Response:
        if request.method == "GET" and request.url.path.endswith(path) and "next-page-token" not in request.url.params:
            body = response.json()
            result = change(body)
            return with_body(response, body if result is None else result)
        return response
    return rewrite


def test_a_repeated_permission_revokes_nothing(harness):
    # Finding 1: one permission repeated in the listing (a paging glitch) got a `#<id>` address, and apply
    # deleted alice's declared grant. Identical repeats are one object.
    harness.write(POLICY)
    harness.converge()
    hostile(harness, listing("/permission", lambda body: body["items"].append(dict(body["items"][0]))))
    plan = harness.plan()
    assert not plan.has_changes, [(c.action, c.address) for c in plan.changes]


def test_two_different_objects_with_one_id_are_a_vendor_fault(harness):
    harness.write(POLICY)
    harness.converge()

    def twin(body):
        body["items"].append({**body["items"][0], "operationType": "UPDATE_FIRMWARE"})
    hostile(harness, listing("/permission", twin))
    with pytest.raises(VendorFault, match=r"hq: GET /permission: .*two different objects with id"):
        harness.plan()


@pytest.mark.parametrize("path", ["/user", "/permission", "/locking-device"])
@pytest.mark.parametrize("body", [{"items": None}, {}])
def test_a_missing_list_is_a_vendor_fault_never_an_empty_system(harness, path, body):
    # Finding 6: `items: null` read as "no users" made the plan create every user again.
    harness.write(POLICY)
    harness.converge()
    sent = []
    honest = listing(path, lambda _: body)

    def rewrite(request, response):
        if request.method != "GET":
            sent.append(request.method)
        return honest(request, response)
    hostile(harness, rewrite)
    with pytest.raises(VendorFault) as caught:
        harness.plan()
    assert caught.value.exit_code == ExitCode.ERROR
    line = str(caught.value)
    assert line.startswith("hq: GET /administration" + path) and "items" in line and "\n" not in line
    assert sent == ["POST"]     # the login; nothing else


@pytest.mark.parametrize("content, content_type, words", [
    (b'{"items": [{"id": "2f0e', "application/json", "not valid JSON"),
    (b"<html><body>Service Unavailable</body></html>", "text/html", "not JSON"),
    (b'{"items": "nothing"}', "application/json", "items"),
    (b'{"items": [{"role": "USER"}]}', "application/json", "items.0.id"),
    (b'{"items": [{"id": 42, "role": "USER"}]}', "application/json", "items.0.id"),
    (b"", "application/json", "empty body"),
])
def test_a_malformed_answer_is_the_vendors_fault_in_one_line(harness, content, content_type, words):
    # Finding 7: truncated JSON, an HTML page with 200, a string for a list, a missing id were "internal
    # error … a bug in reconciler" (exit 3), naming neither system nor endpoint.
    harness.write(POLICY)

    def rewrite(request, response):
        if request.method == "GET" and request.url.path.endswith("/user"):
            return httpx.Response(200, headers={"Content-Type": content_type}, content=content)
        return response
    hostile(harness, rewrite)
    with pytest.raises(VendorError) as caught:
        harness.plan()
    error = caught.value
    assert isinstance(error, VendorFault) and error.exit_code == ExitCode.ERROR
    assert str(error).startswith("hq: GET /administration/user: the vendor's answer is malformed")
    assert words in str(error) and "\n" not in str(error)


def test_a_malformed_answer_exits_1_through_the_cli(harness, monkeypatch, capsys):
    from reconciler import cli

    harness.write(POLICY)
    hostile(harness, lambda request, response: httpx.Response(200, headers={"Content-Type": "text/html"},
                                                               content=b"<html>oops</html>")
            if request.url.path.endswith("/locking-device") else response)
    error = pytest.raises(ReconcilerError, harness.plan).value
    assert error is not None and cli is not None
    assert error.exit_code == 1 and "hq: GET /administration/locking-device" in str(error)


def test_a_listing_that_lost_most_recorded_objects_is_refused_with_the_numbers(harness, monkeypatch):
    many = POLICY.replace("  carol: {role: ADMIN}\n", "  carol: {role: ADMIN}\n" + "".join(
        f"  admin{i}: {{role: ADMIN}}\n" for i in range(12)))
    harness.write(many)
    harness.converge()

    def lose(body):
        body["items"] = [u for u in body["items"] if u.get("role") != "ADMIN"]
    hostile(harness, listing("/user", lose))
    with pytest.raises(RefusedError, match=r"hq: refused as suspicious: the vendor listed 2 of the 15 users the state recorded as existing \(13 missing\)"):
        harness.plan()
    # The operator who knows the system was emptied says so for this run.
    monkeypatch.setenv("RECONCILER_ACCEPT_EMPTIED", "hq")
    plan = harness.plan()
    assert [c.action for c in plan.changes if c.kind == "user"].count(Action.CREATE) == 13


def test_a_new_system_with_nothing_recorded_is_not_suspicious(harness):
    harness.write(POLICY)
    assert harness.plan().has_changes      # the state records nothing: nothing can have been lost


HOSTILE_SERIAL = "SN-1\ndecommission: true\n\x1b[2J\r::error::pwned"


def test_export_writes_vendor_text_as_scalars_and_escaped_comments(harness):
    # Finding 2: a serial number with a newline and `decommission: true` was written raw into a comment: the
    # exported file validated and its plan deleted a claimed lock. ESC and CR landed in the file too.
    harness.write("{}\n")
    for path in harness.policy_dir.iterdir():
        if path.name != "systems.yaml":
            path.unlink()

    def serial(body):
        for item in body["items"]:
            item["serialNumber"] = HOSTILE_SERIAL
            item["name"] = "Door\n::add-mask::x\x1b[2J\rdecommission: true"
    hostile(harness, listing("/locking-device", serial))
    hostile(harness, listing("/gateway-device", serial))
    text = export_system(harness.session(), "hq")
    assert "\x1b" not in text and "\r" not in text
    assert not [line for line in text.splitlines() if line.lstrip().startswith(("decommission", "::"))]
    document = yaml.safe_load(text)
    assert all("decommission" not in entry for entry in document["devices"].values())
    names = {entry.get("name") for entry in document["devices"].values()}
    assert "Door\n::add-mask::x\x1b[2J\rdecommission: true" in names   # the vendor's text, as a scalar
    (harness.policy_dir / "hq.yaml").write_text(text)
    plan = harness.plan()
    assert not [c for c in plan.changes if c.action in (Action.DELETE, Action.REPLACE)]


def test_a_revocation_the_vendor_does_not_carry_out_is_not_in_effect(harness):
    # Finding 8: a vendor that answered 204 to a DELETE and kept the permission: apply said "delete done",
    # exit 0, on every run; the next plan called the survivor drift.
    harness.write(POLICY)
    harness.converge()
    narrowed = POLICY[:POLICY.index("  - users: [alice]\n    devices: [gym]")]
    harness.write(narrowed)

    ignored = []
    honest = harness.sim.handle

    def handle(request):
        if request.method == "DELETE" and "/permission/" in request.url.path:
            ignored.append(request.url.path)
            return httpx.Response(204)        # acknowledged, and not done
        return honest(request)
    harness.sim.handle = handle
    plan, report = harness.apply()
    deletes = [c for c in plan.changes if c.action is Action.DELETE and c.kind == "permission"]
    assert deletes and ignored
    assert not report.ok and not report.done
    assert all("not in effect" in why for _, why in report.failed), report.failed
    again = harness.plan()
    survivors = [c for c in again.changes if c.action is Action.DELETE and c.kind == "permission"]
    assert survivors and all(c.origin == "not in effect" for c in survivors)
    assert any("not in effect" in n.message for n in again.warnings)
    # Once the vendor does carry it out, the mark goes.
    harness.sim.handle = honest
    harness.converge()
    assert not harness.plan().has_changes


def test_sentry_a_repeated_lock_member_revokes_no_declared_share(tmp_path):
    # Finding 1 on Sentry: the last lock member repeated made the plan revoke declared shares.
    from harness import SENTRY, VendorHarness
    from test_sentry import FRONT, STAFF, staff_policy

    h = VendorHarness(tmp_path, SENTRY)
    h.write(staff_policy("front", FRONT, STAFF[:3]))
    _, report = h.apply()
    assert report.ok, report.lines()
    honest = h.sim.handle

    def handle(request):
        response = honest(request)
        if request.method == "GET" and request.url.path.endswith(f"/device/{FRONT}/users"):
            response.read()
            members = response.json()
            return with_body(response, [*members, dict(members[-1])])
        return response
    h.sim.handle = handle
    plan = h.plan()
    assert not plan.has_changes, [(c.action, c.address) for c in plan.changes]


@pytest.mark.parametrize("body", [b'{"role": "USER"}', b"<html>created</html>", b'[{"id": "x"}]'])
def test_a_malformed_create_answer_is_an_uncertain_create_the_next_read_settles(harness, body):
    # The vendor said 2xx: the object may exist. The fault is reported in one line and the create is uncertain
    # (apply exits 1), never sent again in the same run nor recorded on a guess: its intent stays, and the next
    # read adopts the one new unclaimed device with our name, as it does after a lost answer.
    harness.write(POLICY)
    honest = harness.sim.handle
    posts = []

    def handle(request):
        response = honest(request)
        if request.method == "POST" and request.url.path.endswith("/locking-device"):
            posts.append(request.url.path)
            return httpx.Response(201, headers={"Content-Type": "application/json"}, content=body)
        return response
    harness.sim.handle = handle
    _, report = harness.apply()
    assert not report.internal and not report.ok and len(posts) == 1
    [why] = [why for c, why in report.uncertain if c.address == "hq/device/annex"]
    assert why.startswith("hq: POST /administration/locking-device: the vendor's answer is malformed")
    from reconciler import run
    assert run.open_state(harness.session()).get("hq/device/annex")["intent"] == "create"   # no id on a guess
    harness.sim.handle = honest
    plan = harness.plan()
    assert "hq/device/annex" not in {c.address for c in plan.changes if c.action is Action.CREATE}
    harness.converge()
    from test_abloy_provider import vendor
    assert [d["name"] for d in vendor(harness, "/locking-device")].count("Annex Door") == 1


def test_a_malformed_create_answer_leaves_an_unprovable_create_uncertain(harness):
    harness.write(POLICY)
    honest = harness.sim.handle

    def handle(request):
        response = honest(request)
        if request.method == "POST" and request.url.path.endswith("/user"):
            return httpx.Response(201, headers={"Content-Type": "application/json"}, content=b'{"role": "USER"}')
        return response
    harness.sim.handle = handle
    _, report = harness.apply()
    assert not report.internal
    # The vendor said 201: the account may exist. It is uncertain (looked up, never sent twice blindly).
    lines = report.remaining()
    assert any(line.startswith("hq/user/alice: UNCERTAIN whether it was created") for line in lines), lines


def test_a_date_that_does_not_parse_is_a_vendor_fault(harness):
    harness.write(POLICY)
    harness.converge()

    def garble(body):
        body["items"][0]["end"] = "next tuesday"
    hostile(harness, listing("/permission", garble))
    with pytest.raises(VendorFault, match=r"^hq: GET /permission: the vendor's answer is malformed: permission .*"
                                          r"next tuesday"):
        harness.plan()


def test_export_never_folds_a_long_vendor_string_onto_a_line_that_begins_with_a_workflow_command(harness):
    harness.write("{}\n")
    for path in harness.policy_dir.iterdir():
        if path.name != "systems.yaml":
            path.unlink()
    names = ["word " * n + "::error::folded" for n in range(20, 30)]

    def rename(body):
        for item, name in zip(body["items"], names * 10, strict=False):
            item["name"] = name
    hostile(harness, listing("/locking-device", rename))
    text = export_system(harness.session(), "hq")
    assert not [line for line in text.splitlines() if line.lstrip().startswith("::")]
    assert any(name in {e.get("name") for e in yaml.safe_load(text)["devices"].values()} for name in names)
