"""Bounds on untrusted policy input, checked before and right after parsing, whatever the YAML loader.

`yamlio.read_documents` calls, for every policy file:
- `check_file` before reading it: the path has no control characters (a name is printed in markdown comments
  and workflow commands), the file does not lie outside the policy directory through a symlink, and it is not
  bigger than `MAX_FILE_BYTES`;
- `check_text` on the text before parsing: no line opens more than `MAX_DEPTH` flow collections (`[[[[...`),
  which a pure-Python YAML scanner handles in quadratic time;
- `check_tree` on the composed node tree, before anything is constructed: no alias (`*name`: an alias bomb
  expands exponentially when constructed) and no nesting deeper than `MAX_DEPTH`;
- `check_events` on the event stream only when composing raised `RecursionError` (nesting far too deep for a
  recursive composer), to say where.

The node and event checks only use what PyYAML and ruamel.yaml share (`start_mark.line/column`, node `.id`,
event class names), so they survive a change of loader. Each returns one located `Diagnostic`, or None.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from reconciler.errors import Diagnostic, Location
from reconciler.text import printable

MAX_FILE_BYTES = 5 * 1024 * 1024
# A policy is at most five levels deep (schedules → name → spans → span → days); 32 leaves room for growth.
MAX_DEPTH = 32
_OPENERS = re.compile(r"[\[\]{}]")


def check_file(file: Path, shown: str, directory: Path | None) -> Diagnostic | None:
    """Before reading: a safe name, inside `directory` (None: a file named on the command line), not too big."""
    safe = printable(shown)
    if safe != shown:
        return Diagnostic(Location(safe, 1, 1), "the file name contains control characters; rename the file")
    if directory is not None:
        resolved, top = file.resolve(), directory.resolve()
        if not resolved.is_relative_to(top):
            return Diagnostic(Location(shown, 1, 1), "a symlink leading outside the policy directory is refused")
    try:
        size = os.stat(file).st_size
    except OSError:
        return None  # reading it reports the reason
    if size > MAX_FILE_BYTES:
        return Diagnostic(Location(shown, 1, 1), f"the file is {size / 1024 / 1024:.1f} MB; policy files over "
                          f"{MAX_FILE_BYTES // 1024 // 1024} MB are refused")
    return None


def check_links(directory: Path, shown: str) -> list[Diagnostic]:
    """Symlinks under `directory` that lead outside it: folders, devices, dangling links (a policy file that is
    a link is checked by `check_file`, at its own name)."""
    problems = []
    top = directory.resolve()
    for path in sorted(directory.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(directory).parts):
            continue
        if path.suffix in (".yaml", ".yml") and path.is_file():
            continue
        if path.is_symlink() and not path.resolve().is_relative_to(top):
            where = f"{shown}/{path.relative_to(directory).as_posix()}"
            problems.append(Diagnostic(Location(printable(where)),
                                       "a symlink leading outside the policy directory is refused"))
    return problems


def check_text(text: str, shown: str) -> Diagnostic | None:
    """No line opens more than MAX_DEPTH flow collections: cheap, and run before any scanner sees them."""
    if sum(text.count(c) for c in "[{") <= MAX_DEPTH:
        return None
    for number, line in enumerate(text.split("\n"), 1):
        if line.count("[") + line.count("{") <= MAX_DEPTH:
            continue
        depth = 0
        for match in _OPENERS.finditer(line):
            depth = depth + 1 if match.group() in "[{" else max(depth - 1, 0)
            if depth > MAX_DEPTH:
                return _too_deep(Location(shown, number, match.start() + 1))
    return None


def check_tree(root: Any, shown: str) -> Diagnostic | None:
    """Walk a composed node tree (without recursion): refuse aliases and nesting deeper than MAX_DEPTH."""
    if root is None:
        return None
    seen: set[int] = set()
    stack: list[tuple[Any, int, Any]] = [(root, 1, None)]   # node, depth, the key node holding it
    while stack:
        node, depth, holder = stack.pop()
        if id(node) in seen:
            # The composer hands out the anchored node again for every `*alias`: the place is the key holding the
            # alias, or (an alias in a list) the anchored node.
            mark = (holder or node).start_mark
            return Diagnostic(Location(shown, mark.line + 1, mark.column + 1),
                              "YAML aliases (*name, repeating an &name anchor) are not accepted in a policy; "
                              "write the value out")
        seen.add(id(node))
        if node.id == "scalar":
            continue
        if depth > MAX_DEPTH:
            mark = node.start_mark
            return _too_deep(Location(shown, mark.line + 1, mark.column + 1))
        if node.id == "mapping":
            for key, value in reversed(node.value):
                stack.append((value, depth + 1, key))
                stack.append((key, depth + 1, None))
        else:
            stack.extend((item, depth + 1, None) for item in reversed(node.value))
    return None


def check_events(events: Iterable[Any], shown: str) -> Diagnostic:
    """Where nesting first goes deeper than MAX_DEPTH, from a parser's event stream (after a RecursionError)."""
    depth = 0
    for event in events:
        kind = type(event).__name__
        if kind in ("MappingStartEvent", "SequenceStartEvent"):
            depth += 1
            if depth > MAX_DEPTH:
                mark = event.start_mark
                return _too_deep(Location(shown, mark.line + 1, mark.column + 1))
        elif kind in ("MappingEndEvent", "SequenceEndEvent"):
            depth -= 1
    return _too_deep(Location(shown, 1, 1))


def _too_deep(location: Location) -> Diagnostic:
    return Diagnostic(location, f"nesting deeper than {MAX_DEPTH} levels is refused")
