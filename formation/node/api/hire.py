"""Calling an agent: POST /agents/{id}/hire (and the original README's POST /agents/{id}/run_task)
sends the body to a running replica of the agent's build (this node's first) and streams the
agent's answer back as it gave it, status included.

Who may send traffic to a VM (docs/api.md, "Hiring"): a hire is using the agent, so the caller
needs the level that may use it, `operator` (read_only may read a private agent's record, not
call it; a public agent is for everyone); and only the instances on which the agent's owner
holds `operator` or more count, so neither naming someone else's build nor a read_only grant
on their instance reaches their VMs. A replica whose node stopped sending heartbeats is not
tried. The node's own refusals are {error, detail}: 403 not allowed, 404 no such agent, 409
no_build, 503 no_replica, 502 agent_unreachable.

run_task is the same call. Its id may also be, as the README says, "the buildId (the name you
provided during instance creation)" with no agent registered: then the call goes to the
caller's own instances of that name or build (those they may operate, the same level), to the
first port their Formfile EXPOSEs, at path "/" (an agent record chooses another port and path).

Each call a replica answers is metered for its instance (node/metering.py, docs/economy.md): one
hire, its duration to the answer's end, and the tokens the agent reports in its answer's
`X-Formation-Tokens: in=<n>,out=<n>` header.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

import httpx
import trio
from quart import Response

from formation.crdt.credits import Price
from formation.crdt.kinds.owned import LEVELS, level_of
from formation.dns.names import counts
from formation.pack.formfile import exposed_ports

from ..charging import InsufficientCredits, NotNamed, Replayed
from ..metering import TOKENS_HEADER, parse_tokens
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
HIRE_LEVEL = views.HIRE_LEVEL
HIRE_SCHEMA = {"description": "any JSON: passed to the agent as it is"}
# a hire's answer is the agent's, whatever its status; the node's own refusals are {error, detail}
AGENT_ANSWER = {"content": {"*/*": {"schema": {}}}}
HIRE_RESPONSES = {
    200: {"description": "the agent's answer, as it gave it", **AGENT_ANSWER},
    "default": {"description": "the agent's answer with its own status", **AGENT_ANSWER},
    **{code: {"description": f"{why} ({{error, detail}}), or the agent's own answer with this status",
              **AGENT_ANSWER}
       for code, why in ((400, "the node refused the body"), (401, "a signature check failed"),
                         (402, "the caller's credits do not cover the agent's price (insufficient_credits)"),
                         (403, "not allowed"), (404, "no such agent"), (409, "the agent has no build_id"),
                         (413, "the body is too large"), (422, "not applicable"),
                         (502, "the agent did not answer (agent_unreachable)"),
                         (503, "no running replica (no_replica)"))},
}


@dataclass(frozen=True)
class Callee:
    """Where a call goes: the instances whose running replicas may answer, the port (None: each
    instance's first EXPOSEd port) and path, and how to name it in answers and headers."""

    label: str  # "agent <id>", or "your instances named <name>"
    instances: list[dict]
    port: int | None
    path: str
    agent_id: str  # the X-Formation-Agent header ("" when no agent record is called)
    price: Price | None = None  # what a call costs the caller (the agent's prices); None: free
    creator: str = ""  # who is paid for it: the agent's owner
    plans: dict | None = None  # the agent's plans (name -> price_credits, calls, days)


async def _agent_callee(call: Call, agent: dict) -> Callee:
    """An agent the caller may call, with the instances of its build that its owner may operate:
    naming someone else's build must not reach their VMs."""
    aid = agent["agent_id"]
    if agent.get("is_private") and level_of(agent, call.who) < LEVELS[HIRE_LEVEL]:
        raise ApiError(403, "forbidden", f"hiring private agent {aid} needs level {HIRE_LEVEL} on it; "
                                         f"{call.who} may only read it")
    if not agent.get("build_id"):
        raise ApiError(409, "no_build", f"agent {aid} has no build_id: its owner sets it to the build "
                                        "its instances run (PUT /agents/{id} with build_id)")
    build = agent["build_id"]
    instances = [i for i in await call.runtime.astore.list("instance", type=build, limit=1000)
                 if level_of(i, agent["owner"]) >= LEVELS[HIRE_LEVEL]]
    if not instances:
        raise ApiError(503, "no_replica", f"no instance runs build {build} of agent {aid} "
                                          f"that the agent's owner may operate (level {HIRE_LEVEL} or more); "
                                          "its owner deploys one with `form pack ship`")
    return Callee(f"agent {aid} (build {build})", instances, agent["port"], agent["path"], aid,
                  Price(agent), agent["owner"], agent.get("plans") or None)


async def _visible_agent(call: Call, aid: str) -> dict | None:
    agent = await call.runtime.astore.get("agent", aid)
    if agent is None or not views.visible("agent", agent, call.who):
        return None
    why = await call.runtime.astore.over_quota("agent", aid)
    if why:  # inert everywhere (crdt/quotas.py): it is not hired, and its owner is told why
        raise ApiError(409, "over_quota", f"agent {aid} is over its creator's quota and takes no calls: {why}")
    return agent


async def _targets(call: Call, callee: Callee) -> list[tuple[dict, str, int]]:
    """(status, ip, port) of the callee's running replicas that are not unhealthy (names.counts,
    the DNS's rule), this node's first."""
    running: list[tuple[dict, str, int]] = []
    states: list[str] = []
    scheduler = scheduler_of(call)
    subnets = await call.runtime.vm_subnets()
    for inst in callee.instances:
        exposed = exposed_ports(inst.get("formfile"))
        port = callee.port if callee.port is not None else (exposed[0] if exposed else None)
        if port is None:
            states.append(f"{inst['instance_id']}: its Formfile EXPOSEs no port to send the call to")
            continue
        if port not in exposed:
            states.append(f"{inst['instance_id']}: its Formfile does not EXPOSE port {port}, "
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
            running.append((s, ip, port))
    if not running:
        raise ApiError(503, "no_replica", f"no running replica of {callee.label}: " + "; ".join(states))
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
    agent = await _visible_agent(call, aid)
    if agent is None:
        raise ApiError(404, "not_found", f"no agent {aid}")
    return await _call(call, await _agent_callee(call, agent))


async def run_task(call: Call):
    """The README's POST /agents/{id}/run_task: the hire of agent {id}; or, with no agent {id} the
    caller may see, a call to the caller's own instances named (or built as) {id}."""
    aid = call.params["id"]
    agent = await _visible_agent(call, aid)
    if agent is not None:
        return await _call(call, await _agent_callee(call, agent))
    mine = [i for i in await views.visible_rows(call, "instance", type=aid) + await views.instances_named(call, aid)
            if level_of(i, call.who) >= LEVELS[HIRE_LEVEL]]
    instances = list({i["instance_id"]: i for i in mine}.values())
    if not instances:
        raise ApiError(404, "not_found", f"no agent {aid}, and no instance named or built as {aid} that you "
                                         f"may operate (level {HIRE_LEVEL} or more): register an agent with "
                                         "`form agent register` (POST /agents) or deploy an instance with "
                                         "`form pack ship` (POST /instance/create)")
    return await _call(call, Callee(f"your instances named {aid}", instances, None, "/", ""))


async def _call(call: Call, callee: Callee):
    """Send the caller's body to the callee's first running replica that takes a connection;
    stream its answer back as it gave it."""
    # any JSON the agent takes (not a record: no text policy), but parsed safely
    json_body(call.body, object_only=False, max_depth=HIRE_MAX_DEPTH, plain_text=False)
    targets = await _targets(call, callee)
    admission = await _admit(call, callee) if callee.price or callee.plans else None
    try:
        return await _send(call, callee, targets, admission)
    finally:
        if admission is not None:
            await call.runtime.charger.release(admission)  # no-op once settled


async def _admit(call: Call, callee: Callee):
    try:
        return await call.runtime.charger.admit(call.who, callee.agent_id, callee.creator, callee.price,
                                                plans_only=bool(callee.plans) and not callee.price,
                                                signature=call.signed.signature, named=call.query.get("node"))
    except (Replayed, NotNamed) as exc:
        raise views.one_use_refusal(exc, call.runtime.address) from None
    except InsufficientCredits as exc:
        plans = ("; or buy a plan of it through this node (`form agent subscribe " + callee.agent_id + " PLAN`, "
                 "POST /agents/ID/subscribe): " + ", ".join(
                     f"{name}: {p['calls']} calls in {p['days']} days for {p['price_credits']} credits"
                     for name, p in sorted(callee.plans.items()))) if callee.plans else ""
        if not callee.price:
            raise ApiError(402, "plan_required", f"{callee.label} is sold by plan only, and {call.who} has no "
                           f"calls left of a plan bought through this node ({call.runtime.address})" + plans,
                           extra={"plans": callee.plans}) from None
        where = (f"; {sum(exc.elsewhere.values())} more are held at other nodes ("
                 + ", ".join(f"{n}: {c}" for n, c in sorted(exc.elsewhere.items()))
                 + "): a node spends only what it holds; move them here with `form account move "
                 "AMOUNT --from NODE` (POST /credits/move) or call through that node") if exc.elsewhere else ""
        raise ApiError(402, "insufficient_credits",
                       f"a call of {callee.label} holds {exc.price} credits and {call.who} has {exc.available} "
                       f"available at this node ({call.runtime.address}){where}; see `form account credits` "
                       "(GET /account/credits); credits come from a grant by the fog's treasury "
                       "(`form account grant` with its key)" + plans,
                       extra={"balance": exc.balance, "available": exc.available, "price": exc.price,
                              "elsewhere": exc.elsewhere}) from None


async def _send(call: Call, callee: Callee, targets, admission):
    deadline = trio.current_time() + HIRE_TIMEOUT
    client = httpx.AsyncClient(timeout=httpx.Timeout(HIRE_TIMEOUT, connect=HIRE_CONNECT_TIMEOUT))
    headers = {"Content-Type": call.headers.get("Content-Type") or "application/json",
               "X-Formation-Caller": call.who or ""}
    if callee.agent_id:
        headers["X-Formation-Agent"] = callee.agent_id
    failures = []
    resp = None
    served_by = served = ""
    sent_at = 0.0
    try:
        for target, ip, port in targets:
            served_by, served = target["node"], target["instance_id"]
            url = _url(ip, port, callee.path)
            req = client.build_request("POST", url, content=call.body, headers=headers)
            sent_at = trio.current_time()
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
        raise ApiError(502, "agent_unreachable", f"{callee.label} did not answer: " + "; ".join(failures))
    if admission is not None:
        if resp.status_code < 500:  # answered: charged (an agent's own failure is not)
            try:
                await call.runtime.charger.settle(admission, served_by,
                                                  parse_tokens(resp.headers.get(TOKENS_HEADER)))
            except BaseException:
                with trio.CancelScope(shield=True):
                    await resp.aclose()
                    await client.aclose()
                raise
        else:
            await call.runtime.charger.release(admission)

    async def relay():
        try:
            async for chunk in resp.aiter_bytes():
                yield chunk
                if trio.current_time() > deadline:
                    log.warning("call of %s: answer cut after %g s", callee.label, HIRE_TIMEOUT)
                    break
        except httpx.HTTPError as exc:
            log.warning("call of %s: the answer broke off: %s", callee.label, exc)
        finally:
            # metered (metering.py): one call of the instance that answered, its duration and the
            # tokens the agent reported (an absent or malformed header counts none)
            call.runtime.hires.record(served, round(1000 * (trio.current_time() - sent_at)),
                                      parse_tokens(resp.headers.get(TOKENS_HEADER)))
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
        Endpoint("POST", "/agents/{id}/run_task", "The original README's call of an agent: the hire of "
                 "agent {id}, or (no such agent) a call to your own instances named or built as {id}, on "
                 "their first EXPOSEd port at /", "required", run_task, body=HIRE_SCHEMA, tags=["agents"],
                 answer={}, responses=HIRE_RESPONSES, max_body=HIRE_MAX_BODY),
    ]
