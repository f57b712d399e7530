"""Schedulers of three in-process nodes (real libp2p on 127.0.0.1) over fake VM hosts: every node
computes the same placement from the shared state, so exactly the chosen nodes boot an
instance's replicas and report them, with no coordinator; a delete removes them everywhere."""

from __future__ import annotations

import contextlib
import functools
import time

import trio

from formation.crdt.keys import PrivateKey, format_address
from formation.crdt.store import Store
from formation.node import contexts
from formation.node.config import load_config
from formation.node.placement import live_nodes, place
from formation.node.runtime import open_node
from formation.node.scheduler import Scheduler
from formation.node.vmside import VmsOn
from tests.fake_vms import FakeBuilds, FakeVmHost
from tests.p2p.test_node_runtime import free_port
from tests.support import User, current_version

BID = "img-" + "ab" * 30  # a build id (HASH_ID) whose image every node holds


class FogNode:
    def __init__(self, i: int, root, bootstrap: list[str], invite: str = "", gpus: tuple = ()):
        self.i = i
        data = root / f"n{i}"
        data.mkdir()
        cfg = load_config(None, {"node.data_dir": str(data), "vm.enabled": "false", "mesh.enabled": "false", "dns.enabled": False, "proxy.enabled": False,
                                 "node.heartbeat_seconds": 1, "node.placement_deadline_seconds": 2,
                                 "p2p.listen": f"/ip4/127.0.0.1/tcp/{free_port()}",
                                 "p2p.bootstrap": bootstrap, "fog.invite": invite, "api.host": "127.0.0.1",
                                 "api.port": free_port()})
        self.runtime = open_node(cfg, PrivateKey(bytes([0x40 + i]) * 32), Store(str(data / "state.db")))
        self.vms = FakeVmHost(root / f"vmhost{i}", subnet=f"10.77.{i}.0/24")
        self.vms.add_image(BID)
        self.vms.host_gpus = gpus
        self.builds = FakeBuilds()
        self.scheduler = Scheduler(self.runtime, self.vms, self.builds, secret_key=self.runtime.key.secret)
        self.runtime.vms = VmsOn(self.vms, self.builds, self.scheduler)  # its VMs are the fake's
        self.nursery: trio.Nursery | None = None

    @property
    def address(self) -> str:
        return self.runtime.address

    @property
    def driver(self):
        return self.vms.driver

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            await nursery.start(self.runtime.run)
            task_status.started()

    async def start_scheduler(self) -> None:
        await self.nursery.start(self.scheduler.run)

    def stop(self) -> None:
        self.nursery.cancel_scope.cancel()

    async def call(self, method: str, *args, **kw):
        return await getattr(self.runtime.astore, method)(*args, **kw)

    async def statuses(self, iid: str) -> dict[str, dict]:
        """This node's view of the instance_status records of `iid`, by reporting node."""
        recs = await self.call("list", "instance_status", limit=10_000)
        return {r["node"]: r for r in recs if r["instance_id"] == iid}

    async def request(self, user: User, method: str, path: str, body: dict | None = None):
        base = await self.runtime.astore.run(current_version, self.runtime.store, user, method, path, body)
        m, b, s = user.request(method, path, body, ts=int(time.time()), base=base)
        return await self.runtime.submit_request(m, b, s)


@contextlib.asynccontextmanager
async def open_fog(root, n: int = 3, *, timeout: float = 20.0, gpus: dict[int, tuple] | None = None):
    """n in-process nodes, each bootstrapped from the ones before it, every one knowing all n
    node records; schedulers started once the membership is complete. `gpus`: node index -> the
    GPUs its (fake) VM host has."""
    nodes: list[FogNode] = []
    async with trio.open_nursery() as nursery:
        for i in range(n):
            boot = [a for m in nodes for a in m.runtime.p2p.addrs()]
            # node 0 makes the fog; each other node claims an invite of node 0's
            invite = (await nodes[0].runtime.create_invite(expires_s=600)).encode() if nodes else ""
            node = FogNode(i, root, boot, invite, gpus=(gpus or {}).get(i, ()))
            await nursery.start(node.serve)
            nodes.append(node)
        with trio.fail_after(timeout):
            while True:  # every node knows every node as an admitted member, vouched for as live
                now = int(time.time() * 1000)
                seen = [len(live_nodes(await m.runtime.fog_nodes(), now, 3_000)) for m in nodes]
                if seen == [n] * n:
                    break
                await trio.sleep(0.1)
        for node in nodes:
            await node.start_scheduler()
        try:
            yield nodes
        finally:
            nursery.cancel_scope.cancel()



