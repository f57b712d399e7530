"""Build contexts between the fog's nodes: who may fetch one from this node.

A context is served on /formation/blob/1 as `context/<build id>` by the node it was uploaded to
(and by every node that fetched it and built from it: they keep it too). It goes only to an
admitted member of this node's fog (the asking peer's address comes from the key in its peer
id, which the connection's handshake proved) that this node's view of the state places for an
instance whose `build_id` is that id, or that reports such a replica running. Anyone else is
refused, and told why: a non-member learns nothing but that. The bytes come from disk a chunk at
a time (blobs.py); the fetching node checks them against the build id before it builds anything
(scheduler.py `_fetch_context`).

Placement and running reports rest on what members publish about themselves (capacity,
liveness, replica states), so this keeps a context among the members the state names as hosts
of its image; it is not secrecy from a member that lies about itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import trio

from formation.p2p import blobs

from . import fogview
from .placement import stale_after_ms
from .ports import NodeState

log = logging.getLogger("formation.contexts")
PREFIX = "context/"


async def refusal(node: NodeState, asker: str | None, build_id: str, *, now_ms: int | None = None) -> str | None:
    """Why `asker` (a node address) may not have the context of `build_id`; None: it may."""
    if asker is None:
        return "not a member of this fog (no node key in its peer id)"
    if node.fog_id is None or asker not in await node.astore.fog_members(node.fog_id):
        return "not a member of this fog"
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    view = await fogview.read(node, now_ms=now, stale_ms=stale_after_ms(node.config.node.heartbeat_seconds))
    uses = [i["instance_id"] for i in view.instances if i.get("build_id") == build_id]
    if not uses:
        return f"no instance uses build {build_id[:12]}"
    placements = view.placements()
    running = {(s["instance_id"], s["node"]) for s in view.statuses}  # running or paused: it has the image
    if any(asker in placements.get(iid, ()) or (iid, asker) in running for iid in uses):
        return None
    return f"{asker} is not placed for an instance of build {build_id[:12]} (as this node sees the fog)"


def provider(node: NodeState, find: Callable[[str], bytes | Path | None]) -> blobs.Provider:
    """What this node serves on /formation/blob/1: the contexts `find` has (by build id, a file
    or bytes), to the members `refusal` lets have them."""

    async def provide(asker: str | None, name: str) -> bytes | Path | None:
        if not name.startswith(PREFIX):
            return None
        build_id = name[len(PREFIX):]
        why = await refusal(node, asker, build_id)
        if why is not None:
            log.info("refused the context of %s to %s: %s", build_id[:12], asker, why)
            raise blobs.Refused(why)
        return await trio.to_thread.run_sync(find, build_id)

    return provide
