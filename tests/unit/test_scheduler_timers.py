"""The scheduler's timers on trio's virtual clock: crash back-off, heartbeat expiry, the build
context retry, a failed build's (non-)retry, and cancellation mid-pass.

No VMs (the in-memory backend of tests/fake_vms.py), no network, no real sleeps: a real store on
a temporary SQLite file, and a test that drives the scheduler one pass at a time (`Rig.look`)
every STEP seconds of MockClock time. The scheduler's wall clock (heartbeats, reports) is derived
from the virtual clock, so placement's heartbeat expiry follows it too. The test task is the only
one with a deadline, so the store's worker threads never make the autojump clock skip ahead (the
cancellation tests, which run `Scheduler.run` itself, assert nothing about times).
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest
import trio

from formation.crdt.async_store import AsyncStore
from formation.crdt.keys import PrivateKey, format_address
from formation.crdt.store import Store
from formation.node import planner
from formation.node.config import load_config
from formation.node.events import Changes
from formation.node.placement import score
from formation.node.planner import Replica
from formation.node.scheduler import Scheduler
from formation.vm import network
from tests.fake_vms import FakeBuilds, FakeVmHost
from tests.support import TS, User, current_version

STEP = 0.25  # seconds of virtual time between two passes (a binary fraction: times add up exactly)
BID = "img-" + "ab" * 30  # an image this node holds
CTX_BID = "img-" + "cd" * 30  # an image built from a context that is not here
OWN_BID = "img-" + "ef" * 30  # what this node's build of FORMFILE makes
CONTEXT = b"the build context tar.gz (fake bytes)"
FORMFILE = 'NAME web\nCOPY app /app\nENTRYPOINT ["/app/run"]\n'
CAPACITY = {"vcpus": 8, "memory_mb": 16384, "disk_gb": 100}


def wall_ms() -> int:
    """The wall clock of these tests: the virtual clock, counted from the support module's TS."""
    return TS * 1000 + round(trio.current_time() * 1000)


class Peers:
    """The connected nodes (ports.Peers): blobs by (peer, name); every fetch recorded with its time."""

    def __init__(self, *names: str):
        self.names = list(names)
        self.blobs: dict[tuple[str, str], bytes] = {}
        self.asked: list[tuple[float, str, str]] = []

    def connected(self) -> list[str]:
        return list(self.names)

    async def fetch_blob(self, peer: str, name: str, limit: int) -> bytes | None:
        self.asked.append((trio.current_time(), peer, name))
        return self.blobs.get((peer, name))


class Node:
    """What the scheduler needs of a node (ports.SchedulerNode), over a real store."""

    def __init__(self, root: Path):
        root.mkdir()
        self.key = PrivateKey(b"\x11" * 32)
        self.address = format_address(self.key.address)
        self.config = load_config(None, {"node.data_dir": str(root), "vm.enabled": "false",
                                         "node.heartbeat_seconds": 1})
        self.store = Store(str(root / "state.db"), synchronous="OFF")  # no fsync: a test's file
        self.astore = AsyncStore(self.store)
        self.changes = Changes()
        self.store.on_commit.append(self.changes.on_commit)
        self.p2p = Peers("peer-1", "peer-2")

    fog_id = None  # membership is not what these tests are about: every node record counts

    async def write(self, kind: str, key: str, value):
        return await self.astore.run(self.store.write, self.key, kind, key, value, now_ms=wall_ms())

    async def fog_nodes(self) -> list[dict]:
        return await self.astore.list("node", limit=1_000_000)


