"""Who may see what, and reading records for answers. Reads are not ops: this is API policy.

- account: only its own address;
- instance (and its replicas' status): owner and users authorized at any level;
- model, agent: everyone when public; owner and authorized users when `is_private`;
- node, peer, dns: public.

The reads here serve the handler modules (records.py, workloads.py, hire.py): a record with its
`record_version`, or the 401/403/404 that says why not; the visible rows of a kind; an
instance's replicas with whether their nodes are alive.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from formation.crdt.kinds.owned import level_of
from formation.crdt.schema import SLUG

from ..charging import NotNamed
from ..placement import is_live, stale_after_ms
from ..vmside import VmsOn
from .http import ApiError, Call

if TYPE_CHECKING:
    from ..scheduler import Scheduler

PRIVATE_ALWAYS = frozenset({"instance"})
PUBLIC = frozenset({"node", "peer", "dns"})
HIRE_LEVEL = "operator"  # the level on an agent (if private) or an instance that lets one send it calls
NEVER_SHOWN = frozenset({"instance_status", "secret_box", "usage", "grant", "charge", "credit_move", "subscription", "rent",
                         "credit_moved"})  # statuses, usage:
# shown for their instance; grants and charges: in their account's credits (GET /account/credits)


def visible(kind: str, value: dict | None, who: str | None) -> bool:
    if value is None:
        return False
    if kind in PUBLIC:
        return True
    if kind == "account":
        return who is not None and value.get("address") == who
    if kind in NEVER_SHOWN:
        return False
    if kind in PRIVATE_ALWAYS or value.get("is_private"):
        return who is not None and level_of(value, who) > 0
    return True


def matches(value: dict, *, type_field: str | None, filters: dict) -> bool:
    """Filters of the search endpoints that SQL did not already apply."""
    fw = filters.get("framework")
    if fw and value.get("framework") != fw:
        return False
    tags = filters.get("tags") or []
    return all(t in value.get("tags", []) for t in tags)


# ---- reads ------------------------------------------------------------------------------------

def scheduler_of(call: Call) -> Scheduler | None:
    """This node's scheduler (its replicas' consoles, metrics, addresses); None while it runs no VMs."""
    side = call.runtime.vms
    return side.scheduler if isinstance(side, VmsOn) else None


async def with_version(call: Call, kind: str, key: str) -> dict | None:
    """A record with its `record_version` (what a write on it names as ?base=), or None."""
    return await call.runtime.astore.get_versioned(kind, key)


async def visible_or_404(call: Call, kind: str, key: str) -> dict:
    value = await with_version(call, kind, key)
    if value is None:
        raise ApiError(404, "not_found", f"no {kind} {key}")
    if not visible(kind, value, call.who):
        if call.who is None:
            raise ApiError(401, "missing_header", f"this {kind} is private: sign the request")
        raise ApiError(403, "forbidden", f"{call.who} may not read {kind} {key}")
    return value


async def visible_rows(call: Call, kind: str, *, limit: int = 10_000, **filters) -> list[dict]:
    """The records of a kind the caller may see (each with its `record_version`)."""
    rows = await call.runtime.astore.list(kind, limit=limit, **filters)
    return [r for r in rows if visible(kind, r, call.who)]


async def instances_named(call: Call, name: str) -> list[dict]:
    """The instances the caller may see whose name is `name` (names are slugs: any other text
    names none, and is not searched for)."""
    try:
        SLUG(name)
    except ValueError:
        return []
    return [i for i in await visible_rows(call, "instance", text=name) if i["name"] == name]


async def replica_statuses(call: Call, instance_id: str) -> list[dict]:
    """The replicas' instance_status records, by node, each with `node_alive`: only its node may
    withdraw a record, so a dead node's last word stays in the state; readers must know."""
    rows = await call.runtime.astore.list("instance_status", text=instance_id, limit=1000)
    stale = stale_after_ms(call.runtime.config.node.heartbeat_seconds)
    now = int(time.time() * 1000)
    out = []
    for r in sorted((r for r in rows if r["instance_id"] == instance_id), key=lambda r: r["node"]):
        node = await call.runtime.astore.get("node", r["node"])
        out.append({**r, "node_alive": is_live(node, now, stale)})
    return out


def one_use_refusal(exc: Exception, node: str) -> ApiError:
    """Why a call that spends credits was refused before it was admitted (charging.take_signature)."""
    if isinstance(exc, NotNamed):
        return ApiError(401, "node_not_named", f"a call that spends credits must name the node it is sent to in its "
                        f"signed path (`?node={node}`), so that it cannot be replayed at another node; the CLI "
                        "and client add it")
    return ApiError(401, "replay", "this signature was already used, and a call that spends credits is paid "
                    "once: sign each call anew (the CLI and client add a random `nonce` query parameter)")
