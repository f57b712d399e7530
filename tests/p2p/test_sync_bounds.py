"""Sync against a hostile peer: backpressure, the Need cap, the per-peer serve budget, and the
session caps, first without sockets (trio's lockstep streams), then over real libp2p hosts."""

from __future__ import annotations

import contextlib
import logging
import math

import pytest
import trio
import trio.testing
from libp2p.host.exceptions import StreamFailure
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID

from formation.crdt import reconcile
from formation.crdt.async_store import AsyncStore
from formation.crdt.bloom import Bloom
from formation.crdt.reconcile import (
    MAX_MESSAGE_BYTES,
    MAX_ROUNDS,
    Done,
    Hello,
    Need,
    Ops,
    ProtocolError,
    decode,
    encode,
)
from formation.crdt.store import Store
from formation.p2p import sync
from formation.p2p.framing import read_frame, write_frame
from tests.p2p.conftest import converged, open_fog
from tests.support import Node

# ---- the budget, on a fake clock --------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_budget_refuses_a_peer_once_spent_until_refilled():
    clock = Clock()
    budget = sync.ServeBudget(1000, 10.0, clock=clock)  # refills 100 bytes/s
    assert budget.allows("p")
    budget.charge("p", 600)
    assert budget.allows("p")
    budget.charge("p", 900)  # an allowed answer goes out whole: 500 in debt
    assert not budget.allows("p")
    assert budget.allows("q")  # every peer has its own bucket
    clock.now += 5.0  # the debt is paid, nothing more yet
    assert not budget.allows("p")
    clock.now += 0.1
    assert budget.allows("p")
    clock.now += 3600  # idling banks at most one window's worth
    assert budget.tokens("p") == 1000


def test_budget_logs_a_refusal_once_per_window(caplog):
    clock = Clock()
    budget = sync.ServeBudget(1000, 10.0, clock=clock)
    budget.charge("p", 3000)  # in debt for 20 s
    with caplog.at_level(logging.WARNING, logger="formation.p2p.sync"):
        for _ in range(5):
            clock.now += 1.0
            assert not budget.allows("p")
        assert len(caplog.records) == 1
        clock.now += 6.0  # a window after the first line, still in debt
        assert not budget.allows("p")
        assert len(caplog.records) == 2


def test_budget_forgets_refilled_peers(monkeypatch):
    monkeypatch.setattr(sync.ServeBudget, "MAX_PEERS", 8)
    clock = Clock()
    budget = sync.ServeBudget(1000, 10.0, clock=clock)
    for i in range(8):
        budget.charge(f"old{i}", 100)
    clock.now += 1.0  # 100 bytes refilled: the old buckets are full again
    budget.charge("spender", 5000)
    budget.charge("new", 1)
    assert len(budget._buckets) == 2
    assert not budget.allows("spender")  # the one in debt is remembered


# ---- sessions over lockstep streams (a write returns once the other end read it) -------------


class Pipe:
    """An end of trio's lockstep stream pair with the libp2p stream methods run_session uses.
    No flow-control window at all: the strictest test of a deadlock."""

    def __init__(self, end):
        self.end = end

    async def read(self, n: int) -> bytes:
        return await self.end.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self.end.send_all(data)

    async def close(self) -> None:
        await self.end.send_eof()

    async def reset(self) -> None:
        await self.end.aclose()


def node_with_log(secret: bytes, n: int) -> Node:
    node = Node(Store(), secret=secret)
    for i in range(n):
        node.heartbeat(i)
    return node


def frame(msg) -> bytes:
    data = encode(msg)
    return len(data).to_bytes(4, "big") + data


async def test_both_sides_answering_big_at_once_does_not_deadlock(monkeypatch):
    # Many small chunks each way, far more than the writer queue holds: with a bounded queue of
    # chunks that the reading loop waits on, both ends stop reading and this deadlocks.
    monkeypatch.setattr(reconcile, "CHUNK_BYTES", 4096)
    a, b = node_with_log(b"\x01" * 32, 300), node_with_log(b"\x02" * 32, 300)
    end_a, end_b = trio.testing.lockstep_stream_pair()
    results = {}

    async def run(me, end, peer):
        results[peer] = await sync.run_session(Pipe(end), AsyncStore(me.store), peer)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, a, end_a, "b")
            nursery.start_soon(run, b, end_b, "a")
    assert results["a"].ok and results["b"].ok
    assert len(a.store) == len(b.store) == 600 and a.store.state_hash() == b.store.state_hash()


