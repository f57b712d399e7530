"""The running node, and the composition root: `open_node` does the construction's IO (probe the
machine for VMs, make the libp2p host) and hands the parts to `NodeRuntime`, whose constructor
only keeps them. `run` owns one trio nursery: p2p, the heartbeat, the control socket, the HTTP
API and the VM side (vmside.py: off, starting, on).

The HTTP API, the control socket and the scheduler are handed the runtime typed by the small
Protocols of ports.py: the part of it each one uses.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import trio

from formation.crdt.async_store import AsyncStore
from formation.crdt.keys import PrivateKey, format_address, to_checksum
from formation.crdt.op import Op
from formation.crdt.store import Store
from formation.p2p.service import P2PService, P2PSettings

from . import capacity
from .config import Config
from .events import Changes
from .vmhost import VmHost, VmUnavailable
from .vmside import VmSide, VmsOff, VmsOn, VmsStarting, runs_vms, vm_status

log = logging.getLogger("formation.node")
VERSION = "0.1.0"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def open_node(config: Config, key: PrivateKey, store: Store) -> NodeRuntime:
    """The node's parts, made: the one place construction does IO."""
    astore = AsyncStore(store)
    p2p = P2PService(key, astore, P2PSettings(
        listen=[config.p2p.listen],
        bootstrap=list(config.p2p.bootstrap),
        sync_interval=float(config.p2p.sync_interval_seconds),
        sync_max_sessions_per_peer=config.p2p.sync_sessions_per_peer,
        sync_max_sessions=config.p2p.sync_sessions,
        sync_budget_bytes=config.p2p.sync_budget_mb * 1024 * 1024,
        sync_budget_seconds=float(config.p2p.sync_budget_seconds),
    ))
    host, reason = VmHost.check(config, format_address(key.address))
    vms: VmSide = VmsStarting(host) if host is not None else VmsOff(reason)
    return NodeRuntime(config, key, store, astore, p2p, vms)


