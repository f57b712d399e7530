"""Charging calls in credits (docs/economy.md): balances read from the state, the admission of a
priced call against the caller's purse at this node, this node's `charge` records, and the
moves of credits out of its purses that their accounts asked for.

A priced call is admitted when the caller's purse here (crdt/credits.py), less what this node
has admitted and not yet charged (calls in flight), covers the call's hold. Only this node takes
credits out of its purses, and it does so under one lock: its own view of a purse is never above
the truth (others only add to it), so no purse goes negative, partition or not. Once the agent
answered (a status under 500) the node rewrites its cumulative `charge` record for (caller,
agent, host, itself) with what the call cost (its hold at most).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import trio

from formation.crdt.credits import Price, balance_of, has_economy
from formation.crdt.kinds import get_kind
from formation.crdt.kinds.credit_kinds import charge_key, rent_key, subscription_key
from formation.crdt.kinds.fog_kinds import operator_share_percent
from formation.crdt.op import OpError

from .api.auth import AuthError, ReplayGuard

log = logging.getLogger("formation.charging")

SUBSCRIPTION_FIELDS = ("consumer", "agent_id", "node", "creator", "plan", "purchases", "credits", "calls_bought",
                       "calls_used", "expires_at")
MAX_GRANTS = 10_000  # grants to one account a balance reads
MAX_CHARGES = 100_000  # charge records naming one account (as consumer, creator or host)
MAX_MOVES = 10_000  # moves of one account a balance reads
MAX_MOVE_REQUESTS = 1_000  # requests to move credits out of this node read per page
MAX_MOVE_SCAN = 100_000  # requests read per pass
MOVE_PASS_GAP_S = 1.0
HOUR_MS = 3_600_000
SHORT_RETRY_S = 30.0  # a request the purse could not cover is tried again after this


def _naming(store, kind: str, who: str) -> list[dict]:
    """The records of `kind` (a NodeLedger) naming `who` in any of the three roles its index
    holds (who pays, who is paid, the third party), each once."""
    roles = get_kind(kind).ROLES
    found: dict[str, dict] = {}
    for index, role in zip(("owner", "type", "text"), roles, strict=True):
        for rec in store.list(kind, **{index: who}, limit=MAX_CHARGES):
            if rec[role] == who:
                found[rec["record_version"]] = rec
    return list(found.values())


def calls_left(sub: dict | None, now_ms: int) -> int:
    if sub is None or now_ms >= sub["expires_at"]:
        return 0
    return max(0, sub["calls_bought"] - sub["calls_used"])


def ledger(store, fog_id: str | None, who: str) -> dict:
    """`who`'s credits in this node's view: balance_of's figures (with its purses), the grants
    that count, and the fog's treasury and split."""
    fog = store.get("fog", fog_id) if fog_id else None
    members = store.fog_members(fog_id) if fog_id else frozenset()
    grants = store.list("grant", owner=who, type=fog_id, limit=MAX_GRANTS) if has_economy(fog) else []
    grants = [g for g in grants if g["treasury"] == fog["treasury"]]
    moves = store.list("credit_moved", owner=who, limit=MAX_MOVES) if has_economy(fog) else []
    charges, subs, rents = ((_naming(store, kind, who) if has_economy(fog) else [])
                            for kind in ("charge", "subscription", "rent"))
    out = balance_of(who, account=store.get("account", who), grants=grants, charges=charges,
                     moves=moves, members=members, fog=fog, subscriptions=subs, rents=rents)
    now = time.time_ns() // 1_000_000
    out["subscriptions"] = [{"agent_id": sub["agent_id"], "node": sub["node"], "plan": sub["plan"],
                             "calls_left": calls_left(sub, now), "calls_used": sub["calls_used"],
                             "expires_at": sub["expires_at"]}
                            for sub in sorted(subs, key=lambda x: (x["agent_id"], x["node"]))
                            if sub["consumer"] == who and sub["node"] in members]
    out.update(fog_id=fog_id, treasury=fog.get("treasury") if fog else None,
               operator_share_percent=operator_share_percent(fog),
               grants=[{k: g[k] for k in ("grant_id", "amount", "at", "memo", "created_at")}
                       for g in sorted(grants, key=lambda g: (g["created_at"], g["grant_id"]))])
    return out


# What leaves a purse, by the records of the node that holds it: kind -> the field it takes
DEBITS = {"charge": "credits", "subscription": "credits", "rent": "credits", "credit_moved": "amount"}


