"""Workload endpoints: image builds, a replica's console and addresses, hiring an agent.

    POST /pack/build               signed, one use: queue a build (Formfile + base64 tar.gz context)
    GET  /pack/builds[/{id}]       signed: your builds (a build you did not submit is a 404)
    GET  /pack/builds/{id}/logs    signed: the build log from a byte offset, 1 MiB at a time
    GET  /instance/{id}/logs       signed: the console of this node's replica of an instance
    GET  /instance/{id}/ips        signed: every replica's node, state and IP address
    POST /agents/{id}/hire         signed: the body goes to a running replica of the agent's build

Builds and consoles belong to the node's VM side (`runtime.builds`, `runtime.scheduler`); a node
that runs no VMs answers the build endpoints with 503 vm_disabled and has no replica to show.
Build status and logs live on the node that ran the build: ask the node you submitted to.
"""

from __future__ import annotations

import base64
import binascii
import logging
from pathlib import Path

import httpx
import trio
from quart import Response, request

from formation.crdt.kinds.owned import level_of
from formation.node.builds import BuildRefused
from formation.pack import context as pack_context

from . import views
from .app import ApiError, Call, Endpoint, _int_arg, _visible_or_404, json_body, replica_statuses
from .schemas import ERROR_SCHEMA

log = logging.getLogger("formation.api")

