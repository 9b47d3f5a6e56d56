"""The JSON Schema of definition files, generated from the models (editors use it for completion)."""

from __future__ import annotations

import json

def schema() -> dict:
    from qemuspec.spec.models import File

    doc = File.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "qemuspec definition", **doc}


def schema_text() -> str:
    return json.dumps(schema(), indent=2, sort_keys=True) + "\n"
