"""Budgets and bounds away from the HTTP API: state files made durable, the control socket
private from its first instant and parsing strictly, a store error in gossip survived."""

from __future__ import annotations

import functools
import json
import logging
import os
import sqlite3
import stat
from collections import Counter
from types import SimpleNamespace

import pytest
import trio

from formation.crdt.replica import IngestResult
from formation.files import write_atomic
from formation.node import control
from formation.p2p.service import P2PService, P2PStats

# ---- write_atomic ------------------------------------------------------------------------------


def test_write_atomic_makes_the_file_and_its_rename_durable(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        mode = os.fstat(fd).st_mode
        synced.append("dir" if stat.S_ISDIR(mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "state.json"
    write_atomic(target, json.dumps({"a": 1}))
    assert json.loads(target.read_text()) == {"a": 1}
    # the content before the rename, then the directory entry the rename changed
    assert synced == ["file", "dir"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


# ---- the control socket ------------------------------------------------------------------------


class FakeNode:
    def __init__(self):
        self.left = False

    async def status(self) -> dict:
        return {"address": "0xnode"}

    async def leave(self) -> str:
        self.left = True
        return "fog"


async def ask(path, line: bytes) -> dict:
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(line)
        got = b""
        while not got.endswith(b"\n"):
            data = await stream.receive_some(65536)
            if not data:
                break
            got += data
    return json.loads(got)


async def test_control_socket_is_private_from_its_first_instant(tmp_path, monkeypatch):
    """The socket can write as the node. Made under the process's umask and chmod-ed after,
    it was open to every local user for a moment; it is made 0600 from the start."""
    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)  # only the mode it is created with counts
    old = os.umask(0o022)
    try:
        async with trio.open_nursery() as nursery:
            path = await nursery.start(control.serve_control, FakeNode(), tmp_path / "control.sock")
            mode = stat.S_IMODE(os.stat(path).st_mode)
            assert mode & 0o077 == 0, oct(mode)
            assert (await ask(path, b'{"cmd": "status"}\n'))["ok"]
            nursery.cancel_scope.cancel()
    finally:
        os.umask(old)


async def test_control_socket_parses_strictly_and_survives_bad_requests(tmp_path):
    node = FakeNode()
    async with trio.open_nursery() as nursery:
        path = await nursery.start(control.serve_control, node, tmp_path / "control.sock")
        # which "cmd"? json.loads took the last one: a status request that made the node leave
        r = await ask(path, b'{"cmd": "status", "cmd": "leave"}\n')
        assert r["ok"] is False and r["error"] == "bad_request" and "appears twice" in r["detail"]
        assert not node.left
        r = await ask(path, json.dumps({"cmd": "status"}).encode("utf-16") + b"\n")
        assert r["ok"] is False and "UTF-8" in r["detail"]
        r = await ask(path, b'{"cmd": "watch", "since": "x"}\n')  # it ended the node's control socket
        assert r["ok"] is False and "since" in r["detail"]
        assert (await ask(path, b'{"cmd": "status"}\n'))["ok"]
        nursery.cancel_scope.cancel()


# ---- gossip ------------------------------------------------------------------------------------


class FlakyStore:
    """Fails its first ingest (the disk was full), then takes everything."""

    def __init__(self):
        self.calls = 0
        self.taken: list = []

    async def ingest_ops(self, ops, *, source):
        self.calls += 1
        if self.calls == 1:
            raise sqlite3.OperationalError("database or disk is full")
        self.taken += ops
        return IngestResult(accepted=[b"id"] * len(ops))


async def test_a_store_error_in_gossip_is_logged_and_the_node_goes_on(caplog):
    messages = [SimpleNamespace(from_id=b"peer", data=b"first"), SimpleNamespace(from_id=b"peer", data=b"second")]
    done = trio.Event()

    class Sub:
        async def get(self):
            if messages:
                return messages.pop(0)
            done.set()
            await trio.sleep_forever()

    store = FlakyStore()
    fake = SimpleNamespace(host=SimpleNamespace(get_id=lambda: SimpleNamespace(to_bytes=lambda: b"me")),
                           stats=P2PStats(), validator=SimpleNamespace(take=lambda data: [data], strikes=Counter()),
                           banned=set(), astore=store, _gap_check_scheduled=False, _nursery=None,
                           _store_errors=0)
    fake._ingest = functools.partial(P2PService._ingest, fake)  # the store path gossip and push share
    with caplog.at_level(logging.ERROR, logger="formation.p2p"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(P2PService._gossip_in, fake, Sub())
            with trio.fail_after(5):
                await done.wait()
            nursery.cancel_scope.cancel()
    assert store.taken == [b"second"]  # the batch after the failed one was taken
    assert fake.stats.ops_from_gossip == 1
    assert any("store error #1" in r.getMessage() for r in caplog.records), caplog.text


@pytest.fixture(autouse=True)
def _umask_kept():
    before = os.umask(0o022)
    os.umask(before)
    yield
    after = os.umask(before)
    os.umask(after)
    assert after == before
