"""Run inside a fresh network namespace by tests/proxy/test_netns.py (root): two in-process
nodes whose proxies dial the replicas' VM addresses for real (no test dialer). The replicas
listen on 10.202.1.5 (node a's) and 10.201.1.5 (node b's), addresses of the namespace's lo;
b's then becomes unreachable the way a host behind a dead tunnel is (its address gone, its
subnet routed into a veth whose other end answers nothing: connections time out), and comes
back. Prints one JSON line of what it measured; exits non-zero on a failed check."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from formation.dns.names import owner_label  # noqa: E402
from tests.proxy.support import FakeReplica  # noqa: E402
from tests.proxy.test_node import eventually, two_nodes  # noqa: E402
from tests.support import User  # noqa: E402


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


async def main(root: Path) -> dict:
    ip("addr", "add", "10.202.1.5/32", "dev", "lo")
    ip("addr", "add", "10.201.1.5/32", "dev", "lo")
    ip("link", "add", "void0", "type", "veth", "peer", "name", "void1")  # the other end answers nothing
    ip("link", "set", "void0", "up")
    ip("link", "set", "void1", "up")
    out: dict = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(FakeReplica("on-a", "10.202.1.5", 8080).serve)
        await nursery.start(FakeReplica("on-b", "10.201.1.5", 8080).serve)
        settings = {"proxy.connect_timeout_ms": 500, "proxy.down_seconds": 2}
        user = User(b"\x63" * 32)
        async with two_nodes(root, ("127.0.0.1", 9), settings) as (a, b), \
                httpx.AsyncClient(timeout=10) as client:
            op = await a.request(user, "POST", "/v1/instance/create",
                                 {"name": "web", "replicas": 2, "formfile": "NAME web\nEXPOSE 8080\n"})
            iid = op.key
            await a.replica(iid, "10.202.1.5", "10.202.1.0/24", "10.42.0.8")
            await b.replica(iid, "10.201.1.5", "10.201.1.0/24", "10.42.0.9")
            name = f"web.{owner_label(user.address)}.fog"
            seen: set[str] = set()

            async def both():
                r = await client.get(a.proxy + "/", headers={"Host": name})
                if r.status_code == 200:
                    seen.add(r.json()["replica"])
                return seen == {"on-a", "on-b"}

            await eventually("a's proxy reaching both replicas", both)
            # b's replica unreachable: its address gone, its subnet a black hole
            ip("addr", "del", "10.201.1.5/32", "dev", "lo")
            ip("route", "add", "10.201.1.0/24", "dev", "void0")
            t0 = time.monotonic()
            got = []
            for _ in range(6):
                r = await client.get(a.proxy + "/", headers={"Host": name})
                assert r.status_code == 200, r.text
                got.append(r.json()["replica"])
            out["failover_seconds"] = round(time.monotonic() - t0, 3)
            assert got == ["on-a"] * 6, got
            assert out["failover_seconds"] < 0.5 + 1.0, out  # one connect timeout, then left out
            # b's replica is back: after down_seconds it is in the rotation again
            ip("route", "del", "10.201.1.0/24", "dev", "void0")
            ip("addr", "add", "10.201.1.5/32", "dev", "lo")
            seen.clear()
            t0 = time.monotonic()
            await eventually("b's replica back in the rotation", both)
            out["recovery_seconds"] = round(time.monotonic() - t0, 3)
        nursery.cancel_scope.cancel()
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(trio.run(main, Path(tmp))))
