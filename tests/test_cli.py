"""The CLI end to end: the commands a user runs, their output and exit codes.

In-process runs (click's runner) use `url: sandbox`; the served tests start `reconciler sandbox serve`
as a separate process on 127.0.0.1 and drive the CLI against it over real sockets.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from reconciler.cli import main
from reconciler.sandbox.abloy import SEED_DEVICES

from conftest import free_port, reconciler_command, serve_sandboxes

ROOT = Path(__file__).resolve().parent.parent
INVALID = Path(__file__).parent / "data" / "invalid"
NOW = "2026-11-22T10:00:00Z"
ENV = {"ABLOY_USER_ID": "u", "ABLOY_ACCESS_KEY": "k", "ABLOY_API_KEY": "a"}

SMALL = f"""\
systems:
  hq: {{vendor: abloy-keyless, url: sandbox}}
users:
  alice: {{phone: "+4790000001"}}
  bob: {{}}
devices:
  gym: {{system: hq, id: {SEED_DEVICES['Gym']}}}
  annex: {{system: hq, name: Annex}}
permissions:
  - users: [alice, bob]
    devices: [gym, annex]
    start: 2026-01-01T00:00:00Z
    end: 2027-12-31T23:59:59Z
    reason: FAC-1
"""


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RECONCILER_STATE", raising=False)
    runner = CliRunner()

    def invoke(*args: str, env: dict[str, str] | None = None):
        return runner.invoke(main, list(args), env=env, catch_exceptions=False)
    return invoke


def test_sandbox_policy_plan_apply_plan(cli, tmp_path):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(SMALL)
    assert cli("validate").exit_code == 0
    first = cli("plan", "--detailed-exitcode", "--now", NOW)
    assert first.exit_code == 2, first.output
    assert "+ hq/permission/alice/gym/OPEN  [grant]" in first.output
    assert cli("apply", "--auto-approve", "--now", NOW).exit_code == 0
    again = cli("plan", "--detailed-exitcode", "--now", NOW)
    assert again.exit_code == 0, again.output
    assert "No changes." in again.output
    assert (tmp_path / ".reconciler" / "state.json").exists()
    assert (tmp_path / ".reconciler" / "sandbox" / "hq.json").exists()


def test_text_plan_snapshot(cli, tmp_path, snapshot):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(SMALL)
    result = cli("plan", "--now", NOW)
    assert result.exit_code == 0
    assert result.output == snapshot


def test_json_plan_is_the_contract_and_out_matches(cli, tmp_path):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(SMALL)
    result = cli("plan", "--format", "json", "--out", "plan.json", "--now", NOW)
    data = json.loads(result.output)
    assert data == json.loads((tmp_path / "plan.json").read_text())
    assert data["format_version"] == 1 and data["now"] == NOW
    assert data["summary"]["create"] == 2 + 1 + 4
    change = next(c for c in data["changes"] if c["address"] == "hq/permission/alice/gym/OPEN")
    assert change == {"address": "hq/permission/alice/gym/OPEN", "system": "hq", "kind": "permission",
                      "action": "create", "effect": "grant", "before": None,
                      "after": {"start": "2026-01-01T00:00:00Z", "end": "2027-12-31T23:59:59Z", "key_validity": "P8D"},
                      "source": "policies/p.yaml:10", "reason": "FAC-1", "origin": "policy", "via": ["user"],
                      # every key on every change, null where it does not apply (schema/plan.schema.json)
                      "access": None, "privilege": None, "changed": None, "looks_like": None,
                      "enforcement": {"from": NOW, "by": None, "basis": "from its start, once the phone has "
                                                                       "fetched its operating keys"}}


def test_saved_plan_applies_exactly_or_is_refused_when_stale(cli, tmp_path):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(SMALL)
    cli("plan", "--out", "plan.json", "--now", NOW)
    # The policy changes behind the saved plan: refused, nothing sent.
    (tmp_path / "policies" / "p.yaml").write_text(SMALL.replace("bob: {}", "bob: {}\n  carol: {}"))
    stale = cli("apply", "--plan", "plan.json", "--auto-approve", "--now", NOW)
    assert stale.exit_code == 1 and "stale" in stale.output
    assert "hq/user/carol" in stale.output
    assert not (tmp_path / ".reconciler" / "state.json").exists() or \
        "hq/user" not in (tmp_path / ".reconciler" / "state.json").read_text()
    (tmp_path / "policies" / "p.yaml").write_text(SMALL)
    ok = cli("apply", "--plan", "plan.json", "--auto-approve", "--now", NOW)
    assert ok.exit_code == 0, ok.output
    assert cli("plan", "--detailed-exitcode", "--now", NOW).exit_code == 0


def test_apply_without_terminal_or_approval_is_refused(cli, tmp_path):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(SMALL)
    result = cli("apply", "--now", NOW)
    assert result.exit_code == 1 and "pass --auto-approve" in result.output
    assert cli("plan", "--detailed-exitcode", "--now", NOW).exit_code == 2


def _invalid_cases() -> list[Path]:
    return sorted(INVALID.iterdir())


@pytest.mark.parametrize("case", _invalid_cases(), ids=lambda p: p.name)
def test_invalid_policy_exits_1_with_location_and_sends_nothing(cli, case, monkeypatch):
    sent: list[str] = []
    real_send = httpx.Client.send
    monkeypatch.setattr(httpx.Client, "send", lambda self, request, **kw: sent.append(str(request.url))
                        or real_send(self, request, **kw))
    for command in ("validate", "plan"):
        result = cli(command, str(case), env=ENV)
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert lines and all(re.match(r"^[^:]+\.ya?ml:\d+:\d+: \S", line) for line in lines), result.output
    assert sent == []


def test_literal_secret_is_never_echoed(cli, tmp_path):
    (tmp_path / "p.yaml").write_text("systems:\n  hq:\n    vendor: abloy-keyless\n    credentials:\n"
                                     "      user_id: hunter2-secret-value\n")
    result = cli("validate", "p.yaml")
    assert result.exit_code == 1 and "hunter2-secret-value" not in result.output


# -- served sandbox, separate processes --------------------------------------------------------------------

_free_port, _reconciler = free_port, reconciler_command


@pytest.fixture
def served(tmp_path):
    with serve_sandboxes(tmp_path) as (root, printed):
        yield f"{root}/abloy-keyless", {k: v for k, v in printed.items() if k.startswith("ABLOY_")}


def test_cli_end_to_end_against_served_sandbox(tmp_path, served):
    url, credentials = served
    policy = tmp_path / "policies"
    policy.mkdir()
    (policy / "systems.yaml").write_text(
        f"systems:\n  hq:\n    vendor: abloy-keyless\n    url: {url}\n    credentials:\n"
        "      user_id: \"${ABLOY_USER_ID}\"\n      access_key: \"${ABLOY_ACCESS_KEY}\"\n      api_key: \"${ABLOY_API_KEY}\"\n")
    (policy / "access.yaml").write_text(SMALL.split("users:", 1)[1].join(["users:", ""]))
    env = {**os.environ, **credentials, "RECONCILER_STATE": str(tmp_path / "state.json")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*_reconciler(), *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=120)

    first = run("plan", "--detailed-exitcode", "--now", NOW)
    assert first.returncode == 2, first.stderr
    applied = run("apply", "--auto-approve", "--now", NOW)
    assert applied.returncode == 0, applied.stderr
    final = run("plan", "--detailed-exitcode", "--now", NOW)
    assert final.returncode == 0, final.stdout + final.stderr
    for output in (first, applied, final):
        for secret in credentials.values():
            assert secret not in output.stdout + output.stderr
    assert credentials["ABLOY_API_KEY"] not in (tmp_path / "state.json").read_text()


def test_wrong_api_key_is_one_clear_line(tmp_path, served):
    url, credentials = served
    (tmp_path / "p.yaml").write_text(
        f"systems:\n  hq:\n    vendor: abloy-keyless\n    url: {url}\n    credentials:\n"
        "      user_id: \"${ABLOY_USER_ID}\"\n      access_key: \"${ABLOY_ACCESS_KEY}\"\n      api_key: \"${ABLOY_API_KEY}\"\n")
    env = {**os.environ, **credentials, "ABLOY_API_KEY": "wrong-key-value", "RECONCILER_STATE": str(tmp_path / "s.json")}
    result = subprocess.run([*_reconciler(), "plan", "p.yaml"], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=60)
    assert result.returncode == 1
    assert "403" in result.stderr and "Traceback" not in result.stderr
    assert "wrong-key-value" not in result.stderr


def test_apply_killed_mid_run_is_finished_by_the_next_apply(tmp_path):
    """kill -9 in the middle of an apply against a served, rate-limited sandbox; the next apply finishes
    the job and nothing is duplicated (a duplicate user would show up as an unmanaged one)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with serve_sandboxes(tmp_path, "--rate-limit", "30") as (root, printed):
        credentials = {k: v for k, v in printed.items() if k.startswith("ABLOY_")}
        shutil.copytree(ROOT / "policies", tmp_path / "policies")
        (tmp_path / "policies" / "cabins.yaml").unlink()   # this test is about one Abloy system
        (tmp_path / "policies" / "systems.yaml").write_text(
            f"systems:\n  hq:\n    vendor: abloy-keyless\n    url: {root}/abloy-keyless\n"
            "    credentials:\n      user_id: \"${ABLOY_USER_ID}\"\n      access_key: \"${ABLOY_ACCESS_KEY}\"\n"
            "      api_key: \"${ABLOY_API_KEY}\"\n")
        run_env = {**env, **credentials, "RECONCILER_STATE": str(tmp_path / "state.json")}
        victim = subprocess.Popen([*_reconciler(), "apply", "--auto-approve", "--now", NOW], env=run_env, cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        done_lines = []
        for line in victim.stdout:          # kill once some changes are through, others not yet
            if line.endswith("done\n"):
                done_lines.append(line)
                if len(done_lines) == 12:
                    victim.kill()
                    break
        victim.wait(30)
        victim.stdout.close()
        assert len(done_lines) == 12, "the apply finished before it could be interrupted"
        middle = subprocess.run([*_reconciler(), "plan", "--detailed-exitcode", "--now", NOW], env=run_env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert middle.returncode == 2
        finish = subprocess.run([*_reconciler(), "apply", "--auto-approve", "--now", NOW], env=run_env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        if finish.returncode == 1 and "uncertain" in finish.stderr:
            # Killed while a user create was on the wire: no account can be proven to be it, so the run says
            # so and grants nothing. The operator checks (here: nobody else creates users) and adopts it.
            _adopt_uncertain_users(tmp_path, run_env)
            finish = subprocess.run([*_reconciler(), "apply", "--auto-approve", "--now", NOW], env=run_env,
                                    cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert finish.returncode == 0, finish.stderr
        final = subprocess.run([*_reconciler(), "plan", "--format", "json", "--detailed-exitcode", "--now", NOW],
                               env=run_env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert final.returncode == 0, final.stdout + final.stderr
        unmanaged_users = [n for n in json.loads(final.stdout)["unmanaged"] if n["kind"] == "user"]
        assert len(unmanaged_users) == 2    # the two the sandbox was seeded with; no duplicate of ours


def _adopt_uncertain_users(tmp_path, env):
    """What an operator does after checking by hand (here: nobody else creates users or claims gateways)
    which candidates are ours: adopt one each by id. Creates of one kind run concurrently, so a kill may
    leave several unsettled at once, each with every new object as a candidate; one whose create never
    landed (no candidate left for it) is forgotten, and created again."""
    plan = subprocess.run([*_reconciler(), "plan", "--format", "json", "--now", NOW], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    taken = set()
    for note in json.loads(plan.stdout)["warnings"]:
        if not (note.get("uncertain") and note.get("candidates")):
            continue
        free = [c for c in note["candidates"] if c not in taken]
        if not free:
            subprocess.run([*_reconciler(), "state", "forget", note["address"]], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120, check=True)
            continue
        candidate = free[0]
        taken.add(candidate)
        name = note["address"].split("/")[-1]
        for path in (tmp_path / "policies").glob("*.yaml"):
            text = path.read_text()
            if note["kind"] == "user":
                text = re.sub(rf"^(  {name}:\s*{{)", rf"\g<1>ids: {{hq: {candidate}}}, ", text, flags=re.M)
            elif note["kind"] == "gateway":
                text = re.sub(rf"^(  {name}:\n)", rf"\g<1>    id: {candidate}\n", text, flags=re.M)
            path.write_text(text)
