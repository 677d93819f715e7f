"""Hostile policy input is refused at validation with one located line and exit 1, within seconds: oversized
files, alias bombs, deep nesting, symlinks out of the policy directory, file names with control characters."""

from __future__ import annotations

import os
import re
import time

import pytest
from click.testing import CliRunner

from reconciler.cli import main
from reconciler.text import printable

SYSTEM = "systems:\n  hq: {vendor: abloy-keyless, url: sandbox}\n"
LOCATED = re.compile(r"^[^\n]+:\d+:\d+: [^\n]+$")


def validate(tmp_path, monkeypatch, *args: str):
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    result = CliRunner().invoke(main, ["validate", *args])
    assert time.monotonic() - started < 5, "hostile input must be refused within seconds"
    return result


def one_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "internal error" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert LOCATED.match(lines[0]), lines[0]
    return lines[0]


def test_oversized_file_is_refused_without_reading_it(tmp_path, monkeypatch):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "hq.yaml").write_text(SYSTEM)
    big = tmp_path / "policies" / "big.yaml"
    with big.open("wb") as handle:   # 50 MB, sparse: no time is spent writing it
        handle.truncate(50 * 1024 * 1024)
    line = one_error(validate(tmp_path, monkeypatch, "policies"))
    assert line == "policies/big.yaml:1:1: the file is 50.0 MB; policy files over 5 MB are refused"


def test_alias_bomb_is_refused_at_the_alias(tmp_path, monkeypatch):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):   # 9**12 strings once expanded
        name, prev = chr(97 + i), chr(96 + i)
        levels.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    (tmp_path / "bomb.yaml").write_text(SYSTEM + "users:\n  alice:\n    name: Alice\n" + "\n".join(levels) + "\n")
    line = one_error(validate(tmp_path, monkeypatch, "bomb.yaml"))
    assert line.startswith("bomb.yaml:6:")
    assert line.endswith("YAML aliases (*name, repeating an &name anchor) are not accepted in a policy; write the value out")


def test_a_single_alias_is_refused_too(tmp_path, monkeypatch):
    (tmp_path / "p.yaml").write_text(SYSTEM + "groups:\n  staff: &people [alice]\n  ops: *people\n")
    line = one_error(validate(tmp_path, monkeypatch, "p.yaml"))
    assert line.startswith("p.yaml:5:3: YAML aliases")


@pytest.mark.parametrize("nesting", ["flow", "flow-lines", "block", "compact"])
def test_deep_nesting_is_refused_at_its_line(tmp_path, monkeypatch, nesting):
    deep = 100_000
    text = {
        "flow": "groups:\n  staff: " + "[" * deep + "]" * deep + "\n",
        "flow-lines": "groups:\n  staff:\n" + "    [\n" * 2000 + "    x" + "]" * 2000 + "\n",
        "block": "groups:\n" + "".join(" " * (i + 2) + f"k{i}:\n" for i in range(2000)),
        "compact": "groups:\n  staff:\n    " + "- " * deep + "x\n",
    }[nesting]
    (tmp_path / "deep.yaml").write_text(text)
    line = one_error(validate(tmp_path, monkeypatch, "deep.yaml"))
    assert re.match(r"deep\.yaml:\d+:\d+: nesting deeper than 32 levels is refused$", line), line


def test_nesting_within_the_bound_is_accepted(tmp_path, monkeypatch):
    # 30 levels under `groups: staff:` stay within the bound: the schema, not the bound, says what is wrong.
    (tmp_path / "p.yaml").write_text(SYSTEM + "groups:\n  staff: " + "[" * 28 + "]" * 28 + "\n")
    result = validate(tmp_path, monkeypatch, "p.yaml")
    assert result.exit_code == 1
    assert "nesting" not in result.output


def test_symlink_out_of_the_policy_directory_is_refused(tmp_path, monkeypatch):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "hq.yaml").write_text(SYSTEM)
    (tmp_path / "secret.yaml").write_text("users: {alice: {name: from outside}}\n")
    os.symlink(tmp_path / "secret.yaml", tmp_path / "policies" / "more.yaml")
    line = one_error(validate(tmp_path, monkeypatch, "policies"))
    assert line == "policies/more.yaml:1:1: a symlink leading outside the policy directory is refused"


def test_symlinked_folder_out_of_the_policy_directory_is_refused(tmp_path, monkeypatch):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "hq.yaml").write_text(SYSTEM)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.yaml").write_text("users: {}\n")
    os.symlink(tmp_path / "elsewhere", tmp_path / "policies" / "more")
    result = validate(tmp_path, monkeypatch, "policies")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["policies/more: a symlink leading outside the policy directory is refused"]


def test_symlink_to_a_device_or_nowhere_is_refused(tmp_path, monkeypatch):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "hq.yaml").write_text(SYSTEM)
    os.symlink("/dev/zero", tmp_path / "policies" / "zero.yaml")
    os.symlink(tmp_path / "gone", tmp_path / "policies" / "gone.yaml")
    result = validate(tmp_path, monkeypatch, "policies")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "policies/gone.yaml: a symlink leading outside the policy directory is refused",
        "policies/zero.yaml: a symlink leading outside the policy directory is refused"]


def test_symlink_inside_the_policy_directory_is_followed(tmp_path, monkeypatch):
    (tmp_path / "policies" / "shared").mkdir(parents=True)
    (tmp_path / "policies" / "shared" / "hq.yml").write_text(SYSTEM)
    os.symlink("shared/hq.yml", tmp_path / "policies" / "hq.yaml")
    result = validate(tmp_path, monkeypatch, "policies")
    # The same system read twice through the link: an ordinary duplicate, not a refusal.
    assert "symlink" not in result.output
    assert "already defined" in result.output


@pytest.mark.parametrize("name", ["evil\n<!--.yaml", "evil\n::warning::pwned.yaml", "evil\u202egnp.yaml"])
def test_file_name_with_control_characters_is_refused(tmp_path, monkeypatch, name):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "hq.yaml").write_text(SYSTEM)
    (tmp_path / "policies" / name).write_text("users: {}\n")
    for fmt in ("text", "github"):
        result = validate(tmp_path, monkeypatch, "policies", "--format", fmt)
        assert result.exit_code == 1
        out = (result.stdout if fmt == "github" else result.stderr).splitlines()
        assert len(out) == 1, out
        assert "::warning::pwned" not in out[0].split("::", 2)[-1] or fmt == "text"
        assert "\n" not in out[0] and "\u202e" not in out[0]
        assert "the file name contains control characters; rename the file" in out[0]
        assert printable(name) in out[0].replace("%3A", ":").replace("%2C", ",")


def test_printable_escapes_what_could_break_a_line():
    assert printable("a\nb\rc\td\x1be\u2028f\u202eg") == "a\\nb\\rc\\td\\x1be\\u2028f\\u202eg"
    assert printable("Ærøskøbing ✓") == "Ærøskøbing ✓"
