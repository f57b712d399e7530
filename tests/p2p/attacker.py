"""A hostile fog member for tests: a real libp2p peer with its own P2PService, Store and key,
which signs whatever it likes and pushes it to honest nodes by gossip (as itself, or under any
number of fresh peer ids) and by sync (a raw session on /formation/sync/1).

It uses only public pieces: the P2PService's host and pubsub, the gossip encoding and topic,
the sync framing and the reconciliation messages.
"""

from __future__ import annotations

import contextlib
import os

import msgpack
import trio

from formation.crdt.async_store import AsyncStore
from formation.crdt.bloom import Bloom
from formation.crdt.keys import PrivateKey, eip191_hash, parse_signature, sha256
from formation.crdt.op import PAYLOAD_NODE, PAYLOAD_USER, VERSION
from formation.crdt.reconcile import MAX_MESSAGE_BYTES, Done, Hello, Need, Ops, decode, encode
from formation.crdt.store import Limits, Store
from formation.p2p import sync
from formation.p2p.framing import read_frame, write_frame
from formation.p2p.gossip import TOPIC, encode_batch
from formation.p2p.service import P2PService, P2PSettings
from tests.p2p.conftest import Member
from tests.support import Node


def forge_wire(signer: PrivateKey, kind: str, key: str, *, deps=(), prev=(), hlc: int, value=None,
               request: tuple[str, bytes, bytes] | None = None) -> bytes:
    """A correctly signed op wire with no checks at all (make_op refuses to build what peers
    refuse; an attacker does not use make_op)."""
    if request is None:
        payload = [PAYLOAD_NODE, value]
    else:
        message, body, usig = request
        payload = [PAYLOAD_USER, message, bytes(body), parse_signature(usig)]
    body = msgpack.packb([VERSION, kind, key, signer.address, sorted(set(deps) | set(prev)), sorted(set(prev)),
                          hlc, payload], use_bin_type=True)
    return msgpack.packb([body, signer.sign_digest(eip191_hash(sha256(body)))], use_bin_type=True)


def honest_ids(members) -> set[str]:
    return {m.svc.peer_id for m in members}


def assert_no_honest_strikes(members) -> None:
    """Honest nodes never strike or ban one another."""
    ids = honest_ids(members)
    for m in members:
        assert not (m.svc.banned & ids), f"node {m.i} banned honest peers {m.svc.banned & ids}"
        struck = {p: n for p, n in m.svc.validator.strikes.items() if p in ids and n}
        assert not struck, f"node {m.i} struck honest peers {struck}"


