"""Nodes in one trio process over real libp2p on 127.0.0.1: gossip, sync, partitions, liars."""

from __future__ import annotations

import pytest
import trio

from formation.crdt.op import make_op
from formation.p2p import gossip
from tests.p2p.conftest import converged, open_fog
from tests.support import User


async def test_three_nodes_writes_everywhere_reach_everyone():
    users = [User(bytes([50 + i]) * 32) for i in range(3)]
    async with open_fog(3) as fog:
        for k in range(20):
            m = fog[k % 3]
            await m.relay(users[k % 3], "POST", "/v1/models", {"name": f"model {k}"}, ts=1_700_000_000 + k)
            await m.heartbeat(k)
        took = await converged(fog)
        print(f"3 nodes converged {took * 1000:.0f} ms after the last write")
        assert all(len(m.store) == 40 for m in fog)
        assert [len(await m.models()) for m in fog] == [20] * 3
        # it was gossip, not only the periodic sync
        assert sum(m.svc.stats.ops_from_gossip for m in fog) > 0


@pytest.mark.slow
async def test_partition_and_heal():
    async with open_fog(6, sync_interval=1.0) as fog:
        left, right = fog[:3], fog[3:]
        await _partition(left, right)
        u1, u2 = User(b"\x61" * 32), User(b"\x62" * 32)
        for k in range(30):
            await left[k % 3].relay(u1, "POST", "/v1/models", {"name": f"left {k}"}, ts=1_700_000_000 + k)
            await right[k % 3].relay(u2, "POST", "/v1/models", {"name": f"right {k}"}, ts=1_700_000_000 + k)
        await converged(left)
        await converged(right)
        assert await left[0].svc.astore.state_hash() != await right[0].svc.astore.state_hash()
        assert [len(await m.models()) for m in fog] == [30] * 6
        _heal(fog)
        took = await converged(fog, timeout=60)
        print(f"partition healed: converged {took:.2f} s after the heal")
        assert [len(await m.models()) for m in fog] == [60] * 6


async def test_byzantine_peer_changes_nothing_and_is_cut_off():
    honest_user, victim = User(b"\x71" * 32), User(b"\x72" * 32)
    async with open_fog(3) as fog:
        a, b, evil = fog
        mid = (await a.relay(victim, "POST", "/v1/models", {"name": "precious"})).key
        await converged(fog)
        before = {m.i: await m.svc.astore.state_hash() for m in (a, b)}
        # the liar's own validator lets its garbage out
        evil.svc.pubsub.set_topic_validator(gossip.TOPIC, lambda *_: True, False)
        heads = evil.store.heads()
        hlc = 2**50
        forged = make_op(evil.node.key, "node", a.node.address, deps=heads, hlc=hlc,
                         value={"address": a.node.address})  # wrong author for the kind
        m, body, s = honest_user.request("PUT", f"/v1/models/{mid}", {"description": "mine now"})
        reg = evil.store.registers[("model", mid)]
        unauthorized = make_op(evil.node.key, "model", mid, deps=heads, prev=sorted(reg.heads),
                               hlc=hlc + 1, request=(m, body, s))
        ghost = bytes(32)
        withheld = make_op(evil.node.key, "node", evil.node.address, deps=[*heads, ghost], hlc=hlc + 2,
                           value={"address": evil.node.address})
        bad_sig = bytearray(forged.wire)
        bad_sig[-5] ^= 0xFF
        junk = [b"\xc1not msgpack", gossip.codec.pack_trusted([1, [bytes(bad_sig)]]),
                gossip.codec.pack_trusted([1, [b"\x00" * 70_000]])]
        for payload in [gossip.encode_batch([forged.wire, unauthorized.wire, withheld.wire])] + junk * 3:
            await evil.svc.pubsub.publish(gossip.TOPIC, payload)
        # a flood of valid-looking but rule-breaking ops
        for k in range(50):
            flood = make_op(evil.node.key, "node", b.node.address, deps=heads, hlc=hlc + 10 + k,
                            value={"address": b.node.address, "heartbeat": k})
            await evil.svc.pubsub.publish(gossip.TOPIC, gossip.encode_batch([flood.wire]))
        with trio.fail_after(20):
            while evil.svc.peer_id not in a.svc.banned or evil.svc.peer_id not in b.svc.banned:
                await trio.sleep(0.1)
        for m in (a, b):
            # the liar keeps redialing; each connection it makes is dropped at once
            with trio.fail_after(5):
                while evil.svc.peer_id in m.svc.connected():
                    await trio.sleep(0.05)
            assert evil.svc.peer_id in m.svc.blocked  # and it is never dialed again
            assert await m.svc.astore.state_hash() == before[m.i]
            assert (await m.svc.astore.get("model", mid))["description"] == ""
            assert m.svc.validator.rejected >= 1
        # the honest nodes keep working together
        await a.relay(honest_user, "POST", "/v1/models", {"name": "after the attack"})
        await b.heartbeat(99)
        await converged([a, b])
        assert len(await a.models()) == 2


