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
              "association": "not declared on its gateway"}
_env.globals.update(symbols=SYMBOLS, verbs=VERBS, attribute_lines=_attribute_lines, undeclared=UNDECLARED)


def render_text(plan: Plan) -> str:
    data = plan.to_dict()
    effects = {"grant": 0, "revoke": 0}
    for change in data["changes"]:
        if change["effect"] in effects:
            effects[change["effect"]] += 1
    return _env.get_template("plan.txt.j2").render(plan=data, effects=effects)


def render_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=2, sort_keys=False, ensure_ascii=False) + "\n"