class NodeRuntime:
    def __init__(self, config: Config, key: PrivateKey, store: Store, astore: AsyncStore,
                 p2p: P2PService, vms: VmSide):
        self.config = config
        self.key = key
        self.address = format_address(key.address)
        self.store = store
        self.astore = astore
        self.p2p = p2p
        self.vms = vms
        # the node's one commit notification: the API's /events, the control watch, the scheduler
        self.changes = Changes()
        self.api_urls: list[str] = []
        self.started_at = now_ms()
        self.heartbeat_error: str | None = None

    @property
    def peer_id(self) -> str:
        return self.p2p.peer_id

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from .control import serve_control

        self.store.on_commit.append(self.changes.on_commit)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.p2p.run)
                await self.register()
                nursery.start_soon(self._heartbeat)
                await nursery.start(serve_control, self, self.config.data_dir / "control.sock")
                self.api_urls = await nursery.start(self._serve_api)
                if isinstance(self.vms, VmsStarting):
                    nursery.start_soon(self._run_vms, self.vms.host)
                log.info("node %s up: peer %s, listening on %s", to_checksum(self.key.address),
                         self.peer_id, ", ".join(self.p2p.addrs()))
                task_status.started(self)
        finally:
            self.store.on_commit.remove(self.changes.on_commit)

    async def _serve_api(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from hypercorn.config import Config as HypercornConfig
        from hypercorn.trio import serve

        from .api.app import create_app

        cfg = HypercornConfig()
        host = self.config.api.host
        cfg.bind = [f"[{host}]:{self.config.api.port}" if ":" in host else f"{host}:{self.config.api.port}"]
        cfg.accesslog = None
        cfg.errorlog = logging.getLogger("formation.api")
        await serve(create_app(self), cfg, shutdown_trigger=trio.sleep_forever, task_status=task_status)

    async def _run_vms(self, host: VmHost) -> None:
        from .builds import BuildService
        from .scheduler import Scheduler

        try:
            await host.setup()
        except (VmUnavailable, OSError) as exc:
            self.vms = VmsOff(f"VMs are off: {exc}")
            log.error("%s", self.vms.reason)
            await self.register()
            return
        builds = BuildService(self.config.data_dir, host.builder())
        scheduler = Scheduler(self, host, builds)

        async def provide(name: str) -> bytes | None:
            # build contexts, for nodes placed for an instance whose context was uploaded here
            kind, _, key = name.partition("/")
            return await trio.to_thread.run_sync(builds.context_bytes, key) if kind == "context" else None

        self.p2p.blob_provider = provide
        async with trio.open_nursery() as nursery:
            await nursery.start(builds.run)
            await nursery.start(scheduler.run)
            self.vms = VmsOn(host, builds, scheduler)

    # ---- writes --------------------------------------------------------------------------

    async def write(self, kind: str, key: str, value) -> Op:
        """A fact of this node's own (node, peer, instance_status records)."""
        op = await self.astore.run(self.store.write, self.key, kind, key, value, now_ms=now_ms())
        self.p2p.publish(op.wire)
        return op

    async def submit_request(self, message: str, body: bytes, signature: bytes | str,
                             recovery_id: int | None = None) -> Op:
        """Relay a user's signed request as an op of this node (raises Invalid if refused)."""
        op = await self.astore.run(self.store.write_request, self.key, message, body, signature,
                                   recovery_id=recovery_id, now_ms=now_ms())
        self.p2p.publish(op.wire)
        return op

    async def register(self) -> Op:
        return await self.write("node", self.address, self.node_record())

    def announce_addrs(self) -> list[str]:
        suffix = "/p2p/" + self.peer_id
        if self.config.p2p.announce:
            return [a + suffix for a in self.config.p2p.announce]
        out = []
        for addr in self.p2p.addrs():
            base = addr.split("/p2p/")[0]
            if base.startswith("/ip4/0.0.0.0/"):
                port = base.rsplit("/", 1)[1]
                out += [f"/ip4/{ip}/tcp/{port}{suffix}" for ip in _local_ipv4s()]
            else:
                out.append(base + suffix)
        return list(dict.fromkeys(out))[:16]

    def node_record(self) -> dict:
        return {
            "address": self.address,
            "multiaddrs": self.announce_addrs(),
            "capacity": {**capacity.detect(self.config.data_dir), "vms": runs_vms(self.vms)},
            "version": VERSION,
            "api_url": self.public_api_url(),
            "started_at": self.started_at,
            "heartbeat": now_ms(),
        }

    def public_api_url(self) -> str | None:
        """Where other hosts reach this node's API; None while it listens on loopback only."""
        host, port = self.config.api.host, self.config.api.port
        if host in ("0.0.0.0", "::"):
            reachable = [ip for ip in _local_ipv4s() if not ip.startswith("127.")]
            if not reachable:
                return None
            host = reachable[0]
        elif host == "localhost" or host.startswith("127.") or host == "::1":
            return None
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def health_problems(self, connected: int, pending: int) -> list[str]:
        """What keeps this node from doing its part in the fog (an empty list: healthy)."""
        problems = []
        if self.config.p2p.bootstrap and connected == 0:
            problems.append("connected to no peer (bootstrap peers unreachable?)")
        if self.heartbeat_error:
            problems.append(f"the heartbeat failed: {self.heartbeat_error}")
        limit = self.store.limits.pending_ops
        if pending > limit // 2:
            problems.append(f"{pending} ops wait for their dependencies ({100 * pending // limit}% of the bound)")
        return problems

    async def _heartbeat(self) -> None:
        while True:
            await trio.sleep(self.config.node.heartbeat_seconds)
            try:
                # ops that came dated ahead of our clock (held, not refused) are due by now
                await self.astore.tick(now_ms())
                await self.register()
                self.heartbeat_error = None
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat is logged, not fatal
                self.heartbeat_error = str(exc) or type(exc).__name__
                log.warning("heartbeat failed: %s", exc)

    # ---- reads ---------------------------------------------------------------------------

    async def status(self) -> dict:
        def read(store: Store) -> dict:
            return {"ops": len(store), "heads": [h.hex() for h in store.heads()],
                    "state_hash": store.state_hash().hex(), "pending": store.pending_count,
                    "seq": store.seq}

        state = await self.astore.run(read, self.store)
        return {
            "version": VERSION,
            "address": to_checksum(self.key.address),
            "peer_id": self.peer_id,
            "addrs": self.announce_addrs(),
            "connected": self.p2p.connected(),
            **state,
            "p2p": asdict(self.p2p.stats),
            "vms": vm_status(self.vms),
        }


def _local_ipv4s() -> list[str]:
    import ifaddr

    ips = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                ips.append(ip.ip)
    # reachable addresses first; loopback last (useful only on one machine)
    return sorted(set(ips), key=lambda ip: (ip.startswith("127."), ip))
