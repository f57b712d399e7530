"""Commit notifications: who wants to know when ops became durable (watchers, the API's event
stream). The store calls back from whichever thread committed; trio tasks wait on `changed`."""

from __future__ import annotations

import bisect
import time

import trio


class Changes:
    def __init__(self):
        self._token = trio.lowlevel.current_trio_token()
        self._event = trio.Event()
        self.last_seq = 0
        self._seqs: list[int] = []  # last seq of each committed batch (increasing)
        self._times: list[float] = []  # its commit time

    def on_commit(self, last_seq: int) -> None:
        """Store callback; thread-safe (it may run in a worker thread)."""
        self._token.run_sync_soon(self._wake, last_seq, time.time())

    def commit_time(self, seq: int) -> float | None:
        """Wall-clock time at which the batch holding `seq` was committed, if remembered."""
        i = bisect.bisect_left(self._seqs, seq)
        return self._times[i] if i < len(self._seqs) else None

    def _wake(self, last_seq: int, t: float) -> None:
        if len(self._seqs) >= 100_000:  # remember the recent half
            del self._seqs[:50_000], self._times[:50_000]
        self._seqs.append(last_seq)
        self._times.append(t)
        self.last_seq = max(self.last_seq, last_seq)
        self._event.set()
        self._event = trio.Event()

    async def wait_past(self, seq: int) -> int:
        """Wait until something past `seq` is committed; returns the newest seq."""
        while self.last_seq <= seq:
            await self._event.wait()
        return self.last_seq
