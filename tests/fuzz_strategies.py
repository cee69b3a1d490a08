"""Request bodies for fuzzing the server, drawn (with hypothesis) from its own OpenAPI schema.

Each body follows the request schema of a route most of the time and breaks it some of the time (a field of
the wrong type, out of range, or arbitrary JSON), so both the happy paths and the error paths are exercised.
Integers lean small so that valid requests stay quick to answer. Used by tests/test_serve.py and
benchmarks/serve.py; needs `hypothesis`.
"""
from __future__ import annotations

from hypothesis import strategies as st

ROUTES = ("/v1/completions", "/v1/chat/completions")

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _request_schema(openapi: dict, route: str) -> dict:
    body = openapi["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return body


def from_schema(schema: dict, defs: dict, depth: int = 0) -> st.SearchStrategy:
    """Values that (mostly) satisfy a JSON schema, small ones first."""
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, depth)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(s, defs, depth) for s in schema[key]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "string":
        return st.text(max_size=24) | st.sampled_from(["The cat", "Answer:", "", " ", "\n", "\u00e9\u4e2d\U0001f600"])
    if kind == "integer":
        lo = schema.get("minimum", schema.get("exclusiveMinimum", -4) + 1)
        hi = schema.get("maximum", schema.get("exclusiveMaximum", lo + 7) - 1)
        inside = st.integers(int(lo), int(min(hi, lo + 6)))
        return st.one_of(inside, inside, inside, st.integers(-(2**64), 2**64))
    if kind == "number":
        lo = schema.get("minimum", schema.get("exclusiveMinimum"))
        hi = schema.get("maximum", schema.get("exclusiveMaximum"))
        lo = -4.0 if lo is None else lo
        inside = st.floats(lo, lo + 4.0 if hi is None else hi, allow_nan=False,
                           exclude_min="exclusiveMinimum" in schema, exclude_max="exclusiveMaximum" in schema)
        return st.one_of(inside, inside, inside, st.floats(allow_nan=False, allow_infinity=False))
    if kind == "array":
        items = schema.get("items", {})
        return st.lists(from_schema(items, defs, depth + 1), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 3), 3))
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        if depth > 2:
            return st.fixed_dictionaries({k: from_schema(props[k], defs, depth + 1) for k in required})
        return st.fixed_dictionaries(
            {k: from_schema(v, defs, depth + 1) for k, v in props.items() if k in required},
            optional={k: _field(v, defs, depth + 1) for k, v in props.items() if k not in required},
        )
    return _json


def _field(schema: dict, defs: dict, depth: int) -> st.SearchStrategy:
    """An optional field: its default half of the time, so that many bodies are valid as a whole."""
    values = from_schema(schema, defs, depth)
    return st.one_of(st.just(schema["default"]), values) if "default" in schema else values


def bodies(openapi: dict, route: str) -> st.SearchStrategy:
    """Request bodies for `route`: schema-shaped, with one field broken now and then, or junk."""
    defs = openapi.get("components", {}).get("schemas", {})
    schema = _request_schema(openapi, route)
    valid = from_schema(schema, defs)
    props = list(defs[schema["$ref"].rsplit("/", 1)[-1]].get("properties", {})) if "$ref" in schema else []

    @st.composite
    def broken(draw):
        body = dict(draw(valid))
        if props:
            body[draw(st.sampled_from(props))] = draw(_json)
        return body

    return st.one_of(valid, valid, valid, broken(), _json)


def requests(openapi: dict) -> st.SearchStrategy:
    """(route, body) pairs over every POST route of the API."""
    return st.one_of([st.tuples(st.just(r), bodies(openapi, r)) for r in ROUTES])
