"""The store for trio code: one caller at a time, the work done off the event loop.

Verifying and committing a batch of ops takes tens to hundreds of milliseconds; on the event
loop that would stall gossip, pings and the API. So every store call runs in a worker thread,
serialized by a lock (the Store and its SQLite connection are used by one thread at a time).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from .registers import OpMeta
from .store import IngestResult, Store

T = TypeVar("T")


class AsyncStore:
    def __init__(self, store: Store):
        self.store = store
        self._lock = trio.Lock()

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call `fn(*args, **kwargs)` with exclusive use of the store, in a worker thread.

        Not abandoned on cancellation: a batch that started committing finishes, so what a
        caller was told is durable stays true through shutdown.
        """
        async with self._lock:
            return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    # ---- typed calls (what code outside crdt uses; nothing reaches into the store's dicts) ----

    async def get(self, kind: str, key: str) -> Any:
        return await self.run(self.store.get, kind, key)

    async def record_version(self, kind: str, key: str) -> str | None:
        return await self.run(self.store.record_version, kind, key)

    async def get_versioned(self, kind: str, key: str) -> dict | None:
        """The record with its `record_version`, read together (no write between the two)."""

        def read(store: Store) -> dict | None:
            value = store.get(kind, key)
            if value is None:
                return None
            why = store.over_quota(kind, key)
            return {**value, "record_version": store.record_version(kind, key), **({"over_quota": why} if why else {})}

        return await self.run(read, self.store)

    async def over_quota(self, kind: str, key: str) -> str | None:
        return await self.run(self.store.over_quota, kind, key)

    async def fog_members(self, fog_id: str) -> frozenset[str]:
        return await self.run(self.store.fog_members, fog_id)

    async def list(self, kind: str, **filters: Any) -> list[dict]:
        return await self.run(self.store.list, kind, **filters)

    async def since(self, seq: int, limit: int | None = None) -> list[OpMeta]:
        return await self.run(self.store.since, seq, limit)

    async def op_meta(self, op_id: bytes) -> OpMeta | None:
        return await self.run(self.store.op_meta, op_id)

    async def missing(self, limit: int | None = None) -> set[bytes]:
        return await self.run(self.store.missing, limit)

    async def state_hash(self) -> bytes:
        return await self.run(self.store.state_hash)

    async def ingest_ops(self, ops: list, *, source: str) -> IngestResult:
        return await self.run(self.store.ingest_ops, ops, source=source)

    async def tick(self, now_ms: int | None = None) -> IngestResult:
        return await self.run(self.store.tick, now_ms)