async def test_a_peer_that_never_reads_cannot_make_us_queue_answers():
    node = node_with_log(b"\x01" * 32, 300)
    ids = [m.id for m in node.store.since(0)]
    ours, theirs = trio.testing.lockstep_stream_pair()
    delivered = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sync.run_session, Pipe(ours), AsyncStore(node.store), "attacker")
        with trio.move_on_after(1):
            await theirs.send_all(frame(Hello([], Bloom(0))))
            delivered += 1
            for _ in range(MAX_ROUNDS):
                await theirs.send_all(frame(Need(ids[:100])))
                delivered += 1
        # Our Hello is stuck in the writer, one answer waits for it, and the session holds
        # the next: it stops reading the peer (before this, all 65 requests were answered).
        assert delivered == sync.OUT_BATCHES + 1
        nursery.cancel_scope.cancel()


async def _drain_and_send(end, msgs) -> None:
    """Send `msgs` while reading (and dropping) everything the other end says."""

    async def drain():
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while await end.receive_some(1 << 16):
                pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            for msg in msgs:
                await end.send_all(frame(msg))


async def test_more_than_max_rounds_needs_end_the_session():
    node = node_with_log(b"\x01" * 32, 10)
    ids = [m.id for m in node.store.since(0)]
    ours, theirs = trio.testing.lockstep_stream_pair()
    flood = [Hello([], Bloom(0))] + [Need(ids)] * (MAX_ROUNDS + 1)
    with pytest.raises(BaseExceptionGroup) as err:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain_and_send, theirs, flood)
                await sync.run_session(Pipe(ours), AsyncStore(node.store), "attacker")
    assert err.group_contains(ProtocolError, match="Need")


async def test_a_spent_budget_ends_the_session_at_the_next_request():
    node = node_with_log(b"\x01" * 32, 50)
    whole = sum(len(w) for w in node.store.wires([m.id for m in node.store.since(0)]))
    budget = sync.ServeBudget(1, 60.0)
    ours, theirs = trio.testing.lockstep_stream_pair()
    answered = []

    async def attacker():
        end = Pipe(theirs)
        await theirs.send_all(frame(Hello([], Bloom(0))))
        assert isinstance(decode(await read_frame(end, MAX_MESSAGE_BYTES)), Hello)
        more = True
        while more:
            msg = decode(await read_frame(end, MAX_MESSAGE_BYTES))
            answered.extend(msg.wires)
            more = msg.more
        await theirs.send_all(frame(Need([node.store.heads()[0]])))
        assert await theirs.receive_some(1) == b""  # ended, nothing more for us

    with pytest.raises(BaseExceptionGroup) as err:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(attacker)
                await sync.run_session(Pipe(ours), AsyncStore(node.store), "attacker", budget)
    assert err.group_contains(sync.BudgetExhausted)
    # the answer to Hello went out whole (the budget was not spent yet), the Need got nothing
    assert sum(map(len, answered)) == whole
    assert budget.tokens("attacker") == pytest.approx(1 - whole, abs=1)


# ---- over real libp2p hosts ----------------------------------------------------------------------


