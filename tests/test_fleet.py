"""A fleet on one shared PostgreSQL state: runners applying different systems (`--target`) at once, each
holding only its systems' locks. Against the real server at RECONCILER_TEST_PG; nothing is mocked. Each runner
is a working directory of its own with the demo policy (two systems: hq on Abloy, cabins on Unloc, both
embedded sandboxes under the runner's own `.reconciler/`), driving the CLI in a separate process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import reconciler_command
from test_state_postgres import CLI_NOW, CROWD, _crowd, _finish, _wait_for_done, pg_server, pg_url  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Fleet:
    dirs: list[Path]
    env: dict[str, str]

    def run(self, which: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
        process = subprocess.Popen([*reconciler_command(), *args], env=self.env, cwd=self.dirs[which],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        watchdog = threading.Timer(timeout, process.kill)
        watchdog.start()
        try:
            out, err = process.communicate()
        finally:
            watchdog.cancel()
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def start(self, which: int, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*reconciler_command(), *args], env=self.env, cwd=self.dirs[which],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def records(self, which: int, system: str) -> dict[str, object]:
        pulled = self.run(which, "state", "pull")
        assert pulled.returncode == 0, pulled.stderr
        data = json.loads(pulled.stdout)
        return {a: r for a, r in data["resources"].items() if a.startswith(system + "/")} | \
            {f"applied:{a}": d for a, d in data["applied"].items() if a.startswith(system + "/")}


@pytest.fixture
def fleet(tmp_path, pg_url):
    dirs = []
    for name in ("runner-a", "runner-b", "runner-c"):
        work = tmp_path / name
        shutil.copytree(ROOT / "policies", work / "policies")
        (work / "policies" / "crowd.yaml").write_text(_crowd())     # hq's apply lasts long enough to be caught
        dirs.append(work)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RECONCILER_STATE": pg_url}
    env.pop("RECONCILER_REVISION", None)
    return Fleet(dirs, env)


def test_two_runners_apply_disjoint_systems_at_once_and_neither_waits(fleet):
    hq = fleet.start(0, "apply", "--auto-approve", "--target", "hq", "--now", CLI_NOW)
    try:
        _wait_for_done(hq, 3)                 # it holds hq's lock and is sending ...
        hq.send_signal(signal.SIGSTOP)        # ... and stays in the middle
        started = time.monotonic()
        # No --lock-timeout: a runner that had to wait for any lock would be refused at once.
        cabins = fleet.run(1, "apply", "--auto-approve", "--target", "cabins", "--now", CLI_NOW)
        took = time.monotonic() - started
        blocked = fleet.run(2, "apply", "--auto-approve", "--target", "hq", "--now", CLI_NOW)
        assert hq.poll() is None              # hq's apply was in the middle all along: the two overlapped
        hq.send_signal(signal.SIGCONT)
        rest = _finish(hq)
    finally:
        hq.send_signal(signal.SIGCONT)
        hq.kill()
    assert cabins.returncode == 0, cabins.stdout + cabins.stderr
    assert "done" in cabins.stdout and "cabins/" in cabins.stdout and "hq/" not in cabins.stdout
    assert "Partial plan: only cabins" in cabins.stdout
    assert took < 120, took
    assert blocked.returncode == 1, blocked.stdout + blocked.stderr
    assert "system 'hq' of state" in blocked.stderr and "is locked by another apply: host" in blocked.stderr
    assert hq.returncode == 0, rest
    assert rest.count(" done") >= CROWD
    # Each runner's sandboxes are its own: each system converged where it was applied from.
    for which, system in ((0, "hq"), (1, "cabins")):
        final = fleet.run(which, "plan", "--detailed-exitcode", "--target", system, "--now", CLI_NOW)
        assert final.returncode == 0, final.stdout + final.stderr
    whole = fleet.run(0, "plan", "--now", CLI_NOW, "--format", "json")
    assert "targets" not in json.loads(whole.stdout)


def test_a_kill_in_one_runner_leaves_the_other_runners_systems_untouched(fleet):
    cabins = fleet.run(1, "apply", "--auto-approve", "--target", "cabins", "--now", CLI_NOW)
    assert cabins.returncode == 0, cabins.stdout + cabins.stderr
    before = fleet.records(1, "cabins")
    assert before
    victim = fleet.start(0, "apply", "--auto-approve", "--target", "hq", "--now", CLI_NOW)
    try:
        _wait_for_done(victim, 12)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    finally:
        victim.kill()
        assert victim.stdout is not None
        victim.stdout.close()
    assert fleet.records(1, "cabins") == before
    again = fleet.run(1, "plan", "--detailed-exitcode", "--target", "cabins", "--now", CLI_NOW)
    assert again.returncode == 0, again.stdout + again.stderr      # cabins: nothing to do
    finish = fleet.run(0, "apply", "--auto-approve", "--target", "hq", "--now", CLI_NOW)   # the lock died with it
    assert finish.returncode in (0, 1), finish.stdout + finish.stderr
    assert "locked" not in finish.stderr


def test_a_targeted_plan_is_partial_in_every_format_and_a_saved_one_keeps_its_scope(fleet, tmp_path):
    out = tmp_path / "cabins.json"
    planned = fleet.run(1, "plan", "--target", "cabins", "--out", str(out), "--now", CLI_NOW)
    assert planned.returncode == 0, planned.stderr
    assert "Partial plan: only cabins" in planned.stdout
    data = json.loads(out.read_text())
    assert data["targets"] == ["cabins"]
    assert data["changes"] and all(c["system"] == "cabins" for c in data["changes"])
    markdown = fleet.run(1, "plan", "--target", "cabins", "--format", "markdown", "--now", CLI_NOW)
    assert "**Partial plan**: only cabins" in markdown.stdout
    other = fleet.run(1, "apply", "--plan", str(out), "--target", "hq", "--auto-approve", "--now", CLI_NOW)
    assert other.returncode == 1 and "covers targets ['cabins']" in other.stderr, other.stderr
    applied = fleet.run(1, "apply", "--plan", str(out), "--auto-approve", "--now", CLI_NOW)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "hq/" not in applied.stdout
    unknown = fleet.run(1, "plan", "--target", "nowhere", "--now", CLI_NOW)
    assert unknown.returncode == 1 and "--target 'nowhere'" in unknown.stderr, unknown.stderr


def test_a_targeted_address_brings_what_it_depends_on(fleet, tmp_path):
    out = tmp_path / "one.json"
    whole = fleet.run(1, "plan", "--format", "json", "--now", CLI_NOW)
    grant = next(c for c in json.loads(whole.stdout)["changes"] if c["kind"] == "permission" and c["system"] == "hq")
    planned = fleet.run(1, "plan", "--target", grant["address"], "--out", str(out), "--now", CLI_NOW)
    assert planned.returncode == 0, planned.stderr
    changes = json.loads(out.read_text())["changes"]
    addresses = {c["address"] for c in changes}
    assert grant["address"] in addresses
    assert {c["kind"] for c in changes} <= {"permission", "user", "device", "gateway", "association", "invitation"}
    assert any(c["kind"] == "user" for c in changes)          # the person it grants to is created first
    assert len(changes) < len(json.loads(whole.stdout)["changes"]) / 4


def test_access_live_reads_the_shared_state(fleet):
    applied = fleet.run(1, "apply", "--auto-approve", "--target", "hq", "--now", CLI_NOW)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    live = fleet.run(1, "access", "--live", "--format", "json")
    assert live.returncode == 0, live.stderr
    rows = [r for r in json.loads(live.stdout) if r["system"] == "hq"]
    # Abloy accounts are known by the ids the state keeps (in PostgreSQL here): named, not `id:…`.
    assert len([r for r in rows if r["user"].startswith("crowd-")]) >= CROWD, live.stdout[:2000]


def test_a_stuck_holder_is_named_while_waiting_and_its_lock_can_be_broken(fleet):
    hq = fleet.start(0, "apply", "--auto-approve", "--target", "hq", "--now", CLI_NOW)
    try:
        _wait_for_done(hq, 3)
        hq.send_signal(signal.SIGSTOP)        # stuck, holding hq's lock
        waiting = fleet.run(2, "apply", "--auto-approve", "--target", "hq", "--lock-timeout", "1s", "--now", CLI_NOW)
        assert waiting.returncode == 1, waiting.stdout + waiting.stderr
        assert "waiting for the lock of system 'hq'" in waiting.stderr and f"process {hq.pid}" in waiting.stderr
        assert "after waiting 1s" in waiting.stderr and "reconciler state unlock hq" in waiting.stderr
        broken = fleet.run(2, "state", "unlock", "hq")
        assert broken.returncode == 0, broken.stdout + broken.stderr
        assert f"Broke lock hq, held by host" in broken.stdout and f"process {hq.pid}" in broken.stdout
        again = fleet.run(2, "state", "unlock", "hq")
        assert again.returncode != 0 and "is not held" in again.stderr
        hq.send_signal(signal.SIGCONT)         # it wakes without its lock: it must stop, not go on
        rest = _finish(hq)
        assert hq.returncode != 0, rest
    finally:
        hq.send_signal(signal.SIGCONT)
        hq.kill()
