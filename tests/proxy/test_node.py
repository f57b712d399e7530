"""Two running nodes (real libp2p on 127.0.0.1, mesh and VMs off) with their DNS view and
proxy on: a request to node a's proxy for an instance's name lands on the replica node b runs,
and moves to a's own replica, with no error, once b's stops answering; a vanity domain is
routed once its own DNS proves it. The replicas are fake HTTP servers on loopback: the state
names VM addresses (in the nodes' subnets, as formnet would route them) and the proxy's dialer
maps those to the servers, since without VMs nothing listens at a VM address."""

from __future__ import annotations

import contextlib
import time

import httpx
import trio

from formation.crdt.keys import PrivateKey
from formation.crdt.store import Store
from formation.dns.names import owner_label
from formation.node import proxy as proxy_module
from formation.node.config import load_config
from formation.node.runtime import open_node
from tests.dns.support import Authority, free_port
from tests.proxy.support import Dialer, FakeReplica
from tests.support import User, current_version


class ProxyNode:
    def __init__(self, i: int, root, bootstrap: list[str], invite: str, upstream: tuple[str, int],
                 settings: dict | None = None):
        data = root / f"n{i}"
        data.mkdir()
        cfg = load_config(None, {
            "node.data_dir": str(data), "vm.enabled": "false", "mesh.enabled": "false",
            "node.heartbeat_seconds": 1, "p2p.listen": f"/ip4/127.0.0.1/tcp/{free_port()}",
            "p2p.bootstrap": bootstrap, "fog.invite": invite, "api.port": free_port(),
            "dns.port": free_port(), "dns.upstreams": [f"{upstream[0]}:{upstream[1]}"],
            "dns.verify_min_seconds": 1, "dns.upstream_timeout_ms": 500,
            "proxy.port": free_port(), "proxy.down_seconds": 30, **(settings or {})})
        self.runtime = open_node(cfg, PrivateKey(bytes([0x50 + i]) * 32), Store(str(data / "state.db")))
        self.proxy = f"http://127.0.0.1:{cfg.proxy.port}"

    @property
    def address(self) -> str:
        return self.runtime.address

    async def request(self, user: User, method: str, path: str, body: dict | None = None):
        base = await self.runtime.astore.run(current_version, self.runtime.store, user, method, path, body)
        m, b, s = user.request(method, path, body, ts=int(time.time()), base=base)
        return await self.runtime.submit_request(m, b, s)

    async def replica(self, iid: str, ip: str, subnet: str, overlay: str, state: str = "running"):
        """This node's VM subnet (its peer record) and a replica's status, as a node with VMs
        and formnet would write them."""
        now = int(time.time() * 1000)
        key = (self.address[2:4].upper() * 22)[:43] + "="
        await self.runtime.write("peer", self.address, {"address": self.address, "public_key": key,
                                                        "overlay_ip": overlay, "vm_subnet": subnet,
                                                        "updated_at": now})
        await self.runtime.write("instance_status", f"{iid}@{self.address}", {
            "instance_id": iid, "node": self.address, "state": state, "ip": ip, "updated_at": now})


@contextlib.asynccontextmanager
async def two_nodes(root, upstream, settings: dict | None = None):
    async with trio.open_nursery() as nursery:
        a = ProxyNode(0, root, [], "", upstream, settings)
        await nursery.start(a.runtime.run)
        invite = (await a.runtime.create_invite(expires_s=600)).encode()
        b = ProxyNode(1, root, list(a.runtime.p2p.addrs()), invite, upstream, settings)
        await nursery.start(b.runtime.run)
        with trio.fail_after(20):
            while not all([n.runtime.admitted and len(await n.runtime.fog_nodes()) == 2 for n in (a, b)]):
                await trio.sleep(0.1)
        try:
            yield a, b
        finally:
            nursery.cancel_scope.cancel()


async def eventually(what, check, timeout=15.0):
    last = None
    with trio.move_on_after(timeout):
        while True:
            last = await check()
            if last:
                return last
            await trio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


