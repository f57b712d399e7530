"""One node's libp2p presence: host, gossip of ops, sync sessions, and keeping peers connected.

py-libp2p 0.8.1 needs several fixes to deliver a burst of messages (../shared/notes/libp2p.md
§A.3); each is applied in `_libp2p_fixes` or `_router` and named there. Gossip is only the fast
path: every connection starts a sync session, a random peer is synced with periodically, and a
gap (an op whose deps we lack) triggers a sync with the peer that sent it. Correctness comes from
sync; gossip makes it fast. Our own batches travel on the push tree (push.py, plumtree over one
stream per peer); gossipsub stays subscribed and validating, and carries our batches only while
a connected peer has no push stream (an older node).

Over 400 lines because the host, gossip, sync serving and the dialer share one peer table and
one nursery; the protocols themselves are in gossip.py, sync.py and blobs.py.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import coincurve
import multiaddr
import trio

from formation.crdt.async_store import AsyncStore
from formation.crdt.hlc import to_ms
from formation.crdt.keys import PrivateKey, address_of, format_address, sha256

from . import blobs, push, sync
from .gossip import TOPIC, AuthorBudget, Batcher, BatchValidator, encode_batch, pick_hold

log = logging.getLogger("formation.p2p")
BAN_STRIKES = 3  # invalid gossip batches or sync sessions with invalid ops before a peer is cut off
SUBSCRIPTION_QUEUE = 256  # gossip messages validated and waiting for the store (py-libp2p: 32)
RPC_QUEUE = 1024  # RPCs queued to one peer (py-libp2p: 32) ...
RPC_QUEUE_BYTES = 64 * 1024 * 1024  # ... and their bytes
BLOB_SERVES_PER_PEER = 1  # blob answers sent to one peer at once (an honest fetcher asks one at a time)
BLOB_SERVES = 4  # blob answers sent at once in all
GOSSIP_INGEST_MESSAGES = 32  # validated gossip messages taken from the subscription at once
PUSH_INGEST_QUEUE = 64  # verified push batches waiting for the store (then their streams wait)


_fixed = False


def _libp2p_fixes() -> None:
    """py-libp2p's module-level defaults that lose messages, changed once per process."""
    global _fixed
    if _fixed:
        return
    _fixed = True
    import libp2p.pubsub.pubsub as pubsub_mod
    import libp2p.pubsub.rpc_queue as rpc_queue

    # A.3 #2: the subscription channel holds 32 messages and drops the rest with a warning. Our
    # batches are few (one per 50 ms per publisher at most): 256 (the validator's cache of
    # decoded batches) is room for bursts, and a bound on what a flood can make us hold.
    pubsub_mod.SUBSCRIPTION_CHANNEL_SIZE = SUBSCRIPTION_QUEUE
    # A.3 #3: each peer's outbound queue holds 32 RPCs and drops the rest silently. Raised, and
    # bounded in bytes too: a peer that stops reading costs at most RPC_QUEUE_BYTES (what is
    # dropped for it reaches it by IHAVE/IWANT or sync).
    rpc_queue.RpcQueue.__init__.__defaults__ = (RPC_QUEUE, rpc_queue.DefaultMaxMessageSize)
    _bound_rpc_queue_bytes(rpc_queue.RpcQueue)
    # A.3 #7 (found here): a pubsub RPC that does not parse (protobuf DecodeError) escaped
    # Pubsub.stream_handler, which catches only libp2p's own errors, and ended the whole host:
    # any peer could stop a node with one malformed frame. It is a ParseError now: the stream is
    # reset and the peer dropped, as for other unreadable input.
    from google.protobuf.message import DecodeError
    from libp2p.exceptions import ParseError

    read_stream = pubsub_mod.Pubsub.continuously_read_stream

    async def continuously_read_stream(self, stream) -> None:
        try:
            await read_stream(self, stream)
        except DecodeError as exc:
            raise ParseError(f"malformed pubsub RPC: {exc}") from None

    pubsub_mod.Pubsub.continuously_read_stream = continuously_read_stream
    _cheaper_peer_records()
    # yamux sends a WINDOW_UPDATE after every read that did not refill the window (~3 of the 4
    # frames per gossip message were these); without it credit is returned once half the window
    # is consumed, as go-yamux does. Flow control is unchanged. (-10 % of a node's CPU in
    # ../shared/notes/gossip-profile.md)
    import libp2p.stream_muxer.yamux.yamux as yamux_mod

    yamux_mod._yamux_release_on_read = lambda: False
    # libp2p logs every failed dial (including to the 0.0.0.0 listen addresses identify
    # reports) and every closed stream at WARNING/ERROR; our own lines say what matters.
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)


PEER_RECORD_CACHE = 1024  # peers whose last signed peer record we remember as checked


def _cheaper_peer_records() -> None:
    """py-libp2p attaches the host's signed peer record ("senderRecord") to every pubsub RPC it
    sends, rebuilding the address set each time, and checks the signature of the one on every
    RPC it receives, duplicates included (200-250 us each: most of the signature work of a
    node). The record only changes when a peer's addresses do: an RPC carrying the very record
    (same bytes) its peer sent and we checked before is not checked again, and the record we
    send is reused for a second before the addresses are looked at again. A different record
    is checked as before."""
    from collections import OrderedDict

    import libp2p.pubsub.floodsub as floodsub_mod
    import libp2p.pubsub.gossipsub as gossipsub_mod
    import libp2p.pubsub.pubsub as pubsub_mod
    from libp2p.peer.peerstore import env_to_send_in_RPC
    from libp2p.pubsub.utils import maybe_consume_signed_record

    # (our host, peer id) -> (the record of that peer we checked last, when): the peerstore
    # (which keeps it 2 h) hears of it again every 10 min
    checked: OrderedDict[tuple[int, bytes], tuple[bytes, float]] = OrderedDict()

    def consume(msg, host, peer_id) -> bool:
        if not msg.HasField("senderRecord"):
            return True
        key, now = (id(host), peer_id.to_bytes()), time.monotonic()
        hit = checked.get(key)
        if hit is not None and hit[0] == msg.senderRecord and now - hit[1] < 600:
            checked.move_to_end(key)
            return True
        ok = maybe_consume_signed_record(msg, host, peer_id)
        if ok:
            checked[key] = (msg.senderRecord, now)
            checked.move_to_end(key)
            while len(checked) > PEER_RECORD_CACHE:
                checked.popitem(last=False)
        return ok

    sent: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # host -> (when, its record)

    def to_send(host) -> tuple[bytes, bool]:
        now = time.monotonic()
        hit = sent.get(host)
        if hit is not None and now - hit[0] < 1.0:
            return hit[1], False
        record, fresh = env_to_send_in_RPC(host)
        sent[host] = (now, record)
        return record, fresh

    for mod in (pubsub_mod, gossipsub_mod, floodsub_mod):
        mod.maybe_consume_signed_record = consume
        mod.env_to_send_in_RPC = to_send


