"""Render a plan as text or JSON. Templates format `plan.to_dict()` only; nothing is computed twice.

Called by the CLI for `plan` and `apply` output.
"""

from __future__ import annotations

import json
from typing import Any

import jinja2

from reconciler.plan import Plan

SYMBOLS = {"create": "+", "update": "~", "delete": "-", "replace": "-/+"}
VERBS = {"create": "created", "update": "updated in place", "delete": "deleted", "replace": "replaced"}

_env = jinja2.Environment(loader=jinja2.PackageLoader("reconciler", "templates"),
                          undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                          trim_blocks=True, lstrip_blocks=True)


def _value(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _attribute_lines(change: dict[str, Any]) -> list[str]:
    """The attribute lines under a change: all of them for a create or delete, what differs otherwise."""
    before, after = change["before"] or {}, change["after"] or {}
    if change["action"] == "create":
        return [f"{k}: {_value(v)}" for k, v in sorted(after.items())]
    if change["action"] == "delete":
        return [f"{k}: {_value(v)}" for k, v in sorted(before.items())]
    keys = change.get("changed") or sorted(k for k in after if before.get(k) != after.get(k))
    return [f"{k}: {_value(before.get(k))} -> {_value(after.get(k))}" for k in keys]


_env.filters["value"] = _value
# Why a delete has no policy source: what its absence from the policy means for that kind.
UNDECLARED = {"user": "removed from policy (offboarding: the user and all their access go)",
              "permission": "not declared in policy (unmanaged: revoke)",
              "key": "not declared in policy (unmanaged: revoke)",
              "share": "not declared in policy (unmanaged: revoke)",
              "temp_key": "not declared in policy (unmanaged: revoke)",
              "association": "not declared on its gateway"}
_env.globals.update(symbols=SYMBOLS, verbs=VERBS, attribute_lines=_attribute_lines, undeclared=UNDECLARED)
_env.filters["md"] = lambda text: str(text).replace("|", "\\|").replace("<", "&lt;")


def render_text(plan: Plan) -> str:
    data = plan.to_dict()
    effects = {"grant": 0, "revoke": 0}
    for change in data["changes"]:
        if change["effect"] in effects:
            effects[change["effect"]] += 1
    return _env.get_template("plan.txt.j2").render(plan=data, effects=effects)


# -- markdown (pull-request comments) --------------------------------------------------------------------

COMMENT_LIMIT = 65_000
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_CAPS = (None, 2000, 500, 150, 50, 15, 5)


def _when(text: str | None) -> str:
    return text.replace("T", " ")[:16] + " UTC" if text else ""


def _days(schedule: list[dict[str, str]]) -> str:
    """`[{day: mon, from: 08:00, to: 18:00}, …]` → `Mon–Fri 08:00–18:00`."""
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
    return "; ".join(parts)


def _window(attrs: dict[str, Any]) -> str:
    words = []
    if attrs.get("start"):
        words.append(f"from {_when(attrs['start'])}")
    if "end" in attrs:
        words.append(f"until {_when(attrs['end'])}" if attrs["end"] else "with no end")
    if attrs.get("schedule"):
        words.append(_days(attrs["schedule"]))
    if attrs.get("role") and attrs["role"] != "USER":
        words.append(f"as {attrs['role']}")
    return ", ".join(words)


def _person(name: str) -> str:
    return f"an account not in the policy ({name[3:]})" if name.startswith("id:") else f"**{name}**"


def _via(change: dict[str, Any]) -> str:
    groups = [v.split(":", 1)[1] for v in change.get("via", []) if v.startswith("group:")]
    if not groups:
        return ""
    return " through group" + ("s " if len(groups) > 1 else " ") + ", ".join(f"`{g}`" for g in groups)


def access_sentence(change: dict[str, Any]) -> str | None:
    """A grant-level change in plain words: who gains or loses access to which door, when, and why."""
    kind, action = change["kind"], change["action"]
    name = change["address"].split("/", 2)[2]
    system = change["system"]
    source = f" — `{change['source']}`" if change.get("source") else ""
    if kind == "user" and action == "delete":
        return f"{_person(name)} is removed from `{system}`: all their access there ends (offboarding)"
    if kind == "temp_key":
        attrs = change["after"] or change["before"] or {}
        who = "anyone with the link" if attrs.get("access") == "public" else \
            ", ".join(attrs.get("users") or []) or "nobody yet"
        uses = f", at most {attrs['max_uses']} uses" if attrs.get("max_uses") else ""
        verb = {"create": "is issued", "update": "changes", "delete": "is withdrawn", "replace": "is re-issued"}[action]
        return f"temporary key **{name}** on `{system}` {verb}: {who}, {_window(attrs)}{uses}{source}"
    if kind not in ("permission", "key", "share"):
        return None
    user, device, *operation = name.split("/")
    what = f"{operation[0]} on **{device}**" if operation and operation[0] != "OPEN" else f"access to **{device}**"
    where = f" (`{system}`)"
    via = f",{_via(change)}" if _via(change) else ""
    if action == "create":
        return f"{_person(user)} gains {what}{where}, {_window(change['after'])}{via}{source}"
    if action == "delete":
        why = " — granted outside git, not in the policy" if change.get("origin") == "drift" else \
            " — no longer in the policy"
        return f"{_person(user)} loses {what}{where}{why}"
    before, after = change["before"] or {}, change["after"] or {}
    keys = change.get("changed") or sorted(k for k in after if before.get(k) != after.get(k))
    detail = "; ".join(f"{k} {_plain(before.get(k))} → {_plain(after.get(k))}" for k in keys)
    verb = "is re-issued" if action == "replace" else "changes"
    return f"{_person(user)}'s {what}{where} {verb}: {detail}{via}{source}"


def _plain(value: Any) -> str:
    if isinstance(value, str) and len(value) == 20 and value.endswith("Z") and "T" in value:
        return _when(value)
    if isinstance(value, list) and value and isinstance(value[0], dict) and "day" in value[0]:
        return _days(value)
    return "none" if value is None else str(value)


def render_markdown(plan: Plan, *, limit: int = COMMENT_LIMIT, artifact: str = "plan.json") -> str:
    """A pull-request comment: totals, then access changes in words, then the rest folded; never longer
    than `limit` characters (lists are cut with counts and a pointer to the full plan)."""
    data = plan.to_dict()
    access, drift = [], []
    for change in data["changes"]:
        sentence = access_sentence(change)
        if sentence:
            (drift if change.get("origin") == "drift" else access).append(sentence)
    systems: dict[str, list[dict[str, Any]]] = {}
    for change in data["changes"]:
        systems.setdefault(change["system"], []).append(change)
    effects = {"grant": sum(c["effect"] == "grant" for c in data["changes"]),
               "revoke": sum(c["effect"] == "revoke" for c in data["changes"])}
    template = _env.get_template("plan.md.j2")
    text = ""
    for cap in _CAPS:
        text = template.render(plan=data, access=access, drift=drift, systems=systems, effects=effects, cap=cap,
                               artifact=artifact)
        if len(text) <= limit:
            return text
    return text[:limit - 200].rsplit("\n", 1)[0] + f"\n\n… cut to fit a comment; the full plan is in `{artifact}`.\n"


def render_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=2, sort_keys=False, ensure_ascii=False) + "\n"
