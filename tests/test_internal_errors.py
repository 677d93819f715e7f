"""Programming errors are not vendor failures: a KeyError in a provider stops the apply cleanly (what is in
flight finishes and is journaled), is reported with the change's address and a distinct exit code, and
RECONCILER_DEBUG=1 re-raises it with its traceback. The tool's own errors still make "failed" changes."""

from __future__ import annotations

import threading
import traceback

import pytest
from click.testing import CliRunner

from reconciler.applier import apply_plan
from reconciler.cli import main
from reconciler.errors import ExitCode, VendorError
from reconciler.plan import Action, Change, Plan
from reconciler.providers.abloy import AbloyProvider
from reconciler.resources import Resource
from reconciler.sandbox.abloy import SEED_DEVICES
from reconciler.state.local import LocalState

NOW = "2026-11-22T10:00:00Z"
POLICY = f"""\
systems:
  hq: {{vendor: abloy-keyless, url: sandbox}}
users:
  alice: {{}}
  bob: {{}}
devices:
  gym: {{system: hq, id: {SEED_DEVICES['Gym']}}}
  annex: {{system: hq, name: Annex}}
permissions:
  - users: [alice, bob]
    devices: [gym, annex]
    start: 2026-01-01T00:00:00Z
    end: 2027-12-31T23:59:59Z
"""


def _change(name: str, kind: str = "user") -> Change:
    """A create; users go in an earlier phase than permissions."""
    return Change(Action.CREATE, Resource("hq", kind, name, {"role": "USER"}), None)


class Scripted:
    """A provider whose changes succeed, fail as a vendor would, or hit a bug, by name."""

    def __init__(self, outcomes: dict[str, BaseException]):
        self.outcomes = outcomes
        self.sent: list[str] = []
        self.lock = threading.Lock()

    def commit_reads(self) -> None:
        pass

    def batches(self, changes: list[Change]) -> list[list[Change]]:
        return [[c] for c in changes]

    def apply_batch(self, batch: list[Change]) -> None:
        with self.lock:
            self.sent.append(batch[0].address)
        error = self.outcomes.get(batch[0].address)
        if error is not None:
            raise error

    def record_applied(self, change: Change) -> None:
        pass

    def halt_sending(self, why: str) -> None:
        pass


def _plan(changes: list[Change]) -> Plan:
    return Plan(now=NOW, changes=tuple(changes))


def test_a_bug_stops_the_apply_and_names_the_change() -> None:
    changes = [_change(f"u{i}") for i in range(5)] + [_change("later/gym/OPEN", kind="permission")]
    provider = Scripted({"hq/user/u2": KeyError("id")})
    report = apply_plan(_plan(changes), {"hq": provider}, concurrency={"hq": 1})
    assert [c.address for c, _ in report.internal] == ["hq/user/u2"]
    assert isinstance(report.internal[0][1], KeyError)
    assert [c.address for c in report.done] == ["hq/user/u0", "hq/user/u1"]
    assert not report.failed                       # a bug is not a vendor's failure
    assert "hq/permission/later/gym/OPEN" not in provider.sent and "hq/user/u4" not in provider.sent   # nothing new started
    assert {c.address for c, _ in report.skipped} >= {"hq/user/u4", "hq/permission/later/gym/OPEN"}
    assert not report.ok
    assert any(line.startswith("hq/user/u2: INTERNAL ERROR") for line in report.remaining())


def test_the_tools_own_errors_still_fail_one_change_and_the_apply_goes_on() -> None:
    changes = [_change(f"u{i}") for i in range(4)]
    provider = Scripted({"hq/user/u1": VendorError("hq: POST /user: 409 Conflict")})
    report = apply_plan(_plan(changes), {"hq": provider}, concurrency={"hq": 1})
    assert [c.address for c, _ in report.failed] == ["hq/user/u1"]
    assert not report.internal
    assert [c.address for c in report.done] == ["hq/user/u0", "hq/user/u2", "hq/user/u3"]


@pytest.fixture
def policy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RECONCILER_STATE", raising=False)
    monkeypatch.delenv("RECONCILER_DEBUG", raising=False)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(POLICY)
    return tmp_path


def _broken_create_device(self: AbloyProvider, want: Resource) -> dict[str, object]:
    return {}["id"]      # a programming error, as a missed key in a vendor's answer would be


def test_cli_says_so_in_one_line_with_a_distinct_exit_code(policy, monkeypatch) -> None:
    monkeypatch.setattr(AbloyProvider, "create_device", _broken_create_device)
    result = CliRunner().invoke(main, ["apply", "--auto-approve", "--now", NOW], catch_exceptions=False)
    assert result.exit_code == ExitCode.INTERNAL != ExitCode.ERROR
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("internal error at hq/device/annex: KeyError: 'id'"), result.stderr
    assert "RECONCILER_DEBUG=1" in last and "not a vendor failure" in last
    assert "Traceback" not in result.output
    assert "not applied: hq/device/annex: INTERNAL ERROR (a bug in reconciler) while trying to create" in result.stderr
    # Nothing that depends on it was sent; the state holds nothing for it.
    assert "hq/permission/alice/annex/OPEN: not applied" in result.stderr
    assert LocalState(policy / ".reconciler" / "state.json").get("hq/device/annex") is None
    monkeypatch.undo()
    monkeypatch.chdir(policy)
    fixed = CliRunner().invoke(main, ["apply", "--auto-approve", "--now", NOW], catch_exceptions=False)
    assert fixed.exit_code == 0, fixed.output
    again = CliRunner().invoke(main, ["plan", "--detailed-exitcode", "--now", NOW], catch_exceptions=False)
    assert again.exit_code == 0, again.output


def test_debug_reraises_with_the_traceback(policy, monkeypatch) -> None:
    monkeypatch.setattr(AbloyProvider, "create_device", _broken_create_device)
    result = CliRunner().invoke(main, ["apply", "--auto-approve", "--now", NOW], env={"RECONCILER_DEBUG": "1"})
    assert isinstance(result.exception, KeyError)
    frames = [frame.name for frame in traceback.extract_tb(result.exc_info[2])]
    assert "_broken_create_device" in frames


def test_a_vendor_failure_keeps_exit_code_one(policy, monkeypatch) -> None:
    def refused(self: AbloyProvider, want: Resource) -> dict[str, object]:
        raise VendorError("hq: POST /locking-device: 400 Bad Request: name too long")
    monkeypatch.setattr(AbloyProvider, "create_device", refused)
    result = CliRunner().invoke(main, ["apply", "--auto-approve", "--now", NOW], catch_exceptions=False)
    assert result.exit_code == ExitCode.ERROR
    assert "FAILED to create: hq: POST /locking-device: 400" in result.stderr
