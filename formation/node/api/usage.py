"""Usage reports and the node's Prometheus figures (docs/economy.md).

    GET /instance/{id}/usage   signed: an instance's usage, per measuring node and in total,
                               for whoever may see the instance
    GET /account/usage         signed: the usage of each instance the signer owns, and the sum
    GET /agents/{id}/usage     signed, the agent's owner: the usage of the instances of its build
                               that serve its calls, and its calls as charged, per node
    GET /metrics               unsigned: this node's own figures, Prometheus text format

Reports are sums over the `usage` records in the state (crdt/kinds/usage_kinds.py), the same on
every node that holds the same records: only the rows of the fog's members count, and an
account's instances are those whose own record names it owner (never a usage row's copy).
There is no `?address=` for someone else's totals: usage says what an account runs and how
much it is called, and the API shows an account and its instances to that account only
(docs/api.md, "Visibility"); anyone may still sum the records of a state they hold.
"""

from __future__ import annotations

from quart import Response

from formation.crdt.kinds.usage_kinds import COUNTERS, by_instance, counted, total

from .. import exporter
from . import views
from .http import ApiError, Call, Endpoint
from .schemas import ADDRESS, COUNT, STRING, array, nullable, obj

MAX_ACCOUNT_INSTANCES = 10_000  # instances of one account a report sums
MAX_ROWS_PER_INSTANCE = 1_000  # measuring nodes of one instance

COUNTERS_SCHEMA = obj({c: COUNT for c in COUNTERS})
USAGE_ROW = obj({"node": ADDRESS, **{c: COUNT for c in COUNTERS}, "started_at": COUNT, "updated_at": COUNT})
INSTANCE_USAGE = obj({"instance_id": STRING, "owner": ADDRESS, "nodes": array(USAGE_ROW), "total": COUNTERS_SCHEMA})
ACCOUNT_USAGE = obj({"address": ADDRESS, "instances": array(obj({
    "instance_id": STRING, "name": nullable(STRING), "nodes": COUNT, **{c: COUNT for c in COUNTERS}})),
    "count": COUNT, "total": COUNTERS_SCHEMA})
METRICS_ANSWER = {200: {"description": "this node's figures in the Prometheus text format (0.0.4)",
                        "content": {"text/plain": {"schema": {"type": "string"}}}}}


def _row(r: dict) -> dict:
    return {"node": r["node"], **{c: r[c] for c in COUNTERS}, "started_at": r["started_at"],
            "updated_at": r["updated_at"]}


async def _members(call: Call) -> frozenset[str]:
    """The nodes whose usage rows count: the members of this node's fog (none before it joined)."""
    fog = call.runtime.fog_id
    return await call.runtime.astore.fog_members(fog) if fog else frozenset()


async def instance_usage(call: Call):
    inst = await views.visible_or_404(call, "instance", call.params["id"])
    iid = inst["instance_id"]
    rows = [r for r in await call.runtime.astore.list("usage", type=iid, limit=MAX_ROWS_PER_INSTANCE)
            if r["instance_id"] == iid]
    rows = sorted(counted(rows, await _members(call)), key=lambda r: r["node"])
    return {"instance_id": iid, "owner": inst["owner"], "nodes": [_row(r) for r in rows],
            "total": total(rows)}, 200


def _account_rows(store, who: str) -> tuple[list[dict], list[dict]]:
    """The instances `who` owns and their usage rows, in one visit of the store."""
    instances = store.list("instance", owner=who, limit=MAX_ACCOUNT_INSTANCES)
    rows = [r for i in instances
            for r in store.list("usage", type=i["instance_id"], limit=MAX_ROWS_PER_INSTANCE)
            if r["instance_id"] == i["instance_id"]]
    return instances, rows


async def account_usage(call: Call):
    asked = call.query.get("address")
    if asked is not None and asked.lower() != call.who:
        raise ApiError(403, "forbidden", "usage is shown to its own account only: sign the request with "
                                         "that account's key (or sum the `usage` records of your own state)")
    instances, rows = await call.runtime.astore.run(_account_rows, call.runtime.astore.store, call.who)
    members = await _members(call)
    rows = counted(rows, members)
    sums = by_instance(rows)
    measured = {r["instance_id"] for r in rows}
    nodes = {iid: sum(1 for r in rows if r["instance_id"] == iid) for iid in measured}
    out = [{"instance_id": i["instance_id"], "name": i.get("name"), "nodes": nodes.get(i["instance_id"], 0),
            **sums.get(i["instance_id"], dict.fromkeys(COUNTERS, 0))}
           for i in sorted(instances, key=lambda i: i["instance_id"])]
    return {"address": call.who, "instances": out, "count": len(out), "total": total(rows)}, 200


