"""The API's plumbing: the endpoint table's types, errors, arguments, and the app made from a table.

An endpoint is declared once (`Endpoint`: method, path, auth, body, answer schema, handler); the
Quart routes (with and without the /v1 prefix) are generated from the table here, and the
OpenAPI document from the same table in openapi.py, so the two cannot drift. A handler takes a
`Call` (the runtime, the verified signer, path and query parameters, the raw body) and answers
`(JSON value, status)` or raises ApiError. This module imports no handler: the handler modules
(records.py, workloads.py, hire.py) build on it and app.py assembles them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from formation.crdt.strict import MAX_DEPTH as MAX_JSON_DEPTH
from formation.crdt.strict import StrictError, parse_json

from ..ports import ApiNode
from .auth import AuthError, ReplayGuard, Signed, has_signature, verify

STATUS_OF_CODE = {
    "bad_field": 400, "bad_request": 400, "malformed": 400, "bad_key": 400,
    "unauthorized": 403, "not_found": 404, "conflict": 409, "replay": 409, "unknown_version": 409,
    "bad_prev": 409, "too_early": 425,
    "too_large": 413, "unprocessable": 422,
}
# the query parameters of a paged list (see `paged`)
PAGING = {
    "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
    "offset": {"type": "integer", "minimum": 0},
}


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


@dataclass
class Call:
    runtime: ApiNode
    signed: Signed | None
    params: dict
    body: bytes
    query: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def who(self) -> str | None:
        return self.signed.address if self.signed else None

    def json(self) -> dict:
        return json_body(self.body)


def json_body(body: bytes, *, object_only: bool = True, max_depth: int = MAX_JSON_DEPTH,
              plain_text: bool = True) -> Any:
    """A request body parsed by the one strict JSON parser (crdt/strict.py), or 400 saying why."""
    if not body:
        return {}
    try:
        value = parse_json(body, max_depth=max_depth, plain_text=plain_text)
    except StrictError as exc:
        raise ApiError(400, "bad_request", f"body: {exc}") from None
    if object_only and not isinstance(value, dict):
        raise ApiError(400, "bad_request", "body must be a JSON object")
    return value


def int_arg(query: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ApiError(400, "bad_field", f"query parameter {name!r} must be an integer") from None
    if not lo <= v <= hi:
        raise ApiError(400, "bad_field", f"query parameter {name!r} must be in {lo}..{hi}")
    return v


def paged(name: str, items: list, query: Mapping[str, str]) -> dict:
    """One page of `items` as `{name: [...], count, limit, offset}` (`?limit=`, `?offset=`)."""
    limit, offset = int_arg(query, "limit", 100, 1, 1000), int_arg(query, "offset", 0, 0, 10**9)
    page = items[offset:offset + limit]
    return {name: page, "count": len(page), "limit": limit, "offset": offset}


Handler = Callable[[Call], Awaitable[tuple[Any, int]]]


@dataclass
class Endpoint:
    method: str
    path: str  # OpenAPI style: /models/{id}
    summary: str
    auth: str  # "none" | "optional" | "required"
    handler: Handler
    body: dict | None = None
    ok: int = 200
    tags: list[str] = field(default_factory=list)
    stream: bool = False
    write: bool = False  # a signed write: each signature is good for one request
    answer: dict | None = None  # JSON Schema of the 2xx answers' body (schemas.py builds them)
    responses: dict[int | str, dict] = field(default_factory=dict)  # OpenAPI answers beyond the usual
    query: dict[str, dict] = field(default_factory=dict)  # OpenAPI query parameters: name -> schema


def error_response(status: int, error: str, detail: str) -> Response:
    return Response(json.dumps({"error": error, "detail": detail}), status=status, mimetype="application/json")


def build_app(runtime: ApiNode, table: list[Endpoint], *, document: dict, max_content_length: int) -> QuartTrio:
    """The Quart app serving `table` (each path with and without /v1) and `document` at
    /openapi.json; signatures checked as each endpoint's `auth` says, errors as {error, detail}."""
    app = QuartTrio("formation")
    app.config["MAX_CONTENT_LENGTH"] = max_content_length
    guard = ReplayGuard()

    def bind(ep: Endpoint):
        async def view(**params):
            body = await request.get_data(cache=False)
            qs = request.query_string.decode()
            path_query = request.path + ("?" + qs if qs else "")
            signed = None
            if ep.auth == "required" or (ep.auth == "optional" and has_signature(request.headers)):
                try:
                    signed = verify(request.method, path_query, body, request.headers, time.time(), guard,
                                    one_use=ep.write)
                except AuthError as exc:
                    return error_response(401, exc.reason, exc.detail)
            try:
                result, status = await ep.handler(Call(runtime, signed, params, body, request.args, request.headers))
            except ApiError as exc:
                return error_response(exc.status, exc.error, exc.detail)
            if isinstance(result, Response):  # the handler made its own answer (a proxy)
                return result
            if ep.stream:
                return Response(result, status=status, mimetype="application/x-ndjson")
            return Response(json.dumps(result), status=status, mimetype="application/json")

        return view

    seen_rules: set[tuple[str, str]] = set()
    for i, ep in enumerate(table):
        rule = ep.path.replace("{", "<").replace("}", ">")
        for prefix in ("/v1", ""):
            key = (ep.method, prefix + rule)
            if key in seen_rules:
                continue
            seen_rules.add(key)
            app.add_url_rule(prefix + rule, f"ep{i}{prefix.replace('/', '_')}", bind(ep), methods=[ep.method])

    @app.route("/openapi.json")
    @app.route("/v1/openapi.json")
    async def openapi_doc():
        return Response(json.dumps(document), mimetype="application/json")

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException):
        names = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        return error_response(exc.code or 500, names.get(exc.code, "http_error"), exc.description or exc.name)

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception):
        app.logger.exception("unhandled error in the API")
        return error_response(500, "internal", f"{type(exc).__name__}: the node hit a bug; see its log")

    return app
