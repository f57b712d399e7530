"""The node's side of DNS (docs/dns.md): builds the zone from the state and swaps it into the
server; runs the server, the forwarder and the verifier of vanity domains.

Off the query path: the zone is rebuilt in a worker thread after the state changed (at most
once per `debounce` seconds, and less often when building costs more: a node spends at most
about BUILD_SHARE of its time on it), when a vanity domain's verification changed, and every
heartbeat period (liveness moves with time alone), then swapped in whole. The server only
ever reads the zone it holds. The view keeps its own copy of the records the zone is built
from and reads only those changed since it last looked: read whole each time, a fog's models
and agents cost every node a JSON parse each per second (half of a node's CPU under a
gossip load of 500 ops/s, docs/benchmarks.md).

What counts as a replica's address: an instance_status reported `running` by a member of the
fog that is alive (its heartbeat is recent, or it is this node), at an address in that
member's VM subnet (as formnet routes it, or this node's own). EXPOSEd ports are read from the
instance's Formfile here (formation.dns does not import formation.pack).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from typing import Protocol

import trio

from formation.dns.forward import Forwarder, Upstream, parse_upstream, system_upstreams
from formation.dns.names import Limits, Zone, build_zone, canonical_name, in_fog
from formation.dns.server import DnsServer, ServerLimits
from formation.dns.verify import Verifier
from formation.pack.formfile import exposed_ports

from .mirror import shared_mirror
from .placement import is_live, stale_after_ms
from .ports import NodeState

log = logging.getLogger("formation.dns")

MAX_RECORDS = 200_000  # of each kind read into a zone (the first by key)
ZONE_KINDS = ("instance", "instance_status", "agent", "model", "dns")
BUILD_SHARE = 0.02  # of the node's time the zone's rebuilds may take, at most (about)
MAX_PORT_CACHE = 10_000  # Formfiles whose EXPOSEd ports are remembered
DEBOUNCE_SECONDS = 1.0
MAX_VANITY_PER_OWNER = 100  # vanity domains of one owner the verifier checks


class DnsNode(NodeState, Protocol):
    async def vm_subnets(self) -> dict[str, str]: ...


def upstreams_of(hosts: tuple[str, ...], own: tuple[str, int]) -> list[Upstream]:
    """The configured upstreams, or resolv.conf's; never this server itself (a loop)."""
    ups = [parse_upstream(u) for u in hosts] if hosts else system_upstreams()
    host, port = own
    wildcard = host in ("0.0.0.0", "::")

    def is_me(u: Upstream) -> bool:
        if u.port != port:
            return False
        return u.host == host or (wildcard and (u.host in ("0.0.0.0", "::", "::1") or u.host.startswith("127.")))

    return [u for u in ups if not is_me(u)]


def vanity_domains(records: list[dict]) -> list[str]:
    """The domains outside .fog the `dns` records name, at most MAX_VANITY_PER_OWNER of each
    owner's (its first created): what the verifier checks."""
    per_owner: dict[str, list[str]] = {}
    for r in sorted(records, key=lambda r: (r.get("created_at") if isinstance(r.get("created_at"), int) else 0,
                                            str(r.get("record_id")))):
        domain = canonical_name(r.get("domain"))
        owner = r.get("owner")
        if domain is None or in_fog(domain) or not isinstance(owner, str):
            continue
        mine = per_owner.setdefault(owner, [])
        if domain not in mine and len(mine) < MAX_VANITY_PER_OWNER:
            mine.append(domain)
    return sorted({d for ds in per_owner.values() for d in ds})


