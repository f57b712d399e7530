"""The node's own figures for Prometheus (GET /metrics, docs/economy.md): ops, peers, gossip and
sync, VMs, builds, hires, usage records and DNS queries.

Read at scrape time from the counters the parts already keep (the p2p service's stats, the
replica's rejections, the scheduler's replicas, the build service's statuses, the hire ledger,
the meter, the DNS server's stats), into a registry made for the one scrape: no global registry,
so nodes in one process (tests, `form dev fog`) never share a figure. Cheap like /health: the
store's sizes are read without its lock (`status(full=False)`), the build statuses in a worker
thread. Unauthenticated: nothing here names an account or an instance.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from formation.crdt.kinds.node_kinds import STATES

from .ports import ApiNode
from .vmside import VmsOn

if TYPE_CHECKING:
    from .dnsview import DnsView
    from .metering import Meter

log = logging.getLogger("formation.metrics")

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the text format every Prometheus server reads
BUILD_STATES = ("queued", "building", "done", "failed")
DNS_RESULTS = ("answered", "forwarded", "refused", "servfail", "formerr", "truncated")
DNS_DROPS = {"malformed": "dropped", "rate_limited": "rate_limited", "tcp_refused": "tcp_refused"}


class MetricsNode(ApiNode, Protocol):
    meter: Meter
    dns_view: DnsView | None


async def snapshot(node: MetricsNode) -> dict:
    """Every figure, read now: plain numbers (no lock held for long, nothing written)."""
    st = await node.status(full=False)
    side = node.vms
    vm_states: Counter[str] = Counter()
    builds: Counter[str] = Counter()
    if isinstance(side, VmsOn):
        for rep in list(side.scheduler.replicas.values()):
            reported = getattr(rep, "reported", None) or {}
            vm_states[reported.get("state") or "unreported"] += 1
        try:
            listed = await trio.to_thread.run_sync(side.builds.list)
        except OSError as exc:  # the figures go without builds, the scrape does not fail
            log.warning("metrics: could not read the builds: %s", exc)
            listed = []
        builds.update(b.get("state") or "unknown" for b in listed)
    dns = node.dns_view.server.stats.as_dict() if node.dns_view is not None else None
    hires = node.hires
    return {
        "version": st["version"], "address": st["address"], "peer_id": st["peer_id"],
        "ops": st["ops"], "pending": st["pending"], "peers": len(st["connected"]),
        "rejected": node.astore.store.replica.rejected_total,
        "p2p": st["p2p"], "vms_enabled": bool(st["vms"].get("enabled")), "vms": dict(vm_states),
        "builds": dict(builds), "fog_admitted": bool(st["fog"]["admitted"]),
        "hires": {"calls": hires.hires, "ms": hires.hire_ms, "in": hires.tokens_in, "out": hires.tokens_out},
        "usage": {"written": node.meter.writes, "failures": node.meter.failures},
        "credits": {"charged": node.charger.charged, "refused": node.charger.refused},
        "dns": dns,
    }


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def families(s: dict) -> Iterator[Metric]:
    """The metric families of a snapshot, names prefixed `formation_` (counters end in _total)."""
    info = GaugeMetricFamily("formation_node_info", "This node: its version, address and peer id (always 1)",
                             labels=["version", "address", "peer_id"])
    info.add_metric([s["version"], s["address"], s["peer_id"]], 1)
    yield info
    yield _gauge("formation_fog_admitted", "1 when this node is an admitted member of its fog", int(s["fog_admitted"]))
    # the replicated state
    yield _counter("formation_ops_applied", "Ops in this node's log: validated and applied (since the log began)",
                   s["ops"])
    yield _counter("formation_ops_rejected", "Ops refused by validity since the node started", s["rejected"])
    yield _gauge("formation_ops_pending", "Ops waiting for their dependencies or their time", s["pending"])
    yield _gauge("formation_peers_connected", "libp2p peers connected now", s["peers"])
    # gossip and sync (p2p/service.py P2PStats): rates are rate() of these
    p = s["p2p"]
    g = CounterMetricFamily("formation_gossip_messages", "Gossip messages (batches of ops) sent and received",
                            labels=["direction"])
    g.add_metric(["sent"], p["gossip_sent"])
    g.add_metric(["received"], p["gossip_received"])
    yield g
    yield _counter("formation_gossip_messages_rejected", "Gossip messages the validator refused", p["gossip_rejected"])
    yield _counter("formation_gossip_messages_dropped", "Gossip messages dropped unread (their forwarder had "
                   "too many waiting)", p["gossip_dropped"])
    yield _counter("formation_gossip_copies_received", "Pubsub message copies read from peers", p["gossip_copies_in"])
    yield _counter("formation_gossip_received_bytes", "Bytes of those copies", p["gossip_bytes_in"])
    yield _counter("formation_rpcs_sent", "Pubsub RPCs written to peers", p["rpcs_out"])
    yield _counter("formation_rpc_sent_bytes", "Bytes of those RPCs", p["rpc_bytes_out"])
    ops = CounterMetricFamily("formation_ops_received", "Ops received and accepted, by how they came",
                              labels=["via"])
    ops.add_metric(["gossip"], p["ops_from_gossip"])
    ops.add_metric(["sync"], p["ops_from_sync"])
    yield ops
    syncs = CounterMetricFamily("formation_sync_sessions", "Sync sessions, by result", labels=["result"])
    for result, key in (("ok", "syncs_ok"), ("failed", "syncs_failed"), ("refused", "syncs_refused")):
        syncs.add_metric([result], p[key])
    yield syncs
    yield _gauge("formation_fog_gossip_messages_per_second", "Gossip messages the fog publishes per "
                 "second, as seen here", p["fog_msgs_per_s"])
    yield _gauge("formation_gossip_hold_seconds", "How long the first op of a gossip batch waits now",
                 p["gossip_hold_ms"] / 1000)
    yield _gauge("formation_gossip_lag_seconds", "From an op's time to its arrival here by gossip, recently",
                 p["gossip_lag_s"])
    # workloads
    yield _gauge("formation_vms_enabled", "1 when this node runs VMs", int(s["vms_enabled"]))
    vms = GaugeMetricFamily("formation_vms", "This node's replicas, by the state it last reported",
                            labels=["state"])
    for state in (*STATES, "unreported"):
        vms.add_metric([state], s["vms"].get(state, 0))
    yield vms
    builds = GaugeMetricFamily("formation_builds", "Image builds on this node, by state", labels=["state"])
    for state in BUILD_STATES:
        builds.add_metric([state], s["builds"].get(state, 0))
    yield builds
    h = s["hires"]
    yield _counter("formation_hires", "Calls this node's hire proxy sent to agents and got an answer to",
                   h["calls"])
    yield _counter("formation_hire_seconds", "Their total duration, to the answer's end", h["ms"] / 1000)
    tokens = CounterMetricFamily("formation_hire_tokens", "Tokens the agents reported (X-Formation-Tokens)",
                                 labels=["direction"])
    tokens.add_metric(["in"], h["in"])
    tokens.add_metric(["out"], h["out"])
    yield tokens
    yield _counter("formation_usage_records_written", "Usage records this node wrote", s["usage"]["written"])
    yield _counter("formation_usage_failures", "Metering looks or usage writes that failed", s["usage"]["failures"])
    yield _counter("formation_credits_charged", "Credits this node charged for calls it admitted",
                   s["credits"]["charged"])
    yield _counter("formation_calls_refused_for_credits", "Priced calls refused with 402 (insufficient credits)",
                   s["credits"]["refused"])
    # DNS (dns/server.py Stats)
    d = s["dns"]
    yield _gauge("formation_dns_enabled", "1 when this node's DNS server is serving", int(d is not None))
    if d is not None:
        yield _counter("formation_dns_queries", "DNS queries received", d["queries"])
        answers = CounterMetricFamily("formation_dns_responses", "DNS answers, by how they were made",
                                      labels=["result"])
        for result in DNS_RESULTS:
            answers.add_metric([result], d[result])
        yield answers
        yield _counter("formation_dns_cache_hits", "Forwarded answers served from the cache", d["cache_hits"])
        drops = CounterMetricFamily("formation_dns_dropped", "DNS queries or connections not answered",
                                    labels=["reason"])
        for reason, key in DNS_DROPS.items():
            drops.add_metric([reason], d[key])
        yield drops


class _Snapshot:
    """A collector of one snapshot (registered in a registry made for one scrape)."""

    def __init__(self, snap: dict):
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        return families(self.snap)


async def scrape(node: MetricsNode) -> bytes:
    """The text a Prometheus server scrapes."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(await snapshot(node)))
    return generate_latest(registry)
