"""Charging calls in credits (docs/economy.md): balances read from the state, the admission of a
priced call, and this node's `charge` records.

The balance is the view of crdt/credits.py over the records this node holds. A priced call is
admitted when the caller's balance, less what this node has already admitted and not yet written
(calls in flight), covers the price; once the agent answered (a status under 500), the node
rewrites its cumulative `charge` record for (caller, agent, itself). Admission and the write are
serialized per node (one lock), so concurrent calls through ONE node never spend more than the
balance. Calls through two nodes at once are not bounded yet: each sees only the charges it has
synced (docs/economy.md, "Not built yet": per-node allowances).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import trio

from formation.crdt.credits import balance_of
from formation.crdt.kinds.credit_kinds import charge_key
from formation.crdt.kinds.fog_kinds import operator_share_percent

MAX_GRANTS = 10_000  # grants to one account a balance reads
MAX_CHARGES = 100_000  # charge records naming one account (as consumer, creator or node)


def _charges_of(store, who: str) -> list[dict]:
    """The charge records naming `who` as consumer, creator or charging node."""
    found: dict[tuple[str, str, str], dict] = {}
    for rows in (store.list("charge", owner=who, limit=MAX_CHARGES),
                 store.list("charge", type=who, limit=MAX_CHARGES),
                 store.list("charge", text=who, limit=MAX_CHARGES)):
        for c in rows:
            if who in (c["consumer"], c["creator"], c["node"]):
                found[(c["consumer"], c["agent_id"], c["node"])] = c
    return list(found.values())


def ledger(store, fog_id: str | None, who: str) -> dict:
    """`who`'s credits in this node's view: balance_of's figures, the grants that count, and
    the fog's treasury and split."""
    fog = store.get("fog", fog_id) if fog_id else None
    members = store.fog_members(fog_id) if fog_id else frozenset()
    grants = store.list("grant", owner=who, type=fog_id, limit=MAX_GRANTS) if fog_id else []
    if fog is not None:
        grants = [g for g in grants if g["treasury"] == fog.get("treasury")]
    else:
        grants = []
    out = balance_of(who, account=store.get("account", who), grants=grants, charges=_charges_of(store, who),
                     members=members, fog=fog)
    out.update(fog_id=fog_id, treasury=fog.get("treasury") if fog else None,
               operator_share_percent=operator_share_percent(fog),
               grants=[{k: g[k] for k in ("grant_id", "amount", "memo", "created_at")}
                       for g in sorted(grants, key=lambda g: (g["created_at"], g["grant_id"]))])
    return out


class InsufficientCredits(Exception):
    def __init__(self, balance: int, available: int, price: int):
        super().__init__(f"balance {balance}, available {available}, price {price}")
        self.balance, self.available, self.price = balance, available, price


@dataclass
class Admission:
    consumer: str
    agent_id: str
    creator: str
    price: int
    settled: bool = False


class Charger:
    """This node's admissions of priced calls and its charge records."""

    def __init__(self, node) -> None:
        self.node = node
        self.lock = trio.Lock()
        self.inflight: dict[str, int] = {}  # credits admitted per consumer, not yet written
        self.charged = 0  # credits this node charged since it started (for /metrics)
        self.refused = 0  # calls refused for want of credits

    async def balance(self, who: str) -> dict:
        node = self.node
        return await node.astore.run(ledger, node.astore.store, node.fog_id, who)

    async def admit(self, consumer: str, agent_id: str, creator: str, price: int) -> Admission:
        """Raises InsufficientCredits unless the consumer's balance, less the calls in flight
        through this node, covers `price`."""
        async with self.lock:
            figures = await self.balance(consumer)
            available = figures["balance"] - self.inflight.get(consumer, 0)
            if available < price:
                self.refused += 1
                raise InsufficientCredits(figures["balance"], available, price)
            self.inflight[consumer] = self.inflight.get(consumer, 0) + price
        return Admission(consumer, agent_id, creator, price)

    def _release(self, a: Admission) -> None:
        left = self.inflight.get(a.consumer, 0) - a.price
        if left > 0:
            self.inflight[a.consumer] = left
        else:
            self.inflight.pop(a.consumer, None)

    async def release(self, a: Admission) -> None:
        """The call was not answered (or failed on the agent's side): nothing is charged."""
        if not a.settled:
            a.settled = True
            async with self.lock:
                self._release(a)

    async def settle(self, a: Admission) -> None:
        """The call was answered: this node's cumulative charge record grows by it."""
        if a.settled:
            return
        a.settled = True
        node = self.node
        key = charge_key(a.consumer, a.agent_id, node.address)
        async with self.lock:
            try:
                old = await node.astore.get("charge", key) or {}
                value = {"consumer": a.consumer, "agent_id": a.agent_id, "node": node.address,
                         "creator": a.creator, "calls": old.get("calls", 0) + 1,
                         "credits": old.get("credits", 0) + a.price,
                         "tokens_in": old.get("tokens_in", 0), "tokens_out": old.get("tokens_out", 0),
                         "updated_at": time.time_ns() // 1_000_000}
                with trio.CancelScope(shield=True):
                    await node.write("charge", key, value)
                self.charged += a.price
            finally:
                self._release(a)
