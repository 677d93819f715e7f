"""The command line's contract, as dependable as Terraform's: one meaning per exit code (0 success, 1 any error
including usage errors and a declined apply, 2 only "changes present" with --detailed-exitcode, 3 a bug),
`show` for saved plans, edited plans refused before anything is sent, `validate --format json`, hints for
Terraform's single-dash options, `sandbox serve --port 0` naming the port it bound, the schema line first in an
exported file, and workflows that read the exit codes the same way."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from reconciler import run
from reconciler.cli import main
from reconciler.sandbox.abloy import SEED_DEVICES

from conftest import reconciler_command

ROOT = Path(__file__).resolve().parent.parent
NOW = "2026-11-22T10:00:00Z"

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
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(SMALL)
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None):
        return runner.invoke(main, list(args), input=input, catch_exceptions=False)
    return invoke


# -- exit codes -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ("plan", "--detailed-exitcod"),                 # a typo'd option
    ("plan", "--detailed-exitcode", "--now", "notadate"),
    ("plan", "--format", "yaml"),                   # a bad choice
    ("pln",),                                       # an unknown command
    ("state", "frobnicate"),                        # an unknown subcommand
    ("events", "hq"),                               # a missing argument
    ("plan", "a", "--directory", "b"),              # two directories
])
def test_a_usage_error_exits_1_never_2(cli, args):
    result = cli(*args)

    assert result.exit_code == 1, result.output
    assert "Error" in result.output


def test_2_means_changes_present_only_with_detailed_exitcode(cli):
    assert cli("plan", "--now", NOW).exit_code == 0
    assert cli("plan", "--detailed-exitcode", "--now", NOW).exit_code == 2
    assert cli("apply", "--auto-approve", "--now", NOW).exit_code == 0
    assert cli("plan", "--detailed-exitcode", "--now", NOW).exit_code == 0


def test_a_declined_apply_exits_1_and_sends_nothing(cli, monkeypatch):
    from reconciler import cli as cli_module

    monkeypatch.setattr(cli_module, "_stdin_is_terminal", lambda: True)
    declined = cli("apply", "--now", NOW, input="no\n")

    assert declined.exit_code == 1, declined.output
    assert "Apply cancelled: nothing was sent." in declined.output
    assert cli("plan", "--detailed-exitcode", "--now", NOW).exit_code == 2     # still all to do


def test_help_and_version_exit_0(cli):
    assert cli("--help").exit_code == 0
    assert cli("plan", "--help").exit_code == 0
    assert cli("--version").exit_code == 0


def test_a_usage_error_exits_1_from_the_installed_command(tmp_path):
    # Through the real entry point (click's standalone handling), not only the test runner.
    result = subprocess.run([*reconciler_command(), "plan", "--no-such-option"], cwd=tmp_path,
                            capture_output=True, text=True, check=False)

    assert result.returncode == 1, result.stderr
    assert "No such option" in result.stderr


# -- Terraform's single-dash habits ----------------------------------------------------------------------------

@pytest.mark.parametrize("args, hint", [
    (("plan", "-out", "plan.json"), "use --out"),
    (("plan", "-out=plan.json"), "use --out"),
    (("apply", "-auto-approve"), "use --auto-approve"),
    (("plan", "-detailed-exitcode"), "use --detailed-exitcode"),
    (("plan", "-json"), "use --format json"),
    (("plan", "-target", "hq"), "use --target"),
    (("apply", "-lock-timeout", "5s"), "use --lock-timeout"),
])
def test_single_dash_options_get_a_hint(cli, args, hint):
    result = cli(*args)

    assert result.exit_code == 1, result.output
    assert hint in result.output
    assert "No such option: -o" not in result.output
    assert not Path("plan.json").exists()


def test_short_options_still_work(cli):
    assert cli("plan", "-vv", "-d", "policies", "--now", NOW).exit_code == 0
    assert cli("plan", "-v", "--now", NOW, "--", "policies").exit_code == 0


# -- saved plans: show, and edited plans refused ----------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["text", "markdown", "json"])
def test_show_renders_a_saved_plan_as_plan_did(cli, fmt):
    planned = cli("plan", "--out", "plan.json", "--format", fmt, "--now", NOW)
    shown = cli("show", "plan.json", "--format", fmt)

    assert shown.exit_code == 0, shown.output
    expected = planned.output.split("\nSaved the plan to")[0] if fmt == "text" else planned.output
    assert shown.output == expected
    assert "hq/permission/alice/gym/OPEN" in shown.output


def test_show_text_is_the_default_and_reads_no_system(cli, monkeypatch):
    cli("plan", "--out", "plan.json", "--now", NOW)
    monkeypatch.setattr(run, "build_providers", _no_vendor)
    shown = cli("show", "plan.json")

    assert shown.exit_code == 0, shown.output
    assert "Plan: 7 to create" in shown.output


def test_show_refuses_what_is_not_a_plan(cli, tmp_path):
    (tmp_path / "other.json").write_text('{"hello": 1}')
    (tmp_path / "broken.json").write_text('{"changes": [')

    for name in ("other.json", "broken.json", "missing.json"):
        result = cli("show", name)
        assert result.exit_code == 1, result.output
        assert "refused" in result.output and "internal error" not in result.output


def _no_vendor(*args, **kwargs):
    raise AssertionError("a vendor was contacted")


def _edit_delete_a_change(data):
    data["changes"] = [c for c in data["changes"] if c["address"] != "hq/permission/bob/annex/OPEN"]


def _edit_an_end(data):
    change = next(c for c in data["changes"] if c["address"] == "hq/permission/alice/gym/OPEN")
    change["after"]["end"] = "2026-12-31T23:59:59Z"


def _edit_an_action(data):
    data["changes"][0]["action"] = "delete"


@pytest.mark.parametrize("edit", [_edit_delete_a_change, _edit_an_end, _edit_an_action])
def test_apply_refuses_an_edited_plan_before_anything_is_sent(cli, monkeypatch, edit):
    assert cli("plan", "--out", "plan.json", "--now", NOW).exit_code == 0
    data = json.loads(Path("plan.json").read_text())
    edit(data)
    Path("plan.json").write_text(json.dumps(data, indent=2))
    before = cli("plan", "--format", "json", "--now", NOW).output

    with monkeypatch.context() as patched:
        patched.setattr(run, "build_providers", _no_vendor)     # zero vendor requests: no provider is even built
        applied = cli("apply", "--plan", "plan.json", "--auto-approve", "--now", NOW)
        shown = cli("show", "plan.json")

    assert applied.exit_code == 1, applied.output
    assert "plan.json was edited:" in applied.output and "run plan again" in applied.output
    assert "Nothing was sent" in applied.output
    assert shown.exit_code == 1 and "plan.json was edited:" in shown.output
    assert cli("plan", "--format", "json", "--now", NOW).output == before     # the vendor holds what it held


def test_apply_runs_an_unedited_saved_plan(cli):
    assert cli("plan", "--out", "plan.json", "--now", NOW).exit_code == 0
    # Re-indented is not edited: the checksum covers the changes, not the bytes.
    Path("plan.json").write_text(json.dumps(json.loads(Path("plan.json").read_text())))

    applied = cli("apply", "--plan", "plan.json", "--auto-approve", "--now", NOW)

    assert applied.exit_code == 0, applied.output
    assert "Apply complete" in applied.output


def test_a_plan_saved_without_the_null_keys_still_applies(cli):
    """Plans written before every key was on every change have the same checksum."""
    assert cli("plan", "--out", "plan.json", "--now", NOW).exit_code == 0
    data = json.loads(Path("plan.json").read_text())
    data["changes"] = [{k: v for k, v in c.items() if v is not None or k in ("before", "after", "source")}
                       for c in data["changes"]]
    Path("plan.json").write_text(json.dumps(data))

    assert cli("show", "plan.json").exit_code == 0
    assert cli("apply", "--plan", "plan.json", "--auto-approve", "--now", NOW).exit_code == 0


# -- validate --format json ----------------------------------------------------------------------------------

def test_validate_json_for_a_valid_policy(cli):
    result = cli("validate", "--format", "json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["valid"] is True and data["error_count"] == 0
    assert isinstance(data["diagnostics"], list)


def test_validate_json_lists_every_problem_at_its_place(cli, tmp_path):
    (tmp_path / "policies" / "p.yaml").write_text(SMALL.replace("alice: {phone", "alice: {emial: x, phone")
                                                  .replace("reason: FAC-1", "reason: FAC-1\n    operations: [open]"))
    result = cli("validate", "--format", "json")

    assert result.exit_code == 1, result.output
    data = json.loads(result.output)      # nothing but the JSON on standard output
    assert data["valid"] is False and data["error_count"] == len(data["diagnostics"]) >= 2
    for diagnostic in data["diagnostics"]:
        assert set(diagnostic) == {"severity", "file", "line", "column", "message"}
        assert diagnostic["severity"] == "error"
        assert diagnostic["file"].endswith("p.yaml") and diagnostic["line"] >= 1 and diagnostic["column"] >= 1
    assert any("emial" in d["message"] for d in data["diagnostics"])
    assert any(d["line"] == 15 and "operation" in d["message"] for d in data["diagnostics"])


def test_validate_json_for_a_missing_directory(cli):
    result = cli("validate", "nowhere", "--format", "json")

    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["valid"] is False and data["error_count"] == 1
    diagnostic = data["diagnostics"][0]
    assert diagnostic["severity"] == "error" and diagnostic["file"] == "nowhere" and diagnostic["line"] is None
    assert "no such file" in diagnostic["message"]


# -- sandbox serve --port 0 --------------------------------------------------------------------------------------

def test_sandbox_serve_on_port_0_prints_the_port_it_bound(tmp_path):
    server = subprocess.Popen([*reconciler_command(), "sandbox", "serve", "--port", "0", "--dir",
                               str(tmp_path / "vendor"), "--now", NOW], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                              env={**__import__("os").environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line or line.strip() == "Ready.":
                break
            lines.append(line)
        text = "".join(lines)
        assert ":0" not in text.replace(":0/", "").split("export")[0] or ":0 " not in text, text
        ports = set(re.findall(r"http://127\.0\.0\.1:(\d+)", text))
        assert len(ports) == 1 and ports != {"0"}, text
        assert f"abloy-keyless: url http://127.0.0.1:{next(iter(ports))}/abloy-keyless" in text
        assert "export " in text
        import socket
        socket.create_connection(("127.0.0.1", int(next(iter(ports)))), timeout=5).close()
    finally:
        server.terminate()
        server.wait()
        server.stdout.close()


# -- export writes the schema line first ------------------------------------------------------------------------

def test_export_starts_with_the_schema_line_of_the_shipped_policies(cli):
    assert cli("apply", "--auto-approve", "--now", NOW).exit_code == 0
    result = cli("export", "hq", "--out", "-")

    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    shipped = {p.read_text().splitlines()[0] for p in (ROOT / "policies").glob("*.yaml")}
    assert shipped == {first} == {"# yaml-language-server: $schema=../schema/policy.schema.json"}


# -- guard messages agree with their flags ---------------------------------------------------------------------

def test_guard_message_agrees_with_trips_and_refuses():
    from reconciler.plan import Guard, RevokeThreshold

    under = Guard("hq", revoking=1, managed=20, threshold=RevokeThreshold(), token="revoke-" + "0" * 16)
    over = Guard("hq", revoking=10, managed=20, threshold=RevokeThreshold(), token="revoke-" + "0" * 16)
    acknowledged = Guard("hq", revoking=10, managed=20, token="revoke-" + "0" * 16,
                         threshold=RevokeThreshold(acknowledge="revoke-" + "0" * 16, source="p.yaml:3"))

    assert not under.trips and not under.refuses
    assert "refuse" not in under.to_dict()["message"] and "apply proceeds" in under.to_dict()["message"]
    assert over.refuses and "apply will refuse it" in over.to_dict()["message"]
    assert acknowledged.trips and not acknowledged.refuses and "apply proceeds" in acknowledged.message()


# -- the README and the workflows read the exit codes the same way ------------------------------------------------

def test_readme_exit_code_table_lists_one_meaning_each():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| (\d) \| (.+) \|$", table, re.M))

    assert sorted(rows) == ["0", "1", "2", "3"]
    assert "usage error" in rows["1"] and "declined" in rows["1"]
    assert "--detailed-exitcode" in rows["2"] and "only" in rows["2"]
    assert "bug" in rows["3"]


def _plan_step(workflow: str) -> str:
    data = yaml.safe_load((ROOT / ".github" / "workflows" / workflow).read_text())
    for job in data["jobs"].values():
        for step in job.get("steps", []):
            if "reconciler plan" in step.get("run", "") and "--detailed-exitcode" in step["run"]:
                return step["run"]
    raise AssertionError(f"no plan step in {workflow}")


@pytest.mark.parametrize("workflow", ["reconciler-plan.yml", "reconciler-apply.yml", "reconciler-drift.yml"])
@pytest.mark.parametrize("code, step_fails", [(0, False), (1, True), (2, False), (3, True)])
def test_workflow_plan_steps_fail_on_errors_and_bugs(tmp_path, workflow, code, step_fails):
    bash = shutil.which("bash")
    assert bash
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "reconciler").write_text(f"#!/bin/sh\necho plan\nexit {code}\n")
    (fake / "reconciler").chmod(0o755)
    output = tmp_path / "output"
    output.write_text("")
    result = subprocess.run([bash, "-e", "-c", _plan_step(workflow)], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": f"{fake}:/usr/bin:/bin", "GITHUB_OUTPUT": str(output),
                                 "GITHUB_STEP_SUMMARY": str(tmp_path / "summary")}, check=False)

    assert (result.returncode != 0) is step_fails, result.stderr
    if workflow == "reconciler-drift.yml" and not step_fails:
        assert (tmp_path / "out" / "exitcode").read_text() == f"{code}\n"     # per site, in its artifact


def test_the_drift_issue_is_opened_only_on_exit_2_after_a_successful_plan():
    data = yaml.safe_load((ROOT / ".github" / "workflows" / "reconciler-drift.yml").read_text())
    report = data["jobs"]["report"]
    script = next(s for s in report["steps"] if "github-script" in s.get("uses", ""))["with"]["script"]

    assert report["needs"] == "drift" and "if" not in report     # a failed plan (exit 1 or 3) skips the report
    create = script.index("issues.create")
    assert script.rindex('read("exitcode").trim() === "2"', 0, create) >= 0     # each site's own exit code


def test_validate_json_reports_warnings_and_stays_valid(cli, tmp_path):
    (tmp_path / "policies" / "p.yaml").write_text(
        SMALL.replace("annex: {system: hq, name: Annex}", "annex: {system: hq, name: Annex, decommission: true}"))
    result = cli("validate", "--format", "json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["valid"] is True and data["error_count"] == 0 and data["warning_count"] >= 1
    warning = data["diagnostics"][0]
    assert warning["severity"] == "warning" and "decommissioned" in warning["message"]
    assert warning["file"].endswith("p.yaml") and warning["line"] == 11 and warning["column"] >= 1


# -- the pre-commit example names a release tag ------------------------------------------------------------------

def test_the_pre_commit_example_names_the_release_tag_of_this_version():
    from reconciler import __version__

    tag = f"v{__version__}"
    readme = (ROOT / "README.md").read_text()
    example = readme.split("To validate on every commit with [pre-commit]", 1)[1].split("```", 2)[1]
    revs = re.findall(r"rev: (\S+)", example)
    hooks = re.findall(r"rev: (\S+)", (ROOT / ".pre-commit-hooks.yaml").read_text())

    assert revs == [tag] and hooks == [tag]
    assert "tagged `v<version>`" in (ROOT / "CHANGELOG.md").read_text()
    # the hook the example names exists
    assert "reconciler-validate" in example
    assert [h["id"] for h in yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())] == ["reconciler-validate"]