async def wait_for(what: str, check, timeout: float = 30.0, poll: float = 0.1):
    """Poll the async `check()` until it returns something true; that value. Fails naming `what`."""
    last = None
    with trio.move_on_after(timeout):
        while True:
            last = await check()
            if last:
                return last
            await trio.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


async def create_instance(node: FogNode, user: User, replicas: int, **fields) -> str:
    op = await node.request(user, "POST", "/v1/instance/create",
                            {"name": "web", "build_id": BID, "replicas": replicas, **fields})
    assert op.kind == "instance"
    return op.key


async def placed(node: FogNode, iid: str) -> list[str]:
    inst = await node.call("get", "instance", iid)
    nodes = await node.call("list", "node", limit=10_000)
    return place(inst, nodes, now_ms=int(time.time() * 1000))


def booted_on(fog: list[FogNode], iid: str) -> set[str]:
    return {n.address for n in fog if n.driver.is_alive(iid)}


async def all_report_running(fog: list[FogNode], iid: str, hosts: set[str]) -> bool:
    for n in fog:
        st = await n.statuses(iid)
        if set(st) != hosts or any(r["state"] != "running" for r in st.values()):
            return False
    return True


async def test_replicas_boot_on_the_placed_nodes_and_go_on_delete(tmp_path, no_taps):
    user = User(b"\x5a" * 32)
    start = trio.current_time()
    async with open_fog(tmp_path) as fog:
        t_up = trio.current_time()
        iid = await create_instance(fog[0], user, replicas=2)

        async def settled():
            hosts = booted_on(fog, iid)
            return len(hosts) == 2 and await all_report_running(fog, iid, hosts) and hosts

        hosts = await wait_for("2 replicas booted and reported running everywhere", settled)
        t_running = trio.current_time()

        # the nodes that booted it are the ones rendezvous hashing picks, as every node sees it
        for n in fog:
            assert set(await placed(n, iid)) == hosts
        chosen = [n for n in fog if n.address in hosts]
        (other,) = [n for n in fog if n.address not in hosts]
        for n in chosen:
            assert n.driver.list() == [iid]
            assert n.driver.vms[iid].boots == 1  # booted once, not restarted
            assert set(n.scheduler.replicas) == {iid}
            assert (n.runtime.config.data_dir / "instances" / f"{iid}.json").is_file()
        # the third node never even created it
        assert other.driver.events == [] and other.driver.vms == {}
        assert other.scheduler.replicas == {}
        # every node holds the same reports: from exactly the two hosts, each with its replica's ip
        for n in fog:
            st = await n.statuses(iid)
            assert set(st) == hosts
            for host in chosen:
                rec = st[host.address]
                assert rec["state"] == "running" and rec["ip"] == host.scheduler.local_ip(iid)
                assert rec["ip"].startswith(f"10.77.{host.i}.")
        assert all(n.builds.submitted == [] for n in fog)

        # the owner deletes it (through another node than the one that relayed the create)
        await other.request(user, "POST", f"/v1/instance/{iid}/delete")

        async def gone():
            for n in fog:
                if n.driver.vms or n.scheduler.replicas:
                    return False
                if await n.call("get", "instance", iid) is not None or await n.statuses(iid):
                    return False
                for h in hosts:
                    if await n.call("get", "instance_status", f"{iid}@{h}") is not None:
                        return False
            return True

        await wait_for("the replicas and their reports gone from every node", gone)
        t_gone = trio.current_time()
        for n in chosen:
            assert [e for e, _ in n.driver.events] == ["create", "boot", "delete"]
            assert not (n.runtime.config.data_dir / "instances" / f"{iid}.json").exists()
            assert n.driver.spec_of(iid) is None
        assert other.driver.events == []
        assert no_taps == []  # the driver removes a VM's tap with the VM; the host is not touched
    print(f"fog up {t_up - start:.2f} s, replicas running {t_running - t_up:.2f} s after the create, "
          f"gone {t_gone - t_running:.2f} s after the delete")


