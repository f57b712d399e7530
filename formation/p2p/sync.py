"""The sync protocol on the wire: one reconciliation session per libp2p stream.

Both ends run the same state machine (crdt/reconcile.py). Frames are length-prefixed and
bounded; every read has a timeout and the whole session a deadline, so a silent or slow peer
costs one stream, not a stuck task. What a peer can make us hold is bounded by the frame size
and by the store's per-source pending buffer. Writes go through a separate task so that two
peers sending big Hellos (and big answers to them) at the same time cannot deadlock on
flow-control windows.

What a peer can make us send is bounded too: for a peer that does not read, the session stops
reading once OUT_BATCHES answers wait behind the one being written; a session answers at most
MAX_ROUNDS Need messages; and the op bytes one peer gets from us are metered by a ServeBudget
(a session with a peer whose budget is spent ends at its next Hello or Need).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import trio

from formation.buckets import TokenBuckets
from formation.crdt.async_store import AsyncStore
from formation.crdt.reconcile import (
    MAX_MESSAGE_BYTES,
    MAX_ROUNDS,
    Hello,
    Need,
    Ops,
    ProtocolError,
    Reconciler,
    decode,
    encode,
)

from .framing import read_frame, write_frame

PROTOCOL = "/formation/sync/1"
# Generous: after sending a big answer we wait for the peer's Done while it verifies and stores
# everything we sent (100,000 ops take ~40 s on a small machine).
READ_TIMEOUT = 300.0
SESSION_TIMEOUT = 1800.0
# Answers (all the messages of one Reconciler step) queued behind the one being written. Whole
# answers, not chunks: the reconciler builds an answer in one piece anyway, and the session must
# keep reading (ingesting the peer's Ops) while its answer to the peer's Hello goes out, or two
# peers answering each other at once both stop reading and deadlock on flow control.
OUT_BATCHES = 1

log = logging.getLogger("formation.p2p.sync")


@dataclass
class SyncResult:
    peer: str
    ok: bool
    ops_sent: int
    ops_received: int
    ops_accepted: int
    rejected: int
    round_trips: int
    seconds: float
    since_ops: int = 0  # ops in our Hello's filter: delivered here since the last session with the peer


def _watermark_key(peer: str) -> str:
    return f"sync-watermark/{peer}"


def _load_watermark(store, peer: str) -> int:
    raw = store.get_meta(_watermark_key(peer))
    return int(raw) if raw else 0


def _save_watermark(store, peer: str, seq: int) -> None:
    store.set_meta(_watermark_key(peer), str(seq).encode())


class BudgetExhausted(Exception):
    """The peer has had its share of our ops for now."""


class ServeBudget:
    """Op bytes each peer may get from us per window: one token bucket per peer.

    A peer can ask for the same large range again and again (a Hello with an empty filter gets
    our whole log since its watermark; Need re-requests ops by id). The bucket may go below zero:
    an answer already allowed is sent whole (an honest catch-up larger than the bucket still
    completes), and the peer then waits until the debt is refilled at capacity/window per second.
    """

    MAX_PEERS = 4096  # buckets kept (buckets.TokenBuckets: the least recently charged go first)

    def __init__(self, capacity: int, window: float, clock=trio.current_time):
        self.capacity = capacity
        self.window = window
        self.clock = clock
        self._buckets = TokenBuckets(capacity / window, capacity, max_keys=self.MAX_PEERS, clock=clock)
        self._logged: dict[str, float] = {}  # peer -> when its refusal was last logged

    def tokens(self, peer: str) -> float:
        return self._buckets.tokens(peer)

    def allows(self, peer: str) -> bool:
        if self.tokens(peer) > 0:
            return True
        now = self.clock()
        if now - self._logged.get(peer, -self.window) >= self.window:
            if len(self._logged) >= self.MAX_PEERS:
                self._logged.clear()  # only what is logged when: forgetting it logs once more
            self._logged[peer] = now  # a refused peer retries often: say it once per window
            log.warning("sync budget of %s spent (%d bytes per %.0f s); refusing its sessions",
                        peer[-8:], self.capacity, self.window)
        return False

    def charge(self, peer: str, nbytes: int) -> None:
        self._buckets.charge(peer, nbytes)


async def run_session(stream, astore: AsyncStore, peer: str, budget: ServeBudget | None = None) -> SyncResult:
    """Reconcile with the peer at the other end of `stream`; closes the stream (resets it on
    failure). With a budget, the ops we send are charged to `peer`, and its Hello or Need is
    refused (BudgetExhausted) once the budget is spent."""
    t0 = time.monotonic()
    watermark = await astore.run(_load_watermark, astore.store, peer)
    rec = Reconciler(astore.store, watermark=watermark, peer=peer)
    out_send, out_recv = trio.open_memory_channel(OUT_BATCHES)
    needs = 0
    clean = False

    async def writer():
        async with out_recv:
            async for batch in out_recv:
                for msg in batch:
                    await write_frame(stream, encode(msg))

    async def send(batch):
        nbytes = sum(len(w) for m in batch if isinstance(m, Ops) for w in m.wires)
        if budget is not None and nbytes:
            budget.charge(peer, nbytes)
        if batch:
            await out_send.send(batch)  # waits while the writer is behind: backpressure

    try:
        with trio.fail_after(SESSION_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                async with out_send:
                    await send(await astore.run(rec.start))
                    while not rec.finished:
                        with trio.fail_after(READ_TIMEOUT):
                            data = await read_frame(stream, MAX_MESSAGE_BYTES)
                        msg = decode(data)
                        if isinstance(msg, Need):
                            # we ask at most MAX_ROUNDS times; an honest peer asks no more
                            needs += 1
                            if needs > MAX_ROUNDS:
                                raise ProtocolError(f"more than {MAX_ROUNDS} Need messages")
                        if isinstance(msg, Hello | Need) and budget is not None and not budget.allows(peer):
                            raise BudgetExhausted(f"sync budget of {peer[-8:]} is spent")
                        await send(await astore.run(rec.receive, msg))
        if rec.new_watermark is not None:
            await astore.run(_save_watermark, astore.store, peer, rec.new_watermark)
        clean = True
    finally:
        with trio.move_on_after(2) as cs:
            cs.shield = True
            try:
                # a reset tells the peer at once that the session failed (no waiting for Done)
                await (stream.close() if clean else stream.reset())
            except Exception:  # the peer may already be gone; nothing left to tell it
                pass
    return SyncResult(peer, bool(rec.peer_done and rec.sent_done), rec.ops_sent, rec.ops_received,
                      rec.ops_accepted, rec.rejected, 1 + rec.need_rounds, time.monotonic() - t0,
                      rec.since_ops)
