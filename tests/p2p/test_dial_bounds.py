"""What node records can make a node dial, and what connections can cost it (docs/p2p.md, "Peers").

The attack (found by an earlier session): every node dialed every address of every node record,
forever (20 records gave 240 connections in 20 s to where they pointed). Now a node dials only
its fog's members (peer_source, set by the node), and of a record only the addresses of its own
node (the /p2p/ id carries the key that signs the record), at most max_addrs_per_peer of them,
one address per dial, each address and peer backing off, all dials within a rate and an
in-flight bound; strangers (connected peers that are neither members nor bootstrap peers) are
capped, so fresh peer ids cannot crowd the members out.

Real libp2p hosts on 127.0.0.1; the dialed addresses are TCP listeners that count connections
and close them (anything that is not a libp2p node: a victim's host).
"""

from __future__ import annotations

import contextlib

import trio

from formation.crdt.hlc import from_ms
from formation.crdt.keys import PrivateKey, format_address
from formation.crdt.op import make_op
from formation.crdt.store import wall_ms
from formation.p2p.service import P2PSettings, peer_id_of
from tests.p2p.attacker import open_attacker
from tests.p2p.conftest import open_fog


class Victim:
    """TCP listeners that count the connections each gets."""

    def __init__(self):
        self.ports: list[int] = []
        self.counts: dict[int, int] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    async def listen(self, nursery: trio.Nursery, n: int) -> None:
        for _ in range(n):
            port = await nursery.start(self._serve)
            self.ports.append(port)
            self.counts[port] = 0

    async def _serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        task_status.started(port)
        while True:
            conn = await listener.accept()
            self.counts[port] += 1
            await conn.aclose()


def node_op(key: PrivateKey, multiaddrs: list[str], hlc: int):
    address = format_address(key.address)
    return make_op(key, "node", address, deps=[], hlc=hlc,
                   value={"address": address, "heartbeat": wall_ms(), "multiaddrs": multiaddrs})


@contextlib.asynccontextmanager
async def attacked_fog(n_listeners: int, **settings):
    """Two honest nodes (every node record counts: no peer_source), an attacker that dials
    nothing itself, and the victim's listeners."""
    async with open_fog(2, **settings) as fog, open_attacker(fog) as evil, trio.open_nursery() as nursery:
        async def nobody() -> list[dict]:
            return []

        evil.svc.peer_source = nobody
        victim = Victim()
        await victim.listen(nursery, n_listeners)
        try:
            yield fog, evil, victim
        finally:
            nursery.cancel_scope.cancel()


def at(port: int, peer: str) -> str:
    return f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer}"


async def test_twenty_records_cost_no_more_dials_than_the_dial_rate_allows():
    seconds = 6.0
    async with attacked_fog(20) as (fog, evil, victim):
        hlc = from_ms(wall_ms())
        keys = [PrivateKey() for _ in victim.ports]
        await evil.gossip([node_op(k, [at(p, peer_id_of(k))], hlc + i).wire
                           for i, (k, p) in enumerate(zip(keys, victim.ports, strict=True))])
        await trio.sleep(seconds)
        s = fog[0].svc.settings
        bound = len(fog) * (s.dial_burst + s.dial_rate * seconds)
        # before: 684 connections in 20 s (about 200 in 6 s); every listener is still tried
        print(f"20 records: {victim.total} connections in {seconds} s from 2 nodes (bound {bound:.0f})")
        assert victim.total <= bound
        assert all(victim.counts.values())
        assert all(len(m.svc._dialing) <= s.max_dials for m in fog)


async def test_a_record_is_dialed_only_at_its_own_nodes_addresses_and_at_a_few_of_them():
    seconds = 6.0
    async with attacked_fog(16) as (fog, evil, victim):
        hlc = from_ms(wall_ms())
        # a member's record naming 16 other peer ids at 16 addresses (before: 504 connections in 20 s)
        member = PrivateKey()
        others = [at(p, peer_id_of(PrivateKey())) for p in victim.ports]
        await evil.gossip([node_op(member, others, hlc).wire])
        await trio.sleep(2.0)
        assert victim.total == 0
        assert all(set(m.svc._known) <= {evil.peer_id, *(x.svc.peer_id for x in fog)} for m in fog)

        # its own id at 16 addresses: 4 are dialed, one at a time, backing off
        own = [at(p, peer_id_of(member)) for p in victim.ports]
        await evil.gossip([node_op(member, own, hlc + 1).wire])
        await trio.sleep(seconds)
        dialed = [p for p, c in victim.counts.items() if c]
        print(f"16 addresses of one member: {victim.total} connections in {seconds} s from 2 nodes, "
              f"to {len(dialed)} addresses")
        assert set(dialed) <= set(victim.ports[:4])
        # each node's dials of that peer: at 0, 0.5, 1.5, 3.5 s (back-off 0.5 doubling), one each
        assert victim.total <= len(fog) * 5


async def test_strangers_past_the_cap_are_dropped_and_members_keep_their_connections():
    import multiaddr
    from libp2p import new_host
    from libp2p.crypto.secp256k1 import create_new_key_pair
    from libp2p.peer.peerinfo import info_from_p2p_addr

    async with open_fog(2, max_strangers=2) as fog, trio.open_nursery() as nursery:
        target = fog[0]
        info = info_from_p2p_addr(multiaddr.Multiaddr(target.svc.addrs()[0]))
        hosts = []
        for _ in range(6):  # fresh peer ids are free to make
            host = new_host(key_pair=create_new_key_pair())
            hosts.append(host)

            async def run(host=host, *, task_status=trio.TASK_STATUS_IGNORED):
                async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                    task_status.started()
                    await trio.sleep_forever()

            await nursery.start(run)
            with contextlib.suppress(Exception):
                await host.connect(info)
        await trio.sleep(1.0)
        strangers = target.svc.strangers()
        print(f"strangers connected to node 0: {len(strangers)} of {len(hosts)} + node 1 (cap 2)")
        assert len(strangers) <= 2
        assert fog[1].svc.peer_id in target.svc.connected()  # node 1 is a stranger here, and stays
        assert target.svc.host.get_network().connection_config.max_connections == P2PSettings().max_connections
        nursery.cancel_scope.cancel()


async def test_a_fog_node_dials_no_address_of_a_record_that_is_not_a_members(tmp_path):
    """The node's peer_source is its fog's admitted members (formation/node/runtime.py): a node
    record anyone signs names addresses nobody dials."""
    from tests.p2p.test_membership_attacks import Honest, holds_all
    from tests.p2p.test_membership_attacks import open_fog as open_member_fog

    async with open_member_fog(tmp_path) as (fog, _), open_attacker([Honest(n) for n in fog]) as evil, \
            trio.open_nursery() as nursery:
        async def nobody() -> list[dict]:
            return []

        evil.svc.peer_source = nobody  # the attacker does not dial what it publishes
        victim = Victim()
        await victim.listen(nursery, 20)
        hlc = from_ms(wall_ms())
        keys = [PrivateKey() for _ in victim.ports]
        ops = [node_op(k, [at(p, peer_id_of(k))], hlc + i) for i, (k, p) in enumerate(zip(keys, victim.ports, strict=True))]
        await evil.gossip([o.wire for o in ops])
        await holds_all(fog, [o.id for o in ops])
        await trio.sleep(2 * fog[0].runtime.p2p.settings.peer_refresh + 1)
        assert victim.total == 0
        assert all(set(n.runtime.p2p._known) <= {evil.peer_id, *(m.runtime.peer_id for m in fog)} for n in fog)
        nursery.cancel_scope.cancel()
