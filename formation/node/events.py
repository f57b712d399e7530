"""Commit notifications: who wants to know when ops became durable (watchers, the API's event
stream). The store calls back from whichever thread committed; trio tasks wait on `changed`."""

from __future__ import annotations

import trio


class Changes:
    def __init__(self):
        self._token = trio.lowlevel.current_trio_token()
        self._event = trio.Event()
        self.last_seq = 0

    def on_commit(self, last_seq: int) -> None:
        """Store callback; thread-safe (it may run in a worker thread)."""
        self._token.run_sync_soon(self._wake, last_seq)

    def _wake(self, last_seq: int) -> None:
        self.last_seq = max(self.last_seq, last_seq)
        self._event.set()
        self._event = trio.Event()

    async def wait_past(self, seq: int) -> int:
        """Wait until something past `seq` is committed; returns the newest seq."""
        while self.last_seq <= seq:
            await self._event.wait()
        return self.last_seq