async def test_gap_triggers_sync():
    """An op whose deps were missed (dropped gossip) is completed by a sync, not lost."""
    async with open_fog(2, sync_interval=60) as (a, b):
        await converged([a, b])
        u = User(b"\x75" * 32)
        # a writes two ops but only the second is gossiped: b sees a gap
        first = await a.svc.astore.run(a.node.relay, u, "POST", "/v1/models", {"name": "one"})
        second = await a.relay(u, "POST", "/v1/models", {"name": "two"}, ts=1_700_000_001)
        assert second.deps and first.id in second.deps
        await converged([a, b], timeout=15)
        assert b.store.has(first.id)


async def test_shutdown_is_clean_and_prompt():
    """Cancelling the fog's nursery stops every service task of every node, quickly."""
    start = trio.current_time()
    with trio.fail_after(10):
        async with open_fog(2) as fog:
            await fog[0].heartbeat(1)
            stores = [m.store for m in fog]
    assert trio.current_time() - start < 10
    for s in stores:  # the stores are usable (not left mid-transaction) after shutdown
        assert not s.log.db.in_transaction


async def test_a_node_alone_is_a_fog_of_one():
    async with open_fog(1) as fog:
        op = await fog[0].heartbeat(3)
        assert fog[0].store.has(op.id) and fog[0].svc.connected() == []
        with trio.fail_after(5):
            while fog[0].svc.stats.gossip_sent == 0:  # publishing with no peers does not fail
                await trio.sleep(0.05)


async def _partition(left, right) -> None:
    for a in left:
        for b in right:
            await a.svc.block(b.svc.peer_id)
            await b.svc.block(a.svc.peer_id)
    with trio.fail_after(10):
        while any(set(m.svc.connected()) & {o.svc.peer_id for o in (right if m in left else left)}
                  for m in left + right):
            await trio.sleep(0.1)


def _heal(fog) -> None:
    for a in fog:
        for b in fog:
            if a is not b:
                a.svc.unblock(b.svc.peer_id)


@pytest.mark.slow
async def test_partition_with_a_revocation_on_one_side_converges_on_the_revocation():
    """Conflicting writes on both sides of a partition: the owner revokes a manager on one side
    while the manager (and another manager) edit the same record on the other; after the heal
    every node shows the revocation, none of the revoked manager's concurrent edits, and the
    other manager's edit."""
    owner, revoked, other = User(b"\x63" * 32), User(b"\x64" * 32), User(b"\x65" * 32)
    ts = 1_700_000_000
    async with open_fog(4, sync_interval=1.0) as fog:
        left, right = fog[:2], fog[2:]
        mid = (await left[0].relay(owner, "POST", "/v1/models", {"name": "shared"}, ts=ts)).key
        for k, who in enumerate((revoked, other)):
            await left[0].relay(owner, "POST", f"/v1/models/{mid}/authorize",
                                {"address": who.address, "level": "manager"}, ts=ts + 1 + k)
        await converged(fog)
        await _partition(left, right)
        await left[1].relay(owner, "POST", f"/v1/models/{mid}/authorize",
                            {"address": revoked.address, "level": None}, ts=ts + 10)
        await left[0].relay(owner, "PUT", f"/v1/models/{mid}", {"license": "mit"}, ts=ts + 11)
        await right[0].relay(revoked, "PUT", f"/v1/models/{mid}", {"description": "revoked's edit"}, ts=ts + 20)
        await right[1].relay(revoked, "POST", f"/v1/models/{mid}/authorize",
                             {"address": User(b"\x66" * 32).address, "level": "operator"}, ts=ts + 21)
        await right[1].relay(other, "PUT", f"/v1/models/{mid}", {"version": "2"}, ts=ts + 22)
        await converged(left)
        await converged(right)
        assert (await right[0].svc.astore.get("model", mid))["description"] == "revoked's edit"
        _heal(fog)
        await converged(fog, timeout=60)
        for m in fog:
            model = await m.svc.astore.get("model", mid)
            assert model["authorized"] == {other.address: "manager"}
            assert model["description"] == "" and model["license"] == "mit" and model["version"] == "2"
        for m in fog:  # nobody honest was struck for relaying what was valid where it was made
            assert not m.svc.banned
