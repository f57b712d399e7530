"""The node runtime in-process: registration, the control socket, heartbeats, clean stop."""

from __future__ import annotations

import base64
import socket

import trio

from formation.crdt.keys import PrivateKey
from formation.crdt.store import Store
from formation.node.config import load_config
from formation.node.control import ControlClient
from formation.node.runtime import open_node
from tests.support import User


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_runtime(tmp_path, **over):
    cfg = load_config(None, {"node.data_dir": str(tmp_path), "vm.enabled": "false", "mesh.enabled": "false", "dns.enabled": False, "proxy.enabled": False, "node.heartbeat_seconds": 1,
                             "p2p.listen": f"/ip4/127.0.0.1/tcp/{free_port()}",
                             "api.port": free_port(), **over})
    return open_node(cfg, PrivateKey(b"\x09" * 32), Store(str(tmp_path / "state.db")))


async def test_runtime_registers_answers_control_and_stops(tmp_path):
    rt = make_runtime(tmp_path)
    sock = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        node = rt.store.get("node", rt.address)
        assert node["multiaddrs"] and node["multiaddrs"][0].endswith("/p2p/" + rt.peer_id)
        assert node["capacity"]["vcpus"] >= 1

        def control_session():
            c = ControlClient(sock)
            st = c.call(cmd="status")
            u = User(b"\x33" * 32)
            m, b, s = u.request("POST", "/v1/models", {"name": "via control"})
            sub = c.call(cmd="submit", message=m, body=base64.b64encode(b).decode(), signature=s.hex())
            got = c.call(cmd="get", kind="model", key=sub["key"])
            bad = c.call(cmd="submit", message=m, body=base64.b64encode(b"{}").decode(), signature=s.hex())
            junk = c.call(cmd="teleport")
            c.close()
            return st, sub, got, bad, junk

        st, sub, got, bad, junk = await trio.to_thread.run_sync(control_session)
        # its genesis (fog and member records: a node alone makes its own fog) and its node record
        assert st["ok"] and st["ops"] == 3 and st["peer_id"] == rt.peer_id
        assert st["fog"]["admitted"] and st["fog"]["id"] == rt.fog_id
        assert sub["ok"] and sub["kind"] == "model"
        assert got["value"]["name"] == "via control"
        assert not bad["ok"] and bad["error"] == "bad_request" and "hash" in bad["detail"]
        assert not junk["ok"] and "unknown cmd" in junk["detail"]
        # heartbeat refreshes the node record
        beat = node["heartbeat"]
        with trio.fail_after(5):
            while rt.store.get("node", rt.address)["heartbeat"] == beat:
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert not sock.exists()


async def test_watch_streams_commits(tmp_path):
    rt = make_runtime(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)

        def watch_two():
            c = ControlClient(tmp_path / "control.sock", timeout=10)
            assert c.sock.sendall(b'{"cmd": "watch", "since": 0}\n') is None
            seen = []
            for line in c.lines():
                if "seq" in line:
                    seen.append(line)
                if len(seen) >= 2:
                    break
            c.close()
            return seen

        async def write_later():
            await trio.sleep(0.3)
            await rt.write("node", rt.address, rt.node_record())

        nursery.start_soon(write_later)
        seen = await trio.to_thread.run_sync(watch_two)
        assert [s["seq"] for s in seen] == [1, 2]
        nursery.cancel_scope.cancel()
