"""Where an instance's replicas run, decided by every node alike from the shared state.

Rendezvous (highest-random-weight) hashing: each live node that can hold the instance gets the
score SHA-256(instance id || node address); the `replicas` highest scores win. Every node
computes the same answer from the same state, so no coordinator is needed; when a node dies or
joins, only the replicas whose ranking changes move.

"Live" reads the caller's clock (a node's heartbeat older than `stale_ms`), so two nodes whose
clocks disagree can briefly disagree about a node at the edge of the timeout; the reconcile loop
settles it on its next pass. Capacity is checked against each node's advertised capacity, not
yet against what other instances already use there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

DEFAULT_STALE_MS = 90_000  # three missed 30 s heartbeats


def stale_after_ms(heartbeat_seconds: int) -> int:
    """When a node counts as dead: three missed heartbeats."""
    return 3 * heartbeat_seconds * 1000


def is_live(node: dict | None, now_ms: int, stale_ms: int) -> bool:
    return node is not None and now_ms - node.get("heartbeat", 0) <= stale_ms


def fits(node: dict, resources: dict) -> bool:
    cap = node.get("capacity") or {}
    gpu = (resources.get("gpu") or {}).get("count", 0)
    return (cap.get("vcpus", 0) >= resources.get("vcpus", 1)
            and cap.get("memory_mb", 0) >= resources.get("memory_mb", 0)
            and cap.get("disk_gb", 0) >= resources.get("disk_gb", 0)
            and cap.get("gpus", 0) >= gpu)


def score(instance_id: str, address: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{instance_id}|{address}".encode()).digest()[:8], "big")


def place(instance: dict, nodes: Iterable[dict], *, now_ms: int, stale_ms: int = DEFAULT_STALE_MS) -> list[str]:
    """Addresses of the nodes that should run `instance`'s replicas, best first."""
    resources = instance.get("resources") or {}
    live = [n for n in nodes if is_live(n, now_ms, stale_ms) and fits(n, resources)]
    ranked = sorted(live, key=lambda n: (score(instance["instance_id"], n["address"]), n["address"]),
                    reverse=True)
    return [n["address"] for n in ranked[: instance.get("replicas", 1)]]
