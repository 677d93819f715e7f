"""The command line behaves as habit from Terraform, pre-commit and click tools expects: `--version`,
`python -m reconciler`, `-v` and `--no-color` on every command wherever written, one way to name the policy
directory, help for every option, confirmation by typing `yes`, colour only on a terminal, and examples that
stand alone (each directory has its own sandbox and state)."""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import reconciler
from reconciler import cli as cli_module
from reconciler.cli import main
from reconciler.terminal import ApplyProgress, color_wanted, colorize_plan

from conftest import reconciler_command, serve_sandboxes

ROOT = Path(__file__).resolve().parent.parent
NOW = "2026-11-22T10:00:00Z"
EXAMPLES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "examples").iterdir() if any(p.glob("*.yaml")))


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RECONCILER_STATE", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None):
        return runner.invoke(main, list(args), input=input, catch_exceptions=False)
    return invoke


def _commands(group: click.Group = main, path: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


# -- version, python -m ----------------------------------------------------------------------------------

def test_version_is_printed_by_the_script_and_by_python_m():
    script = subprocess.run([*reconciler_command(), "--version"], capture_output=True, text=True, timeout=60)
    module = subprocess.run([sys.executable, "-m", "reconciler", "--version"], capture_output=True, text=True,
                            timeout=60)

    assert script.returncode == 0 and module.returncode == 0, script.stderr + module.stderr
    assert script.stdout == module.stdout == f"reconciler {reconciler.__version__}\n"


def test_the_version_lives_in_one_place():
    from importlib.metadata import version

    assert version("reconciler") == reconciler.__version__
    assert not re.search(r'(?m)^version\s*=\s*"', (ROOT / "pyproject.toml").read_text())


def test_python_m_runs_the_same_commands(tmp_path):
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    result = subprocess.run([sys.executable, "-m", "reconciler", "validate", "-v"], capture_output=True,
                            text=True, cwd=tmp_path, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The policy in policies is valid: 2 systems, ")


# -- shared options, help ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [p for p, _ in _commands()], ids=" ".join)
def test_every_command_takes_verbose_and_no_color_and_documents_every_option(path):
    command = dict(_commands())[path]
    options = {opt: param for param in command.params if isinstance(param, click.Option) for opt in param.opts}

    assert {"-v", "--verbose", "--no-color"} <= set(options)
    undocumented = [param.name for param in command.params if isinstance(param, click.Option) and not param.help]
    assert undocumented == []


def test_verbose_and_no_color_work_after_the_command_and_before_it(cli, tmp_path):
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    for args in (["validate", "-v"], ["-v", "validate"], ["validate", "-vv", "--no-color"],
                 ["--no-color", "plan", "-v", "--now", NOW], ["plan", "policies", "-v", "--no-color", "--now", NOW]):
        result = cli(*args)
        assert result.exit_code == 0, (args, result.output)


def test_one_verbose_flag_logs_decisions_not_every_http_request(tmp_path):
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    once = subprocess.run([*reconciler_command(), "plan", "-v", "--now", NOW], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    twice = subprocess.run([*reconciler_command(), "plan", "-vv", "--now", NOW], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120)

    assert once.returncode == 0 and twice.returncode == 0, once.stderr + twice.stderr
    assert "HTTP Request" not in once.stderr
    assert "HTTP Request" in twice.stderr


def test_every_policy_command_takes_the_directory_the_same_way():
    for path, command in _commands():
        if path[-1] in ("validate", "plan", "apply", "export", "events", "access"):
            options = {opt for param in command.params for opt in getattr(param, "opts", [])}
            assert {"-d", "--directory"} <= options, path


def test_directory_as_argument_or_option_is_the_same(cli, tmp_path):
    shutil.copytree(ROOT / "examples" / "quickstart", tmp_path / "qs")
    by_argument = cli("plan", "qs", "--now", NOW)
    by_option = cli("plan", "-d", "qs", "--now", NOW)

    assert by_argument.exit_code == by_option.exit_code == 0
    assert by_argument.output == by_option.output
    clash = cli("plan", "qs", "--directory", "policies")
    assert clash.exit_code == 1 and "two policy directories" in clash.output


def test_counts_read_as_english(cli, tmp_path):
    shutil.copytree(ROOT / "examples" / "quickstart", tmp_path / "qs")
    result = cli("validate", "qs")

    assert "1 system," in result.output and "1 systems" not in result.output


# -- confirmation ------------------------------------------------------------------------------------------

def test_apply_asks_for_the_word_yes(cli, tmp_path, monkeypatch):
    shutil.copytree(ROOT / "examples" / "quickstart", tmp_path / "policies")
    monkeypatch.setattr(cli_module, "_stdin_is_terminal", lambda: True)

    for answer in ("y", "Y", "yes please", ""):
        declined = cli("apply", "--now", NOW, input=f"{answer}\n")
        assert declined.exit_code == 1, declined.output
        assert "Only 'yes' will be accepted" in declined.output and "Apply cancelled" in declined.output
        assert cli("plan", "--detailed-exitcode", "--now", NOW).exit_code == 2

    accepted = cli("apply", "--now", NOW, input="yes\n")
    assert accepted.exit_code == 0, accepted.output
    assert "Apply complete" in accepted.output
    assert cli("plan", "--detailed-exitcode", "--now", NOW).exit_code == 0


# -- colour and progress -----------------------------------------------------------------------------------

class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_only_on_a_terminal_without_no_color():
    assert color_wanted(False, env={}, stream=_Terminal())
    assert not color_wanted(True, env={}, stream=_Terminal())
    assert not color_wanted(False, env={"NO_COLOR": "1"}, stream=_Terminal())
    assert color_wanted(False, env={"NO_COLOR": ""}, stream=_Terminal())   # no-color.org: set and non-empty
    assert not color_wanted(False, env={}, stream=io.StringIO())


def test_plan_lines_are_coloured_as_terraform_colours_them():
    text = "  + a/user/x\n      # created\n  - a/user/y\n  ~ a/user/z\n  -/+ a/user/w\nPlan: 1 to create\n"
    coloured = colorize_plan(text, True)

    assert click.unstyle(coloured) == text
    assert "\x1b[32m+\x1b[0m a/user/x" in coloured
    assert "\x1b[31m-\x1b[0m a/user/y" in coloured
    assert "\x1b[33m~\x1b[0m a/user/z" in coloured
    assert "\x1b[31m-\x1b[0m\x1b[32m/+\x1b[0m a/user/w" in coloured
    assert colorize_plan(text, False) == text


def test_plan_output_is_plain_when_not_a_terminal(cli, tmp_path):
    shutil.copytree(ROOT / "examples" / "quickstart", tmp_path / "policies")
    result = cli("plan", "--now", NOW)

    assert "\x1b[" not in result.output and "+ office/" in result.output


def test_progress_off_a_terminal_is_plain_lines_with_count_rate_and_eta(capsys, monkeypatch):
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr("reconciler.terminal.time.monotonic", lambda: float(next(clock)))
    progress = ApplyProgress(3, terminal=False, color=False)
    with progress:
        progress.on_change("hq/user/alice", "create", None)
        progress.on_change("hq/user/bob", "delete", "HTTP 500")
        progress.on_change("hq/user/carol", "update", None)
    out, err = capsys.readouterr()

    lines = out.splitlines()
    assert [line for line in lines if line.startswith("[")] == ["[1/3] hq/user/alice: create done",
                                                                 "[3/3] hq/user/carol: update done"]
    assert re.match(r"^progress: 1/3 changes \(33%\), 0\.\d/s, elapsed 0:\d\d, ETA \d:\d\d$", lines[1])
    assert all(re.match(r"^progress: [12]/3 changes", line) for line in lines if not line.startswith("["))
    assert err == "[2/3] hq/user/bob: failed: HTTP 500\n"
    assert re.match(r"^3 of 3 changes finished, 1 failed in \d:\d\d \(0\.\d/s\)$", progress.closing())


def test_progress_on_a_terminal_is_one_live_line(monkeypatch):
    screen = _Terminal()
    monkeypatch.setattr("reconciler.terminal.sys.stdout", screen)
    progress = ApplyProgress(2, terminal=True, color=True)
    with progress:
        progress.on_change("hq/user/alice", "create", None)
        progress.on_change("hq/user/bob", "delete", None)
    shown = screen.getvalue()

    assert "\r" in shown and "Applying" in shown and "2/2" in shown and "100%" in shown
    assert re.search(r"\d+\.\d/s, elapsed 0:\d\d", shown)
    assert "\x1b[32m#" in shown
    assert "create done" not in shown   # the line redraws; it does not scroll


# -- examples stand alone -----------------------------------------------------------------------------------

def _converges(cli, directory: str) -> None:
    first = cli("apply", directory, "--auto-approve", "--now", NOW)
    assert first.exit_code == 0, (directory, first.output)
    again = cli("plan", directory, "--detailed-exitcode", "--now", NOW)
    assert again.exit_code == 0, (directory, again.output)


@pytest.mark.parametrize("order", ["sorted", "reversed", "shuffled"])
def test_every_example_plans_and_applies_after_any_other(cli, tmp_path, order):
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    directories = ["policies", *EXAMPLES]
    if order == "reversed":
        directories.reverse()
    elif order == "shuffled":
        random.Random(15).shuffle(directories)
    for directory in directories:
        plan = cli("plan", directory, "--detailed-exitcode", "--now", NOW)
        assert plan.exit_code == 2, (directory, plan.output)
        assert "internal error" not in plan.output
        _converges(cli, directory)
    for directory in directories:   # and nothing one did moved another
        assert cli("plan", directory, "--detailed-exitcode", "--now", NOW).exit_code == 0, directory
    assert (tmp_path / ".reconciler" / "state.json").exists()   # the default directory keeps the documented place
    assert (tmp_path / ".reconciler" / "dirs" / "examples" / "unloc" / "state.json").exists()


def test_sandbox_serve_prints_the_variables_the_demo_policy_reads(tmp_path):
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    named = set(re.findall(r"\$\{(\w+)\}", "".join(p.read_text() for p in (tmp_path / "policies").glob("*.yaml"))))
    with serve_sandboxes(tmp_path) as (_, printed):
        assert named and named <= set(printed)


def test_two_policies_sharing_one_state_get_a_clear_error_not_an_internal_one(cli, tmp_path):
    shutil.copytree(ROOT / "examples" / "quickstart", tmp_path / "one")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "p.yaml").write_text("systems:\n  office: {vendor: sentry, url: sandbox}\n")
    assert cli("plan", "one", "--state", "shared/state.json", "--now", NOW).exit_code == 0
    result = cli("plan", "two", "--state", "shared/state.json", "--now", NOW)

    assert result.exit_code == 1
    assert "internal error" not in result.output
    assert "another policy with a system named 'office' shares this state" in result.output


def test_reading_progress_on_a_terminal_counts_systems_and_objects(monkeypatch):
    from reconciler.terminal import ReadProgress

    screen = _Terminal()
    monkeypatch.setattr("reconciler.terminal.sys.stderr", screen)
    progress = ReadProgress(terminal=True, color=False)
    progress.on_read(None, 0, 2)
    progress.on_read("hq", 120, 2)
    progress.on_read("cabins", 3, 2)
    shown = screen.getvalue()

    assert "Reading live state" in shown and "2/2" in shown and "123 objects, elapsed 0:0" in shown
    quiet = ReadProgress(terminal=False, color=False)
    quiet.on_read(None, 0, 1)
    quiet.on_read("hq", 5, 1)
    assert quiet.objects == 5


def test_plan_reports_reading_progress_through_the_session(tmp_path):
    from conftest import NOW as PINNED
    from reconciler import run

    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    calls = []
    session = run.Session(directory=tmp_path / "policies", state_path=tmp_path / "s" / "state.json", env={},
                          now=PINNED, on_read=lambda *args: calls.append(args))
    run.plan(session)

    assert calls[0] == (None, 0, 2)
    assert sorted(c[0] for c in calls[1:]) == ["cabins", "hq"] and all(c[1] > 0 and c[2] == 2 for c in calls[1:])


def test_shell_completion_as_documented():
    readme = (ROOT / "README.md").read_text()
    assert 'eval "$(_RECONCILER_COMPLETE=bash_source reconciler)"' in readme
    result = subprocess.run(reconciler_command(), env={**os.environ, "COMP_WORDS": "reconciler pl",
                                                       "COMP_CWORD": "1", "_RECONCILER_COMPLETE": "bash_complete"},
                            capture_output=True, text=True, timeout=60)

    assert result.stdout.split() == ["plain,plan"]
