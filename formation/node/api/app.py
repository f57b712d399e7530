"""The HTTP API: routes, signature checks, errors, the event stream and the OpenAPI document.

Every endpoint is declared once in ENDPOINTS (method, path, auth, body schema, handler); the
Quart routes (with and without the /v1 prefix) and /openapi.json are both generated from it, so
the document cannot drift from the code. Every user write is the user's own signed request,
handed to the node runtime unchanged; the op that carries it is what the fog replicates.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from formation.crdt.intents import MAX_BODY, write_routes
from formation.crdt.kinds import get_kind
from formation.crdt.op import OpError
from formation.crdt.strict import MAX_DEPTH as MAX_JSON_DEPTH
from formation.crdt.strict import StrictError, parse_json

from ..placement import is_live, place_all, shortfall, stale_after_ms
from . import views
from .auth import AuthError, ReplayGuard, Signed, has_signature, verify
from .schemas import ERROR_SCHEMA, SEARCH_SCHEMA, record_schema, write_body_schema

STATUS_OF_CODE = {
    "bad_field": 400, "bad_request": 400, "malformed": 400, "bad_key": 400,
    "unauthorized": 403, "not_found": 404, "conflict": 409, "replay": 409, "unknown_version": 409,
    "bad_prev": 409, "too_early": 425,
    "too_large": 413, "unprocessable": 422,
}
ASYNC_ACTIONS = {("instance", "create"), ("instance", "start"), ("instance", "stop"),
                 ("instance", "restart"), ("instance", "delete")}


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


@dataclass
class Call:
    runtime: Any
    signed: Signed | None
    params: dict
    body: bytes

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
    responses: dict[int, dict] = field(default_factory=dict)  # OpenAPI answers beyond the usual
    query: dict[str, dict] = field(default_factory=dict)  # OpenAPI query parameters: name -> schema


# ---- handlers ---------------------------------------------------------------------------------

async def _get(call: Call, kind: str, key: str):
    """A record with its `record_version` (what a write on it names as ?base=), or None."""
    def read(store):
        value = store.get(kind, key)
        return None if value is None else {**value, "record_version": store.record_version(kind, key)}

    return await call.runtime.astore.run(read, call.runtime.store)


async def health(call: Call):
    st = await call.runtime.status()
    problems = call.runtime.health_problems(len(st["connected"]), st["pending"])
    return {"status": "degraded" if problems else "healthy", "problems": problems,
            "version": st["version"], "address": st["address"], "peer_id": st["peer_id"], "ops": st["ops"],
            "peers": len(st["connected"]), "vms": st["vms"]}, 200


def make_write(kind: str, action: str) -> Handler:
    async def handler(call: Call):
        if len(call.body) > MAX_BODY:
            raise ApiError(413, "too_large", f"body is {len(call.body)} bytes, the limit is {MAX_BODY}")
        try:
            op = await call.runtime.submit_request(call.signed.message, call.body, call.signed.signature)
        except OpError as exc:
            raise ApiError(STATUS_OF_CODE.get(exc.code, 400), exc.code, exc.detail) from None
        status = 202 if (kind, action) in ASYNC_ACTIONS else 201 if action == "create" else 200
        return {"op_id": op.id.hex(), "kind": op.kind, "key": op.key, "id": op.key}, status

    return handler


async def _visible_or_404(call: Call, kind: str, key: str) -> dict:
    value = await _get(call, kind, key)
    if value is None:
        raise ApiError(404, "not_found", f"no {kind} {key}")
    if not views.visible(kind, value, call.who):
        if call.who is None:
            raise ApiError(401, "missing_header", f"this {kind} is private: sign the request")
        raise ApiError(403, "forbidden", f"{call.who} may not read {kind} {key}")
    return value


async def _list(call: Call, kind: str, *, limit: int = 10_000, **filters) -> list[dict]:
    rows = await call.runtime.astore.list(kind, limit=limit, **filters)
    return [r for r in rows if views.visible(kind, r, call.who)]


def _page(items: list, query) -> tuple[list, int, int]:
    limit, offset = _int_arg(query, "limit", 100, 1, 1000), _int_arg(query, "offset", 0, 0, 10**9)
    return items[offset:offset + limit], limit, offset


def _int_arg(query, name: str, default: int, lo: int, hi: int) -> int:
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


async def account_get(call: Call):
    addr = call.params["address"].lower()
    if addr != call.who:
        raise ApiError(403, "forbidden", "an account is readable only by its own address")
    return await _visible_or_404(call, "account", addr), 200


async def account_list(call: Call):
    value = await _get(call, "account", call.who)
    return {"accounts": [value] if value else [], "count": 1 if value else 0}, 200


async def replica_statuses(call: Call, instance_id: str) -> list[dict]:
    """The replicas' instance_status records, by node, each with `node_alive`: only its node may
    withdraw a record, so a dead node's last word stays in the state; readers must know."""
    rows = await call.runtime.astore.list("instance_status", text=instance_id, limit=1000)
    stale = stale_after_ms(call.runtime.config.node.heartbeat_seconds)
    now = int(time.time() * 1000)
    out = []
    for r in sorted((r for r in rows if r["instance_id"] == instance_id), key=lambda r: r["node"]):
        node = await call.runtime.astore.get("node", r["node"])
        out.append({**r, "node_alive": is_live(node, now, stale)})
    return out


