"""#21: single-object answers are input too. A create answer without its id, with an id of the wrong type,
truncated, or an HTML page with 200 is a vendor fault naming system, method and path (exit 1, never an
internal error). The vendor said 2xx, so the object may exist: the create is uncertain, sent once only,
nothing is recorded as created on a guess, and the next read settles it (by its natural key or the
intent), as after a lost answer. Every vendor, through a hostile transport in front of its simulator.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from harness import ABLOY, SENTRY, SPKEY, UNLOC, UNLOC_PARTNER, Vendor, VendorHarness

from reconciler import run
from reconciler.cli import main
from reconciler.errors import ExitCode
from reconciler.providers.answers import VendorFault
from reconciler.sandbox import unloc as unloc_sandbox
from reconciler.sandbox import unloc_partner as partner_sandbox
from reconciler.sandbox.abloy import SEED_DEVICES
from reconciler.sandbox.spkey import SEED_LOCKS as SPKEY_LOCKS

NOW = "2026-11-22T10:00:00Z"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@dataclass(frozen=True)
class Case:
    vendor: Vendor
    policy: str
    address: str
    path: str                               # the create's path, as the fault line names it
    missing_id: dict
    wrong_type: dict

    def is_create(self, request: httpx.Request) -> bool:
        return request.method == "POST" and request.url.path == self.path


CASES = {
    "abloy-device": Case(ABLOY, "devices:\n  annex: {system: hq, name: Annex Door}\n", "hq/device/annex",
                         "/administration/locking-device", {"name": "Annex Door"}, {"id": 42}),
    "abloy-permission": Case(
        ABLOY, f"users:\n  alice: {{}}\ndevices:\n  gym: {{system: hq, id: {SEED_DEVICES['Gym']}}}\n"
               "permissions:\n  - users: [alice]\n    devices: [gym]\n    start: 2026-01-01T00:00:00Z\n"
               "    end: 2099-12-31T23:59:59Z\n",
        "hq/permission/alice/gym/OPEN", "/administration/permission", {"userId": "x"}, {"id": ["a"]}),
    "unloc": Case(UNLOC, "users:\n  bob: {phone: \"+4790000002\"}\ndevices:\n"
                         f"  cabin: {{system: cabins, id: {unloc_sandbox.SEED_LOCKS['Cabin 7']}}}\n"
                         "permissions:\n  - users: [bob]\n    devices: [cabin]\n",
                  "cabins/key/bob/cabin",
                  f"/integrators/v1/lock-holders/{unloc_sandbox.LOCK_HOLDER_ID}/locks/"
                  f"{unloc_sandbox.SEED_LOCKS['Cabin 7']}/keys/",
                  {"key": {"state": "creating"}}, {"key": {"id": 7}}),
    "unloc-partner": Case(UNLOC_PARTNER, "users:\n  alice: {phone: \"+4790000001\"}\ndevices:\n"
                                         f"  apartment: {{system: rentals, id: \"{partner_sandbox.SEED_LOCKS['Hjemme']}\"}}\n"
                                         "permissions:\n  - users: [alice]\n    devices: [apartment]\n",
                          "rentals/key/alice/apartment", f"/v1/partners/{partner_sandbox.PARTNER_ID}/keys",
                          {"state": "pending-approval"}, {"id": {"nested": True}}),
    "spkey": Case(SPKEY, "users:\n  maria: {email: maria@cleanco.example}\ndevices:\n"
                         f"  flat-3: {{system: guests, id: {SPKEY_LOCKS['Guest Flat 3']}}}\n"
                         "temp_keys:\n  delivery:\n    device: flat-3\n    access: public\n"
                         "    start: 2026-11-24T09:00:00Z\n    end: 2026-11-24T17:00:00Z\n    max_uses: 1\n",
                  "guests/temp_key/delivery", f"/locks/{SPKEY_LOCKS['Guest Flat 3']}/create-temp-key",
                  {"success": True}, {"success": True, "tempKeyUuid": 5}),
}

BODIES: dict[str, Callable[[Case], tuple[bytes, str]]] = {
    "missing id": lambda case: (json.dumps(case.missing_id).encode(), "application/json"),
    "wrong type": lambda case: (json.dumps(case.wrong_type).encode(), "application/json"),
    "truncated JSON": lambda case: (b'{"id": "3f1c9a52-0e7b-4d', "application/json"),
    "HTML with 200": lambda case: (b"<html><body>Created</body></html>", "text/html"),
}
WORDS = {"missing id": "Field required", "wrong type": "", "truncated JSON": "not valid JSON",
         "HTML with 200": "Content-Type text/html, not JSON"}


def hostile_creates(h: VendorHarness, case: Case, body: tuple[bytes, str]) -> tuple[list[str], dict[str, bool]]:
    """Every create of `case` reaches the simulator (it is made) but its answer is replaced by `body` while
    `switch["on"]`; returns the creates seen (honest or not) and the switch."""
    honest = h.sim.handle
    creates: list[str] = []
    switch = {"on": True}

    def handle(request: httpx.Request) -> httpx.Response:
        response = honest(request)
        if case.is_create(request):
            creates.append(request.url.path)
            if switch["on"] and response.status_code < 300:
                return httpx.Response(201 if case.vendor is ABLOY else 200,
                                      headers={"Content-Type": body[1]}, content=body[0])
        return response
    h.sim.handle = handle
    return creates, switch


@pytest.mark.parametrize("kind", list(BODIES))
@pytest.mark.parametrize("name", list(CASES))
def test_a_malformed_create_answer_is_an_uncertain_vendor_fault_settled_by_the_next_read(tmp_path, name, kind):
    case = CASES[name]
    h = VendorHarness(tmp_path, case.vendor)
    h.write(case.policy)
    creates, switch = hostile_creates(h, case, BODIES[kind](case))
    _, report = h.apply()
    assert not report.internal and not report.ok
    assert len(creates) == 1, creates             # sent once: not looked up and sent again on a guess
    [why] = [why for change, why in report.uncertain if change.address == case.address]
    system = case.vendor.system
    assert why.startswith(f"{system}: POST {case.path}: the vendor's answer is malformed"), why
    assert WORDS[kind] in why and "the create may have taken effect" in why and "\n" not in why
    record = run.open_state(h.session()).get(case.address) or {}
    assert not record.get("id"), record           # nothing recorded as created on a guess
    # The vendor answers properly again: the next read finds what the create made; nothing is made twice.
    switch["on"] = False
    plan = h.plan()
    assert case.address not in {c.address for c in plan.changes}, [(c.action, c.address) for c in plan.changes]
    h.converge()
    assert not h.plan().has_changes
    assert len(creates) == 1, creates


def test_a_malformed_single_answer_on_sentry_is_a_vendor_fault_and_nothing_is_signed(tmp_path):
    # Sentry's shares are signed upserts (204, no body): its single-object answers are the key registration
    # and the directory. A malformed one is a vendor fault naming system, method and path; nothing is signed.
    from test_sentry import FRONT, STAFF, staff_policy

    for n, (path, body) in enumerate((("/auth/certificate", {"certificateChain": "not a list", "userId": "u"}),
                                      ("/auth/certificate", {"certificateChain": ["x"]}),
                                      ("/directory/query", {"publicKey": "k"}),
                                      ("/directory/query", b"<html>ok</html>"))):
        work = tmp_path / str(n)
        work.mkdir()
        h = VendorHarness(work, SENTRY)
        h.write(staff_policy("front", FRONT, STAFF[:2]))
        honest = h.sim.handle

        def handle(request, path=path, body=body, honest=honest):
            response = honest(request)
            if request.method == "POST" and request.url.path == path and response.status_code < 300:
                if isinstance(body, bytes):
                    return httpx.Response(200, headers={"Content-Type": "text/html"}, content=body)
                return httpx.Response(200, json=body)
            return response
        h.sim.handle = handle
        try:
            _, report = h.apply()
        except VendorFault as fault:     # in the reads (the directory): the plan stops, exit 1
            assert fault.exit_code == ExitCode.ERROR
            lines = [str(fault)]
        else:                            # in apply (the key registration): each share fails, apply exits 1
            assert not report.ok and not report.internal and not report.uncertain
            lines = [why for _, why in report.failed]
        assert lines and all(line.startswith(f"office: POST {path}: the vendor's answer is malformed")
                             for line in lines), lines
        assert h.sim.count("POST", f"/device/{FRONT}/execute") == 0


# -- through the CLI: exit 1 and the one line, never exit 3 --------------------------------------------------

CLI_CASES = [
    # (example directory, simulator class, the create's path suffix, body kind)
    ("quickstart", "reconciler.sandbox.abloy:AbloySimulator", "/permission", "missing id"),
    ("unloc", "reconciler.sandbox.unloc:UnlocSimulator", "/keys/", "HTML with 200"),
    ("unloc-partner", "reconciler.sandbox.unloc_partner:UnlocPartnerSimulator", "/keys", "truncated JSON"),
    ("spkey", "reconciler.sandbox.spkey:SpkeySimulator", "/create-temp-key", "wrong type"),
]
CLI_BODIES = {"missing id": (b'{"name": "x"}', "application/json"), "HTML with 200": (b"<html>ok</html>", "text/html"),
              "truncated JSON": (b'{"id": "ab', "application/json"),
              "wrong type": (b'{"success": true, "tempKeyUuid": 5, "id": 5}', "application/json")}


@pytest.mark.parametrize("example, simulator, suffix, kind", CLI_CASES)
def test_a_malformed_create_answer_exits_1_naming_system_method_and_path(tmp_path, monkeypatch, example, simulator,
                                                                         suffix, kind):
    import importlib

    module, cls = simulator.split(":")
    sim_class = getattr(importlib.import_module(module), cls)
    honest = sim_class.handle
    switch = {"on": True}
    creates: list[str] = []
    content, content_type = CLI_BODIES[kind]

    def handle(self, request):
        response = honest(self, request)
        if request.method == "POST" and request.url.path.endswith(suffix) and response.status_code < 300:
            creates.append(request.url.path)
            if switch["on"]:
                return httpx.Response(response.status_code, headers={"Content-Type": content_type}, content=content)
        return response
    monkeypatch.setattr(sim_class, "handle", handle)
    shutil.copytree(EXAMPLES / example, tmp_path / "policies")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RECONCILER_STATE", raising=False)
    runner = CliRunner()

    def invoke(*args: str) -> tuple[int, str]:
        result = runner.invoke(main, [*args, "--now", NOW], catch_exceptions=False)
        return result.exit_code, result.stdout + (result.stderr if result.stderr_bytes is not None else "")

    code, output = invoke("apply", "--auto-approve")
    assert code == 1, output
    assert "internal error" not in output.lower()
    assert any(": POST " in line and suffix in line and "the vendor's answer is malformed" in line
               for line in output.splitlines()), output
    sent = len(creates)
    assert sent
    switch["on"] = False
    code, output = invoke("apply", "--auto-approve")
    assert code == 0, output
    code, output = invoke("plan", "--detailed-exitcode")
    assert code == 0, output
    assert len(creates) == sent       # what the malformed answers hid was found, not created again


@pytest.mark.parametrize("path, change, words", [
    ("/device", lambda body: [{**lock, "settings": "on"} for lock in body], "settings"),
    ("/device/{FRONT}/users", lambda body: [{**m, "start": "tomorrow"} for m in body], "start"),
    ("/device/{FRONT}/users", lambda body: [{**m, "end": 1e300} for m in body], "end"),
])
def test_sentry_fields_the_plan_reads_are_checked_too(tmp_path, path, change, words):
    # A lock's settings that are not an object, a share's window that is not epoch seconds (or past year 9999)
    # were a Python error deep in the plan: now one line naming system, method and path.
    from test_sentry import FRONT, STAFF, staff_policy

    h = VendorHarness(tmp_path, SENTRY)
    h.write(staff_policy("front", FRONT, STAFF[:2]))
    h.converge()
    target = path.format(FRONT=FRONT)
    honest = h.sim.handle

    def handle(request):
        response = honest(request)
        if request.method == "GET" and request.url.path == target:
            response.read()
            return httpx.Response(200, json=change(response.json()))
        return response
    h.sim.handle = handle
    with pytest.raises(VendorFault) as caught:
        h.plan()
    assert str(caught.value).startswith(f"office: GET {target}: the vendor's answer is malformed"), str(caught.value)
    assert words in str(caught.value)
