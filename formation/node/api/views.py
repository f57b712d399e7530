"""Who may see what, and shaping records for answers. Reads are not ops: this is API policy.

- account: only its own address;
- instance (and its replicas' status): owner and users authorized at any level;
- model, agent: everyone when public; owner and authorized users when `is_private`;
- node, peer, dns: public.
"""

from __future__ import annotations

from formation.crdt.kinds.owned import level_of

PRIVATE_ALWAYS = frozenset({"instance"})
PUBLIC = frozenset({"node", "peer", "dns"})


def visible(kind: str, value: dict | None, who: str | None) -> bool:
    if value is None:
        return False
    if kind in PUBLIC:
        return True
    if kind == "account":
        return who is not None and value.get("address") == who
    if kind == "instance_status":
        return False  # shown inside its instance, to whoever may see the instance
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
