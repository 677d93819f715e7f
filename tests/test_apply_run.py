"""`ApplyRun`, one step at a time, with a fake provider: phases, admission (skipping), batching, the four
ways a batch can end, the callbacks; and the CLI's stop signal (one Ctrl-C stops sending, a second exits)."""

from __future__ import annotations

import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from reconciler.applier import INTERRUPTED, ApplyRun, apply_plan
from reconciler.cli import StopSignal
from reconciler.errors import ExitCode, RefusedError, StateError, VendorError
from reconciler.plan import Action, Change, Plan
from reconciler.resources import Resource

NOW = "2026-11-22T10:00:00Z"


def create(name: str, kind: str = "user", system: str = "hq", depends_on: tuple[str, ...] = ()) -> Change:
    return Change(Action.CREATE, Resource(system, kind, name, {"role": "USER"}, depends_on=depends_on), None)


def delete(name: str, kind: str = "permission") -> Change:
    return Change(Action.DELETE, None, Resource("hq", kind, name, {}, id=name))


class Fake:
    """A provider whose batches succeed or raise what `outcomes` names (by the batch's first address)."""

    def __init__(self, outcomes: dict[str, BaseException] | None = None, batch_size: int = 1,
                 record_error: StateError | None = None):
        self.outcomes = outcomes or {}
        self.batch_size = batch_size
        self.record_error = record_error
        self.sent: list[list[str]] = []
        self.recorded: list[str] = []
        self.reads_committed = 0
        self.hook = lambda batch: None

    def commit_reads(self) -> None:
        self.reads_committed += 1

    def batches(self, changes: list[Change]) -> list[list[Change]]:
        return [changes[i:i + self.batch_size] for i in range(0, len(changes), self.batch_size)]

    def apply_batch(self, batch: list[Change]) -> None:
        self.sent.append([c.address for c in batch])
        self.hook(batch)
        error = self.outcomes.get(batch[0].address)
        if error is not None:
            raise error

    def record_applied(self, change: Change) -> None:
        if self.record_error is not None:
            raise self.record_error
        self.recorded.append(change.address)

    def halt_sending(self, why: str) -> None:
        self.halted = why


def run_of(changes: list[Change], provider: Fake | None = None, **kwargs) -> ApplyRun:
    return ApplyRun(Plan(now=NOW, changes=tuple(changes)), {"hq": provider or Fake()}, **kwargs)


def done(future_value: bool | BaseException) -> Future[bool]:
    future: Future[bool] = Future()
    if isinstance(future_value, BaseException):
        future.set_exception(future_value)
    else:
        future.set_result(future_value)
    return future


# --- phases and admission

def test_phases_put_revocations_first_and_dependants_last():
    run = run_of([create("alice/gym/OPEN", kind="permission"), create("alice"), delete("bob/gym/OPEN")])
    assert [[c.address for c in phase] for phase in run.phases()] == [
        ["hq/permission/bob/gym/OPEN"], ["hq/user/alice"], ["hq/permission/alice/gym/OPEN"]]


def test_a_change_whose_dependency_broke_is_skipped_and_breaks_its_own_dependants():
    run = run_of([])
    run.broken.add("hq/user/alice")
    first = create("alice/gym/OPEN", kind="permission", depends_on=("hq/user/alice",))
    second = create("carol")
    admitted = run.admitted([first, second])
    assert admitted == {"hq": [second]}
    assert run.report.skipped == [(first, "depends on hq/user/alice")]
    assert "hq/permission/alice/gym/OPEN" in run.broken


def test_nothing_is_admitted_once_stopped_or_halted_and_the_reason_says_which():
    stopped = run_of([], stop=threading.Event())
    stopped.stop.set()
    assert stopped.admitted([create("alice")]) == {}
    assert stopped.report.skipped[0][1] == INTERRUPTED
    halted = run_of([])
    halted.halt("the state store failed: disk full")
    halted.halt("a second reason is not the one reported")
    assert halted.admitted([create("alice")]) == {}
    assert halted.report.skipped[0][1] == "not attempted: the state store failed: disk full"


# --- batching and sending

