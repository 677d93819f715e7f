"""Read policy YAML files with positions, and find the `file:line:col` of any node in them.

`load_policy` calls `read_documents` on a directory (every `*.yaml`/`*.yml` below it, recursively, in sorted
order) or on a single file. Files are parsed with ruamel.yaml in round-trip mode so that every mapping key and
value and every list item keeps its line and column; `locate` walks a path of keys and indices down that tree
and returns the `Location` of the deepest node it reaches, which is how schema and check errors get their
`file:line:col`. `plain` turns the ruamel tree into ordinary Python values for pydantic.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.composer import Composer
from ruamel.yaml.constructor import RoundTripConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError

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
            root = _load(text, shown)
        except _Refused as exc:
            diagnostics.append(exc.diagnostic)
            continue
        except MarkedYAMLError as exc:
            diagnostics.append(_syntax_diagnostic(shown, exc, text))
            continue
        except YAMLError as exc:
            diagnostics.append(Diagnostic(Location(shown, 1, 1), f"invalid YAML: {exc}"))
            continue
        documents.append(Document(shown, root))
    return documents, diagnostics


class _Constructor(RoundTripConstructor):
    """ruamel's round-trip constructor, except that a timestamp-shaped scalar naming no real moment
    (month 13, 30 February, hour 25) stays its text: the schema then refuses it at its `file:line:col`,
    where ruamel would raise a bare ValueError."""

    def construct_yaml_timestamp(self, node: Any, values: Any = None) -> Any:
        try:
            return super().construct_yaml_timestamp(node, values)
        except ValueError:
            return str(node.value)


_Constructor.add_constructor("tag:yaml.org,2002:timestamp", _Constructor.construct_yaml_timestamp)


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.Constructor = _Constructor
    return yaml


class _Refused(Exception):
    def __init__(self, diagnostic: Diagnostic):
        self.diagnostic = diagnostic


def _load(text: str, shown: str) -> Any:
    """Parse with the node tree checked against `bounds` after composing and before constructing."""
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

    yaml = _yaml()
    yaml.Composer = CheckedComposer
    return yaml.load(text)


# In a flow collection (`{api_key: ${KEY}}`) `{` and `}` end a plain scalar, so an unquoted reference is not YAML;
# the parser stops at the `{` after the `$`. Say so, at the `$`, with the quoted form.
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _syntax_diagnostic(path: str, exc: MarkedYAMLError, text: str) -> Diagnostic:
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


def _key_position(mapping: CommentedMap, key: Any) -> tuple[int, int] | None:
    try:
        line, col = mapping.lc.key(key)
    except (KeyError, AttributeError, TypeError):
        return None
    return line, col


def _value_position(mapping: CommentedMap, key: Any) -> tuple[int, int] | None:
    try:
        line, col = mapping.lc.value(key)
    except (KeyError, AttributeError, TypeError):
        return None
    return line, col


def _item_position(seq: CommentedSeq, index: int) -> tuple[int, int] | None:
    try:
        line, col = seq.lc.item(index)
    except (KeyError, IndexError, AttributeError, TypeError):
        return None
    return line, col


def _own_position(node: Any) -> tuple[int, int]:
    lc = getattr(node, "lc", None)
    if lc is not None and lc.line is not None:
        return lc.line, lc.col
    return 0, 0


def locate(path: str, root: Any, keys: Sequence[Any], *, at_key: bool = False) -> Location:
    """The position of `root[keys[0]][keys[1]]...`, or of the deepest part of that path that exists.

    A scalar value points at the value itself (`phone: +47 900` → the `+`); a mapping or a list points at the
    key that holds it, which reads better than the first line of a block; `at_key` forces the key (unknown keys).
    A path that runs out (a missing field) stops at its parent, as the style guide asks.
    """
    position = _own_position(root)
    node = root
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, CommentedMap) and _has_key(node, key):
            child = node[key]
            # An empty value has no position of its own (ruamel gives the next token's): use its key.
            wants_key = (at_key and last) or child is None or isinstance(child, (CommentedMap, CommentedSeq))
            found = _key_position(node, key) if wants_key else _value_position(node, key)
            if found is None:
                found = _key_position(node, key)
            if found is None:
                break
            position, node = found, child
        elif isinstance(node, CommentedSeq) and isinstance(key, int) and 0 <= key < len(node):
            found = _item_position(node, key)
            if found is None:
                break
            position, node = found, node[key]
        else:
            break
    line, col = position
    return Location(path, line + 1, col + 1)


def _has_key(mapping: CommentedMap, key: Any) -> bool:
    try:
        return key in mapping
    except TypeError:  # an unhashable key from a malformed path
        return False


def line_of(path: str, root: Any, keys: Sequence[Any]) -> str:
    """`path:line` for a Resource's `source`."""
    location = locate(path, root, keys, at_key=True)
    return f"{location.path}:{location.line}"


def plain(node: Any) -> Any:
    """The ruamel tree as plain dicts, lists, str, int, float, bool and datetimes, for validation.

    ruamel's scalar subclasses (hex ints, quoted strings, timestamps carrying their source text) would otherwise
    leak into models and compare or serialise oddly.
    """
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
