"""Workload endpoints: image builds, and a replica's console, metrics and addresses.

    POST /pack/build               signed, one use: queue a build (Formfile + base64 tar.gz context)
    GET  /pack/builds[/{id}]       signed: your builds (a build you did not submit is a 404)
    GET  /pack/builds/{id}/logs    signed: the build log from a byte offset, 1 MiB at a time
    GET  /instance/{id}/logs       signed: the console of this node's replica of an instance
    GET  /instance/{id}/metrics    signed: this node's replica: VM state, CPU, memory, uptime, restarts
    GET  /instance/{id}/ips        signed: every replica's node, state and IP address

Builds and consoles belong to the node's VM side (`runtime.vms`, node/vmside.py); a node
that runs no VMs answers the build endpoints with 503 vm_disabled and has no replica to show (503
vms_starting while its VM side is starting, a moment after the node starts).
Build status and logs live on the node that ran the build: ask the node you submitted to.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

import trio

from formation.node.builds import BuildRefused, BuildService
from formation.pack import context as pack_context

from ..vmside import VmsOn, VmsStarting
from . import views
from .http import PAGING, ApiError, Call, Endpoint, int_arg, json_body, paged
from .schemas import (
    ADDRESS,
    BOOLEAN,
    COUNT,
    INTEGER,
    NUMBER,
    REPLICA_STATE,
    STRING,
    array,
    error_doc,
    error_schema,
    nullable,
    obj,
    page_schema,
)
from .views import scheduler_of

CONTEXT_LIMIT = pack_context.DEFAULT_LIMIT  # bytes of the packed context (tar.gz) a node takes
FORMFILE_LIMIT = 256 * 1024  # characters of Formfile text
# The largest POST /pack/build: the context in base64 (4 bytes per 3) plus the Formfile in JSON
# (at most 6 bytes per character when every one is escaped) and a little for the braces.
MAX_UPLOAD = 4 * ((CONTEXT_LIMIT + 2) // 3) + 6 * FORMFILE_LIMIT + 1024
LOG_CHUNK = 1024 * 1024  # bytes of a build log per answer
DEFAULT_TAIL = 64 * 1024  # bytes of a console per answer, unless ?tail= says otherwise
MAX_TAIL = 8 * 1024 * 1024
TERMINAL = frozenset({"done", "failed"})

BUILD_SCHEMA = {
    "type": "object",
    "required": ["formfile"],
    "properties": {
        "formfile": {"type": "string", "description": "the Formfile's text"},
        "context": {"type": "string", "format": "byte",
                    "description": "the build context (the folder COPY reads from), a tar.gz in base64"},
    },
    "additionalProperties": False,
}

# ---- answers ----------------------------------------------------------------------------------

BUILD_STATE = {"type": "string", "enum": ["queued", "building", "done", "failed"]}
BUILD_ERROR = obj({"message": STRING}, {"line": nullable(INTEGER), "instruction": nullable(STRING),
                                        "output_tail": array(STRING)})
# builds.py writes the status; progress adds what its phase knows (step, line, packages...)
BUILD_STATUS = obj({"build_id": STRING, "name": STRING, "state": BUILD_STATE, "phase": STRING, "step": COUNT,
                    "steps": COUNT, "error": nullable(BUILD_ERROR), "image": nullable({"type": "object"}),
                    "submitted_at": INTEGER},
                   {"started_at": INTEGER, "finished_at": INTEGER, "line": INTEGER, "instruction": STRING,
                    "packages": array(STRING)})
BUILD_LOG = obj({"build_id": STRING, "log": STRING, "offset": COUNT, "state": BUILD_STATE})
CONSOLE = obj({"instance_id": STRING, "node": ADDRESS, "log": STRING})
METRICS = obj({"instance_id": STRING, "node": ADDRESS, "vm_state": STRING, "ip": nullable(STRING),
               "restarts": COUNT, "cpu_seconds": nullable(NUMBER), "rss_bytes": nullable(COUNT),
               "uptime_s": nullable(NUMBER)})
REPLICA_IPS = obj({"instance_id": STRING, "replicas": array(obj({
    "node": ADDRESS, "state": REPLICA_STATE, "ip": nullable(STRING), "reason": STRING, "node_alive": BOOLEAN}))})
NOT_HERE = {404: error_doc("no such instance, or no replica of it on this node (then `nodes` says where "
                           "its replicas are)", error_schema(nodes=array(obj({
                               "node": ADDRESS, "state": REPLICA_STATE, "api_url": nullable(STRING)}))))}
VM_DISABLED = {503: error_doc("this node runs no VMs (vm_disabled), or not yet: its VM side is starting "
                              "(vms_starting, a moment after the node starts: ask again)")}
# a refused build context: the limit it is over (pack/archive.py Limits; None when unsafe) and the entry
CONTEXT_REFUSAL = {"limit": nullable(STRING), "entry": nullable(STRING)}


# ---- builds -----------------------------------------------------------------------------------


def _not_building(runtime) -> ApiError | None:
    """Why this node takes no build now (None: it does). Asked from the request's head too
    (Endpoint.ready), so a node that cannot build reads no upload."""
    side = runtime.vms
    if isinstance(side, VmsStarting):  # a moment after the node starts: ask again shortly
        return ApiError(503, "vms_starting", f"this node's VM side is not up yet: {side.reason}; ask again "
                                             "in a few seconds (GET /health says when: vms.enabled)")
    if not isinstance(side, VmsOn):
        return ApiError(503, "vm_disabled", f"this node does not build images: {side.reason}")
    return None


def _builds(call: Call) -> BuildService:
    refused = _not_building(call.runtime)
    if refused is not None:
        raise refused
    return call.runtime.vms.builds


def _context_limit(builds) -> int:
    return getattr(getattr(builds, "builder", None), "context_limit", None) or CONTEXT_LIMIT


def _mib(n: int) -> str:
    for unit, size in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if n >= size:
            return f"{n // size} {unit}" if n % size == 0 else f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _decode_build_body(body: bytes, limit: int) -> tuple[str, bytes | None]:
    """(formfile text, context tar.gz or None) from the JSON body; ApiError when wrong."""
    doc = json_body(body)
    unknown = sorted(set(doc) - set(BUILD_SCHEMA["properties"]))
    if unknown:
        raise ApiError(400, "bad_field", f"unknown field {unknown[0]!r} (known: formfile, context)")
    formfile = doc.get("formfile")
    if not isinstance(formfile, str) or not formfile.strip():
        raise ApiError(400, "bad_field", "field 'formfile': is required, the Formfile's text")
    if len(formfile) > FORMFILE_LIMIT:
        raise ApiError(413, "too_large", f"field 'formfile': {len(formfile)} characters, the limit "
                                         f"is {FORMFILE_LIMIT}")
    raw = doc.get("context")
    if raw is None:
        return formfile, None
    if not isinstance(raw, str):
        raise ApiError(400, "bad_field", "field 'context': must be a string, a tar.gz in base64")
    if len(raw) > 4 * ((limit + 2) // 3) + 4:
        raise ApiError(413, "too_large", f"the build context is about {_mib(len(raw) * 3 // 4)} packed, "
                                         f"over this node's limit of {_mib(limit)}; leave big files "
                                         "out of the folder (build steps have no network: packages come from INSTALL)")
    try:
        context = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "bad_field", f"field 'context': not valid base64 ({exc})") from None
    if len(context) > limit:
        raise ApiError(413, "too_large", f"the build context is {_mib(len(context))} packed, over "
                                         f"this node's limit of {_mib(limit)}; leave big files out of "
                                         "the folder (build steps have no network: packages come from INSTALL)")
    return formfile, context


def _shown(status: dict) -> dict:
    """A build's status for its submitter: without the other owners' addresses."""
    return {k: v for k, v in status.items() if k != "owners"}


def _own_build(call: Call, builds) -> dict:
    bid = call.params["id"]
    status = builds.status(bid)
    if status is None or call.who not in (status.get("owners") or []):
        raise ApiError(404, "not_found", f"no build {bid} of yours on this node (builds are kept by "
                                         "the node they were submitted to)")
    return status


async def pack_build(call: Call):
    builds = _builds(call)
    formfile, context = await trio.to_thread.run_sync(_decode_build_body, call.body,
                                                      _context_limit(builds))
    try:
        # the context is checked (streaming, within pack/archive.py's limits) and unpacked in a
        # worker thread: the node answers others meanwhile, in memory that does not grow with it
        status = await builds.submit(formfile, context, call.who)
    except BuildRefused as exc:
        bad = exc.context_error
        if bad is not None:
            too_large = isinstance(bad, pack_context.ContextTooLarge)
            return {"error": "too_large" if too_large else "bad_context", "detail": bad.message,
                    "limit": bad.limit, "entry": bad.entry}, 413 if too_large else 400
        failure = exc.failure.to_dict()
        return {"error": "build_refused", "detail": failure.get("message") or str(exc),
                "failure": failure}, 400
    return _shown(status), 200 if status.get("state") == "done" else 202


async def pack_builds(call: Call):
    builds = _builds(call)
    mine = [_shown(s) for s in builds.list() if call.who in (s.get("owners") or [])]
    return {**paged("builds", mine, call.query), "total": len(mine)}, 200


async def pack_build_get(call: Call):
    return _shown(_own_build(call, _builds(call))), 200


def _read_log(path: Path | None, offset: int, complete: bool) -> tuple[str, int]:
    """Text of the log from byte `offset` (at most LOG_CHUNK) and the offset after it. While the
    build runs, only whole lines: the last one may still be being written."""
    if path is None:
        return "", offset
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read(LOG_CHUNK)
    except OSError:
        return "", offset
    if data and (not complete or len(data) == LOG_CHUNK) and not data.endswith(b"\n"):
        cut = data.rfind(b"\n")
        if cut >= 0:
            data = data[:cut + 1]
        elif len(data) < LOG_CHUNK:
            data = b""  # a line being written; the next call gets it whole
    return data.decode("utf-8", errors="replace"), offset + len(data)


async def pack_build_logs(call: Call):
    builds = _builds(call)
    status = _own_build(call, builds)
    offset = int_arg(call.query, "offset", 0, 0, 2**62)
    path = builds.log_path(status["build_id"])
    text, after = await trio.to_thread.run_sync(_read_log, path, offset, status["state"] in TERMINAL)
    return {"build_id": status["build_id"], "log": text, "offset": after, "state": status["state"]}, 200


# ---- instances --------------------------------------------------------------------------------


async def _where(call: Call, statuses: list[dict]) -> list[dict]:
    out = []
    for s in statuses:
        node = await call.runtime.astore.get("node", s["node"])
        out.append({"node": s["node"], "state": s["state"], "api_url": (node or {}).get("api_url")})
    return out


async def _not_here(call: Call, iid: str, what: str) -> tuple[dict, int]:
    """404 for a replica this node does not run, saying which nodes do."""
    hosts = await _where(call, await views.replica_statuses(call, iid))
    others = [h for h in hosts if h["node"] != call.runtime.address]
    mine = [h for h in hosts if h["node"] == call.runtime.address]
    if others:
        where = "; its replicas are on " + ", ".join(
            f"{h['node']} ({h['state']}" + (f", API {h['api_url']}" if h["api_url"] else "") + ")"
            for h in others) + ": ask that node's API"
    elif mine:
        where = f"; this node reports its replica {mine[0]['state']} but has no {what} of it"
    else:
        where = "; no node reports a replica of it yet"
    if isinstance(call.runtime.vms, VmsStarting):
        where += " (this node's VMs are starting: ask again shortly)"
    elif scheduler_of(call) is None:
        where += " (this node runs no VMs)"
    return {"error": "not_found", "detail": f"no replica of instance {iid} on this node{where}",
            "nodes": hosts}, 404


async def instance_logs(call: Call):
    iid = call.params["id"]
    await views.visible_or_404(call, "instance", iid)
    tail = int_arg(call.query, "tail", DEFAULT_TAIL, 1, MAX_TAIL)
    scheduler = scheduler_of(call)
    text = None if scheduler is None else scheduler.console_log(iid, tail)
    if text is None:
        return await _not_here(call, iid, "console")
    return {"instance_id": iid, "node": call.runtime.address, "log": text}, 200


async def instance_metrics(call: Call):
    iid = call.params["id"]
    await views.visible_or_404(call, "instance", iid)
    scheduler = scheduler_of(call)
    metrics = None if scheduler is None else await scheduler.metrics(iid)
    if metrics is None:
        return await _not_here(call, iid, "VM")
    return {"instance_id": iid, "node": call.runtime.address, **metrics}, 200


async def instance_ips(call: Call):
    iid = call.params["id"]
    await views.visible_or_404(call, "instance", iid)
    replicas = [{"node": s["node"], "state": s["state"], "ip": s.get("ip"), "reason": s.get("reason", ""),
                 "node_alive": s["node_alive"]} for s in await views.replica_statuses(call, iid)]
    return {"instance_id": iid, "replicas": replicas}, 200




# ---- the table --------------------------------------------------------------------------------


def endpoints() -> list[Endpoint]:
    return [
        Endpoint("POST", "/pack/build", "Build an image from a Formfile and a context (signed, one use)",
                 "required", pack_build, body=BUILD_SCHEMA, ok=202, tags=["pack"], write=True, answer=BUILD_STATUS,
                 max_body=MAX_UPLOAD, ready=_not_building,
                 responses={200: {"description": "already built (a cache hit)", "content": {
                     "application/json": {"schema": BUILD_STATUS}}},
                     400: error_doc("bad input, or the build is refused (build_refused: `failure` says where; "
                                    "bad_context: an unsafe or damaged context, `entry` says which)",
                                    error_schema(failure=BUILD_ERROR, **CONTEXT_REFUSAL)),
                     413: error_doc("the body, the Formfile or the context is over a limit (too_large; for "
                                    "the context, `limit` names it and `entry` where it was passed)",
                                    error_schema(**CONTEXT_REFUSAL)), **VM_DISABLED}),
        Endpoint("GET", "/pack/builds", "Your builds on this node", "required", pack_builds,
                 tags=["pack"], responses=VM_DISABLED, query=PAGING,
                 answer=page_schema("builds", BUILD_STATUS, total=COUNT)),
        Endpoint("GET", "/pack/builds/{id}", "One of your builds: state, step, error, image",
                 "required", pack_build_get, tags=["pack"], responses=VM_DISABLED, answer=BUILD_STATUS),
        Endpoint("GET", "/pack/builds/{id}/logs", "A build's log from a byte offset (1 MiB at most)",
                 "required", pack_build_logs, tags=["pack"], responses=VM_DISABLED,
                 query={"offset": {"type": "integer", "minimum": 0}}, answer=BUILD_LOG),
        Endpoint("GET", "/instance/{id}/logs", "The console of this node's replica of an instance",
                 "required", instance_logs, tags=["instances"], responses=NOT_HERE,
                 query={"tail": {"type": "integer", "minimum": 1, "maximum": MAX_TAIL}}, answer=CONSOLE),
        Endpoint("GET", "/instance/{id}/ips", "Each replica's node, state and IP address", "required",
                 instance_ips, tags=["instances"], answer=REPLICA_IPS),
        Endpoint("GET", "/instance/{id}/metrics", "This node's replica of an instance: VM state, CPU "
                 "seconds, memory, uptime, restarts", "required", instance_metrics, tags=["instances"],
                 responses=NOT_HERE, answer=METRICS),
    ]