async def _with_replicas(call: Call, inst: dict) -> dict:
    return {**inst, "replicas_status": await replica_statuses(call, inst["instance_id"])}


async def instance_get(call: Call):
    inst = await _visible_or_404(call, "instance", call.params["id"])
    return {**await _with_replicas(call, inst), "placement": await _placement(call, inst)}, 200


async def _placement(call: Call, inst: dict) -> dict:
    """Where the fog places the instance now, and why it cannot place all of it (e.g. no node
    has the GPUs it asks for) instead of leaving it pending in silence."""
    instances = await call.runtime.astore.list("instance", limit=1_000_000)
    nodes = await call.runtime.astore.list("node", limit=1_000_000)
    now, stale = int(time.time() * 1000), stale_after_ms(call.runtime.config.node.heartbeat_seconds)
    placed = place_all(instances, nodes, now_ms=now, stale_ms=stale).get(inst["instance_id"], [])
    return {"nodes": placed, "problem": shortfall(inst, placed, nodes, now_ms=now, stale_ms=stale)}


async def instance_by_build(call: Call):
    build = call.params["build_id"]
    items = [i for i in await _list(call, "instance", type=build)]
    return {"instances": items, "count": len(items)}, 200


async def instance_list(call: Call):
    items, limit, offset = _page(await _list(call, "instance"), request.args)
    return {"instances": items, "count": len(items), "limit": limit, "offset": offset}, 200


async def node_list(call: Call):
    items, limit, offset = _page(await _list(call, "node"), request.args)
    return {"nodes": items, "count": len(items), "limit": limit, "offset": offset}, 200


async def node_get(call: Call):
    return await _visible_or_404(call, "node", call.params["id"].lower()), 200


async def dns_list(call: Call):
    owner = request.args.get("owner")
    rows = sorted(await _list(call, "dns", owner=owner), key=lambda r: (r["domain"], r["owner"], r["record_id"]))
    items, limit, offset = _page(rows, request.args)
    return {"records": items, "count": len(items), "limit": limit, "offset": offset}, 200


async def dns_get(call: Call):
    return await _visible_or_404(call, "dns", call.params["id"]), 200


async def record_get(call: Call):
    """Any record by kind and key, with its version: what a client signs its next write on."""
    kind, key = call.params["kind"], call.params["key"]
    if get_kind(kind) is None:
        raise ApiError(404, "not_found", f"no kind {kind!r}")
    value = await _visible_or_404(call, kind, key)
    return {"kind": kind, "key": key, "record_version": value["record_version"], "value": value}, 200


