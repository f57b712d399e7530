"""Op batches pushed along a tree of long-lived streams: plumtree (eager/lazy push) over libp2p.

Gossipsub costs a node milliseconds per message copy (a task, protobuf, its bookkeeping, a
signature) and hands it 1.6-2.4 copies of each (docs/benchmarks.md). Here each node keeps one
outbound stream per peer, and peers are eager (a batch goes to them whole, at once) or lazy (they
get its id in an IHAVE a moment later). A batch that brings nothing new prunes the link it came
on to lazy, so the eager links settle to a tree and a node reads about one copy of each batch;
an IHAVE naming a batch that does not come in time makes the node GRAFT it from the announcer,
which puts that link back in the tree (so the tree heals when a peer goes away). What the tree
still misses, the sync fallback (gaps, periodic sessions) brings.

A batch is the gossip encoding (gossip.encode_batch) and goes through the same checks as a
gossip message (BatchValidator.check: form, signatures, author budget; ops held already are
skipped) before it is forwarded, then to the store, which applies the rules. The adversary is any
peer: frames, queues, IHAVE lists, GRAFTs and the batches kept for re-sending are all bounded; a
peer that breaks framing or sends an invalid batch is struck like an invalid gossip forwarder
(enough for a ban) and its stream is dropped. A peer that reads slowly loses frames (counted),
which sync repairs, instead of growing our memory.
"""

from __future__ import annotations

import contextlib
import logging
import random
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from formation.buckets import TokenBuckets
from formation.crdt.keys import sha256

from .framing import FrameError, read_frame
from .gossip import MAX_BATCH_BYTES, BatchError, BatchValidator, batch_wires

PROTOCOL = "/formation/push/1"
BATCH, IHAVE, GRAFT, PRUNE = 1, 2, 3, 4
ID_BYTES = 32
MAX_FRAME = 1 + MAX_BATCH_BYTES + 64 * 1024  # what batch_wires accepts, and the kind byte
MAX_IDS = 256  # batch ids in one IHAVE or GRAFT
PRUNE_AGAIN = 0.5  # seconds between PRUNEs to a peer that keeps pushing to us
WRITE_TIMEOUT = 30.0  # a peer that takes longer to take a write loses the link

log = logging.getLogger("formation.p2p.push")


class Hostile(Exception):
    """The peer sent what no honest node sends."""


@dataclass
class PushLimits:
    eager_max: int = 4  # links eager when they open; GRAFTs add more
    # a second copy prunes its link only while more than this many links are eager: two nodes
    # pruning two links of one cycle at once can cut a bare tree in two (repaired only by
    # IHAVE/GRAFT, ~1 s); two eager links each keep the fog connected at the price of a copy
    eager_floor: int = 2
    # Every ihave_delay, the ids of the batches that came (or that we published) since go in
    # one IHAVE to `ihave_fanout` lazy links picked at random: what a node reads in IHAVEs is
    # then about fanout / delay frames a second, whatever the fog's size and write rate (to
    # every lazy link, they were ~6 frames per op per node at 12.5 ops/s over 10 nodes).
    ihave_delay: float = 0.5
    ihave_fanout: int = 3
    # an announced batch not received by then is grafted: under the sync fallback's gap grace
    # (P2PSettings.gap_grace, 1 s), so the tree repairs a miss before a sync session is paid for
    graft_timeout: float = 0.5
    # ... or twice how late eager copies have come after the first IHAVE for them, recently,
    # up to this: on a loaded node a copy queued behind others is late, not lost, and grafting
    # it would add a copy (and the PRUNE of a good link) per batch
    graft_timeout_max: float = 10.0
    queue_frames: int = 512  # frames queued to one peer ...
    queue_bytes: int = 16 * 1024 * 1024  # ... and their bytes; past either, batches are dropped
    grafts_per_s: float = 64.0  # batch ids one peer may graft from us per second (burst 2 x MAX_IDS)
    kept_batches: int = 512  # recent batches kept to answer GRAFTs ...
    kept_bytes: int = 32 * 1024 * 1024  # ... and their bytes
    # a new link starts with the batches of the last few seconds (as gossipsub replays its
    # message cache to a new peer): a node that just connected has the fog's latest writes
    # before its first sync session ends
    replay_seconds: float = 5.0
    seen_ids: int = 16384  # batch ids remembered as received
    missing_ids: int = 4096  # announced batch ids waited for


