"""JSON Schemas (OpenAPI 3.0) of the API's bodies and answers, derived from the typed records.

Bodies: the fields a write may set, typed, none required (the kind fills defaults and has the
last word). Answers: a record as the API shows it holds every field of its dataclass (the kinds
fill defaults before a record enters the state) and its `record_version`, and nothing else, so
its schema requires every key and allows no other. The dataclass hints give each field's type
and whether it may be null; what they cannot say (the record nested in a field, the items of a
list or a map) is named in NESTED, ITEMS and VALUES, and tests/api/test_openapi.py checks that
every list, map and nested field of every kind is named there. Each kind's record is a named
component of the document (`#/components/schemas/Model`); `ref("model")` points at it.
"""

from __future__ import annotations

import dataclasses
import types
import typing

from formation.crdt.kinds import get_kind, registry
from formation.crdt.kinds.fog_kinds import Fog, Invite, Policy
from formation.crdt.kinds.node_kinds import STATES, Capacity
from formation.crdt.kinds.owned import GRANTABLE, OwnedKind
from formation.crdt.kinds.user_kinds import (
    DESIRED_STATES,
    Gpu,
    Plan,
    ResourceRequirements,
    Resources,
    Secret,
)
from formation.crdt.schema import address

STRING = {"type": "string"}
INTEGER = {"type": "integer"}
NUMBER = {"type": "number"}
BOOLEAN = {"type": "boolean"}
COUNT = {"type": "integer", "minimum": 0}
ADDRESS = {"type": "string", "pattern": "^0x[0-9a-f]{40}$"}  # as records hold them: lowercase
VERSION = {"type": "string", "pattern": "^[0-9a-f]{32}$"}  # a record_version
OP_ID = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
REPLICA_STATE = {"type": "string", "enum": list(STATES)}


def nullable(schema: dict) -> dict:
    return {**schema, "nullable": True}


def array(items: dict) -> dict:
    return {"type": "array", "items": items}


def obj(required: dict, optional: dict | None = None, *, closed: bool = True) -> dict:
    """An object with `required` keys (and `optional` ones); `closed`: no other key."""
    out: dict = {"type": "object"}
    if required:
        out["required"] = list(required)
    out["properties"] = {**required, **(optional or {})}
    if closed:
        out["additionalProperties"] = False
    return out


ERROR_SCHEMA = obj({"error": STRING, "detail": STRING})


def error_schema(**more: dict) -> dict:
    """An error answer that may say more than {error, detail} (the keys in `more`)."""
    return obj({"error": STRING, "detail": STRING}, more)


ERROR_REF = {"$ref": "#/components/schemas/Error"}  # ERROR_SCHEMA, a component of the document


def error_doc(description: str, schema: dict = ERROR_REF) -> dict:
    """An OpenAPI response object for an error answer."""
    return {"description": description, "content": {"application/json": {"schema": schema}}}


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

# What the records' type hints cannot say, by field name (the same name means the same thing in
# every record): the record nested in a field, the items of a list, the values of a map.
NESTED = {"capacity": Capacity, "resources": Resources, "gpu": Gpu, "policy": Policy, "invite": Invite,
          "fog": Fog, "resource_requirements": ResourceRequirements}
ITEMS = {name: STRING for name in ("tags", "multiaddrs", "capabilities", "targets", "endpoints", "seen", "doubts",
                                   "reaches", "tools", "compatible_model_types", "preferred_models",
                                   "required_cpu_extensions", "gpu_models")}
# an instance's `secrets` are NAME -> Secret, an agent's `plans` NAME -> Plan (added below)
VALUES = {"metadata": STRING, "authorized": {"type": "string", "enum": list(GRANTABLE)}, "boxes": STRING}
ENUMS = {"state": REPLICA_STATE, "desired_state": {"type": "string", "enum": list(DESIRED_STATES)}}


