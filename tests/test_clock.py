"""One clock: tokens are renewed from their lifetime on the monotonic clock, never by comparing the
vendor's wall time with ours; the session's clock is the only time the providers and the embedded sandbox
see."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from conftest import NOW
from harness import ABLOY, VendorHarness

from reconciler import run
from reconciler.providers.http import renewal_margin, token_lifetime
from reconciler.sandbox.abloy import SEED_DEVICES, AbloySimulator

DOORS = list(SEED_DEVICES.values())[:5]


class Ticking:
    """A monotonic clock that moves `step` seconds with every request the vendor receives; the vendor's
    own clock is `offset` away from ours and moves with it."""

    def __init__(self, step: float):
        self.step = step
        self.elapsed = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.elapsed

    def tick(self) -> None:
        with self._lock:
            self.elapsed += self.step


def fleet_policy(users: int) -> str:
    people = "".join(f"  u{n:03}: {{}}\n" for n in range(users))
    doors = "".join(f"  d{n}: {{system: hq, id: {door}}}\n" for n, door in enumerate(DOORS))
    return (f"users:\n{people}devices:\n{doors}permissions:\n"
            f"  - users: [{', '.join(f'u{n:03}' for n in range(users))}]\n"
            f"    devices: [{', '.join(f'd{n}' for n in range(len(DOORS)))}]\n"
            "    start: 2026-01-01T00:00:00Z\n    end: 2031-12-31T23:59:59Z\n")


def ticking_harness(tmp_path: Path, *, token_ttl: int, step: float, vendor_offset: timedelta) -> tuple[VendorHarness, Ticking]:
    harness = VendorHarness(tmp_path, ABLOY)
    ticks = Ticking(step)
    harness.sim = AbloySimulator(clock=lambda: NOW + vendor_offset + timedelta(seconds=ticks()), token_ttl=token_ttl)
    creds = harness.sim.credentials
    harness.env = {"ABLOY_USER_ID": creds["user_id"], "ABLOY_ACCESS_KEY": creds["access_key"],
                   "ABLOY_API_KEY": creds["api_key"]}
    sim = harness.sim

    def handle(request: httpx.Request) -> httpx.Response:
        ticks.tick()
        return sim.handle(request)

    def session() -> run.Session:
        return run.Session(directory=harness.policy_dir, state_path=tmp_path / "state" / "state.json",
                           env=harness.env, now=NOW, transports={"hq": httpx.MockTransport(handle)},
                           provider_options={"sleep": harness.sleeps.append, "monotonic": ticks},
                           allowed_hosts=("abloy.test",))
    harness.session = session    # type: ignore[method-assign]
    return harness, ticks


def test_three_second_tokens_do_not_mean_a_login_per_request(tmp_path):
    harness, ticks = ticking_harness(tmp_path, token_ttl=3, step=0.02, vendor_offset=timedelta(0))
    harness.write(fleet_policy(110))
    _, report = harness.apply()
    assert report is not None and report.ok, report.lines()
    requests = harness.sim.count("*", "")
    logins = harness.sim.count("POST", "/administration/login")
    assert requests >= 600
    assert logins * 4 <= requests, f"{logins} logins for {requests} requests"
    # Renewed ahead of expiry: a 401 comes only from a worker that held an old token while the others moved
    # the clock past its end (thread scheduling), never from every request.
    assert harness.sim.count("*", "", status=401) * 20 <= requests
    assert ticks.elapsed > 3 * 3, "the apply must outlive several tokens for this test to mean anything"


@pytest.mark.parametrize("offset", [timedelta(hours=1), -timedelta(hours=1), timedelta(days=3 * 365)])
def test_a_vendor_clock_far_from_ours_still_means_one_login(tmp_path, offset):
    harness, _ = ticking_harness(tmp_path, token_ttl=3600, step=0.001, vendor_offset=offset)
    harness.write(fleet_policy(20))
    _, report = harness.apply()
    assert report is not None and report.ok, report.lines()
    assert not harness.plan().has_changes
    assert harness.sim.count("POST", "/administration/login") == 2    # one per session: apply, then plan


def test_token_lifetime_comes_from_the_vendor_claims_alone():
    assert token_lifetime({"iat": 1_000, "exp": 4_600}) == 3600
    assert token_lifetime({"exp": 4_600}) is None          # no iat: renew on the vendor's 401 only
    assert token_lifetime({"iat": 5, "exp": 5}) is None
    assert renewal_margin(3600) == 60 and renewal_margin(3) == 1.75


def test_the_embedded_sandbox_runs_on_the_session_clock(tmp_path):
    """`url: sandbox` with a pinned `now` (years from today's date): an invitation is stamped from that
    moment, and the sandbox judges its expiry by the same clock."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(
        "systems:\n  hq: {vendor: abloy-keyless, url: sandbox}\n"
        "users:\n  alice: {phone: \"+4790000001\", mobile_key: true}\n"
        f"devices:\n  entrance: {{system: hq, id: {DOORS[0]}}}\n"
        "permissions:\n  - users: [alice]\n    devices: [entrance]\n"
        "    start: 2040-01-01T00:00:00Z\n    end: 2041-01-01T00:00:00Z\n")
    later = datetime(2040, 6, 1, 12, 0, tzinfo=UTC)
    session = run.Session(directory=policies, state_path=tmp_path / ".reconciler" / "state.json", env={}, now=later)
    _, report = run.apply(session, saved=None, approve=lambda plan: True)
    assert report is not None and report.ok, report.lines()
    plan = run.plan(session)
    assert not plan.has_changes
    pending = [p.message for p in plan.pending]
    assert any("expires 2040-06-08" in message for message in pending), pending


def test_a_real_session_clock_advances_from_its_start_on_the_monotonic_clock():
    session = run.Session(directory=Path("."), state_path=Path("s.json"), env={})
    first = session.clock()
    assert session.now is None and first >= session.clock.start
    assert session.clock() >= first
    pinned = run.Session(directory=Path("."), state_path=Path("s.json"), env={}, now=NOW)
    assert pinned.clock() == NOW
