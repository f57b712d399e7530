"""The sync protocol on the wire: one reconciliation session per libp2p stream.

Both ends run the same state machine (crdt/reconcile.py). Frames are length-prefixed and
bounded; every read has a timeout and the whole session a deadline, so a silent or slow peer
costs one stream, not a stuck task. What a peer can make us hold is bounded by the frame size
and by the store's per-source pending buffer. Writes go through a separate task so that two
peers sending big Hellos at the same time cannot deadlock on flow-control windows.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import trio

from formation.crdt.async_store import AsyncStore
from formation.crdt.reconcile import MAX_MESSAGE_BYTES, Reconciler, decode, encode

from .framing import read_frame, write_frame

PROTOCOL = "/formation/sync/1"
# Generous: after sending a big answer we wait for the peer's Done while it verifies and stores
# everything we sent (100,000 ops take ~40 s on a small machine).
READ_TIMEOUT = 300.0
SESSION_TIMEOUT = 1800.0

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


def _watermark_key(peer: str) -> str:
    return f"sync-watermark/{peer}"


def _load_watermark(store, peer: str) -> int:
    raw = store.get_meta(_watermark_key(peer))
    return int(raw) if raw else 0


def _save_watermark(store, peer: str, seq: int) -> None:
    store.set_meta(_watermark_key(peer), str(seq).encode())


async def run_session(stream, astore: AsyncStore, peer: str) -> SyncResult:
    """Reconcile with the peer at the other end of `stream`; closes the stream."""
    t0 = time.monotonic()
    watermark = await astore.run(_load_watermark, astore.store, peer)
    rec = Reconciler(astore.store, watermark=watermark, peer=peer)
    out_send, out_recv = trio.open_memory_channel(math.inf)

    async def writer():
        async with out_recv:
            async for msg in out_recv:
                await write_frame(stream, encode(msg))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            async with out_send:
                for m in await astore.run(rec.start):
                    out_send.send_nowait(m)
                with trio.fail_after(SESSION_TIMEOUT):
                    while not rec.finished:
                        with trio.fail_after(READ_TIMEOUT):
                            data = await read_frame(stream, MAX_MESSAGE_BYTES)
                        msg = decode(data)
                        for m in await astore.run(rec.receive, msg):
                            out_send.send_nowait(m)
        if rec.new_watermark is not None:
            await astore.run(_save_watermark, astore.store, peer, rec.new_watermark)
    finally:
        with trio.move_on_after(2) as cs:
            cs.shield = True
            try:
                await stream.close()
            except Exception:  # the peer may already be gone; nothing left to tell it
                pass
    return SyncResult(peer, bool(rec.peer_done and rec.sent_done), rec.ops_sent, rec.ops_received,
                      rec.ops_accepted, rec.rejected, 1 + rec.need_rounds, time.monotonic() - t0)
