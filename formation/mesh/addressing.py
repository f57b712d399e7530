"""Overlay addresses from the state, with no coordinator: a member's address hashes to a slot of
the overlay range; members that collide are ordered by address and the later ones probe on. Every
node computes the same map from the same members, so honest nodes never disagree; a collision
(rare: a /16 and a few hundred nodes) moves only the members involved.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable


def overlay_addresses(members: Iterable[str], cidr: str) -> dict[str, str]:
    net = ipaddress.ip_network(cidr)
    size = net.num_addresses - 2  # not the network and broadcast addresses
    if size < 1:
        raise ValueError(f"overlay range {cidr} holds no host address")
    taken: dict[int, str] = {}
    out: dict[str, str] = {}
    for member in sorted(set(members)):
        slot = int.from_bytes(hashlib.sha256(b"overlay:" + member.encode()).digest()[:8], "big") % size
        for _ in range(size):
            if slot not in taken:
                break
            slot = (slot + 1) % size
        else:
            raise ValueError(f"overlay range {cidr} is full")
        taken[slot] = member
        out[member] = str(net.network_address + 1 + slot)
    return out