class Attacker:
    def __init__(self, svc: P2PService, node: Node):
        self.svc = svc
        self.node = node
        self.key = node.key
        self.address = node.address
        self.fresh_ids: list[str] = []

    @property
    def peer_id(self) -> str:
        return self.svc.peer_id

    @property
    def store(self) -> Store:
        return self.node.store

    async def view(self, fn, *args):
        """Read the attacker's own replica (what it learnt from the fog) under its lock."""
        return await self.svc.astore.run(fn, self.store, *args)

    # ---- gossip ----------------------------------------------------------------------------

    async def gossip(self, wires: list[bytes]) -> None:
        """Publish a batch as ourselves, the way P2PService._publish_batches does."""
        await self.svc.pubsub.publish(TOPIC, encode_batch(wires))

    async def gossip_raw(self, payload: bytes) -> None:
        await self.svc.pubsub.publish(TOPIC, payload)

    async def gossip_as_fresh_peer(self, wires: list[bytes]) -> str:
        """Publish a batch whose origin is a brand-new peer id (signed with its own key, as strict
        signing demands) and push it to our mesh as a forwarder. Peer ids are free to make."""
        pair = _fresh_pair()
        msg = _signed_message(pair, encode_batch(wires), os.urandom(8))
        await self.svc.pubsub.push_msg(self.svc.host.get_id(), msg)
        origin = _origin(pair)
        self.fresh_ids.append(origin)
        return origin

    def equivocate(self, *payloads: bytes) -> list:
        """Pubsub messages from one fresh origin, all with the same seqno (so the same message
        id), each carrying its own payload. Send them with svc.router.send_rpc to chosen peers."""
        pair, seqno = _fresh_pair(), os.urandom(8)
        return [_signed_message(pair, data, seqno) for data in payloads]

    # ---- sync ------------------------------------------------------------------------------

    async def push_sync(self, victim: str, wires: list[bytes], *, heads=(), tries: int = 40) -> dict:
        """Run a sync session with `victim` as its initiator and hand it `wires` as our Ops (and
        again whenever it asks for them). Retries while the victim resets us (one session per peer:
        our own P2PService may be in one). Returns what the victim said."""
        for _ in range(tries):
            try:
                return await self._push_once(victim, wires, heads)
            except Exception as exc:  # noqa: BLE001 - reset, refused, not connected yet: retry
                last = exc
            await trio.sleep(0.1)
        raise AssertionError(f"could not run a sync session with {victim[-8:]}: {last!r}")

    async def _push_once(self, victim: str, wires: list[bytes], heads) -> dict:
        from libp2p.peer.id import ID

        by_id = {sha256(w): w for w in wires}
        ours = await self.view(lambda s: (s.heads(), [m.id for m in s.since(0)]))
        bloom = Bloom(len(ours[1]))
        for i in ours[1]:
            bloom.add(i)
        stream = await self.svc.host.new_stream(ID.from_base58(victim), [sync.PROTOCOL])
        got = {"ops": 0, "needs": 0, "done": None}
        try:
            with trio.fail_after(20):
                await write_frame(stream, encode(Hello(sorted(set(ours[0]) | set(heads)), bloom)))
                assert isinstance(decode(await read_frame(stream, MAX_MESSAGE_BYTES)), Hello)
                more = True
                while more:  # its answer to our Hello: whatever our filter says we lack
                    msg = decode(await read_frame(stream, MAX_MESSAGE_BYTES))
                    got["ops"] += len(msg.wires)
                    more = msg.more
                await write_frame(stream, encode(Ops(list(wires), False)))
                while True:
                    msg = decode(await read_frame(stream, MAX_MESSAGE_BYTES))
                    if isinstance(msg, Need):
                        got["needs"] += 1
                        await write_frame(stream, encode(Ops([by_id[i] for i in msg.ids if i in by_id], False)))
                    elif isinstance(msg, Done):
                        got["done"] = msg.ok
                        await write_frame(stream, encode(Done(True)))
                        break
        finally:
            with contextlib.suppress(Exception), trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.close()
        return got


def _fresh_pair():
    from libp2p.crypto.secp256k1 import create_new_key_pair

    return create_new_key_pair(os.urandom(32))


def _origin(pair) -> str:
    from libp2p.peer.id import ID

    return ID.from_pubkey(pair.public_key).to_string()


def _signed_message(pair, data: bytes, seqno: bytes):
    from libp2p.peer.id import ID
    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX

    msg = rpc_pb2.Message(data=data, topicIDs=[TOPIC], from_id=ID.from_pubkey(pair.public_key).to_bytes(),
                          seqno=seqno)
    msg.signature = pair.private_key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
    msg.key = pair.public_key.serialize()
    return msg


async def _connected_both_ways(svc: P2PService, members, timeout: float = 20.0) -> None:
    ids = honest_ids(members)
    with trio.fail_after(timeout):
        while not (ids <= set(svc.connected())
                   and all(svc.peer_id in m.svc.connected() for m in members)
                   and ids <= set(map(str, svc.pubsub.peer_topics.get(TOPIC, ())))
                   and ids <= set(map(str, svc.router.mesh.get(TOPIC, ())))  # publish goes to the mesh
                   and all(svc.peer_id in set(map(str, m.svc.pubsub.peer_topics.get(TOPIC, ()))) for m in members)):
            await trio.sleep(0.05)


@contextlib.asynccontextmanager
async def open_attacker(members, *, secret: bytes = b"\xee" * 32, limits: Limits | None = None):
    """An attacker joined to the fog `members` (connected to each, subscribed to the topic)."""
    node = Node(Store(limits=limits), secret=secret)
    svc = P2PService(node.key, AsyncStore(node.store), P2PSettings(
        listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=[m.svc.addrs()[0] for m in members], sync_interval=600))
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.run)
        await _connected_both_ways(svc, members)
        try:
            yield Attacker(svc, node)
        finally:
            nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def open_member(members, store: Store, *, secret: bytes, i: int, sync_interval: float = 2.0):
    """One more honest member (with a store of our choosing, e.g. a file) joined to `members`."""
    node = Node(store, secret=secret)
    svc = P2PService(node.key, AsyncStore(store), P2PSettings(
        listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=[m.svc.addrs()[0] for m in members], sync_interval=sync_interval))
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.run)
        await _connected_both_ways(svc, members)
        try:
            yield Member(i, svc, node)
        finally:
            nursery.cancel_scope.cancel()


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")
