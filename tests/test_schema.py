"""`reconciler schema`: a JSON Schema (draft 2020-12) of one policy file that editors use while typing. It accepts
every policy and example file in the repository, refuses unknown keys, and the copy committed for editors
(`schema/policy.schema.json`, named by each example's `# yaml-language-server: $schema=` line) is current."""

from __future__ import annotations

import json
import re
import shutil
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner
from ruamel.yaml import YAML

from reconciler import run
from reconciler.cli import main
from reconciler.policy.yamlio import plain

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "schema" / "policy.schema.json"
# Every policy file a user sees: the demo, the examples, the valid test policies.
POLICY_FILES = sorted(p for folder in ("policies", "examples", "tests/data/valid")
                      for p in (ROOT / folder).rglob("*") if p.suffix in (".yaml", ".yml"))
SHIPPED = [p for p in POLICY_FILES if not p.relative_to(ROOT).as_posix().startswith("tests/")]


def as_editor_sees(path: Path) -> Any:
    """The file as yaml-language-server reads it (YAML 1.2: a timestamp is a string)."""
    def strings(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strings(v) for k, v in node.items()}
        if isinstance(node, list):
            return [strings(v) for v in node]
        if isinstance(node, datetime):
            return node.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") if node.tzinfo else node.isoformat()
        if isinstance(node, date):
            return node.isoformat()
        return node
    return strings(plain(YAML(typ="rt").load(path.read_text(encoding="utf-8"))))


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = run.schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def test_the_command_prints_draft_2020_12():
    result = CliRunner().invoke(main, ["schema"])

    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema == run.schema()


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_policy_file_in_the_repository_is_valid(validator, path):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(as_editor_sees(path))]

    assert errors == []


@pytest.mark.parametrize("document, where", [
    ({"sytems": {}}, ""),
    ({"users": {"alice": {"emial": "a@example.com"}}}, "users/alice"),
    ({"devices": {"door": {"system": "hq", "colour": "#2266aa", "color": "#2266aa"}}}, "devices/door"),
    ({"permissions": [{"users": ["a"], "devices": ["d"], "until": "2026-01-01T00:00:00Z"}]}, "permissions/0"),
    ({"schedules": {"s": [{"days": ["mon"], "from": "08:00", "to": "18:00", "tz": "UTC"}]}}, "schedules/s/0"),
    ({"systems": {"hq": {"vendor": "abloy-keyless", "lock_holder_id": "x"}}}, "systems/hq"),   # unloc's setting
    ({"systems": {"hq": {"vendor": "spkey", "credentials": {"token": "${T}"}}}}, "systems/hq"),
])
def test_unknown_keys_are_refused(validator, document, where):
    errors = list(validator.iter_errors(document))

    assert errors, "an unknown key must be an error"
    assert any("/".join(map(str, e.absolute_path)).startswith(where) for e in errors)


@pytest.mark.parametrize("document", [
    {"users": {"Alice Smith": {}}},                                            # not a name
    {"users": {"a": {"email": "not an address"}}},
    {"devices": {"d": {"system": "hq", "colour": "blue"}}},
    {"permissions": [{"users": ["a"], "devices": ["d"], "key_validity": "8 days"}]},
    {"systems": {"hq": {"vendor": "abloy-keyless", "credentials": {"api_key": "hunter2"}}}},   # a literal secret
    {"systems": {"hq": {"vendor": "unloc"}}},                                  # lock_holder_id is required
    {"systems": {"hq": {"vendor": "acme"}}},
])
def test_what_an_editor_can_judge_alone_is_refused(validator, document):
    assert list(validator.iter_errors(document))


def test_the_committed_schema_is_current():
    assert json.loads(COMMITTED.read_text()) == run.schema(), \
        "run `reconciler schema --out schema/policy.schema.json` and commit it"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_shipped_policy_file_names_the_schema(path):
    first = path.read_text().splitlines()[0]
    match = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)

    assert match, f"{path} should start with a yaml-language-server $schema line"
    assert (path.parent / match[1]).resolve() == COMMITTED


def test_pre_commit_hook_runs_validate_on_the_policy_directory(tmp_path, monkeypatch):
    [hook] = YAML(typ="safe").load((ROOT / ".pre-commit-hooks.yaml").read_text())

    assert hook["id"] == "reconciler-validate"
    assert hook["language"] == "python" and hook["pass_filenames"] is False
    assert re.search(hook["files"], "policies/access.yaml") and not re.search(hook["files"], "README.md")
    command, *args = hook["entry"].split() + hook.get("args", [])
    assert command == "reconciler"
    # What pre-commit would run, on a copy of the demo: passes; with an unknown key: fails at the line.
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(main, args).exit_code == 0
    (tmp_path / "policies" / "zed.yaml").write_text("users:\n  zed: {emial: z@example.com}\n")
    failed = CliRunner().invoke(main, args)
    assert failed.exit_code == 1 and "policies/zed.yaml:2:9: unknown key 'emial'" in failed.output
