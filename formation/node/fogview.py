"""What placement reads from the state, read one way for everyone who places: the scheduler
(which replicas to run) and the API (where an instance is placed, and why not all of it).
Instances and statuses come from the node's shared mirror of them (mirror.py: only what changed
since the last pass is read): the records are shared, read-only."""

from __future__ import annotations

from dataclasses import dataclass

from .mirror import shared_mirror
from .placement import place_all, shortfall
from .ports import NodeState

ALL = 1_000_000  # the store's own bounds cap what a list returns
KINDS = ("instance", "instance_status")


@dataclass(frozen=True)
class FogView:
    instances: list[dict]
    nodes: list[dict]  # the members' node records
    # `running` and `paused` instance_status reports: what holds memory on a node (evidence
    # against its capacity claims; a paused VM keeps its memory)
    statuses: list[dict]
    now_ms: int
    stale_ms: int

    def placements(self) -> dict[str, list[str]]:
        return place_all(self.instances, self.nodes, now_ms=self.now_ms, stale_ms=self.stale_ms,
                         statuses=self.statuses)

    def shortfall(self, instance: dict, placed: list[str]) -> str | None:
        return shortfall(instance, placed, self.nodes, now_ms=self.now_ms, stale_ms=self.stale_ms,
                         statuses=self.statuses, instances=self.instances)


async def read(node: NodeState, *, now_ms: int, stale_ms: int) -> FogView:
    store = node.astore.store
    rows = await node.astore.run(shared_mirror(store, KINDS, ALL).read, store)
    statuses = rows["instance_status"]
    return FogView(instances=rows["instance"], nodes=await node.fog_nodes(),
                   statuses=[s for state in ("running", "paused") for s in statuses if s.get("state") == state],
                   now_ms=now_ms, stale_ms=stale_ms)
