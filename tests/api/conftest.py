"""A real node (p2p, control socket, HTTP API) in the test's trio run."""

from __future__ import annotations

import contextlib
import errno
import socket

import pytest
import trio

from formation.crdt.keys import PrivateKey
from formation.crdt.store import Store
from formation.node.config import load_config
from formation.node.runtime import NodeRuntime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _address_in_use(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_address_in_use(e) for e in exc.exceptions)
    return isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE


@contextlib.asynccontextmanager
async def running_node(tmp_path, *, secret: bytes = b"\x0a" * 32, bootstrap=()):
    tmp_path.mkdir(parents=True, exist_ok=True)
    # A port found free can be taken before the node binds it (another process's ephemeral
    # port): try again with new ports rather than fail the test on a race with the machine.
    for attempt in range(5):
        port = free_port()
        cfg = load_config(None, {"node.data_dir": str(tmp_path), "vm.enabled": "false", "api.port": port,
                                 "p2p.listen": f"/ip4/127.0.0.1/tcp/{free_port()}",
                                 "p2p.bootstrap": list(bootstrap)})
        rt = NodeRuntime(cfg, PrivateKey(secret), Store(str(tmp_path / "state.db")))
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await nursery.start(rt.run)
                except Exception as exc:
                    if attempt < 4 and _address_in_use(exc):
                        continue
                    raise
                rt.base_url = f"http://127.0.0.1:{port}"
                try:
                    yield rt
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            rt.store.close()
        return


@pytest.fixture
async def node(tmp_path):
    async with running_node(tmp_path / "n1") as rt:
        yield rt
