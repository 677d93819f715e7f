"""`reconciler apply --wait`: the CLI, in its own process, against vendor sandboxes served on 127.0.0.1 (their
clock running from NOW), waits until the vendor has put each change in force: an Unloc key out of `creating`, an
Unloc Partner key on an opt-in lock approved; a key gone to `error`, a denied key or one still `creating` when
time is up exits 1 naming it. The sandboxes' own hooks (`fail_key`, `approve`, `deny`) play the vendor's side."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import NOW, reconciler_command

from reconciler import run
from reconciler.sandbox import unloc, unloc_partner
from reconciler.sandbox.server import start_in_thread
from reconciler.sandbox.unloc import SEED_LOCKS, UnlocSimulator
from reconciler.sandbox.unloc_partner import UnlocPartnerSimulator

NOW_TEXT = NOW.strftime("%Y-%m-%dT%H:%M:%SZ")
BOB = "+4790000002"


def unloc_policy(url: str, lock: str) -> str:
    return f"""\
systems:
  cabins:
    vendor: unloc
    url: {url}
    lock_holder_id: {unloc.LOCK_HOLDER_ID}
    credentials: {{client_id: "${{UNLOC_CLIENT_ID}}", client_secret: "${{UNLOC_CLIENT_SECRET}}"}}
users:
  bob: {{phone: "{BOB}"}}
devices:
  cabin: {{system: cabins, id: {lock}}}
permissions:
  - users: [bob]
    devices: [cabin]
"""


def partner_policy(url: str) -> str:
    return f"""\
systems:
  rentals:
    vendor: unloc-partner
    url: {url}
    partner_id: {unloc_partner.PARTNER_ID}
    credentials: {{api_key: "${{UNLOC_PARTNER_KEY}}"}}
users:
  bob: {{phone: "{BOB}"}}
devices:
  cabin: {{system: rentals, id: "{unloc_partner.SEED_LOCKS['Hytte']}"}}
permissions:
  - users: [bob]
    devices: [cabin]
    end: 2099-01-01T00:00:00Z
"""


class Served:
    """One simulator served on 127.0.0.1 in this process, its clock running from NOW; the CLI runs apart."""

    def __init__(self, tmp_path: Path, sim, prefix: str, env: dict[str, str]):
        self.tmp_path, self.sim, self.env = tmp_path, sim, env
        self.server, base = start_in_thread("127.0.0.1", 0, {prefix: sim.handle})
        self.url = f"{base}{prefix}"

    def write(self, text: str) -> None:
        (self.tmp_path / "policies").mkdir(exist_ok=True)
        (self.tmp_path / "policies" / "p.yaml").write_text(text)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.env, "RECONCILER_STATE": str(self.tmp_path / "state.json")}
        env.pop("RECONCILER_DEBUG", None)
        return subprocess.run([*reconciler_command(), *args, "--now", NOW_TEXT], capture_output=True, text=True,
                              env=env, cwd=self.tmp_path, timeout=120)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def served_unloc(tmp_path):
    def start(delay: timedelta, ahead: timedelta = timedelta(0)) -> Served:
        sim = UnlocSimulator(tmp_path / "unloc.json", clock=run.running_clock(NOW + ahead), creation_delay=delay)
        served = Served(tmp_path, sim, "/unloc", {"UNLOC_CLIENT_ID": unloc.CLIENT_ID,
                                                  "UNLOC_CLIENT_SECRET": unloc.CLIENT_SECRET})
        started.append(served)
        return served
    started: list[Served] = []
    yield start
    for served in started:
        served.stop()


@pytest.fixture
def served_partner(tmp_path):
    sim = UnlocPartnerSimulator(tmp_path / "partner.json", clock=run.running_clock(NOW))
    served = Served(tmp_path, sim, "/unloc-partner", {"UNLOC_PARTNER_KEY": sim.credentials["api_key"]})
    served.write(partner_policy(served.url))
    yield served
    served.stop()


def when_key_appears(find, act) -> threading.Thread:
    """Once `find()` returns a key id (the apply created it), `act(id)`: the vendor's side, in a thread that
    polls with short sleeps (no timed waits)."""
    def watch() -> None:
        for _ in range(1200):
            key_id = find()
            if key_id:
                act(key_id)
                return
            time.sleep(0.05)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def creating_key(sim: UnlocSimulator) -> str | None:
    return next((k["id"] for k in sim.keys() if k["toUser"]["id"] == BOB and k["state"] == "creating"), None)


def key_reads(sim) -> int:
    """The key reads the simulator has answered: the lock holder's key list (Unloc), a key (Unloc Partner)."""
    return sum(1 for r in sim.requests if r.method == "GET" and r.status == 200
               and (r.path.endswith("/keys") or "/keys/" in r.path))


