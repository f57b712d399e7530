"""The push tree (formation/p2p/push.py) between real libp2p hosts in one trio process: batches
arrive over it, duplicates prune links to lazy, the tree heals when a peer is cut, and a peer
that sends what no honest node sends is cut off without changing anything honest."""

from __future__ import annotations

import struct

import trio

from formation.crdt.op import make_op
from formation.p2p import push
from formation.p2p.gossip import encode_batch
from tests.p2p.attacker import assert_no_honest_strikes, open_attacker
from tests.p2p.conftest import converged, open_fog
from tests.support import User


async def until(pred, timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.05)


async def linked(members, extra=()) -> None:
    """Every member has a push link (and a reader) to every other member."""
    ids = {m.svc.peer_id for m in members} | set(extra)
    await until(lambda: all(ids - {m.svc.peer_id} <= set(m.svc.push.links) for m in members))


def no_pubsub(members) -> list:
    """Record every gossipsub publish from now on: the tree alone must carry the ops."""
    calls: list = []
    for m in members:
        async def publish(topic, data, calls=calls):
            calls.append(topic)
        m.svc.pubsub.publish = publish
    return calls


def copies(members) -> int:
    return sum(m.svc.stats.gossip_copies_in for m in members)


def sent(members) -> int:
    return sum(m.svc.stats.gossip_sent for m in members)


async def write_round(members, user: User, tag: str, k0: int, n: int) -> None:
    for k in range(n):
        await members[k % len(members)].relay(user, "POST", "/v1/models", {"name": f"{tag} {k}"},
                                               ts=1_700_000_000 + k0 + k)
        await trio.sleep(0.03)  # batches of a few ops, from every node in turn


async def test_batches_travel_the_tree_and_duplicates_prune_it():
    u = User(b"\x41" * 32)
    async with open_fog(5, sync_interval=600) as fog:
        await linked(fog)
        await converged(fog)
        calls = no_pubsub(fog)
        await write_round(fog, u, "first", 0, 40)
        await converged(fog, timeout=20)
        assert sum(m.svc.stats.push_prunes for m in fog) > 0  # every link starts eager: copies prune
        first = copies(fog) / sent(fog)
        # while links are pruned a batch may come late (IHAVE, GRAFT) and a gap sync beat it;
        # once the tree has settled, it carries everything
        c0, s0, syncs = copies(fog), sent(fog), sum(m.svc.stats.ops_from_sync for m in fog)
        await write_round(fog, u, "second", 100, 40)
        await converged(fog, timeout=20)
        second = (copies(fog) - c0) / (sent(fog) - s0)
        print(f"copies read per batch: {first:.2f} while pruning, {second:.2f} after (ideal {len(fog) - 1})")
        assert calls == [] and sum(m.svc.stats.ops_from_sync for m in fog) == syncs  # all by push
        assert [len(await m.models()) for m in fog] == [80] * 5
        # every link eager would be (n - 1) copies per node: (n - 1) ** 2 per batch
        assert second < 2 * (len(fog) - 1)
        assert all(m.svc.stats.push_dropped == 0 for m in fog)
        assert_no_honest_strikes(fog)


async def test_the_tree_heals_when_a_peer_is_cut():
    u = User(b"\x42" * 32)
    async with open_fog(5, sync_interval=600) as fog:
        await linked(fog)
        await write_round(fog, u, "settle", 0, 30)
        await converged(fog, timeout=20)
        # cut the peer most nodes push to eagerly: the tree loses its busiest branch
        eager = {m.svc.peer_id: sum(1 for o in fog if o.svc.push.links.get(m.svc.peer_id, None)
                                    and o.svc.push.links[m.svc.peer_id].eager) for m in fog}
        hub = max(fog, key=lambda m: eager[m.svc.peer_id])
        rest = [m for m in fog if m is not hub]
        for m in rest:
            await m.svc.block(hub.svc.peer_id)
            await hub.svc.block(m.svc.peer_id)
        await until(lambda: all(hub.svc.peer_id not in m.svc.push.links for m in rest))
        calls, syncs = no_pubsub(rest), sum(m.svc.stats.ops_from_sync for m in rest)
        await write_round(rest, u, "after", 100, 40)
        took = await converged(rest, timeout=20)
        print(f"cut {eager[hub.svc.peer_id]} eager links; converged {took:.2f} s after the last write; "
              f"grafts {[m.svc.stats.push_grafts for m in rest]}")
        assert calls == [] and sum(m.svc.stats.ops_from_sync for m in rest) == syncs  # the tree, not sync
        assert [len(await m.models()) for m in rest] == [70] * 4


async def _send_raw(evil, victim, payload: bytes):
    from libp2p.peer.id import ID

    stream = await evil.svc.host.new_stream(ID.from_base58(victim.svc.peer_id), [push.PROTOCOL])
    await stream.write(payload)
    return stream


async def _cut_off_and_nothing_changed(fog, evil, before) -> None:
    await until(lambda: all(evil.peer_id in m.svc.banned for m in fog), timeout=10)
    await until(lambda: all(evil.peer_id not in m.svc.connected() for m in fog), timeout=10)
    for m in fog:
        assert await m.svc.astore.state_hash() == before[m.i]
        assert m.svc.stats.push_hostile >= 1
    assert_no_honest_strikes(fog)
    u = User(b"\x43" * 32)
    await fog[0].relay(u, "POST", "/v1/models", {"name": "after the attack"})
    await converged(fog)