async def test_a_replica_moves_when_its_node_goes_stale(tmp_path, no_taps):
    stale_ms = 3_000  # the scheduler's default: three missed heartbeats (1 s in this fog)
    user = User(b"\x5b" * 32)
    async with open_fog(tmp_path) as fog:
        iid = await create_instance(fog[0], user, replicas=2)

        async def settled():
            hosts = booted_on(fog, iid)
            return len(hosts) == 2 and await all_report_running(fog, iid, hosts) and hosts

        hosts = await wait_for("2 replicas running", settled)
        (spare,) = [n for n in fog if n.address not in hosts]
        dead = next(n for n in fog if n.address in hosts)
        (survivor,) = [n for n in fog if n.address in hosts and n is not dead]
        t_stop = trio.current_time()
        dead.stop()

        async def moved():
            if not spare.driver.is_alive(iid):
                return False
            for n in (spare, survivor):
                st = await n.statuses(iid)
                if any(st.get(h.address, {}).get("state") != "running" for h in (spare, survivor)):
                    return False
            return True

        await wait_for("the replica moved to the spare node", moved, timeout=stale_ms / 1000 + 20)
        t_moved = trio.current_time()
        assert survivor.driver.vms[iid].boots == 1  # the surviving replica was left alone
        for n in (spare, survivor):
            nodes = await n.call("list", "node", limit=100)
            inst = await n.call("get", "instance", iid)
            assert set(place(inst, nodes, now_ms=int(time.time() * 1000), stale_ms=stale_ms)) == \
                {spare.address, survivor.address}
    print(f"replica moved {t_moved - t_stop:.2f} s after its node stopped (stale after {stale_ms} ms)")


async def test_a_replica_placed_on_a_newcomer_is_handed_over_make_before_break(tmp_path, no_taps):
    """A node joins and placement gives it a running replica: the old host keeps it running until
    the newcomer reports it running, then stops it and keeps its disk (the grace period)."""
    user = User(b"\x5c" * 32)
    async with open_fog(tmp_path, n=2) as fog:
        newcomer_key = PrivateKey(bytes([0x40 + 2]) * 32)  # FogNode(2)'s key
        newcomer = {**(await fog[0].call("get", "node", fog[0].address)),
                    "address": format_address(newcomer_key.address)}
        for k in range(30):  # an instance that rendezvous hashing moves to the newcomer
            iid = await create_instance(fog[0], user, replicas=1, name=f"web-{k}")
            inst = await fog[0].call("get", "instance", iid)
            nodes = await fog[0].call("list", "node", limit=100)
            now = int(time.time() * 1000)
            # once it has joined, the others list it among the nodes they are connected to
            vouched = [{**n, "seen": [*n.get("seen", []), newcomer["address"]]} for n in nodes]
            if place(inst, [*vouched, {**newcomer, "heartbeat": now}], now_ms=now) == [newcomer["address"]]:
                break
        else:
            raise AssertionError("no instance of 30 would move to the newcomer")

        async def running_on_old():
            return [n for n in fog if n.driver.is_alive(iid) and
                    (await n.statuses(iid)).get(n.address, {}).get("state") == "running"]

        (old,) = await wait_for("the instance running on its first host", running_on_old)
        boot = [a for m in fog for a in m.runtime.p2p.addrs()]
        invite = (await fog[0].runtime.create_invite(expires_s=600)).encode()
        new = FogNode(2, tmp_path, boot, invite)
        await fog[0].nursery.start(new.serve)
        await new.start_scheduler()

        async def handed_over():
            st = await old.statuses(iid)
            return (st.get(new.address, {}).get("state") == "running"
                    and st.get(old.address, {}).get("state") == "stopped")

        await wait_for("the newcomer running it and the old host stopped", handed_over)
        # the old replica was stopped only after the newcomer's ran, and its VM (disk) is kept
        assert ("stop", iid) in old.driver.events and ("delete", iid) not in old.driver.events
        assert old.driver.spec_of(iid) is not None and not old.driver.is_alive(iid)
        assert new.driver.is_alive(iid)
        new.stop()


