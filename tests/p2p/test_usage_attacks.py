"""Forged usage over real in-process libp2p (tests/p2p/attacker.py): an attacker member signs usage
ops it has no right to (another node's record, a user's key as a node, a user's request, counters
out of bounds or of the wrong type, keys naming another node or none, fields that contradict
the key, a deletion) and pushes them by gossip and by sync. Every honest node refuses each with
the same code, and its state (hash, the host's record) is what it was."""

from __future__ import annotations

from formation.crdt.keys import sha256
from tests.p2p.attacker import forge_wire, open_attacker
from tests.p2p.conftest import converged, open_fog
from tests.p2p.test_attacks import caught_up, keep_working, read, refused_everywhere, top_hlc
from tests.support import User

IID = "5e" * 16


def record(node: str, owner: str, **more) -> dict:
    value = {"instance_id": IID, "node": node, "owner": owner, "cpu_seconds": 60, "memory_mb_seconds": 30_720,
             "disk_gb_seconds": 300, "net_rx_bytes": 1000, "net_tx_bytes": 2000, "hires": 3, "hire_ms": 450,
             "tokens_in": 10, "tokens_out": 20, "started_at": 1_700_000_000_000, "updated_at": 1_700_000_060_000,
             **more}
    return dict(sorted(value.items()))  # a forged wire is canonical only with sorted keys


async def test_forged_usage_is_refused_by_every_node_and_changes_nothing():
    owner = User(b"\x71" * 32)
    async with open_fog(2) as fog, open_attacker(fog) as evil:
        host = fog[0]
        key = f"{IID}@{host.node.address}"
        honest = await host.svc.astore.run(host.node.put, "usage", key, record(host.node.address, owner.address))
        host.svc.publish(honest.wire)
        await converged(fog)
        heads = await caught_up(evil, host)
        before = [(await m.svc.astore.state_hash(), await m.svc.astore.get("usage", key)) for m in fog]
        assert before[0] == before[1] and before[0][1]["cpu_seconds"] == 60

        hlc = await top_hlc(evil) + 1
        mine = f"{IID}@{evil.address}"
        other = "0x" + "11" * 20

        def forge(signer, k, value=None, **kw):
            return forge_wire(signer, "usage", k, deps=heads, hlc=hlc, value=value, **kw)

        forged = {
            # the host's record, written by another node, or by a user's key acting as a node
            forge(evil.key, key, record(host.node.address, owner.address, cpu_seconds=10**9)): "unauthorized",
            forge(owner.key, key, record(host.node.address, owner.address, hires=0)): "unauthorized",
            # a user's signed request for a usage record: no route takes one
            forge(evil.key, mine, request=owner.request("POST", "/v1/usage", record(evil.address, owner.address))):
                "unauthorized",
            # keys naming another node, or no node at all
            forge(evil.key, f"{IID}@{other}", record(other, owner.address)): "unauthorized",
            forge(evil.key, IID, record(evil.address, owner.address)): "unauthorized",
            # its own key, with counters out of bounds or not integers
            forge(evil.key, mine, record(evil.address, owner.address, cpu_seconds=2**62 + 1)): "bad_field",
            forge(evil.key, mine, record(evil.address, owner.address, hires=-1)): "bad_field",
            forge(evil.key, mine, record(evil.address, owner.address, net_rx_bytes=1.5)): "bad_field",
            forge(evil.key, mine, record(evil.address, owner.address, tokens_in=True)): "bad_field",
            forge(evil.key, mine, record(evil.address, owner.address, credits=100)): "bad_field",
            # fields that contradict the key, times out of order, a deletion
            forge(evil.key, mine, record(host.node.address, owner.address)): "bad_field",
            forge(evil.key, mine, record(evil.address, owner.address, started_at=1_800_000_000_000)): "bad_field",
            forge(evil.key, mine, None): "bad_field",
        }
        await refused_everywhere(evil, fog, forged, by_gossip=4)
        for m, (state_hash, rec) in zip(fog, before, strict=True):
            assert await m.svc.astore.state_hash() == state_hash
            assert await m.svc.astore.get("usage", key) == rec
            assert await m.svc.astore.get("usage", mine) is None
            assert not await read(m, lambda s: [i for i in map(sha256, forged) if s.has(i)])
        await keep_working(fog, owner, "forged usage")
        # the host's own record is still the host's to rewrite
        later = await host.svc.astore.run(host.node.put, "usage", key,
                                          record(host.node.address, owner.address, cpu_seconds=61))
        host.svc.publish(later.wire)
        await converged(fog)
        assert [(await m.svc.astore.get("usage", key))["cpu_seconds"] for m in fog] == [61, 61]
