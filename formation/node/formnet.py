"""formnet on this node: its WireGuard interface, its `peer` record, and its peers kept equal to
the fog members' peer records, changed by diff (one peer added, updated or removed at a time).

What a peer is allowed to route is derived here, not taken from its record: its overlay address
comes from the members (mesh/addressing.py, the same on every node), and the VM subnet it
declares is kept only when it overlaps neither the overlay range nor another member's subnet
(the member with the smaller address keeps a contested subnet), so no member can claim another's
traffic. Members only: a node record or peer record without admission changes nothing.

Reachability: a peer's endpoint candidates are tried in turn (`next_endpoint`); a member no
candidate reaches is reached through a member that relays for the pair (formation/mesh/relay.py:
each node publishes in its peer record whom it reaches, `reaches`, and both ends of a pair pick
the same relay from the state). The interface is the kernel's WireGuard where the module exists,
wireguard-go elsewhere (formation/mesh/backend.py).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass, field, replace

import trio

from formation.mesh import backend, relay
from formation.mesh import keys as wgkeys
from formation.mesh.addressing import overlay_addresses
from formation.mesh.relay import HANDSHAKE_STALE
from formation.mesh.uapi import Device, PeerChange, PeerConfig, diff
from formation.mesh.wggo import WireGuardInterface, iface_name

from .ports import NodeState
from .vmhost import VM_SPACE

log = logging.getLogger("formation.mesh")
MIN_GAP = 0.3  # seconds between two passes over the peer records
PASS_INTERVAL = 5.0  # also how often a silent peer's next endpoint is tried
KEY_FILE = "wireguard.key"
PROBE_PORT = 9  # discard: a probe only has to be WireGuard data, which the peer's WireGuard answers


@dataclass
class MeshStatus:
    enabled: bool = False
    reason: str = ""
    iface: str = ""
    overlay_ip: str | None = None
    peers: list[str] = field(default_factory=list)  # member addresses configured as peers
    backend: str = ""  # "kernel" or "wireguard-go"
    reaches: list[str] = field(default_factory=list)  # members with a live direct tunnel
    relays: dict[str, str] = field(default_factory=dict)  # member reached through a relay -> relay

    def as_dict(self) -> dict:
        return {"enabled": self.enabled, "reason": self.reason, "iface": self.iface,
                "overlay_ip": self.overlay_ip, "peers": len(self.peers), "backend": self.backend,
                "direct": len(self.reaches), "relays": dict(self.relays)}


def allowed_subnets(records: dict[str, dict], overlay_cidr: str) -> dict[str, str]:
    """Each member's VM subnet, when it lies in the fog's VM space (vmhost.VM_SPACE: never a LAN,
    loopback or default route that every node would then send into the tunnel), overlaps neither
    the overlay nor a subnet kept for a member with a smaller address."""
    overlay = ipaddress.ip_network(overlay_cidr)
    low, high = VM_SPACE
    kept: dict[str, ipaddress.IPv4Network] = {}
    for member in sorted(records):
        raw = records[member].get("vm_subnet")
        if not raw:
            continue
        try:
            net = ipaddress.ip_network(raw)
        except ValueError:
            continue
        if net.version != 4 or not (low <= net.network_address and net.broadcast_address <= high) \
                or net.overlaps(overlay) or any(net.overlaps(other) for other in kept.values()):
            continue
        kept[member] = net
    return {m: str(n) for m, n in kept.items()}


def desired_peers(me: str, members: frozenset[str], records: dict[str, dict], overlay_cidr: str,
                  own_subnet: str | None = None) -> tuple[str | None, dict[bytes, PeerConfig], dict[bytes, str]]:
    """(my overlay address, peers by public key, member of each peer) from the members' records.
    A peer's subnet that overlaps this node's own VM subnet is not routed to it, whoever keeps
    the subnet in the fog's view: this node's VMs are on its bridge."""
    if me not in members:
        return None, {}, {}
    overlay = overlay_addresses(members, overlay_cidr)
    subnets = allowed_subnets({m: r for m, r in records.items() if m in members}, overlay_cidr)
    peers: dict[bytes, PeerConfig] = {}
    owner: dict[bytes, str] = {}
    shared: set[bytes] = set()
    for member in sorted(members - {me}):
        rec = records.get(member)
        if rec is None:
            continue
        try:
            pub = wgkeys.from_b64(rec["public_key"])
        except ValueError:
            continue
        if pub in peers or pub in shared:  # members sharing a key: none (it would route one's traffic to another)
            peers.pop(pub, None)
            owner.pop(pub, None)
            shared.add(pub)
            continue
        subnet = subnets.get(member)
        if subnet and own_subnet and ipaddress.ip_network(subnet).overlaps(ipaddress.ip_network(own_subnet)):
            subnet = None
        allowed = (f"{overlay[member]}/32", *((subnet,) if subnet else ()))
        endpoints = rec.get("endpoints") or []
        peers[pub] = PeerConfig(pub, endpoints[0] if endpoints else None, allowed)
        owner[pub] = member
    return overlay.get(me), peers, owner


TRY_ENDPOINT = 5.0  # seconds an endpoint candidate gets before the next one is tried


def next_endpoint(count: int, index: int, set_at: float, last_handshake: int, now: float,
                  wall_now: int) -> tuple[int, float]:
    """Which of a peer's `count` endpoint candidates to use: keep the current one while handshakes
    come (or while it is still being tried), else move on to the next, round and round."""
    if count <= 1 or (last_handshake and wall_now - last_handshake < HANDSHAKE_STALE):
        return index, set_at
    if now - set_at < TRY_ENDPOINT:
        return index, set_at
    return (index + 1) % count, now


async def member_peers(node: NodeState) -> tuple[frozenset[str], dict[str, dict]]:
    """The fog's members and their `peer` records (what formnet and the hire rules read)."""
    if node.fog_id is None:
        return frozenset(), {}
    members = await node.astore.fog_members(node.fog_id)
    records = {r["address"]: r for r in await node.astore.list("peer", limit=100_000)
               if r["address"] in members}
    return members, records