def after_a_read(sim, act):
    """`act(key id)` once the created key has been read at least once after it was made (the wait saw it still
    pending): the vendor's side, ordered by what the wait did, not by time."""
    state: dict[str, int] = {}

    def then(key_id: str) -> None:
        state.setdefault("reads", key_reads(sim))
        for _ in range(2400):
            if key_reads(sim) > state["reads"]:
                act(key_id)
                return
            time.sleep(0.05)
    return then


def seconds_in(line: str) -> float:
    return float(re.search(r"in force after ([\d.]+) s", line)[1])


def test_unloc_key_in_creating_is_waited_for_until_the_sandbox_activates_it(tmp_path, served_unloc):
    # The key stays `creating` until the wait has read it so at least once; then Unloc activates it.
    served = served_unloc(timedelta(hours=1))
    served.write(unloc_policy(served.url, SEED_LOCKS["Cabin 3"]))
    reads: list[int] = []
    watcher = when_key_appears(lambda: creating_key(served.sim),
                               after_a_read(served.sim, lambda _: (reads.append(key_reads(served.sim)),
                                                                   served.sim.settle())))
    result = served.cli("apply", "--auto-approve", "--wait", "60s")
    watcher.join()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Apply complete: 1 applied, 1 accepted but not yet in force" in result.stdout
    [line] = [s for s in result.stdout.splitlines() if s.strip().startswith("cabins (unloc):")]
    assert "1 of 1 in force after" in line and 0 < seconds_in(line) < 60, line
    assert key_reads(served.sim) > reads[0]          # it read again after the activation, and then stopped
    assert "In force: every change the vendors had to carry out." in result.stdout
    [key] = [k for k in served.sim.keys() if k["toUser"]["id"] == BOB]
    assert key["state"] in ("scheduled", "active")


def test_a_key_that_leaves_creating_on_its_own_is_seen_in_force(tmp_path, served_unloc):
    # The sandbox's own short creation delay (2 s of its clock), nothing else.
    served = served_unloc(timedelta(seconds=2))
    served.write(unloc_policy(served.url, SEED_LOCKS["Cabin 3"]))
    result = served.cli("apply", "--auto-approve", "--wait", "30s")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cabins (unloc): 1 of 1 in force after" in result.stdout


def test_unknown_enforcement_is_reported_as_unknown_and_does_not_hold_the_wait(tmp_path, served_unloc):
    # Cabin 7 holds a key nobody declared: its revocation's enforcement is not documented.
    served = served_unloc(timedelta(seconds=1))
    served.write(unloc_policy(served.url, SEED_LOCKS["Cabin 7"]))
    result = served.cli("apply", "--auto-approve", "--wait", "30s")
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = [s for s in result.stdout.splitlines() if s.strip().startswith("cabins (unloc):")]
    assert "1 of 1 in force after" in line and "1 unknown" in line
    unknown = [s for s in result.stdout.splitlines() if s.strip().startswith("not known to be in force: ")]
    assert len(unknown) == 1 and "unknown: the vendor's documents do not say when a revoked key" in unknown[0]
    assert "; 1 not known (listed above)" in result.stdout


