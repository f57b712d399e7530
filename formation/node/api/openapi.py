"""The OpenAPI 3.0 document of the API, generated from the endpoint table that makes the routes.

Each operation documents its parameters (path, signature headers, query), its body, its 2xx
answer (the endpoint's `answer` schema, built in schemas.py from the records) and the usual
error answers ({error, detail}); an endpoint's `responses` add to or replace those. The kinds'
records are components (`#/components/schemas/<Record>`) that answers refer to.
"""

from __future__ import annotations

import re

from .http import Endpoint
from .schemas import ERROR_SCHEMA, components, error_doc

SIG_HEADERS = [
    {"name": "X-Message", "in": "header", "schema": {"type": "string"},
     "description": "'<METHOD> <PATH?QUERY> <unix-seconds> <sha256-hex(body)>'"},
    {"name": "X-Signature", "in": "header", "schema": {"type": "string"},
     "description": "EIP-191 personal_sign of X-Message, 65 bytes hex (r||s||v)"},
    {"name": "X-Recovery-Id", "in": "header", "schema": {"type": "string"},
     "description": "optional when v is in the signature"},
    {"name": "X-Address", "in": "header", "schema": {"type": "string"},
     "description": "optional: the signer's address, checked against the signature"},
]
ERROR_CODES = (400, 401, 403, 404, 409, 413, 422)


def document(table: list[Endpoint]) -> dict:
    paths: dict[str, dict] = {}
    for ep in table:
        paths.setdefault("/v1" + ep.path, {})[ep.method.lower()] = operation(ep)
    paths["/v1/openapi.json"] = {"get": {"operationId": "openapi", "summary": "This document",
                                         "responses": {"200": {"description": "OpenAPI 3.0 document",
                                                               "content": {"application/json": {"schema": {"type": "object"}}}}}}}
    return {"openapi": "3.0.3", "info": {"title": "Formation node API", "version": "1"},
            "paths": paths, "components": {"schemas": {**components(), "Error": ERROR_SCHEMA}}}


def operation(ep: Endpoint) -> dict:
    if ep.answer is None and not ep.stream:
        raise ValueError(f"{ep.method} {ep.path}: the endpoint declares no answer schema")
    params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
              for n in re.findall(r"\{(\w+)\}", ep.path)]
    if ep.auth != "none":
        params += [dict(h, required=(ep.auth == "required" and h["name"] in ("X-Message", "X-Signature")))
                   for h in SIG_HEADERS]
    params += [{"name": n, "in": "query", "required": False, "schema": s} for n, s in ep.query.items()]
    if ep.stream:
        ok = {"application/x-ndjson": {"schema": {"type": "string"}}}
    else:
        ok = {"application/json": {"schema": ep.answer}}
    responses = {str(ep.ok): {"description": "OK", "content": ok}}
    responses.update({str(code): error_doc("error") for code in ERROR_CODES})
    responses.update({str(code): doc for code, doc in ep.responses.items()})
    op = {"operationId": f"{ep.method.lower()}_{re.sub(r'[{}]', '', ep.path.strip('/').replace('/', '_'))}",
          "summary": ep.summary, "tags": ep.tags, "parameters": params, "responses": responses}
    if ep.body is not None:
        op["requestBody"] = {"required": False, "description": f"UTF-8 JSON, at most {ep.body_limit} bytes "
                             "(413 past it, before the body is read)",
                             "content": {"application/json": {"schema": ep.body}}}
    return op