def catalog_handlers(kind: str, plural: str):
    type_field = "model_type" if kind == "model" else "agent_type"

    async def listing(call: Call):
        q = request.args
        rows = await _list(call, kind, owner=q.get("owner"), type=q.get("type"), tag=q.get("tag"),
                           text=q.get("q"))
        rows = [r for r in rows if views.matches(r, type_field=type_field, filters={"framework": q.get("framework")})]
        items, limit, offset = _page(rows, q)
        return {plural: items, "count": len(items), "limit": limit, "offset": offset}, 200

    async def get_one(call: Call):
        return await _visible_or_404(call, kind, call.params["id"]), 200

    async def search(call: Call):
        body = call.json()
        unknown = set(body) - set(SEARCH_SCHEMA["properties"])
        if unknown:
            raise ApiError(400, "bad_field", f"unknown search field {sorted(unknown)[0]!r}")
        tags = body.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ApiError(400, "bad_field", "field 'tags' must be a list of strings")
        for name in ("type", "framework", "owner", "text"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise ApiError(400, "bad_field", f"field {name!r} must be a string")
        rows = await _list(call, kind, owner=body.get("owner"), type=body.get("type"),
                           tag=tags[0] if tags else None, text=body.get("text"))
        rows = [r for r in rows if views.matches(r, type_field=type_field, filters=body)]
        args = {k: str(body[k]) for k in ("limit", "offset") if k in body}
        items, limit, offset = _page(rows, args)
        return {plural: items, "count": len(items), "limit": limit, "offset": offset}, 200

    return listing, get_one, search


async def events(call: Call):
    """NDJSON: one line per committed op the caller may see; `since` = op id or sequence."""
    since = request.args.get("since", "0")
    seq = await _resolve_since(call, since)
    runtime = call.runtime

    async def lines():
        nonlocal seq
        yield json.dumps({"event": "hello", "seq": seq}) + "\n"
        while True:
            with trio.move_on_after(15):
                await runtime.changes.wait_past(seq)
            metas = await runtime.astore.since(seq)
            if not metas:
                yield json.dumps({"event": "keepalive", "seq": seq}) + "\n"
                continue
            out = []
            for m in metas:
                value = await runtime.astore.get(m.kind, m.key)
                shown = value if value is None or views.visible(m.kind, value, call.who) else False
                if shown is not False and m.kind != "instance_status":
                    out.append(json.dumps({"event": "op", "seq": m.seq, "op_id": m.id.hex(),
                                           "kind": m.kind, "key": m.key, "value": shown}) + "\n")
                seq = m.seq
            if out:
                yield "".join(out)

    return lines(), 200


async def _resolve_since(call: Call, since: str) -> int:
    if re.fullmatch(r"[0-9]{1,12}", since):
        return int(since)
    try:
        op_id = bytes.fromhex(since)
    except ValueError:
        raise ApiError(400, "bad_field", "query parameter 'since' is a sequence number or an op id (hex)") from None
    meta = await call.runtime.astore.op_meta(op_id)
    if meta is None:
        raise ApiError(404, "not_found", f"no op {since}")
    return meta.seq


# ---- the table --------------------------------------------------------------------------------

def endpoints() -> list[Endpoint]:
    eps = [
        Endpoint("GET", "/health", "Node health and identity", "none", health, tags=["node"]),
        Endpoint("GET", "/account/{address}/get", "Your account", "required", account_get, tags=["accounts"]),
        Endpoint("GET", "/account/list", "Accounts you may see (your own)", "required", account_list, tags=["accounts"]),
        Endpoint("GET", "/instance/list", "Instances you own or are authorized on", "required", instance_list, tags=["instances"]),
        Endpoint("GET", "/instance/{id}/get", "One instance with its replicas' status", "required", instance_get, tags=["instances"]),
        Endpoint("GET", "/instance/{build_id}/get_by_build_id", "Your instances of a build", "required", instance_by_build, tags=["instances"]),
        Endpoint("GET", "/node/list", "Nodes of the fog", "none", node_list, tags=["node"]),
        Endpoint("GET", "/node/{id}/get", "One node", "none", node_get, tags=["node"]),
        Endpoint("GET", "/dns/list", "DNS records", "none", dns_list, tags=["dns"]),
        Endpoint("GET", "/dns/{id}/get", "One DNS record", "none", dns_get, tags=["dns"]),
        Endpoint("GET", "/records/{kind}/{key}", "Any record with its record_version (the base of a write on it)",
                 "optional", record_get, tags=["records"]),
        Endpoint("GET", "/events", "Live stream of state changes you may see (NDJSON)", "optional", events,
                 tags=["events"], stream=True),
    ]
    for kind, plural, base in (("model", "models", "/models"), ("agent", "agents", "/agents")):
        listing, get_one, search = catalog_handlers(kind, plural)
        eps += [
            Endpoint("GET", base, f"List {plural} you may see", "optional", listing, tags=[plural]),
            Endpoint("GET", base + "/{id}", f"One {kind}", "optional", get_one, tags=[plural]),
            Endpoint("POST", base + "/search", f"Search {plural}", "optional", search, body=SEARCH_SCHEMA, tags=[plural]),
        ]
    for method, pattern, kind, action in write_routes():
        k = get_kind(kind)
        ok = 202 if (kind, action) in ASYNC_ACTIONS else 201 if action == "create" else 200
        eps.append(Endpoint(method, pattern, f"{action} {kind} (signed write)", "required",
                            make_write(kind, action), body=write_body_schema(k, action), ok=ok,
                            tags=[kind], write=True))
    from .workloads import endpoints as workload_endpoints  # it builds on this module

    return eps + workload_endpoints()


def create_app(runtime) -> QuartTrio:
    app = QuartTrio("formation")
    from .workloads import MAX_UPLOAD

    # the largest body is a build's context (POST /pack/build); every write route still checks
    # its own MAX_BODY
    app.config["MAX_CONTENT_LENGTH"] = max(2 * MAX_BODY, MAX_UPLOAD)
    guard = ReplayGuard()
    table = endpoints()

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
                    return _error(401, exc.reason, exc.detail)
            try:
                result, status = await ep.handler(Call(runtime, signed, params, body))
            except ApiError as exc:
                return _error(exc.status, exc.error, exc.detail)
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

    spec = openapi(table)

    @app.route("/openapi.json")
    @app.route("/v1/openapi.json")
    async def openapi_doc():
        return Response(json.dumps(spec), mimetype="application/json")

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException):
        names = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        return _error(exc.code or 500, names.get(exc.code, "http_error"), exc.description or exc.name)

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception):
        app.logger.exception("unhandled error in the API")
        return _error(500, "internal", f"{type(exc).__name__}: the node hit a bug; see its log")

    return app


