"""Usage metering on a real node (libp2p, SQLite, its API) whose scheduler runs on the in-memory VM
backend (tests/fake_vms.py): the meter writes cumulative, non-decreasing `usage` records of the
replica it hosts, from the VM's process figures and its tap's counters, only when something
changed; across node restarts (the VM adopted, the VM rebooted meanwhile, the meter's file lost)
the counters never go backwards and nothing is counted twice. The meter's clock and the tap's
counters are the test's, so every figure is exact."""

from __future__ import annotations

import contextlib
import time

import trio

from formation.crdt.keys import PrivateKey
from formation.crdt.kinds.usage_kinds import COUNTERS
from formation.crdt.store import Store
from formation.node.config import load_config
from formation.node.metering import USAGE_FILE
from formation.node.runtime import open_node
from formation.node.scheduler import Scheduler
from formation.node.vmside import VmsOn
from formation.vm.network import tap_name
from formation.vm.spec import VmMetrics
from tests.fake_vms import FakeBuilds, FakeVmHost
from tests.p2p.test_node_runtime import free_port
from tests.support import User

BID = "img-" + "cd" * 30
KEY = PrivateKey(b"\x61" * 32)
OWNER = User(b"\x62" * 32)


class Clock:
    def __init__(self):
        self.ms = time.time_ns() // 1_000_000

    def __call__(self) -> int:
        return self.ms


@contextlib.asynccontextmanager
async def metered_node(root, host: FakeVmHost, taps: dict, clock: Clock, *, interval: int = 3600,
                       key: PrivateKey = KEY, settings: dict | None = None, rent: bool = False):
    """A node (genesis of its own fog) hosting on `host`; its meter (and its charger) reads `taps`
    and `clock`; with `rent`, its scheduler charges rent (charging.py)."""
    data = root / "node"
    data.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, {"node.data_dir": str(data), "vm.enabled": "false", "mesh.enabled": "false",
                             "dns.enabled": False, "proxy.enabled": False, "node.heartbeat_seconds": 1,
                             "node.usage_interval_seconds": interval,
                             "p2p.listen": f"/ip4/127.0.0.1/tcp/{free_port()}", "api.port": free_port(),
                             **(settings or {})})
    rt = open_node(cfg, key, Store(str(data / "state.db")))
    rt.meter.clock, rt.meter.read_tap = clock, taps.get
    rt.charger.clock = clock
    builds = FakeBuilds()
    scheduler = Scheduler(rt, host, builds, rent=rt.charger.rent_due if rent else None)
    rt.vms = VmsOn(host, builds, scheduler)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(rt.run)
            await nursery.start(scheduler.run)
            try:
                yield rt
            finally:
                nursery.cancel_scope.cancel()
    finally:
        rt.store.close()


async def until(what: str, check, timeout: float = 20.0):
    with trio.move_on_after(timeout):
        while True:
            got = await check()
            if got:
                return got
            await trio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def alive(host: FakeVmHost, iid: str):
    async def check() -> bool:
        return host.driver.is_alive(iid)

    return check


async def create(rt, **fields) -> str:
    m, b, s = OWNER.request("POST", "/v1/instance/create", {"name": "web", "build_id": BID, "replicas": 1, **fields},
                            ts=int(time.time()))
    return (await rt.submit_request(m, b, s)).key


async def usage(rt, iid: str) -> dict | None:
    return await rt.astore.get("usage", f"{iid}@{rt.address}")


def counters(rec: dict) -> dict:
    return {c: rec[c] for c in COUNTERS}


def not_below(later: dict, earlier: dict) -> bool:
    return all(later[c] >= earlier[c] for c in COUNTERS)