class Formnet:
    def __init__(self, node: NodeState, *, vm_subnet: str | None, endpoints: list[str],
                 choose=backend.choose):
        self.node = node
        self.vm_subnet = vm_subnet
        self.endpoints = endpoints
        self.choose = choose
        self.status = MeshStatus(enabled=False, reason="formnet is starting")
        self._tries: dict[bytes, tuple[int, float]] = {}  # peer -> (endpoint index, since)
        self._links: dict[bytes, relay.Link] = {}  # peer -> its direct tunnel, as this node sees it
        self._plan: dict[str, str] = {}  # member reached through a relay -> the relay

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.node.config.mesh
        private = wgkeys.load_or_create(self.node.config.data_dir / KEY_FILE)
        wg = await self.choose(iface_name(self.node.address))
        async with trio.open_nursery() as nursery:
            await nursery.start(wg.run)
            await wg.configure(private_key=private, listen_port=cfg.wireguard_port)
            self.status.iface, self.status.backend = wg.name, wg.kind
            log.info("formnet: %s on %s", wg.name, wg.kind)
            task_status.started()
            current: dict[bytes, PeerConfig] = {}
            routes: set[str] = set()
            address: str | None = None
            while True:
                seen = self.node.changes.last_seq
                address, current, routes = await self._pass(wg, private, address, current, routes)
                with trio.move_on_after(PASS_INTERVAL):
                    await self.node.changes.wait_past(seen)
                await trio.sleep(MIN_GAP)

    async def _pass(self, wg: WireGuardInterface, private: bytes, address: str | None,
                    current: dict[bytes, PeerConfig], routes: set[str]):
        node, cidr = self.node, self.node.config.mesh.overlay_cidr
        if node.fog_id is None:
            self.status.reason = "not a member of a fog yet"
            return address, current, routes
        members, records = await member_peers(node)
        mine, desired, owner = desired_peers(node.address, members, records, cidr, self.vm_subnet)
        if mine is None:
            self.status.reason = "not admitted to the fog (yet)"
            desired = {}
        elif mine != address:
            await wg.up(f"{mine}/{ipaddress.ip_network(cidr).prefixlen}")
            log.info("formnet: %s is %s", wg.name, mine)
        if mine is not None:
            wg.forward()
        device = await wg.device()
        desired = self._reachable(device, desired, records, owner)
        probes, remakes, reaches, trying = self._watch(device, desired, owner, records)
        plan: dict[str, str] = {}
        if mine is not None:
            await self._publish(private, mine, records.get(node.address), reaches)
            claims = {m: r.get("reaches") or [] for m, r in records.items()}
            claims[node.address] = reaches
            plan = relay.relay_plan(node.address, owner.values(), claims, trying)
        routed, plan = relay.apply_plan(desired, owner, plan)
        if plan != self._plan:
            log.info("formnet: relays %s", {x[:10]: r[:10] for x, r in sorted(plan.items())} or "none")
        self._plan = plan
        changes = diff(current, routed)
        if changes:
            await wg.configure(changes=changes)
            log.info("formnet: %d peer change(s), %d peer(s)", len(changes), len(routed))
        for key in remakes:  # a peer whose tunnel is down: its entry made anew handshakes at once
            await wg.configure(changes=[PeerChange(routed[key], remove=True)])
            await wg.configure(changes=[PeerChange(routed[key])])
        await self._probe([desired[k].allowed_ips[0].split("/")[0] for k in probes
                           if k in desired and owner[k] not in plan])
        wanted_routes = {ip for p in desired.values() for ip in p.allowed_ips[1:]}
        for cidr_ in sorted(wanted_routes - routes):
            await wg.route(cidr_)
        for cidr_ in sorted(routes - wanted_routes):
            await wg.unroute(cidr_)
        self.status = MeshStatus(enabled=mine is not None, reason="" if mine else self.status.reason,
                                 iface=wg.name, overlay_ip=mine, peers=sorted(owner.values()),
                                 backend=wg.kind, reaches=reaches, relays=plan)
        return mine, routed, wanted_routes

    @staticmethod
    def _deadline(record: dict) -> float:
        """How long a new peer is tried directly: every endpoint candidate gets its turn."""
        return max(relay.RELAY_AFTER, TRY_ENDPOINT * len(record.get("endpoints") or []))

    def _reachable(self, device: Device, desired: dict[bytes, PeerConfig],
                   records: dict[str, dict], owner: dict[bytes, str]) -> dict[bytes, PeerConfig]:
        """Each peer's endpoint: one of the candidates its record lists, moving on to the next
        while no handshake comes (the first may be an address only its own LAN reaches)."""
        handshakes = {k: int(p.get("last_handshake_time_sec", "0") or 0) for k, p in device.public_keys.items()}
        now, wall = trio.current_time(), int(time.time())
        out = {}
        for key, peer in desired.items():
            candidates = records[owner[key]].get("endpoints") or []
            index, since = self._tries.get(key, (0, now))
            index, since = next_endpoint(len(candidates), index % max(1, len(candidates)), since,
                                         handshakes.get(key, 0), now, wall)
            self._tries[key] = (index, since)
            out[key] = replace(peer, endpoint=candidates[index] if candidates else None)
        for gone in set(self._tries) - set(desired):
            del self._tries[gone]
        return out

    def _watch(self, device: Device, desired: dict[bytes, PeerConfig], owner: dict[bytes, str],
               records: dict[str, dict]) -> tuple[list[bytes], list[bytes], list[str], set[str]]:
        """Each peer's direct tunnel stepped once (relay.track): the peers to probe, the peers
        whose entries to make anew (down), the members this node reaches (to publish) and those
        still in their first tries (not relayed yet)."""
        now, wall = trio.current_time(), int(time.time())
        key_of = {m: k for k, m in owner.items()}
        relayed = {key_of[m] for m in self._plan if m in key_of}
        probes, remakes = [], []
        for key in desired:
            seen = device.public_keys.get(key, {})
            step = relay.track(self._links.get(key), last_handshake=int(seen.get("last_handshake_time_sec") or 0),
                               rx_bytes=int(seen.get("rx_bytes") or 0), now=now, wall=wall,
                               direct=key in device.public_keys and key not in relayed)
            if step.link.live != (self._links.get(key) or step.link).live:
                log.info("formnet: direct tunnel to %s %s", owner[key], "up" if step.link.live else "down")
            self._links[key] = step.link
            if step.probe:
                probes.append(key)
            if step.remake:
                remakes.append(key)
        for gone in set(self._links) - set(desired):
            del self._links[gone]
        previous = (records.get(self.node.address) or {}).get("reaches") or []
        trying = {owner[k] for k, link in self._links.items() if link.trying(now, self._deadline(records[owner[k]]))}
        links = {owner[k]: link for k, link in self._links.items()}
        return probes, remakes, relay.reaches(links, previous, trying), trying

    async def _probe(self, addresses: list[str]) -> None:
        """A datagram to each address (a peer's overlay address, routed to its own entry): data
        that the peer's WireGuard answers if the tunnel works both ways."""
        if not addresses:
            return
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with sock:
            for addr in addresses:
                try:
                    await sock.sendto(b"formnet probe", (addr, PROBE_PORT))
                except OSError as exc:  # e.g. the interface is going down
                    log.debug("formnet: probe to %s: %s", addr, exc)

    async def _publish(self, private: bytes, overlay_ip: str, record: dict | None, reaches: list[str]) -> None:
        """This node's peer record, written when it says something new (`reaches` changes when a
        tunnel comes up or goes down, not with each pass)."""
        value = {"address": self.node.address, "public_key": wgkeys.b64(wgkeys.public_of(private)),
                 "overlay_ip": overlay_ip, "endpoints": self.endpoints[:8], "vm_subnet": self.vm_subnet,
                 "reaches": reaches}
        if record is None or any(record.get(k) != v for k, v in value.items()):
            await self.node.write("peer", self.node.address, value)
