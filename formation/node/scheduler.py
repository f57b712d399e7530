"""The reconcile loop: make this node's VMs match the shared state, and say so.

Desired: every instance whose placement (rendezvous hashing over live nodes, placement.py)
names this node, with its desired_state and generation. Each pass, for each such instance, the
scheduler gathers what it observes (is the VM alive, where its image stands, what the guest's
console says, does its port answer), asks the planner (planner.py, no IO) what to do, saves the
replica's memory and carries the actions out: report a state, stop, boot, pause, resume, find a
build context, start a build. A paused instance's VMs keep their memory with their vCPUs stopped
(QMP stop/cont); a node holding none of its VMs has nothing to pause and reports it stopped. A
replica placed elsewhere now is made-before-broken (planner.retire): it keeps running until a
node placed for it reports it running, is then stopped, and its VM, tap and overlay are deleted
after a grace period (at once when the instance was deleted). After a node restart the VMs on
the backend are adopted (QEMU runs daemonized, so they outlive the node). Every change of a
replica's state is a signed instance_status op of this node.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import trio

from formation import guest
from formation.crdt.kinds.owned import LEVELS, level_of
from formation.files import write_atomic
from formation.pack.builder import find_image
from formation.pack.formfile import exposed_ports
from formation.vm import network
from formation.vm.spec import VmError

from . import fogview, planner
from .builds import BuildRefused
from .fogview import FogView
from .placement import Doubts, live_nodes, stale_after_ms, unvouched
from .planner import Action, Desired, Images, Observed, Replica
from .ports import BuildsPort, SchedulerNode, VmHostPort
from .secrets import Keeper, SecretsUnavailable
from .vmhost import VmUnavailable

log = logging.getLogger("formation.scheduler")
PASS_INTERVAL = 2.0
MIN_PASS_GAP = 0.3
STOP_TIMEOUT = 20.0
CONSOLE_TAIL = 64 * 1024
LOOKS_PER_PASS = 4  # plans per instance per pass: a found context or a started build is seen at once
PROBES_AT_ONCE = 16  # health probes of this node's replicas running together
PROBE_TIMEOUT = 2.0  # seconds a health probe may take (connect, and an HTTP answer's status line)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Scheduler:
    def __init__(self, node: SchedulerNode, vms: VmHostPort, builds: BuildsPort, *,
                 stale_ms: int | None = None, clock: Callable[[], int] = wall_ms,
                 secret_key: bytes | None = None, rent: Callable[[dict], Awaitable[str]] | None = None):
        self.node = node
        # opens the instances' secrets sealed to this node (none: instances with secrets fail here)
        self.secrets = Keeper(node, secret_key) if secret_key is not None else None
        # the rent of an instance bound to a priced model: "" when its replica may run (charging.py)
        self.rent = rent
        self.stale_ms = stale_ms or stale_after_ms(node.config.node.heartbeat_seconds)
        self.vms = vms
        self.builds = builds
        self.backend = vms.driver
        self.wall_ms = clock  # heartbeats and reports are dated by it; timers use trio's clock
        self.reach = _answers  # (ip, port) -> does it take a TCP connection
        self.http_reach = _http_answers  # (ip, port, path) -> does a GET answer with a status < 500
        self.health_interval = float(node.config.node.health_interval_seconds)
        self._probed_at = -float("inf")  # trio's clock: the last round of health probes
        self.dir = node.config.data_dir / "instances"
        self.replicas: dict[str, Replica] = {}
        self._saved: dict[str, str] = {}  # what is on disk, by instance
        # replicas placed on other nodes that do not run there in time (placement.Doubts)
        self.doubts = Doubts(deadline=float(node.config.node.placement_deadline_seconds))
        # (instance, node) said running there, but its replica did not answer from here
        self._unverified: set[tuple[str, str]] = set()
        # since when (trio's clock) this node beats but no other member lists it (placement.unvouched)
        self._unvouched_since: float | None = None

    # ---- the loop ----------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._load()
        await self._remove_orphan_taps()
        changes = self.node.changes  # the node's one commit notification (API /events, watch)
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
        view = await fogview.read(self.node, now_ms=self.wall_ms(), stale_ms=self.stale_ms)
        instances, nodes, me = view.instances, view.nodes, self.node.address
        placements = view.placements()
        await self._watch(view, placements)
        desired = {i["instance_id"]: i for i in instances if me in placements[i["instance_id"]]}
        # Each instance on its own: whatever one instance's step raises (a request no VM can be
        # made of, an address the subnet lacks, a bug) fails that instance, with the reason in its
        # status, and never the pass: the others are stepped and handed over all the same.
        for inst in desired.values():
            try:
                await self._step(inst)
            except Exception as exc:  # noqa: BLE001 - see above
                await self._failed(inst, exc)
        await self._reseal(desired, placements)
        try:
            await self._probe(desired)
        except Exception:  # noqa: BLE001 - a failed round of probes must not end the pass
            log.exception("health probes failed")
        gone = {v for v in self.backend.list() if not v.startswith("build-")} | set(self.replicas)
        by_id = {i["instance_id"]: i for i in instances}
        live = {n["address"] for n in live_nodes(nodes, self.wall_ms(), self.stale_ms)} - {me}
        unheard = self._unheard(nodes)
        for iid in sorted(gone - set(desired)):
            try:
                await self._hand_over(iid, by_id.get(iid), [a for a in placements.get(iid, []) if a in live],
                                      unheard=unheard)
            except (VmError, network.NetworkError, OSError) as exc:
                log.warning("instance %s: handing it over failed (next pass tries again): %s", iid, exc)
            except Exception:  # noqa: BLE001 - one replica's hand-over must not stop the others'
                log.exception("instance %s: handing it over failed (next pass tries again)", iid)

    async def _failed(self, inst: dict, exc: Exception) -> None:
        """Report the instance failed, with why; logged once per reason (every pass repeats it)."""
        iid = inst["instance_id"]
        expected = isinstance(exc, VmError | VmUnavailable | BuildRefused | SecretsUnavailable | OSError)
        reason = _failure(exc) if expected else f"the node could not run it: {type(exc).__name__}: {exc}"[:2000]
        rep = self.replicas.get(iid)
        if rep is None:  # failed before it had a replica (an address): remembered without one
            rep = self.replicas[iid] = Replica(iid, "", inst.get("generation", 0))
        rep, actions = planner.after_failure(rep, reason)
        if actions:
            if expected:
                log.warning("instance %s: %s", iid, exc)
            else:
                log.error("instance %s failed", iid, exc_info=exc)
        try:
            await self._carry_out(inst, rep, actions)
        except Exception:  # noqa: BLE001 - not even its report: the next pass tries again
            log.exception("instance %s: reporting its failure failed", iid)

    async def _watch(self, view: FogView, placements: dict[str, list[str]]) -> None:
        """Note the replicas placed on other nodes that do not run there in time; the node
        record carries the doubts (placement.Doubts), published at once when they change."""
        generation = {i["instance_id"]: i.get("generation", 0) for i in view.instances}
        running = {(s["instance_id"], s["node"]) for s in view.statuses if s["state"] == "running"
                   and s.get("generation", 0) == generation.get(s["instance_id"])} - self._unverified
        expected = {(i["instance_id"], n): i.get("generation", 0) for i in view.instances
                    if i.get("desired_state") == "running"  # stopped and paused ones run nowhere
                    for n in placements.get(i["instance_id"], []) if n != self.node.address}
        if self.doubts.observe(trio.current_time(), expected, running, set(generation)):
            log.info("doubts now: %s", self.doubts.published() or "none")
            await self.node.register()

    def _unheard(self, nodes: list[dict]) -> bool:
        """Does this node beat, listed by no other member, for less than a staleness window? Right
        after a partition that outlasted its connections, its view has the others' newest records,
        which say they lost it, until they beat again: it counts itself out for a heartbeat or so.
        Longer than a staleness window, the others do not count it either: that is evidence."""
        now = trio.current_time()
        if not unvouched(nodes, self.node.address, self.wall_ms(), self.stale_ms):
            self._unvouched_since = None
            return False
        if self._unvouched_since is None:
            self._unvouched_since = now
            log.info("no other member lists this node among its connections (yet): its replicas "
                     "stay where they are until they do, or for %.0f s", self.stale_ms / 1000)
        return now - self._unvouched_since < self.stale_ms / 1000

    async def _hand_over(self, iid: str, inst: dict | None, placed: list[str], *,
                         unheard: bool = False) -> None:
        """Make before break: a replica placed elsewhere now keeps running until a node placed
        for it reports it running (planner.retire)."""
        rep = self.replicas.get(iid)
        if rep is None:  # a VM on disk that no replica memory knows: not ours to keep
            await self._remove(iid)
            return
        taken_by = None
        for node in placed if inst is not None else []:
            status = await self.node.astore.get("instance_status", f"{iid}@{node}")
            if status is None or status["state"] != "running":
                continue
            if await self._runs_there(inst, status):
                self._unverified.discard((iid, node))
                taken_by = node
                break
            self._unverified.add((iid, node))
        seen = planner.Handover(now=trio.current_time(), deleted=inst is None,
                                wanted=inst is not None and inst["desired_state"] != "stopped",
                                alive=self.backend.is_alive(iid), taken_by=taken_by, unheard=unheard)
        rep, actions = planner.retire(rep, seen)
        if any(isinstance(a, planner.Remove) for a in actions):
            await self._remove(iid)
            return
        await self._carry_out(inst or {"instance_id": iid}, rep, actions)

    async def _runs_there(self, inst: dict, status: dict) -> bool:
        """Does the replica another node says it runs answer here? Its address must lie in the
        subnet formnet routes to that node, and an EXPOSEd port must take a connection. A node
        that reaches no other node's VMs (formnet off or down, no port to try) has no way to
        check and takes the report as it is (docs/node.md: make before break)."""
        ports = exposed_ports(inst.get("formfile"))
        if not ports or not self.node.routes_vms():
            return True
        subnet = (await self.node.vm_subnets()).get(status["node"])
        try:
            inside = subnet is not None and ipaddress.ip_address(status.get("ip") or "") in ipaddress.ip_network(subnet)
        except ValueError:
            inside = False
        return inside and await self.reach(status["ip"], ports[0])

    # ---- one instance: observe, plan, act ----------------------------------------------------

    async def _step(self, inst: dict) -> None:
        iid = inst["instance_id"]
        if iid not in self.replicas or not self.replicas[iid].ip:
            # VmUnavailable when the subnet is full: the replica fails and its reason says why
            taken = {r.ip for r in self.replicas.values() if r.ip}
            ip = self.vms.pick_ip(iid, taken)
            old = self.replicas.get(iid)
            self.replicas[iid] = Replica(iid, ip, inst["generation"], reported=old.reported if old else {})
            self._save(self.replicas[iid])
        want = _desired(inst)
        if self.rent is not None and (want.running or want.paused):
            hold = await self.rent(inst)  # paid (or free), else why not: the replica stops until it is
            if hold:
                want = replace(want, hold=hold)
        for _ in range(LOOKS_PER_PASS):
            rep = self.replicas[iid]
            rep, actions = planner.plan(want, rep, await self._observe(want, rep))
            await self._carry_out(inst, rep, actions)
            if not any(isinstance(a, planner.FetchContext | planner.StartBuild | planner.Resume) for a in actions):
                return

    async def _observe(self, want: Desired, rep: Replica) -> Observed:
        iid = rep.instance_id
        alive = self.backend.is_alive(iid)
        paused = False
        if alive and (want.paused or rep.reported.get("state") == planner.State.PAUSED):
            paused = (await self.backend.status(iid)).state == "paused"  # a QMP look, only then
        obs = Observed(now=trio.current_time(), alive=alive, images=self._images(want, rep), paused=paused)
        if paused or not (alive and want.running and rep.generation == want.generation):
            return obs
        size = self.backend.console_size(iid)
        if rep.reported.get("state") == planner.State.RUNNING and size == rep.console_size:
            return obs  # a running replica whose console said nothing new: nothing to read
        rep.console_size = size
        view = guest.read_service(self.backend.console_log(iid, tail_bytes=CONSOLE_TAIL))
        answers = None
        if (want.port is not None and view.started and not view.exited_last
                and rep.reported.get("state") != planner.State.RUNNING):
            answers = await self.reach(rep.ip, want.port)
        return Observed(now=obs.now, alive=alive, images=obs.images, console=view, answers=answers, paused=False)

    # ---- health: probe this node's running replicas, report changes -------------------------

    async def _probe(self, desired: dict[str, dict]) -> None:
        """Every health_interval seconds, probe each running replica of this node (concurrently,
        PROBES_AT_ONCE at a time, each within PROBE_TIMEOUT): a TCP connection to the first
        EXPOSEd port, or an HTTP GET of the path of an agent whose build the instance runs (an
        agent of an owner who may operate it, as /hire asks). A replica with no port is not
        probed ("unknown", which counts). A status op is written only when the health changes
        (planner.next_health: two failures to go unhealthy, one success to come back)."""
        now = trio.current_time()
        if now < self._probed_at + self.health_interval:
            return
        self._probed_at = now
        targets: list[tuple[str, str, int, str | None]] = []
        agents: list[dict] | None = None
        for iid, inst in desired.items():
            rep = self.replicas.get(iid)
            ports = exposed_ports(inst.get("formfile"))
            if (rep is None or not rep.ip or not ports or rep.reported.get("state") != planner.State.RUNNING
                    or not self.backend.is_alive(iid)):
                continue
            port, path = ports[0], None
            if inst.get("build_id"):
                if agents is None:
                    agents = sorted(await self.node.astore.list("agent", limit=1000),
                                    key=lambda a: (a.get("created_at", 0), a.get("agent_id", "")))
                for agent in agents:
                    if (agent.get("build_id") == inst["build_id"] and agent.get("port") in ports
                            and level_of(inst, agent.get("owner", "")) >= LEVELS["operator"]):
                        port, path = agent["port"], agent.get("path") or "/"
                        break
            targets.append((iid, rep.ip, port, path))
        if not targets:
            return
        results: dict[str, bool] = {}
        limiter = trio.CapacityLimiter(PROBES_AT_ONCE)

        async def one(iid: str, ip: str, port: int, path: str | None) -> None:
            async with limiter:
                try:
                    ok = await (self.reach(ip, port) if path is None else self.http_reach(ip, port, path))
                except Exception:  # noqa: BLE001 - a probe that breaks is a failed probe
                    ok = False
            results[iid] = bool(ok)

        async with trio.open_nursery() as nursery:
            for target in targets:
                nursery.start_soon(one, *target)
        for iid, ok in sorted(results.items()):
            rep = self.replicas.get(iid)
            if rep is None or rep.reported.get("state") != planner.State.RUNNING:
                continue  # stopped or removed meanwhile
            health, rep.health_fails = planner.next_health(rep.health, rep.health_fails, ok)
            if health != rep.health:
                rep.health, rep.health_at = health, self.wall_ms()
                log.info("instance %s: %s", iid, health)
                await self._write_status(rep, rep.reported["state"], rep.reported.get("reason", ""))

    def _images(self, want: Desired, rep: Replica) -> Images:
        images_dir = self.vms.images_dir
        if want.build_id:
            found = find_image(images_dir, want.build_id)
            if found:
                return Images(ready=found.path)
        build = _build(self.builds.status(want.build_id)) if want.build_id else None
        own = _build(self.builds.status(rep.build_id)) if rep.build_id else None
        own_image = None
        if own is not None and own.state == "done":
            found = find_image(images_dir, own.build_id)
            own_image = found.path if found else None
        return Images(build=build, own=own, own_image=own_image)

    async def _carry_out(self, inst: dict, rep: Replica, actions: list[Action]) -> None:
        iid = rep.instance_id
        # what was reported is remembered once it is written: a report lost to a failed write
        # or a stop is made again by the next look
        prior = self.replicas.get(iid)
        promised, rep.reported = rep.reported, dict(prior.reported) if prior else {}
        self.replicas[iid] = rep
        self._save(rep)  # before acting: a node killed midway adopts what it started
        for action in actions:
            if isinstance(action, planner.Stop):
                how = await self.backend.stop(iid, STOP_TIMEOUT)
                log.info("instance %s stopped (%s)", iid, how)
            elif isinstance(action, planner.Boot):
                await self._boot(inst, rep, action.image)
            elif isinstance(action, planner.Pause):
                await self.backend.pause(iid)
                log.info("instance %s paused", iid)
            elif isinstance(action, planner.Resume):
                await self.backend.resume(iid)
                log.info("instance %s resumed", iid)
            elif isinstance(action, planner.FetchContext):
                await self._fetch_context(inst, rep)
            elif isinstance(action, planner.StartBuild):
                status = await self.builds.submit(inst["formfile"], action.context, inst["owner"])
                rep.build_id, rep.build_generation = status["build_id"], inst["generation"]
                rep.context_known, rep.context = False, None
            elif isinstance(action, planner.Report):
                await self._report(rep, action)
                rep.reported = promised
        self._save(rep)

    async def _fetch_context(self, inst: dict, rep: Replica) -> None:
        """The build context of the instance's image: None when the Formfile alone makes it, else
        kept here (uploaded here) or fetched from a connected node and checked against the build
        id first. Notes when none had it."""
        bid = inst.get("build_id")
        context: bytes | None = None
        try:
            alone = await self.builds.image_id_of(inst["formfile"], None) if bid else None
        except BuildRefused as exc:
            if exc.failure.instruction != "COPY":
                raise  # the Formfile itself is wrong: no context helps
            alone = None  # its COPY lines read a context
        if bid and alone != bid:
            context = await trio.to_thread.run_sync(self.builds.context_bytes, bid)
            if context is None:
                context = await self._context_from_peers(inst, bid)
                if context is None:
                    rep.context_missing_at = trio.current_time()
                    return
        rep.context_known, rep.context, rep.context_missing_at = True, context, None

    async def _context_from_peers(self, inst: dict, bid: str) -> bytes | None:
        """The context of `bid` from the first connected node that gives one that makes `bid`
        with the instance's Formfile. The peer's answer is bounded by the context limit as it
        streams in (blobs.fetch), and checked here: unpacked within the archive limits and its
        image id computed (no build step runs), so a wrong or hostile answer builds nothing."""
        iid, p2p = inst["instance_id"], self.node.p2p
        limit = self.node.config.vm.context_limit_mb * 1024 * 1024
        for peer in p2p.connected():
            context = await p2p.fetch_blob(peer, f"context/{bid}", limit)
            if context is None:
                continue
            try:
                made = await self.builds.image_id_of(inst["formfile"], context)
            except BuildRefused as exc:
                log.warning("instance %s: the build context %s sent for %s is refused: %s",
                            iid, peer[-8:], bid[:12], exc)
                continue
            if made != bid:
                log.warning("instance %s: the build context %s sent makes image %s with the instance's "
                            "Formfile, not %s: ignored (a wrong context, or this node's builder or "
                            "Debian base recipe differs from the uploader's)", iid, peer[-8:], made[:12], bid[:12])
                continue
            log.info("instance %s: build context of %s fetched from %s and checked", iid, bid[:12], peer[-8:])
            return context
        return None

    async def _boot(self, inst: dict, rep: Replica, image: Path) -> None:
        iid = inst["instance_id"]
        res = inst.get("resources") or {}
        existing = self.backend.spec_of(iid)
        gpus: tuple[str, ...] = ()
        if res.get("gpu"):
            # the GPUs this VM had stay its own; others come from those no other local VM holds
            taken = {a for v in self.backend.list() if v != iid
                     for a in getattr(self.backend.spec_of(v), "gpus", ())}
            kept = tuple(getattr(existing, "gpus", ()))
            fits = len(kept) == res["gpu"].get("count") and not set(kept) & taken
            gpus = kept if fits else self.vms.pick_gpus(res["gpu"], taken)
        spec = self.vms.spec_for(iid, rep.ip, vcpus=res.get("vcpus", 1),
                                 memory_mb=res.get("memory_mb", 512), image=image,
                                 hostname=_hostname(inst.get("name") or iid), disk_gb=res.get("disk_gb", 5),
                                 gpus=gpus, secrets=await self._secrets_disk(inst))
        if existing is not None and existing != spec:
            await self.backend.delete(iid)  # another image or size: start from a fresh overlay
        await self.backend.create(spec)
        await self.backend.boot(iid)
        log.info("instance %s booting at %s", iid, rep.ip)

    async def _secrets_disk(self, inst: dict) -> Path | None:
        """The instance's secrets, opened and written for its VM, anew at every boot (a change of
        secrets bumps the generation: the replica boots again and reads them)."""
        if not inst.get("secrets"):
            if self.secrets is not None:
                self.secrets.forget(inst["instance_id"])
            return None
        if self.secrets is None:
            raise SecretsUnavailable("the instance has secrets and this node was started without a key to open them")
        return await self.secrets.disk_for(inst)

    async def _reseal(self, desired: dict[str, dict], placements: dict[str, list[str]]) -> None:
        """Seal the secrets of the instances this node hosts for the other nodes placed for them
        that have no box yet (a replica that moved, a replica added)."""
        if self.secrets is None:
            return
        for iid, inst in desired.items():
            if not inst.get("secrets"):
                continue
            try:
                await self.secrets.reseal(inst, placements.get(iid, []))
            except Exception:  # noqa: BLE001 - one instance's boxes must not stop the pass
                log.exception("instance %s: re-sealing its secrets failed (next pass tries again)", iid)

    async def _remove(self, iid: str) -> None:
        log.info("instance %s: removing its VM (deleted, or handed over long enough ago)", iid)
        await self.backend.delete(iid)  # the VM, its overlay and its tap
        if self.secrets is not None:
            self.secrets.forget(iid)
        rep = self.replicas.pop(iid, None)
        self._saved.pop(iid, None)
        (self.dir / f"{iid}.json").unlink(missing_ok=True)
        if rep is not None and rep.reported:
            key = f"{iid}@{self.node.address}"
            if await self.node.astore.get("instance_status", key) is not None:
                await self.node.write("instance_status", key, None)

    async def _remove_orphan_taps(self) -> None:
        """Taps on our bridge that no VM on disk owns: left by a node killed while deleting one."""
        owned = {network.tap_name(v) for v in self.backend.list()}
        try:
            ports = await network.list_links(network.TAP_PREFIX, master=self.vms.bridge)
            for tap in ports:
                if tap not in owned:
                    log.info("removing orphan tap %s", tap)
                    await network.delete_link(tap)
        except (network.NetworkError, OSError, ValueError) as exc:
            log.warning("could not check the bridge for orphan taps: %s", exc)

    async def _report(self, rep: Replica, report: planner.Report) -> None:
        state = report.state.value
        if state != planner.State.RUNNING:  # probed again once it runs again
            rep.health, rep.health_fails, rep.health_at = "unknown", 0, 0
        await self._write_status(rep, state, report.reason)
        log.info("instance %s: %s%s", rep.instance_id, state, f" ({report.reason})" if report.reason else "")

    async def _write_status(self, rep: Replica, state: str, reason: str) -> None:
        value = {"instance_id": rep.instance_id, "node": self.node.address, "state": state,
                 "reason": reason, "ip": rep.ip if state in ("booting", "running") else None,
                 "generation": rep.generation, "updated_at": self.wall_ms(),
                 "health": rep.health, "checked_at": rep.health_at}
        await self.node.write("instance_status", f"{rep.instance_id}@{self.node.address}", value)

    # ---- what the API asks ---------------------------------------------------------------------

    def console_log(self, instance_id: str, tail_bytes: int | None = None) -> str | None:
        if instance_id not in self.replicas:
            return None
        try:
            return self.backend.console_log(instance_id, tail_bytes=tail_bytes)
        except (VmError, OSError, ValueError):
            return ""

    async def metrics(self, instance_id: str) -> dict | None:
        """What the host sees of this node's replica: VM state and what its QEMU costs."""
        rep = self.replicas.get(instance_id)
        if rep is None:
            return None
        status = await self.backend.status(instance_id)
        out = {"vm_state": status.state, "ip": rep.ip, "restarts": rep.restarts,
               "cpu_seconds": None, "rss_bytes": None, "uptime_s": None}
        if status.state in ("running", "paused"):
            with contextlib.suppress(VmError):
                m = await self.backend.metrics(instance_id)
                out.update(cpu_seconds=round(m.cpu_seconds, 2), rss_bytes=m.rss_bytes,
                           uptime_s=round(m.uptime_s, 1))
        return out

    def local_ip(self, instance_id: str) -> str | None:
        rep = self.replicas.get(instance_id)
        return rep.ip or None if rep else None  # "": it got no address (its subnet is full)

    # ---- persistence -------------------------------------------------------------------------

    def _load(self) -> None:
        for path in self.dir.glob("*.json"):
            try:
                saved = json.loads(path.read_text())
                rep = Replica(**{k: v for k, v in saved.items() if k in Replica.SAVED})
            except (OSError, ValueError, TypeError):
                log.warning("ignoring unreadable %s", path)
                continue
            self.replicas[rep.instance_id] = rep

    def _save(self, rep: Replica) -> None:
        text = json.dumps(rep.saved())
        if self._saved.get(rep.instance_id) != text:  # most looks change nothing
            write_atomic(self.dir / f"{rep.instance_id}.json", text)
            self._saved[rep.instance_id] = text


