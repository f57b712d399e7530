"""The API's plumbing: the endpoint table's types, errors, arguments, and the app made from a table.

An endpoint is declared once (`Endpoint`: method, path, auth, body, answer schema, handler); the
Quart routes (with and without the /v1 prefix) are generated from the table here, and the
OpenAPI document from the same table in openapi.py, so the two cannot drift. A handler takes a
`Call` (the runtime, the verified signer, path and query parameters, the raw body) and answers
`(JSON value, status)` or raises ApiError. This module imports no handler: the handler modules
(records.py, workloads.py, hire.py) build on it and app.py assembles them.

Cheap checks come before expensive ones on every request (`Admission`, around the app): the
route's body limit against Content-Length and the signature's headers (present, well formed,
for this method and path, in the window) are checked before a byte of the body is read; a body
without a length (chunked) is counted as it arrives and cut at the limit; the signature itself
is verified before the body is parsed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

from formation.crdt.intents import MAX_BODY
from formation.crdt.strict import MAX_DEPTH as MAX_JSON_DEPTH
from formation.crdt.strict import StrictError, parse_json

from ..ports import ApiNode
from .auth import AuthError, ReplayGuard, Signed, check_headers, has_signature, verify

STATUS_OF_CODE = {
    "bad_field": 400, "bad_request": 400, "malformed": 400, "bad_key": 400,
    "unauthorized": 403, "not_found": 404, "conflict": 409, "replay": 409, "unknown_version": 409,
    "bad_prev": 409, "too_early": 425, "quota_exceeded": 402,
    "too_large": 413, "unprocessable": 422,
}
# the query parameters of a paged list (see `paged`)
PAGING = {
    "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
    "offset": {"type": "integer", "minimum": 0},
}


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str, extra: dict | None = None):
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.extra = extra or {}  # more fields of the answer beside {error, detail}


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


# RFC 8259 §8.1: JSON exchanged between systems is UTF-8, without a byte order mark. What
# another encoding looks like in its first bytes (the BOMs, and the NULs of UTF-16/32 ASCII).
_OTHER_ENCODINGS = (
    (b"\x00\x00\xfe\xff", "UTF-32 (big-endian, with a byte order mark)"),
    (b"\xff\xfe\x00\x00", "UTF-32 (little-endian, with a byte order mark)"),
    (b"\xef\xbb\xbf", "UTF-8 with a byte order mark"),
    (b"\xfe\xff", "UTF-16 (big-endian, with a byte order mark)"),
    (b"\xff\xfe", "UTF-16 (little-endian, with a byte order mark)"),
)


def encoding_problem(body: bytes) -> str | None:
    """Why `body` is not UTF-8 JSON text as sent by a UTF-8 client (None when it may be): a
    byte order mark, or the NUL bytes of UTF-16 or UTF-32 text."""
    for bom, name in _OTHER_ENCODINGS:
        if body.startswith(bom):
            return name
    head = body[:4]
    if 0 not in head:  # JSON text in UTF-8 holds no NUL byte at all
        return None
    return "UTF-32" if head.count(0) == 3 else "UTF-16"


def check_encoding(body: bytes) -> None:
    """400 `bad_encoding` naming the encoding of a body that is not UTF-8 without a BOM."""
    problem = encoding_problem(body)
    if problem:
        raise ApiError(400, "bad_encoding", f"body: the body looks like {problem}; JSON bodies are UTF-8 "
                                            "without a byte order mark")


def json_body(body: bytes, *, object_only: bool = True, max_depth: int = MAX_JSON_DEPTH,
              plain_text: bool = True) -> Any:
    """A request body parsed by the one strict JSON parser (crdt/strict.py), or 400 saying why."""
    if not body:
        return {}
    check_encoding(body)
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
    # bytes of request body the route takes (None: MAX_BODY, a signed write's limit; a GET takes
    # none). Checked before the body is read (`Admission`).
    max_body: int | None = None
    # whether the node can serve the route now (ApiError when not, e.g. 503 while its VM side is
    # off): asked before the body is read, so a node that cannot build reads no upload
    ready: Callable[[Any], ApiError | None] | None = None

    @property
    def body_limit(self) -> int:
        if self.max_body is not None:
            return self.max_body
        return 0 if self.method == "GET" else MAX_BODY


TOO_LARGE = "formation.too_large"  # set in the ASGI scope when a body was cut at its limit


def path_query_of(path: str, query_string: bytes) -> str:
    """The `<PATH?QUERY>` a signature covers, as this node read the request (the query as sent)."""
    qs = query_string.decode("latin-1")
    return path + ("?" + qs if qs else "")


def too_large(ep: Endpoint, size: str) -> ApiError:
    return ApiError(413, "too_large", f"body of {size} bytes: {ep.method} {ep.path} takes at most "
                                      f"{ep.body_limit} bytes")


# Routes that take bodies over UPLOAD_BYTES (build contexts) are uploads: a request to one
# holds an upload slot from its head to its answer, at most UPLOADS at once in all and
# UPLOADS_PER_SOURCE per client address; without a free slot it is 429 before its body is read
# (each may hold ~89 MB in memory: four unchecked at once took a node from 111 to 484 MB).
UPLOAD_BYTES = 1024 * 1024
UPLOADS = 4
UPLOADS_PER_SOURCE = 2


class UploadSlots:
    def __init__(self, total: int = UPLOADS, per_source: int = UPLOADS_PER_SOURCE):
        self.total, self.per_source = total, per_source
        self.held: dict[str, int] = {}

    def take(self, source: str) -> ApiError | None:
        if sum(self.held.values()) >= self.total:
            return ApiError(429, "too_many_uploads", f"this node takes {self.total} uploads at once and is "
                                                     "taking them now; send it again in a moment")
        if self.held.get(source, 0) >= self.per_source:
            return ApiError(429, "too_many_uploads", f"{self.per_source} uploads from {source} are under way "
                                                     "here; send the next when one has finished")
        self.held[source] = self.held.get(source, 0) + 1
        return None

    def give_back(self, source: str) -> None:
        left = self.held.get(source, 0) - 1
        if left > 0:
            self.held[source] = left
        else:
            self.held.pop(source, None)


class Admission:
    """ASGI middleware: the checks a request's head decides, before any of its body is read.

    For a request to an endpoint of the table: a Content-Length over the endpoint's body limit
    is 413, (where the endpoint wants a signature) missing or malformed signature headers are
    401, an endpoint the node cannot serve now (`Endpoint.ready`) answers its error, and an
    upload without a free slot (`UploadSlots`) is 429: answered at once, the app never runs
    and the node reads none of the body. Every body, of any route, is counted as it arrives:
    past the limit the app gets an end of body, the view answers 413 (TOO_LARGE in the scope),
    and the rest is never read.
    """

    def __init__(self, inner, app: QuartTrio, routes: dict[str, Endpoint], runtime: Any = None,
                 uploads: UploadSlots | None = None):
        self.inner = inner
        self.app = app
        self.routes = routes  # Quart endpoint name -> Endpoint
        self.runtime = runtime
        self.uploads = uploads or UploadSlots()

    def endpoint(self, method: str, path: str) -> Endpoint | None:
        try:
            name, _ = self.app.url_map.bind("localhost").match(path, method=method)
        except HTTPException:  # 404, 405, a redirect: Quart answers those without the body
            return None
        ep = self.routes.get(name)
        return ep if ep is not None and ep.method == method else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        method = scope["method"]
        path = "/" + scope["path"].lstrip("/")  # as werkzeug's Request reads it
        ep = self.endpoint(method, path)
        limit = ep.body_limit if ep is not None else 0
        if ep is not None:
            headers = Headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]])
            refused = self.refusal(ep, method, path_query_of(path, scope.get("query_string", b"")), headers)
            if refused is None and ep.ready is not None:
                refused = ep.ready(self.runtime)
            if refused is None and limit > UPLOAD_BYTES:
                source = (scope.get("client") or ("?",))[0]
                refused = self.uploads.take(source)
                if refused is None:
                    try:
                        return await self.inner(scope, _capped(receive, limit, scope), send)
                    finally:
                        self.uploads.give_back(source)
            if refused is not None:
                await _answer(send, refused)
                return
        await self.inner(scope, _capped(receive, limit, scope), send)

    @staticmethod
    def refusal(ep: Endpoint, method: str, path_query: str, headers: Headers) -> ApiError | None:
        length = headers.get("Content-Length", "")
        if length.isdigit() and int(length) > ep.body_limit:
            return too_large(ep, length)
        if ep.auth == "required" or (ep.auth == "optional" and has_signature(headers)):
            try:
                check_headers(method, path_query, headers, time.time())
            except AuthError as exc:
                return ApiError(401, exc.reason, exc.detail)
        return None


def _capped(receive, limit: int, scope: dict):
    """`receive`, ending the body at `limit` bytes (then TOO_LARGE is in the scope and nothing
    more is read: the app answers and is cancelled)."""
    seen = 0

    async def capped():
        nonlocal seen
        if TOO_LARGE in scope:
            await trio.sleep_forever()
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                scope[TOO_LARGE] = seen
                return {"type": "http.request", "body": b"", "more_body": False}
        return message

    return capped


async def _answer(send, exc: ApiError) -> None:
    body = json.dumps({"error": exc.error, "detail": exc.detail}).encode()
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def error_response(status: int, error: str, detail: str, extra: dict | None = None) -> Response:
    return Response(json.dumps({"error": error, "detail": detail, **(extra or {})}), status=status,
                    mimetype="application/json")


def build_app(runtime: ApiNode, table: list[Endpoint], *, document: dict) -> QuartTrio:
    """The Quart app serving `table` (each path with and without /v1) and `document` at
    /openapi.json; bodies bounded and signatures checked as each endpoint says (`Admission`),
    errors as {error, detail}."""
    app = QuartTrio("formation")
    # Quart's own bound, behind Admission's per-route ones: the largest any route takes
    app.config["MAX_CONTENT_LENGTH"] = max([ep.body_limit for ep in table] + [0])
    guard = ReplayGuard()

    def bind(ep: Endpoint):
        async def view(**params):
            body = await request.get_data(cache=False)
            if TOO_LARGE in request.scope or len(body) > ep.body_limit:
                size = f"over {ep.body_limit}" if TOO_LARGE in request.scope else str(len(body))
                exc = too_large(ep, size)
                return error_response(exc.status, exc.error, exc.detail)
            path_query = path_query_of(request.path, request.query_string)
            signed = None
            if ep.auth == "required" or (ep.auth == "optional" and has_signature(request.headers)):
                try:
                    signed = verify(request.method, path_query, body, request.headers, time.time(), guard,
                                    one_use=ep.write)
                except AuthError as exc:
                    return error_response(401, exc.reason, exc.detail)
            try:
                check_encoding(body)
                result, status = await ep.handler(Call(runtime, signed, params, body, request.args, request.headers))
            except ApiError as exc:
                return error_response(exc.status, exc.error, exc.detail, exc.extra)
            if isinstance(result, Response):  # the handler made its own answer (a proxy)
                return result
            if ep.stream:
                return Response(result, status=status, mimetype="application/x-ndjson")
            return Response(json.dumps(result), status=status, mimetype="application/json")

        return view

    seen_rules: set[tuple[str, str]] = set()
    routes: dict[str, Endpoint] = {}
    for i, ep in enumerate(table):
        rule = ep.path.replace("{", "<").replace("}", ">")
        for prefix in ("/v1", ""):
            key = (ep.method, prefix + rule)
            if key in seen_rules:
                continue
            seen_rules.add(key)
            name = f"ep{i}{prefix.replace('/', '_')}"
            routes[name] = ep
            app.add_url_rule(prefix + rule, name, bind(ep), methods=[ep.method])
    app.asgi_app = Admission(app.asgi_app, app, routes, runtime)  # type: ignore[method-assign]

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
