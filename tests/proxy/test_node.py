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

from formation.dns.names import owner_label
from formation.node import proxy as proxy_module
from tests.dns.support import Authority, free_port
from tests.dns.test_node import DnsNode, eventually
from tests.dns.test_node import two_nodes as dns_two_nodes
from tests.proxy.support import Dialer, FakeReplica
from tests.support import User


class ProxyNode(DnsNode):
    KEY_SEED = 0x50

    def __init__(self, i: int, root, bootstrap: list[str], invite: str, upstream: tuple[str, int],
                 settings: dict | None = None):
        super().__init__(i, root, bootstrap, invite, upstream, settings={
            "proxy.port": free_port(), "proxy.down_seconds": 30, **(settings or {})})
        self.proxy = f"http://127.0.0.1:{self.config.proxy.port}"

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
    async with dns_two_nodes(root, upstream, settings, kind=ProxyNode) as (a, b):
        yield a, b


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
