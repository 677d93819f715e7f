"""Each fact once, each concept one name: the word `sandbox`, the loopback test and the default data directory
are stated in one module each; the session's time is one object; "guard" names only the mass-revoke guard."""

from __future__ import annotations

import importlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from reconciler import cli, run, state, urls
from reconciler.policy import SystemConfig, checks
from reconciler.sandbox import server

NOW = datetime(2031, 5, 4, 3, 2, 1, tzinfo=UTC)


def test_one_loopback_test_for_policy_urls_and_the_sandbox_server():
    assert checks.is_loopback is urls.is_loopback and server.is_loopback is urls.is_loopback
    assert [urls.is_loopback(h) for h in ("localhost", "127.0.0.1", "127.8.9.10", "::1")] == [True] * 4
    assert [urls.is_loopback(h) for h in ("0.0.0.0", "10.0.0.1", "localhost.example", "")] == [False] * 4


def test_the_sandbox_word_is_stated_once():
    assert urls.SANDBOX == "sandbox"
    assert SystemConfig(name="s", vendor="spkey", url=urls.SANDBOX, credentials={}).is_sandbox
    assert not SystemConfig(name="s", vendor="spkey", url=None, credentials={}).is_sandbox


def test_the_default_data_directory_is_stated_once():
    assert cli.DATA_DIR is state.DATA_DIR == Path(".reconciler")
    assert state.default_state_path({}) == state.DATA_DIR / state.STATE_FILE == Path(".reconciler/state.json")
    assert state.default_state_path({"RECONCILER_STATE": "x/s.json"}) == Path("x/s.json")
    assert cli.data_dir(Path("policies")) == state.DATA_DIR


def test_the_session_time_is_one_clock():
    pinned = run.Session(directory=Path("."), state_path=Path("s.json"), env={}, now=NOW)
    assert isinstance(pinned.clock, run.SessionClock)
    assert pinned.clock.start == NOW and pinned.clock() == NOW
    assert not hasattr(pinned, "at")
    real = run.Session(directory=Path("."), state_path=Path("s.json"), env={})
    assert real.now is None                # only the input that pins the clock
    assert real.clock() >= real.clock.start
    assert run.running_clock(NOW)() >= NOW


def test_guard_names_only_the_mass_revoke_guard():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("reconciler.state.guard")
    assert importlib.import_module("reconciler.state.trust").check_state
    assert not hasattr(cli, "_guard") and callable(cli._run_command)
