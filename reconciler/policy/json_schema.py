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
from reconciler.resources import Capabilities

from .checks import ENV_REFERENCE
from .schema import (
    COLOUR_RE,
    DURATION_RE,
    EMAIL_RE,
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

DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID = "https://reconciler.invalid/schema/policy-v1.json"

_MODELS: dict[str, type[BaseModel]] = {
    "User": UserModel, "Device": DeviceModel, "Gateway": GatewayModel, "Span": SpanModel,
    "Permission": PermissionModel, "TempKey": TempKeyModel,
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
    defs["System"] = _system_schema(capabilities)

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
        },
        "$defs": dict(sorted(defs.items())),
    }


def _on(capabilities: Mapping[str, Capabilities], flag: str) -> str:
    """` (vendor, ...)`: the vendors that have a feature, for a section's description."""
    having = sorted(name for name, caps in capabilities.items() if getattr(caps, flag))
    return f" ({', '.join(having)})" if having else ""


def _system_schema(capabilities: Mapping[str, Capabilities]) -> dict[str, Any]:
    """A union discriminated on `vendor`, one branch per vendor: the common keys, that vendor's settings (from
    its settings model) and credential keys, nothing else."""
    common = SystemModel.model_json_schema(by_alias=True, mode="validation")["properties"]
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
        branches.append({"title": vendor, "type": "object", "required": ["vendor", *sorted(caps.required_settings)],
                         "properties": properties, "additionalProperties": False})
    return {"description": "a vendor connection", "oneOf": branches, "discriminator": {"propertyName": "vendor"}}


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
