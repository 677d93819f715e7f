"""Render a plan as text or JSON. Templates format `plan.to_dict()` only; nothing is computed twice.

Called by the CLI for `plan` and `apply` output. Names, emails, reasons, file names and vendor text are
untrusted: the text plan shows every value on one line with control characters escaped (no value can add a
line to a CI log or start a workflow command), and the markdown comment escapes them (`md`, `code`) so that
none can open an HTML comment, a link or a table cell.
"""

from __future__ import annotations

import csv
import html
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jinja2

from reconciler.access import AccessRow, Admin
from reconciler.bulk import paused_collection
from reconciler.plan import Plan, access_of, person_door
from reconciler.resources import Kind, kind_def
from reconciler.text import printable

SYMBOLS = {"create": "+", "update": "~", "delete": "-", "replace": "-/+"}
VERBS = {"create": "created", "update": "updated in place", "delete": "deleted", "replace": "replaced"}

_env = jinja2.Environment(loader=jinja2.PackageLoader("reconciler", "templates"),
                          undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                          trim_blocks=True, lstrip_blocks=True)


# One encoder for every attribute value of a text plan (json.dumps with options builds a new one per call).
_VALUE = json.JSONEncoder(sort_keys=True, ensure_ascii=False)


def _value(value: Any) -> str:
    return _VALUE.encode(value)


def _attribute_lines(change: dict[str, Any], zones: dict[str, str] | None = None) -> list[str]:
    """The attribute lines under a change: all of them for a create or delete, what differs otherwise. A weekly
    schedule is also given in words, in the system's time zone, named (`zones`; a system not in it: UTC)."""
    before, after = change["before"] or {}, change["after"] or {}
    zone = (zones or {}).get(change["system"], UTC_ZONE)
    if change["action"] == "create":
        return [f"{k}: {_value(v)}{_spans(v, zone)}" for k, v in sorted(after.items())]
    if change["action"] == "delete":
        return [f"{k}: {_value(v)}{_spans(v, zone)}" for k, v in sorted(before.items())]
    keys = change.get("changed") or sorted(k for k in after if before.get(k) != after.get(k))
    return [f"{k}: {_value(before.get(k))} -> {_after_value(k, after)}"
            + (f"  ({_plain(before.get(k), zone)} -> {_plain(after.get(k), zone)})" if _is_schedule(after.get(k))
               or _is_schedule(before.get(k)) else "") for k in keys]


def _spans(value: Any, zone: str) -> str:
    return f"  ({_days(value, zone)})" if _is_schedule(value) else ""


