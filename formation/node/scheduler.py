"""The reconcile loop: make this node's QEMU processes match the shared state, and say so.

Desired: every instance whose placement (rendezvous hashing over live nodes, placement.py)
names this node, with its desired_state and generation. Actual: the VMs on disk and whether
their QEMU lives. Each pass, for each instance, one idempotent step towards desired:
build the image if it is missing and can be built here, boot, restart after a crash or a
`restart` (generation bump), stop, delete what is no longer ours. After a node restart the VMs
on disk are adopted (QEMU runs daemonized, so they outlive the node) or, if no longer wanted,
removed with their tap and overlay. Every change of a replica's state is written as a signed
instance_status op of this node (pending, building, booting, running, stopped, failed + reason).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import trio

from formation.files import write_atomic
from formation.pack.builder import find_image
from formation.vm import network
from formation.vm.driver import VmError

from .builds import BuildRefused, BuildService
from .placement import place_all, stale_after_ms
from .vmhost import VmHost, VmUnavailable

log = logging.getLogger("formation.scheduler")
PASS_INTERVAL = 2.0
MIN_PASS_GAP = 0.3
CONTEXT_RETRY = 15.0  # seconds between two rounds of asking peers for a missing build context
STOP_TIMEOUT = 20.0
READY_MARKER = "FORMATION-GUEST entrypoint-start"
NO_ENTRYPOINT_MARKER = "FORMATION-GUEST ready"
BOOT_MARKER = "FORMATION-GUEST-INIT"
EXIT_MARKER = "FORMATION-GUEST entrypoint-exit"
CRASH_LOOP_EXITS = 3
CONSOLE_TAIL = 64 * 1024
TRANSIENT = ("next_fetch", "console_size")  # Replica fields that are not saved


@dataclass
class Replica:
    """What this node remembers of its replica of an instance (kept in instances/<id>.json)."""

    instance_id: str
    ip: str
    generation: int = 0
    want_running: bool = False  # we started it and did not stop it: its death is a crash
    restarts: int = 0
    build_id: str | None = None  # the image this node builds for it (instances without a build_id)
    build_generation: int = 0
    reported: dict = field(default_factory=dict)  # the last instance_status value written
    next_fetch: float = 0.0  # monotonic time before which peers are not asked for a context again
    console_size: int = -1  # the console's size at the last look (unchanged: no need to read it)


class Scheduler:
    def __init__(self, runtime, vms: VmHost, builds: BuildService, *, stale_ms: int | None = None):
        self.runtime = runtime
        self.stale_ms = stale_ms or stale_after_ms(runtime.config.node.heartbeat_seconds)
        self.vms = vms
        self.builds = builds
        self.driver = vms.driver
        self.dir = runtime.config.data_dir / "instances"
        self.replicas: dict[str, Replica] = {}

    # ---- the loop ----------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._load()
        await self._remove_orphan_taps()
        changes = self.runtime.changes  # the node's one commit notification (API /events, watch)
        task_status.started()
        while True:
            seen = changes.last_seq  # a commit during the pass makes the next pass start at once
            try:
                await self.reconcile()
            except Exception:  # noqa: BLE001 - one bad pass must not end scheduling
                log.exception("reconcile pass failed")
            await trio.sleep(MIN_PASS_GAP)  # a burst of commits makes one pass, not many
            with trio.move_on_after(PASS_INTERVAL):
                await changes.wait_past(seen)

    async def reconcile(self) -> None:
        instances = await self.runtime.astore.list("instance", limit=1_000_000)
        nodes = await self.runtime.astore.list("node", limit=1_000_000)
        now = int(time.time() * 1000)
        me = self.runtime.address
        placements = place_all(instances, nodes, now_ms=now, stale_ms=self.stale_ms)
        desired = {i["instance_id"]: i for i in instances if me in placements[i["instance_id"]]}
        for iid, inst in desired.items():
            try:
                await self._step(inst)
            except (VmError, VmUnavailable, OSError) as exc:
                log.warning("instance %s: %s", iid, exc)
                await self._report(iid, "failed", str(exc)[:2000])
        gone = {v for v in self.driver.list() if not v.startswith("build-")} | set(self.replicas)
        for iid in sorted(gone - set(desired)):
            try:
                await self._remove(iid)
            except (VmError, network.NetworkError, OSError) as exc:
                log.warning("instance %s: removing it failed (next pass tries again): %s", iid, exc)

    # ---- one instance ------------------------------------------------------------------------

    async def _step(self, inst: dict) -> None:
        iid = inst["instance_id"]
        rep = self.replicas.get(iid)
        if rep is None:
            taken = {r.ip for r in self.replicas.values()}
            rep = self.replicas[iid] = Replica(iid, self.vms.pick_ip(iid, taken), inst["generation"])
            self._save(rep)
        alive = self.driver.is_alive(iid)

        if inst["desired_state"] == "stopped":
            if alive:
                rep.want_running = False
                self._save(rep)
                how = await self.driver.stop(iid, STOP_TIMEOUT)
                log.info("instance %s stopped (%s)", iid, how)
            await self._report(iid, "stopped", "stopped by its owner")
            return

        image = await self._image(inst, rep)
        if image is None:
            return
        if alive and rep.generation != inst["generation"]:
            log.info("instance %s: restart (generation %d -> %d)", iid, rep.generation, inst["generation"])
            rep.want_running = False
            await self.driver.stop(iid, STOP_TIMEOUT)
            alive = False
        if not alive:
            reason = ""
            if rep.want_running and rep.generation == inst["generation"]:
                rep.restarts += 1
                reason = f"restarted after its VM exited ({rep.restarts} time{'s' * (rep.restarts > 1)})"
                log.warning("instance %s: VM exited; restarting (%d)", iid, rep.restarts)
            await self._boot(inst, rep, image)
            await self._report(iid, "booting", reason)
            return
        await self._check_ready(inst, rep)

    async def _image(self, inst: dict, rep: Replica) -> Path | None:
        """The image to boot, or None after reporting why there is none yet."""
        iid, bid = inst["instance_id"], inst.get("build_id")
        if bid:
            found = find_image(self.vms.images_dir, bid)
            if found:
                return found.path
            status = self.builds.status(bid)
            if status and status["state"] in ("queued", "building"):
                step = f" (step {status.get('step')}/{status.get('steps')})" if status.get("steps") else ""
                await self._report(iid, "building", f"building image {bid[:12]}{step}")
                return None
            if status and status["state"] == "failed":
                await self._report(iid, "failed", _build_error(status))
                return None
        if not inst.get("formfile"):
            await self._report(iid, "pending", f"image {bid[:12] if bid else '?'} is not on this node, "
                               "and the instance has no Formfile to build it from")
            return None
        # Build it here: from the Formfile alone, or with the build context fetched from the node
        # it was uploaded to. A failed build is tried again only after a restart (new generation).
        status = self.builds.status(rep.build_id) if rep.build_id else None
        if status is None or (status["state"] == "failed" and rep.build_generation != inst["generation"]):
            try:
                found_context, context = await self._context_for(inst, rep)
                if not found_context:
                    return None
                status = await self.builds.submit(inst["formfile"], context, inst["owner"])
            except BuildRefused as exc:
                await self._report(iid, "failed", f"cannot build the instance's Formfile: {exc}")
                return None
            rep.build_id, rep.build_generation = status["build_id"], inst["generation"]
            self._save(rep)
        if bid and status["build_id"] != bid:
            await self._report(iid, "failed", f"the instance's Formfile and build context make image "
                               f"{status['build_id'][:12]} here, not {bid[:12]} (another Debian base?)")
            return None
        if status["state"] == "done":
            found = find_image(self.vms.images_dir, status["build_id"])
            if found:
                return found.path
            rep.build_id = None  # the image was removed meanwhile: build again
            return None
        if status["state"] == "failed":
            await self._report(iid, "failed", _build_error(status))
            return None
        await self._report(iid, "building", f"building image {status['build_id'][:12]}")
        return None

    async def _context_for(self, inst: dict, rep: Replica) -> tuple[bool, bytes | None]:
        """(True, context) to build the instance's image here: None when the Formfile alone makes
        it, else the context fetched from a peer. (False, None) after reporting why not yet."""
        iid, bid = inst["instance_id"], inst.get("build_id")
        if bid and time.monotonic() < rep.next_fetch:  # asked around lately, in vain
            return False, None
        if not bid or await self.builds.image_id_of(inst["formfile"], None) == bid:
            return True, None
        # uploaded here (and its build since removed)
        local = await trio.to_thread.run_sync(self.builds.context_bytes, bid)
        if local is not None:
            return True, local
        p2p = self.runtime.p2p
        limit = self.runtime.config.vm.context_limit_mb * 1024 * 1024
        for peer in p2p.connected():
            context = await p2p.fetch_blob(peer, f"context/{bid}", limit)
            if context is not None:
                log.info("instance %s: build context of %s fetched from %s", iid, bid[:12], peer[-8:])
                return True, context
        rep.next_fetch = time.monotonic() + CONTEXT_RETRY
        await self._report(iid, "pending", f"image {bid[:12]} is not on this node and no connected "
                           "node has its build context yet")
        return False, None

    async def _boot(self, inst: dict, rep: Replica, image: Path) -> None:
        iid = inst["instance_id"]
        res = inst.get("resources") or {}
        spec = self.vms.spec_for(iid, rep.ip, vcpus=res.get("vcpus", 1),
                                 memory_mb=res.get("memory_mb", 512), image=image,
                                 hostname=_hostname(inst.get("name") or iid))
        if (self.driver.vm_dir(iid) / "spec.json").exists() and self.driver.spec(iid) != spec:
            await self.driver.delete(iid)  # another image or size: start from a fresh overlay
        await self.driver.create(spec)
        rep.generation = inst["generation"]
        rep.want_running = True
        self._save(rep)
        await self.driver.boot(iid)
        log.info("instance %s booting at %s", iid, rep.ip)

    async def _check_ready(self, inst: dict, rep: Replica) -> None:
        """booting -> running once the entrypoint started and its first EXPOSEd port answers;
        -> failed while the entrypoint keeps exiting (the guest goes on retrying it, so a
        service that recovers turns running again)."""
        iid = inst["instance_id"]
        try:
            size = (self.driver.vm_dir(iid) / "console.log").stat().st_size
        except OSError:
            size = -1
        if rep.reported.get("state") == "running" and size == rep.console_size:
            return  # a running replica whose console said nothing new: nothing to read
        rep.console_size = size
        # only this boot's output counts: each boot starts with the initramfs' marker
        text = self.driver.console_log(iid, tail_bytes=CONSOLE_TAIL).rpartition(BOOT_MARKER)[2]
        if NO_ENTRYPOINT_MARKER in text:
            await self._report(iid, "running", "no entrypoint")
            return
        exits = text.count(EXIT_MARKER)
        if exits >= CRASH_LOOP_EXITS and text.rfind(EXIT_MARKER) > text.rfind(READY_MARKER):
            status = text[text.rfind(EXIT_MARKER):].split("\n", 1)[0].rpartition("rc=")[2].strip()
            tail = [line.strip() for line in text.splitlines()
                    if line.strip() and "FORMATION-GUEST" not in line][-3:]
            await self._report(iid, "failed", f"the entrypoint keeps exiting (status {status}, "
                               f"{exits} times); last output: {' | '.join(tail)[-1500:]}")
            return
        if rep.reported.get("state") == "running" or READY_MARKER not in text:
            return
        ports = _exposed(inst)
        if ports and not await _answers(rep.ip, ports[0]):
            return
        restarts = f"restarted {rep.restarts} time{'s' * (rep.restarts > 1)} after its VM exited"
        await self._report(iid, "running", restarts if rep.restarts else "")

    async def _remove(self, iid: str) -> None:
        log.info("instance %s is not (or no longer) placed here: removing its VM", iid)
        await self.driver.delete(iid)  # the VM, its overlay and its tap
        rep = self.replicas.pop(iid, None)
        (self.dir / f"{iid}.json").unlink(missing_ok=True)
        if rep is not None and rep.reported:
            key = f"{iid}@{self.runtime.address}"
            if await self.runtime.astore.get("instance_status", key) is not None:
                await self.runtime.write("instance_status", key, None)

    async def _remove_orphan_taps(self) -> None:
        """Taps on our bridge that no VM on disk owns: left by a node killed while deleting one."""
        owned = {network.tap_name(v) for v in self.driver.list()}
        try:
            ports = await network.list_links(network.TAP_PREFIX, master=self.vms.bridge)
            for tap in ports:
                if tap not in owned:
                    log.info("removing orphan tap %s", tap)
                    await network.delete_link(tap)
        except (network.NetworkError, OSError, ValueError) as exc:
            log.warning("could not check the bridge for orphan taps: %s", exc)

    # ---- status ops --------------------------------------------------------------------------

    async def _report(self, iid: str, state: str, reason: str) -> None:
        rep = self.replicas.get(iid)
        if rep is None:
            return
        if rep.reported.get("state") == state and rep.reported.get("reason") == reason:
            return
        value = {"instance_id": iid, "node": self.runtime.address, "state": state, "reason": reason,
                 "ip": rep.ip if state in ("booting", "running") else None,
                 "generation": rep.generation, "updated_at": int(time.time() * 1000)}
        await self.runtime.write("instance_status", f"{iid}@{self.runtime.address}", value)
        rep.reported = {"state": state, "reason": reason}
        self._save(rep)
        log.info("instance %s: %s%s", iid, state, f" ({reason})" if reason else "")

    # ---- what the API asks ---------------------------------------------------------------------

    def console_log(self, instance_id: str, tail_bytes: int | None = None) -> str | None:
        if instance_id not in self.replicas:
            return None
        try:
            return self.driver.console_log(instance_id, tail_bytes=tail_bytes)
        except (VmError, OSError, ValueError):
            return ""

    async def metrics(self, instance_id: str) -> dict | None:
        """What the host sees of this node's replica: VM state and what its QEMU costs."""
        rep = self.replicas.get(instance_id)
        if rep is None:
            return None
        status = await self.driver.status(instance_id)
        out = {"vm_state": status.state, "ip": rep.ip, "restarts": rep.restarts,
               "cpu_seconds": None, "rss_bytes": None, "uptime_s": None}
        if status.state in ("running", "paused"):
            with contextlib.suppress(VmError):
                m = await self.driver.metrics(instance_id)
                out.update(cpu_seconds=round(m.cpu_seconds, 2), rss_bytes=m.rss_bytes,
                           uptime_s=round(m.uptime_s, 1))
        return out

    def local_ip(self, instance_id: str) -> str | None:
        rep = self.replicas.get(instance_id)
        return rep.ip if rep else None

    # ---- persistence -------------------------------------------------------------------------

    def _load(self) -> None:
        for path in self.dir.glob("*.json"):
            try:
                rep = Replica(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                log.warning("ignoring unreadable %s", path)
                continue
            self.replicas[rep.instance_id] = rep

    def _save(self, rep: Replica) -> None:
        write_atomic(self.dir / f"{rep.instance_id}.json",
                     json.dumps({k: v for k, v in asdict(rep).items() if k not in TRANSIENT}))


def _build_error(status: dict) -> str:
    err = status.get("error") or {}
    where = f" at line {err['line']}" if err.get("line") else ""
    tail = err.get("output_tail") or []
    last = f" (last output: {tail[-1][:200]})" if tail else ""
    return f"build {status['build_id'][:12]} failed{where}: {err.get('message', '?')}{last}"


def _hostname(name: str) -> str:
    out = "".join(c if c.isalnum() or c == "-" else "-" for c in name.lower()).strip("-")
    return out[:63] or "instance"


def _exposed(inst: dict) -> list[int]:
    from formation.pack.formfile import FormfileError, parse

    try:
        return list(parse(inst["formfile"]).expose) if inst.get("formfile") else []
    except FormfileError:
        return []


async def _answers(ip: str, port: int) -> bool:
    with trio.move_on_after(1.0):
        try:
            stream = await trio.open_tcp_stream(ip, port)
        except OSError:
            return False
        await stream.aclose()
        return True
    return False
