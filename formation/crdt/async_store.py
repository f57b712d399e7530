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

from .store import Store

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

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await self.run(getattr(self.store, method), *args, **kwargs)
