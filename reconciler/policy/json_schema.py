"""The JSON Schema (draft 2020-12) of one policy file, generated from the pydantic models, for editors.

`reconciler schema` prints it; yaml-language-server (VS Code's YAML extension) uses it for completion and
checks while typing, through a `# yaml-language-server: $schema=...` line or the editor's settings. It says
what one file may hold: the sections, each entry's keys and types, names, and per vendor the system settings
and credential keys it takes (from the registered vendors' capabilities and settings models). Unknown
keys are refused, as the loader refuses them. What needs the other files or the vendor's limits (references,
open-ended access where a vendor needs an end, ...) stays with `reconciler validate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from reconciler import vendors
from reconciler.resources import Capabilities, Kind

from .checks import ENV_REFERENCE, declared_keys
from .proofs import AssertionModel, RuleModel
from .schema import (
    COLOUR_RE,
    DURATION_RE,
    EMAIL_RE,
    IGNORE_RE,
    NAME_RE,
    SYSTEM_KEYS,
    TIME_RE,
    DeviceModel,
    GatewayModel,
    PermissionModel,
    SpanModel,
    SystemModel,
    TempKeyModel,
    UserModel,
)

# An ISO 8601 duration of days and time, as `resources.duration_seconds` reads it (no months or years; not `P`
# or `PT` alone).
ISO_DURATION = r"^P(?!$)(?:\d+D)?(?:T(?=\d)(?:\d+H)?(?:\d+M)?(?:\d+S)?)?$"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID = "https://reconciler.invalid/schema/policy-v1.json"

_MODELS: dict[str, type[BaseModel]] = {
    "User": UserModel, "Device": DeviceModel, "Gateway": GatewayModel, "Span": SpanModel,
    "Permission": PermissionModel, "TempKey": TempKeyModel, "Assertion": AssertionModel, "Rule": RuleModel,
}
_SCALAR = {"type": ["string", "number", "integer", "boolean"]}
# Formats the models check in validators, repeated here as patterns so that an editor flags them while typing.
_PATTERNS = [
    ("User", "email", EMAIL_RE.pattern),
    ("User", "phone", r"^\+[1-9][0-9 ().-]*$"),
    ("Device", "colour", COLOUR_RE.pattern),
    ("Permission", "key_validity", DURATION_RE.pattern),
    ("Span", "from", TIME_RE.pattern),
    ("Span", "to", f"{TIME_RE.pattern}|^24:00$"),
]


def policy_json_schema(capabilities: Mapping[str, Capabilities]) -> dict[str, Any]:
    defs: dict[str, Any] = {}
    for name, model in _MODELS.items():
        schema = model.model_json_schema(ref_template="#/$defs/{model}", by_alias=True, mode="validation")
        for inner, body in schema.pop("$defs", {}).items():
            defs[_def_name(inner)] = body
        defs[name] = schema
    defs = _rename_refs(defs)
    for def_name, key, pattern in _PATTERNS:
        _constrain(defs[def_name]["properties"][key], pattern)
    for def_name, kind in (("Permission", "grant"), ("Device", Kind.DEVICE)):
        _declared_properties(defs[def_name], capabilities, kind)
    defs["System"], system_defs = _system_schema(capabilities)
    defs.update(system_defs)
    operations = sorted(frozenset().union(*(caps.operations for caps in capabilities.values())))
    if operations:
        _enumerate(defs["Permission"]["properties"]["operations"], operations,
                   f"what the grant allows (by vendor: {_operations_by_vendor(capabilities)})")

    def named(ref: str, what: str) -> dict[str, Any]:
        return {"type": ["object", "null"], "description": f"{what}, by name",
                "propertyNames": {"pattern": NAME_RE.pattern}, "additionalProperties": {"$ref": f"#/$defs/{ref}"}}

    defs["Group"] = {"type": "array", "items": {"type": "string"}, "description": "members: users or groups"}
    defs["Schedule"] = {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/Span"},
                        "description": "weekly windows, one span per weekday"}
    return {
        "$schema": DIALECT,
        "$id": SCHEMA_ID,
        "title": "reconciler policy file (format v1)",
        "description": "One *.yaml file of a reconciler policy directory; the files are merged.",
        "type": ["object", "null"],
        "additionalProperties": False,
        "properties": {
            "systems": named("System", "vendor connections"),
            "users": named("User", "people"),
            "devices": named("Device", "locking devices"),
            "gateways": named("Gateway", f"gateways{_on(capabilities, 'gateways')}"),
            "groups": named("Group", "groups of users and groups"),
            "schedules": named("Schedule", f"weekly schedules{_on(capabilities, 'schedules')}"),
            "temp_keys": named("TempKey", f"temporary keys{_on(capabilities, 'temp_keys')}"),
            "permissions": {"type": ["array", "null"], "items": {"$ref": "#/$defs/Permission"},
                            "description": "who may open which devices, when"},
            "ignore": {"type": ["array", "null"],
                       "items": {"type": "string", "pattern": IGNORE_RE.pattern},
                       "description": "live objects reconciler never changes or revokes: addresses or patterns "
                                      "(`*` within a part, `**` across parts)"},
            "assertions": {"type": ["array", "null"], "items": {"$ref": "#/$defs/Assertion"},
                           "description": "who can or cannot open a door, and when: checked by `reconciler test`"},
            "rules": {"type": ["array", "null"], "items": {"$ref": "#/$defs/Rule"},
                      "description": "invariants every plan keeps: checked by validate, plan and test"},
        },
        "$defs": _range_keywords(dict(sorted(defs.items()))),
    }


_JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", list: "array", dict: "object"}


def _declared_properties(definition: dict[str, Any], capabilities: Mapping[str, Capabilities], kind: str) -> None:
    """The keys only vendors' schemas declare, typed from their declarations; no other key is accepted."""
    definition["additionalProperties"] = False
    for key, declaring in declared_keys(capabilities, kind).items():
        attributes = [caps.grant_schema.get(key) if kind == "grant" else caps.schema(kind).get(key)
                      for caps in (capabilities[v] for v in declaring)]
        types = sorted({_JSON_TYPES.get(t, "string") for a in attributes if a is not None
                        for t in (a.type if isinstance(a.type, tuple) else (a.type,))})
        prop: dict[str, Any] = {"type": types[0] if len(types) == 1 else types,
                                "description": f"declared by {', '.join(declaring)}"}
        choices = sorted(frozenset().union(*(a.choices for a in attributes if a is not None)))
        if choices:
            prop["enum"] = choices
        definition.setdefault("properties", {})[key] = prop