class DnsView:
    def __init__(self, node: DnsNode, server: DnsServer, verifier: Verifier, limits: Limits, *,
                 debounce: float = DEBOUNCE_SECONDS):
        self.node = node
        self.server = server
        self.verifier = verifier
        self.limits = limits
        self.debounce = debounce
        self.refresh = float(node.config.node.heartbeat_seconds)
        self._state: dict | None = None
        self._mirror = shared_mirror(node.astore.store, ZONE_KINDS, MAX_RECORDS)
        self._built_from: tuple | None = None
        self.cost = 0.0  # CPU seconds the last rebuild took (read and build)
        self._ports: dict[bytes, tuple[int, ...]] = {}
        self._poked = trio.Event()
        self.builds = 0
        verifier.on_change = self.poke

    @property
    def zone(self) -> Zone:
        """The zone served now (read-only: the HTTP proxy routes by it, node/proxy.py)."""
        return self.server.zone

    def poke(self) -> None:
        """Rebuild soon from the state already read (a vanity domain's verification changed)."""
        self._poked.set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            seen = self.node.changes.last_seq
            with trio.move_on_after(self.refresh):
                await self._changed_or_poked(seen)
            read = self.node.changes.last_seq != seen or not self._poked.is_set()
            await trio.sleep(max(self.debounce, self.cost * (1 / BUILD_SHARE - 1)))
            self._poked = trio.Event()
            try:
                await self.rebuild(read=read)
            except Exception:  # noqa: BLE001 - the last zone stays served; the next change retries
                log.exception("dns: rebuilding the zone failed")

    async def _changed_or_poked(self, seen: int) -> None:
        async with trio.open_nursery() as race:
            async def changed():
                await self.node.changes.wait_past(seen)
                race.cancel_scope.cancel()

            async def poked():
                await self._poked.wait()
                race.cancel_scope.cancel()

            race.start_soon(changed)
            race.start_soon(poked)

    async def rebuild(self, *, read: bool = True) -> None:
        self.cost = 0.0
        if read or self._state is None:
            self._state = await self.read_state()
            self.verifier.want(vanity_domains(self._state["records"]))
        verified = self.verifier.verified()
        # the zone is a function of these: unchanged (a node's heartbeat, an op of another
        # kind), the zone served is still right and a build would only cost
        inputs = (self._mirror.seq, self._state["serving"], self._state["regions"], verified)
        if inputs == self._built_from:
            return
        build = functools.partial(build_zone, **self._state, verified=verified,
                                  limits=self.limits, serial=int(time.time()))
        zone = await trio.to_thread.run_sync(self._timed, build)
        self.server.set_zone(zone)
        self._built_from = inputs
        self.builds += 1
        log.debug("dns: zone %d: %d names, %d vanity, %d dropped", self.builds, len(zone.names),
                  len(zone.vanity), zone.dropped)

    def _timed(self, fn, *args):
        """fn(*args) in a worker thread, its CPU time added to `cost` (the time waited for the
        store's lock is not: it is not the zone's to pay)."""
        start = time.thread_time()
        try:
            return fn(*args)
        finally:
            self.cost += time.thread_time() - start

    async def read_state(self) -> dict:
        node = self.node
        rows = await node.astore.run(self._timed, self._mirror.read, node.astore.store)
        subnets = await node.vm_subnets()
        now = int(time.time() * 1000)
        stale = stale_after_ms(node.config.node.heartbeat_seconds)
        members = await node.fog_nodes()
        serving = {n["address"]: subnets[n["address"]] for n in members
                   if n["address"] in subnets and is_live(n, now, stale)}
        if node.address in subnets:
            serving[node.address] = subnets[node.address]
        return {"instances": rows["instance"], "statuses": rows["instance_status"],
                "agents": rows["agent"], "models": rows["model"], "records": rows["dns"],
                "serving": serving,
                "regions": {n["address"]: n.get("region") or "" for n in members},
                "near": node.config.node.region,
                "ports": {i["instance_id"]: self._exposed(i.get("formfile")) for i in rows["instance"]
                          if isinstance(i.get("instance_id"), str)}}

    def _exposed(self, formfile) -> tuple[int, ...]:
        if not isinstance(formfile, str) or not formfile:
            return ()
        key = hashlib.sha256(formfile.encode()).digest()
        got = self._ports.get(key)
        if got is None:
            if len(self._ports) >= MAX_PORT_CACHE:
                self._ports.clear()
            got = self._ports[key] = tuple(exposed_ports(formfile))
        return got


async def serve_dns(node: DnsNode, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """The node's DNS service, in the node's nursery; started with the DnsView (None when the
    port cannot be bound: logged, and the node goes on without DNS)."""
    cfg = node.config.dns
    forwarder = Forwarder(upstreams_of(cfg.upstreams, (cfg.host, cfg.port)),
                          timeout=cfg.upstream_timeout_ms / 1000, cache_entries=cfg.cache_entries)
    server = DnsServer(forwarder=forwarder, forward=cfg.outside == "forward",
                       limits=ServerLimits(client_qps=cfg.client_qps))
    verifier = Verifier(forwarder.resolve, min_ttl=cfg.verify_min_seconds,
                        max_ttl=max(cfg.verify_min_seconds, cfg.ttl_max), retry=float(cfg.verify_min_seconds))
    limits = Limits(ttl=cfg.ttl, ttl_min=cfg.ttl_min, ttl_max=max(cfg.ttl_min, cfg.ttl_max))
    view = DnsView(node, server, verifier, limits)
    try:
        await server.open(cfg.host, cfg.port)
    except OSError as exc:
        log.error("dns: cannot listen on %s port %d (%s): this node runs without its DNS server",
                  cfg.host, cfg.port, exc.strerror or exc)
        task_status.started(None)
        return
    if cfg.outside == "forward" and not forwarder.upstreams:
        log.warning("dns: no upstream resolver (dns.upstreams is empty and /etc/resolv.conf names "
                    "none): names outside the fog are refused")
    async with trio.open_nursery() as nursery:
        try:
            await view.rebuild()
        except Exception:  # noqa: BLE001 - served empty until the next change rebuilds it
            log.exception("dns: building the first zone failed")
        await nursery.start(server.serve)
        await nursery.start(verifier.run)
        await nursery.start(view.run)
        log.info("dns: serving on %s port %d (%d upstreams, outside names %s)", cfg.host, cfg.port,
                 len(forwarder.upstreams), "forwarded" if server.forwarding else "refused")
        task_status.started(view)