def test_unloc_key_that_goes_to_error_exits_1_naming_it(tmp_path, served_unloc):
    served = served_unloc(timedelta(hours=1))
    served.write(unloc_policy(served.url, SEED_LOCKS["Cabin 3"]))
    watcher = when_key_appears(lambda: creating_key(served.sim),
                               lambda key_id: served.sim.fail_key(key_id, "Lock could not be reached"))
    result = served.cli("apply", "--auto-approve", "--wait", "60s")
    watcher.join()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Apply complete: 1 applied" in result.stdout
    assert re.search(r"not in force: cabins/key/bob/cabin: `error`: .*Lock could not be reached", result.stderr), \
        result.stderr
    assert "not in force: 1 of 1 change(s)" in result.stderr
    assert "0 of 1 in force" in result.stdout
    assert "Traceback" not in result.stderr


def test_unloc_key_still_creating_when_time_is_up_exits_1_naming_it(tmp_path, served_unloc):
    served = served_unloc(timedelta(hours=1))
    served.write(unloc_policy(served.url, SEED_LOCKS["Cabin 3"]))
    result = served.cli("apply", "--auto-approve", "--wait", "3s")
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"not in force: cabins/key/bob/cabin: still `creating` after \d+ s", result.stderr), result.stderr
    assert "cabins (unloc): 0 of 1 in force; 1 not in force after waiting " in result.stdout
    # Waiting again, with nothing left to apply, waits for what the last apply left pending.
    watcher = when_key_appears(lambda: creating_key(served.sim), after_a_read(served.sim, lambda _: served.sim.settle()))
    again = served.cli("apply", "--auto-approve", "--wait", "60s")
    watcher.join()
    assert again.returncode == 0, again.stdout + again.stderr
    assert "No changes." in again.stdout
    [line] = [s for s in again.stdout.splitlines() if s.strip().startswith("cabins (unloc):")]
    assert "1 of 1 in force after" in line, line


def test_a_key_the_plan_would_still_change_is_judged_by_its_vendor_state(tmp_path, served_unloc):
    # The vendor's clock runs ahead of the run's: the key starts later than the plan's now, so a plan made now
    # would re-issue it. Still `creating` is still not in force.
    served = served_unloc(timedelta(hours=1), ahead=timedelta(seconds=30))
    served.write(unloc_policy(served.url, SEED_LOCKS["Cabin 3"]))
    result = served.cli("apply", "--auto-approve", "--wait", "2s")
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"not in force: cabins/key/bob/cabin: still `creating` after \d+ s", result.stderr), result.stderr


def test_partner_key_on_an_opt_in_lock_is_in_force_once_the_owner_approves(served_partner):
    sim = served_partner.sim
    watcher = when_key_appears(lambda: next(iter(sim.key_ids(msn=BOB)), None), after_a_read(sim, sim.approve))
    result = served_partner.cli("apply", "--auto-approve", "--wait", "60s")
    watcher.join()
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = [s for s in result.stdout.splitlines() if s.strip().startswith("rentals (unloc-partner):")]
    assert "1 of 1 in force after" in line, line


def test_partner_key_the_owner_denies_is_not_in_force_exit_1(served_partner):
    sim = served_partner.sim
    watcher = when_key_appears(lambda: next(iter(sim.key_ids(msn=BOB)), None), sim.deny)
    result = served_partner.cli("apply", "--auto-approve", "--wait", "30s")
    watcher.join()
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"not in force: rentals/key/bob/cabin: `denied`: the lock owner denied key", result.stderr), \
        result.stderr


def test_a_bad_wait_duration_is_refused_before_anything_is_read(tmp_path, served_unloc):
    served = served_unloc(timedelta(seconds=2))
    served.write(unloc_policy(served.url, SEED_LOCKS["Cabin 3"]))
    result = served.cli("apply", "--auto-approve", "--wait", "soon")
    assert result.returncode == 1
    assert "'soon' is not a duration" in result.stderr
    assert served.sim.keys() and not [k for k in served.sim.keys() if k["toUser"]["id"] == BOB]
