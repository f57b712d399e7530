"""Hiring an agent: POST /agents/{id}/hire sends the body to a running replica of the agent's
build (this node's first) and streams the agent's answer back as it gave it, status included.

Who may send traffic to a VM (docs/api.md, "Hiring"): a hire is using the agent, so the caller
needs the level that may use it, `operator` (read_only may read a private agent's record, not
call it; a public agent is for everyone); and only the instances on which the agent's owner
holds `operator` or more count, so neither naming someone else's build nor a read_only grant
on their instance reaches their VMs. A replica whose node stopped sending heartbeats is not
tried. The node's own refusals are {error, detail}: 403 not allowed, 404 no such agent, 409
no_build, 503 no_replica, 502 agent_unreachable.
"""

from __future__ import annotations

import ipaddress
import logging

import httpx
import trio
from quart import Response

from formation.crdt.kinds.owned import LEVELS, level_of
from formation.dns.names import counts
from formation.pack.formfile import exposed_ports

from . import views
from .http import ApiError, Call, Endpoint, json_body
from .views import scheduler_of

log = logging.getLogger("formation.api")

HIRE_TIMEOUT = 300.0  # seconds for the agent's whole answer
HIRE_MAX_DEPTH = 64  # nesting of a hire payload (parsed without recursion limits of its own)
HIRE_CONNECT_TIMEOUT = 10.0
HIRE_MAX_BODY = 1024 * 1024  # bytes of a hire's payload
# the level that may use an agent (hire it) and send traffic to an instance's VM: operator is
# the level that may run the instance (start, stop); read_only only reads records
HIRE_LEVEL = "operator"
HIRE_SCHEMA = {"description": "any JSON: passed to the agent as it is"}
# a hire's answer is the agent's, whatever its status; the node's own refusals are {error, detail}
AGENT_ANSWER = {"content": {"*/*": {"schema": {}}}}
HIRE_RESPONSES = {
    200: {"description": "the agent's answer, as it gave it", **AGENT_ANSWER},
    "default": {"description": "the agent's answer with its own status", **AGENT_ANSWER},
    **{code: {"description": f"{why} ({{error, detail}}), or the agent's own answer with this status",
              **AGENT_ANSWER}
       for code, why in ((400, "the node refused the body"), (401, "a signature check failed"),
                         (403, "not allowed"), (404, "no such agent"), (409, "the agent has no build_id"),
                         (413, "the body is too large"), (422, "not applicable"),
                         (502, "the agent did not answer (agent_unreachable)"),
                         (503, "no running replica (no_replica)"))},
}


async def _targets(call: Call, agent: dict) -> list[tuple[dict, str]]:
    """(status, ip) of the running replicas of the agent's build that are not unhealthy
    (names.counts, the DNS's rule), this node's first. Only the
    instances its owner may act on count: naming someone else's build must not reach their VMs."""
    build = agent["build_id"]
    instances = [i for i in await call.runtime.astore.list("instance", type=build, limit=1000)
                 if level_of(i, agent["owner"]) >= LEVELS[HIRE_LEVEL]]
    if not instances:
        raise ApiError(503, "no_replica", f"no instance runs build {build} of agent {agent['agent_id']} "
                                          f"that the agent's owner may operate (level {HIRE_LEVEL} or more); "
                                          "its owner deploys one with `form pack ship`")
    running: list[tuple[dict, str]] = []
    states: list[str] = []
    scheduler = scheduler_of(call)
    subnets = await call.runtime.vm_subnets()
    for inst in instances:
        if agent["port"] not in exposed_ports(inst.get("formfile")):
            states.append(f"{inst['instance_id']}: its Formfile does not EXPOSE port {agent['port']}, "
                          "the agent's port")
            continue
        statuses = await views.replica_statuses(call, inst["instance_id"])
        states += [f"{inst['instance_id']}@{s['node']}: {s['state']}" + (f" ({s['reason']})" if s.get("reason") else "")
                   + (" [unhealthy: its node's probe fails]" if s.get("health") == "unhealthy" else "")
                   + ("" if s["node_alive"] else " [its node stopped sending heartbeats]") for s in statuses]
        if not statuses:
            states.append(f"{inst['instance_id']}: no replica reported yet (desired {inst['desired_state']})")
        for s in statuses:
            if not counts(s) or not s["node_alive"]:
                continue
            ip = s.get("ip")
            if s["node"] == call.runtime.address and scheduler is not None:
                ip = scheduler.local_ip(inst["instance_id"]) or ip
            why = _not_a_replica_address(ip, subnets.get(s["node"]))
            if why:
                states.append(f"{inst['instance_id']}@{s['node']}: {why}")
                continue
            running.append((s, ip))
    if not running:
        raise ApiError(503, "no_replica", f"no running replica of agent {agent['agent_id']} (build "
                                          f"{build}): " + "; ".join(states))
    running.sort(key=lambda t: t[0]["node"] != call.runtime.address)
    return running


def _not_a_replica_address(ip: str | None, subnet: str | None) -> str:
    """Why a reported replica address is not one to send a hire to ("" when it is): it must be a
    VM address in the subnet allocated to its node, never the node itself (its gateway), loopback
    or anything else a node could name to turn the relay against its own host."""
    if not ip:
        return "no address reported"
    if subnet is None:
        return "its node has no VM subnet this node routes to (formnet)"
    try:
        addr, net = ipaddress.ip_address(ip), ipaddress.ip_network(subnet)
    except ValueError:
        return f"reported address {ip!r} is not an IP address"
    if addr not in net or addr in (net.network_address, net.broadcast_address, net.network_address + 1):
        return f"reported address {ip} is not a VM address of its node ({subnet})"
    return ""


def _url(ip: str, port: int, path: str) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}{path}"


async def agent_hire(call: Call):
    aid = call.params["id"]
    agent = await call.runtime.astore.get("agent", aid)
    if agent is None or not views.visible("agent", agent, call.who):
        raise ApiError(404, "not_found", f"no agent {aid}")
    if agent.get("is_private") and level_of(agent, call.who) < LEVELS[HIRE_LEVEL]:
        raise ApiError(403, "forbidden", f"hiring private agent {aid} needs level {HIRE_LEVEL} on it; "
                                         f"{call.who} may only read it")
    if not agent.get("build_id"):
        raise ApiError(409, "no_build", f"agent {aid} has no build_id: its owner sets it to the build "
                                        "its instances run (PUT /agents/{id} with build_id)")
    # any JSON the agent takes (not a record: no text policy), but parsed safely
    json_body(call.body, object_only=False, max_depth=HIRE_MAX_DEPTH, plain_text=False)
    targets = await _targets(call, agent)
    deadline = trio.current_time() + HIRE_TIMEOUT
    client = httpx.AsyncClient(timeout=httpx.Timeout(HIRE_TIMEOUT, connect=HIRE_CONNECT_TIMEOUT))
    headers = {"Content-Type": call.headers.get("Content-Type") or "application/json",
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


def endpoints() -> list[Endpoint]:
    return [
        Endpoint("POST", "/agents/{id}/hire", "Call an agent: the body goes to a running replica, "
                 "its answer comes back", "required", agent_hire, body=HIRE_SCHEMA, tags=["agents"],
                 answer={}, responses=HIRE_RESPONSES, max_body=HIRE_MAX_BODY),
    ]
