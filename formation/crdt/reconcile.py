"""Anti-entropy between two replicas, as a sans-IO state machine (no sockets, no clocks).

Kleppmann & Howard, "Byzantine Eventual Consistency" (2020), Algorithm 2:
1. Each side sends Hello: its current heads and a keyed Bloom filter of the ops it delivered
   since the last successful reconciliation with this peer (its watermark: a local sequence
   number, see below).
2. On the peer's Hello, each side sends the ops of that same "since" set that are not in the
   peer's filter, plus every op there that depends on one of them (if the peer lacks X it
   lacks X's descendants too, whatever the filter says).
3. After the peer's ops arrive, a side whose store holds all of the peer's heads is complete
   and says Done. Otherwise (a Bloom false positive, or a peer whose watermark is stale) it
   asks for the missing heads and deps by id (Need) and walks down until complete.

Usually this takes one round trip. The watermark is our local sequence number at the time we
sent Hello; when the peer reports Done(ok) it holds all our heads of that moment, hence every
op we had delivered by then, so next time only later ops go into the filter.

Drive it with `start()` and `receive(msg)`; both return messages to send. `finished` tells when
the session is over and `new_watermark` what to remember for this peer (None = keep the old).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import codec
from .bloom import Bloom, BloomError
from .store import Store

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024  # Ops are sent in chunks of about this size: bounded frames, steady progress
MAX_NEED = 4096  # ids per Need message
OTHERS_NEED = 64  # ids asked once per session for deps that ops from other sources wait for
MAX_ROUNDS = 64  # Need rounds before a session gives up (a peer that never sends what we ask)


class ProtocolError(ValueError):
    """The peer sent something that is not a valid reconciliation message at this point."""


@dataclass(frozen=True)
class Hello:
    heads: list[bytes]
    bloom: Bloom


@dataclass(frozen=True)
class Ops:
    wires: list[bytes]
    more: bool = False  # another Ops chunk of the same answer follows


@dataclass(frozen=True)
class Need:
    ids: list[bytes]


@dataclass(frozen=True)
class Done:
    ok: bool


Message = Hello | Ops | Need | Done

_TAGS = {Hello: 1, Ops: 2, Need: 3, Done: 4}


def encode(msg: Message) -> bytes:
    if isinstance(msg, Hello):
        body = [1, msg.heads, msg.bloom.to_wire()]
    elif isinstance(msg, Ops):
        body = [2, msg.wires, msg.more]
    elif isinstance(msg, Need):
        body = [3, msg.ids]
    else:
        body = [4, msg.ok]
    return codec.pack_trusted(body)


def _hashes(value, what: str, limit: int) -> list[bytes]:
    if not isinstance(value, list) or len(value) > limit:
        raise ProtocolError(f"{what} must be a list of at most {limit} ids")
    for h in value:
        if not isinstance(h, bytes) or len(h) != 32:
            raise ProtocolError(f"{what} must hold 32-byte ids")
    return value


def decode(data: bytes) -> Message:
    try:
        body = codec.unpack(data, max_bytes=MAX_MESSAGE_BYTES)
    except codec.CodecError as exc:
        raise ProtocolError(f"sync message: {exc}") from None
    if not isinstance(body, list) or not body:
        raise ProtocolError("sync message must be a non-empty array")
    tag = body[0]
    if tag == 1 and len(body) == 3:
        try:
            return Hello(_hashes(body[1], "heads", 4096), Bloom.from_wire(body[2]))
        except BloomError as exc:
            raise ProtocolError(str(exc)) from None
    if tag == 2 and len(body) == 3 and isinstance(body[1], list) and isinstance(body[2], bool):
        if not all(isinstance(w, bytes) for w in body[1]):
            raise ProtocolError("ops must be byte strings")
        return Ops(body[1], body[2])
    if tag == 3 and len(body) == 2:
        return Need(_hashes(body[1], "need", MAX_NEED))
    if tag == 4 and len(body) == 2 and isinstance(body[1], bool):
        return Done(body[1])
    raise ProtocolError(f"unknown sync message (tag {tag!r})")


class Reconciler:
    def __init__(self, store: Store, *, watermark: int = 0, peer: str = "peer"):
        self.store = store
        self.watermark = watermark
        self.peer = peer
        self.hello_seq: int | None = None
        self.peer_heads: list[bytes] | None = None
        self.got_first_ops = False
        self.asked: set[bytes] = set()
        self.unfetchable: set[bytes] = set()
        self.sent_done: bool | None = None
        self.peer_done: bool | None = None
        self.need_rounds = 0
        self.ops_sent = 0
        self.ops_received = 0
        self.ops_accepted = 0  # of those received, how many were new to us
        self.rejected = 0
        self.since_ops = 0  # ops in our Hello's filter (what a session costs grows with it)

    @property
    def finished(self) -> bool:
        return self.sent_done is not None and self.peer_done is not None

    @property
    def new_watermark(self) -> int | None:
        """Our seq at Hello if the peer confirmed it holds all our heads of then."""
        return self.hello_seq if self.peer_done else None

    def start(self) -> list[Message]:
        since = self.store.since(self.watermark)
        self.since_ops = len(since)
        bloom = Bloom(len(since))
        for m in since:
            bloom.add(m.id)
        self.hello_seq = self.store.seq
        return [Hello(self.store.heads(), bloom)]

    def receive(self, msg: Message) -> list[Message]:
        if isinstance(msg, Hello):
            if self.peer_heads is not None:
                raise ProtocolError("second Hello in one session")
            self.peer_heads = msg.heads
            return chunked(self._ops_peer_lacks(msg))
        if self.peer_heads is None:
            raise ProtocolError(f"{type(msg).__name__} before Hello")
        if isinstance(msg, Ops):
            self.ops_received += len(msg.wires)
            res = self.store.ingest(msg.wires, source=self.peer)
            self.ops_accepted += len(res.accepted)
            self.rejected += len(res.rejected)
            if msg.more:
                return []
            self.got_first_ops = True
            self.unfetchable |= {i for i in self.asked if not self.store.has(i)}
            self.asked.clear()
            return self._next_step()
        if isinstance(msg, Need):
            wires = self.store.wires(msg.ids)
            self.ops_sent += len(wires)
            return chunked(wires)
        if isinstance(msg, Done):
            if self.peer_done is not None:
                raise ProtocolError("second Done in one session")
            self.peer_done = msg.ok
            return []
        raise ProtocolError(f"unexpected message {msg!r}")

    def _ops_peer_lacks(self, hello: Hello) -> list[bytes]:
        lacking: set[bytes] = set()
        peer_heads = set(hello.heads)
        for m in self.store.since(self.watermark):  # delivery order is a topological order
            if m.id in peer_heads:
                continue
            if m.id not in hello.bloom or any(d in lacking for d in m.deps):
                lacking.add(m.id)
        self.ops_sent += len(lacking)
        return self.store.wires(lacking)

    def _next_step(self) -> list[Message]:
        if self.sent_done is not None:
            return []
        store = self.store
        wanted = [h for h in self.peer_heads if not store.has(h) and not store.is_rejected(h)]
        # The deps of what this peer sent us (it holds them if honest), and, once per session,
        # a few of the rest: never the whole index, which a flood of invented deps makes huge.
        wanted += sorted(store.missing(MAX_NEED, source=self.peer, exclude=self.unfetchable))
        if self.need_rounds == 0:
            wanted += sorted(store.missing(OTHERS_NEED, exclude=self.unfetchable))
        wanted = [i for i in dict.fromkeys(wanted) if i not in self.unfetchable and not store.is_rejected(i)]
        if not wanted:
            complete = all(store.has(h) for h in self.peer_heads)
            self.sent_done = complete
            return [Done(complete)]
        if self.need_rounds >= MAX_ROUNDS:
            self.sent_done = False
            return [Done(False)]
        self.need_rounds += 1
        ask = wanted[:MAX_NEED]
        self.asked = set(ask)
        return [Need(ask)]


def chunked(wires: list[bytes]) -> list[Ops]:
    """Split an answer into Ops messages of about CHUNK_BYTES; the last has more=False."""
    out: list[Ops] = []
    chunk: list[bytes] = []
    size = 0
    for w in wires:
        if chunk and size + len(w) > CHUNK_BYTES:
            out.append(Ops(chunk, True))
            chunk, size = [], 0
        chunk.append(w)
        size += len(w)
    out.append(Ops(chunk, False))
    return out


def reconcile_in_memory(a: Store, b: Store, *, wa: int = 0, wb: int = 0) -> tuple[Reconciler, Reconciler, int]:
    """Run a session between two local stores, delivering messages in lock-step rounds.

    Returns both state machines and the number of round trips taken (Hello/Ops exchange is one;
    each round in which either side had to ask for missing ops by id adds one).
    """
    ra, rb = Reconciler(a, watermark=wa, peer="b"), Reconciler(b, watermark=wb, peer="a")
    to_b, to_a = ra.start(), rb.start()
    rounds_with_need = 0
    steps = 0
    while to_a or to_b:
        steps += 1
        if steps > 4 * MAX_ROUNDS + 8:
            raise RuntimeError("reconciliation did not terminate")
        out_a = [m for msg in to_a for m in ra.receive(decode(encode(msg)))]
        out_b = [m for msg in to_b for m in rb.receive(decode(encode(msg)))]
        if any(isinstance(m, Need) for m in out_a + out_b):
            rounds_with_need += 1
        to_a, to_b = out_b, out_a
    return ra, rb, 1 + rounds_with_need
