"""Running nodes (real libp2p on 127.0.0.1, mesh and VMs off) serving the fog's names, asked
with dnspython and dig: a node answers for an instance it does not host; instance, replica,
owner-scoped and SRV names; NXDOMAIN and NODATA; a vanity domain is served only once its own
DNS (a test authority on loopback, the nodes' upstream) names the owner; forwarding."""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from contextlib import redirect_stdout

import dns.flags
import dns.rcode
import pytest
import trio

from formation import cli
from formation.crdt.keys import PrivateKey
from formation.crdt.store import Store
from formation.dns.names import owner_label
from formation.node.config import load_config
from formation.node.runtime import open_node
from tests.dns.support import DIG, Authority, ask, dig, free_port
from tests.p2p.test_scheduler_fog import wait_for
from tests.support import User, current_version

needs_dig = pytest.mark.skipif(DIG is None and not os.environ.get("CI"), reason="dig (bind9-dnsutils) is not installed")


class DnsNode:
    """A node with its DNS server on (tests/proxy adds the proxy: `settings`)."""

    KEY_SEED = 0x70

    def __init__(self, i: int, root, bootstrap: list[str], invite: str, upstream: tuple[str, int],
                 dns_port: int | None = None, settings: dict | None = None):
        data = root / f"n{i}"
        data.mkdir()
        self.dns = ("127.0.0.1", dns_port or free_port())
        cfg = load_config(None, {
            "node.data_dir": str(data), "vm.enabled": "false", "mesh.enabled": "false",
            "node.heartbeat_seconds": 1, "p2p.listen": f"/ip4/127.0.0.1/tcp/{free_port()}",
            "p2p.bootstrap": bootstrap, "fog.invite": invite, "api.port": free_port(),
            "dns.port": self.dns[1], "dns.upstreams": [f"{upstream[0]}:{upstream[1]}"],
            "dns.verify_min_seconds": 1, "dns.upstream_timeout_ms": 500, **(settings or {})})
        self.runtime = open_node(cfg, PrivateKey(bytes([self.KEY_SEED + i]) * 32), Store(str(data / "state.db")))
        self.api = f"http://127.0.0.1:{cfg.api.port}"
        self.config = cfg

    @property
    def address(self) -> str:
        return self.runtime.address

    async def request(self, user: User, method: str, path: str, body: dict | None = None):
        base = await self.runtime.astore.run(current_version, self.runtime.store, user, method, path, body)
        m, b, s = user.request(method, path, body, ts=int(time.time()), base=base)
        return await self.runtime.submit_request(m, b, s)


@contextlib.asynccontextmanager
async def two_nodes(root, upstream, settings: dict | None = None, kind: type[DnsNode] = DnsNode):
    """Nodes 0 (the genesis) and 1 (admitted by its invite), both seeing both as members."""
    async with trio.open_nursery() as nursery:
        a = kind(0, root, [], "", upstream, settings=settings)
        await nursery.start(a.runtime.run)
        invite = (await a.runtime.create_invite(expires_s=600)).encode()
        b = kind(1, root, list(a.runtime.p2p.addrs()), invite, upstream, settings=settings)
        await nursery.start(b.runtime.run)
        with trio.fail_after(20):
            while not all([n.runtime.admitted and len(await n.runtime.fog_nodes()) == 2 for n in (a, b)]):
                await trio.sleep(0.1)
        try:
            yield a, b
        finally:
            nursery.cancel_scope.cancel()


async def eventually(what, check, timeout=15.0):
    return await wait_for(what, check, timeout)


async def form_dns_verify(node: DnsNode, domain: str, owner: str) -> tuple[int, dict]:
    """`form dns verify DOMAIN --json` against the node (its API and its DNS server)."""
    def run():
        buf = io.StringIO()
        with redirect_stdout(buf):
            rc = cli.main(["dns", "verify", domain, "--owner", owner, "--node", node.api,
                           "--server", f"{node.dns[0]}:{node.dns[1]}", "--json"])
        return rc, json.loads(buf.getvalue())

    return await trio.to_thread.run_sync(run)


