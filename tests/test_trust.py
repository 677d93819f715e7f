"""Never act on a guess: lost answers with somebody else's create, refused and lost invitations, HTTP
semantics of "did it happen", deadlines and the shared failed login. Against the Abloy simulator with
its fault injection; the end-to-end cases run the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from conftest import reconciler_command, serve_sandboxes
from reconciler.errors import VendorError
from reconciler.providers.http import Deadline, HttpClient
from reconciler.sandbox.abloy import GATEWAY_CLAIMING_CODES
from reconciler.state import LocalState
from test_abloy_provider import vendor

POLICY = """\
users:
  alice: {phone: "+4790000001", mobile_key: true}
devices:
  annex: {system: hq, name: Annex Door}
permissions:
  - users: [alice]
    devices: [annex]
    start: 2026-01-01T00:00:00Z
    end: 2027-12-31T23:59:59Z
"""


NOW_TEXT = "2026-11-22T10:00:00Z"


def _state(h) -> LocalState:
    return LocalState(h.tmp_path / "state" / "state.json")


def _grants_of(h, user_id: str) -> list[dict]:
    return [p for p in vendor(h, "/permission") if p["userId"] == user_id]


def _ours(h) -> set[str]:
    return {u["id"] for u in vendor(h, "/user")} - {h.sim.credentials["user_id"]}


# -- 1. proof, not guesses ----------------------------------------------------------------------------

@pytest.mark.parametrize("landed", [True, False], ids=["ours-landed", "ours-lost"])
def test_lost_user_answer_plus_a_strangers_create_gives_the_stranger_nothing(harness, landed):
    harness.write(POLICY)
    before = _ours(harness)
    stranger: list[str] = []
    harness.sim.faults.add("POST", r"/user$", commit=landed, lost="502" if landed else "timeout",
                           then=lambda: stranger.append(harness.sim.add_user("USER")))
    _, report = harness.apply()
    assert [c.address for c, _ in report.uncertain] == ["hq/user/alice"]
    assert not report.ok
    assert "hq/permission/alice/annex/OPEN" in {c.address for c, _ in report.skipped}
    assert _grants_of(harness, stranger[0]) == []

    plan = harness.plan()
    assert not plan.has_changes      # nothing created twice, nothing granted to an unproven account
    uncertain = {n.address: n.message for n in plan.warnings if dict(n.details).get("uncertain")}
    assert set(uncertain) == {"hq/user/alice", "hq/permission/alice/annex/OPEN", "hq/invitation/alice"}
    assert stranger[0] in uncertain["hq/user/alice"] and "ids: {hq: <id>}" in uncertain["hq/user/alice"]
    harness.apply()
    assert _grants_of(harness, stranger[0]) == []
    assert len(_ours(harness) - before) == (2 if landed else 1)     # no second create was sent

    if landed:
        # The operator checks by hand and adopts the right account.
        mine = sorted(_ours(harness) - before - set(stranger))[0]
        harness.write(POLICY.replace('alice: {phone', f'alice: {{ids: {{hq: {mine}}}, phone'))
    else:
        # None of the candidates is alice's: the operator says so, and alice is created.
        from reconciler import run
        run.forget(harness.session(), "hq/user/alice")
    harness.converge()
    assert not harness.plan().has_changes
    alice = _state(harness).id_of("hq/user/alice") or (mine if landed else None)
    assert alice and alice != stranger[0]
    assert len(_grants_of(harness, alice)) == 1
    assert _grants_of(harness, stranger[0]) == []


def test_kill_between_intent_and_post_with_a_strangers_create_adopts_nothing(harness):
    """An intent journaled, then the process died before the POST; meanwhile the helpdesk made a user."""
    harness.write(POLICY)
    known = sorted(_ours(harness))
    state = _state(harness)
    with state:
        state.put("hq/user/alice", {"intent": "create", "known": known, "at": "2026-11-22T09:59:00Z"})
    stranger = harness.sim.add_user("USER")
    plan = harness.plan()
    assert "hq/user/alice" not in {c.address for c in plan.changes}
    assert "hq/permission/alice/annex/OPEN" not in {c.address for c in plan.changes}
    harness.apply()
    assert _grants_of(harness, stranger) == []


def test_detailed_exitcode_does_not_call_an_uncertain_system_matching(harness, monkeypatch):
    from click.testing import CliRunner

    from reconciler import run
    from reconciler.cli import main
    harness.write(POLICY)
    harness.sim.faults.add("POST", r"/user$", commit=True, lost="502")
    harness.apply()
    real_plan = run.plan
    monkeypatch.setattr(run, "plan", lambda session: real_plan(harness.session()))
    result = CliRunner().invoke(main, ["plan", "--detailed-exitcode"])
    assert result.exit_code == 2, result.output
    assert "uncertain: the answer to creating user alice" in result.output


def test_kill_between_intent_and_post_without_anyone_else_creates_it_once(harness):
    harness.write(POLICY)
    state = _state(harness)
    with state:
        state.put("hq/user/alice", {"intent": "create", "known": sorted(_ours(harness)), "at": "2026-11-22T09:59:00Z"})
    before = _ours(harness)
    harness.converge()
    assert len(_ours(harness) - before) == 1
    assert not harness.plan().has_changes


def test_lost_gateway_claim_answer_is_uncertain_until_adopted_by_id(harness):
    policy = POLICY + f"gateways:\n  lobby: {{system: hq, claiming_code: {GATEWAY_CLAIMING_CODES[0]}, devices: [annex]}}\n"
    harness.write(policy)
    harness.sim.faults.add("POST", r"/gateway-device$", commit=True, lost="502")
    _, report = harness.apply()
    assert [c.address for c, _ in report.uncertain] == ["hq/gateway/lobby"]
    assert vendor(harness, "/gateway-device-association") == []     # nothing tied to an unproven gateway
    [note] = [n for n in harness.plan().warnings if n.address == "hq/gateway/lobby"]
    [candidate] = dict(note.details)["candidates"]
    assert "`id: <id>` on gateways.lobby" in note.message
    harness.write(policy.replace("lobby: {system: hq, claiming_code", f"lobby: {{system: hq, id: {candidate}, claiming_code"))
    harness.converge()
    assert len(vendor(harness, "/gateway-device-association")) == 1
    assert not harness.plan().has_changes


def test_lost_device_answer_is_settled_by_the_name_it_was_given(harness):
    harness.write(POLICY)
    harness.sim.faults.add("POST", r"/locking-device$", commit=True, lost="502")
    _, report = harness.apply()
    assert report.ok, report.lines()
    assert len([d for d in vendor(harness, "/locking-device") if d["name"] == "Annex Door"]) == 1


# -- 3. HTTP semantics and invitations ------------------------------------------------------------------

def test_invitation_answered_503_is_retried_and_sent_once(harness):
    harness.write(POLICY)
    harness.sim.faults.add("POST", r"/operating-device-invitation$", status=503, times=2)
    _, report = harness.apply()
    assert report.ok, report.lines()
    assert len(harness.sim.invitations()) == 1


def test_invitation_refused_with_503_is_a_failure_not_a_pending_invitation(harness):
    harness.write(POLICY)
    harness.sim.faults.add("POST", r"/operating-device-invitation$", status=503, times=None)
    _, report = harness.apply()
    assert [c.address for c, _ in report.failed] == ["hq/invitation/alice"]
    assert not report.ok
    assert harness.sim.invitations() == []
    assert _state(harness).get("hq/invitation/alice") is None
    harness.sim.faults.clear()
    plan = harness.plan()
    assert [c.address for c in plan.changes] == ["hq/invitation/alice"]     # not "pending" for 7 days
    assert not plan.pending
    harness.converge()
    assert len(harness.sim.invitations()) == 1


@pytest.mark.parametrize("how", ["lost-answer", "killed-while-sending"])
def test_possibly_sent_invitation_is_uncertain_and_never_sent_twice(harness, how):
    harness.write(POLICY)
    if how == "lost-answer":
        harness.sim.faults.add("POST", r"/operating-device-invitation$", commit=True, lost="502")
        _, report = harness.apply()
        assert [c.address for c, _ in report.uncertain] == ["hq/invitation/alice"]
    else:
        harness.write(POLICY.replace(", mobile_key: true", ""))
        harness.converge()
        harness.write(POLICY)
        state = _state(harness)
        with state:   # what a kill during the POST leaves: the intent, no answer
            state.put("hq/invitation/alice", {"intent": "create", "user": state.id_of("hq/user/alice"),
                                              "phone": "+4790000001", "at": "2026-11-22T10:00:00Z",
                                              "expires": "2026-11-29T10:00:00Z"})
    sent = len(harness.sim.invitations())
    plan = harness.plan()
    assert not plan.has_changes
    [note] = [n for n in plan.warnings if n.address == "hq/invitation/alice"]
    assert dict(note.details).get("uncertain") and "may have been sent" in note.message
    harness.apply()
    harness.apply()
    assert len(harness.sim.invitations()) == sent        # no second SMS code while the first may be valid
    expires = datetime.fromisoformat(_state(harness).get("hq/invitation/alice")["expires"].replace("Z", "+00:00"))
    harness.now = max(harness.now, expires) + timedelta(days=1)      # once the first code can no longer be used
    assert [c.address for c in harness.plan().changes] == ["hq/invitation/alice"]


def _client(handler, **options) -> HttpClient:
    return HttpClient("https://vendor.test", system="hq", transport=httpx.MockTransport(handler),
                      sleep=lambda s: None, **options)


@pytest.mark.parametrize("failure", [503, 429, "connect"])
def test_not_processed_answers_are_sent_again_even_for_creates(failure):
    calls = []

    def handler(request):
        calls.append(request)
        if len(calls) < 3:
            if failure == "connect":
                raise httpx.ConnectError("refused", request=request)
            return httpx.Response(failure, headers={"Retry-After": "0"})
        return httpx.Response(201, json={"id": "x"})

    assert _client(handler).request("POST", "/user", json={}, idempotent=False).json() == {"id": "x"}
    assert len(calls) == 3


@pytest.mark.parametrize("failure", [502, 504, "read-timeout", "disconnected"])
def test_uncertain_answers_to_a_create_are_looked_up_never_resent(failure):
    calls = []

    def handler(request):
        calls.append(request)
        if failure == "read-timeout":
            raise httpx.ReadTimeout("no answer", request=request)
        if failure == "disconnected":
            raise httpx.RemoteProtocolError("server disconnected", request=request)
        return httpx.Response(failure)

    with pytest.raises(VendorError) as raised:
        _client(handler).request("POST", "/user", json={}, idempotent=False)
    assert raised.value.ambiguous and len(calls) == 1
    calls.clear()
    with pytest.raises(VendorError) as raised:      # a read is repeatable: retried, then a plain failure
        _client(handler).request("GET", "/user")
    assert not raised.value.ambiguous and len(calls) == 6


# -- 4. deadlines and the shared login ----------------------------------------------------------------

def test_deadline_bounds_a_vendor_that_never_answers():
    def handler(request):
        time.sleep(0.2)
        raise httpx.ReadTimeout("no answer", request=request)

    client = _client(handler, max_attempts=100)
    client.start_phase(Deadline(0.5))
    started = time.monotonic()
    with pytest.raises(VendorError, match=r"^hq: the vendor did not answer within 0.5 s$"):
        client.request("GET", "/user")
    assert time.monotonic() - started < 5


def test_a_failed_login_is_shared_by_every_reader_not_repeated(harness):
    harness.write(POLICY)
    harness.sim.faults.add("POST", r"/login$", status=503, times=None)
    with pytest.raises(VendorError, match="login failed"):
        harness.plan()
    assert harness.sim.count("POST", "/administration/login") == 6    # one login sequence, not one per reader


def _silent_server():
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []

    def loop():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return
    threading.Thread(target=loop, daemon=True).start()
    return server, accepted


def test_plan_against_a_vendor_that_never_answers_ends_at_the_deadline_with_one_line(tmp_path):
    server, accepted = _silent_server()
    try:
        port = server.getsockname()[1]
        (tmp_path / "p.yaml").write_text(
            f"systems:\n  hq:\n    vendor: abloy-keyless\n    url: http://127.0.0.1:{port}/administration\n"
            "    deadline: 2\n    credentials:\n      user_id: ${ABLOY_USER_ID}\n"
            "      access_key: ${ABLOY_ACCESS_KEY}\n      api_key: ${ABLOY_API_KEY}\n"
            "users:\n  alice: {}\n")
        env = {**os.environ, "ABLOY_USER_ID": "u", "ABLOY_ACCESS_KEY": "secret-access", "ABLOY_API_KEY": "secret-api",
               "RECONCILER_STATE": str(tmp_path / "state.json")}
        started = time.monotonic()
        result = subprocess.run([*reconciler_command(), "plan", "p.yaml", "--now", "2026-11-22T10:00:00Z"],
                                capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
        elapsed = time.monotonic() - started
    finally:
        server.close()
        for conn in accepted:
            conn.close()
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["hq: the vendor did not answer within 2 s"]
    assert elapsed < 15
    assert len(accepted) <= 2      # one login attempt, not one per reader thread


# -- 5. Ctrl-C ------------------------------------------------------------------------------------------

def test_ctrl_c_stops_sending_at_once_says_what_remains_and_the_next_apply_finishes(tmp_path):
    """SIGINT in the middle of a long apply against a served, rate-limited sandbox: the run stops sending,
    exits within 20 s saying what was applied and what remains; the next apply finishes, no duplicate."""
    root_dir = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with serve_sandboxes(tmp_path, "--rate-limit", "20") as (root, printed):
        credentials = {k: v for k, v in printed.items() if k.startswith("ABLOY_")}
        shutil.copytree(root_dir / "policies", tmp_path / "policies")
        (tmp_path / "policies" / "cabins.yaml").unlink()
        (tmp_path / "policies" / "systems.yaml").write_text(
            f"systems:\n  hq:\n    vendor: abloy-keyless\n    url: {root}/abloy-keyless\n"
            "    credentials:\n      user_id: ${ABLOY_USER_ID}\n      access_key: ${ABLOY_ACCESS_KEY}\n"
            "      api_key: ${ABLOY_API_KEY}\n")
        run_env = {**env, **credentials, "RECONCILER_STATE": str(tmp_path / "state.json")}
        victim = subprocess.Popen([*reconciler_command(), "apply", "--auto-approve", "--now", NOW_TEXT],
                                  env=run_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        done_before = 0
        for line in victim.stdout:
            if line.endswith("done\n"):
                done_before += 1
                if done_before == 10:
                    victim.send_signal(signal.SIGINT)
                    interrupted_at = time.monotonic()
                    break
        out, err = victim.communicate(timeout=60)
        exited_after = time.monotonic() - interrupted_at
        assert done_before == 10, "the apply finished before it could be interrupted"
        assert exited_after < 20
        assert victim.returncode == 1
        done_after = out.count("done\n")
        assert done_after <= 8            # at most what was in flight (concurrency 8); nothing new started
        assert "Interrupted: sending nothing new" in err
        assert "apply incomplete: interrupted:" in err and "not attempted" in err
        assert "every completed change is recorded" not in err
        assert "not applied:" in err and "interrupted before it started" in err

        finish = subprocess.run([*reconciler_command(), "apply", "--auto-approve", "--now", NOW_TEXT],
                                env=run_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert finish.returncode == 0, finish.stderr
        final = subprocess.run([*reconciler_command(), "plan", "--format", "json", "--detailed-exitcode",
                                "--now", NOW_TEXT], env=run_env, cwd=tmp_path, capture_output=True, text=True,
                               timeout=120)
        assert final.returncode == 0, final.stdout + final.stderr
        unmanaged_users = [n for n in json.loads(final.stdout)["unmanaged"] if n["kind"] == "user"]
        assert len(unmanaged_users) == 2      # the two seeded ones: no duplicate of ours


def test_second_ctrl_c_exits_at_once_and_still_tells_the_truth(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    root_dir = Path(__file__).resolve().parent.parent
    with serve_sandboxes(tmp_path, "--rate-limit", "5") as (root, printed):
        credentials = {k: v for k, v in printed.items() if k.startswith("ABLOY_")}
        shutil.copytree(root_dir / "policies", tmp_path / "policies")
        (tmp_path / "policies" / "cabins.yaml").unlink()
        (tmp_path / "policies" / "systems.yaml").write_text(
            f"systems:\n  hq:\n    vendor: abloy-keyless\n    url: {root}/abloy-keyless\n"
            "    credentials:\n      user_id: ${ABLOY_USER_ID}\n      access_key: ${ABLOY_ACCESS_KEY}\n"
            "      api_key: ${ABLOY_API_KEY}\n")
        run_env = {**env, **credentials, "RECONCILER_STATE": str(tmp_path / "state.json")}
        victim = subprocess.Popen([*reconciler_command(), "apply", "--auto-approve", "--now", NOW_TEXT],
                                  env=run_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        for line in victim.stdout:
            if line.endswith("done\n"):
                victim.send_signal(signal.SIGINT)
                time.sleep(0.05)
                victim.send_signal(signal.SIGINT)
                started = time.monotonic()
                break
        out, err = victim.communicate(timeout=30)
        assert time.monotonic() - started < 5
        assert victim.returncode == 1
        # Either the second Ctrl-C came while requests were in flight (exit at once), or the first had
        # already finished them and the report was being printed: both say what remains.
        assert ("Interrupted again: exiting now" in err and "uncertain" in err) or \
            "apply incomplete: interrupted:" in err, err
        assert "every completed change is recorded" not in err
        finish = subprocess.run([*reconciler_command(), "apply", "--auto-approve", "--now", NOW_TEXT],
                                env=run_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert finish.returncode in (0, 1), finish.stderr