def debits_at(store, who: str, node: str) -> int | None:
    """What `who` spent or moved out of its purse at `node`, read exactly from `node`'s own
    records (the view's lists are bounded, and other members' records naming `who` could push
    these out of them: a debit missed would let the node spend credits twice). None past the
    bound: the node then admits nothing for `who` rather than guess."""
    total = 0
    for kind, amount in DEBITS.items():
        rows = store.written_by(kind, who, node, MAX_CHARGES + 1)
        if len(rows) > MAX_CHARGES:
            return None
        total += sum(r[amount] for r in rows)
    return total


def purse_here(store, fog_id: str | None, who: str, node: str) -> tuple[dict, int]:
    """`who`'s figures (ledger) and what its purse at `node` holds: what came in as the view
    counts it (a record cut from a bounded list only lowers it) less the exact debits."""
    figures = ledger(store, fog_id, who)
    p = next((x for x in figures["purses"] if x["node"] == node), None)
    came_in = p["granted"] + p["moved_in"] + p["earned"] if p else 0
    debits = debits_at(store, who, node)
    return figures, 0 if debits is None else came_in - debits


class InsufficientCredits(Exception):
    def __init__(self, balance: int, available: int, price: int, elsewhere: dict[str, int]):
        super().__init__(f"balance {balance}, available {available}, price {price}")
        self.balance, self.available, self.price, self.elsewhere = balance, available, price, elsewhere


class NoSuchPlan(Exception):
    pass


class Replayed(Exception):
    """A signature already used for a charged call (a replay would spend the caller's credits)."""


class NotNamed(Exception):
    """A call that may spend credits whose signed path does not name this node (`node=`)."""


@dataclass
class Admission:
    consumer: str
    agent_id: str
    creator: str
    price: Price
    held: int  # credits held for the call until it is charged or released
    plan: bool = False  # a call of the consumer's plan bought here (no credits)
    settled: bool = False