def _is_schedule(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "day" in value[0]


def _after_value(key: str, after: dict[str, Any]) -> str:
    # A grant without `start:` opens from now: apply sends the time it runs.
    return "now" if key == "start" and after.get("start") is None else _value(after.get(key))


_env.filters["value"] = _value
# Why a delete has no policy source: what its absence from the policy means for that kind.
def undeclared(kind: str) -> str:
    """Why a delete has no policy source: what its absence from the policy means for that kind (read from the
    kind's declaration: an account holder is offboarded, a grant is revoked as unmanaged)."""
    declared = kind_def(kind)
    if declared.holder:
        return f"removed from policy (offboarding: the {kind} and all their access go)"
    if declared.grant:
        return "not declared in policy (unmanaged: revoke)"
    if declared.owners and declared.owners[0] == Kind.GATEWAY:
        return f"not declared on its {Kind.GATEWAY}"
    return "not declared in policy"


_env.globals.update(symbols=SYMBOLS, verbs=VERBS, attribute_lines=_attribute_lines, undeclared=undeclared)
_MARKDOWN = re.compile(r"([\\`*_\[\]|~#!])")


def md(text: Any) -> str:
    """Untrusted text as markdown prose: shown as written, on one line, with no HTML and no markup."""
    return _MARKDOWN.sub(r"\\\1", html.escape(printable(str(text)), quote=False))


def code(text: Any) -> str:
    """Untrusted text inside a `code span`, where backslashes and entities are literal: it cannot end the span
    or a table cell, and `<` (which would still open an HTML comment or tag there) shows as `&lt;`."""
    return printable(str(text)).replace("`", "'").replace("|", "\\|").replace("<", "&lt;")


_env.filters.update(md=md, code=code)
# The text plan goes to terminals and CI logs: every value printed on one line, control characters escaped.
_text_env = _env.overlay(finalize=lambda value: printable(str(value)))


def _effect_label(change: dict[str, Any]) -> str:
    """`grant`, `revoke`, `grant + revoke` (a change doing both), with `, privilege` for ADMIN power."""
    words = " + ".join(change.get("access") or ([change["effect"]] if change["effect"] != "none" else []))
    if change.get("privilege"):
        words = f"{words}, privilege" if words else "privilege"
    return words


_env.globals.update(effect_label=_effect_label)


@paused_collection
def render_text(plan: Plan) -> str:
    data = plan.to_dict()
    return _text_env.get_template("plan.txt.j2").render(plan=data, effects=data["effects"])


WRITE_BATCH = 1 << 16      # characters handed to `write` at a time by the streaming renderers


@paused_collection
def write_text(plan: Plan, write: Callable[[str], object]) -> None:
    """`render_text(plan)`, handed to `write` in batches of whole lines: a plan of 100,000 changes is never one
    string (nor the template's list of pieces that makes it)."""
    data = plan.to_dict()
    _batched(_text_env.get_template("plan.txt.j2").generate(plan=data, effects=data["effects"]), write)


@paused_collection
def write_json(plan: Plan, write: Callable[[str], object]) -> None:
    """`render_json(plan)`, the same characters, handed to `write` in batches of whole lines."""
    _batched(_json_chunks(plan.to_dict()), write)


def _batched(chunks: Iterable[str], write: Callable[[str], object]) -> None:
    pending: list[str] = []
    size = 0
    for chunk in chunks:
        pending.append(chunk)
        size += len(chunk)
        if size >= WRITE_BATCH:
            text = "".join(pending)
            cut = text.rfind("\n") + 1
            if cut:
                write(text[:cut])
                text = text[cut:]
            pending, size = [text], len(text)
    if size:
        write("".join(pending))


# -- markdown (pull-request comments) --------------------------------------------------------------------

COMMENT_LIMIT = 65_000
UTC_ZONE = "UTC"         # a system without `timezone:`; plans made before zones were recorded read as UTC
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_CAPS = (None, 2000, 500, 150, 50, 15, 5)


def _when(text: str | None) -> str:
    return text.replace("T", " ")[:16] + " UTC" if text else ""


def _days(schedule: list[dict[str, str]], zone: str | None = None) -> str:
    """`[{day: mon, from: 08:00, to: 18:00}, …]` → `Mon–Fri 08:00–18:00 Europe/Oslo`: local times of the site,
    its zone named once at the end (plans); without `zone`, unnamed (access tables name it in their heading)."""
    by_times: dict[tuple[str, str], list[str]] = {}
    for span in schedule:
        by_times.setdefault((span["from"], span["to"]), []).append(span["day"])
    parts = []
    for (start, end), days in by_times.items():
        indexes = sorted(DAYS.index(d) for d in days)
        runs, run = [], [indexes[0]]
        for i in indexes[1:]:
            if i == run[-1] + 1:
                run.append(i)
            else:
                runs.append(run)
                run = [i]
        runs.append(run)
        names = ", ".join(DAYS[r[0]].title() if len(r) == 1 else f"{DAYS[r[0]].title()}–{DAYS[r[-1]].title()}"
                          for r in runs)
        parts.append(f"{names} {start}–{end}")
    return "; ".join(parts) + (f" {zone}" if zone else "")


def _window(attrs: dict[str, Any], zone: str = UTC_ZONE) -> str:
    words = []
    if attrs.get("start"):
        words.append(f"from {_when(attrs['start'])}")
    if "end" in attrs:
        words.append(f"until {_when(attrs['end'])}" if attrs["end"] else "with no end")
    if attrs.get("schedule"):
        words.append(_days(attrs["schedule"], zone))
    if attrs.get("role") and attrs["role"] != "USER":
        words.append(f"as {attrs['role']}")
    return ", ".join(words)


def _person(name: str) -> str:
    return f"an account not in the policy ({md(name[3:])})" if name.startswith("id:") else f"**{md(name)}**"


def _via(change: dict[str, Any]) -> str:
    groups = [v.split(":", 1)[1] for v in (change.get("via") or []) if v.startswith("group:")]
    if not groups:
        return ""
    return " through group" + ("s " if len(groups) > 1 else " ") + ", ".join(f"`{code(g)}`" for g in groups)


def access_sentence(change: dict[str, Any], zones: dict[str, str] | None = None) -> str | None:
    """A grant-level change in plain words: who gains or loses access to which door, when (weekly windows in the
    system's time zone, `zones`, named), and why."""
    kind, action = change["kind"], change["action"]
    zone = (zones or {}).get(change["system"], UTC_ZONE)
    name = change["address"].split("/", 2)[2]
    system = code(change["system"])
    source = f" — `{code(change['source'])}`" if change.get("source") else ""
    holder = kind_def(kind).holder
    if holder and action == "delete":
        return f"{_person(name)} is removed from `{system}`: all their access there ends (offboarding)"
    if holder and change.get("privilege"):
        field = next(iter(access_of(kind).privilege), ("role", frozenset()))[0]    # the field that grants power
        before, after = (change["before"] or {}).get(field), (change["after"] or {}).get(field)
        if action == "create":
            return (f"{_person(name)} gets an {md(after)} account on `{system}`: can grant itself access to any "
                    f"door{source}")
        return f"{_person(name)}'s {md(field)} on `{system}` changes: {md(before)} → {md(after)}{source}"
    if kind == "temp_key":
        attrs = change["after"] or change["before"] or {}
        who = "anyone with the link" if attrs.get("access") == "public" else \
            md(", ".join(attrs.get("users") or [])) or "nobody yet"
        uses = f", at most {md(attrs['max_uses'])} uses" if attrs.get("max_uses") else ""
        verb = {"create": "is issued", "update": "changes", "delete": "is withdrawn", "replace": "is re-issued"}[action]
        return f"temporary key **{md(name)}** on `{system}` {verb}: {who}, {md(_window(attrs, zone))}{uses}{source}"
    if not person_door(kind):
        return None
    user, device, *operation = name.split("/")
    what = f"{md(operation[0])} on **{md(device)}**" if operation and operation[0] != "OPEN" else \
        f"access to **{md(device)}**"
    where = f" (`{system}`)"
    via = f",{_via(change)}" if _via(change) else ""
    if action == "create":
        return f"{_person(user)} gains {what}{where}, {md(_window(change['after'], zone))}{via}{source}"
    if action == "delete":
        why = {"drift": " — granted outside git, not in the policy",
               "unmanaged": " — not in the policy",
               "not in effect": " — an earlier revocation was acknowledged but did not take effect"}.get(change.get("origin") or "", " — no longer in the policy")
        return f"{_person(user)} loses {what}{where}{why}"
    before, after = change["before"] or {}, change["after"] or {}
    keys = change.get("changed") or sorted(k for k in after if before.get(k) != after.get(k))
    detail = "; ".join(f"{md(k)} {md(_plain(before.get(k), zone))} → "
                       f"{'now' if k == 'start' and after.get(k) is None else md(_plain(after.get(k), zone))}"
                       for k in keys)
    verb = "is re-issued" if action == "replace" else "changes"
    return f"{_person(user)}'s {what}{where} {verb}: {detail}{via}{source}"


def _plain(value: Any, zone: str = UTC_ZONE) -> str:
    if isinstance(value, str) and len(value) == 20 and value.endswith("Z") and "T" in value:
        return _when(value)
    if _is_schedule(value):
        return _days(value, zone)
    return "none" if value is None else str(value)


def _group_line(change: dict[str, Any], zones: dict[str, str]) -> tuple[Any, ...] | None:
    """What a grant change shares with others of its group: the key of one summary line, or None when the
    change is told on its own (privilege, updates, direct grants, several groups)."""
    if not person_door(change["kind"]) or change["action"] != "create" or change.get("privilege"):
        return None
    groups = [v.split(":", 1)[1] for v in (change.get("via") or []) if v.startswith("group:")]
    if len(groups) != 1 or "user" in (change.get("via") or []):
        return None
    _user, _device, *operation = change["address"].split("/", 2)[2].split("/")
    window = _window(change["after"], zones.get(change["system"], UTC_ZONE))
    return (change["action"], groups[0], change["system"], tuple(operation), window, change.get("source") or "",
            change.get("origin") or "")


def _access_lines(changes: list[dict[str, Any]], zones: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """Access changes in words, privilege first and one by one; grants that a group shares on one set of
    doors in one line ("group `ops` (40 people) gains …") with the people folded beneath; otherwise in the
    plan's order. Returns (access, drift)."""
    privilege: list[str] = []
    lines: list[tuple[int, bool, str]] = []    # (position, is drift, line)
    grouped: dict[tuple[Any, ...], dict[str, list[tuple[int, str, str]]]] = {}   # key → user → grants
    for position, change in enumerate(changes):
        sentence = access_sentence(change, zones)
        if not sentence:
            continue
        if change.get("privilege"):
            privilege.append(f"**privilege**: {sentence}")
            continue
        key = _group_line(change, zones or {})
        if key is None:
            lines.append((position, change.get("origin") == "drift", sentence))
            continue
        user, device = change["address"].split("/", 2)[2].split("/")[:2]
        grouped.setdefault(key, {}).setdefault(user, []).append((position, device, sentence))
    for key, people in grouped.items():
        _action, group, system, operation, window, source, origin = key
        by_doors: dict[tuple[str, ...], list[str]] = {}
        for user, grants in sorted(people.items()):
            by_doors.setdefault(tuple(sorted(d for _, d, _ in grants)), []).append(user)
        for doors, users in by_doors.items():
            if len(users) == 1:
                lines += [(p, origin == "drift", sentence) for p, _, sentence in people[users[0]]]
                continue
            first = min(p for user in users for p, _, _ in people[user])
            what = f"{operation[0]} on " if operation and operation[0] != "OPEN" else "access to "
            names = ", ".join(f"**{d}**" for d in doors)
            folded = f" <details><summary>{len(users)} people</summary>{', '.join(users)}</details>"
            lines.append((first, origin == "drift", f"group `{group}` ({len(users)} people) gains {what}{names} "
                          f"(`{system}`), {window}{f' — `{source}`' if source else ''}{folded}"))
    lines.sort(key=lambda item: item[0])
    return privilege + [line for _, drift, line in lines if not drift], [line for _, drift, line in lines if drift]


@paused_collection
def render_markdown(plan: Plan, *, limit: int = COMMENT_LIMIT, artifact: str = "plan.json") -> str:
    """A pull-request comment: totals, the mass-revoke guard, then access changes in words, then the rest
    folded; never longer than `limit` characters (lists are cut with counts and a pointer to the full plan)."""
    data = plan.to_dict()
    access, drift = _access_lines(data["changes"], data.get("zones"))
    systems: dict[str, list[dict[str, Any]]] = {}
    for change in data["changes"]:
        systems.setdefault(change["system"], []).append(change)
    template = _env.get_template("plan.md.j2")
    text = ""
    for cap in _CAPS:
        text = template.render(plan=data, access=access, drift=drift, systems=systems, effects=data["effects"],
                               cap=cap, artifact=artifact)
        if len(text) <= limit:
            return text
    return text[:limit - 200].rsplit("\n", 1)[0] + f"\n\n… cut to fit a comment; the full plan is in `{artifact}`.\n"


# -- effective access (`reconciler access`) ------------------------------------------------------------------

ACCESS_COLUMNS = ("user", "system", "device", "operations", "role", "start", "end", "schedule", "via", "source",
                  "live_only", "status")


def _access_cells(row: AccessRow) -> dict[str, str]:
    data = row.to_dict()
    cells = {"user": row.user, "system": row.system, "device": row.device,
             "operations": " ".join(row.operations), "role": row.role or "",
             "start": row.start or "", "end": row.end or "",
             "schedule": _days(data["schedule"]) if data["schedule"] else "",
             "via": row.via, "source": row.source or "",
             "live_only": "yes" if row.live_only else "", "status": "" if row.status == "present" else row.status}
    return {k: printable(str(v)) for k, v in cells.items()}     # vendor text: one escape for every format


def _admin_lines(admins: list[Admin]) -> list[str]:
    return [printable(f"{a.user} is an ADMIN of {a.system}: can grant itself access to any door there"
                      f"{' (not in the policy)' if a.live_only else f' ({a.source})' if a.source else ''}")
            for a in admins]


def render_access(rows: list[AccessRow], admins: list[Admin], fmt: str, *, heading: str = "") -> str:
    """`text` (aligned columns), `markdown` (a table), `csv` (for a spreadsheet: every column, one row per
    grant) or `json` (a list of objects: user, device, system, start, end, via, source, ...)."""
    if fmt == "json":
        return json.dumps([row.to_dict() for row in rows], indent=2, ensure_ascii=False) + "\n"
    cells = [_access_cells(row) for row in rows]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=ACCESS_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for cell in cells:
            # A cell starting with = + - @ is a formula to a spreadsheet: names from policy files stay text.
            writer.writerow({k: f"'{v}" if v[:1] in ("=", "+", "-", "@") else v for k, v in cell.items()})
        return out.getvalue()
    columns = [c for c in ACCESS_COLUMNS if any(cell[c] for cell in cells) or c in ("user", "system", "device")]
    notes = _admin_lines(admins)
    if fmt == "markdown":
        lines = [f"### {heading}" if heading else "### reconciler access", ""]
        if cells:
            lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_md(cell[c]) for c in columns) + " |" for cell in cells]
        else:
            lines.append("Nobody.")
        lines += [""] + [f"- {_md(note)}" for note in notes] if notes else []
        return "\n".join(lines) + "\n"
    if not cells:
        lines = [f"{heading}: nobody." if heading else "Nobody."]
    else:
        widths = {c: max(len(c), *(len(cell[c]) for cell in cells)) for c in columns}
        lines = [f"{heading}:", ""] if heading else []
        lines.append("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
        lines += ["  ".join(cell[c].ljust(widths[c]) for c in columns).rstrip() for cell in cells]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("<", "&lt;")


@paused_collection
def render_json(plan: Plan) -> str:
    return "".join(_json_chunks(plan.to_dict()))


def _json_chunks(data: dict[str, Any]) -> Iterator[str]:
    """`json.dumps(data, indent=2, ensure_ascii=False) + "\\n"`, in pieces: one per top-level entry, and one per
    item of a top-level list (a plan's changes), so that it can be written without ever being one string."""
    if not data or not all(isinstance(key, str) for key in data):
        yield json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
        return
    yield "{"
    for n, (key, item) in enumerate(data.items()):
        yield ("," if n else "") + "\n  " + _string(key) + ": "
        if isinstance(item, list) and item:
            yield "["
            for i, element in enumerate(item):
                yield ("," if i else "") + "\n    " + _piece(element, 2)
            yield "\n  ]"
        else:
            yield _piece(item, 1)
    yield "\n}\n"


def _piece(value: Any, level: int) -> str:
    """One value of the document at nesting `level`, as `json.dumps(indent=2)` writes it there."""
    try:
        return _indented(value, level)
    except _NotPlain:
        # json.dumps escapes every newline inside strings, so each raw newline starts a line to indent.
        return json.dumps(value, indent=2, sort_keys=False, ensure_ascii=False).replace("\n", "\n" + "  " * level)


class _NotPlain(Exception):
    pass


_string = json.encoder.encode_basestring     # the C function json.dumps(ensure_ascii=False) uses for strings


def _indented(value: Any, level: int) -> str:
    """Exactly `json.dumps(value, indent=2, ensure_ascii=False)`, in a fraction of the time: the standard library
    encodes with its pure-Python encoder as soon as `indent` is given, a generator step per token. Anything
    other than str keys and plain JSON values raises `_NotPlain` (the caller then uses `json.dumps`)."""
    if isinstance(value, str):
        return _string(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise _NotPlain
        return float.__repr__(value)
    if isinstance(value, (list, tuple)):
        if not value:
            return "[]"
        inner = "\n" + "  " * (level + 1)
        return "[" + inner + ("," + inner).join([_indented(v, level + 1) for v in value]) + "\n" + "  " * level + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        inner = "\n" + "  " * (level + 1)
        parts = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise _NotPlain
            parts.append(_string(key) + ": " + _indented(item, level + 1))
        return "{" + inner + ("," + inner).join(parts) + "\n" + "  " * level + "}"
    raise _NotPlain
