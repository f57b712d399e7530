"""Where an instance's replicas run, decided by every node alike from the shared state.

Rendezvous (highest-random-weight) hashing: each live node that can hold the instance gets the
score SHA-256(instance id || node address); the `replicas` highest scores win. Every node
computes the same answer from the same state, so no coordinator is needed; when a node dies or
joins, only the replicas whose ranking changes move.

"Live" reads the caller's clock (a node's heartbeat older than `stale_ms`), so two nodes whose
clocks disagree can briefly disagree about a node at the edge of the timeout; the reconcile loop
settles it on its next pass. Memory and GPUs are booked against each node's advertised capacity
in the instances' creation order (place_all), so a node is not overcommitted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

DEFAULT_STALE_MS = 90_000  # three missed 30 s heartbeats


def stale_after_ms(heartbeat_seconds: int) -> int:
    """When a node counts as dead: three missed heartbeats."""
    return 3 * heartbeat_seconds * 1000


def is_live(node: dict | None, now_ms: int, stale_ms: int) -> bool:
    """A recent heartbeat; one dated further ahead than `stale_ms` is a lie, not a fresh beat
    (it would keep the node "live" for as long as it names)."""
    return node is not None and abs(now_ms - node.get("heartbeat", 0)) <= stale_ms


def live_nodes(nodes: Iterable[dict], now_ms: int, stale_ms: int) -> list[dict]:
    """The nodes placement may use: a recent heartbeat, and — when there is anyone else to say
    so — another such node that lists it among the nodes it is connected to (`seen`). A node's
    own records are its claim; another member's connection is evidence, so a member that
    publishes fresh heartbeats but serves nobody is not placed on."""
    beating = [n for n in nodes if is_live(n, now_ms, stale_ms)]
    if len(beating) <= 1:
        return beating
    vouched = {a for n in beating for a in n.get("seen") or [] if a != n["address"]}
    return [n for n in beating if n["address"] in vouched]


def fits(node: dict, resources: dict) -> bool:
    cap = node.get("capacity") or {}
    gpu = (resources.get("gpu") or {}).get("count", 0)
    return (cap.get("vms", True) is not False  # a node that runs no VMs says so
            and cap.get("vcpus", 0) >= resources.get("vcpus", 1)
            and cap.get("memory_mb", 0) >= resources.get("memory_mb", 0)
            and cap.get("disk_gb", 0) >= resources.get("disk_gb", 0)
            and cap.get("gpus", 0) >= gpu)


def score(instance_id: str, address: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{instance_id}|{address}".encode()).digest()[:8], "big")


def place(instance: dict, nodes: Iterable[dict], *, now_ms: int, stale_ms: int = DEFAULT_STALE_MS) -> list[str]:
    """Addresses of the nodes that should run `instance`'s replicas, best first, if it were the
    only instance."""
    return place_all([instance], nodes, now_ms=now_ms, stale_ms=stale_ms)[instance["instance_id"]]


def place_all(instances: Iterable[dict], nodes: Iterable[dict], *, now_ms: int,
              stale_ms: int = DEFAULT_STALE_MS) -> dict[str, list[str]]:
    """Every instance's replicas. Memory and GPUs are not overcommitted: instances take what is
    left on each node in creation order (oldest first, then id), so a new instance never moves
    an older one; a stopped instance keeps its room, so starting it again lands where it was.
    vCPUs and disk are checked per instance only (vCPUs are shared, overlays are thin)."""
    live = live_nodes(nodes, now_ms, stale_ms)
    left = {n["address"]: [(n.get("capacity") or {}).get("memory_mb", 0),
                           (n.get("capacity") or {}).get("gpus", 0)] for n in live}
    out: dict[str, list[str]] = {}
    for inst in sorted(instances, key=lambda i: (i.get("created_at", 0), i["instance_id"])):
        resources = inst.get("resources") or {}
        memory = resources.get("memory_mb", 0)
        gpus = (resources.get("gpu") or {}).get("count", 0)
        fit = [n for n in live if fits(n, resources)
               and left[n["address"]][0] >= memory and left[n["address"]][1] >= gpus]
        ranked = sorted(fit, key=lambda n: (score(inst["instance_id"], n["address"]), n["address"]),
                        reverse=True)[: inst.get("replicas", 1)]
        for n in ranked:
            left[n["address"]][0] -= memory
            left[n["address"]][1] -= gpus
        out[inst["instance_id"]] = [n["address"] for n in ranked]
    return out


def shortfall(instance: dict, placed: list[str], nodes: Iterable[dict], *, now_ms: int,
              stale_ms: int = DEFAULT_STALE_MS) -> str | None:
    """Why `instance` got fewer replicas than it asks for (None when it got them all): what no
    live node offers, or that the nodes that could are full."""
    wanted = instance.get("replicas", 1)
    if len(placed) >= wanted:
        return None
    live = live_nodes(nodes, now_ms, stale_ms)
    res = instance.get("resources") or {}
    gpus = (res.get("gpu") or {}).get("count", 0)
    needs = [("runs VMs", lambda c: c.get("vms", True) is not False),
             (f"{res.get('vcpus', 1)} vCPUs", lambda c: c.get("vcpus", 0) >= res.get("vcpus", 1)),
             (f"{res.get('memory_mb', 0)} MB of memory", lambda c: c.get("memory_mb", 0) >= res.get("memory_mb", 0)),
             (f"{res.get('disk_gb', 0)} GB of disk", lambda c: c.get("disk_gb", 0) >= res.get("disk_gb", 0)),
             (f"{gpus} GPUs", lambda c: c.get("gpus", 0) >= gpus)]
    got = f"{len(placed)} of {wanted} replicas placed"
    if not live:
        return f"{got}: no live node in the fog"
    for what, ok in needs:
        if not any(ok(n.get("capacity") or {}) for n in live):
            return f"{got}: no live node {what if what == 'runs VMs' else 'has ' + what}"
    return f"{got}: the nodes that fit are full or too few ({len(live)} live)"
