"""Read policy YAML files with positions, and find the `file:line:col` of any node in them.

`load_policy` calls `read_documents` on a directory (every `*.yaml`/`*.yml` below it, recursively, in sorted
order) or on a single file. A file is read from the event stream of PyYAML's C parser (libyaml), whose events
carry the line and column of every node, and the tree is built from those events with the YAML 1.2 core schema
ruamel.yaml applies in round-trip mode: `Map` and `Seq` are a dict and a list that remember where each key, value and item sits.
A file the fast path does not handle exactly as ruamel.yaml would (any syntax error, a tag, an anchor or
alias, a merge key, a duplicate key, a complex key, nesting beyond the bound, tabs, YAML 1.1 line breaks) is
parsed again with ruamel.yaml, whose result and messages are the reference; only such files pay for it.
`locate` walks a path of keys and indices down the tree and returns the `Location` of the deepest node it
reaches, which is how schema and check errors get their `file:line:col`. `plain` turns a tree into ordinary
Python values for pydantic.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from reconciler.errors import Diagnostic, Location

from . import bounds

YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Document:
    """One parsed policy file: its path as shown in messages and its round-trip root (None when empty)."""

    path: str
    root: Any


def display_path(path: Path) -> str:
    """The path as messages show it: relative to the working directory when under it, else as given."""
    cwd = Path.cwd().resolve()
    # Symlinks are not resolved in the file itself: a link is named as the link, where it sits.
    for candidate in (Path(os.path.abspath(path)), path.resolve()):
        try:
            return candidate.relative_to(cwd).as_posix()
        except ValueError:
            continue
    return path.as_posix()


def policy_files(path: Path) -> list[Path]:
    if path.is_dir():
        # Hidden files and folders (.git, editor backups, .github workflows) are not policy.
        found = (p for p in path.rglob("*") if p.suffix in YAML_SUFFIXES and p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(path).parts))
        # Sorting by the relative path keeps the merge order (and so "already defined at") stable across machines.
        return sorted(found, key=lambda p: p.relative_to(path).as_posix())
    return [path]


def read_documents(path: Path) -> tuple[list[Document], list[Diagnostic]]:
    """Parse every policy file under `path`; a file that fails to parse becomes a diagnostic, not an exception,
    so that the other files are still checked."""
    documents: list[Document] = []
    diagnostics: list[Diagnostic] = []
    if not path.exists():
        return [], [Diagnostic(Location(display_path(path)), "no such file or directory")]
    files = policy_files(path)
    if path.is_dir() and not files:
        diagnostics.append(Diagnostic(Location(display_path(path)), "no *.yaml or *.yml policy files here"))
    if path.is_dir():
        diagnostics += bounds.check_links(path, display_path(path))
    for file in files:
        shown = display_path(file)
        refused = bounds.check_file(file, shown, path if path.is_dir() else None)
        if refused:
            diagnostics.append(refused)
            continue
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            diagnostics.append(Diagnostic(Location(shown), f"cannot read the file: {reason}"))
            continue
        refused = bounds.check_text(text, shown)
        if refused:
            diagnostics.append(refused)
            continue
        try:
            root = parse_text(text)
        except _Fallback:
            root, problem = _read_with_ruamel(text, shown)
            if problem is not None:
                diagnostics.append(problem)
                continue
        documents.append(Document(shown, root))
    return documents, diagnostics


# ------------------------------------------------------------------------------------------------ the tree

Position = tuple[int, int]   # 0-based line and column


class Map(dict[Any, Any]):
    """A YAML mapping: a dict that knows where it starts and where each key and value sits."""

    __slots__ = ("col", "line", "places")

    def __init__(self, line: int = 0, col: int = 0) -> None:
        super().__init__()
        self.line, self.col = line, col
        # key → (position of the key, position of the value); either is None when the parser gave none.
        self.places: dict[Any, tuple[Position | None, Position | None]] = {}


class Seq(list[Any]):
    """A YAML sequence: a list that knows where it starts and where each item sits."""

    __slots__ = ("col", "line", "places")

    def __init__(self, line: int = 0, col: int = 0) -> None:
        super().__init__()
        self.line, self.col = line, col
        self.places: list[Position | None] = []


class _Fallback(Exception):
    """The fast path cannot promise ruamel.yaml's result for this file: parse it with ruamel.yaml."""


