"""Reaching the fog over libp2p and syncing its state: the peers worth dialing, the probe that
dials them and syncs from the first that answers, and running it under trio."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import trio

from formation.cli.output import EXIT_UNREACHABLE, EXIT_USAGE
from formation.crdt.keys import PrivateKey
from formation.crdt.store import Store
from formation.node import fog
from formation.node.setup import run_trio

from .steps import JoinError

NAME_A_PEER = "give a member's address: --bootstrap /ip4/HOST/tcp/PORT/p2p/PEER_ID"


@dataclass
class Synced:
    peers: list[str]  # peer ids answered
    ops: int  # ops received
    seconds: float


def _short_addrs(addrs: list[str]) -> str:
    shown = ", ".join(addrs[:2])
    return shown + (f" and {len(addrs) - 2} more" if len(addrs) > 2 else "")


async def probe_fog(key: PrivateKey, store: Store, peers: list[str], timeout: float,
                    on_reached: Callable[[list[str], float], None]) -> Synced:
    """Dial `peers` (only them) with the node's own libp2p identity, and sync the state from the
    first that answers: the path every node syncs by (p2p/service.py, p2p/sync.py), every op
    verified. Raises JoinError when none answers within `timeout` seconds, or when the sync
    stops bringing ops for `timeout` seconds before a session completes."""
    from formation.crdt.async_store import AsyncStore
    from formation.p2p.service import P2PService, P2PSettings

    astore = AsyncStore(store)
    p2p = P2PService(key, astore, P2PSettings(
        listen=["/ip4/127.0.0.1/tcp/0"],  # it dials out only; nobody needs to reach it
        sync_interval=3600.0, dial_timeout=min(10.0, float(timeout)), redial_max=2.0))

    async def nobody() -> list[dict]:  # dial the peers given, not the node records of the state
        return []

    p2p.peer_source = nobody
    ids: set[str] = set()
    for addr in peers:
        with contextlib.suppress(Exception):  # a peer id libp2p cannot read: that peer is skipped
            ids.add(p2p.add_peer(addr))
    ids.discard(p2p.peer_id)
    if not ids:
        raise JoinError(f"no usable peer to reach the fog through ({_short_addrs(peers)})",
                        NAME_A_PEER, EXIT_USAGE)
    result: Synced | None = None
    error: JoinError | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(p2p.run)
        try:
            result = await _reach_and_sync(p2p, store, ids, peers, timeout, on_reached)
        except JoinError as exc:
            error = exc
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    assert result is not None
    return result


async def _reach_and_sync(p2p, store: Store, ids: set[str], peers: list[str], timeout: float,
                          on_reached: Callable[[list[str], float], None]) -> Synced:
    t0 = trio.current_time()
    with trio.move_on_after(timeout):
        while not ids & set(p2p.connected()):
            await trio.sleep(0.05)
    reached = sorted(ids & set(p2p.connected()))
    if not reached:
        raise JoinError(f"no peer answered within {timeout:g} s (tried {_short_addrs(peers)})",
                        "check that the fog's node runs and that this host reaches it (address, "
                        "firewall), or give another member with --bootstrap, or wait longer with "
                        "--timeout", EXIT_UNREACHABLE)
    on_reached(reached, trio.current_time() - t0)

    t1 = trio.current_time()
    before = len(store)
    synced = trio.Event()

    def seen(res) -> None:
        if res.ok and res.peer in ids:
            synced.set()

    p2p.on_sync.append(seen)
    try:
        async with trio.open_nursery() as nursery:
            async def attempts() -> None:
                while not synced.is_set():
                    for peer in sorted(ids & set(p2p.connected())):
                        await p2p.sync_with(peer)  # its result reaches `seen` (either direction)
                        if synced.is_set():
                            return
                    await trio.sleep(0.5)

            nursery.start_soon(attempts)
            count, since = len(store), trio.current_time()
            # bounded by progress (a big state may take a while), and in all
            with trio.move_on_after(max(600.0, 30.0 * timeout)):
                while not synced.is_set():
                    with trio.move_on_after(0.2):
                        await synced.wait()
                    if len(store) != count:
                        count, since = len(store), trio.current_time()
                    elif trio.current_time() - since > timeout:
                        break
            nursery.cancel_scope.cancel()
    finally:
        p2p.on_sync.remove(seen)
    if not synced.is_set():
        raise JoinError(f"reached {len(reached)} peer(s) but no sync of the state completed "
                        f"({len(store) - before} ops came, then nothing for {timeout:g} s, or "
                        "it took too long)",
                        "try again, or give another member with --bootstrap", EXIT_UNREACHABLE)
    return Synced(reached, len(store) - before, trio.current_time() - t1)


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """The node's loggers say nothing while the steps print (logging is set up when it runs)."""
    null = logging.NullHandler()
    lg = logging.getLogger("formation")
    lg.addHandler(null)
    try:
        yield
    finally:
        lg.removeHandler(null)


def usable_peers(addrs) -> tuple[list[str], int]:
    """fog.bootstrap_peers, and only those whose peer id libp2p reads (formation.toml's check
    takes any base58 there, and the node would fail at every start on one it cannot read)."""
    import multiaddr
    from libp2p.peer.peerinfo import info_from_p2p_addr

    kept, dropped = fog.bootstrap_peers(addrs)
    readable = []
    for addr in kept:
        try:
            info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception:  # noqa: BLE001 - whatever libp2p raises for it: not a peer to dial
            dropped += 1
            continue
        readable.append(addr)
    return readable, dropped


def sync_from(key: PrivateKey, store: Store, peers: list[str], timeout: float,
              on_reached: Callable[[list[str], float], None] = lambda *_: None) -> Synced:
    """probe_fog run to its end, the node's logs quiet while the steps print."""
    with quiet_logs():
        return run_trio(probe_fog, key, store, peers, timeout, on_reached)