async def test_an_oversize_frame_cuts_the_peer_off():
    async with open_fog(2, sync_interval=600) as fog, open_attacker(fog) as evil:
        await converged(fog)
        before = {m.i: await m.svc.astore.state_hash() for m in fog}
        for m in fog:  # a length past the limit: nothing of it is read or held
            await _send_raw(evil, m, struct.pack(">I", push.MAX_FRAME + 1) + b"\x01" * 1024)
        await _cut_off_and_nothing_changed(fog, evil, before)


async def test_garbage_frames_cut_the_peer_off():
    async with open_fog(3, sync_interval=600) as fog, open_attacker(fog) as evil:
        await converged(fog)
        before = {m.i: await m.svc.astore.state_hash() for m in fog}
        garbage = [push.frame(9, b"what"), push.frame(push.BATCH, b"\xc1not msgpack"),
                   push.frame(push.IHAVE, b"\x00" * 33)]  # not whole ids
        for m, payload in zip(fog, garbage, strict=True):
            await _send_raw(evil, m, payload)
        await _cut_off_and_nothing_changed(fog, evil, before)


async def test_a_batch_with_a_bad_signature_is_not_forwarded_and_cuts_the_peer_off():
    async with open_fog(3, sync_interval=600) as fog, open_attacker(fog) as evil:
        await converged(fog)
        before = {m.i: await m.svc.astore.state_hash() for m in fog}
        a = fog[0]
        op = make_op(evil.key, "node", evil.address, deps=evil.store.heads(), hlc=2**50,
                     value={"address": evil.address})
        bad = bytearray(op.wire)
        bad[-5] ^= 0xFF
        await _send_raw(evil, a, push.frame(push.BATCH, encode_batch([op.wire, bytes(bad)])))
        await until(lambda: evil.peer_id in a.svc.banned, timeout=10)
        assert a.svc.validator.rejected >= 1
        await trio.sleep(0.5)
        for m in fog:  # the valid op beside the bad one went nowhere either
            assert not m.store.has(op.id)
            assert await m.svc.astore.state_hash() == before[m.i]
        assert all(evil.peer_id not in m.svc.banned for m in fog[1:])  # a forwarded nothing to them
        assert_no_honest_strikes(fog)


async def test_too_many_ids_in_an_ihave_cut_the_peer_off():
    async with open_fog(2, sync_interval=600) as fog, open_attacker(fog) as evil:
        await converged(fog)
        before = {m.i: await m.svc.astore.state_hash() for m in fog}
        for m in fog:
            await _send_raw(evil, m, push.frame(push.IHAVE, b"\x07" * push.ID_BYTES * (push.MAX_IDS + 1)))
        await _cut_off_and_nothing_changed(fog, evil, before)


async def test_a_peer_that_does_not_read_costs_a_bounded_queue_and_honest_delivery_goes_on():
    users = [User(bytes([0x44 + i]) * 32) for i in range(3)]  # 100 models each: under the quota
    # queues this small drop to honest peers too under a burst: sync (every 5 s here) repairs
    async with open_fog(3, sync_interval=5, push_queue_frames=8, push_queue_bytes=64 * 1024,
                        push_eager_max=8) as fog, open_attacker(fog) as evil:
        stalled = trio.Event()

        async def never_read(stream):
            await stalled.wait()

        evil.svc.host.set_stream_handler(push.PROTOCOL, never_read)
        for m in fog:  # their links to evil reopen against the handler that never reads
            if evil.peer_id in m.svc.push.links:
                m.svc.push.links[evil.peer_id].scope.cancel()
        await linked(fog, extra=[evil.peer_id])
        for m in fog:
            m.svc.push.links[evil.peer_id].eager = True
        big = {"name": "x", "description": "y" * 3000}
        for k in range(300):
            await fog[k % 3].relay(users[k % 3], "POST", "/v1/models", {**big, "name": f"m {k}"},
                                   ts=1_700_000_000 + k % 50)
            if k % 10 == 0:
                for m in fog:
                    link = m.svc.push.links.get(evil.peer_id)
                    if link is not None:
                        assert len(link.frames) <= 8 + 64 and link.bytes <= 64 * 1024 + 64 * 1024
                await trio.sleep(0.02)
        await converged(fog, timeout=60)
        assert sum(m.svc.stats.push_dropped for m in fog) > 0
        assert [len(await m.svc.astore.list("model", limit=1000)) for m in fog] == [300] * 3
        stalled.set()


def test_link_queue_bounds():
    limits = push.PushLimits(queue_frames=4, queue_bytes=100)
    link = push.Link("p", eager=True)
    assert link.offer(b"x" * 200, limits)  # one frame alone is always taken
    assert not link.offer(b"x", limits)  # past the bytes
    assert link.offer(b"c", limits, control=True)  # control frames have some room
    link.take()
    assert all(link.offer(b"x", limits) for _ in range(4)) and not link.offer(b"x", limits)
