"""The revision guard with a real git repository: two commits, two work trees, one shared state (a local file
and PostgreSQL). A runner on the older commit that applies after the newer one is refused, naming both, and
sends nothing; outside git the guard is off and plan says so once."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import httpx
import pytest
from test_abloy_provider import POLICY
from test_state_postgres import pg_server, pg_url  # noqa: F401 - fixtures

from reconciler import run
from reconciler.errors import RefusedError

SYSTEMS = textwrap.dedent("""\
    systems:
      hq:
        vendor: abloy-keyless
        url: https://abloy.test/administration
        credentials:
          user_id: "${ABLOY_USER_ID}"
          access_key: "${ABLOY_ACCESS_KEY}"
          api_key: "${ABLOY_API_KEY}"
    """)
NEWER = POLICY.replace('  bob: {phone: "+4790000002"}\n', "").replace("staff: [alice, bob]", "staff: [alice]")


def _git(cwd: Path, *args: str, when: str | None = None) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}
    if when:
        env |= {"GIT_AUTHOR_DATE": when, "GIT_COMMITTER_DATE": when}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A repository whose first commit holds POLICY and whose second (a day later) offboards bob; one work tree
    on each."""
    main = tmp_path / "repo"
    (main / "policies").mkdir(parents=True)
    _git(main, "init", "-q", "-b", "main")
    (main / "policies" / "systems.yaml").write_text(SYSTEMS)
    (main / "policies" / "policy.yaml").write_text(POLICY)
    _git(main, "add", ".")
    _git(main, "commit", "-qm", "first", when="2026-11-20T10:00:00Z")
    old = _git(main, "rev-parse", "HEAD")
    (main / "policies" / "policy.yaml").write_text(NEWER)
    _git(main, "commit", "-qam", "offboard bob", when="2026-11-21T10:00:00Z")
    new = _git(main, "rev-parse", "HEAD")
    _git(main, "worktree", "add", "-q", str(tmp_path / "old"), old)
    return {"new": (main / "policies", new), "old": (tmp_path / "old" / "policies", old)}


def _session(harness, directory: Path, state_url: str | None = None, revision: str | None = None) -> run.Session:
    return run.Session(directory=directory, state_path=harness.tmp_path / "state" / "state.json", state_url=state_url,
                       env=harness.env, now=harness.now, transports={"hq": httpx.MockTransport(harness.sim.handle)},
                       provider_options={"sleep": harness.sleeps.append}, allowed_hosts=("abloy.test",),
                       revision=revision)


def _writes(h) -> int:
    return sum(h.sim.count(m) for m in ("POST", "PUT", "PATCH", "DELETE")) - h.sim.count("POST", "/administration/login")


def _apply(session, **options):
    return run.apply(session, saved=None, approve=lambda plan: True, allow_mass_revoke=True, **options)


def _older_is_refused(harness, repo, state_url=None):
    old_dir, old = repo["old"]
    new_dir, new = repo["new"]
    _apply(_session(harness, old_dir, state_url))            # the first runner applies the first commit
    _apply(_session(harness, new_dir, state_url))            # then the newer commit: bob goes
    assert not run.plan(_session(harness, new_dir, state_url)).has_changes
    harness.sim.reset_log()
    assert "refusing to revert it" in (run.revision_notice(_session(harness, old_dir, state_url)) or "")
    with pytest.raises(RefusedError) as refused:
        _apply(_session(harness, old_dir, state_url))        # a runner still on the first commit
    message = str(refused.value)
    assert f"last applied from {new[:12]}… at 2026-11-21T10:00:00Z" in message
    assert f"this checkout is {old[:12]}… at 2026-11-20T10:00:00Z, older: refusing to revert it" in message
    assert "--allow-older-revision" in message
    assert _writes(harness) == 0                             # bob was not created again
    _, report = _apply(_session(harness, old_dir, state_url), allow_older_revision=True)
    assert report is not None and report.ok and _writes(harness) > 0


def test_an_older_checkout_is_refused_on_a_local_state(harness, repo):
    _older_is_refused(harness, repo)
    state = json.loads((harness.tmp_path / "state" / "state.json").read_text())
    assert state["notes"]["revision"]["commit"] == repo["old"][1]     # the deliberate revert is the last now


def test_an_older_checkout_is_refused_on_a_postgres_state(harness, repo, pg_url):  # noqa: F811
    _older_is_refused(harness, repo, pg_url)


def test_a_newer_checkout_and_the_same_one_go_through(harness, repo):
    old_dir, _ = repo["old"]
    new_dir, _ = repo["new"]
    _apply(_session(harness, old_dir))
    _apply(_session(harness, old_dir))
    _, report = _apply(_session(harness, new_dir))
    assert report is not None and report.ok


def test_revision_given_outside_git_by_commit_time(harness, tmp_path):
    directory = harness.policy_dir
    harness.write(POLICY)
    assert "revision guard" in run.revision_notice(_session(harness, directory)) and "is off" in \
        run.revision_notice(_session(harness, directory))
    _apply(_session(harness, directory, revision="bbbb@2026-11-21T10:00:00Z"))
    harness.sim.reset_log()
    with pytest.raises(RefusedError) as refused:
        _apply(_session(harness, directory, revision="aaaa@1763632800"))     # 2025-11-20: older
    assert "last applied from bbbb… at 2026-11-21T10:00:00Z" in str(refused.value)
    assert _writes(harness) == 0
    _apply(_session(harness, directory, revision="cccc@2026-11-22T10:00:00Z"))
    _apply(_session(harness, directory))                     # outside git, no revision: the guard is off


def test_plan_says_once_that_the_guard_is_off_outside_git(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from reconciler.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RECONCILER_REVISION", raising=False)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(textwrap.dedent("""\
        systems:
          hq: {vendor: abloy-keyless, url: sandbox}
        devices:
          front: {system: hq, name: Front}
        """))
    result = CliRunner().invoke(main, ["plan", "--now", "2026-11-22T10:00:00Z"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.count("the revision guard") == 1 and "is off" in result.output
    given = CliRunner().invoke(main, ["plan", "--now", "2026-11-22T10:00:00Z"],
                               env={"RECONCILER_REVISION": "abc@2026-11-22T09:00:00Z"}, catch_exceptions=False)
    assert "the revision guard" not in given.output


def test_state_push_and_pull_carry_the_revision_and_evidence(tmp_path, pg_url):  # noqa: F811
    from reconciler.state import LocalState, open_state

    local = LocalState(tmp_path / "state.json")
    local.set_note("revision", {"commit": "abc", "time": 1763632800})
    local.set_note("evidence", {"hq/user/bob": {"phone": "sha256:x"}})
    local.save()
    with open_state(pg_url) as shared:
        shared.replace(LocalState(tmp_path / "state.json").snapshot())
    again = open_state(pg_url)
    assert again.note("revision") == {"commit": "abc", "time": 1763632800}
    assert again.snapshot()["notes"]["evidence"] == {"hq/user/bob": {"phone": "sha256:x"}}


def test_the_apply_workflow_passes_the_revision():
    from ruamel.yaml import YAML

    root = Path(__file__).resolve().parent.parent
    workflow = YAML(typ="safe").load((root / ".github" / "workflows" / "reconciler-apply.yml").read_text())
    for name, job in workflow["jobs"].items():
        assert job["env"]["RECONCILER_REVISION"] == "${{ github.sha }}", name