# ------------------------------------------------------------------------------------------- the fast path

# Characters the C parser reads as line breaks or skips where YAML 1.2 (ruamel.yaml) does not, and tabs
# (whose acceptance differs between the two scanners in a few places): such a file takes the reference path.
_DIFFERENT = ("\t", "\x85", "\u2028", "\u2029", "\ufeff")

# The YAML 1.2 core schema as ruamel.yaml resolves plain scalars (ruamel/yaml/resolver.py, version (1, 2)).
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_FLOAT = re.compile(r"""^(?:
     [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.VERBOSE)
_INT = re.compile(r"""^(?:[-+]?0b[0-1_]+
    |[-+]?0o?[0-7_]+
    |[-+]?[0-9_]+
    |[-+]?0x[0-9a-fA-F_]+)$""", re.VERBOSE)
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_TIMESTAMP = re.compile(r"""^(?:[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]
    |[0-9][0-9][0-9][0-9]-[0-9][0-9]?-[0-9][0-9]?
    (?:[Tt]|[\ \t]+)[0-9][0-9]?
    :[0-9][0-9]:[0-9][0-9](?:\.[0-9]*)?
    (?:[\ \t]*(?:Z|[-+][0-9][0-9]?(?::[0-9][0-9])?))?)$""", re.VERBOSE)
# ruamel.yaml's timestamp_regexp (ruamel/yaml/util.py), which splits a resolved timestamp into its parts.
_TIMESTAMP_PARTS = re.compile(r"""^(?P<year>[0-9][0-9][0-9][0-9])
    -(?P<month>[0-9][0-9]?)
    -(?P<day>[0-9][0-9]?)
    (?:((?P<t>[Tt])|[\ \t]+)
    (?P<hour>[0-9][0-9]?)
    :(?P<minute>[0-9][0-9])
    :(?P<second>[0-9][0-9])
    (?:\.(?P<fraction>[0-9]*))?
    (?:[\ \t]*(?P<tz>Z|(?P<tz_sign>[-+])(?P<tz_hour>[0-9][0-9]?)
    (?::(?P<tz_minute>[0-9][0-9]))?))?)?$""", re.VERBOSE)
# The first characters for which a plain scalar may be something other than a string, and what to try.
_FIRST: dict[str, tuple[str, ...]] = {}
for _kind, _chars in (("bool", "tTfF"), ("float", "-+0123456789."), ("int", "-+0123456789"),
                      ("merge", "<"), ("null", "~nN"), ("timestamp", "0123456789"), ("value", "=")):
    for _char in _chars:
        _FIRST[_char] = (*_FIRST.get(_char, ()), _kind)
_MATCHERS = {"bool": _BOOL.match, "float": _FLOAT.match, "int": _INT.match, "null": _NULL.match,
             "timestamp": _TIMESTAMP.match, "merge": re.compile(r"^(?:<<)$").match,
             "value": re.compile(r"^(?:=)$").match}


def plain_scalar(value: str) -> Any:
    """A plain (unquoted, untagged) scalar as ruamel.yaml's round-trip loader followed by `plain` gives it."""
    if not value:
        return None
    for kind in _FIRST.get(value[0], ()):
        if _MATCHERS[kind](value):
            return _CONSTRUCT[kind](value)
    return value


def _bool(value: str) -> bool:
    return value.lower() == "true"


def _int(value: str) -> int:
    digits = value.replace("_", "")
    sign = -1 if digits[0] == "-" else 1
    if digits[0] in "+-":
        digits = digits[1:]
    for prefix, base in (("0b", 2), ("0x", 16), ("0o", 8)):
        if digits.startswith(prefix):
            return sign * int(digits[2:], base)
    return sign * int(digits)


def _float(value: str) -> float:
    text = value.replace("_", "").lower()
    sign = -1 if text[0] == "-" else 1
    if text[0] in "+-":
        text = text[1:]
    if text == ".inf":
        return sign * float("inf")
    if text == ".nan":
        return float("nan")
    return sign * float(text)


def _timestamp(value: str) -> Any:
    """ruamel.yaml's create_timestamp; a timestamp-shaped scalar naming no real moment stays its text (the
    schema then refuses it at its `file:line:col`)."""
    match = _TIMESTAMP_PARTS.match(value)
    if match is None:
        raise _Fallback
    parts = match.groupdict()
    try:
        year, month, day = int(parts["year"]), int(parts["month"]), int(parts["day"])
        if parts["hour"] is None:
            return date(year, month, day)
        fraction, carry = 0, False
        if parts["fraction"]:
            digits = parts["fraction"]
            frac = int(digits[:6].ljust(6, "0"))
            if len(digits) > 6 and int(digits[6]) > 4:
                frac += 1
            fraction, carry = (0, True) if frac > 999_999 else (frac, False)
        tzinfo = None
        if parts["tz_sign"]:
            delta = _dt.timedelta(hours=int(parts["tz_hour"]), minutes=int(parts["tz_minute"] or 0))
            tzinfo = _dt.timezone(-delta if parts["tz_sign"] == "-" else delta, name=parts["tz"])
        elif parts["tz"] == "Z":
            tzinfo = _dt.timezone(_dt.timedelta(hours=0), name="Z")
        moment = datetime(year, month, day, int(parts["hour"]), int(parts["minute"]), int(parts["second"]),
                          fraction, tzinfo)
        return moment + _dt.timedelta(seconds=1) if carry else moment
    except ValueError:
        return value


def _refuse(value: str) -> Any:
    raise _Fallback


_CONSTRUCT = {"bool": _bool, "float": _float, "int": _int, "null": lambda value: None, "timestamp": _timestamp,
              "merge": _refuse, "value": _refuse}


def parse_text(text: str) -> Any:
    """The tree of one YAML document, read from libyaml's event stream (never holding a node tree: a node and
    two marks per scalar would cost more memory than the tree itself); `_Fallback` when ruamel.yaml must judge
    the file."""
    import yaml

    if not getattr(yaml, "__with_libyaml__", False):
        raise _Fallback           # a PyYAML built without libyaml: the pure-Python parser would be no faster
    if any(char in text for char in _DIFFERENT) or text.startswith("%") or "\n%" in text:
        raise _Fallback
    from yaml._yaml import CParser

    parser = CParser(text)
    try:
        return _build(parser)
    except _Fallback:
        raise
    except Exception as exc:      # a syntax error, or anything the fast path did not foresee: ruamel.yaml judges
        raise _Fallback from exc
    finally:
        parser.dispose()


_NO_KEY = object()


def _build(parser: Any) -> Any:
    """Build `Map`/`Seq`/scalars from the events of one document, refusing (`_Fallback`) what only ruamel.yaml
    judges: tags, anchors and aliases, complex or duplicate keys, merge keys, nesting beyond the bound, a second
    document."""
    from yaml.events import (
        DocumentEndEvent,
        DocumentStartEvent,
        MappingEndEvent,
        MappingStartEvent,
        ScalarEvent,
        SequenceEndEvent,
        SequenceStartEvent,
        StreamEndEvent,
        StreamStartEvent,
    )

    scalars: dict[str, Any] = {}
    # Open collections: [container, key waiting for its value (or _NO_KEY), that key's position].
    stack: list[list[Any]] = []
    root: Any = None
    documents = 0
    get_event = parser.get_event
    while True:
        event = get_event()
        kind = type(event)
        if kind is ScalarEvent:
            if event.anchor is not None or event.tag is not None:
                raise _Fallback
            value: Any = event.value
            if not event.style:                    # plain (libyaml gives "" for plain): resolve by the schema
                try:
                    value = scalars[value]
                except KeyError:
                    value = scalars[value] = plain_scalar(value)
            container = None
        elif kind is MappingStartEvent or kind is SequenceStartEvent:
            if event.anchor is not None or event.tag is not None or len(stack) >= bounds.MAX_DEPTH:
                raise _Fallback
            mark = event.start_mark
            container = value = (Map if kind is MappingStartEvent else Seq)(mark.line, mark.column)
        elif kind is MappingEndEvent or kind is SequenceEndEvent:
            stack.pop()
            continue
        elif kind is DocumentStartEvent:
            documents += 1
            if documents > 1:
                raise _Fallback                    # several documents: ruamel.yaml says so
            continue
        elif kind is StreamEndEvent:
            return root
        elif kind is StreamStartEvent or kind is DocumentEndEvent:
            continue
        else:                                      # an alias
            raise _Fallback
        mark = event.start_mark
        if not stack:
            root = value
        else:
            top = stack[-1]
            parent = top[0]
            if type(parent) is Seq:
                parent.append(value)
                parent.places.append((mark.line, mark.column))
            elif top[1] is _NO_KEY:
                if container is not None or value in parent or (type(value) is str and value.startswith("<")):
                    raise _Fallback                # a complex, duplicate or merge-like key
                top[1], top[2] = value, (mark.line, mark.column)
            else:
                key = top[1]
                parent[key] = value
                parent.places[key] = (top[2], (mark.line, mark.column))
                top[1] = _NO_KEY
        if container is not None:
            stack.append([container, _NO_KEY, None])


# -------------------------------------------------------------------------------------- the reference path

class _Refused(Exception):
    def __init__(self, diagnostic: Diagnostic):
        self.diagnostic = diagnostic


def _read_with_ruamel(text: str, shown: str) -> tuple[Any, Diagnostic | None]:
    """ruamel.yaml's round-trip reading of a file, as the tree the fast path builds, or its diagnostic."""
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        return _from_ruamel(_load(text, shown)), None
    except _Refused as exc:
        return None, exc.diagnostic
    except MarkedYAMLError as exc:
        return None, _syntax_diagnostic(shown, exc, text)
    except YAMLError as exc:
        return None, Diagnostic(Location(shown, 1, 1), f"invalid YAML: {exc}")


def _load(text: str, shown: str) -> Any:
    """Parse with the node tree checked against `bounds` after composing and before constructing."""
    from ruamel.yaml import YAML
    from ruamel.yaml.composer import Composer
    from ruamel.yaml.constructor import RoundTripConstructor

    class Constructor(RoundTripConstructor):
        """ruamel's round-trip constructor, except that a timestamp-shaped scalar naming no real moment
        (month 13, 30 February, hour 25) stays its text: the schema then refuses it at its `file:line:col`,
        where ruamel would raise a bare ValueError."""

        def construct_yaml_timestamp(self, node: Any, values: Any = None) -> Any:
            try:
                return super().construct_yaml_timestamp(node, values)
            except ValueError:
                return str(node.value)

    Constructor.add_constructor("tag:yaml.org,2002:timestamp", Constructor.construct_yaml_timestamp)

    class CheckedComposer(Composer):
        def get_single_node(self) -> Any:
            try:
                node = super().get_single_node()
            except RecursionError:
                raise _Refused(bounds.check_events(YAML(typ="rt").parse(text), shown)) from None
            refused = bounds.check_tree(node, shown)
            if refused:
                raise _Refused(refused)
            return node

    yaml = YAML(typ="rt")
    yaml.Constructor = Constructor
    yaml.Composer = CheckedComposer
    return yaml.load(text)


def _from_ruamel(node: Any) -> Any:
    """ruamel's round-trip tree as `Map`/`Seq` with the same positions; keys and scalars are kept as ruamel
    made them (`plain` converts them, as it always did)."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(node, CommentedMap):
        line, col = _own_position(node)
        mapping = Map(line, col)
        for key, value in node.items():
            mapping[key] = _from_ruamel(value)
            mapping.places[key] = (_lc(node, "key", key), _lc(node, "value", key))
        return mapping
    if isinstance(node, CommentedSeq):
        line, col = _own_position(node)
        sequence = Seq(line, col)
        for index, value in enumerate(node):
            sequence.append(_from_ruamel(value))
            sequence.places.append(_lc(node, "item", index))
        return sequence
    return node


def _lc(node: Any, what: str, key: Any) -> Position | None:
    try:
        line, col = getattr(node.lc, what)(key)
    except (KeyError, IndexError, AttributeError, TypeError):
        return None
    return line, col


def _own_position(node: Any) -> Position:
    lc = getattr(node, "lc", None)
    if lc is not None and lc.line is not None:
        return lc.line, lc.col
    return 0, 0


# In a flow collection (`{api_key: ${KEY}}`) `{` and `}` end a plain scalar, so an unquoted reference is not YAML;
# the parser stops at the `{` after the `$`. Say so, at the `$`, with the quoted form.
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _syntax_diagnostic(path: str, exc: Any, text: str) -> Diagnostic:
    mark = exc.problem_mark or exc.context_mark
    location = Location(path, mark.line + 1, mark.column + 1) if mark else Location(path, 1, 1)
    if exc.problem_mark is not None:
        offset = exc.problem_mark.index
        reference = _ENV_REFERENCE.match(text, offset - 1) if offset > 0 else None
        if reference:
            quoted = f'"{reference.group(0)}"'
            return Diagnostic(Location(path, mark.line + 1, mark.column),
                              f"an unquoted {reference.group(0)} is not YAML inside {{ }} or [ ] "
                              f"(the {{ ends the value): quote it, {quoted}")
    problem = (exc.problem or "").strip()
    context = (exc.context or "").strip()
    if "duplicate key" in problem:
        # ruamel's text quotes both values, which may be secrets, and suggests a Python API: name the key only.
        key = re.match(r'found duplicate key "(.*?)" with value', problem)
        shown = f"key '{key.group(1)}'" if key else "a key"
        return Diagnostic(location, f"{shown} appears twice in the same mapping")
    reason = problem or context or "cannot parse"
    if context and problem and context not in problem:
        reason = f"{problem} ({context})"
    return Diagnostic(location, f"invalid YAML: {reason}")


# --------------------------------------------------------------------------------------------- positions

def locate(path: str, root: Any, keys: Sequence[Any], *, at_key: bool = False) -> Location:
    """The position of `root[keys[0]][keys[1]]...`, or of the deepest part of that path that exists.

    A scalar value points at the value itself (`phone: +47 900` → the `+`); a mapping or a list points at the
    key that holds it, which reads better than the first line of a block; `at_key` forces the key (unknown keys).
    A path that runs out (a missing field) stops at its parent, as the style guide asks.
    """
    position: Position = (root.line, root.col) if isinstance(root, (Map, Seq)) else (0, 0)
    node = root
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, Map) and _has_key(node, key):
            child = node[key]
            key_place, value_place = node.places.get(key, (None, None))
            # An empty value has no position of its own (the parser gives the next token's): use its key.
            wants_key = (at_key and last) or child is None or isinstance(child, (Map, Seq))
            found = key_place if wants_key else value_place
            if found is None:
                found = key_place
            if found is None:
                break
            position, node = found, child
        elif isinstance(node, Seq) and isinstance(key, int) and 0 <= key < len(node):
            item_place = node.places[key] if key < len(node.places) else None
            if item_place is None:
                break
            position, node = item_place, node[key]
        else:
            break
    line, col = position
    return Location(path, line + 1, col + 1)


def _has_key(mapping: Map, key: Any) -> bool:
    try:
        return key in mapping
    except TypeError:  # an unhashable key from a malformed path
        return False


def line_of(path: str, root: Any, keys: Sequence[Any]) -> str:
    """`path:line` for a Resource's `source`."""
    location = locate(path, root, keys, at_key=True)
    return f"{location.path}:{location.line}"


def plain(node: Any) -> Any:
    """A tree as plain dicts, lists, str, int, float, bool and datetimes, for validation.

    ruamel's scalar subclasses (hex ints, quoted strings, timestamps carrying their source text) would otherwise
    leak into models and compare or serialise oddly.
    """
    kind = type(node)
    if kind is str or node is None:
        return node
    if isinstance(node, dict):
        return {plain(k): plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [plain(v) for v in node]
    if isinstance(node, bool):
        return bool(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    if isinstance(node, datetime):
        return datetime(node.year, node.month, node.day, node.hour, node.minute, node.second, node.microsecond,
                        tzinfo=node.tzinfo)
    if isinstance(node, date):
        return date(node.year, node.month, node.day)
    return node
