"""The OpenAPI document without a node: every endpoint declares its answer, the records'
schemas name every field's items, and a wrong answer fails validation."""

from __future__ import annotations

import dataclasses
import datetime
import typing

import httpx
import pytest
import schemathesis

from formation.crdt.kinds import registry
from formation.node.api import schemas
from formation.node.api.app import endpoints
from formation.node.api.openapi import document

OWNER = "0x" + "ab" * 20
VERSION = "0" * 32


@pytest.fixture(scope="module")
def api():
    return schemathesis.openapi.from_dict(document(endpoints()))


def answers(api, method: str, path: str, value, status: int = 200) -> bool:
    op = api.find_operation_by_path(method, path)
    assert op is not None, path
    response = httpx.Response(status, json=value, request=httpx.Request(method, "http://node" + path))
    response.elapsed = datetime.timedelta(0)  # as if sent
    return op.is_valid_response(response)


def test_every_endpoint_declares_its_answer():
    for ep in endpoints():
        assert ep.stream or ep.answer is not None, f"{ep.method} {ep.path}"
        if not ep.stream and ep.path not in ("/agents/{id}/hire", "/agents/{id}/run_task"):  # the agent says
            assert ep.answer, f"{ep.method} {ep.path}"


def _records(cls, seen=None):
    seen = seen if seen is not None else set()
    if cls not in seen:
        seen.add(cls)
        for name in schemas.NESTED:
            if name in cls.__dataclass_fields__:
                _records(schemas.NESTED[name], seen)
    return seen


def test_every_list_map_and_nested_field_is_named():
    """What the type hints cannot say must be in NESTED, ITEMS or VALUES, or answers go unchecked."""
    for kind in registry().values():
        for cls in _records(kind.record):
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                hint = hints[f.name]
                base = typing.get_origin(hint) or hint
                args = [a for a in typing.get_args(hint) if a is not type(None)]
                if args and base is not list and base is not dict:  # X | None
                    base = args[0]
                if base is list:
                    assert f.name in schemas.ITEMS, f"{cls.__name__}.{f.name}: items unnamed"
                if base is dict:
                    assert f.name in schemas.NESTED or f.name in schemas.VALUES, f"{cls.__name__}.{f.name}"


def test_a_record_answer_is_exact(api):
    kind = registry()["model"]
    model = {**kind.validate({"model_id": "m1", "owner": OWNER, "name": "llama"}), "record_version": VERSION}
    assert answers(api, "GET", "/v1/models/m1", model)
    assert answers(api, "GET", "/v1/models/m1", {**model, "context_length": 4096, "price_per_1k_tokens": 0.5})
    wrong = [
        {k: v for k, v in model.items() if k != "record_version"},  # a key missing
        {k: v for k, v in model.items() if k != "quantization"},  # a nullable key missing
        {**model, "colour": "red"},  # a key no model has
        {**model, "parameters": "7B"},  # a wrong type
        {**model, "is_private": 1},
        {**model, "owner": OWNER.upper()},  # addresses are lowercase
        {**model, "record_version": "v1"},
        {**model, "tags": [1]},
        {**model, "authorized": {OWNER: "king"}},
    ]
    for value in wrong:
        assert not answers(api, "GET", "/v1/models/m1", value), value
    page = {"models": [model], "count": 1, "limit": 100, "offset": 0}
    assert answers(api, "GET", "/v1/models", page)
    assert not answers(api, "GET", "/v1/models", {**page, "models": [{**model, "agent_id": "a"}]})
    assert not answers(api, "GET", "/v1/models", {k: v for k, v in page.items() if k != "count"})


def test_nested_records_and_the_other_answers(api):
    node = {**registry()["node"].validate({"address": OWNER, "capacity": {"vcpus": 2, "memory_mb": 1, "disk_gb": 1}}),
            "record_version": VERSION}
    assert answers(api, "GET", f"/v1/node/{OWNER}/get", node)
    assert not answers(api, "GET", f"/v1/node/{OWNER}/get", {**node, "capacity": {"vcpus": 2}})
    record = {"kind": "node", "key": OWNER, "record_version": VERSION, "value": node}
    assert answers(api, "GET", f"/v1/records/node/{OWNER}", record)
    assert not answers(api, "GET", f"/v1/records/node/{OWNER}", {**record, "value": {"address": OWNER}})
    write = {"op_id": "1" * 64, "kind": "model", "key": "m1", "id": "m1"}
    assert answers(api, "POST", "/v1/models", write, 201)
    assert not answers(api, "POST", "/v1/models", {**write, "kind": "agent"}, 201)
    assert answers(api, "GET", "/v1/health", {"status": "healthy", "problems": [], "version": "0", "address": OWNER,
                                              "peer_id": "16U", "ops": 1, "peers": 0,
                                              "vms": {"enabled": False, "reason": "off"}})
    assert not answers(api, "GET", "/v1/health", {"status": "fine"})
    error = {"error": "not_found", "detail": "no model m1"}
    assert answers(api, "GET", "/v1/models/m1", error, 404)
    assert not answers(api, "GET", "/v1/models/m1", {"error": "not_found"}, 404)