@dataclass
class P2PSettings:
    listen: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/53333"])
    bootstrap: list[str] = field(default_factory=list)
    heartbeat_interval: int = 1
    gossip_delay: float = 0.01
    # Under load a node flushes its gossip at most every `gossip_fog_window * fog size` seconds
    # (gossip.Batcher), from 50 ms up to `gossip_max_window`: every message costs every node
    # milliseconds of CPU, so the window bounds the fog's message rate (about 1 / this setting
    # messages per second, ~40), and the latency it adds.
    gossip_fog_window: float = 0.025
    gossip_max_window: float = 0.5
    # gossip messages per second the whole fog may publish before every node holds its ops
    # back (up to the window above) to batch them: at ~1-5 ms of CPU per message per node,
    # 20 messages/s is 0.2-1 core over 10 nodes
    gossip_fog_msgs_per_s: float = 20.0
    sync_interval: float = 10.0
    peer_refresh: float = 2.0
    redial_min: float = 0.5
    redial_max: float = 30.0
    dial_timeout: float = 10.0
    gap_grace: float = 1.0  # wait this long for missing deps to arrive by gossip before a sync
    # ... or longer when gossip is slow (twice its recent delay), up to this: under load a sync
    # per gap carried most ops, and verified them again when their gossip copies came
    gap_grace_max: float = 10.0
    # What a peer may cost us in sync (docs/p2p.md, "Sync"): sessions it opens to us at once, all
    # peers' sessions at once, and op bytes we send it (either direction) per window.
    sync_max_sessions_per_peer: int = 1
    sync_max_sessions: int = 8
    sync_budget_bytes: int = 64 * 1024 * 1024
    sync_budget_seconds: float = 60.0
    # ops one author (node key) may have forwarded by gossip per second, after a burst
    # (gossip.AuthorBudget): past it a batch waits for sync, never refused
    author_ops_per_s: float = 100.0
    author_burst: float = 1000.0
    # What the node records can make us dial, and what connections can cost (docs/p2p.md, "Peers"):
    # addresses dialed per peer (a member's own, the first of its record), dials started per
    # second over all peers (a bucket of dial_burst) and at once, and connections kept.
    max_addrs_per_peer: int = 4
    dial_rate: float = 4.0
    dial_burst: int = 16
    max_dials: int = 8
    max_connections: int = 256  # both directions (libp2p's cap; its default is 300)
    max_strangers: int = 32  # connected peers that are neither fog members nor bootstrap peers
    # gossip messages one peer has us hold before they are validated; more are dropped unread
    # (they are not marked seen, so another peer or a sync brings them again)
    gossip_in_flight_per_peer: int = 8
    # Batches travel on the push tree (push.py); gossipsub keeps listening and validating (older
    # nodes, and anyone may publish there), and carries our batches too only when a connected
    # peer has no push stream, or with gossipsub_publish.
    push: bool = True
    gossipsub_publish: bool = False
    push_eager_max: int = 4
    push_ihave_delay: float = 0.5
    push_graft_timeout: float = 0.5
    push_queue_frames: int = 512
    push_queue_bytes: int = 16 * 1024 * 1024


@dataclass
class P2PStats:
    gossip_sent: int = 0
    gossip_received: int = 0
    gossip_rejected: int = 0
    gossip_dropped: int = 0  # not validated: their forwarder had gossip_in_flight_per_peer waiting
    ops_from_gossip: int = 0
    syncs_ok: int = 0
    syncs_failed: int = 0
    syncs_refused: int = 0  # sync streams reset at once: too many sessions, or budget spent
    ops_from_sync: int = 0
    sync_since_ops: int = 0  # ops in the filters of the sessions we ran, in all (bench/gossip.py)
    # what the wire costs (bench/gossip.py): pubsub messages read from peers, every copy counted
    # (before the seen check), their bytes; RPCs written to peers and their bytes
    gossip_copies_in: int = 0
    gossip_bytes_in: int = 0
    rpcs_out: int = 0
    rpc_bytes_out: int = 0
    fog_msgs_per_s: float = 0.0  # gossip messages the fog publishes per second, as seen here
    gossip_hold_ms: float = 0.0  # how long the first op of a batch waits now (Batcher.hold)
    gossip_lag_s: float = 0.0  # from an op's time to its arrival here by gossip, recently (decays)
    # the push tree (push.py); its batch frames count in gossip_copies_in / gossip_bytes_in /
    # gossip_received, its frames written in rpcs_out / rpc_bytes_out
    push_dropped: int = 0  # frames not queued: the peer's queue was full (sync repairs)
    push_prunes: int = 0
    push_grafts: int = 0
    push_grafts_refused: int = 0  # GRAFTs past a peer's rate, ignored
    push_hostile: int = 0  # streams cut: bad framing or an invalid batch