def frame(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IB", len(payload) + 1, kind) + payload


class Link:
    """Our outbound stream to one peer and what waits to be written on it."""

    def __init__(self, peer: str, eager: bool):
        self.peer = peer
        self.eager = eager
        self.frames: list[bytes] = []
        self.bytes = 0
        self.wake = trio.Event()
        self.pruned_at = -1e9
        self.scope = trio.CancelScope()

    def offer(self, data: bytes, limits: PushLimits, control: bool = False) -> bool:
        """Queue a frame; False (dropped) past the bounds. Control frames are tiny and get
        some room past the bounds, so a full queue of batches still carries PRUNE and GRAFT."""
        slack = 64 if control else 0
        if len(self.frames) >= limits.queue_frames + slack or (
                self.bytes + len(data) > limits.queue_bytes + slack * 1024 and self.frames):
            return False
        self.frames.append(data)
        self.bytes += len(data)
        self.wake.set()
        return True

    def take(self) -> list[bytes]:
        frames, self.frames, self.bytes = self.frames, [], 0
        self.wake = trio.Event()
        return frames


class PushRouter:
    """The plumtree state of one node: links, eager/lazy, recent batches, announced ids.

    `deliver(peer, ops)` hands verified ops to the store (it may block: back-pressure on the
    peer's stream); `allowed(peer)` says whether a peer may use the protocol (not blocked);
    `busy()` whether verified batches wait for the store: then nothing is grafted (what we
    wait for is likely unread in a stream behind them, and a second copy would only queue
    there too)."""

    def __init__(self, host, validator: BatchValidator, stats,
                 deliver: Callable[[str, list], Awaitable[None]], allowed: Callable[[str], bool],
                 limits: PushLimits | None = None, busy: Callable[[], bool] = lambda: False):
        self.host = host
        self.validator = validator
        self.stats = stats
        self.deliver = deliver
        self.allowed = allowed
        self.busy = busy
        self.limits = limits or PushLimits()
        self.links: dict[str, Link] = {}
        self.readers: dict[str, trio.CancelScope] = {}
        self.opening: set[str] = set()
        self.no_push: dict[str, float] = {}  # peers whose stream could not open -> retry after
        self.kept: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()  # batch id -> (batch, when)
        self.kept_bytes = 0
        self.seen: OrderedDict[bytes, None] = OrderedDict()
        # batch id -> (when to graft it, peers that announced it, when the first did)
        self.missing: OrderedDict[bytes, tuple[float, list[str], float]] = OrderedDict()
        self.late = 0.0  # how long after its first IHAVE a batch arrives, recently (seconds)
        self.announce: list[bytes] = []  # batch ids for the next IHAVEs
        self.checking: dict[bytes, trio.Event] = {}  # batch ids being checked now
        self.inflight: set[bytes] = set()  # op ids verified, not yet in the store
        self.grafts = TokenBuckets(self.limits.grafts_per_s, 2 * MAX_IDS)
        self._nursery: trio.Nursery | None = None

    # ---- running -----------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.host.set_stream_handler(PROTOCOL, self._serve)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._ticker)
                task_status.started()
        finally:
            self._nursery = None
            for scope in list(self.readers.values()):
                scope.cancel()

    def maintain(self, connected: set[str]) -> None:
        """Open a link to each connected peer that has none; drop links to peers gone."""
        for peer in [p for p in self.links if p not in connected or not self.allowed(p)]:
            self.links[peer].scope.cancel()
        for peer in [p for p in self.readers if p not in connected or not self.allowed(p)]:
            self.readers[peer].cancel()
        for peer in [p for p in self.no_push if p not in connected]:
            del self.no_push[peer]
        if self._nursery is None:
            return
        now = trio.current_time()
        for peer in connected:
            if (peer not in self.links and peer not in self.opening and self.allowed(peer)
                    and now >= self.no_push.get(peer, 0.0)):
                self.opening.add(peer)
                self._nursery.start_soon(self._link, peer)

    def connected(self, peer: str) -> None:
        """A new connection: its link opens now rather than at the next `maintain`."""
        if (self._nursery is not None and peer not in self.links and peer not in self.opening
                and self.allowed(peer)):
            self.opening.add(peer)
            self._nursery.start_soon(self._link, peer)

    def lacking(self, connected: set[str]) -> bool:
        """Whether a connected peer has no push link (an older node: gossipsub must carry ours)."""
        return any(p not in self.links for p in connected if self.allowed(p))

    # ---- sending -----------------------------------------------------------------------------

    def publish(self, data: bytes) -> None:
        """A batch of our own store's ops, to every eager link now and every lazy one later."""
        bid = sha256(data)
        self._remember(bid, data)
        self._forward(bid, frame(BATCH, data), None)

    def _forward(self, bid: bytes, data: bytes, source: str | None) -> None:
        for link in list(self.links.values()):
            if link.eager and link.peer != source:
                self._send(link, data)
        if len(self.announce) < MAX_IDS:
            self.announce.append(bid)

    def _send(self, link: Link, data: bytes, control: bool = False) -> None:
        if not link.offer(data, self.limits, control):
            self.stats.push_dropped += 1

    def _remember(self, bid: bytes, data: bytes) -> None:
        self._saw(bid)
        if len(data) > self.limits.kept_bytes // 4:
            return
        self.kept[bid] = (data, trio.current_time())
        self.kept_bytes += len(data)
        while len(self.kept) > self.limits.kept_batches or self.kept_bytes > self.limits.kept_bytes:
            _, (old, _) = self.kept.popitem(last=False)
            self.kept_bytes -= len(old)

    def _saw(self, bid: bytes) -> None:
        self.seen[bid] = None
        self.seen.move_to_end(bid)
        while len(self.seen) > self.limits.seen_ids:
            self.seen.popitem(last=False)
        self.missing.pop(bid, None)

    def _prune(self, peer: str) -> None:
        """Off the tree: the link between us carried a batch that brought nothing. The peer
        is told even when our side of the link is lazy already (it may still count us eager),
        at most every PRUNE_AGAIN seconds."""
        link = self.links.get(peer)
        if link is None:
            return
        now = trio.current_time()
        if link.eager and sum(1 for x in self.links.values() if x.eager) <= self.limits.eager_floor:
            return
        if link.eager or now - link.pruned_at >= PRUNE_AGAIN:
            was, link.eager, link.pruned_at = link.eager, False, now
            self.stats.push_prunes += 1
            self._send(link, frame(PRUNE), control=True)
            if was:
                self._replace_eager()

    def _graft(self, peer: str, ids: list[bytes]) -> None:
        link = self.links.get(peer)
        if link is None:
            return
        link.eager = True
        self.stats.push_grafts += 1
        self._send(link, frame(GRAFT, b"".join(ids[:MAX_IDS])), control=True)

    async def _link(self, peer: str) -> None:
        """Open our stream to the peer and write what is queued for it, until either side ends."""
        from libp2p.peer.id import ID

        try:
            with trio.fail_after(10):
                stream = await self.host.new_stream(ID.from_base58(peer), [PROTOCOL])
        except Exception as exc:  # noqa: BLE001 - an older node, or gone: gossipsub and sync carry ops
            self.no_push[peer] = trio.current_time() + 30.0
            log.debug("no push stream to %s: %r", peer[-8:], exc)
            return
        finally:
            self.opening.discard(peer)
        self.no_push.pop(peer, None)
        eager = sum(1 for link in self.links.values() if link.eager) < self.limits.eager_max
        link = self.links[peer] = Link(peer, eager)
        since = trio.current_time() - self.limits.replay_seconds
        for data, at in list(self.kept.values()):
            if at >= since:
                self._send(link, frame(BATCH, data))
        try:
            with link.scope:
                while True:
                    await link.wake.wait()
                    frames = link.take()
                    self.stats.rpcs_out += len(frames)
                    payload = b"".join(frames)
                    self.stats.rpc_bytes_out += len(payload)
                    with trio.fail_after(WRITE_TIMEOUT):
                        await stream.write(payload)
        except Exception as exc:  # noqa: BLE001 - the link is gone; a new one opens if the peer is still there
            log.debug("push link to %s ended: %r", peer[-8:], exc)
        finally:
            if self.links.get(peer) is link:
                del self.links[peer]
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                with contextlib.suppress(Exception):
                    await stream.reset()
            if link.eager:
                self._replace_eager()

    def _replace_eager(self) -> None:
        """An eager link went away (pruned, or closed): if none is left, graft a lazy one
        (IHAVE/GRAFT heals the rest), so the node stays on the tree without waiting for a
        batch to be missed (two pruned links at once can leave a node with none)."""
        if any(link.eager for link in self.links.values()):
            return
        lazy = [link for link in self.links.values() if not link.eager]
        if lazy:
            self._graft(random.choice(lazy).peer, [])

    async def _ticker(self) -> None:
        """IHAVEs to lazy links, and GRAFTs for announced batches that did not come."""
        tick, next_ihave = 0.1, 0.0
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            if now >= next_ihave:
                next_ihave = now + self.limits.ihave_delay
                lazy = [link for link in self.links.values() if not link.eager]
                if self.announce and lazy:
                    data = frame(IHAVE, b"".join(self.announce))
                    for link in random.sample(lazy, min(len(lazy), self.limits.ihave_fanout)):
                        self._send(link, data, control=True)
                self.announce = []
            wanted: dict[str, list[bytes]] = {}
            if self.busy():
                continue
            for bid, (due, announcers, first) in list(self.missing.items()):
                if due > now:
                    continue
                while announcers and announcers[0] not in self.links:
                    announcers.pop(0)
                if not announcers:
                    del self.missing[bid]  # nobody left to ask: sync brings its ops
                    continue
                peer = announcers.pop(0)
                wanted.setdefault(peer, []).append(bid)
                self.missing[bid] = (now + self._graft_wait(), announcers, first)
            for peer, ids in wanted.items():
                self._graft(peer, ids)

    # ---- receiving ---------------------------------------------------------------------------

    async def _serve(self, stream) -> None:
        """A peer's stream to us, read until it ends; a newer one from the same peer replaces it."""
        peer = stream.muxed_conn.peer_id.to_string()
        if self._nursery is None or not self.allowed(peer):
            await stream.reset()
            return
        old = self.readers.get(peer)
        if old is not None:
            old.cancel()
        scope = self.readers[peer] = trio.CancelScope()
        try:
            with scope:
                while True:
                    data = await read_frame(stream, MAX_FRAME)
                    await self._on_frame(peer, data)
        except (FrameError, Hostile) as exc:
            self.validator.blame(peer)
            self.stats.push_hostile += 1
            log.warning("cutting off %s: %s", peer[-8:], exc)
        except Exception as exc:  # noqa: BLE001 - the stream broke: the peer opens another
            log.debug("push stream from %s ended: %r", peer[-8:], exc)
        finally:
            if self.readers.get(peer) is scope:
                del self.readers[peer]
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                with contextlib.suppress(Exception):
                    await stream.reset()

    async def _on_frame(self, peer: str, data: bytes) -> None:
        if not data:
            raise Hostile("empty frame")
        kind, body = data[0], data[1:]
        if kind == BATCH:
            await self._on_batch(peer, body)
        elif kind in (IHAVE, GRAFT):
            if len(body) % ID_BYTES or len(body) > MAX_IDS * ID_BYTES:
                raise Hostile(f"a list of ids of {len(body)} bytes")
            ids = [body[i:i + ID_BYTES] for i in range(0, len(body), ID_BYTES)]
            (self._on_ihave if kind == IHAVE else self._on_graft)(peer, ids)
        elif kind == PRUNE:
            link = self.links.get(peer)
            if link is not None and link.eager:
                link.eager = False
                self._replace_eager()
        else:
            raise Hostile(f"frame kind {kind}")

    async def _on_batch(self, peer: str, data: bytes) -> None:
        self.stats.gossip_copies_in += 1
        self.stats.gossip_bytes_in += len(data) + 5
        bid = sha256(data)
        if bid not in self.seen:
            hit = self.missing.get(bid)
            self.late = 0.9 * self.late + 0.1 * (trio.current_time() - hit[2] if hit else 0.0)
        first = self.checking.get(bid)
        if first is not None:  # the same batch from another peer, being checked: wait for it
            await first.wait()
        if bid in self.seen:
            # A second copy by push: this link is not on the tree. (Ops that came by sync or
            # gossipsub first prune nothing: under load a gap sync often beats the tree.)
            self._prune(peer)
            return
        known = self.validator.known
        try:
            wires = batch_wires(data, known)
        except BatchError as exc:
            raise Hostile(str(exc)) from None
        if not wires:
            self._saw(bid)
            return
        self.checking[bid] = done = trio.Event()
        try:
            try:
                ops = await self.validator.check(peer, wires)
            except BatchError as exc:
                raise Hostile(str(exc)) from None
            if ops is None:
                return  # its authors wrote too fast: not forwarded, sync brings it (AuthorBudget)
            if not ops:  # all came by another path while it waited
                self._saw(bid)
                return
            self.inflight.update(op.id for op in ops)
        finally:
            del self.checking[bid]
            done.set()
        self._remember(bid, data)
        self._forward(bid, frame(BATCH, data), peer)
        self.stats.gossip_received += 1
        try:
            await self.deliver(peer, ops)
        except BaseException:
            self.done(ops)  # never queued for the store (the stream ended): no longer "held"
            raise

    def _on_ihave(self, peer: str, ids: list[bytes]) -> None:
        now = trio.current_time()
        due = now + self._graft_wait()
        for bid in ids:
            if bid in self.seen:
                continue
            hit = self.missing.get(bid)
            if hit is None:
                if len(self.missing) >= self.limits.missing_ids:
                    continue  # sync repairs what we cannot wait for
                self.missing[bid] = (due, [peer], now)
            elif peer not in hit[1] and len(hit[1]) < 8:
                hit[1].append(peer)

    def _graft_wait(self) -> float:
        lim = self.limits
        return max(lim.graft_timeout, min(lim.graft_timeout_max, 3 * self.late))

    def _on_graft(self, peer: str, ids: list[bytes]) -> None:
        link = self.links.get(peer)
        if link is None:
            return
        link.eager = True
        if ids and not self.grafts.take(peer, len(ids)):
            self.stats.push_grafts_refused += 1
            return
        for bid in ids:
            hit = self.kept.get(bid)
            if hit is not None:
                self._send(link, frame(BATCH, hit[0]))

    def done(self, ops) -> None:
        """The store has these ops now (or refused them): `known` answers for them alone."""
        for op in ops:
            self.inflight.discard(op.id)
