"""Balances: a view of the records, computed the same on every node (docs/economy.md).

Credits are held in purses: an account's credits AT a node. Only that node takes credits out of
a purse (it writes the charges and the moves that spend them), so it alone decides whether a
call is covered, from what it holds itself; what others add (grants, moves in) only ever raises
its view. Two nodes cut off from each other therefore never spend the same credits, and no purse
goes below zero (the node admits a call only when its purse covers it).

    held(account, node) = granted + moved_in + earned - spent - moved_out

- granted: the `grant` records of this node's own fog (its genesis's id and treasury: validity
  refused every grant not signed by its fog's treasury) to the account, held at the node;
- moved_in / moved_out: `credit_moved` records of the account written by a member (the node the
  credits left), into / out of the node's purse;
- spent: the `credits` of each `charge` and `subscription` written by the node (a member) naming
  the account as consumer;
- earned: of each such charge, its creator gets credits - share and the host's operator (a
  node's address is its operator's account) gets share = floor(credits x operator_share_percent
  / 100), the split the genesis names (default 20), both at the charging node; of a
  subscription (a plan bought) or a `rent` (hours of an instance bound to a priced model), the
  same, the selling or hosting node's operator taking the share.

A fog without a treasury has no economy: nothing is charged, and an account's figures are the
100 credits its record started with (the original's promise), held nowhere in particular.

Pure: records in, figures out; no clock, no store.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from .kinds.fog_kinds import operator_share_percent

FIGURES = ("granted", "moved_in", "earned", "spent", "moved_out")


def has_economy(fog: Mapping | None) -> bool:
    return bool(fog and fog.get("treasury"))


def start_credits(account: Mapping | None, fog: Mapping | None) -> int:
    if account is None or has_economy(fog):
        return 0
    return _count(account.get("credits", 0))


def grants_counted(grants: Iterable[Mapping], fog: Mapping | None) -> list[Mapping]:
    """The grants of `fog` (its id, by its treasury); none without a fog or a treasury."""
    if not has_economy(fog):
        return []
    return [g for g in grants if g.get("fog_id") == fog["fog_id"] and g.get("treasury") == fog["treasury"]]


def split(credits: int, fog: Mapping | None) -> tuple[int, int]:
    """(creator's part, operator's share) of what calls cost."""
    share = credits * operator_share_percent(dict(fog) if fog else None) // 100
    return credits - share, share


def purses_of(who: str, *, grants: Iterable[Mapping], charges: Iterable[Mapping], moves: Iterable[Mapping],
              members: Collection[str], fog: Mapping | None,
              subscriptions: Iterable[Mapping] = (), rents: Iterable[Mapping] = ()) -> dict[str, dict]:
    """node -> {granted, moved_in, earned, spent, moved_out, held, calls} of `who`'s purse there.
    The record lists may hold others' records too; only what counts is counted."""
    purses: dict[str, dict] = {}

    def at(node: str) -> dict:
        return purses.setdefault(node, dict.fromkeys((*FIGURES, "calls"), 0))

    for g in grants_counted(grants, fog):
        if g.get("to") == who:
            at(g["at"])["granted"] += g["amount"]
    if has_economy(fog):
        # what moved credits, each held at the node that wrote it: (records, who paid, who takes
        # the operator's share); its creator is paid the rest
        for records, payer, taker in ((charges, "consumer", "host"), (subscriptions, "consumer", "node"),
                                      (rents, "payer", "node")):
            for r in records:
                if r.get("node") not in members:
                    continue
                creator_part, share = split(r["credits"], fog)
                purse = at(r["node"]) if who in (r[payer], r["creator"], r[taker]) else None
                if r[payer] == who:
                    purse["spent"] += r["credits"]
                    purse["calls"] += r.get("calls", 0)
                if r["creator"] == who:
                    purse["earned"] += creator_part
                if r[taker] == who:
                    purse["earned"] += share
        for m in moves:
            if m.get("account") != who or m.get("from_node") not in members:
                continue
            at(m["from_node"])["moved_out"] += m["amount"]
            at(m["to_node"])["moved_in"] += m["amount"]
    for p in purses.values():
        p["held"] = p["granted"] + p["moved_in"] + p["earned"] - p["spent"] - p["moved_out"]
    return purses


def balance_of(who: str, *, account: Mapping | None, grants: Iterable[Mapping], charges: Iterable[Mapping],
               moves: Iterable[Mapping] = (), members: Collection[str], fog: Mapping | None,
               subscriptions: Iterable[Mapping] = (), rents: Iterable[Mapping] = ()) -> dict:
    """The figures of one account: its purses and their sums."""
    purses = purses_of(who, grants=grants, charges=charges, moves=moves, members=members, fog=fog,
                       subscriptions=subscriptions, rents=rents)
    out = {"address": who, "start": start_credits(account, fog),
           **{f: sum(p[f] for p in purses.values()) for f in (*FIGURES, "calls")}}
    out["balance"] = out["start"] + sum(p["held"] for p in purses.values())
    out["purses"] = [{"node": node, **p} for node, p in sorted(purses.items())]
    return out


# ---- prices ---------------------------------------------------------------------------------------

DEFAULT_MAX_BILLED_TOKENS = 4096


def _count(v) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


class Price:
    """An agent's price (its record's price_credits_per_call, price_credits_per_1k_tokens and
    max_billed_tokens): what a call holds of the caller's credits when it is admitted, and what
    it costs once answered. Tokens are what the agent reported (X-Formation-Tokens), billed up to
    max_billed_tokens a call: a call never costs more than it held, so no purse goes negative."""

    def __init__(self, agent: Mapping):
        self.per_call = _count(agent.get("price_credits_per_call"))
        self.per_1k_tokens = _count(agent.get("price_credits_per_1k_tokens"))
        self.max_tokens = _count(agent.get("max_billed_tokens")) or DEFAULT_MAX_BILLED_TOKENS

    def __bool__(self) -> bool:
        return bool(self.per_call or self.per_1k_tokens)

    def _tokens(self, n: int) -> int:
        return -(-min(n, self.max_tokens) * self.per_1k_tokens // 1000)  # rounded up

    def hold(self) -> int:
        return self.per_call + self._tokens(self.max_tokens)

    def cost(self, tokens_in: int, tokens_out: int) -> int:
        return self.per_call + self._tokens(tokens_in + tokens_out)