async def test_the_meter_writes_cumulative_records_that_never_go_back_across_restarts(tmp_path, no_taps):
    host = FakeVmHost(tmp_path / "vmhost")
    host.add_image(BID)
    taps: dict = {}
    clock = Clock()
    t0 = clock.ms
    history: list[dict] = []

    def vm(cpu: float, up: float) -> None:
        host.driver.metered[iid] = VmMetrics(cpu_seconds=cpu, rss_bytes=300 << 20, uptime_s=up)

    async with metered_node(tmp_path, host, taps, clock) as rt:
        iid = await create(rt, resources={"vcpus": 1, "memory_mb": 1024, "disk_gb": 8})
        tap = tap_name(iid)
        await until("the replica booted", alive(host, iid))
        # nothing measured yet (booted, no figures, no traffic): no record
        taps[tap] = (0, 0)
        clock.ms = t0
        vm(0.0, 0.0)
        assert await rt.meter.tick() == [] and await usage(rt, iid) is None

        # first look: 10 s of a new process, 2.5 s of CPU, 300 bytes out of the VM and 700 in
        clock.ms, taps[tap] = t0 + 10_000, (300, 700)
        vm(2.5, 10.0)
        [written] = await rt.meter.tick()
        rec = await usage(rt, iid)
        assert counters(rec) == {"cpu_seconds": 2, "memory_mb_seconds": 1024 * 10, "disk_gb_seconds": 8 * 10,
                                 "net_rx_bytes": 700, "net_tx_bytes": 300, "hires": 0, "hire_ms": 0,
                                 "tokens_in": 0, "tokens_out": 0}
        assert rec["owner"] == OWNER.address and rec["node"] == rt.address and rec["instance_id"] == iid
        assert rec["started_at"] <= rec["updated_at"] == t0 + 10_000 and written["updated_at"] == rec["updated_at"]
        history.append(rec)

        # the same process 10 s later: the differences are added (the CPU's half second carried)
        clock.ms, taps[tap] = t0 + 20_000, (500, 900)
        vm(4.0, 20.0)
        await rt.meter.tick()
        rec = await usage(rt, iid)
        assert (rec["cpu_seconds"], rec["memory_mb_seconds"], rec["disk_gb_seconds"]) == (4, 1024 * 20, 8 * 20)
        assert (rec["net_rx_bytes"], rec["net_tx_bytes"]) == (900, 500)
        history.append(rec)

        # nothing changed: nothing written
        assert await rt.meter.tick() == []
        # calls the hire proxy sent to it are flushed into the same record
        rt.hires.record(iid, 120, (12, 40))
        rt.hires.record(iid, 80, None)
        await rt.meter.tick()
        rec = await usage(rt, iid)
        assert (rec["hires"], rec["hire_ms"], rec["tokens_in"], rec["tokens_out"]) == (2, 200, 12, 40)
        assert rec["cpu_seconds"] == 4
        history.append(rec)

    # a restart of the node: the VM ran on (adopted) and is counted by difference, not again
    async with metered_node(tmp_path, host, taps, clock) as rt:
        assert counters(await usage(rt, iid)) == counters(history[-1])
        clock.ms, taps[tap] = t0 + 30_000, (600, 1000)
        vm(5.0, 30.0)
        await rt.meter.tick()
        rec = await usage(rt, iid)
        assert (rec["cpu_seconds"], rec["memory_mb_seconds"], rec["net_rx_bytes"], rec["net_tx_bytes"]) == \
            (5, 1024 * 30, 1000, 600)
        assert rec["hires"] == 2  # kept
        history.append(rec)

    # the VM died while the node was down and its next boot ran 30 s: all of the new process counts
    host.driver.crash(iid)
    async with metered_node(tmp_path, host, taps, clock) as rt:
        await until("the replica booted again", alive(host, iid))
        clock.ms = t0 + 100_000
        vm(1.0, 30.0)
        await rt.meter.tick()
        rec = await usage(rt, iid)
        assert (rec["cpu_seconds"], rec["memory_mb_seconds"]) == (6, 1024 * 60)
        history.append(rec)

    # the meter's file is lost: the totals go on from the node's own record; the process it has
    # no reading of, older than that record, is counted from now on only (never twice)
    (tmp_path / "node" / USAGE_FILE).unlink()
    async with metered_node(tmp_path, host, taps, clock) as rt:
        clock.ms, taps[tap] = t0 + 130_000, (650, 1100)
        vm(3.0, 60.0)
        assert await rt.meter.tick() == []  # readings taken; nothing counted, nothing written
        assert counters(await usage(rt, iid)) == counters(history[-1])
        clock.ms, taps[tap] = t0 + 140_000, (700, 1300)
        vm(3.5, 70.0)
        await rt.meter.tick()
        rec = await usage(rt, iid)
        assert (rec["cpu_seconds"], rec["memory_mb_seconds"], rec["net_rx_bytes"], rec["net_tx_bytes"]) == \
            (6, 1024 * 70, 1200, 650)  # CPU: 6.0 + 0.5 is still 6 whole seconds
        assert rec["started_at"] == history[0]["started_at"]
        history.append(rec)

    for earlier, later in zip(history, history[1:], strict=False):
        assert not_below(later, earlier), (earlier, later)
        assert later["updated_at"] >= earlier["updated_at"]


async def test_the_metering_task_runs_by_itself(tmp_path, no_taps):
    """With a 1 s interval and the real clock, a running replica's record appears and grows."""
    host = FakeVmHost(tmp_path / "vmhost")
    host.add_image(BID)
    taps: dict = {}
    async with metered_node(tmp_path, host, taps, lambda: time.time_ns() // 1_000_000, interval=1) as rt:
        iid = await create(rt)
        await until("the replica booted", alive(host, iid))
        booted = time.monotonic()

        async def run_vm():  # its process's figures as time goes (a CPU second per second)
            while True:
                up = time.monotonic() - booted
                host.driver.metered[iid] = VmMetrics(cpu_seconds=up, rss_bytes=0, uptime_s=up)
                await trio.sleep(0.1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_vm)
            first = await until("a usage record", lambda: usage(rt, iid), timeout=10)
            assert first["memory_mb_seconds"] >= 0 and first["owner"] == OWNER.address
            later = await until("the record grows", lambda: _grown(rt, iid, first), timeout=10)
            assert later["cpu_seconds"] >= 1 and later["memory_mb_seconds"] >= 512
            assert not_below(later, first) and rt.meter.writes >= 2 and rt.meter.failures == 0
            nursery.cancel_scope.cancel()


async def _grown(rt, iid: str, first: dict) -> dict | None:
    rec = await usage(rt, iid)
    return rec if rec["memory_mb_seconds"] > first["memory_mb_seconds"] and rec["cpu_seconds"] >= 1 else None