MAX_AGENT_CHARGES = 100_000  # charge records of one creator an agent report reads
CHARGE_COUNTERS = ("calls", "credits", "tokens_in", "tokens_out")
AGENT_USAGE = obj({
    "agent_id": STRING, "owner": ADDRESS, "build_id": nullable(STRING),
    "instances": array(obj({"instance_id": STRING, "name": nullable(STRING), "nodes": COUNT,
                            **{c: COUNT for c in COUNTERS}})),
    "total": COUNTERS_SCHEMA,
    "charged": obj({**{c: COUNT for c in CHARGE_COUNTERS}, "consumers": COUNT,
                    "nodes": array(obj({"node": ADDRESS, "host": ADDRESS, **{c: COUNT for c in CHARGE_COUNTERS}}))})})


def _agent_rows(store, agent: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """The instances that serve `agent` (its build, its owner's), their usage rows, and the
    charges of its calls, in one visit of the store."""
    build = agent.get("build_id")
    instances = [i for i in store.list("instance", type=build, limit=MAX_ACCOUNT_INSTANCES)
                 if i["owner"] == agent["owner"]] if build else []
    rows = [r for i in instances
            for r in store.list("usage", type=i["instance_id"], limit=MAX_ROWS_PER_INSTANCE)
            if r["instance_id"] == i["instance_id"]]
    charges = [c for c in store.list("charge", type=agent["owner"], limit=MAX_AGENT_CHARGES)
               if c["agent_id"] == agent["agent_id"] and c["creator"] == agent["owner"]]
    return instances, rows, charges


async def agent_usage(call: Call):
    agent = await views.visible_or_404(call, "agent", call.params["id"])
    if agent["owner"] != call.who:
        raise ApiError(403, "forbidden", f"an agent's usage is shown to its owner ({agent['owner']}) only: "
                                         "it tells who calls it and how often")
    instances, rows, charges = await call.runtime.astore.run(_agent_rows, call.runtime.astore.store, agent)
    members = await _members(call)
    rows = counted(rows, members)
    charges = [c for c in charges if c["node"] in members]
    sums = by_instance(rows)
    out = [{"instance_id": i["instance_id"], "name": i.get("name"),
            "nodes": sum(1 for r in rows if r["instance_id"] == i["instance_id"]),
            **sums.get(i["instance_id"], dict.fromkeys(COUNTERS, 0))}
           for i in sorted(instances, key=lambda i: i["instance_id"])]
    by_node: dict[tuple[str, str], dict] = {}
    for c in charges:
        row = by_node.setdefault((c["node"], c["host"]), {"node": c["node"], "host": c["host"],
                                                          **dict.fromkeys(CHARGE_COUNTERS, 0)})
        for k in CHARGE_COUNTERS:
            row[k] += c[k]
    charged = {k: sum(c[k] for c in charges) for k in CHARGE_COUNTERS}
    return {"agent_id": agent["agent_id"], "owner": agent["owner"], "build_id": agent.get("build_id"),
            "instances": out, "total": total(rows),
            "charged": {**charged, "consumers": len({c["consumer"] for c in charges}),
                        "nodes": [by_node[k] for k in sorted(by_node)]}}, 200


async def metrics(call: Call):
    return Response(await exporter.scrape(call.runtime), status=200, content_type=exporter.CONTENT_TYPE), 200


def endpoints() -> list[Endpoint]:
    return [
        Endpoint("GET", "/instance/{id}/usage", "An instance's usage: each measuring node's cumulative "
                 "counters and their total", "required", instance_usage, tags=["usage"], answer=INSTANCE_USAGE),
        Endpoint("GET", "/account/usage", "The usage of each instance you own, and their total", "required",
                 account_usage, tags=["usage"], query={"address": {"type": "string"}}, answer=ACCOUNT_USAGE),
        Endpoint("GET", "/agents/{id}/usage", "An agent's usage (its owner only): the usage of the instances "
                 "of its build, and its calls as charged, per charging node and host", "required", agent_usage,
                 tags=["usage"], answer=AGENT_USAGE),
        Endpoint("GET", "/metrics", "This node's figures for Prometheus (text format): ops, peers, gossip "
                 "and sync, VMs, builds, hires, usage records, DNS queries", "none", metrics, tags=["node"],
                 answer={"type": "string"}, responses=METRICS_ANSWER),
    ]