CTX_BID = "img-" + "cd" * 30
CONTEXT = b"the build context tar.gz (fake bytes)"
CTX_FORMFILE = "NAME web\nCOPY app /app\nENTRYPOINT [\"/app/run\"]\n"


async def test_placed_nodes_fetch_the_build_context_from_the_node_it_was_uploaded_to(tmp_path, no_taps):
    """Only node 0 holds the context of CTX_BID (uploaded there) and no node has its image: every
    node placed for the instance fetches the context over /formation/blob/1 and builds it."""
    user = User(b"\x5c" * 32)
    async with open_fog(tmp_path) as fog:
        for n in fog:
            n.builds.vms, n.builds.expected = n.vms, {CTX_BID: CONTEXT}
            # as the node does with its BuildService (runtime._run_vms)
            n.runtime.p2p.blob_provider = contexts.provider(n.runtime, n.builds.context_bytes)
        fog[0].builds.contexts[CTX_BID] = CONTEXT
        iid = await create_instance(fog[1], user, replicas=3, build_id=CTX_BID, formfile=CTX_FORMFILE)

        async def all_running():
            hosts = booted_on(fog, iid)
            return len(hosts) == 3 and await all_report_running(fog, iid, hosts)

        await wait_for("3 replicas built from the fetched context and running", all_running)
        for n in fog:
            assert n.builds.submitted == [(CTX_FORMFILE, CONTEXT, user.address)], n.i
        # a name nobody serves, and a peer that serves nothing: None, no error
        peer0 = fog[0].runtime.peer_id
        assert await fog[1].runtime.p2p.fetch_blob(peer0, "context/" + "ee" * 32, 1 << 20) is None
        fog[2].runtime.p2p.blob_provider = None
        assert await fog[1].runtime.p2p.fetch_blob(fog[2].runtime.peer_id, f"context/{CTX_BID}", 1 << 20) is None
        # over the fetcher's limit: refused
        assert await fog[1].runtime.p2p.fetch_blob(peer0, f"context/{CTX_BID}", 8) is None


WEB_FORMFILE = "NAME web\nEXPOSE 8080\nENTRYPOINT [\"/app/run\"]\n"


async def test_an_unhealthy_replica_drops_out_of_the_names_and_comes_back(tmp_path, no_taps):
    """Each node probes its own running replicas (the fake VMs have no network: the probe is
    injected); two failed probes write `unhealthy` into its status, and the zone leaves the
    replica out; one success brings it back."""
    from formation.dns.names import build_zone, counts, replica_name

    down: set[tuple[str, int]] = set()

    async def probe(ip: str, port: int) -> bool:
        return (ip, port) not in down

    paths: set[str] = set()

    async def http_probe(ip: str, port: int, path: str) -> bool:
        paths.add(path)
        return await probe(ip, port)

    async with open_fog(tmp_path, 2) as fog:
        for n in fog:
            n.scheduler.reach = probe
            n.scheduler.http_reach = http_probe
            n.scheduler.health_interval = 0.2
        user = User(b"\x5e" * 32)
        # an agent of the build names the path its replicas are probed at
        op = await fog[0].request(user, "POST", "/v1/agents", {"name": "bot", "build_id": BID, "port": 8080,
                                                                "path": "/healthz"})
        assert op.kind == "agent"
        iid = await create_instance(fog[0], user, replicas=2, formfile=WEB_FORMFILE)
        hosts = {n.address for n in fog}
        serving = {n.address: str(n.vms.subnet) for n in fog}

        async def zone():
            statuses = list((await fog[0].statuses(iid)).values())
            inst = await fog[0].call("get", "instance", iid)
            return build_zone(instances=[inst], statuses=statuses, serving=serving, ports={iid: [8080]}), statuses

        async def healthy_everywhere():
            z, st = await zone()
            return (len(st) == 2 and all(s["state"] == "running" and s["health"] == "healthy" for s in st)
                    and len(z.names[f"{iid}.fog"].a) == 2)

        await wait_for("both replicas running and healthy", healthy_everywhere)
        sick = fog[1]
        ip = sick.scheduler.local_ip(iid)
        down.add((ip, 8080))

        async def dropped():
            z, st = await zone()
            mine = [s for s in st if s["node"] == sick.address]
            return (mine and mine[0]["health"] == "unhealthy" and mine[0]["checked_at"] > 0
                    and not counts(mine[0]) and ip not in z.names[f"{iid}.fog"].a
                    and replica_name(sick.address, iid) not in z.names
                    and len(z.names[f"{iid}.fog"].a) == 1)

        await wait_for("the unhealthy replica out of the zone", dropped)
        assert sick.driver.is_alive(iid)  # still running: health is not a restart
        down.clear()
        await wait_for("the replica back in the zone", healthy_everywhere)
        assert hosts == {s["node"] for s in (await zone())[1]}
        assert paths == {"/healthz"}


