"""Who is a member of a fog: a view of the fog, member and expel records (kinds/fog_kinds.py),
computed the same way by every node from the same records.

A node is a member when its claim's inviter is a member (back to the genesis), the inviter may
invite (the fog's policy) and has not used up its admissions (invite serials 1..max_admits), the
invite admitted no one else, and neither the node nor anyone on its invite lineage was expelled.
So expelling a member removes everything admitted through it. Conflicts burn, as a double
transfer does (docs/state.md): an invite claimed by two nodes, or two invites of one inviter
with the same serial, admit no one. The inviter seals its invite to the first claimant it sees
(`admit`); other claims of it are then ignored, so a token that leaks after its use evicts no
one. Before the seal (about a second while the inviter is online) a second claim still burns the
invite, and a thief who claims a stolen unused token first is the one sealed: tokens are secrets.
A member that left (a `leave` record) is no longer a member but still vouches for the nodes it admitted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from .kinds.fog_kinds import fog_id_of, invite_id

KINDS = frozenset({"fog", "member", "admit", "leave", "expel"})  # the records membership reads


def members(fog_id: str, fog: dict | None, claims: Iterable[dict], expels: Iterable[dict],
            seals: Iterable[dict] = (), leaves: Iterable[dict] = ()) -> frozenset[str]:
    """The addresses of the fog's current members (empty without its genesis record)."""
    if fog is None or fog.get("fog_id") != fog_id or fog_id_of(fog) != fog_id:
        return frozenset()
    genesis, policy = fog["genesis"], fog["policy"]
    expelled = {e["address"] for e in expels if e["fog"]["fog_id"] == fog_id}
    claims = [c for c in claims if c["fog_id"] == fog_id]
    left = {x["address"] for x in leaves if x["fog_id"] == fog_id}
    sealed = {invite_id(s["invite"]): s["member"] for s in seals if s["invite"]["fog_id"] == fog_id}
    by_address: dict[str, dict] = {}
    claimants: dict[str, set[str]] = defaultdict(set)  # invite signature -> claimants
    serials: dict[tuple[str, int], set[str]] = defaultdict(set)  # (inviter, serial) -> invites
    for c in claims:
        invite = c.get("invite")
        if invite is None:
            continue
        if sealed.get(invite_id(invite), c["address"]) != c["address"]:
            continue  # the inviter sealed this invite to another claimant: this claim is nothing
        by_address[c["address"]] = c
        claimants[invite["signature"].lower()].add(c["address"])
        serials[(invite["inviter"], invite["serial"])].add(invite["signature"].lower())
    # who may vouch: the genesis, then every valid claim whose inviter may vouch, to a fixed point
    vouching = {genesis} - expelled
    pending = dict(by_address)
    grew = True
    while grew:
        grew = False
        for addr, c in list(pending.items()):
            inv = c["invite"]
            if (inv["inviter"] in vouching and addr not in expelled
                    and (policy["inviters"] == "members" or inv["inviter"] == genesis)
                    and inv["serial"] <= policy["max_admits"]
                    and len(claimants[inv["signature"].lower()]) == 1
                    and len(serials[(inv["inviter"], inv["serial"])]) == 1):
                vouching.add(addr)
                del pending[addr]
                grew = True
    return frozenset(vouching - left)
