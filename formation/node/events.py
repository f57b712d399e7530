"""Commit notifications: who wants to know when ops became durable (watchers, the API's event
stream). The store calls back from whichever thread committed; trio tasks wait on `changed`.

`Streams` bounds the API's open event streams (GET /events): each holds a connection and reads
the store in batches, so there are at most `per_caller` per address and `total` in all.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter

import trio

STREAMS_PER_CALLER = 4
STREAMS_TOTAL = 64


class Slot:
    """One open stream; `release` gives it back (once, however often it is called)."""

    def __init__(self, streams: Streams, who: str):
        self._streams, self.who = streams, who
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._streams._give_back(self.who)


class Streams:
    def __init__(self, per_caller: int = STREAMS_PER_CALLER, total: int = STREAMS_TOTAL):
        self.per_caller, self.total = per_caller, total
        self._open: Counter[str] = Counter()

    @property
    def open(self) -> int:
        return sum(self._open.values())

    def take(self, who: str) -> Slot | str:
        """A slot for a new stream of `who`, or why there is none."""
        if self._open[who] >= self.per_caller:
            return f"{who} has {self._open[who]} event streams open here, the most one caller may"
        if self.open >= self.total:
            return f"this node serves {self.total} event streams, the most it takes"
        self._open[who] += 1
        return Slot(self, who)

    def _give_back(self, who: str) -> None:
        self._open[who] -= 1
        if self._open[who] <= 0:
            del self._open[who]


class Changes:
    def __init__(self):
        self._token = trio.lowlevel.current_trio_token()
        self._event = trio.Event()
        self.last_seq = 0
        self._seqs: list[int] = []  # last seq of each committed batch (increasing)
        self._times: list[float] = []  # its commit time
        self.streams = Streams()  # the API's open event streams

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