def _is_optional(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _type_schema(tp) -> dict:
    if _is_optional(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _type_schema(args[0]) if len(args) == 1 else {}
        return nullable(inner)
    origin = typing.get_origin(tp)
    return {str: STRING, int: INTEGER, bool: BOOLEAN, float: NUMBER, list: {"type": "array"},
            dict: {"type": "object"}}.get(tp if origin is None else origin, {})


def fields_schema(record_cls, names) -> dict:
    """The fields `names` of a record as a body takes them: typed, none required."""
    hints = typing.get_type_hints(record_cls)
    props = {f.name: _type_schema(hints[f.name]) for f in dataclasses.fields(record_cls) if f.name in names}
    return {"type": "object", "properties": props, "additionalProperties": False}


def write_body_schema(kind, action: str) -> dict:
    """The body a write takes; the authoritative checks are the kind's, at the node."""
    if action in ("delete", "start", "stop", "restart", "pause", "resume"):
        return {"type": "object", "maxProperties": 0}
    if action == "authorize":
        return {"type": "object", "required": ["address"], "additionalProperties": False, "properties": {
            "address": {"type": "string"}, "level": {"type": "string", "nullable": True,
                                                    "enum": ["manager", "operator", "read_only", None]}}}
    if action == "secrets":  # form secrets (formation/sealed.py): boxes sealed on the client
        entry = {"type": "object", "required": ["commit", "boxes"], "additionalProperties": False, "properties": {
            "commit": STRING, "boxes": {"type": "object", "additionalProperties": STRING}}}
        return {"type": "object", "additionalProperties": False, "properties": {
            "set": {"type": "object", "additionalProperties": entry}, "unset": {"type": "array", "items": STRING}}}
    if action == "transfer":
        return {"type": "object", "required": ["to"], "additionalProperties": False,
                "properties": {"to": {"type": "string"}}}
    names = set(kind.settable) if isinstance(kind, OwnedKind) else {"name"}
    if isinstance(kind, OwnedKind):
        names.add(kind.id_field)
    return fields_schema(kind.record, names)


# ---- answers ----------------------------------------------------------------------------------

def _shown_field(f: dataclasses.Field, hint) -> dict:
    schema = dict(_type_schema(hint))
    is_null = schema.pop("nullable", False)
    if f.metadata.get("check") is address:
        schema = ADDRESS
    elif f.name in NESTED:
        schema = record_fields_schema(NESTED[f.name])
    elif schema.get("type") == "array":
        schema = array(ITEMS.get(f.name, {}))
    elif schema.get("type") == "object":
        schema = {"type": "object", "additionalProperties": VALUES.get(f.name, {})}
    schema = ENUMS.get(f.name, schema)
    return nullable(schema) if is_null else schema


def record_fields(record_cls) -> dict[str, dict]:
    """Every field of a record -> its schema as answers show it."""
    hints = typing.get_type_hints(record_cls)
    return {f.name: _shown_field(f, hints[f.name]) for f in dataclasses.fields(record_cls)}


def record_fields_schema(record_cls, **extra: dict) -> dict:
    """A record as it is stored: every field present, no other (plus the keys in `extra`)."""
    return obj({**record_fields(record_cls), **extra})


VALUES["secrets"] = record_fields_schema(Secret)
VALUES["plans"] = record_fields_schema(Plan)  # an agent's plans: NAME -> Plan


def shown_schema(kind_name: str, **extra: dict) -> dict:
    """A record of a kind as the API shows it: its fields, its `record_version` and `extra`."""
    return record_fields_schema(get_kind(kind_name).record, record_version=VERSION, **extra)


def components() -> dict[str, dict]:
    """Each kind's record as the API shows it, named after its dataclass."""
    return {k.record.__name__: {**shown_schema(name), "description": f"a {name} record and its record_version "
                                "(the version a write on it names as ?base=)"}
            for name, k in sorted(registry().items())}


def ref(kind_name: str) -> dict:
    return {"$ref": f"#/components/schemas/{get_kind(kind_name).record.__name__}"}


def page_schema(name: str, item: dict, **extra: dict) -> dict:
    """A paged list: `{name: [...], count, limit, offset}` (http.paged)."""
    return obj({name: array(item), "count": COUNT, "limit": INTEGER, "offset": INTEGER, **extra})


# What the original README's instance routes answer (seeds/formation-README.txt, "Creating the
# Agent Instance"), beside our own keys: an instance write answers both (records.py).
SEED_INSTANCE_ANSWER = {"instanceId": STRING, "buildId": nullable(STRING),
                        "status": {"type": "string", "enum": ["REQUEST_RECEIVED"]}, "message": STRING}
# ... and GET /instance/:instance_id/get ("Checking Agent Status and Boot Completion"): the same
# instanceId and buildId, with the README's status names and ISO 8601 times (records.seed_view)
SEED_STATUSES = ["PENDING", "PENDING_BUILD", "BUILDING", "STARTING", "RUNNING", "PAUSED", "STOPPED", "FAILED"]
SEED_INSTANCE_GET = {"instanceId": STRING, "buildId": nullable(STRING), "ownerAddress": ADDRESS,
                     "status": {"type": "string", "enum": SEED_STATUSES}, "formnetIp": nullable(STRING),
                     "createdAt": nullable(STRING), "updatedAt": nullable(STRING)}


def write_result_schema(kind_name: str) -> dict:
    """What a signed write answers: the op that carries it and the record it is about (and, for
    an instance, the README's fields)."""
    ours = {"op_id": OP_ID, "kind": {"type": "string", "enum": [kind_name]}, "key": STRING, "id": STRING}
    return obj({**ours, **(SEED_INSTANCE_ANSWER if kind_name == "instance" else {})})
