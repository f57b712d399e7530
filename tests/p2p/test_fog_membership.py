"""Membership over real in-process nodes: an invite is sealed by its inviter once claimed, so the
same token claimed again (it leaked after its use) admits nobody and evicts nobody."""

from __future__ import annotations

import trio

from formation.crdt.kinds.fog_kinds import invite_id
from tests.p2p.test_scheduler_fog import FogNode


async def _until(pred, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not await pred():
            await trio.sleep(0.1)


async def test_a_used_invite_claimed_again_evicts_nobody(tmp_path):
    async with trio.open_nursery() as nursery:
        genesis = FogNode(0, tmp_path, [])
        await nursery.start(genesis.serve)
        token = await genesis.runtime.create_invite(expires_s=600)
        boot = genesis.runtime.p2p.addrs()
        joined = FogNode(1, tmp_path, boot, token.encode())
        await nursery.start(joined.serve)

        async def sealed() -> bool:
            seal = await genesis.runtime.astore.get("admit", invite_id(token.invite))
            return seal is not None and seal["member"] == joined.address.lower()

        await _until(sealed)
        # the token leaks: another host claims it too
        thief = FogNode(2, tmp_path, boot, token.encode())
        await nursery.start(thief.serve)

        async def thief_claim_seen_everywhere() -> bool:
            return all([await n.runtime.astore.get("member", thief.address.lower()) is not None
                        for n in (genesis, joined)])

        await _until(thief_claim_seen_everywhere)
        for node in (genesis, joined, thief):
            members = {n["address"] for n in await node.runtime.fog_nodes()}
            assert members == {genesis.address.lower(), joined.address.lower()}, node.i
        await thief.runtime._check_admitted()
        assert not thief.runtime.admitted and joined.runtime.admitted
        nursery.cancel_scope.cancel()
