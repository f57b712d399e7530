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
from formation.crdt.kinds.fog_kinds import invite_id
from formation.crdt.op import Op, OpError
from formation.crdt.store import Store
from formation.iproute import NetworkError
from formation.mesh import wggo
from formation.mesh.uapi import UapiError
from formation.p2p.service import P2PService, P2PSettings

from . import capacity, contexts, fog
from .charging import Charger
from .config import Config
from .events import Changes
from .fog import InviteToken
from .formnet import Formnet, MeshStatus, allowed_subnets, member_peers
from .metering import HireLedger, Meter
from .vmhost import VmHost, VmUnavailable
from .vmside import VmSide, VmsOff, VmsOn, VmsStarting, runs_vms, vm_status

log = logging.getLogger("formation.node")
VERSION = "0.1.0"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def open_node(config: Config, key: PrivateKey, store: Store) -> NodeRuntime:
    """The node's parts, made: the one place construction does IO. Raises InviteError for an
    invite token that cannot be used."""
    invite = InviteToken.decode(config.fog.invite) if config.fog.invite else None
    astore = AsyncStore(store)
    p2p = P2PService(key, astore, P2PSettings(
        listen=[config.p2p.listen],
        bootstrap=list(dict.fromkeys([*config.p2p.bootstrap, *(invite.bootstrap if invite else ())])),
        sync_interval=float(config.p2p.sync_interval_seconds),
        sync_max_sessions_per_peer=config.p2p.sync_sessions_per_peer,
        sync_max_sessions=config.p2p.sync_sessions,
        sync_budget_bytes=config.p2p.sync_budget_mb * 1024 * 1024,
        sync_budget_seconds=float(config.p2p.sync_budget_seconds),
        author_ops_per_s=float(config.p2p.author_ops_per_second),
        author_burst=float(config.p2p.author_burst),
        push=config.p2p.push,
    ))
    host, reason = VmHost.check(config, format_address(key.address))
    vms: VmSide = VmsStarting(host) if host is not None else VmsOff(reason)
    runtime = NodeRuntime(config, key, store, astore, p2p, vms, invite)
    runtime.mesh_reason = mesh_problem(config)
    if not runtime.mesh_reason:
        port = config.mesh.wireguard_port
        endpoints = [f"{ip}:{port}" for ip in _local_ipv4s() if not ip.startswith("127.")]
        runtime.formnet = Formnet(runtime, vm_subnet=str(host.subnet) if host else None, endpoints=endpoints)
    return runtime


def mesh_problem(config: Config) -> str:
    """Why this node runs no formnet ("" when it does); raises MeshError when it must."""
    if config.mesh.enabled == "false":
        return "formnet is disabled in the configuration (mesh.enabled = false)"
    problem = wggo.requirements_problem()
    if problem and config.mesh.enabled == "true":
        raise wggo.MeshError(f"mesh.enabled = true but {problem}")
    return problem


