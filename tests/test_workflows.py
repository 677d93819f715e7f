"""The GitHub workflows pass actionlint and keep to least privilege; `validate --format github` annotates."""

from __future__ import annotations

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
