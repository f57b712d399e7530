"""Per-author op rates at the gossip level (gossip.AuthorBudget): a node key writing faster than
its budget has its batches held back by gossip, never refused: the ops come by sync, and
nobody is struck or banned for it."""

from __future__ import annotations

import trio

from formation.crdt.op import make_op
from formation.p2p.gossip import AuthorBudget
from tests.p2p.attacker import assert_no_honest_strikes, open_attacker
from tests.p2p.conftest import converged, open_fog
from tests.support import TS, User


class Op:
    def __init__(self, author: bytes):
        self.author = author


def test_a_batch_is_charged_to_its_authors_all_or_nothing_and_buckets_refill_and_stay_bounded():
    now = [0.0]
    b = AuthorBudget(rate=10, burst=20, max_authors=3, clock=lambda: now[0])
    x, y = b"x" * 20, b"y" * 20
    assert b.admit([Op(x)] * 15)
    assert not b.admit([Op(x)] * 6 + [Op(y)])  # x has 5 left: the whole batch waits, y is not charged
    assert b.throttled == 7
    assert b.admit([Op(y)] * 20) and b.admit([Op(x)] * 5)
    now[0] += 1.0  # ten more each
    assert b.admit([Op(x)] * 10) and not b.admit([Op(x)])
    for k in range(10):  # fresh keys are free: the table keeps max_authors buckets
        b.admit([Op(bytes([k]) * 20)])
    assert len(b._buckets) <= 3
    assert AuthorBudget(rate=0).admit([Op(x)] * 10**6)  # 0: no limit


async def test_a_fast_author_is_slowed_to_sync_not_refused_and_not_struck():
    user = User(b"\x71" * 32)
    async with open_fog(2, sync_interval=600, gap_grace=600) as fog, open_attacker(fog) as evil:
        for m in fog:
            m.svc.validator.authors = AuthorBudget(rate=1, burst=10)
        await fog[0].relay(user, "POST", "/v1/models", {"name": "before"}, ts=TS)
        await converged(fog)
        # 60 valid model creates by one node key (its users' requests), published in batches of 10
        heads = await evil.view(lambda s: s.heads())
        ops = []
        for i in range(60):
            req = user.request("POST", "/v1/models", {"name": f"fast {i}"}, ts=TS + 1 + i)
            op = make_op(evil.key, "model", _derived(req), deps=heads, hlc=max(_hlcs(evil, heads)) + 1 + i,
                         request=req)
            ops.append(op)
        for k in range(0, 60, 10):
            await evil.gossip([op.wire for op in ops[k:k + 10]])
        await trio.sleep(2.0)
        held = [sum(m.store.has(op.id) for op in ops) for m in fog]
        assert all(n <= 20 for n in held), held  # the burst (and a second's refill), not the flood
        # each node held back at least one whole batch (the rest may not even have been read:
        # a forwarder's unvalidated messages are bounded, and dropped unread past the bound)
        assert all(m.svc.validator.authors.throttled >= 10 for m in fog)
        assert_no_honest_strikes(fog)
        for m in fog:
            assert evil.peer_id not in m.svc.banned and not m.svc.validator.strikes.get(evil.peer_id)
        # slowed, not refused: a sync brings the rest (from a peer that holds them), and every
        # node agrees
        await evil.svc.astore.ingest_ops(ops, source="local")
        for m in fog:
            res = await m.svc.sync_with(evil.peer_id)
            assert res.ok and res.rejected == 0, res
        await converged(fog)
        assert all(m.store.has(op.id) for m in fog for op in ops)


def _derived(req) -> str:
    from formation.crdt.keys import parse_signature, sha256
    return sha256(parse_signature(req[2])).hex()[:32]


def _hlcs(evil, heads):
    return [evil.store.op_meta(h).hlc for h in heads]


def test_a_batch_past_the_budget_is_dropped_before_its_signatures_and_a_forger_spends_nothing():
    import msgpack

    from formation.crdt.keys import PrivateKey, eip191_hash, sha256
    from formation.crdt.op import PAYLOAD_NODE, VERSION
    honest, forger = PrivateKey(b"\x05" * 32), PrivateKey(b"\x06" * 32)

    def forge_wire(i: int) -> bytes:  # names the honest author, signed by the forger
        body = msgpack.packb([VERSION, "node", "x", honest.address, [], [], 1 + i, [PAYLOAD_NODE, {}]],
                             use_bin_type=True)
        return msgpack.packb([body, forger.sign_digest(eip191_hash(sha256(body)))], use_bin_type=True)

    b = AuthorBudget(rate=1, burst=5, clock=lambda: 0.0)
    good = [make_op(honest, "node", "0x" + honest.address.hex(), deps=[], hlc=1 + i,
                    value={"address": "0x" + honest.address.hex(), "heartbeat": i}).wire for i in range(6)]
    # wires that name the honest author but are signed by someone else: a peek says "honest"
    forged = [forge_wire(i) for i in range(3)]
    assert b.affords(forged) and b.affords(good[:5])  # a peek charges nothing
    assert not b.affords(good)  # 6 > 5: dropped unread
    assert b.admit([Op(honest.address)] * 5) and not b.affords(good[:1])
    assert b.affords([b"not an op"])  # names no author: the validator's checks refuse it
