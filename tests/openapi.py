"""Validation of real200's answers against OpenAI's published OpenAPI schemas.

The spec (../shared/openai-openapi/openapi.json) says OpenAPI 3.1 but still marks some
fields with the 3.0 keyword `nullable: true`, which JSON Schema 2020-12 ignores; each such
schema is rewritten to `anyOf: [schema, {"type": "null"}]` when loaded, as SOURCE.md says.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

SPEC = Path(__file__).resolve().parents[2] / "shared" / "openai-openapi" / "openapi.json"


def _nullable_to_any_of(node: Any) -> Any:
    if isinstance(node, list):
        return [_nullable_to_any_of(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable_to_any_of(value) for key, value in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


@functools.cache
def _spec() -> dict[str, Any]:
    return _nullable_to_any_of(orjson.loads(SPEC.read_bytes()))


@functools.cache
def validator(component: str) -> Draft202012Validator:
    spec = _spec()
    registry = Registry().with_resource("urn:openai", Resource.opaque(spec))
    schema = {"$ref": f"urn:openai#/components/schemas/{component}"}
    return Draft202012Validator(schema, registry=registry)


def assert_valid(component: str, instance: Any) -> None:
    errors = sorted(validator(component).iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, f"{component}: " + "; ".join(
        f"{'/'.join(map(str, e.path))}: {e.message[:200]}" for e in errors[:5]
    )
