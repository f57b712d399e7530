"""The dialer's back-off, on trio's virtual clock: no real waiting, the schedule itself checked."""

from __future__ import annotations

import pytest
import trio

from formation.crdt.async_store import AsyncStore
from formation.crdt.keys import PrivateKey
from formation.crdt.store import Store
from formation.p2p.service import P2PService, P2PSettings, peer_id_of
from tests.p2p.test_node_runtime import free_port


async def test_redial_backs_off_doubling_up_to_the_cap(autojump_clock):
    svc = P2PService(PrivateKey(b"\x51" * 32), AsyncStore(Store()),
                     P2PSettings(redial_min=0.5, redial_max=4.0, dial_timeout=10.0))
    gone = peer_id_of(PrivateKey(b"\x52" * 32))
    addr = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{gone}"  # nobody listens there
    backoffs, waits = [], []
    for _ in range(6):
        await svc._dial(gone, [addr])
        backoffs.append(svc._backoff[gone])
        waits.append(svc._next_dial[gone] - trio.current_time())
    assert backoffs == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert waits == pytest.approx(backoffs)  # the next try is due one back-off from the failure


async def test_a_service_that_ends_closes_its_connections():
    """`form join` runs the p2p service to sync, ends it and runs the node under the same peer
    id: connections left open by the first run would have its peers writing into dead ones."""
    stay = P2PService(PrivateKey(b"\x53" * 32), AsyncStore(Store()),
                      P2PSettings(listen=["/ip4/127.0.0.1/tcp/0"], sync_interval=600))
    async with trio.open_nursery() as nursery:
        await nursery.start(stay.run)
        key = PrivateKey(b"\x54" * 32)
        with trio.fail_after(20):
            for _ in range(2):  # the same identity twice, like form join then form node
                go = P2PService(key, AsyncStore(Store()), P2PSettings(
                    listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=stay.addrs()[:1], sync_interval=600))
                async with trio.open_nursery() as inner:
                    await inner.start(go.run)
                    while peer_id_of(key) not in stay.connected():
                        await trio.sleep(0.05)
                    inner.cancel_scope.cancel()
                while peer_id_of(key) in stay.connected():  # the far side sees it go
                    await trio.sleep(0.05)
                assert len(stay.host.get_network().connections.get(_id(key), [])) == 0
        nursery.cancel_scope.cancel()


def _id(key: PrivateKey):
    from libp2p.peer.id import ID

    return ID.from_base58(peer_id_of(key))