def test_each_systems_changes_go_in_its_providers_batches_on_its_own_pool():
    hq, annex = Fake(batch_size=2), Fake(batch_size=1)
    run = ApplyRun(Plan(now=NOW), {"hq": hq, "annex": annex})
    pools = {"hq": ThreadPoolExecutor(1), "annex": ThreadPoolExecutor(1)}
    try:
        futures = run.submit({"hq": [create("a"), create("b"), create("c")], "annex": [create("d", system="annex")]},
                             pools)
        assert [[c.address for c in batch] for batch, _ in futures] == [
            ["hq/user/a", "hq/user/b"], ["hq/user/c"], ["annex/user/d"]]
        assert all(future.result() for _, future in futures)
    finally:
        for pool in pools.values():
            pool.shutdown()
    assert hq.sent == [["hq/user/a", "hq/user/b"], ["hq/user/c"]] and annex.sent == [["annex/user/d"]]


def test_send_starts_nothing_when_stopping_and_a_bug_halts_at_once():
    provider = Fake({"hq/user/bug": KeyError("id")})
    run = run_of([], provider)
    with pytest.raises(KeyError):
        run.send(provider, [create("bug")])
    assert run.halted == "apply stopped by an internal error at hq/user/bug: KeyError"
    assert run.send(provider, [create("later")]) is False
    assert provider.sent == [["hq/user/bug"]]


def test_the_tools_own_errors_do_not_halt():
    provider = Fake({"hq/user/a": VendorError("409 Conflict")})
    run = run_of([], provider)
    with pytest.raises(VendorError):
        run.send(provider, [create("a")])
    assert run.halted is None


# --- the outcomes of a batch (settle)

def test_a_batch_sent_is_recorded_done_and_reported():
    seen: list[tuple[str, str | None]] = []
    provider = Fake()
    run = run_of([], provider, on_change=lambda c, error: seen.append((c.address, error)))
    batch = [create("a"), create("b")]
    run.settle(batch, done(True))
    assert run.report.done == batch and provider.recorded == ["hq/user/a", "hq/user/b"]
    assert seen == [("hq/user/a", None), ("hq/user/b", None)]


def test_an_applied_mark_the_state_cannot_record_is_done_but_halts():
    run = run_of([], Fake(record_error=StateError("disk full")))
    run.settle([create("a")], done(True))
    assert [c.address for c in run.report.done] == ["hq/user/a"]
    assert run.halted == "the state store failed: disk full"


def test_a_vendor_refusal_fails_the_batch_and_breaks_it():
    seen: list[str | None] = []
    run = run_of([], on_change=lambda c, error: seen.append(error))
    run.settle([create("a")], done(VendorError("hq: POST /user: 409 Conflict")))
    assert [(c.address, why) for c, why in run.report.failed] == [("hq/user/a", "hq: POST /user: 409 Conflict")]
    assert run.broken == {"hq/user/a"} and run.halted is None and seen == ["hq: POST /user: 409 Conflict"]


def test_an_ambiguous_vendor_error_is_uncertain_not_failed():
    run = run_of([])
    run.settle([create("a")], done(VendorError("answer lost", ambiguous=True)))
    assert not run.report.failed and [c.address for c, _ in run.report.uncertain] == ["hq/user/a"]


def test_a_state_failure_is_uncertain_and_halts():
    seen: list[str | None] = []
    run = run_of([], on_change=lambda c, error: seen.append(error))
    run.settle([create("a")], done(StateError("disk full")))
    assert run.report.uncertain == [(create("a"), "the state could not record it: disk full")]
    assert run.halted == "the state store failed: disk full" and seen == ["uncertain: disk full"]


def test_a_bug_is_internal_not_failed():
    seen: list[str | None] = []
    run = run_of([], on_change=lambda c, error: seen.append(error))
    error = TypeError("unhashable")
    run.settle([create("a")], done(error))
    assert run.report.internal == [(create("a"), error)] and not run.report.failed
    assert seen == ["internal error: TypeError: unhashable"] and "hq/user/a" in run.broken


def test_a_batch_not_started_is_skipped_with_the_reason():
    run = run_of([])
    run.settle([create("a")], done(False))
    assert run.report.skipped == [(create("a"), INTERRUPTED)] and "hq/user/a" in run.broken
    halted = run_of([])
    halted.halt("the state store failed: x")
    halted.settle([create("a")], done(False))
    assert halted.report.skipped == [(create("a"), "not attempted: the state store failed: x")]


# --- the whole run