@needs_dig
async def test_nodes_serve_the_fogs_names_and_proven_vanity_domains(tmp_path, nursery, monkeypatch):
    monkeypatch.setenv("FORM_CONFIG_DIR", str(tmp_path / "form"))
    auth = Authority(negative_ttl=1)
    auth.set("www.example.test", "A", ["192.0.2.80"])
    upstream = await nursery.start(auth.serve)
    user = User(b"\x61" * 32)
    async with two_nodes(tmp_path, upstream) as (a, b):
        op = await a.request(user, "POST", "/v1/instance/create",
                             {"name": "web", "replicas": 1, "formfile": "NAME web\nEXPOSE 8080\n"})
        iid = op.key
        # b hosts the replica: its VM subnet (its peer record) and the replica's status
        now = int(time.time() * 1000)
        await b.runtime.write("peer", b.address, {"address": b.address, "public_key": "B" * 43 + "=",
                                                  "overlay_ip": "10.42.0.9", "vm_subnet": "10.201.1.0/24",
                                                  "updated_at": now})
        await b.runtime.write("instance_status", f"{iid}@{b.address}", {
            "instance_id": iid, "node": b.address, "state": "running", "ip": "10.201.1.5", "updated_at": now})
        ol = owner_label(user.address)
        replica = f"{owner_label(b.address)}.{iid}.fog"

        async def answered(node):
            return (await dig(node.dns, f"{iid}.fog", "+short")).split() == ["10.201.1.5"]

        await eventually("a answering for b's replica", lambda: answered(a))  # a does not host it
        await eventually("b answering for its replica", lambda: answered(b))
        for node in (a, b):
            assert (await dig(node.dns, f"web.{ol}.fog", "+short")).split() == ["10.201.1.5"]
            assert (await dig(node.dns, f"WEB.0X{user.address[2:].upper()}.fog", "+short")).split() == ["10.201.1.5"]
            assert (await dig(node.dns, replica, "+short")).split() == ["10.201.1.5"]
            srv = (await dig(node.dns, f"_8080._tcp.web.{ol}.fog", "SRV", "+short")).split()
            assert srv == ["0", "1", "8080", replica + "."]
            nx = await dig(node.dns, f"nothing.{ol}.fog")
            assert "status: NXDOMAIN" in nx and "flags: qr aa rd" in nx
            nodata = await dig(node.dns, f"{iid}.fog", "TXT")
            assert "status: NOERROR" in nodata and "ANSWER: 0" in nodata and "AUTHORITY: 1" in nodata
            assert (await dig(node.dns, "www.example.test", "+short")).split() == ["192.0.2.80"]  # forwarded

        # a vanity domain: recorded, but not served until its own DNS names the owner
        await a.request(user, "POST", "/v1/dns/create", {"domain": "app.example.test", "record_type": "A",
                                                         "targets": [iid], "ttl": 120})
        async def both_checked():  # each node checks for itself, through its upstream
            return auth.asked.count(("_formation.app.example.test.", "TXT")) >= 2

        await eventually("both nodes checking the domain", both_checked)
        r = await ask(b.dns, "app.example.test")
        assert r.rcode() == dns.rcode.NXDOMAIN and not r.flags & dns.flags.AA  # the internet's answer
        rc, report = await form_dns_verify(a, "app.example.test", user.address)
        assert rc == 1 and not report["proven"] and not report["served"] and len(report["records"]) == 1
        assert report["hint"] == f'add to the DNS of app.example.test: _formation.app.example.test. TXT "{user.address}"'
        auth.set("_formation.app.example.test", "TXT", [f'"{user.address}"'], ttl=2)

        async def served(node):
            r = await ask(node.dns, "app.example.test")
            return r.flags & dns.flags.AA and [x.to_text() for x in r.answer[0]] == ["10.201.1.5"] and r

        for node in (a, b):
            r = await eventually("the verified vanity domain served", lambda n=node: served(n))
            assert r.answer[0].ttl == 120
        out = await dig(a.dns, "app.example.test", "+short")
        assert out.split() == ["10.201.1.5"]
        rc, report = await form_dns_verify(a, "app.example.test", user.address)
        assert rc == 0 and report["proven"] and report["served"] and report["answer"] == ["10.201.1.5"]
        assert report["txt_owners"] == [user.address]
        # the proof goes away: after its TTL the nodes stop serving the domain
        auth.set("_formation.app.example.test", "TXT", [f'"{"0x" + "99" * 20}"'], ttl=1)

        async def dropped():
            r = await ask(a.dns, "app.example.test")
            return r.rcode() == dns.rcode.NXDOMAIN

        await eventually("the vanity domain no longer served", dropped)

        # heartbeats (every second) change nothing a zone is made of: no rebuild; a model does
        view = a.runtime.dns_view
        builds = view.builds
        await trio.sleep(3)
        assert view.builds == builds
        model = (await b.request(user, "POST", "/v1/models", {"name": "m"})).key

        async def model_named():
            return f"id={model}" in await dig(a.dns, f"{model}.model.fog", "TXT", "+short")

        await eventually("the new model's name on the other node", model_named)
        assert view.builds > builds


async def test_a_taken_port_leaves_the_node_running_without_dns(tmp_path, caplog):
    port = free_port()
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as taken:
        await taken.bind(("127.0.0.1", port))
        node = DnsNode(0, tmp_path, [], "", ("127.0.0.1", 9), dns_port=port)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.runtime.run)
            assert node.runtime.admitted  # up, its own fog made
            nursery.cancel_scope.cancel()
    assert any("runs without its DNS server" in r.getMessage() for r in caplog.records)


def test_upstreams_never_include_the_server_itself(monkeypatch):
    from formation.dns.forward import Upstream
    from formation.node import dnsview

    monkeypatch.setattr(dnsview, "system_upstreams", lambda: [Upstream("127.0.0.1", 53), Upstream("192.0.2.1")])
    assert dnsview.upstreams_of((), ("127.0.0.1", 53)) == [Upstream("192.0.2.1")]
    assert dnsview.upstreams_of((), ("127.0.0.1", 5453)) == [Upstream("127.0.0.1", 53), Upstream("192.0.2.1")]
    assert dnsview.upstreams_of(("127.0.0.53:53", "10.0.0.1"), ("0.0.0.0", 53)) == [Upstream("10.0.0.1")]
    assert dnsview.upstreams_of(("127.0.0.53",), ("127.0.0.1", 53)) == [Upstream("127.0.0.53")]  # resolved's stub


def test_vanity_domains_checked_are_bounded_per_owner(monkeypatch):
    from formation.node import dnsview

    monkeypatch.setattr(dnsview, "MAX_VANITY_PER_OWNER", 2)
    a, b = "0x" + "a1" * 20, "0x" + "b2" * 20
    recs = [{"record_id": f"r{i}", "owner": a, "domain": f"d{i}.example", "created_at": i} for i in range(5)]
    recs += [{"record_id": "x", "owner": b, "domain": "Z.example.", "created_at": 0},
             {"record_id": "y", "owner": b, "domain": "in.fog", "created_at": 0},
             {"record_id": "z", "owner": b, "domain": "not a name", "created_at": 0}]
    assert dnsview.vanity_domains(recs) == ["d0.example", "d1.example", "z.example"]
