"""Gossip payloads: many ops per pubsub message, verified before anything is forwarded.

py-libp2p spends 2.5-8 ms of CPU per message and hop (../shared/notes/libp2p.md), so ops travel
in batches: `Batcher` collects local ops and flushes them as one message after a short delay, a
longer one under load, or when the batch is big enough. `BatchValidator` is the topic validator:
it decodes and verifies every op of a batch (form and signatures; the rules need the causal past
and are checked by the store), so an invalid op dies at the first honest hop and its sender is
scored down. It keeps the decoded ops for the subscription handler, so nothing is verified twice,
and skips the ops the store holds already. The checks run one batch at a time, the forwarders taking turns
(`FairTurns`), in a worker thread (a full batch is some 650 ms of CPU, which on the event loop
stalled the whole node), except for a batch of a few fresh ops, checked on the event loop.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter, OrderedDict, deque

import trio

from formation.buckets import TokenBuckets
from formation.crdt import codec
from formation.crdt.keys import sha256
from formation.crdt.op import MAX_OP_BYTES, Op, OpError, decode_op

TOPIC = "/formation/ops/1"
MAX_BATCH_BYTES = 768 * 1024  # under py-libp2p's 1 MiB message limit, with room for the envelope
MAX_BATCH_OPS = 4096


class BatchError(ValueError):
    pass


def encode_batch(wires: list[bytes]) -> bytes:
    return codec.pack_trusted([1, wires])


def batch_wires(data: bytes, known=None) -> list[bytes]:
    """The op wires of a gossip message that are not `known`, unchecked; BatchError if the
    message is not a batch. Cheap (no signature): what decides where the checks run."""
    try:
        body = codec.unpack(data, max_bytes=MAX_BATCH_BYTES + 64 * 1024)
    except codec.CodecError as exc:
        raise BatchError(f"gossip message: {exc}") from None
    if not (isinstance(body, list) and len(body) == 2 and body[0] == 1 and isinstance(body[1], list)):
        raise BatchError("gossip message must be [1, [op, ...]]")
    wires = body[1]
    if not 0 < len(wires) <= MAX_BATCH_OPS:
        raise BatchError(f"a gossip batch holds 1..{MAX_BATCH_OPS} ops")
    fresh = []
    for w in wires:
        if not isinstance(w, bytes) or len(w) > MAX_OP_BYTES:
            raise BatchError("a gossip batch holds op byte strings")
        if known is not None and known(sha256(w)):
            continue  # already held: verified when we stored it
        fresh.append(w)
    return fresh


def decode_wires(wires: list[bytes]) -> list[Op]:
    """Each wire decoded and verified (form, signatures); BatchError at the first bad one."""
    ops = []
    for w in wires:
        try:
            ops.append(decode_op(w))
        except OpError as exc:
            raise BatchError(f"op in gossip batch: {exc}") from None
    return ops


def decode_batch(data: bytes, known=None) -> list[Op]:
    """The ops of a gossip message that are not `known`, verified; BatchError if any part is bad."""
    return decode_wires(batch_wires(data, known))


class AuthorBudget:
    """How many ops each author (the node key that signed them) may have forwarded by gossip: a
    bucket of `burst` ops refilled at `rate` per second. A batch whose authors are over it is
    neither delivered nor forwarded here (its publisher is not struck: the ops may be valid);
    the ops come later by sync, bounded by the sync budgets. So a node that writes faster than
    this (an honest one under a burst of its users' writes, or a flood of valid ops from one
    key) is slowed, never refused: validity does not depend on it. At most `max_authors` buckets
    are kept (keys are free to make); full ones are forgotten first (the same as unknown)."""

    def __init__(self, rate: float = 100.0, burst: float = 1000.0, max_authors: int = 4096,
                 clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets = TokenBuckets(rate, burst, max_keys=max_authors, clock=clock)
        self.throttled = 0  # ops held back, in all

    def _affords(self, want: Counter, now: float) -> bool:
        return all(self._buckets.tokens(a, now) >= n for a, n in want.items())

    def affords(self, wires: list[bytes]) -> bool:
        """Whether the authors the wires name (unverified: a peek, nothing is charged) have the
        tokens: a batch past the budget is dropped before its signatures are checked. A forger
        naming an honest author cannot spend that author's tokens: only `admit` charges, on
        verified ops."""
        if self.rate <= 0 or not wires:
            return True
        if not self._affords(Counter(a for a in map(_claimed_author, wires) if a is not None), self.clock()):
            self.throttled += len(wires)
            return False
        return True

    def admit(self, ops: list[Op]) -> bool:
        """Charge the batch's ops to their authors, all or nothing."""
        if self.rate <= 0 or not ops:
            return True
        now, want = self.clock(), Counter(op.author for op in ops)
        if not self._affords(want, now):
            self.throttled += len(ops)
            return False
        for a, n in want.items():
            self._buckets.charge(a, n, now)
        return True