async def test_the_proxy_routes_to_a_replica_on_another_node_and_fails_over(tmp_path, nursery, monkeypatch):
    auth = Authority(negative_ttl=1)
    upstream = await nursery.start(auth.serve)
    ra = await nursery.start(FakeReplica("on-a").serve)
    rb = await nursery.start(FakeReplica("on-b").serve)
    dialer = Dialer({("10.202.1.5", 8080): ra, ("10.201.1.5", 8080): rb})
    monkeypatch.setattr(proxy_module, "dial", dialer)
    user = User(b"\x62" * 32)
    async with two_nodes(tmp_path, upstream) as (a, b), httpx.AsyncClient(timeout=10) as client:
        op = await a.request(user, "POST", "/v1/instance/create",
                             {"name": "web", "replicas": 2, "formfile": "NAME web\nEXPOSE 8080\n"})
        iid = op.key
        name = f"web.{owner_label(user.address)}.fog"

        async def no_replica():
            r = await client.get(a.proxy + "/", headers={"Host": name})
            return r.status_code == 503 and "no replica" in r.text

        await eventually("the name in a's zone, with no replica yet", no_replica)
        # only b runs one: a's proxy sends the request to b's
        await b.replica(iid, "10.201.1.5", "10.201.1.0/24", "10.42.0.9")
        await a.replica(iid, "10.202.1.5", "10.202.1.0/24", "10.42.0.8", state="booting")

        async def answered_by(node, replica, host=name):
            r = await client.get(node.proxy + "/path?q=1", headers={"Host": host})
            return r.status_code == 200 and r.json()["replica"] == replica and r

        r = await eventually("a's proxy reaching b's replica", lambda: answered_by(a, "on-b"))
        assert r.headers["x-formation-replica"] == b.address
        assert r.json()["target"] == "/path?q=1" and ["x-forwarded-host", name] in r.json()["headers"]
        await eventually("b's proxy reaching its own replica", lambda: answered_by(b, "on-b", f"{iid}.fog"))
        # a's replica runs too: both get requests
        await a.replica(iid, "10.202.1.5", "10.202.1.0/24", "10.42.0.8")
        await eventually("a's replica in the rotation", lambda: answered_by(a, "on-a"))
        # b's replica stops answering: every request lands on a's, with no error
        seen_dialed = set(dialer.dialed)
        dialer.dialed.clear()
        rb.stop()
        t0 = time.monotonic()
        for _ in range(6):
            r = await client.get(a.proxy + "/", headers={"Host": name})
            assert r.status_code == 200 and r.json()["replica"] == "on-a", r.text
            r = await client.post(b.proxy + "/", headers={"Host": name}, content=b"hello")
            assert r.status_code == 200 and r.json()["replica"] == "on-a" and r.json()["body_len"] == 5
        assert time.monotonic() - t0 < 5
        assert dialer.dialed.count(("10.201.1.5", 8080)) == 2  # once by each proxy, then left out
        seen_dialed |= set(dialer.dialed)
        assert seen_dialed == {("10.201.1.5", 8080), ("10.202.1.5", 8080)}  # nothing else, ever

        # a vanity domain: 404 until its own DNS names the owner, then routed by both nodes
        await a.request(user, "POST", "/v1/dns/create", {"domain": "shop.example.test", "record_type": "A",
                                                         "targets": [iid], "ttl": 60})
        await eventually("the domain checked", lambda: _asked(auth, "_formation.shop.example.test."))
        r = await client.get(a.proxy + "/", headers={"Host": "shop.example.test"})
        assert r.status_code == 404
        auth.set("_formation.shop.example.test", "TXT", [f'"{user.address}"'], ttl=2)
        for node in (a, b):
            await eventually("the proven domain routed", lambda n=node: answered_by(n, "on-a", "shop.example.test"))
        assert set(dialer.dialed) <= seen_dialed


async def _asked(auth: Authority, name: str) -> bool:
    return (name, "TXT") in auth.asked
