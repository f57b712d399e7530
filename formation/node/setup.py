"""Bringing a node up: data directory, operator key, state store, identity."""

from __future__ import annotations

import dataclasses
import logging
import signal
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from formation.crdt.keys import PrivateKey, to_checksum
from formation.crdt.store import Limits, LogFormatError, Store
from formation.keystore import create_keystore, load_keystore, resolve_password
from formation.node.config import Config

if TYPE_CHECKING:
    from .runtime import NodeRuntime

log = logging.getLogger("formation.node")


class NodeError(Exception):
    """A runtime failure outside config and keystore (data dir, state store)."""


# ---- the node ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeIdentity:
    address: str  # EIP-55 checksummed
    data_dir: str
    ops: int
    heads: int
    state_hash: str  # full hex
    created_key: bool  # True when this run made the operator key

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def ensure_data_dir(config: Config) -> Path:
    path = config.data_dir
    try:
        # 0700: the directory holds the keystore and the whole state of the node.
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise NodeError(f"data directory {path} exists but is not a directory") from None
    except OSError as exc:
        raise NodeError(f"cannot create data directory {path}: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise NodeError(f"data directory {path} exists but is not a directory")
    return path


def unlock_operator_key(config: Config, *, interactive: bool = True) -> tuple[PrivateKey, bool]:
    """Load the operator key, or create it on first run. Returns (key, created)."""
    path = config.keystore_path
    if path.exists():
        password = resolve_password(config.node.password_file, prompt=interactive, confirm=False)
        return load_keystore(path, password), False
    # First run: confirm, since a mistyped password here locks the operator out for good.
    password = resolve_password(config.node.password_file, prompt=interactive, confirm=True)
    return create_keystore(path, password), True


def open_store(config: Config) -> Store:
    path = config.state_path
    limits = Limits(
        pending_ops_per_source=config.store.pending_ops_per_source,
        pending_bytes_per_source=config.store.pending_bytes_per_source,
    )
    try:
        return Store(str(path), limits=limits, synchronous=config.store.synchronous)
    except (sqlite3.Error, OSError) as exc:
        raise NodeError(f"cannot open state store {path}: {exc}") from None
    except LogFormatError as exc:
        raise NodeError(str(exc)) from None


def identity(config: Config, key: PrivateKey, store: Store, *, created_key: bool) -> NodeIdentity:
    return NodeIdentity(
        address=to_checksum(key.address),
        data_dir=str(config.data_dir),
        ops=len(store),
        heads=len(store.heads()),
        state_hash=store.state_hash().hex(),
        created_key=created_key,
    )


def run_node(config: Config, *, interactive: bool = True, once: bool = False,
             on_ready: Callable[[NodeIdentity], None] | None = None) -> NodeIdentity:
    """Bring the node up and report who it is; unless `once`, serve until SIGINT/SIGTERM.

    `on_ready` gets the identity as soon as the key and state are open (before the network
    starts), so the operator sees who the node is even if the network takes a while.
    """
    ensure_data_dir(config)
    key, created = unlock_operator_key(config, interactive=interactive)
    store = open_store(config)
    try:
        ident = identity(config, key, store, created_key=created)
        if on_ready is not None:
            on_ready(ident)
        if not once:
            run_trio(serve_until_signal, config, key, store)
        return ident
    finally:
        store.close()


def run_trio(fn, *args):
    """trio.run, with the one error out of its nurseries raised as itself (a clear message, not
    an exception group)."""
    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if leaf is group:
            raise
        raise leaf from None


async def serve_until_signal(config: Config, key: PrivateKey, store: Store,
                             on_started: Callable[[NodeRuntime], Awaitable[None]] | None = None) -> None:
    """Run the node until SIGINT or SIGTERM; `on_started` is awaited once it runs."""
    from .runtime import open_node

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            runtime = open_node(config, key, store)
            await nursery.start(runtime.run)
            if on_started is not None:
                await on_started(runtime)
            async for signum in signals:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
