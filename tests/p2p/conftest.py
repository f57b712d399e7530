"""In-process fogs: several P2PService instances with their own stores in one trio run."""

from __future__ import annotations

import contextlib

import pytest
import trio

from formation.crdt.async_store import AsyncStore
from formation.crdt.store import Store
from formation.p2p.service import P2PService, P2PSettings
from formation.vm import network
from tests.support import Node


class Member:
    def __init__(self, i: int, svc: P2PService, node: Node):
        self.i = i
        self.svc = svc
        self.node = node

    @property
    def store(self) -> Store:
        return self.node.store

    async def models(self) -> list[dict]:
        return await self.svc.astore.run(lambda s: s.list("model"), self.store)

    async def relay(self, user, method, path, body=None, *, ts=1_700_000_000):
        op = await self.svc.astore.run(self.node.relay, user, method, path, body, ts=ts)
        self.svc.publish(op.wire)
        return op

    async def heartbeat(self, beat=0):
        op = await self.svc.astore.run(self.node.heartbeat, beat)
        self.svc.publish(op.wire)
        return op


@contextlib.asynccontextmanager
async def open_fog(n: int, *, sync_interval: float = 2.0, mesh: bool = True, **settings):
    """`settings`: more P2PSettings fields, the same for every member."""
    members: list[Member] = []
    async with trio.open_nursery() as nursery:
        for i in range(n):
            node = Node(Store(), secret=bytes([i + 1]) * 32)
            boot = [m.svc.addrs()[0] for m in (members if mesh else members[:1])]
            svc = P2PService(node.key, AsyncStore(node.store), P2PSettings(
                listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=boot, sync_interval=sync_interval, **settings))
            await nursery.start(svc.run)
            members.append(Member(i, svc, node))
        with trio.fail_after(20):
            while any(len(m.svc.connected()) < min(n - 1, 1 if not mesh else n - 1) for m in members):
                await trio.sleep(0.1)
        try:
            yield members
        finally:
            nursery.cancel_scope.cancel()


async def converged(members, timeout: float = 30.0) -> float:
    """Seconds until every member has the same state hash and heads (fails after timeout)."""
    start = trio.current_time()
    with trio.fail_after(timeout):
        while True:
            # read under the store lock: a sync may be committing in a worker thread
            views = [await m.svc.astore.run(lambda s: (s.state_hash(), tuple(s.heads())), m.store)
                     for m in members]
            if len(set(views)) == 1:
                return trio.current_time() - start
            await trio.sleep(0.05)


@pytest.fixture
def fog():
    return open_fog


@pytest.fixture
def no_taps(monkeypatch):
    """The scheduler removes a VM's tap itself (network.delete_link): record it, touch no host link."""
    deleted: list[str] = []

    async def delete_link(name: str, netns: str | None = None) -> None:
        deleted.append(name)

    monkeypatch.setattr(network, "delete_link", delete_link)
    return deleted
