"""A real node (p2p, control socket, HTTP API) in the test's trio run."""

from __future__ import annotations

import contextlib
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


@contextlib.asynccontextmanager
async def running_node(tmp_path, *, secret: bytes = b"\x0a" * 32, bootstrap=()):
    tmp_path.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = load_config(None, {"node.data_dir": str(tmp_path), "vm.enabled": "false", "api.port": port,
                             "p2p.listen": f"/ip4/127.0.0.1/tcp/{free_port()}",
                             "p2p.bootstrap": list(bootstrap)})
    rt = NodeRuntime(cfg, PrivateKey(secret), Store(str(tmp_path / "state.db")))
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        rt.base_url = f"http://127.0.0.1:{port}"
        try:
            yield rt
        finally:
            nursery.cancel_scope.cancel()
    rt.store.close()


@pytest.fixture
async def node(tmp_path):
    async with running_node(tmp_path / "n1") as rt:
        yield rt