class Rig:
    """A node, its fake VM host and builds, its scheduler, and a user owning instances."""

    def __init__(self, tmp_path: Path, builds: FakeBuilds | None = None):
        self.node = Node(tmp_path / "node")
        self.vms = FakeVmHost(tmp_path / "vmhost")
        self.vms.add_image(BID)
        self.builds = builds or FakeBuilds(self.vms)
        self.builds.vms = self.vms
        self.scheduler = Scheduler(self.node, self.vms, self.builds, clock=wall_ms)
        self.scheduler.dir.mkdir()  # as Scheduler.run does before its first pass
        self.user = User(b"\x5a" * 32)
        self.beating = [self.node.key]  # the nodes whose heartbeat goes on, every second
        self.seen: dict[str, list[str]] = {}  # what each node's heartbeat lists as its connections
        self.last_beat: float | None = None
        self.boots: list[float] = []  # when each boot happened (virtual seconds)

    @property
    def backend(self):
        return self.vms.driver

    async def look(self) -> None:
        """One reconcile pass now (the live nodes' heartbeats first, when one is due)."""
        now = trio.current_time()
        if self.last_beat is None or now - self.last_beat >= 1:
            for key in self.beating:
                await self.beat(key)
            self.last_beat = now
        seen = len(self.backend.events)
        await self.scheduler.reconcile()
        self.boots += [now for what, _ in self.backend.events[seen:] if what == "boot"]

    async def run(self, until: float, *, step: float = STEP, after=None) -> None:
        """A pass every `step` seconds from now until `until` (excluded); `await after()` after each."""
        while trio.current_time() < until:
            await self.look()
            if after is not None:
                await after()
            await trio.sleep(step)

    async def beat(self, key: PrivateKey) -> None:
        address = format_address(key.address)
        value = {"address": address, "capacity": CAPACITY, "heartbeat": wall_ms(),
                 "seen": self.seen.get(address, [])}
        await self.node.astore.run(self.node.store.write, key, "node", address, value, now_ms=wall_ms())

    async def request(self, method: str, path: str, body: dict | None = None):
        """The user's signed request, relayed by this node."""
        store, astore = self.node.store, self.node.astore
        base = await astore.run(current_version, store, self.user, method, path, body)
        m, b, s = self.user.request(method, path, body, ts=wall_ms() // 1000, base=base)
        return await astore.run(store.write_request, self.node.key, m, b, s, now_ms=wall_ms())

    async def create(self, **fields) -> str:
        op = await self.request("POST", "/v1/instance/create", {"name": "web", **fields})
        return op.key

    async def status(self, iid: str) -> tuple[str, str] | None:
        """This node's instance_status report of `iid`: (state, reason)."""
        rec = await self.node.astore.get("instance_status", f"{iid}@{self.node.address}")
        return (rec["state"], rec["reason"]) if rec else None


def backing_off(exits: int, wait: int) -> tuple[str, str]:
    return ("failed", f"its VM exited {exits} times in a row soon after booting; "
                      f"booting it again after {wait} s")


def restarted(times: int) -> tuple[str, str]:
    return ("booting", f"restarted after its VM exited ({times} time{'s' * (times != 1)})")


# ---- crash back-off ---------------------------------------------------------------------------


async def test_a_vm_that_keeps_exiting_is_booted_again_after_a_growing_back_off(tmp_path, autojump_clock):
    rig = Rig(tmp_path)
    iid = await rig.create(build_id=BID)
    t0 = trio.current_time()
    reports: list[tuple[float, tuple[str, str] | None]] = []  # (when, its instance_status) on change

    async def record_then_crash() -> None:
        status = await rig.status(iid)
        if not reports or reports[-1][1] != status:
            reports.append((trio.current_time() - t0, status))
        if rig.backend.is_alive(iid) and len(rig.boots) < 5:
            rig.backend.crash(iid)  # right after its boot: the next pass sees it down

    await rig.run(t0 + 15 + STEP, after=record_then_crash)
    # each exit is seen one STEP after its boot, and booted again at once, then after 2, 4, 8 s
    assert rig.boots[0] == t0
    gaps = [b - a for a, b in pairwise(rig.boots)]
    assert gaps == [STEP + wait for wait in (0, 2, 4, 8)]
    # the replica says why it waits, then that it booted again
    assert reports == [
        (0, ("booting", "")),
        (0.25, restarted(1)),
        (0.5, backing_off(2, 2)),
        (2.5, restarted(2)),
        (2.75, backing_off(3, 4)),
        (6.75, restarted(3)),
        (7.0, backing_off(4, 8)),
        (15.0, restarted(4)),
    ]

    # it stays up for STABLE_AFTER, then exits: a new streak, booted again at once ...
    await rig.look()
    assert await rig.status(iid) == ("running", "restarted 4 times after its VM exited")
    await trio.sleep(planner.STABLE_AFTER)
    rig.backend.crash(iid)
    await rig.look()
    assert rig.boots[5:] == [trio.current_time()]
    assert await rig.status(iid) == restarted(5)
    # ... and an exit right after that boot waits 2 s, the first back-off of a streak
    rig.backend.crash(iid)
    await trio.sleep(STEP)
    await rig.look()
    assert await rig.status(iid) == backing_off(2, 2)


# ---- heartbeat expiry ----------------------------------------------------------------------------


def outranking(iid: str, address: str) -> PrivateKey:
    """A node key that rendezvous hashing ranks above `address` for instance `iid`."""
    for i in range(2, 256):
        key = PrivateKey(bytes([i]) * 32)
        if score(iid, format_address(key.address)) > score(iid, address):
            return key
    raise AssertionError("no key outranks this node")


async def test_an_instance_moves_here_once_its_nodes_heartbeat_is_stale(tmp_path, autojump_clock):
    rig = Rig(tmp_path)
    iid = await rig.create(build_id=BID)
    other = outranking(iid, rig.node.address)
    rig.beating.append(other)
    t0 = trio.current_time()

    # both nodes beat for 5 s: the instance is the other node's, nothing boots here
    await rig.run(t0 + 5)
    assert rig.backend.events == [] and await rig.status(iid) is None
    rig.beating.remove(other)
    rec = await rig.node.astore.get("node", format_address(other.address))
    last_beat = t0 + (rec["heartbeat"] - TS * 1000) / 1000
    assert last_beat == t0 + 4

    # its heartbeat is not stale up to stale_ms after its last one (three missed heartbeats) ...
    stale = rig.scheduler.stale_ms / 1000
    assert stale == 3
    await rig.run(last_beat + stale + STEP)
    assert rig.backend.events == []
    # ... and is one STEP later: the next pass boots the instance here
    await rig.look()
    assert rig.boots == [last_beat + stale + STEP]
    assert await rig.status(iid) == ("booting", "")


async def test_a_node_back_from_a_partition_keeps_its_replica_until_the_others_list_it(
        tmp_path, autojump_clock):
    """Back from a partition that outlasted the connections, a node's view holds the others'
    newest records, which do not list it (they lost it): placement counts it out until they beat
    again. Its replica, which ran all along, is not handed to the node that ran one meanwhile
    (placement comes back a heartbeat later: stopped, then booted again, a flap). Counted out for
    longer than a staleness window, the others do not count it either: then it hands over."""
    rig = Rig(tmp_path)
    iid = await rig.create(build_id=BID)
    other = next(PrivateKey(bytes([i]) * 32) for i in range(2, 256)
                 if score(iid, format_address(PrivateKey(bytes([i]) * 32).address)) < score(iid, rig.node.address))
    me, them = rig.node.address, format_address(other.address)
    rig.beating.append(other)
    rig.seen = {me: [them], them: [me]}
    t0 = trio.current_time()
    await rig.run(t0 + 2)
    assert rig.boots == [t0] and rig.backend.is_alive(iid)  # placed here

    # the other node ran it while they were apart, and says so; its newest record lists nobody
    generation = (await rig.node.astore.get("instance", iid))["generation"]
    value = {"instance_id": iid, "node": them, "state": "running", "reason": "", "ip": "10.77.9.2",
             "generation": generation, "updated_at": wall_ms()}
    await rig.node.astore.run(rig.node.store.write, other, "instance_status", f"{iid}@{them}", value,
                              now_ms=wall_ms())
    rig.seen[them] = []
    await rig.run(t0 + 4)  # under a staleness window (3 s): nothing moves ...
    assert rig.backend.is_alive(iid) and ("stop", iid) not in rig.backend.events
    rig.seen[them] = [me]  # ... and the other node lists it again: placement is back here
    await rig.run(t0 + 9)
    assert rig.backend.is_alive(iid) and ("stop", iid) not in rig.backend.events
    assert (await rig.status(iid))[0] in ("booting", "running")

    rig.seen[them] = []  # now it stays counted out, a staleness window and more: handed over
    await rig.run(t0 + 11)
    assert rig.backend.is_alive(iid)
    await rig.run(t0 + 14)
    assert not rig.backend.is_alive(iid)
    assert await rig.status(iid) == ("stopped", f"placed on {them} now, which runs it")


# ---- build context retry -----------------------------------------------------------------------


async def test_a_missing_build_context_is_asked_for_again_after_context_retry(tmp_path, autojump_clock):
    rig = Rig(tmp_path, FakeBuilds(expected={CTX_BID: CONTEXT}))
    iid = await rig.create(build_id=CTX_BID, formfile=FORMFILE)
    peers = rig.node.p2p
    t0 = trio.current_time()
    retry = planner.CONTEXT_RETRY

    def asked() -> list[float]:
        return [t - t0 for t, _, _ in peers.asked]

    # no image here and no peer has the context: pending, both peers asked once ...
    await rig.run(t0 + retry)
    assert asked() == [0, 0]
    assert {name for _, _, name in peers.asked} == {f"context/{CTX_BID}"}
    assert await rig.status(iid) == (
        "pending", f"image {CTX_BID[:12]} is not on this node and no connected node has its build "
                   "context yet")
    # ... and again CONTEXT_RETRY s later, not before
    await rig.run(t0 + retry + 5)
    assert asked() == [0, 0, retry, retry]

    # a peer got the context meanwhile: the next round of asking gets it, builds and boots
    peers.blobs[("peer-2", f"context/{CTX_BID}")] = CONTEXT
    await rig.run(t0 + 2 * retry)
    assert asked() == [0, 0, retry, retry] and rig.builds.submitted == []
    await rig.look()
    assert asked() == [0, 0, retry, retry, 2 * retry, 2 * retry]
    assert rig.builds.submitted == [(FORMFILE, CONTEXT, rig.user.address)]
    assert rig.boots == [t0 + 2 * retry]
    assert await rig.status(iid) == ("booting", "")


# ---- a failed build ------------------------------------------------------------------------------


class FailingBuilds(FakeBuilds):
    """Builds of FORMFILE into OWN_BID: the first one fails at its RUN line, later ones succeed."""

    def __init__(self):
        super().__init__()
        self.statuses: dict[str, dict] = {}

    def status(self, build_id: str) -> dict | None:
        return self.statuses.get(build_id)

    async def submit(self, formfile: str, context: bytes | None, owner: str) -> dict:
        self.submitted.append((formfile, context, owner))
        if len(self.submitted) == 1:
            status = {"build_id": OWN_BID, "state": "failed",
                      "error": {"line": 2, "message": "RUN failed with exit status 100",
                                "output_tail": ["E: Unable to locate package nope"]}}
        else:
            self.vms.add_image(OWN_BID)
            status = {"build_id": OWN_BID, "state": "done"}
        self.statuses[OWN_BID] = status
        return status


async def test_a_failed_build_is_tried_again_only_after_a_restart(tmp_path, autojump_clock):
    rig = Rig(tmp_path, FailingBuilds())
    iid = await rig.create(formfile=FORMFILE)
    t0 = trio.current_time()

    await rig.run(t0 + 120, step=2.0)  # 60 passes
    assert rig.builds.submitted == [(FORMFILE, None, rig.user.address)]
    assert await rig.status(iid) == (
        "failed", f"build {OWN_BID[:12]} failed at line 2: RUN failed with exit status 100 "
                  "(last output: E: Unable to locate package nope)")
    assert rig.backend.events == []

    # the owner restarts it: a new generation, built again (and this time it boots)
    await rig.request("POST", f"/v1/instance/{iid}/restart")
    await rig.look()
    assert len(rig.builds.submitted) == 2
    assert rig.boots == [trio.current_time()]
    assert rig.scheduler.replicas[iid].generation == 1
    assert await rig.status(iid) == ("booting", "")


# ---- cancellation --------------------------------------------------------------------------------


@pytest.fixture
def no_host_links(monkeypatch):
    """Scheduler.run's orphan-tap sweep finds no link and runs no `ip`."""
    async def list_links(*args, **kwargs) -> list[str]:
        return []

    monkeypatch.setattr(network, "list_links", list_links)


def all_tasks() -> set[trio.lowlevel.Task]:
    tasks, todo = set(), [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        tasks.add(task)
        todo += [t for n in task.child_nurseries for t in n.child_tasks]
    return tasks


@pytest.mark.parametrize("where", ["booting a VM", "writing a report"])
async def test_cancelling_the_scheduler_mid_pass_ends_it_and_leaves_readable_files(
        tmp_path, autojump_clock, no_host_links, where):
    rig = Rig(tmp_path)
    iids = [await rig.create(build_id=BID, name=f"web{i}") for i in range(3)]
    await rig.beat(rig.node.key)
    inside = trio.Event()
    in_flight: list[str] = []  # the keys of the store writes under way

    if where == "booting a VM":
        boot = rig.backend.boot

        async def blocked_boot(vm_id: str) -> float:
            await boot(vm_id)
            inside.set()
            await trio.sleep_forever()

        rig.backend.boot = blocked_boot
    else:
        write = rig.node.store.write

        def write_in_flight(signer, kind, key, value, **kwargs):
            # the test cancels while the store commits this, in AsyncStore's worker thread
            in_flight.append(key)
            trio.from_thread.run_sync(inside.set)
            return write(signer, kind, key, value, **kwargs)

        rig.node.store.write = write_in_flight

    before = all_tasks()
    async with trio.open_nursery() as nursery:  # no fail_after: autojump would fire it at once
        await nursery.start(rig.scheduler.run)
        await inside.wait()
        assert len(all_tasks() - before) == 1  # the scheduler, running its first pass
        nursery.cancel_scope.cancel()
    assert all_tasks() == before

    # every VM it created has its replica file (what a restarted node adopts), each one whole
    files = sorted((rig.node.config.data_dir / "instances").iterdir())
    # (a file may also name a VM whose creation the cancel cut short: booted on the next start)
    assert {f"{vm}.json" for vm in rig.backend.list()} <= {f.name for f in files}
    assert rig.backend.list() and set(rig.backend.list()) <= set(iids)
    for f in files:
        saved = Replica(**json.loads(f.read_text()))
        assert saved.want_running and saved.generation == 0
        assert saved.ip == rig.scheduler.replicas[saved.instance_id].ip
    if where == "writing a report":  # a commit under way when cancelled is finished, not abandoned
        rec = await rig.node.astore.get("instance_status", in_flight[0])
        assert rec["state"] == "booting"


async def beating(rig: Rig) -> None:
    """This node's heartbeat, every second (for tests that run Scheduler.run)."""
    while True:
        await rig.beat(rig.node.key)
        await trio.sleep(1)


async def test_a_report_the_node_stopped_before_writing_is_written_after_its_restart(
        tmp_path, autojump_clock, no_host_links):
    rig = Rig(tmp_path)
    iid = await rig.create(build_id=BID)
    await rig.look()  # boots it and reports "booting"
    assert await rig.status(iid) == ("booting", "")

    # the next pass would report "running": the node stops while that write waits for the store
    reporting = trio.Event()

    async def write_never_done(kind: str, key: str, value):
        reporting.set()
        await trio.sleep_forever()

    rig.node.write = write_never_done
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.look)
        await reporting.wait()
        nursery.cancel_scope.cancel()
    del rig.node.write

    # the node starts again: its new scheduler adopts the VM, which runs all along
    rig.scheduler = Scheduler(rig.node, rig.vms, rig.builds, clock=wall_ms)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(beating, rig)
        await nursery.start(rig.scheduler.run)
        # not one fixed sleep: autojump runs the virtual clock ahead while the store's worker
        # thread works, so a pass may take any virtual time
        for _ in range(1000):
            if await rig.status(iid) == ("running", ""):
                break
            await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert rig.backend.vms[iid].boots == 1 and rig.backend.is_alive(iid)
    assert rig.scheduler.replicas[iid].reported["state"] == "running"
    assert await rig.status(iid) == ("running", "")
