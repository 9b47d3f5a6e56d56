"""The JSON Schema of definition files, generated from the models (editors use it for completion).

Pydantic's schema describes the *validated* model; an editor sees the file as written. Three things
differ and are added here, so an editor's validator gives the CLI's verdict: a template string
(``"{{ memory }}"``) may stand for any value, since it is rendered before validation; the shorthands
that the models' before-validators accept (``display = "none"``, ``firmware = "uefi"``, a single
``cdrom`` path) are valid; and machine and network names that the CLI refuses are refused. The
sharing syntax of spec/inherit.py (``x-*`` keys, ``[templates.NAME]``, ``extends``) is described too.
"""

from __future__ import annotations

import json

TEMPLATE = {
    "type": "string",
    "pattern": r"\{\{[\s\S]*\}\}|\{%[\s\S]*%\}",
    "description": "A Jinja2 template, rendered with the file's [vars], QEMUSPEC_VAR_* and --var before validation",
}
_ANNOTATIONS = ("title", "description", "default", "examples")


def schema() -> dict:
    from typing import get_args

    from qemuspec.spec.models import declared
    from qemuspec.spec.models import _IDENT, Display, File, Firmware

    doc = File.model_json_schema(mode="validation")
    defs = doc["$defs"]
    for model in defs.values():
        for name, prop in list(model.get("properties", {}).items()):
            if name.endswith("options") and prop.get("type") == "object":
                prop["propertyNames"] = {
                    "pattern": _IDENT.pattern
                }  # option names are qemu identifiers
            model["properties"][name] = _templated(prop)
    machine = defs["Machine"]["properties"]
    for field, model in (("display", Display), ("firmware", Firmware)):
        kinds = list(get_args(model.model_fields["type"].annotation))
        machine[field]["anyOf"].insert(
            1, {"enum": kinds, "description": 'Shorthand for { type = "..." }'}
        )
    machine["cdrom"]["anyOf"].insert(1, {"type": "string", "description": "One image"})
    for field, _ in declared():
        machine[field]["anyOf"].insert(
            1, {"type": "boolean", "description": "true: the device with no extra properties"}
        )
    props = doc["properties"]
    props["machines"]["additionalProperties"] = False
    props["networks"]["propertyNames"] = {"pattern": r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"}
    defs["Template"] = TEMPLATE
    # spec/inherit.py: x-* keys (YAML anchors), [templates.NAME] and extends, merged before validation
    doc["patternProperties"] = {
        "^x-": {"description": "Ignored (as in docker compose): a place for YAML anchors"}
    }
    extends = {
        "description": "Take the settings of [templates.NAME] or another machine (a list: merged "
        "in order); tables merge key by key, anything this machine sets wins",
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
    }
    machine["extends"] = extends
    props["templates"] = {
        "type": "object",
        "description": 'Partial machines that machines extend (extends = "NAME"); never started',
        "propertyNames": {"pattern": r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"},
        "additionalProperties": {"$ref": "#/$defs/Machine"},  # no field of a machine is required
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "qemuspec definition",
        **doc,
    }


def _accepts_any_string(prop: dict) -> bool:
    if prop.get("type") == "string" and not (
        {"pattern", "enum", "const", "format", "maxLength", "minLength"} & set(prop)
    ):
        return True
    return any(_accepts_any_string(p) for p in prop.get("anyOf", []))


def _templated(prop: dict) -> dict:
    """``prop``, or a template string in its place; also inside arrays and maps."""
    prop = dict(prop)
    if isinstance(prop.get("items"), dict):
        prop["items"] = _templated(prop["items"])
    if isinstance(prop.get("additionalProperties"), dict):
        prop["additionalProperties"] = _templated(prop["additionalProperties"])
    if "anyOf" in prop:
        prop["anyOf"] = [_templated(p) if p.get("type") == "array" else p for p in prop["anyOf"]]
    if _accepts_any_string(prop):
        return prop
    notes = {k: prop.pop(k) for k in _ANNOTATIONS if k in prop}
    options = prop["anyOf"] if set(prop) == {"anyOf"} else [prop]
    return {**notes, "anyOf": [*options, {"$ref": "#/$defs/Template"}]}


def schema_text() -> str:
    return json.dumps(schema(), indent=2, sort_keys=True) + "\n"
