"""The GitHub workflows pass actionlint and zizmor and keep to least privilege: a pull request reaches neither
production credentials nor production. `validate --format github` annotates, escaped."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from ruamel.yaml import YAML

from reconciler.cli import main

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def _actionlint() -> str:
    found = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")
    assert found, "actionlint is a test dependency (pip install -e '.[test]')"
    return found


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is a test dependency (pip install -e '.[test]')"
    return found


def test_zizmor_finds_nothing_high_or_medium():
    result = subprocess.run([_tool("zizmor"), "--offline", "--format", "json", ".github/workflows"],
                            capture_output=True, text=True, cwd=ROOT)
    findings = json.loads(result.stdout)
    serious = [f"{f['ident']} ({f['determinations']['severity']}): "
               f"{f['locations'][0]['symbolic']['key']['Local']['verbatim_path']}:"
               f"{f['locations'][0]['concrete']['location']['start_point']['row'] + 1}"
               for f in findings if f["determinations"]["severity"] in ("High", "Medium")]
    assert serious == [], result.stderr[-2000:]
    assert result.returncode == 0 or findings, result.stderr[-2000:]


def test_zizmor_check_is_not_blind(tmp_path):
    # The same run on an unpinned, credential-persisting checkout must report it, or the test above proves nothing.
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    (tmp_path / ".github" / "workflows" / "x.yml").write_text("on: push\npermissions: {}\njobs:\n  a:\n    runs-on: ubuntu-latest\n"
                                          "    steps:\n      - uses: actions/checkout@v4\n")
    result = subprocess.run([_tool("zizmor"), "--offline", "--format", "json", ".github/workflows"], capture_output=True,
                            text=True, cwd=tmp_path)
    idents = {f["ident"] for f in json.loads(result.stdout) if f["determinations"]["severity"] in ("High", "Medium")}
    assert {"unpinned-uses", "artipacked"} <= idents, result.stdout[:2000]


def test_actionlint_passes_on_every_workflow():
    result = subprocess.run([_actionlint(), *map(str, WORKFLOWS)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_least_privilege(path):
    text = path.read_text()
    workflow = YAML(typ="safe").load(text)
    assert "pull_request_target" not in text
    assert "permissions" in workflow, "every workflow states its permissions"
    assert workflow["permissions"] != "write-all"
    # Credentials come only from secrets.*, never written in the file.
    for match in re.finditer(r"^\s*(\w*(?:KEY|SECRET|PASSWORD|TOKEN|ACCESS)\w*):\s*(.+)$", text, re.M):
        value = match.group(2).strip()
        assert value.startswith("${{ secrets.") or value.startswith("${{ github.token"), match.group(0)


def test_validate_github_annotations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text("systems:\n  hq: {vendor: abloy-keyless, url: sandbox}\n"
                                     "users:\n  alice: {phone: '+47 1'}\n")
    result = CliRunner().invoke(main, ["validate", "--format", "github", "p.yaml"])
    assert result.exit_code == 1
    assert "::error file=p.yaml,line=4,col=" in result.stdout


def test_annotations_escape_file_names_and_messages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a,b:c%.yaml").write_text("systems:\n  hq: {vendor: abloy-keyless, url: sandbox}\n"
                                          "users:\n  alice: {name: \"x\", phone: \"+47 1\\n::warning::y\"}\n")
    result = CliRunner().invoke(main, ["validate", "--format", "github", "a,b:c%.yaml"])
    assert result.exit_code == 1
    [line] = result.stdout.splitlines()
    assert line.startswith("::error file=a%2Cb%3Ac%25.yaml,line=4,col=")
    assert "%0A::warning::y" in line


def _load(name: str) -> dict:
    return YAML(typ="safe").load((ROOT / ".github" / "workflows" / name).read_text())


def _steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_action_is_pinned_and_every_checkout_drops_its_token(path):
    workflow = YAML(typ="safe").load(path.read_text())
    for step in _steps(workflow):
        if "uses" in step:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), step["uses"]
        if step.get("uses", "").startswith("actions/checkout@"):
            assert step.get("with", {}).get("persist-credentials") is False
    for name, job in workflow["jobs"].items():
        assert "permissions" in job or workflow["permissions"] in ({}, {"contents": "read"}), name


def test_plan_on_pull_requests_runs_a_release_with_plan_credentials_and_no_forks():
    workflow = _load("reconciler-plan.yml")
    triggers = workflow.get("on") or workflow[True]   # YAML 1.1 reads the key `on` as true
    assert set(triggers) == {"pull_request"}
    assert not any(".github" in path for path in triggers["pull_request"].get("paths", []))
    assert re.fullmatch(r"reconciler==\d+(\.\d+)*", workflow["env"]["RECONCILER_PIP_SPEC"])
    # Forks get no job: the first job (every other needs it) does not run for them.
    assert workflow["jobs"]["sites"]["if"] == "github.event.pull_request.head.repo.full_name == github.repository"
    plan = workflow["jobs"]["plan"]
    assert plan["needs"] == "sites"
    assert plan["environment"] == "reconciler-plan"
    assert plan["permissions"] == {"contents": "read"}
    comment = workflow["jobs"]["comment"]
    assert "secrets." not in json.dumps(comment) and "environment" not in comment
    assert not any("checkout" in step.get("uses", "") for step in comment["steps"])


def test_apply_runs_only_on_main_in_production_and_never_applies_a_stale_plan():
    workflow = _load("reconciler-apply.yml")
    triggers = workflow.get("on") or workflow[True]
    assert triggers["push"]["branches"] == ["main"]
    assert workflow["env"]["RECONCILER_PIP_SPEC"] != "."
    for job in workflow["jobs"].values():
        assert "github.ref == 'refs/heads/main'" in job["if"]
    apply = workflow["jobs"]["apply"]
    assert apply["environment"] == "production" and "plan" in apply["needs"]
    runs = [step["run"] for step in apply["steps"] if "run" in step]
    assert runs[-1] == "reconciler apply --plan approved/plan.json --auto-approve --lock-timeout 10m"
    text = json.dumps(workflow)
    assert "reconciler apply --auto-approve" not in text, "a fresh, unreviewed plan must never be applied"
    assert "git push" not in text and "contents: write" not in text
    stale = next(s for s in workflow["jobs"]["plan"]["steps"] if s.get("name") == "The reviewed plan must still be the plan")
    assert "exit 1" in stale["run"]


def test_state_comes_from_a_secret_and_is_never_committed():
    for name in ("reconciler-apply.yml", "reconciler-drift.yml", "reconciler-plan.yml"):
        text = (ROOT / ".github" / "workflows" / name).read_text()
        assert "RECONCILER_STATE: ${{ secrets.RECONCILER_STATE }}" in text
        assert "reconciler-state/" not in text and "git commit" not in text


def test_codeowners_example_requires_the_security_team():
    owners = (ROOT / ".github" / "CODEOWNERS").read_text()
    rules = dict(line.split(None, 1) for line in owners.splitlines() if line.strip() and not line.startswith("#"))
    assert "@" in rules["/policies/"] and rules["/policies/"] == rules["/.github/"]


# -- a fleet: one job per site, one shared state ----------------------------------------------------------------

FLEET = {"reconciler-plan.yml": ("plan", "reconciler-plan-"), "reconciler-apply.yml": ("plan", "reconciler-apply-plan-"),
         "reconciler-drift.yml": ("drift", "reconciler-drift-")}


def _site_jobs(workflow: dict) -> dict[str, dict]:
    return {name: job for name, job in workflow["jobs"].items() if "matrix" in job.get("strategy", {})}


@pytest.mark.parametrize("name", sorted(FLEET))
def test_each_site_is_its_own_job_with_its_own_concurrency_group_and_artifact(name):
    workflow = _load(name)
    sites = workflow["jobs"]["sites"]
    assert sites["outputs"]["sites"] == "${{ steps.list.outputs.sites }}"
    assert "secrets." not in json.dumps(sites) and "environment" not in sites   # listing needs no credential
    jobs = _site_jobs(workflow)
    assert FLEET[name][0] in jobs
    for job_name, job in jobs.items():
        assert job["strategy"]["matrix"] == {"site": "${{ fromJSON(needs.sites.outputs.sites) }}"}, job_name
        assert job["strategy"]["fail-fast"] is False                    # one site's failure stops no other
        assert isinstance(job["strategy"]["max-parallel"], int)        # PostgreSQL connections are bounded
        assert "sites" in ([job["needs"]] if isinstance(job["needs"], str) else job["needs"])
        assert "${{ matrix.site }}" in job["concurrency"]["group"], job_name
        # One shared state for every site.
        assert job["env"]["RECONCILER_STATE"] == "${{ secrets.RECONCILER_STATE }}"
        runs = [step["run"] for step in job["steps"] if "run" in step]
        # Site names come from the policy: they reach the shell as a variable, never as expanded text.
        assert not any("${{" in run and "matrix" in run for run in runs), job_name
        if job_name != "apply":
            assert job["env"]["SITE"] == "${{ matrix.site }}"
            assert any('reconciler plan --target "$SITE"' in run for run in runs), job_name
    plan_job = jobs[FLEET[name][0]]
    [upload] = [s for s in plan_job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert upload["with"]["name"] == FLEET[name][1] + "${{ matrix.site }}"


def test_plans_keep_their_checksum_per_site_and_apply_compares_each_sites_own():
    plan = _site_jobs(_load("reconciler-plan.yml"))["plan"]
    assert any('--out out/plan.json' in step.get("run", "") for step in plan["steps"])   # its checksum inside
    apply = _load("reconciler-apply.yml")
    jobs = _site_jobs(apply)
    fetch = next(s for s in jobs["plan"]["steps"] if s.get("name", "").startswith("Fetch the plan"))
    assert '--name "reconciler-plan-${SITE}"' in fetch["run"]
    stale = next(s for s in jobs["plan"]["steps"] if s.get("name") == "The reviewed plan must still be the plan")
    assert "jq -r .checksum reviewed/plan.json" in stale["run"] and "exit 1" in stale["run"]
    [download] = [s for s in jobs["apply"]["steps"] if s.get("uses", "").startswith("actions/download-artifact@")]
    assert download["with"]["name"] == "reconciler-apply-plan-${{ matrix.site }}"
    assert jobs["apply"]["concurrency"] == {"group": "reconciler-apply-${{ matrix.site }}", "cancel-in-progress": False}
    assert jobs["apply"]["environment"] == "production"


def _listing(name: str) -> str:
    run = next(s["run"] for s in _load(name)["jobs"]["sites"]["steps"] if s.get("id") == "list")
    return run.split("<<'EOF' >> \"$GITHUB_OUTPUT\"\n", 1)[1].rsplit("EOF", 1)[0]


def test_the_sites_are_the_systems_of_the_policy(tmp_path):
    scripts = {_listing(name) for name in FLEET}
    assert len(scripts) == 1, "the three workflows list sites the same way"
    (tmp_path / "policies" / "north").mkdir(parents=True)
    (tmp_path / "policies" / "systems.yaml").write_text("systems:\n  site-002: {vendor: unloc}\n  site-001: {vendor: spkey}\n")
    (tmp_path / "policies" / "north" / "more.yml").write_text("systems:\n  site-017: {vendor: sentry}\nusers: {}\n")
    (tmp_path / "policies" / "people.yaml").write_text("users:\n  alice: {}\n")
    result = subprocess.run([sys.executable, "-c", scripts.pop()], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'sites=["site-001", "site-002", "site-017"]'
    (tmp_path / "policies" / "bad.yaml").write_text("systems:\n  \"x\\\" && curl evil\": {vendor: unloc}\n")
    refused = subprocess.run([sys.executable, "-c", _listing("reconciler-plan.yml")], capture_output=True, text=True,
                             cwd=tmp_path)
    assert refused.returncode == 1 and "::error::" in refused.stderr and "sites=" not in refused.stdout


def test_every_workflow_installs_the_release_of_this_version():
    """The workflows use `--target`, `reconciler test` and `apply --wait`: they install the release of the
    version they ship with (CHANGELOG), not an earlier one that lacks a command they run."""
    from reconciler import __version__

    for name in ("reconciler-plan.yml", "reconciler-apply.yml", "reconciler-drift.yml"):
        assert _load(name)["env"]["RECONCILER_PIP_SPEC"] == f"reconciler=={__version__}", name
    assert f"## [{__version__}]" in (ROOT / "CHANGELOG.md").read_text()