class Charger:
    """This node's admissions of priced calls, its charge records and the moves it carries out."""

    def __init__(self, node) -> None:
        self.node = node
        self.lock = trio.Lock()
        self.inflight: dict[str, int] = {}  # credits held per consumer by calls in flight
        self.plan_inflight: dict[tuple[str, str], int] = {}  # plan calls in flight per (consumer, agent)
        self.charged = 0  # credits this node charged since it started (for /metrics)
        self.refused = 0  # calls refused for want of credits
        self.replays = ReplayGuard()  # signatures of calls admitted for charging
        self.clock = lambda: time.time_ns() // 1_000_000  # unix ms (tests set it)
        self._moved: set[str] = set()  # move requests carried out (ids)
        self._short: dict[str, float] = {}  # move requests the purse could not cover: next try

    async def balance(self, who: str) -> dict:
        node = self.node
        return await node.astore.run(ledger, node.astore.store, node.fog_id, who)

    async def _available(self, who: str) -> tuple[dict, int]:
        """`who`'s figures and what its purse here holds less the calls in flight (under the lock)."""
        node = self.node
        figures, here = await node.astore.run(purse_here, node.astore.store, node.fog_id, who, node.address)
        return figures, here - self.inflight.get(who, 0)

    def _refusal(self, figures: dict, available: int, price: int) -> InsufficientCredits:
        self.refused += 1
        elsewhere = {p["node"]: p["held"] for p in figures["purses"] if p["node"] != self.node.address and p["held"] > 0}
        return InsufficientCredits(figures["balance"], available, price, elsewhere)

    async def economy(self) -> bool:
        node = self.node
        return bool(node.fog_id) and has_economy(await node.astore.get("fog", node.fog_id))

    def take_signature(self, signature: bytes, named: str | None) -> None:
        """A call that spends credits is paid once in the whole fog: its signed path names this
        node (NotNamed otherwise: a call signed for one node cannot be replayed at another) and
        this node takes its signature once (Replayed)."""
        if (named or "").lower() != self.node.address:
            raise NotNamed()
        try:
            self.replays.check_and_remember(signature[:64], time.time())
        except AuthError:
            raise Replayed() from None

    async def admit(self, consumer: str, agent_id: str, creator: str, price: Price,
                    plans_only: bool = False, signature: bytes = b"", named: str | None = None) -> Admission | None:
        """None when the fog has no economy or the call is free (nothing is charged); a plan
        call when the consumer bought a plan of the agent here with calls left (less those in
        flight); else InsufficientCredits unless the consumer's purse here, less the calls in
        flight through this node, covers the hold. A call that may be charged takes its request's
        signature once, and only if it names this node (take_signature): free calls may be sent
        again, paid ones are paid once."""
        if consumer == creator or not await self.economy():
            return None
        self.take_signature(signature, named)
        node = self.node
        async with self.lock:
            sub = await node.astore.get("subscription", subscription_key(consumer, agent_id, node.address))
            flying = self.plan_inflight.get((consumer, agent_id), 0)
            if calls_left(sub, time.time_ns() // 1_000_000) > flying:
                self.plan_inflight[(consumer, agent_id)] = flying + 1
                return Admission(consumer, agent_id, creator, price, 0, plan=True)
        if not price:
            if plans_only:  # sold by plan alone: no plan, no call
                self.refused += 1
                raise InsufficientCredits(0, 0, 0, {})
            return None
        hold = price.hold()
        async with self.lock:
            figures, available = await self._available(consumer)
            if available < hold:
                raise self._refusal(figures, available, hold)
            self.inflight[consumer] = self.inflight.get(consumer, 0) + hold
        return Admission(consumer, agent_id, creator, price, hold)

    def _release(self, a: Admission) -> None:
        if a.plan:
            n = self.plan_inflight.get((a.consumer, a.agent_id), 0) - 1
            if n > 0:
                self.plan_inflight[(a.consumer, a.agent_id)] = n
            else:
                self.plan_inflight.pop((a.consumer, a.agent_id), None)
            return
        left = self.inflight.get(a.consumer, 0) - a.held
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

    async def settle(self, a: Admission, host: str, tokens: tuple[int, int] | None) -> None:
        """The call was answered by a replica on `host`: this node's cumulative charge record
        grows by what it cost (at most its hold)."""
        if a.settled:
            return
        a.settled = True
        if a.plan:
            await self._use_plan_call(a)
            return
        node = self.node
        tin, tout = tokens or (0, 0)
        cost = min(a.held, a.price.cost(tin, tout))
        key = charge_key(a.consumer, a.agent_id, host, node.address)
        async with self.lock:
            try:
                old = await node.astore.get("charge", key) or {}
                value = {"consumer": a.consumer, "agent_id": a.agent_id, "host": host, "node": node.address,
                         "creator": a.creator, "calls": old.get("calls", 0) + 1,
                         "credits": old.get("credits", 0) + cost,
                         "tokens_in": old.get("tokens_in", 0) + tin, "tokens_out": old.get("tokens_out", 0) + tout,
                         "updated_at": time.time_ns() // 1_000_000}
                with trio.CancelScope(shield=True):
                    await node.write("charge", key, value)
                self.charged += cost
            finally:
                self._release(a)

    async def _use_plan_call(self, a: Admission) -> None:
        node = self.node
        key = subscription_key(a.consumer, a.agent_id, node.address)
        async with self.lock:
            try:
                sub = await node.astore.get("subscription", key)
                value = {**{k: sub[k] for k in SUBSCRIPTION_FIELDS}, "calls_used": sub["calls_used"] + 1,
                         "updated_at": time.time_ns() // 1_000_000}
                with trio.CancelScope(shield=True):
                    await node.write("subscription", key, value)
            finally:
                self._release(a)

    async def subscribe(self, consumer: str, agent: dict, plan_name: str) -> dict:
        """`consumer` buys plan `plan_name` of `agent` here: its price leaves the consumer's purse
        here (InsufficientCredits otherwise) and the plan's calls are usable through this node
        for its days. Calls left of an earlier purchase still running are kept (and its end
        moves to the new one's); those of an expired one are forfeited. NoSuchPlan if the agent
        sells no such plan."""
        plan = (agent.get("plans") or {}).get(plan_name)
        if plan is None:
            raise NoSuchPlan(plan_name)
        node = self.node
        key = subscription_key(consumer, agent["agent_id"], node.address)
        async with self.lock:
            figures, available = await self._available(consumer)
            if available < plan["price_credits"]:
                raise self._refusal(figures, available, plan["price_credits"])
            old = await node.astore.get("subscription", key)
            now = time.time_ns() // 1_000_000
            used = old["calls_used"] if old else 0
            value = {"consumer": consumer, "agent_id": agent["agent_id"], "node": node.address,
                     "creator": agent["owner"], "plan": plan_name,
                     "purchases": (old["purchases"] if old else 0) + 1,
                     "credits": (old["credits"] if old else 0) + plan["price_credits"],
                     "calls_bought": used + calls_left(old, now) + plan["calls"], "calls_used": used,
                     "expires_at": now + plan["days"] * 86_400_000, "updated_at": now}
            with trio.CancelScope(shield=True):
                await node.write("subscription", key, value)
            self.charged += plan["price_credits"]
        return value

    # ---- rent: hours of instance time of priced models ----------------------------------------

    async def rent_due(self, inst: dict) -> str:
        """Called by the scheduler before it runs (or keeps running) its replica of `inst`: ""
        when the replica may run: no rent applies (no economy, no priced model bound, or the
        instance's owner owns the model), or the hour under way is paid, or the owner's purse here
        pays the next one now (in advance, a whole hour: a replica never runs unpaid). Otherwise
        why it may not, for its status (the scheduler stops it until the purse covers an hour)."""
        node = self.node
        model_id = inst.get("model_id")
        if not model_id or not await self.economy():
            return ""
        model = await node.astore.get("model", model_id)
        price = (model or {}).get("price_credits_per_hour") or 0
        payer = inst["owner"]
        if not price or model["owner"] == payer:
            return ""
        key = rent_key(payer, inst["instance_id"], node.address)
        now = self.clock()
        async with self.lock:
            old = await node.astore.get("rent", key)
            if old is not None and old["paid_until"] > now:
                return ""
            _, available = await self._available(payer)
            if available < price:
                self.refused += 1
                return (f"waiting for credits: model {model_id} costs {price} credits an hour of instance time and "
                        f"its owner {payer} has {available} at this node ({node.address}); `form account move` "
                        "brings credits here, then it starts")
            value = {"payer": payer, "instance_id": inst["instance_id"], "node": node.address,
                     "creator": model["owner"], "model_id": model_id,
                     "hours": (old["hours"] if old else 0) + 1, "credits": (old["credits"] if old else 0) + price,
                     "paid_until": max(now, old["paid_until"] if old else 0) + HOUR_MS, "updated_at": now}
            with trio.CancelScope(shield=True):
                await node.write("rent", key, value)
            self.charged += price
        return ""

    # ---- moves out of this node's purses ------------------------------------------------------

    async def carry_out_moves(self) -> int:
        """Carry out the accounts' requests to move credits out of their purses here (in the
        order they were signed): each once, in full when the purse (less calls in flight) covers
        it, else as much as it holds (a move never makes a purse negative). Returns how many."""
        node = self.node
        if not await self.economy():
            return 0
        asked: list[dict] = []
        while len(asked) < MAX_MOVE_SCAN:  # every request ever addressed here: few, and cheap to skip
            page = await node.astore.list("credit_move", type=node.address, limit=MAX_MOVE_REQUESTS,
                                          offset=len(asked))
            asked += page
            if len(page) < MAX_MOVE_REQUESTS:
                break
        now = time.monotonic()
        done = 0
        for req in sorted(asked, key=lambda r: (r["created_at"], r["move_id"])):
            key = f"{req['move_id']}@{node.address}"
            if req["move_id"] in self._moved or self._short.get(req["move_id"], 0) > now:
                continue
            if await node.astore.get("credit_moved", key) is not None:
                self._moved.add(req["move_id"])
                continue
            async with self.lock:
                _, free = await self._available(req["account"])
                amount = min(req["amount"], free)
                if amount <= 0:  # nothing to move now: tried again a while later
                    self._short[req["move_id"]] = now + SHORT_RETRY_S
                    continue
                value = {"move_id": req["move_id"], "account": req["account"], "from_node": node.address,
                         "to_node": req["to_node"], "amount": amount, "moved_at": time.time_ns() // 1_000_000}
                try:
                    with trio.CancelScope(shield=True):
                        await node.write("credit_moved", key, value)
                except OpError as exc:  # a bug or a full disk: the next pass tries again
                    log.warning("could not carry out credit move %s: %s", req["move_id"], exc)
                    continue
            self._moved.add(req["move_id"])
            self._short.pop(req["move_id"], None)
            done += 1
        return done

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Carry out move requests as the state changes (and every few seconds: a purse may
        have been short when a request came)."""
        task_status.started()
        seen = 0
        while True:
            try:
                await self.carry_out_moves()
            except Exception:  # noqa: BLE001 - one pass failing must not end the node
                log.exception("credit moves: pass failed")
            await trio.sleep(MOVE_PASS_GAP_S)  # a busy node commits often: one pass a second at most
            with trio.move_on_after(5):
                seen = await self.node.changes.wait_past(seen)