class NodeRuntime:
    def __init__(self, config: Config, key: PrivateKey, store: Store, astore: AsyncStore,
                 p2p: P2PService, vms: VmSide, invite: InviteToken | None = None):
        self.config = config
        self.key = key
        self.address = format_address(key.address)
        self.store = store
        self.astore = astore
        self.p2p = p2p
        self.vms = vms
        p2p.peer_source = self.fog_nodes  # dial the fog's members only, not whoever signs a record
        # the node's one commit notification: the API's /events, the control watch, the scheduler
        self.changes = Changes()
        self.api_urls: list[str] = []
        self.started_at = now_ms()
        self.heartbeat_error: str | None = None
        self.seen: list[str] = []  # members this node is connected to, as of its last heartbeat
        self.invite = invite
        self.formnet: Formnet | None = None  # set by open_node when this node runs formnet
        self.mesh_reason = "formnet is not set up"
        self.fog_id: str | None = None  # the fog this node is a member of (found, made or joined in run)
        self.admitted = False  # a member now, by the fog's records (membership.py)
        self.hires = HireLedger()  # calls the hire proxy sent, until the meter takes them
        self.charger = Charger(self)  # priced calls: admission and charge records (charging.py)
        self.meter = Meter(self)  # usage records of what this node hosts and proxies (metering.py)
        self.dns_view = None  # the DNS server's view, once it serves (dnsview.py; /metrics reads it)

    @property
    def peer_id(self) -> str:
        return self.p2p.peer_id

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from .control import serve_control

        self.store.on_commit.append(self.changes.on_commit)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.p2p.run)
                await self._find_fog()
                if self.formnet is not None:
                    nursery.start_soon(self._run_formnet, self.formnet)
                await self.register()
                nursery.start_soon(self._heartbeat)
                nursery.start_soon(self._watch_membership)
                await nursery.start(self.meter.run)
                await nursery.start(self.charger.run)
                await nursery.start(serve_control, self, self.config.data_dir / "control.sock")
                self.api_urls = await nursery.start(self._serve_api)
                dns_view = None
                if self.config.dns.enabled:  # the DNS server (docs/dns.md); a port taken is logged
                    from .dnsview import serve_dns
                    dns_view = await nursery.start(serve_dns, self)
                    self.dns_view = dns_view
                if self.config.proxy.enabled:  # HTTP by Host, by the DNS view's zone (docs/proxy.md)
                    from .proxy import serve_proxy
                    await nursery.start(serve_proxy, self, dns_view)
                if isinstance(self.vms, VmsStarting):
                    nursery.start_soon(self._run_vms, self.vms.host)
                log.info("node %s up: peer %s, listening on %s", to_checksum(self.key.address),
                         self.peer_id, ", ".join(self.p2p.addrs()))
                task_status.started(self)
        finally:
            self.store.on_commit.remove(self.changes.on_commit)

    async def _run_formnet(self, formnet: Formnet) -> None:
        try:
            await formnet.run()
        except (wggo.MeshError, UapiError, NetworkError, OSError) as exc:
            if self.config.mesh.enabled == "true":
                raise
            formnet.status = MeshStatus(enabled=False, reason=f"formnet failed: {exc}")
            log.error("formnet failed (the node goes on without it): %s", exc)

    async def _find_fog(self) -> None:
        """This node's fog: its own member record; else the invite it was given; else, with no
        bootstrap peer to join through, a new fog of its own (its genesis)."""
        own = await self.astore.get("member", self.address)
        if own is not None:
            self.fog_id = own["fog_id"]
        elif self.invite is not None:
            record = fog.claim(self.key, self.invite, now_ms=now_ms())
            try:
                await self.write("member", self.address, record)
            except OpError as exc:
                raise fog.InviteError(f"the invite was refused: {exc.detail}") from None
            self.fog_id = record["fog_id"]
            log.info("claimed an invite of %s into fog %s", self.invite.invite["inviter"], self.fog_id)
        elif not self.config.p2p.bootstrap:
            genesis, member = fog.genesis(self.key, name=self.config.fog.name, now_ms=now_ms(), **fog.economy_of(self.config))
            await self.write("fog", genesis["fog_id"], genesis)
            await self.write("member", self.address, member)
            self.fog_id = genesis["fog_id"]
            log.info("made a new fog %s (this node is its genesis)", self.fog_id)
        else:
            log.warning("not a member of any fog: this node syncs the state and runs no workloads "
                        "until it claims an invite (form join INVITE)")
        await self._check_admitted()

    async def _watch_membership(self) -> None:
        """Admission follows the records as they arrive (a new node is admitted once it has
        synced the genesis and its inviter's claim), at most once a second."""
        scanned: frozenset[str] | None = None  # the members when this node last looked for claims
        while True:
            seen = self.changes.last_seq
            await self._check_admitted()
            members = await self.astore.fog_members(self.fog_id) if self.fog_id else frozenset()
            if members != scanned:  # a first claim of one of our invites adds a member
                try:
                    await self._seal_my_invites()
                    scanned = members
                except OpError as exc:  # logged: the next change tries again
                    log.warning("could not seal an invite: %s", exc)
            await self.changes.wait_past(seen)
            await trio.sleep(1.0)

    async def _seal_my_invites(self) -> None:
        """Seal each invite of this member that exactly one node claimed to that node (`admit`),
        so that the token, once used, can no longer void the admission (membership.py)."""
        if self.fog_id is None or not self.admitted:
            return
        claimants: dict[str, set[str]] = {}
        invites: dict[str, dict] = {}
        for claim in await self.astore.run(self.store.invited_by, "member", self.fog_id, self.address):
            invite = claim.get("invite")
            if invite is not None and invite["inviter"] == self.address:
                iid = invite_id(invite)
                claimants.setdefault(iid, set()).add(claim["address"])
                invites[iid] = invite
        for iid, who in claimants.items():
            if len(who) == 1 and await self.astore.get("admit", iid) is None:
                member = next(iter(who))
                await self.write("admit", iid, {"invite": invites[iid], "member": member})
                log.info("sealed invite %d to %s", invites[iid]["serial"], member)

    async def _check_admitted(self) -> None:
        self.admitted = self.fog_id is not None and self.address in await self.astore.fog_members(self.fog_id)

    async def fog_nodes(self) -> list[dict]:
        """The node records of this fog's members: a node record without admission changes
        nothing (no placement), however it describes itself."""
        if self.fog_id is None:
            return []
        members = await self.astore.fog_members(self.fog_id)
        return [n for n in await self.astore.list("node", limit=1_000_000) if n["address"] in members]

    def routes_vms(self) -> bool:
        return self.formnet is not None and self.formnet.status.enabled

    async def vm_subnets(self) -> dict[str, str]:
        """Each member's VM subnet as formnet routes it (only what it may claim, formnet.py), and
        this node's own: where a replica's address may be."""
        _, records = await member_peers(self)
        subnets = allowed_subnets(records, self.config.mesh.overlay_cidr)
        if not isinstance(self.vms, VmsOff):
            subnets[self.address] = str(self.vms.host.subnet)
        return subnets

    async def leave(self) -> str:
        """This node leaves its fog: its member record says `left` (it still vouches for the
        nodes it admitted). Its fog id."""
        if self.fog_id is None:
            raise fog.InviteError("this node is not a member of a fog")
        await self.write("leave", self.address, {"address": self.address, "fog_id": self.fog_id})
        await self._check_admitted()
        return self.fog_id

    async def create_invite(self, *, expires_s: int) -> InviteToken:
        """An invite from this member: the next of its serials, claimable for `expires_s`."""
        await self._check_admitted()
        if self.fog_id is None or not self.admitted:
            raise fog.InviteError("this node is not a member of a fog (yet), so it cannot invite")
        genesis = await self.astore.get("fog", self.fog_id)
        if genesis is not None and genesis["policy"]["inviters"] == "genesis" and genesis["genesis"] != self.address:
            raise fog.InviteError(f"fog {self.fog_id} admits only nodes its genesis invites")
        limit = genesis["policy"]["max_admits"] if genesis is not None else 0
        serial = await self.astore.run(_next_serial, self.store, limit)
        if serial is None:
            raise fog.InviteError(f"this member has made all the {limit} invites the fog's policy allows it")
        return fog.make_invite(self.key, self.fog_id, serial=serial, bootstrap=self.announce_addrs(),
                               expires_ms=now_ms() + expires_s * 1000)

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
        scheduler = Scheduler(self, host, builds, secret_key=self.key.secret, rent=self.charger.rent_due)

        # build contexts, to the members placed for an instance of them (node/contexts.py)
        self.p2p.blob_provider = contexts.provider(self, builds.context_path)
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
        self.seen = await self._connected_members()
        return await self.write("node", self.address, self.node_record())

    async def _connected_members(self) -> list[str]:
        """The fog's members this node is connected to now (their records name their peer ids)."""
        connected = set(self.p2p.connected())
        out = []
        for rec in await self.fog_nodes():
            ids = {a.rsplit("/p2p/", 1)[1] for a in rec.get("multiaddrs", []) if "/p2p/" in a}
            if rec["address"] != self.address and ids & connected:
                out.append(rec["address"])
        return sorted(out)[:256]

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
            "capacity": {**capacity.detect(self.config.data_dir, self.vms), "vms": runs_vms(self.vms)},
            "version": VERSION,
            "region": self.config.node.region,
            "api_url": self.public_api_url(),
            "started_at": self.started_at,
            "heartbeat": now_ms(),
            "seen": self.seen,
            "doubts": self.vms.scheduler.doubts.published() if isinstance(self.vms, VmsOn) else [],
            "public_key": self.key.public_key.format(compressed=True).hex(),  # what secrets are sealed to
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
        if self.fog_id is None:
            problems.append("not a member of any fog: claim an invite (form join INVITE)")
        elif not self.admitted:
            problems.append(f"not (or no longer) admitted to fog {self.fog_id}: the state does not "
                            "show its invite yet, or the invite was claimed twice, or it was expelled")
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
                await self._check_admitted()
                self.heartbeat_error = None
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat is logged, not fatal
                self.heartbeat_error = str(exc) or type(exc).__name__
                log.warning("heartbeat failed: %s", exc)

    # ---- reads ---------------------------------------------------------------------------

    async def status(self, *, full: bool = True) -> dict:
        """What `form node status` shows. `full=False` (what /health asks, often): no heads and
        no state hash (a hash over every register: ~100 ms at 2,700 registers, under the store's
        lock), and counts read without waiting for the lock (a batch may be committing)."""
        def read(store: Store) -> dict:
            return {"ops": len(store), "heads": [h.hex() for h in store.heads()],
                    "state_hash": store.state_hash().hex(), "pending": store.pending_count,
                    "seq": store.seq}

        if full:
            state = await self.astore.run(read, self.store)
        else:  # plain reads of sizes: a batch being applied meanwhile makes them a moment old
            state = {"ops": len(self.store), "pending": self.store.pending_count, "seq": self.store.seq}
        return {
            "version": VERSION,
            "address": to_checksum(self.key.address),
            "peer_id": self.peer_id,
            "addrs": self.announce_addrs(),
            "connected": self.p2p.connected(),
            **state,
            "p2p": asdict(self.p2p.stats),
            "vms": vm_status(self.vms),
            "fog": {"id": self.fog_id, "admitted": self.admitted},
            "mesh": (self.formnet.status.as_dict() if self.formnet is not None
                     else {"enabled": False, "reason": self.mesh_reason}),
        }


def _next_serial(store: Store, limit: int) -> int | None:
    """This node's next invite serial, at most `limit` (kept in the store, so that no serial is
    handed out twice: two invites with one serial would admit neither)."""
    raw = store.get_meta(fog.INVITE_SERIAL_META)
    serial = (int(raw) if raw else 0) + 1
    if serial > limit:
        return None
    store.set_meta(fog.INVITE_SERIAL_META, str(serial).encode())
    return serial


def _local_ipv4s() -> list[str]:
    import ifaddr

    ips = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                ips.append(ip.ip)
    # reachable addresses first; loopback last (useful only on one machine)
    return sorted(set(ips), key=lambda ip: (ip.startswith("127."), ip))