def _claimed_author(wire: bytes) -> bytes | None:
    """The author an op's wire names, unverified (None when it does not parse as an op)."""
    try:
        outer = codec.unpack(wire, max_bytes=MAX_OP_BYTES)
        body = codec.unpack(outer[0], max_bytes=MAX_OP_BYTES)
        author = body[3]
    except (codec.CodecError, TypeError, IndexError, KeyError):
        return None
    return author if isinstance(author, bytes) and len(author) == 20 else None


class BatchValidator:
    """Topic validator with a small cache of what it decoded, keyed by message hash.

    `validate` is the async form pubsub runs: the decoding and signature checks (0.16 ms per op
    measured, some 650 ms for a full batch) run in a worker thread, one batch at a time, taken
    in turn from the peers that forwarded them (FairTurns): the event loop keeps serving while a
    batch is checked, and a peer that floods waits behind its own batches, not before others'."""

    def __init__(self, own_peer_id: bytes, cache_size: int = 256, known=None, authors: AuthorBudget | None = None):
        self.own = own_peer_id
        self.known = known
        self.authors = authors or AuthorBudget()
        self.cache: OrderedDict[bytes, list[Op]] = OrderedDict()
        self.cache_size = cache_size
        self.rejected = 0
        # Honest peers never forward a batch that fails these checks (they run them too), so
        # one such batch is proof enough against the peer that handed it to us.
        self.strikes: Counter[str] = Counter()
        self.proof_strikes = 3
        self.turns = FairTurns()
        self.checked_ops = 0  # ops decoded and verified
        self.checking_seconds = 0.0  # spent doing it
        # batches with at most this many fresh ops are checked on the event loop (~0.2-0.5 ms
        # per op: a stall of a few ms at most), bigger ones in a worker thread
        self.inline_ops = 4

    def __call__(self, forwarder, msg) -> bool:
        """The synchronous form: checks on the caller's thread."""
        if msg.from_id == self.own:
            return True  # our own batch, made from ops our store already accepted
        try:
            wires = batch_wires(msg.data, self.known)
            if not self.authors.affords(wires):
                return False  # its authors wrote too fast: sync brings it (AuthorBudget)
            ops = self._decode(wires)
        except BatchError:
            return self._reject(forwarder)
        if not self.authors.admit(ops):
            return False  # valid, maybe: its authors wrote too fast; sync brings it (AuthorBudget)
        self._keep(msg.data, ops)
        return True

    async def validate(self, forwarder, msg) -> bool:
        if msg.from_id == self.own:
            return True
        try:
            ops = await self.check(forwarder, msg.data)
        except BatchError:
            return self._reject(forwarder)
        if ops is None:
            return False  # valid, maybe: its authors wrote too fast; sync brings it (AuthorBudget)
        self._keep(msg.data, ops)
        return True

    async def check(self, forwarder, batch: bytes | list[bytes]) -> list[Op] | None:
        """The checks of `validate`, for a message or its op wires (the push tree, push.py):
        the ops not known by the time the forwarder's turn comes, verified and charged to
        their authors; None if their authors are over the budget; BatchError if any part is
        bad (the caller blames the forwarder)."""
        async with self.turns.turn(_peer_text(forwarder)):
            # What we hold already is not checked again; a few fresh ops are checked right
            # here (a thread hop and the GIL hand-overs it causes cost more than ~1 ms of
            # checks), more in a worker thread so the event loop keeps serving.
            if isinstance(batch, bytes):
                wires = batch_wires(batch, self.known)
            else:  # already parsed by the caller; what became known while it waited is skipped
                wires = [w for w in batch if self.known is None or not self.known(sha256(w))]
            if not self.authors.affords(wires):
                return None  # its authors wrote too fast: sync brings it (AuthorBudget)
            if len(wires) <= self.inline_ops:
                ops = self._decode(wires)
            else:
                ops = await trio.to_thread.run_sync(self._decode, wires)
        if not self.authors.admit(ops):
            return None
        return ops

    def blame(self, forwarder) -> None:
        """An invalid batch came from this peer: proof enough (see `strikes`)."""
        self._reject(forwarder)

    def _decode(self, wires: list[bytes]) -> list[Op]:
        start = time.perf_counter()
        try:
            ops = decode_wires(wires)
        finally:
            self.checking_seconds += time.perf_counter() - start
        self.checked_ops += len(ops)
        return ops

    def _reject(self, forwarder) -> bool:
        self.rejected += 1
        self.strikes[_peer_text(forwarder)] += self.proof_strikes
        return False

    def _keep(self, data: bytes, ops: list[Op]) -> None:
        self.cache[sha256(data)] = ops
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)

    def take(self, data: bytes) -> list[Op]:
        """The ops of a validated message (decoded again if it fell out of the cache)."""
        ops = self.cache.pop(sha256(data), None)
        return ops if ops is not None else decode_batch(data, self.known)


