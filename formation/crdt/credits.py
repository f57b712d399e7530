"""Balances: a view of the records, computed the same on every node (docs/economy.md).

    balance(account) = start + granted + earned - spent

- start: what an account is given when it is created: its record's `credits` (100, as the
  original) in a fog with no treasury; 0 in a fog with a treasury, where credits enter only
  through the treasury's grants (else every new key would be a faucet of 100);
- granted: the `grant` records of this node's own fog (fog id and treasury of its genesis)
  naming the account (validity already refused every grant not signed by its fog's treasury);
- spent: the `credits` of every `charge` record naming the account as consumer, written by a
  member of the fog (a stranger's or a user's key counts for no one);
- earned: of each such charge, its creator gets credits - share and the node that wrote it (the
  hosting operator: a node's address is its operator's account) gets share =
  floor(credits x operator_share_percent / 100), the split the genesis names (default 20).

Pure: records in, figures out; no clock, no store.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from .kinds.fog_kinds import operator_share_percent


def start_credits(account: Mapping | None, fog: Mapping | None) -> int:
    if account is None or (fog is not None and fog.get("treasury")):
        return 0
    v = account.get("credits", 0)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def grants_counted(grants: Iterable[Mapping], fog: Mapping | None) -> list[Mapping]:
    """The grants of `fog` (its id, by its treasury); none without a fog or a treasury."""
    if fog is None or not fog.get("treasury"):
        return []
    return [g for g in grants if g.get("fog_id") == fog["fog_id"] and g.get("treasury") == fog["treasury"]]


def charges_counted(charges: Iterable[Mapping], members: Collection[str]) -> list[Mapping]:
    return [c for c in charges if c.get("node") in members]


def split(credits: int, fog: Mapping | None) -> tuple[int, int]:
    """(creator's part, operator's share) of what calls cost."""
    share = credits * operator_share_percent(dict(fog) if fog else None) // 100
    return credits - share, share


def balance_of(who: str, *, account: Mapping | None, grants: Iterable[Mapping], charges: Iterable[Mapping],
               members: Collection[str], fog: Mapping | None) -> dict:
    """The figures of one account. `grants` and `charges` may hold others' records too."""
    start = start_credits(account, fog)
    granted = sum(g["amount"] for g in grants_counted(grants, fog) if g.get("to") == who)
    spent = earned = 0
    calls = 0
    for c in charges_counted(charges, members):
        creator_part, share = split(c["credits"], fog)
        if c["consumer"] == who:
            spent += c["credits"]
            calls += c["calls"]
        if c["creator"] == who:
            earned += creator_part
        if c["node"] == who:
            earned += share
    return {"address": who, "start": start, "granted": granted, "earned": earned, "spent": spent,
            "calls": calls, "balance": start + granted + earned - spent}