async def test_the_http_probe_wants_a_status_below_500():
    from formation.node.scheduler import _http_answers

    async def serve(status: bytes, stream):
        await stream.receive_some(4096)
        if status:
            await stream.send_all(b"HTTP/1.1 " + status + b" X\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        ports = {}
        for status in (b"200", b"404", b"503", b""):
            listeners = await nursery.start(functools.partial(trio.serve_tcp, functools.partial(serve, status), 0,
                                                              host="127.0.0.1"))
            ports[status] = listeners[0].socket.getsockname()[1]
        assert await _http_answers("127.0.0.1", ports[b"200"], "/")
        assert await _http_answers("127.0.0.1", ports[b"404"], "/x")  # up, just no such page
        assert not await _http_answers("127.0.0.1", ports[b"503"], "/")
        assert not await _http_answers("127.0.0.1", ports[b""], "/")  # closed without a word
        assert not await _http_answers("127.0.0.1", free_port(), "/")  # nobody listens
        nursery.cancel_scope.cancel()


async def test_a_gpu_instance_runs_where_the_gpu_is_with_it_and_a_second_one_is_told_why_not(tmp_path, no_taps):
    from formation.node.api.records import _placement
    from formation.vm.gpus import Gpu
    h100 = Gpu("0000:41:00.0", "10de", "2330", "NVIDIA Corporation", "GH100 [H100 SXM5 80GB]", "12", "vfio-pci")
    async with open_fog(tmp_path, 2, gpus={1: (h100,)}) as fog:
        user = User(b"\x6a" * 32)
        gpu = {"vcpus": 1, "memory_mb": 512, "disk_gb": 5, "gpu": {"count": 1, "model": "H100"}}
        first = await create_instance(fog[0], user, replicas=1, resources=gpu)

        async def running_on_the_gpu_node():
            st = await fog[0].statuses(first)
            return st.get(fog[1].address, {}).get("state") == "running" and len(st) == 1

        await wait_for("the GPU instance running on the node with the GPU", running_on_the_gpu_node)
        spec = fog[1].vms.driver.spec_of(first)
        assert spec.gpus == ("0000:41:00.0",) and spec.machine == "q35"
        await trio.sleep(1.1)  # created a second later (placement goes by signed second, then id)
        second = await create_instance(fog[0], user, replicas=1, resources=gpu)

        class Call:  # what _placement reads of an API call
            runtime = fog[0].runtime

        inst = await fog[0].call("get", "instance", second)
        problem = (await _placement(Call, inst))["problem"]
        assert "0 of 1 replicas placed" in problem and "GPUs" in problem, problem
        await trio.sleep(1.5)  # a few scheduler passes: nobody runs it
        assert await fog[0].statuses(second) == {} and await fog[1].statuses(second) == {}
        assert fog[0].address not in (await fog[0].statuses(first))