CONTEXT_LIMIT = pack_context.DEFAULT_LIMIT  # bytes of the packed context (tar.gz) a node takes
FORMFILE_LIMIT = 256 * 1024  # characters of Formfile text
# The largest POST /pack/build: the context in base64 (4 bytes per 3) plus the Formfile in JSON
# (at most 6 bytes per character when every one is escaped) and a little for the braces.
MAX_UPLOAD = 4 * ((CONTEXT_LIMIT + 2) // 3) + 6 * FORMFILE_LIMIT + 1024
LOG_CHUNK = 1024 * 1024  # bytes of a build log per answer
DEFAULT_TAIL = 64 * 1024  # bytes of a console per answer, unless ?tail= says otherwise
MAX_TAIL = 8 * 1024 * 1024
HIRE_TIMEOUT = 300.0  # seconds for the agent's whole answer
HIRE_MAX_DEPTH = 64  # nesting of a hire payload (parsed without recursion limits of its own)
HIRE_CONNECT_TIMEOUT = 10.0
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
HIRE_SCHEMA = {"description": "any JSON: passed to the agent as it is"}


def _error_doc(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": ERROR_SCHEMA}}}


VM_DISABLED = {503: _error_doc("this node runs no VMs (vm_disabled)")}


# ---- builds -----------------------------------------------------------------------------------


def _builds(call: Call):
    builds = getattr(call.runtime, "builds", None)
    if builds is None:
        reason = getattr(call.runtime, "vm_disabled_reason", "") or "this node runs no VMs"
        raise ApiError(503, "vm_disabled", f"this node does not build images: {reason}")
    return builds


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
        status = await builds.submit(formfile, context, call.who)
    except BuildRefused as exc:
        failure = exc.failure.to_dict()
        return {"error": "build_refused", "detail": failure.get("message") or str(exc),
                "failure": failure}, 400
    return _shown(status), 200 if status.get("state") == "done" else 202


async def pack_builds(call: Call):
    builds = _builds(call)
    mine = [_shown(s) for s in builds.list() if call.who in (s.get("owners") or [])]
    limit, offset = _int_arg(request.args, "limit", 100, 1, 1000), _int_arg(request.args, "offset", 0, 0, 10**9)
    items = mine[offset:offset + limit]
    return {"builds": items, "count": len(items), "total": len(mine), "limit": limit, "offset": offset}, 200


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
    offset = _int_arg(request.args, "offset", 0, 0, 2**62)
    path = builds.log_path(status["build_id"])
    text, after = await trio.to_thread.run_sync(_read_log, path, offset, status["state"] in TERMINAL)
    return {"build_id": status["build_id"], "log": text, "offset": after, "state": status["state"]}, 200


# ---- instances --------------------------------------------------------------------------------


async def _statuses(call: Call, instance_id: str) -> list[dict]:
    return await replica_statuses(call, instance_id)


async def _where(call: Call, statuses: list[dict]) -> list[dict]:
    out = []
    for s in statuses:
        node = await call.runtime.astore.get("node", s["node"])
        out.append({"node": s["node"], "state": s["state"], "api_url": (node or {}).get("api_url")})
    return out


async def _not_here(call: Call, iid: str, what: str) -> tuple[dict, int]:
    """404 for a replica this node does not run, saying which nodes do."""
    hosts = await _where(call, await _statuses(call, iid))
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
    if getattr(call.runtime, "scheduler", None) is None:
        where += " (this node runs no VMs)"
    return {"error": "not_found", "detail": f"no replica of instance {iid} on this node{where}",
            "nodes": hosts}, 404


async def instance_logs(call: Call):
    iid = call.params["id"]
    await _visible_or_404(call, "instance", iid)
    tail = _int_arg(request.args, "tail", DEFAULT_TAIL, 1, MAX_TAIL)
    scheduler = getattr(call.runtime, "scheduler", None)
    text = None if scheduler is None else scheduler.console_log(iid, tail)
    if text is None:
        return await _not_here(call, iid, "console")
    return {"instance_id": iid, "node": call.runtime.address, "log": text}, 200


async def instance_metrics(call: Call):
    iid = call.params["id"]
    await _visible_or_404(call, "instance", iid)
    scheduler = getattr(call.runtime, "scheduler", None)
    metrics = None if scheduler is None else await scheduler.metrics(iid)
    if metrics is None:
        return await _not_here(call, iid, "VM")
    return {"instance_id": iid, "node": call.runtime.address, **metrics}, 200


async def instance_ips(call: Call):
    iid = call.params["id"]
    await _visible_or_404(call, "instance", iid)
    replicas = [{"node": s["node"], "state": s["state"], "ip": s.get("ip"), "reason": s.get("reason", ""),
                 "node_alive": s["node_alive"]} for s in await _statuses(call, iid)]
    return {"instance_id": iid, "replicas": replicas}, 200


# ---- hire -------------------------------------------------------------------------------------


async def _targets(call: Call, agent: dict) -> list[tuple[dict, str]]:
    """(status, ip) of the running replicas of the agent's build, this node's first. Only the
    instances its owner may act on count: naming someone else's build must not reach their VMs."""
    build = agent["build_id"]
    instances = [i for i in await call.runtime.astore.list("instance", type=build, limit=1000)
                 if level_of(i, agent["owner"]) > 0]
    if not instances:
        raise ApiError(503, "no_replica", f"no instance runs build {build} of agent {agent['agent_id']}; "
                                          "its owner deploys one with `form pack ship`")
    running: list[tuple[dict, str]] = []
    states: list[str] = []
    scheduler = getattr(call.runtime, "scheduler", None)
    for inst in instances:
        statuses = await _statuses(call, inst["instance_id"])
        states += [f"{inst['instance_id']}@{s['node']}: {s['state']}" + (f" ({s['reason']})" if s.get("reason") else "")
                   + ("" if s["node_alive"] else " [its node stopped sending heartbeats]") for s in statuses]
        if not statuses:
            states.append(f"{inst['instance_id']}: no replica reported yet (desired {inst['desired_state']})")
        for s in statuses:
            if s["state"] != "running" or not s["node_alive"]:
                continue
            ip = s.get("ip")
            if s["node"] == call.runtime.address and scheduler is not None:
                ip = scheduler.local_ip(inst["instance_id"]) or ip
            if ip:
                running.append((s, ip))
    if not running:
        raise ApiError(503, "no_replica", f"no running replica of agent {agent['agent_id']} (build "
                                          f"{build}): " + "; ".join(states))
    running.sort(key=lambda t: t[0]["node"] != call.runtime.address)
    return running


def _url(ip: str, port: int, path: str) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}{path}"


async def agent_hire(call: Call):
    aid = call.params["id"]
    agent = await call.runtime.astore.get("agent", aid)
    if agent is None or not views.visible("agent", agent, call.who):
        raise ApiError(404, "not_found", f"no agent {aid}")
    if not agent.get("build_id"):
        raise ApiError(409, "no_build", f"agent {aid} has no build_id: its owner sets it to the build "
                                        "its instances run (PUT /agents/{id} with build_id)")
    # any JSON the agent takes (not a record: no text policy), but parsed safely
    json_body(call.body, object_only=False, max_depth=HIRE_MAX_DEPTH, plain_text=False)
    targets = await _targets(call, agent)
    deadline = trio.current_time() + HIRE_TIMEOUT
    client = httpx.AsyncClient(timeout=httpx.Timeout(HIRE_TIMEOUT, connect=HIRE_CONNECT_TIMEOUT))
    headers = {"Content-Type": request.headers.get("Content-Type") or "application/json",
               "X-Formation-Agent": aid, "X-Formation-Caller": call.who or ""}
    failures = []
    resp = None
    served_by = ""
    try:
        for target, ip in targets:
            served_by = target["node"]
            url = _url(ip, agent["port"], agent["path"])
            req = client.build_request("POST", url, content=call.body, headers=headers)
            try:
                with trio.fail_after(max(0.0, deadline - trio.current_time())):
                    resp = await client.send(req, stream=True)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failures.append(f"{url} (node {served_by}): {_why(exc)}")
            except trio.TooSlowError:
                failures.append(f"{url}: no answer within {HIRE_TIMEOUT:g} s")
                break
            except httpx.HTTPError as exc:
                failures.append(f"{url}: {_why(exc)}")
                break
    finally:
        if resp is None:
            await client.aclose()
    if resp is None:
        raise ApiError(502, "agent_unreachable", f"agent {aid} did not answer: " + "; ".join(failures))

    async def relay():
        try:
            async for chunk in resp.aiter_bytes():
                yield chunk
                if trio.current_time() > deadline:
                    log.warning("hire of agent %s: answer cut after %g s", aid, HIRE_TIMEOUT)
                    break
        except httpx.HTTPError as exc:
            log.warning("hire of agent %s: the answer broke off: %s", aid, exc)
        finally:
            with trio.CancelScope(shield=True):
                await resp.aclose()
                await client.aclose()

    out = Response(relay(), status=resp.status_code,
                   content_type=resp.headers.get("content-type", "application/octet-stream"))
    out.headers["X-Formation-Replica"] = served_by
    return out, resp.status_code


def _why(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


# ---- the table --------------------------------------------------------------------------------


def endpoints() -> list[Endpoint]:
    return [
        Endpoint("POST", "/pack/build", "Build an image from a Formfile and a context (signed, one use)",
                 "required", pack_build, body=BUILD_SCHEMA, ok=202, tags=["pack"], write=True,
                 responses={200: {"description": "already built (a cache hit)", "content": {
                     "application/json": {"schema": {"type": "object"}}}}, **VM_DISABLED}),
        Endpoint("GET", "/pack/builds", "Your builds on this node", "required", pack_builds,
                 tags=["pack"], responses=VM_DISABLED,
                 query={"limit": {"type": "integer", "minimum": 1, "maximum": 1000},
                        "offset": {"type": "integer", "minimum": 0}}),
        Endpoint("GET", "/pack/builds/{id}", "One of your builds: state, step, error, image",
                 "required", pack_build_get, tags=["pack"], responses=VM_DISABLED),
        Endpoint("GET", "/pack/builds/{id}/logs", "A build's log from a byte offset (1 MiB at most)",
                 "required", pack_build_logs, tags=["pack"], responses=VM_DISABLED,
                 query={"offset": {"type": "integer", "minimum": 0}}),
        Endpoint("GET", "/instance/{id}/logs", "The console of this node's replica of an instance",
                 "required", instance_logs, tags=["instances"],
                 query={"tail": {"type": "integer", "minimum": 1, "maximum": MAX_TAIL}}),
        Endpoint("GET", "/instance/{id}/ips", "Each replica's node, state and IP address", "required",
                 instance_ips, tags=["instances"]),
        Endpoint("GET", "/instance/{id}/metrics", "This node's replica of an instance: VM state, CPU "
                 "seconds, memory, uptime, restarts", "required", instance_metrics, tags=["instances"]),
        Endpoint("POST", "/agents/{id}/hire", "Call an agent: the body goes to a running replica, "
                 "its answer comes back", "required", agent_hire, body=HIRE_SCHEMA, tags=["agents"],
                 responses={200: {"description": "the agent's answer, as it gave it",
                                  "content": {"*/*": {"schema": {}}}},
                            502: _error_doc("the agent did not answer (agent_unreachable)"),
                            503: _error_doc("no running replica (no_replica)")}),
    ]