def _on(capabilities: Mapping[str, Capabilities], flag: str) -> str:
    """` (vendor, ...)`: the vendors that have a feature, for a section's description."""
    having = sorted(name for name, caps in capabilities.items() if getattr(caps, flag))
    return f" ({', '.join(having)})" if having else ""


def _system_schema(capabilities: Mapping[str, Capabilities]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A union discriminated on `vendor`, one branch per vendor: the common keys, that vendor's settings (from
    its settings model) and credential keys, nothing else; and the definitions the common keys refer to
    (`MassRevoke`), which must travel with them or the references dangle."""
    system = _rename_refs(SystemModel.model_json_schema(ref_template="#/$defs/{model}", by_alias=True,
                                                        mode="validation"))
    common = system["properties"]
    system_defs = {_def_name(name): body for name, body in system.get("$defs", {}).items()}
    assert set(common) == set(SYSTEM_KEYS), "the schema of a system must follow SystemModel"
    branches = []
    for vendor, caps in capabilities.items():
        model = vendors.settings_model(vendor)
        typed = model.model_json_schema(by_alias=True, mode="validation").get("properties", {}) if model else {}
        accepted = sorted(frozenset().union(*(caps.credential_sets or (caps.credentials,))))
        reference = {"type": "string", "pattern": ENV_REFERENCE.pattern,
                     "description": 'an environment variable reference, quoted: "${NAME}"'}
        properties = {key: dict(value) for key, value in common.items()}
        properties["vendor"] = {"const": vendor}
        properties["credentials"] = {"type": ["object", "null"], "additionalProperties": False,
                                     "properties": dict.fromkeys(accepted, reference)}
        for setting in sorted(caps.settings):
            properties[setting] = {**(typed.get(setting) or _SCALAR), "description": f"{vendor} setting"}
            properties[setting].pop("title", None)
            if setting in caps.setting_durations:
                low, high = caps.setting_durations[setting]
                _constrain(properties[setting], ISO_DURATION)
                properties[setting]["description"] = (f"{vendor} setting: an ISO 8601 duration of days and time "
                                                      f"(P7D, PT24H), {low} to {high} seconds")
        branches.append({"title": vendor, "type": "object", "required": ["vendor", *sorted(caps.required_settings)],
                         "properties": properties, "additionalProperties": False})
    return ({"description": "a vendor connection", "oneOf": branches, "discriminator": {"propertyName": "vendor"}},
            system_defs)


def _operations_by_vendor(capabilities: Mapping[str, Capabilities]) -> str:
    return "; ".join(f"{name}: {', '.join(sorted(caps.operations))}" for name, caps in sorted(capabilities.items())
                     if caps.operations)


def _enumerate(prop: dict[str, Any], values: list[str], description: str) -> None:
    """A list of strings whose items are one of `values` (the union over vendors; `validate` checks the vendor)."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "array":
            branch["items"] = {"enum": values}
    prop["description"] = description


# pydantic writes the bounds of a union (`float | int` with ge/le) in its own words; JSON Schema's are these.
_RANGE_WORDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _range_keywords(node: Any) -> Any:
    """Every schema object's `ge`/`le`/`gt`/`lt` as `minimum`/`maximum`/`exclusive…` (a validator ignores the
    former; they would be no check at all). Property names (under `properties`) are left as they are."""
    if isinstance(node, list):
        return [_range_keywords(value) for value in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "$defs", "patternProperties") and isinstance(value, dict):
            out[key] = {name: _range_keywords(sub) for name, sub in value.items()}
        elif key in _RANGE_WORDS and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[_RANGE_WORDS[key]] = value
        else:
            out[key] = _range_keywords(value)
    return out


def _constrain(prop: dict[str, Any], pattern: str) -> None:
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "string":
            branch["pattern"] = pattern


def _def_name(name: str) -> str:
    return name.removesuffix("Model")


def _rename_refs(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: (f"#/$defs/{_def_name(value.rsplit('/', 1)[1])}" if key == "$ref" and isinstance(value, str)
                      else _rename_refs(value)) for key, value in node.items()}
    if isinstance(node, list):
        return [_rename_refs(value) for value in node]
    return node
