"""The fast YAML path (libyaml compose, YAML 1.2 core schema) gives exactly what ruamel.yaml's round-trip loader
gives, with the same positions, or hands the file to ruamel.yaml: compared on every YAML file of the repository
and on scalars and shapes chosen to differ between YAML 1.1 and 1.2 or between the two scanners."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from reconciler.policy import yamlio
from reconciler.policy.yamlio import Map, Seq, _Fallback, _read_with_ruamel, parse_text, plain, read_documents

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted(p for folder in ("tests", "examples", "policies") for p in (ROOT / folder).rglob("*")
               if p.suffix in (".yaml", ".yml") and p.is_file())


def shape(node):
    """Values and every position, comparable with ==, NaN included."""
    if isinstance(node, Map):
        # An empty value has no position of its own (`locate` uses its key): only the key's is compared.
        return ("map", node.line, node.col, [(shape(plain(k)), shape(v), node.places.get(k) if v is not None
                                              else node.places.get(k, (None,))[0]) for k, v in node.items()])
    if isinstance(node, Seq):
        return ("seq", node.line, node.col, [(shape(v), p) for v, p in zip(node, node.places, strict=True)])
    value = plain(node)
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    return (type(value).__name__, value, getattr(value, "tzinfo", None) and value.utcoffset())


def both(text: str):
    reference, problem = _read_with_ruamel(text, "f.yaml")
    try:
        fast = parse_text(text)
    except _Fallback:
        return None, (reference, problem)
    assert problem is None, f"the fast path accepted what ruamel refuses: {problem}"
    return fast, (reference, problem)


def test_the_files_of_the_repository_read_the_same():
    fast_files = 0
    for file in FILES:
        fast, (reference, _) = both(file.read_text(encoding="utf-8"))
        if fast is not None:
            fast_files += 1
            assert shape(fast) == shape(reference), file
    assert fast_files > 20    # most files take the fast path: the comparison is not vacuous


SCALARS = [
    "abc", "true", "True", "TRUE", "false", "yes", "no", "on", "off", "y", "n", "Yes", "NO",
    "null", "Null", "NULL", "~", "nULL", "0", "12", "-12", "+12", "012", "0o17", "0O17", "0x1F", "0x1f", "0xAbC",
    "0b101", "0b1_01", "1_000", "1__0", "0_1", "1.5", "1.", ".5", "-.5", "+.5e+3", "1e3", "1E3", "-1e-3", "1.5e3",
    "1_0.5", ".inf", "-.inf", "+.Inf", ".NaN", ".nan", "-.nan", "1:20", "1:20:30", "190:20:30.15", "0.1.2",
    "2026-01-01", "2026-1-1", "2026-01-01T00:00:00Z", "2026-01-01t00:00:00Z", "2026-01-01 10:00:00",
    "2026-01-01   10:00:00 +02:00", "2026-01-01T10:00:00+02", "2026-01-01T10:00:00-0230", "2026-01-01T10:00:00-02:30",
    "2026-01-01T10:00:00.5Z", "2026-01-01T10:00:00.1234567Z", "2026-01-01T10:00:00.9999995Z", "2026-02-30",
    "2026-13-01T00:00:00Z", "2026-01-01T25:00:00Z", "2026-01-01T10:00:00.", "2026-01-01T1:00:00Z",
    "2026-01-01T10:00", "20260101", "+4790000000", "${VAR}", "$VAR", "a b c", "a: b", "- a", "<<", "=", "<a",
    "@x", "`x", "%x", "x # c", "'quoted'", '"dq \\u00e9 \\x41"', "'it''s'", "\"multi\n  line\"", "|\n  block\n  x\n",
    ">\n  folded\n  text\n\n  para\n", "|-\n  keep\n", ">+\n  keep\n\n", "plain\n  continued", "ø😀", "0b", "_",
    "-", "--", "-_", "0x_", "1e", "e3", "!!str 12", "!!int '12'", "! 12", "&a x", "!custom x",
]


@pytest.mark.parametrize("scalar", SCALARS)
@pytest.mark.parametrize("template", ["k: {}\n", "- {}\n", "{}: v\n"])
def test_scalars_read_the_same(scalar, template):
    text = template.format(scalar.replace("\n", "\n  ")) if "\n" in scalar and template != "{}: v\n" else \
        template.format(scalar)
    try:
        reference, problem = _read_with_ruamel(text, "f.yaml")
    except Exception:                              # ruamel itself fails (e.g. `0b`): the fast path must hand over
        with pytest.raises(_Fallback):
            parse_text(text)
        return
    try:
        fast = parse_text(text)
    except _Fallback:
        return
    assert problem is None, problem
    assert shape(fast) == shape(reference)


SHAPES = [
    "", "# only a comment\n", "---\n", "--- \n...\n", "x\n", "[a, b]\n", "{a: 1, b: [1, {c: d}]}\n",
    "a:\n  b:\n    c: [1, 2]\n  d:\n  - e\n  -   f: 1\n      g: 2\n", "a:\nb: ~\nc: ''\n",
    "a: &x [1]\nb: *x\n", "a: {b: 1, b: 2}\n", "a: 1\na: 2\n", "a: 1\n1: 2\n'1': 3\n", "? [a, b]\n: c\n",
    "? a\n: b\n", "<<: {a: 1}\nb: 2\n", "%YAML 1.1\n---\na: yes\n", "a: b\n---\nc: d\n", "a:\tb\n", "a: b\t\n",
    "\ufeffa: b\n", "a: b\x85c: d\n", "a: b\u2028c\n", "a: 'b\tc'\n", "a: [b, c\n", "a: b: c\n", "a:\n- b\nc\n",
    "a: {b: ${X}}\n", "a: [${X}]\n", "a: ${X}\n", "a: \"${X}\"\n", "a: b\r\nc: d\r\n", "a: b\rc: d\r",
    "a: [b:c, d: e]\n", "a: {b:c}\n", "a: {b: c,}\n", "a: [b, c,]\n", "- [a, [b, [c]]]\n", "a: !!set {b, c}\n",
    "a: !!omap [b: 1]\n", "a: !!binary aGk=\n", "a:    \n  - x\n", "a: |\n  x\n b: c\n", "a: 'x\n\n  y'\n",
    "a: \"\\x\"\n", "a: \x07\n", "ключ: значение\nø: [😀, ø]\n", "a:\n  # c\n  b: 1 # d\n",
    "- - - x\n", "a: -\n", "a: - b\n", "- ? a\n  : b\n",
]


@pytest.mark.parametrize("text", SHAPES)
def test_shapes_read_the_same(text):
    try:
        reference, problem = _read_with_ruamel(text, "f.yaml")
    except Exception:
        with pytest.raises(_Fallback):
            parse_text(text)
        return
    try:
        fast = parse_text(text)
    except _Fallback:
        return
    assert problem is None, problem
    assert shape(fast) == shape(reference)


def test_an_error_keeps_ruamels_message_and_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text("systems:\n  hq: {vendor: abloy-keyless, api_key: ${KEY}}\nusers:\n  a: 1\n  a: 2\n")
    _, diagnostics = read_documents(Path("p.yaml"))
    assert [str(d) for d in diagnostics] == [
        "p.yaml:2:40: an unquoted ${KEY} is not YAML inside { } or [ ] (the { ends the value): quote it, \"${KEY}\""]
    (tmp_path / "p.yaml").write_text("users:\n  a: 1\n  a: 2\n")
    _, diagnostics = read_documents(Path("p.yaml"))
    assert [str(d) for d in diagnostics] == ["p.yaml:3:3: key 'a' appears twice in the same mapping"]


def test_the_fast_path_is_taken_for_ordinary_files(monkeypatch):
    calls = []
    monkeypatch.setattr(yamlio, "_read_with_ruamel", lambda *args: calls.append(args) or (None, None))
    text = "users:\n  alice: {phone: '+4790000000', mobile_key: true}\npermissions:\n- users: [alice]\n" \
           "  devices: [door]\n  start: 2026-01-01T00:00:00Z\n"
    root = parse_text(text)
    assert calls == []
    assert root["permissions"][0]["start"].utcoffset().total_seconds() == 0
    assert yamlio.locate("f", root, ["permissions", 0, "start"]) == yamlio.Location("f", 6, 10)
