"""JSON Schemas for the OpenAPI document, derived from the typed records of each kind."""

from __future__ import annotations

import dataclasses
import types
import typing

from formation.crdt.kinds.owned import OwnedKind

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
}

SEARCH_SCHEMA = {
    "type": "object",
    "properties": {
        "type": {"type": "string"},
        "framework": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "owner": {"type": "string"},
        "text": {"type": "string"},
        "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
        "offset": {"type": "integer", "minimum": 0},
    },
    "additionalProperties": False,
}


def _type_schema(tp) -> dict:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _type_schema(args[0]) if len(args) == 1 else {}
        return {**inner, "nullable": True}
    return {str: {"type": "string"}, int: {"type": "integer"}, bool: {"type": "boolean"},
            float: {"type": "number"}, list: {"type": "array"}, dict: {"type": "object"}}.get(
        tp if origin is None else origin, {})


def fields_schema(record_cls, names) -> dict:
    hints = typing.get_type_hints(record_cls)
    props = {f.name: _type_schema(hints[f.name]) for f in dataclasses.fields(record_cls) if f.name in names}
    return {"type": "object", "properties": props, "additionalProperties": False}


def write_body_schema(kind, action: str) -> dict:
    """The body a write takes; the authoritative checks are the kind's, at the node."""
    if action in ("delete", "start", "stop", "restart"):
        return {"type": "object", "maxProperties": 0}
    if action == "authorize":
        return {"type": "object", "required": ["address"], "additionalProperties": False, "properties": {
            "address": {"type": "string"}, "level": {"type": "string", "nullable": True,
                                                    "enum": ["manager", "operator", "read_only", None]}}}
    if action == "transfer":
        return {"type": "object", "required": ["to"], "additionalProperties": False,
                "properties": {"to": {"type": "string"}}}
    names = set(kind.settable) if isinstance(kind, OwnedKind) else {"name"}
    if isinstance(kind, OwnedKind):
        names.add(kind.id_field)
    return fields_schema(kind.record, names)


def record_schema() -> dict:
    return {"type": "object", "description": "a record of the shared state (see docs/state.md)"}