async def raw_session(attacker, victim, *, answered=None, hold: trio.Event | None = None) -> int | None:
    """One session the way an attacker runs it, on the attacker's own libp2p host: a Hello with
    an empty filter (everything since its watermark, please), read the answer, end the session.
    The op bytes answered, or None if the victim reset the stream before saying a word (py-libp2p
    shows that as a failed protocol negotiation, a reset or an end of stream)."""
    try:
        stream = await attacker.svc.host.new_stream(ID.from_base58(victim.svc.peer_id), [sync.PROTOCOL])
    except StreamFailure:
        return None
    try:
        try:
            await write_frame(stream, encode(Hello([], Bloom(0))))
            first = await read_frame(stream, MAX_MESSAGE_BYTES)
        except StreamError:
            return None
        assert isinstance(decode(first), Hello)
        got, more = 0, True
        while more:
            msg = decode(await read_frame(stream, MAX_MESSAGE_BYTES))
            got += sum(len(w) for w in msg.wires)
            more = msg.more
        if answered is not None:
            answered()
        if hold is not None:
            await hold.wait()
        await write_frame(stream, encode(Ops([], False)))
        await write_frame(stream, encode(Done(False)))
        assert decode(await read_frame(stream, MAX_MESSAGE_BYTES)) == Done(True)
        return got
    finally:
        with contextlib.suppress(Exception):
            await stream.close()


async def settled(fog) -> None:
    """Until the sessions the fog starts by itself (one per pair on connect) are over."""
    n = len(fog)
    with trio.fail_after(20):
        while (sum(m.svc.stats.syncs_ok for m in fog) < n * (n - 1)
               or any(m.svc._serving or m.svc._syncing for m in fog)):
            await trio.sleep(0.02)


async def idle(member) -> None:
    """Until `member` serves no session (it counts a session only once its stream is closed)."""
    with trio.fail_after(10):
        while member.svc._serving:
            await trio.sleep(0.01)


async def test_a_peer_asking_for_the_whole_log_again_and_again_is_refused_after_its_budget():
    budget = 150_000
    # a budget that barely refills during the test, so the count of answers is exact
    async with open_fog(3, sync_interval=60, sync_budget_bytes=budget, sync_budget_seconds=3600) as fog:
        victim, honest, attacker = fog
        await settled(fog)  # with empty logs: nobody has been charged a byte
        for k in range(200):
            await victim.heartbeat(k)  # gossiped: the attacker holds them all and asks anyway
        await converged(fog)

        answers = []
        while (got := await raw_session(attacker, victim)) is not None:
            answers.append(got)
            assert len(answers) < 20
            await idle(victim)
        whole = answers[0]
        assert whole > 50_000 and set(answers) == {whole}  # the whole log, every time
        assert len(answers) == math.ceil(budget / whole)  # until the bucket went below zero
        assert await raw_session(attacker, victim) is None  # and it stays refused

        # an honest peer still syncs: ops written at the victim without gossip reach it
        fresh = [await victim.svc.astore.run(victim.node.heartbeat, 1000 + k) for k in range(5)]
        result = await honest.svc.sync_with(victim.svc.peer_id)
        assert result is not None and result.ok and result.ops_accepted == 5
        assert all(honest.store.has(op.id) for op in fresh)
        assert victim.svc.stats.syncs_refused >= 2


async def test_many_concurrent_sync_streams_from_one_peer_only_one_is_served():
    async with open_fog(4, sync_interval=60) as fog:
        victim, x, y, z = fog
        await settled(fog)
        await victim.heartbeat(1)
        await converged(fog)
        victim.svc.settings.sync_max_sessions = 2  # and one per peer, the default
        hold = trio.Event()
        answers = 0
        results = []

        def answered():
            nonlocal answers
            answers += 1

        async def attempt(member):
            results.append((member, await raw_session(member, victim, answered=answered, hold=hold)))

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(attempt, x)
            with trio.fail_after(10):
                while len(results) < 5 or answers < 1:
                    await trio.sleep(0.02)
            assert [got for _, got in results] == [None] * 5  # reset; one session holds on
            nursery.start_soon(attempt, y)  # another peer: served, the total is now 2
            with trio.fail_after(10):
                while answers < 2:
                    await trio.sleep(0.02)
            assert await raw_session(z, victim) is None  # over the total cap
            hold.set()
        served = [(m, got) for m, got in results if got is not None]
        assert sorted(m.i for m, _ in served) == [x.i, y.i] and all(got > 0 for _, got in served)
        await idle(victim)
        assert await raw_session(z, victim) > 0  # room again
