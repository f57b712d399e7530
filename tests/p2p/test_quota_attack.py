"""Quotas against a Byzantine node over real in-process libp2p: an attacker member that counts no
quota wraps an account's creates past its quota and pushes them by gossip and by sync; the
honest nodes store them (validity accepts them) and agree on which are inert; nobody else's
quota is touched, and an honest node refuses to make such a create itself."""

from __future__ import annotations

import pytest

from formation.crdt.kinds import Invalid
from formation.crdt.quotas import Quotas
from tests.p2p.attacker import open_attacker
from tests.p2p.conftest import converged, open_fog
from tests.support import TS, User

SMALL = Quotas(records={"instance": 2, "agent": 2, "model": 2, "dns": 2})
NONE = Quotas(records={"instance": 10**6, "agent": 10**6, "model": 10**6, "dns": 10**6}, replicas=10**9,
              vcpus=10**9, memory_mb=10**12, disk_gb=10**12)


def quota_view(store) -> list[tuple]:
    return list(store.log.db.execute(
        "SELECT key, owner, over_quota IS NOT NULL FROM records WHERE kind = 'model' ORDER BY key"))


async def test_creates_past_a_quota_from_a_byzantine_node_are_inert_alike_everywhere():
    alice, mallory = User(b"\x41" * 32), User(b"\x4d" * 32)
    async with open_fog(2) as fog, open_attacker(fog) as evil:
        for m in fog:
            m.store.replica.quota.quotas = SMALL  # the fog's quotas (small, to keep the test short)
        evil.store.replica.quota.quotas = NONE  # the attacker counts nothing
        await fog[0].relay(alice, "POST", "/v1/models", {"name": "alice 1"}, ts=TS)
        await converged(fog)
        # five creates for mallory, and transfers of all of them to alice
        made = [await evil.svc.astore.run(evil.node.relay, mallory, "POST", "/v1/models", {"name": f"m{i}"}, ts=TS + 1 + i)
                for i in range(5)]
        gifts = [await evil.svc.astore.run(evil.node.relay, mallory, "POST", f"/v1/models/{op.key}/transfer",
                                 {"to": alice.address}, ts=TS + 10 + i) for i, op in enumerate(made)]
        await evil.gossip([op.wire for op in made[:3]])
        for m in fog:
            await evil.push_sync(m.svc.peer_id, [op.wire for op in made[3:] + gifts])
        await converged([*fog])
        views = [await m.svc.astore.run(quota_view, m.store) for m in fog]
        assert views[0] == views[1]
        inert = {key for key, _, over in views[0] if over}
        assert inert == {op.key for op in made[2:]}  # mallory's first two count (by signed time)
        for m in fog:
            listed = {r["model_id"] for r in await m.models()}
            assert listed.isdisjoint(inert) and len(listed) == 3
            why = await m.svc.astore.over_quota("model", made[4].key)
            assert "quota of 2 model records per account" in why and mallory.address in why
        # alice now owns six models, five of them created by mallory: her own quota is untouched
        await fog[1].relay(alice, "POST", "/v1/models", {"name": "alice 2"}, ts=TS + 20)
        with pytest.raises(Invalid) as e:
            await fog[1].relay(alice, "POST", "/v1/models", {"name": "alice 3"}, ts=TS + 21)
        assert e.value.code == "quota_exceeded"
        # an honest node will not wrap a create past mallory's quota either
        with pytest.raises(Invalid, match="quota of 2 model records"):
            await fog[0].relay(mallory, "POST", "/v1/models", {"name": "one more"}, ts=TS + 22)
        # deleting one of the two that count brings the next one back, on every node
        gift = made[0].key
        base = (await fog[0].svc.astore.get_versioned("model", gift))["record_version"]
        op = await fog[0].svc.astore.run(fog[0].node.relay, alice, "DELETE", f"/v1/models/{gift}", None,
                                         ts=TS + 30, base=base)
        fog[0].svc.publish(op.wire)
        await converged(fog)
        for m in fog:
            assert await m.svc.astore.over_quota("model", made[2].key) is None
            assert await m.svc.astore.over_quota("model", made[3].key)