def address_of_peer(peer: str) -> str | None:
    """The node address of a peer: its peer id holds its secp256k1 key (the operator key, see
    P2PService), authenticated by the connection's handshake. None for any other kind of id."""
    from libp2p.peer.id import ID

    try:
        key = ID.from_base58(peer).extract_public_key()
        if key is None or key.get_type().name != "Secp256k1":
            return None
        return format_address(address_of(coincurve.PublicKey(key.to_bytes())))
    except Exception:  # noqa: BLE001 - not an id we can read: no address
        return None


def peer_id_of(key: PrivateKey) -> str:
    from libp2p.crypto.secp256k1 import create_new_key_pair
    from libp2p.peer.id import ID

    return ID.from_pubkey(create_new_key_pair(key.secret).public_key).to_string()


class P2PService:
    def __init__(self, key: PrivateKey, astore: AsyncStore, settings: P2PSettings | None = None):
        _libp2p_fixes()
        from libp2p import new_host
        from libp2p.crypto.secp256k1 import create_new_key_pair
        from libp2p.pubsub.pubsub import Pubsub

        self.settings = settings or P2PSettings()
        self.astore = astore
        # The operator key is the libp2p identity: the peer id and the node address are one key.
        self.host = new_host(key_pair=create_new_key_pair(key.secret),
                             connection_config=_connection_config(self.settings.max_connections))
        # libp2p retries every address of a dial 3 more times at once; our dialer retries on its
        # own schedule (back-off per address, a rate over all peers): one connection per dial
        self.host.get_network().retry_config.max_retries = 0
        # py-libp2p's auto-connector dials up to 200 peers from the peerstore every 30 s, to
        # reach a watermark meant for the public DHT. It would also redial peers we cut off.
        # Our dialer keeps exactly the peers of the fog connected.
        self.host.get_network().auto_connector.maybe_connect = _no_auto_connect
        self.host.get_network().register_notifee(_Gate(self))
        self.router = self._router()
        # Message ids from content, not py-libp2p's (origin, seqno): its validation cache is keyed
        # by the id, so a publisher that sends an invalid payload to one peer and a valid one
        # under the same seqno to another made the first count the second's honest forward as
        # invalid and score it down (tests/p2p/test_attacks.py).
        # Validation runs in a worker thread, a batch at a time, taken in turn per forwarder
        # (gossip.BatchValidator), behind a bound per forwarder (_push_msg): a batch may wait its
        # turn longer than py-libp2p's 5 s, and a timeout counts as invalid against an honest
        # forwarder; its cap of 10 validators at once would let one flooder hold every slot.
        self.pubsub = Pubsub(self.host, self.router, strict_signing=True, msg_id_constructor=_content_msg_id,
                             validation_timeout=VALIDATION_TIMEOUT, max_concurrent_validator_count=100_000)
        self._in_flight: Counter[str] = Counter()  # gossip messages held per forwarder, unvalidated
        self._pushing: dict[bytes, trio.Event] = {}  # message ids being validated
        self._push_msg = self.pubsub.push_msg
        self.pubsub.push_msg = self._bounded_push_msg  # what its stream readers start per message
        self._write_msg = self.pubsub.write_msg
        self.pubsub.write_msg = self._counted_write_msg
        # A.3 #5: seqno seeded in whole seconds silences a restarted publisher; use nanoseconds.
        self.pubsub.counter = time.time_ns()
        self.peer_id = self.host.get_id().to_string()
        # Membership tests on the store's dicts from the event loop are safe under the GIL, and
        # let the validator skip verifying ops we already hold, applied or pending (copies of a
        # pending op come with every forwarder while it waits for its deps).
        self.validator = BatchValidator(self.host.get_id().to_bytes(), known=astore.store.holds,
                                        authors=AuthorBudget(self.settings.author_ops_per_s,
                                                             self.settings.author_burst))
        self.validator.proof_strikes = BAN_STRIKES
        self.push: push.PushRouter | None = None
        if self.settings.push:
            s = self.settings
            self.push = push.PushRouter(
                self.host, self.validator, None, self._push_deliver,
                lambda p: p not in self.blocked and p not in self.banned,
                push.PushLimits(eager_max=s.push_eager_max, ihave_delay=s.push_ihave_delay,
                                graft_timeout=s.push_graft_timeout, queue_frames=s.push_queue_frames,
                                queue_bytes=s.push_queue_bytes),
                lambda: self._push_send.statistics().current_buffer_used > 0)
            # ops verified on the push path and on their way to the store are not checked again
            # when a copy comes (by push or gossipsub) before they land
            holds, inflight = astore.store.holds, self.push.inflight
            self.validator.known = lambda h: h in inflight or holds(h)
        self._push_send, self._push_recv = trio.open_memory_channel(PUSH_INGEST_QUEUE)
        self.batcher = Batcher(self.settings.gossip_delay)
        self._size_gossip_window(1)
        self.stats = P2PStats()
        if self.push is not None:
            self.push.stats = self.stats
        self.blocked: set[str] = set()  # peers we neither dial nor keep (partition tests, bans)
        self.banned: set[str] = set()
        self.on_sync: list[Callable[[sync.SyncResult], None]] = []
        # the node records whose peers to dial (set by the node: its fog's members); None: all
        self.peer_source: Callable[[], Awaitable[list[dict]]] | None = None
        # what this node hands out on /formation/blob/1 (set by the node; None serves nothing)
        self.blob_provider: blobs.Provider | None = None
        self._blob_serving: Counter[str] = Counter()  # blob answers being sent, by peer
        self._syncing: set[str] = set()  # peers we are running a session with (we asked)
        self._serving: Counter[str] = Counter()  # sessions peers asked us for, by peer
        self.sync_budget = sync.ServeBudget(self.settings.sync_budget_bytes, self.settings.sync_budget_seconds)
        self._known: dict[str, list[str]] = {}  # peer id -> multiaddrs to dial it at (the two below)
        self._pinned: dict[str, list[str]] = {}  # bootstrap peers and add_peer: whatever the state says
        self._members: dict[str, list[str]] = {}  # from the node records (peer_source), each refresh
        self._next_dial: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._addr_next: dict[str, float] = {}  # per address: not dialed again before
        self._addr_backoff: dict[str, float] = {}
        self._dialing: set[str] = set()  # peers being dialed now
        self._dial_tokens = float(self.settings.dial_burst)
        self._dial_tokens_at = 0.0
        self._want_sync: trio.MemorySendChannel | None = None
        self._gap_check_scheduled = False
        self._store_errors = 0  # batches the store failed to take (disk full, I/O error, a bug)
        self._fog_msgs = 0.0  # gossip messages published in the fog per second, recently (seen here)
        self._fog_msgs_count = (0, 0.0)
        self._own_ops = 0.0  # ops this node wrote per second, recently
        self._own_ops_count = 0
        self._nursery: trio.Nursery | None = None

    def _router(self):
        from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
        from libp2p.pubsub.score import ScoreParams, TopicScoreParams

        # A.3 #9: in py-libp2p the weight of invalid messages is positive (subtracted).
        # One invalid batch takes a peer below the publish threshold; a few more, the graylist.
        score = ScoreParams(
            p4_invalid_messages=TopicScoreParams(weight=10.0, cap=100.0, decay=0.99),
            publish_threshold=-5.0, gossip_threshold=-5.0, graylist_threshold=-20.0,
        )
        return GossipSub(
            # v1.1: v1.2's IDONTWANT costs ~8 % of a node's CPU (an extra control message to every
            # mesh peer for every message) and buys little at our message sizes.
            protocols=[PROTOCOL_ID_V11, PROTOCOL_ID],
            # A fog is small, and every copy of a message costs its receiver a parse, a seen
            # check and the scheduling of a task: with D=3 (2..4) a node read 1.5-2.0 copies of
            # each message at 10 nodes (bench/gossip.py), 1.8-3.1 with D=4 (3..8); IHAVE gossip,
            # the periodic sync and gap syncs cover what a thin mesh misses.
            degree=3, degree_low=2, degree_high=4,
            heartbeat_interval=self.settings.heartbeat_interval,  # default is 120 s
            spam_protection_enabled=False,  # A.3 #1: 10 msg/s per forwarder, then silent drops
            adaptive_gossip_enabled=False,  # A.3 #4: stretches the heartbeat to 30-60 s
            score_params=score,
        )

    # ---- public --------------------------------------------------------------------------

    def addrs(self) -> list[str]:
        return [str(a) for a in self.host.get_addrs()]

    def connected(self) -> list[str]:
        return sorted(p.to_string() for p in self.host.get_connected_peers())

    def publish(self, wire: bytes) -> None:
        """Queue a locally accepted op for gossip (batched)."""
        self.batcher.add(wire)

    def request_sync(self, peer: str | None = None) -> None:
        """Ask for a sync session soon, with `peer` or with a random connected peer."""
        if self._want_sync is not None:
            try:
                self._want_sync.send_nowait(peer)
            except trio.WouldBlock:
                pass  # plenty already queued

    def add_peer(self, addr: str) -> str:
        """Remember a peer to keep connected to (full multiaddr with /p2p/ID)."""
        from libp2p.peer.peerinfo import info_from_p2p_addr

        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        pid = info.peer_id.to_string()
        if pid != self.peer_id:
            addrs = self._pinned.setdefault(pid, [])
            if addr not in addrs and len(addrs) < self.settings.max_addrs_per_peer:
                addrs.append(addr)
            self._known = _merged(self._pinned, self._members)
        return pid

    async def block(self, peer: str) -> None:
        """Cut a peer off and stop redialing it."""
        self.blocked.add(peer)
        await self._disconnect(peer)

    def unblock(self, peer: str) -> None:
        self.blocked.discard(peer)
        self._next_dial.pop(peer, None)
        self._backoff.pop(peer, None)

    async def sync_with(self, peer: str) -> sync.SyncResult | None:
        """Run one sync session with a connected peer now; None if it could not run."""
        from libp2p.peer.id import ID

        if peer in self._syncing or peer in self.blocked:
            return None
        if not self.sync_budget.allows(peer):
            # its Hello would be refused anyway; a peer can make us start sessions (gaps)
            self.stats.syncs_refused += 1
            return None
        self._syncing.add(peer)
        try:
            stream = await self.host.new_stream(ID.from_base58(peer), [sync.PROTOCOL])
            result = await sync.run_session(stream, self.astore, peer, self.sync_budget)
        except Exception as exc:  # noqa: BLE001 - any network or protocol failure ends the session
            self.stats.syncs_failed += 1
            log.info("sync with %s failed: %s", peer[-8:], _why(exc))
            return None
        finally:
            self._syncing.discard(peer)
        self._count(result)
        return result

    # ---- running -------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from libp2p.tools.anyio_service import background_trio_service

        listen = [multiaddr.Multiaddr(a) for a in self.settings.listen]
        for addr in self.settings.bootstrap:
            self.add_peer(addr)
        want_send, want_recv = trio.open_memory_channel(256)
        self._want_sync = want_send
        async with self.host.run(listen_addrs=listen):
            # A.3 #6: start pubsub before dialing anyone (new_host(bootstrap=...) crashes it).
            async with background_trio_service(self.pubsub), background_trio_service(self.router):
                await self.pubsub.wait_until_ready()
                self.pubsub.set_topic_validator(TOPIC, self.validator.validate, True)
                sub = await self.pubsub.subscribe(TOPIC)
                self.host.set_stream_handler(sync.PROTOCOL, self._serve_sync)
                self.host.set_stream_handler(blobs.PROTOCOL, self._serve_blob)
                try:
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        nursery.start_soon(self._gossip_out)
                        nursery.start_soon(self._gossip_in, sub)
                        nursery.start_soon(self._dialer)
                        if self.push is not None:
                            await nursery.start(self.push.run)
                            nursery.start_soon(self._push_in)
                        nursery.start_soon(self._sync_loop, want_recv)
                        task_status.started(self)
                finally:
                    self._nursery = None
                    with trio.move_on_after(2) as cs:
                        cs.shield = True
                        await self._flush_gossip()
                        # py-libp2p leaves the connections open past the host's end: a process
                        # that runs the service again under the same peer id (form join, then
                        # the node) would leave its peers writing into the dead ones
                        await self._close_connections()

    async def _bounded_push_msg(self, forwarder, msg) -> None:
        """py-libp2p starts a task per gossip message as it reads it, with no bound: at most
        gossip_in_flight_per_peer of a forwarder's messages are held (validated, or waiting to
        be); past that, its messages are dropped before any work is spent on them."""
        peer = forwarder.to_string() if hasattr(forwarder, "to_string") else str(forwarder)
        if peer == self.peer_id:
            await self._push_msg(forwarder, msg)  # our own publishes
            return
        self.stats.gossip_copies_in += 1
        self.stats.gossip_bytes_in += msg.ByteSize()
        if self._in_flight[peer] >= self.settings.gossip_in_flight_per_peer:
            self.stats.gossip_dropped += 1
            return
        self._in_flight[peer] += 1
        try:
            # One message from several forwarders at once: py-libp2p checks "seen" before it
            # validates and marks it after, so each copy was validated, delivered and forwarded.
            # A copy waits for the first to be done, and is then seen (or known invalid).
            mid = _content_msg_id(msg)
            first = self._pushing.get(mid)
            if first is not None:
                await first.wait()
                await self._push_msg(forwarder, msg)
                return
            self._pushing[mid] = done = trio.Event()
            try:
                await self._push_msg(forwarder, msg)
            finally:
                del self._pushing[mid]
                done.set()
        finally:
            self._in_flight[peer] -= 1
            if not self._in_flight[peer]:
                del self._in_flight[peer]

    async def _counted_write_msg(self, stream, rpc) -> bool:
        self.stats.rpcs_out += 1
        self.stats.rpc_bytes_out += rpc.ByteSize()
        return await self._write_msg(stream, rpc)

    async def _gossip_out(self) -> None:
        while True:
            batches = await self.batcher.next_batches()
            await self._publish_batches(batches)

    async def _flush_gossip(self) -> None:
        await self._publish_batches(self.batcher.take_all())

    async def _publish_batches(self, batches: list[list[bytes]]) -> None:
        # gossipsub as well when a peer cannot take pushes: an older node, or its stream is
        # not open yet (a new connection: the sync it starts covers the moment)
        pubsub = (self.push is None or self.settings.gossipsub_publish
                  or self.push.lacking(set(self.connected()) - self.blocked))
        for batch in batches:
            data = encode_batch(batch)
            if self.push is not None:
                self.push.publish(data)
                self.stats.gossip_sent += 1
            if not pubsub:
                continue
            try:
                await self.pubsub.publish(TOPIC, data)
                if self.push is None:
                    self.stats.gossip_sent += 1
            except Exception as exc:  # noqa: BLE001 - sync will carry these ops instead
                log.warning("gossip publish failed (%s); sync will deliver these ops", _why(exc))

    async def _gossip_in(self, sub) -> None:
        own = self.host.get_id().to_bytes()
        while True:
            # Under load several validated messages wait here: a run of them from one publisher
            # goes to the store in one call (one thread hop, one commit)
            msgs = [await sub.get()]
            while len(msgs) < GOSSIP_INGEST_MESSAGES:
                try:
                    msgs.append(sub.receive_channel.receive_nowait())
                except (trio.WouldBlock, AttributeError):
                    break
            groups: list[tuple[str, list]] = []  # (publisher, its ops), in arrival order
            for msg in msgs:
                if msg.from_id == own:
                    continue
                self.stats.gossip_received += 1
                try:
                    ops = self.validator.take(msg.data)
                except ValueError:
                    self.stats.gossip_rejected += 1
                    continue
                source = _peer_str(msg.from_id)
                if source in self.banned:
                    continue
                if groups and groups[-1][0] == source:
                    groups[-1] = (source, groups[-1][1] + list(ops))
                else:
                    groups.append((source, list(ops)))
            for source, ops in groups:
                await self._ingest(source, ops, publisher=source)

    async def _push_deliver(self, peer: str, ops: list) -> None:
        await self._push_send.send((peer, ops))

    async def _push_in(self) -> None:
        """Verified push batches to the store; a run of them from one peer in one call."""
        while True:
            items = [await self._push_recv.receive()]
            while len(items) < GOSSIP_INGEST_MESSAGES:
                try:
                    items.append(self._push_recv.receive_nowait())
                except trio.WouldBlock:
                    break
            groups: list[tuple[str, list]] = []
            for peer, ops in items:
                if groups and groups[-1][0] == peer:
                    groups[-1][1].extend(ops)
                else:
                    groups.append((peer, list(ops)))
            for peer, ops in groups:
                try:
                    await self._ingest(peer, ops, publisher=None)
                finally:
                    self.push.done(ops)

    async def _ingest(self, source: str, ops: list, *, publisher: str | None) -> None:
        """Ops verified on a gossip path to the store. `publisher`: the gossipsub origin; None
        for the push tree, which forwards batches as they are (their origin is unsigned)."""
        newest = max((getattr(op, "hlc", 0) for op in ops), default=0)
        if newest:  # how late gossip is (the gap grace follows it)
            lag = max(0.0, time.time() - to_ms(newest) / 1000)
            self.stats.gossip_lag_s = round(max(lag, 0.9 * self.stats.gossip_lag_s), 3)
        try:
            res = await self.astore.ingest_ops(ops, source=source)
        except Exception as exc:  # noqa: BLE001 - one batch the store could not take
            # must not end the node: these ops come again by sync once the store recovers
            self._store_errors += 1
            log.error("store error #%d ingesting %d gossiped op(s) from %s (sync will bring them "
                      "again): %s", self._store_errors, len(ops), source[-8:], _why(exc),
                      exc_info=self._store_errors == 1)
            return
        self.stats.ops_from_gossip += len(res.accepted)
        if res.rejected:
            # Honest nodes gossip only ops their own store accepted, and validity is the same
            # everywhere: the publisher (not the forwarder) is at fault; on the push tree, the
            # author of each rejected op, when it is a connected peer (a forwarder checks form
            # and signatures, not the rules, before it forwards, as gossipsub's do).
            for peer in ([publisher] if publisher is not None else self._authors_of(res.rejected, ops)):
                self.validator.strikes[peer] += 1
            log.info("rejected %d op(s) from %s: %s", len(res.rejected), source[-8:],
                     res.rejected[0].detail)
        if res.pending and not self._gap_check_scheduled and self._nursery is not None:
            # Usually the missing deps are other gossip still in flight: give them a moment
            # before paying for a sync session.
            self._gap_check_scheduled = True
            self._nursery.start_soon(self._check_gap, source)

    def _authors_of(self, rejected: list, ops: list) -> set[str]:
        """The connected peers whose node keys signed the rejected ops."""
        ids = {r.id for r in rejected}
        authors = {format_address(op.author).lower() for op in ops if op.id in ids}
        return {p for p in self.connected() if (_address_of(p) or "").lower() in authors}

    async def _check_gap(self, source: str) -> None:
        try:
            s = self.settings
            await trio.sleep(max(s.gap_grace, min(s.gap_grace_max, 2 * self.stats.gossip_lag_s)))
            missing = await self.astore.missing(1)
            if missing:
                self.request_sync(source if source in self.connected() else None)
        finally:
            self._gap_check_scheduled = False

    async def _serve_sync(self, stream) -> None:
        peer = stream.muxed_conn.peer_id.to_string()
        s = self.settings
        if peer in self.blocked:
            await stream.reset()
            return
        # An honest peer runs one session with us at a time (sync_with); more streams are an
        # attempt to multiply what we read, verify and send for it. Check the budget last: it logs.
        if (self._serving[peer] >= s.sync_max_sessions_per_peer
                or self._serving.total() >= s.sync_max_sessions or not self.sync_budget.allows(peer)):
            self.stats.syncs_refused += 1
            log.debug("refused a sync session from %s (%d running)", peer[-8:], self._serving.total())
            await stream.reset()
            return
        self._serving[peer] += 1
        try:
            result = await sync.run_session(stream, self.astore, peer, self.sync_budget)
        except Exception as exc:  # noqa: BLE001
            self.stats.syncs_failed += 1
            log.info("sync served to %s failed: %s", peer[-8:], _why(exc))
            return
        finally:
            self._serving[peer] -= 1
            if not self._serving[peer]:
                del self._serving[peer]
        self._count(result)

    async def _serve_blob(self, stream) -> None:
        """One blob request. The provider decides who may have what, from the asker's node
        address (its key is its peer id); at most BLOB_SERVES_PER_PEER answers per peer and
        BLOB_SERVES in all are sent at once, each from disk a chunk at a time."""
        peer = stream.muxed_conn.peer_id.to_string()
        if (peer in self.blocked or self.blob_provider is None
                or self._blob_serving[peer] >= BLOB_SERVES_PER_PEER or self._blob_serving.total() >= BLOB_SERVES):
            await stream.reset()
            return
        self._blob_serving[peer] += 1
        try:
            await blobs.serve(stream, self.blob_provider, address_of_peer(peer))
        except Exception as exc:  # noqa: BLE001 - a failed answer only ends this stream
            log.info("blob served to %s failed: %s", peer[-8:], _why(exc))
        finally:
            self._blob_serving[peer] -= 1
            if not self._blob_serving[peer]:
                del self._blob_serving[peer]

    async def fetch_blob(self, peer: str, name: str, limit: int) -> bytes | None:
        """The blob `name` from a connected peer; None if it has none or could not answer."""
        from libp2p.peer.id import ID

        if peer in self.blocked:
            return None
        try:
            stream = await self.host.new_stream(ID.from_base58(peer), [blobs.PROTOCOL])
            try:
                return await blobs.fetch(stream, name, limit)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await stream.close()
        except blobs.Refused as exc:
            log.info("%s refused us %s: %s", peer[-8:], name, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - any failure: this peer cannot give it
            log.info("fetching %s from %s failed: %s", name, peer[-8:], _why(exc))
            return None

    def _count(self, result: sync.SyncResult) -> None:
        if result.rejected:
            # A store only serves ops it accepted, so an honest peer's sync never holds these.
            self.validator.strikes[result.peer] += 1
        if result.ok:
            self.stats.syncs_ok += 1
        else:
            self.stats.syncs_failed += 1
        self.stats.ops_from_sync += result.ops_accepted
        self.stats.sync_since_ops += result.since_ops
        for cb in self.on_sync:
            cb(result)

    async def _sync_loop(self, want_recv) -> None:
        """Runs requested syncs; syncs with a random peer when none was asked for a while."""
        while True:
            peer = None
            with trio.move_on_after(self.settings.sync_interval):
                peer = await want_recv.receive()
            if peer is None:
                peer = self._random_peer()
            if peer is not None and self._nursery is not None:
                self._nursery.start_soon(self.sync_with, peer)

    def _random_peer(self) -> str | None:
        peers = [p for p in self.connected() if p not in self.blocked]
        return random.choice(peers) if peers else None

    async def _dialer(self) -> None:
        """Keep every known peer connected: redial with backoff (py-libp2p never redials)."""
        from libp2p.peer.id import ID

        seen: set[str] = set()
        next_refresh = 0.0
        while True:
            now = trio.current_time()
            if now >= next_refresh:
                await self._learn_peers_from_state()
                next_refresh = now + self.settings.peer_refresh
            for peer, strikes in self.validator.strikes.items():
                if strikes >= BAN_STRIKES and peer not in self.banned:
                    self.banned.add(peer)
                    log.warning("banning peer %s: %d invalid gossip batches or sync sessions",
                                peer, strikes)
                    with contextlib.suppress(Exception):  # not a peer id libp2p reads: nothing to drop
                        # what it publishes or forwards is dropped before any validation
                        self.pubsub.add_to_blacklist(ID.from_base58(peer))
                    await self.block(peer)
            connected = set(self.connected())
            if self.push is not None:
                self.push.maintain(connected - self.blocked)
            self._size_gossip_window(len(connected - self.blocked) + 1)
            self._pace_gossip(now)
            for peer in connected & self.blocked:
                await self._disconnect(peer)
            for peer in connected - seen - self.blocked:
                # A fresh connection (either direction) starts with a sync; the lower id asks,
                # so the pair does not run two sessions for one connection.
                if self.peer_id < peer:
                    self.request_sync(peer)
            seen = connected
            self._dial_due(now, connected)
            await trio.sleep(0.25)

    def _size_gossip_window(self, fog_size: int) -> None:
        s = self.settings
        self.batcher.max_interval = max(self.batcher.min_interval,
                                        min(s.gossip_max_window, s.gossip_fog_window * fog_size))

    def _pace_gossip(self, now: float) -> None:
        """Every node sees (nearly) every message: from the fog's message rate and this node's
        own write rate, how long its first op waits for company (gossip.pick_hold)."""
        count = self.stats.gossip_received + self.stats.gossip_sent
        last, at = self._fog_msgs_count
        if now - at >= 0.5:
            rate = (count - last) / (now - at) if at else 0.0
            own = (self.batcher.added - self._own_ops_count) / (now - at) if at else 0.0
            self._fog_msgs = 0.5 * self._fog_msgs + 0.5 * rate
            self._own_ops = 0.5 * self._own_ops + 0.5 * own
            self._fog_msgs_count, self._own_ops_count = (count, now), self.batcher.added
            b = self.batcher
            b.hold = pick_hold(b.max_interval, self._fog_msgs, self.settings.gossip_fog_msgs_per_s, self._own_ops)
            self.stats.fog_msgs_per_s = round(self._fog_msgs, 1)
            self.stats.gossip_hold_ms = round(1000 * b.hold, 1)

    def _dial_due(self, now: float, connected: set[str]) -> None:
        """Start the dials that are due, the longest-waiting first, within the dial budget: at
        most `max_dials` at once and `dial_rate` per second (a bucket of `dial_burst`), one
        address per dial. However many addresses the records name, that is what we dial."""
        s = self.settings
        self._dial_tokens = min(float(s.dial_burst), self._dial_tokens + (now - self._dial_tokens_at) * s.dial_rate)
        self._dial_tokens_at = now
        due = sorted((self._next_dial.get(p, 0.0), p) for p in self._known
                     if p not in connected and p not in self.blocked and p not in self._dialing
                     and now >= self._next_dial.get(p, 0.0))
        for _, peer in due:
            if len(self._dialing) >= s.max_dials or self._dial_tokens < 1:
                break
            self._dial_tokens -= 1
            self._dialing.add(peer)
            self._nursery.start_soon(self._dial, peer, list(self._known[peer]))

    async def _dial(self, peer: str, addrs: list[str]) -> None:
        """Dial one of the peer's addresses: the one due first. Each failure doubles the back-off
        of that address and of the peer (from redial_min to redial_max; a success resets them):
        the peer is dialed again after its back-off, at its address due first."""
        from libp2p.peer.peerinfo import info_from_p2p_addr

        addr = min(addrs, key=lambda a: self._addr_next.get(a, 0.0))  # ties: the record's order
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
            # libp2p dials what its peerstore holds for the peer (what identify reported too) and
            # refuses, for a minute, a peer whose addresses all failed: we dial this one address
            self.host.get_peerstore().clear_addrs(info.peer_id)
            with contextlib.suppress(Exception):
                self.host.get_network()._negative_peer_cache.evict(peer)
            with trio.fail_after(self.settings.dial_timeout):
                await self.host.connect(info)
        except Exception as exc:  # noqa: BLE001 - unreachable peers are normal; back off
            s, now = self.settings, trio.current_time()

            def doubled(back: float) -> float:
                return min(s.redial_max, max(s.redial_min, 2 * back))

            self._addr_backoff[addr] = doubled(self._addr_backoff.get(addr, 0))
            self._addr_next[addr] = now + self._addr_backoff[addr]
            # the peer backs off too, whichever address failed: its addresses are tried in turn,
            # not all at once, so a record naming four dead addresses costs what one does
            self._backoff[peer] = doubled(self._backoff.get(peer, 0))
            self._next_dial[peer] = max(now + self._backoff[peer], min(self._addr_next.get(a, 0.0) for a in addrs))
            log.debug("dial %s at %s failed (%s); next try in %.1f s", peer[-8:], addr, _why(exc),
                      self._next_dial[peer] - now)
            return
        finally:
            self._dialing.discard(peer)
        for a in addrs:
            self._addr_backoff.pop(a, None)
            self._addr_next.pop(a, None)
        self._backoff.pop(peer, None)
        self._next_dial.pop(peer, None)
        log.info("connected to %s", peer[-8:])

    async def _learn_peers_from_state(self) -> None:
        """Node records carry their multiaddrs: the nodes `peer_source` names (the node gives the
        fog's admitted members: a record anyone signs must not make us dial where it says) are
        peers to keep; without a source, every node record. A record is dialed only at addresses
        of its own node (the /p2p/ id holds its key, which signs the record), at most
        `max_addrs_per_peer` of them; a peer no record names any more is no longer dialed."""
        if self.peer_source is not None:
            nodes = await self.peer_source()
        else:
            nodes = await self.astore.list("node", limit=10_000)
        members: dict[str, list[str]] = {}
        for rec in nodes:
            for addr in rec.get("multiaddrs", []):
                pid = _p2p_id(addr)
                if pid is None or pid == self.peer_id or _address_of(pid) != str(rec.get("address")).lower():
                    continue  # malformed, ourselves, or another node's id: not this record's to name
                addrs = members.setdefault(pid, [])
                if addr not in addrs and len(addrs) < self.settings.max_addrs_per_peer:
                    addrs.append(addr)
        self._members = members
        self._known = _merged(self._pinned, members)
        dialed = {a for addrs in self._known.values() for a in addrs}
        for table in (self._addr_next, self._addr_backoff):
            for a in [a for a in table if a not in dialed]:
                del table[a]
        for table in (self._next_dial, self._backoff):
            for p in [p for p in table if p not in self._known]:
                del table[p]

    def strangers(self) -> set[str]:
        """Connected peers that are neither fog members nor peers we were given to dial."""
        return set(self.connected()) - set(self._known)

    async def _close_connections(self) -> None:
        """Close every connection's socket. By the time the service ends, cancellation has
        marked py-libp2p's connections closed without closing their muxers (0.8.1), so its own
        close_peer skips them; close the muxer (GO_AWAY, then the socket) directly."""
        network = self.host.get_network()
        for conns in list(network.connections.values()):
            for conn in list(conns):
                with contextlib.suppress(Exception):  # already gone: nothing to close
                    if not conn.muxed_conn.is_closed:
                        await conn.muxed_conn.close()

    async def _disconnect(self, peer: str) -> None:
        from libp2p.peer.id import ID

        try:
            await self.host.disconnect(ID.from_base58(peer))
        except Exception:  # noqa: BLE001 - already gone
            pass


class _Gate:
    """Drops a connection from a blocked or banned peer as soon as it is made (either way)."""

    def __init__(self, svc: P2PService):
        self.svc = svc

    async def connected(self, network, conn) -> None:
        svc = self.svc
        peer = conn.muxed_conn.peer_id.to_string()
        if svc._nursery is None:
            return
        if peer in svc.blocked:
            svc._nursery.start_soon(svc._disconnect, peer)
        elif peer not in svc._known and len(svc.strangers()) > svc.settings.max_strangers:
            # a joining node syncs as a stranger until its records arrive; strangers past the
            # cap (fresh peer ids are free to make) are dropped, members always have room
            log.info("dropping a connection from %s: %d strangers connected already", peer[-8:],
                     svc.settings.max_strangers)
            svc._nursery.start_soon(svc._disconnect, peer)
        elif svc.push is not None:
            svc.push.connected(peer)

    async def opened_stream(self, network, stream) -> None:
        pass

    async def closed_stream(self, network, stream) -> None:
        pass

    async def disconnected(self, network, conn) -> None:
        pass

    async def listen(self, network, multiaddr) -> None:
        pass

    async def listen_close(self, network, multiaddr) -> None:
        pass


VALIDATION_TIMEOUT = 120.0  # seconds a gossip batch may take to be validated, waiting included


def _bound_rpc_queue_bytes(cls) -> None:
    """RpcQueue.push refuses an RPC that would take the queue past RPC_QUEUE_BYTES (one RPC
    alone is always taken; py-libp2p drops a refused RPC as it does when the count is full)."""
    push, pop = cls.push, cls.pop

    def bounded_push(self, rpc, priority: bool = False) -> bool:
        size = rpc.ByteSize()
        held = getattr(self, "_formation_bytes", 0)
        if held and held + size > RPC_QUEUE_BYTES:
            return False
        ok = push(self, rpc, priority)
        if ok:
            self._formation_bytes = held + size
        return ok

    async def bounded_pop(self):
        rpc = await pop(self)
        if rpc is not None:
            self._formation_bytes = max(0, getattr(self, "_formation_bytes", 0) - rpc.ByteSize())
        return rpc

    cls.push, cls.pop = bounded_push, bounded_pop


def _connection_config(max_connections: int):
    from libp2p.network.config import ConnectionConfig

    # the pruner (above high_watermark, down towards low_watermark) picks by libp2p's own tags,
    # not by membership: only the cap applies, and our gate (_Gate) decides whom to drop
    return ConnectionConfig(max_connections=max_connections, min_connections=0,
                            low_watermark=max_connections, high_watermark=max_connections)


def _merged(*tables: dict[str, list[str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for table in tables:
        for pid, addrs in table.items():
            out.setdefault(pid, [])
            out[pid] += [a for a in addrs if a not in out[pid]]
    return out


@functools.lru_cache(maxsize=4096)
def _p2p_id(addr: str) -> str | None:
    """The peer id of a full multiaddr (.../p2p/ID); None if it is not one."""
    from libp2p.peer.peerinfo import info_from_p2p_addr

    if "/p2p/" not in addr:
        return None
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(addr)).peer_id.to_string()
    except Exception:  # noqa: BLE001 - a malformed address in someone's record
        return None


@functools.lru_cache(maxsize=4096)
def _address_of(peer: str) -> str | None:
    return address_of_peer(peer)


def _content_msg_id(msg) -> bytes:
    return sha256(bytes(msg.from_id) + bytes(msg.data))


async def _no_auto_connect() -> None:
    return None


def _peer_str(raw: bytes) -> str:
    from libp2p.peer.id import ID

    try:
        return ID(raw).to_string()
    except Exception:  # noqa: BLE001
        return raw.hex()


def _why(exc: BaseException) -> str:
    """The innermost useful error: unwraps exception groups and causes."""
    while True:
        if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        elif exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            break
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