class FairTurns:
    """One holder at a time; waiters served round-robin by peer, so each peer with work waiting
    gets the next turn before any peer gets a second one."""

    def __init__(self):
        self._busy = False
        self._waiting: OrderedDict[str, deque[trio.Event]] = OrderedDict()

    @contextlib.asynccontextmanager
    async def turn(self, peer: str):
        if self._busy or self._waiting:
            ready = trio.Event()
            self._waiting.setdefault(peer, deque()).append(ready)
            try:
                await ready.wait()
            except BaseException:
                if ready.is_set():
                    self._next()  # handed the turn as we were cancelled: pass it on
                else:
                    self._waiting[peer].remove(ready)
                    if not self._waiting[peer]:
                        del self._waiting[peer]
                raise
        else:
            self._busy = True
        try:
            yield
        finally:
            self._next()

    def _next(self) -> None:
        if not self._waiting:
            self._busy = False
            return
        peer, queue = next(iter(self._waiting.items()))
        ready = queue.popleft()
        del self._waiting[peer]
        if queue:
            self._waiting[peer] = queue  # to the back of the line
        ready.set()  # the turn passes on: still busy

    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())


def _peer_text(peer) -> str:
    return peer.to_string() if hasattr(peer, "to_string") else str(peer)


def pick_hold(window: float, fog_msgs_per_s: float, budget_msgs_per_s: float, own_ops_per_s: float) -> float:
    """How long a node's first op waits for company (Batcher.hold): from 0 up to the window as
    the fog's message rate reaches the budget (every message costs every node), but not at all
    when this node writes too seldom for an op to find company in that time (at 25 ops/s over
    10 nodes the hold was 250 ms of every op's latency, and batches stayed at one op)."""
    hold = window * min(1.0, fog_msgs_per_s / budget_msgs_per_s)
    return hold if own_ops_per_s * hold >= 1.0 else 0.0


class Batcher:
    """Collects op wires and hands out batches: after `delay` seconds, or sooner when full.

    py-libp2p's cost is per message and per hop (milliseconds of CPU on every node of the fog),
    so under load a batch grows instead of the message count: the shortest time between two
    flushes, `interval`, starts at `min_interval` and grows (x1.5 per flush, up to
    `max_interval`) while flushes find ops that had to wait for it, and shrinks back when they
    do not. An op alone on a quiet node waits `delay`; under load an op waits at most
    `max_interval` (latency bounded), and a node publishes at most 1 / max_interval messages
    per second. The first op of a batch waits `delay`, or `hold` when the service says the fog
    is busy (its message rate near the budget: then each node waits for company, whatever its
    own rate). The service sets `max_interval` from the fog's size and `hold` from the fog's
    message rate: that rate, which every node pays for, is what the window bounds."""

    def __init__(self, delay: float = 0.01, min_interval: float = 0.05, max_interval: float = 0.05):
        self.delay = delay
        self.min_interval = min_interval
        self.max_interval = max(min_interval, max_interval)
        self.interval = min_interval
        self.hold = 0.0
        self._last_flush = -1e9
        self._wires: list[bytes] = []
        self._bytes = 0
        self.added = 0  # ops added, ever (the service's pacing reads this node's own write rate)
        self._have = trio.Event()
        self._full = trio.Event()

    def add(self, wire: bytes) -> None:
        self.added += 1
        self._wires.append(wire)
        self._bytes += len(wire)
        self._have.set()
        if self._bytes >= MAX_BATCH_BYTES // 2 or len(self._wires) >= MAX_BATCH_OPS // 2:
            self._full.set()

    def take_all(self) -> list[list[bytes]]:
        """Everything queued, split into batches that fit one message."""
        batches: list[list[bytes]] = []
        cur: list[bytes] = []
        size = 0
        for w in self._wires:
            if cur and (size + len(w) > MAX_BATCH_BYTES or len(cur) >= MAX_BATCH_OPS):
                batches.append(cur)
                cur, size = [], 0
            cur.append(w)
            size += len(w)
        if cur:
            batches.append(cur)
        self._wires, self._bytes = [], 0
        self._have, self._full = trio.Event(), trio.Event()
        return batches

    async def next_batches(self) -> list[list[bytes]]:
        await self._have.wait()
        held_back = self._last_flush + self.interval - trio.current_time()  # > delay: busy
        with trio.move_on_after(max(self.delay, min(self.hold, self.max_interval), held_back)):
            await self._full.wait()
        self._last_flush = trio.current_time()
        if held_back > self.delay or len(self._wires) > 1:
            self.interval = min(self.max_interval, max(self.interval, self.min_interval) * 1.5)
        else:
            self.interval = max(self.min_interval, min(self.interval, self.max_interval) / 1.5)
        return self.take_all()