def _desired(inst: dict) -> Desired:
    ports = exposed_ports(inst.get("formfile"))
    return Desired(generation=inst["generation"], running=inst["desired_state"] == "running",
                   build_id=inst.get("build_id") or None, has_formfile=bool(inst.get("formfile")),
                   port=ports[0] if ports else None, paused=inst["desired_state"] == "paused")


def _build(status: dict | None) -> planner.Build | None:
    if status is None:
        return None
    step = f" (step {status.get('step')}/{status.get('steps')})" if status.get("steps") else ""
    error = _build_error(status) if status["state"] == "failed" else ""
    return planner.Build(status["build_id"], status["state"], step, error)


def _failure(exc: Exception) -> str:
    if isinstance(exc, BuildRefused):
        return f"cannot build the instance's Formfile: {exc}"
    return str(exc)[:2000]


def _build_error(status: dict) -> str:
    err = status.get("error") or {}
    where = f" at line {err['line']}" if err.get("line") else ""
    tail = err.get("output_tail") or []
    last = f" (last output: {tail[-1][:200]})" if tail else ""
    return f"build {status['build_id'][:12]} failed{where}: {err.get('message', '?')}{last}"


def _hostname(name: str) -> str:
    out = "".join(c if c.isalnum() or c == "-" else "-" for c in name.lower()).strip("-")
    return out[:63] or "instance"


async def _http_answers(ip: str, port: int, path: str) -> bool:
    """Does an HTTP GET of `path` answer with a status below 500 within PROBE_TIMEOUT? Only the
    status line is read."""
    host = f"[{ip}]" if ":" in ip else ip
    request = (f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: formation-health\r\n"
               "Connection: close\r\n\r\n").encode()
    head = b""
    with trio.move_on_after(PROBE_TIMEOUT):
        try:
            stream = await trio.open_tcp_stream(ip, port)
        except OSError:
            return False
        try:
            await stream.send_all(request)
            while b"\r\n" not in head and len(head) < 1024:
                chunk = await stream.receive_some(1024)
                if not chunk:
                    break
                head += chunk
        except (OSError, trio.BrokenResourceError):
            return False
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
    parts = head.split(b"\r\n", 1)[0].split()
    return (len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit()
            and int(parts[1]) < 500)


async def _answers(ip: str, port: int) -> bool:
    with trio.move_on_after(1.0):
        try:
            stream = await trio.open_tcp_stream(ip, port)
        except OSError:
            return False
        await stream.aclose()
        return True
    return False