def _error(status: int, error: str, detail: str) -> Response:
    return Response(json.dumps({"error": error, "detail": detail}), status=status, mimetype="application/json")


# ---- OpenAPI ----------------------------------------------------------------------------------

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
QUERY = {
    "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
    "offset": {"type": "integer", "minimum": 0},
}


def openapi(table: list[Endpoint]) -> dict:
    paths: dict[str, dict] = {}
    for ep in table:
        params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
                  for n in _path_params(ep.path)]
        if ep.auth != "none":
            params += [dict(h, required=(ep.auth == "required" and h["name"] in ("X-Message", "X-Signature"))) for h in SIG_HEADERS]
        if ep.method == "GET" and ep.path.endswith(("list", "/models", "/agents")):
            params += [{"name": n, "in": "query", "required": False, "schema": s} for n, s in QUERY.items()]
        if ep.path == "/events":
            params.append({"name": "since", "in": "query", "required": False, "schema": {"type": "string"}})
        params += [{"name": n, "in": "query", "required": False, "schema": s} for n, s in ep.query.items()]
        responses = {str(ep.ok): {"description": "OK", "content": {
            "application/x-ndjson" if ep.stream else "application/json": {"schema": {"type": "object"} if not ep.stream else {"type": "string"}}}}}
        for code in (400, 401, 403, 404, 409, 413, 422):
            responses[str(code)] = {"description": "error", "content": {"application/json": {"schema": ERROR_SCHEMA}}}
        responses.update({str(code): doc for code, doc in ep.responses.items()})
        op = {"operationId": f"{ep.method.lower()}_{ep.path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
              "summary": ep.summary, "tags": ep.tags, "parameters": params, "responses": responses}
        if ep.body is not None:
            op["requestBody"] = {"required": False, "content": {"application/json": {"schema": ep.body}}}
        paths.setdefault("/v1" + ep.path, {})[ep.method.lower()] = op
    paths["/v1/openapi.json"] = {"get": {"operationId": "openapi", "summary": "This document",
                                         "responses": {"200": {"description": "OpenAPI 3.0 document",
                                                               "content": {"application/json": {"schema": {"type": "object"}}}}}}}
    return {"openapi": "3.0.3", "info": {"title": "Formation node API", "version": "1"},
            "paths": paths, "components": {"schemas": {"Record": record_schema()}}}


def _path_params(path: str) -> list[str]:
    return re.findall(r"\{(\w+)\}", path)