def test_execute_commits_reads_once_and_a_failure_skips_only_its_dependants():
    provider = Fake({"hq/user/alice": VendorError("409")})
    changes = [create("alice"), create("bob"),
               create("alice/gym/OPEN", kind="permission", depends_on=("hq/user/alice",)),
               create("bob/gym/OPEN", kind="permission", depends_on=("hq/user/bob",))]
    report = run_of(changes, provider).execute()
    assert provider.reads_committed == 1
    assert [c.address for c in report.done] == ["hq/user/bob", "hq/permission/bob/gym/OPEN"]
    assert [(c.address, why) for c, why in report.skipped] == [
        ("hq/permission/alice/gym/OPEN", "depends on hq/user/alice")]
    assert not report.ok and not report.interrupted


def test_a_stop_during_the_run_finishes_the_batch_in_flight_and_skips_the_rest():
    stop = threading.Event()
    provider = Fake()
    provider.hook = lambda batch: stop.set()        # Ctrl-C arrives while the first batch is in flight
    report = run_of([create("a"), create("b"), create("a/gym/OPEN", kind="permission")], provider,
                    concurrency={"hq": 1}, stop=stop).execute()
    assert [c.address for c in report.done] == ["hq/user/a"]
    assert {why for _, why in report.skipped} == {INTERRUPTED}
    assert report.interrupted and provider.sent == [["hq/user/a"]]


def test_apply_plan_refuses_what_the_mass_revoke_guard_stops_before_anything(monkeypatch):
    provider = Fake()
    monkeypatch.setattr(Plan, "refused_by", property(lambda self: [type("G", (), {"message": lambda s: "hq: 9 of 10"})()]))
    with pytest.raises(RefusedError, match="refused: hq: 9 of 10"):
        apply_plan(Plan(now=NOW, changes=(create("a"),)), {"hq": provider})
    assert provider.reads_committed == 0 and provider.sent == []


# --- the CLI's stop signal

def test_the_stop_signal_is_the_usual_ctrl_c_until_armed_then_stops_then_exits(capsys):
    exits: list[int] = []
    before = signal.getsignal(signal.SIGINT)
    with StopSignal(terminal=False, color=False, hard_exit=exits.append) as stopping:
        assert signal.getsignal(signal.SIGINT) is before       # not armed: nothing sent yet
        stopping.arm(2)
        assert signal.getsignal(signal.SIGINT) == stopping.interrupt
        stopping.on_change(create("a"), None)
        stopping.on_change(create("b"), "409 Conflict")
        stopping.interrupt(signal.SIGINT, None)
        assert stopping.stop.is_set() and exits == []
        assert "sending nothing new" in capsys.readouterr().err
        stopping.interrupt(signal.SIGINT, None)
        assert exits == [int(ExitCode.ERROR)]
        assert "exiting now. 1 changes were applied" in capsys.readouterr().err
    # stopped: a late Ctrl-C must not cut the report short
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    signal.signal(signal.SIGINT, before)


def test_the_stop_signal_restores_the_previous_handler_when_not_stopped():
    before = signal.getsignal(signal.SIGINT)
    with StopSignal(terminal=False, color=False) as stopping:
        stopping.arm(0)
    assert signal.getsignal(signal.SIGINT) is before
    assert isinstance(stopping.progress_closing(), str)


# --- what is in flight when Ctrl-C comes finishes

def test_the_answer_to_a_write_in_flight_is_read_to_the_end_after_ctrl_c():
    """A create the vendor has done must be recorded: Ctrl-C while its answer is being read does not cut it
    short (which left it unrecorded, and the next apply created it again); a read is still cut at once."""
    import httpx

    from reconciler.providers.http import Deadline, HttpClient, Interrupted

    stop = threading.Event()

    def answer(request: httpx.Request) -> httpx.Response:
        def body():
            yield b'{"id": '
            stop.set()                       # Ctrl-C arrives while the answer is being read
            yield b'"u-1"}'
        return httpx.Response(201, headers={"Content-Type": "application/json"}, content=body())

    client = HttpClient("https://vendor.test", system="hq", transport=httpx.MockTransport(answer))
    client.start_phase(Deadline(600), stop)
    assert client.request("POST", "/users", json={"name": "alice"}).json() == {"id": "u-1"}
    stop.clear()
    with pytest.raises(Interrupted, match="interrupted while reading the answer"):
        client.request("GET", "/users")
