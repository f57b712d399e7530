"""The bounded structures of the DNS server: an LRU cache bounded in entries and bytes, a
per-source token bucket whose table of sources is itself bounded, and per-source counters of
work in flight. Sans-IO: time is passed in."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

from formation.buckets import TokenBuckets

V = TypeVar("V")


class LruCache(Generic[V]):
    """At most `max_entries` values and `max_bytes` of their declared sizes; the least recently
    used go first."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries = max(0, max_entries)
        self.max_bytes = max(0, max_bytes)
        self._d: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: Hashable) -> V | None:
        hit = self._d.get(key)
        if hit is None:
            return None
        self._d.move_to_end(key)
        return hit[0]

    def put(self, key: Hashable, value: V, size: int) -> None:
        if size > self.max_bytes or self.max_entries == 0:
            return
        self.pop(key)
        self._d[key] = (value, size)
        self.bytes += size
        while len(self._d) > self.max_entries or self.bytes > self.max_bytes:
            _, (_, s) = self._d.popitem(last=False)
            self.bytes -= s

    def pop(self, key: Hashable) -> V | None:
        hit = self._d.pop(key, None)
        if hit is None:
            return None
        self.bytes -= hit[1]
        return hit[0]

    def clear(self) -> None:
        self._d.clear()
        self.bytes = 0


class RateLimiter:
    """A token bucket per source: `rate` per second, bursts up to `burst`. The table of sources
    holds at most `max_sources`; past it the longest-idle source is forgotten (it comes back
    with a full bucket: a bound on memory, not a ban list). rate <= 0: no limit."""

    def __init__(self, rate: float, burst: float | None = None, *, max_sources: int = 65536):
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1.0, 2 * rate))
        self.max_sources = max_sources
        self._buckets = TokenBuckets(self.rate, self.burst, max_keys=max_sources)
        self.refused = 0

    def allow(self, source: str, now: float) -> bool:
        if self.rate <= 0 or self._buckets.take(source, 1.0, now):
            return True
        self.refused += 1
        return False

    def clear(self) -> None:
        """Every source's bucket full again (as after a quiet while)."""
        self._buckets = TokenBuckets(self.rate, self.burst, max_keys=self.max_sources)

    def __len__(self) -> int:
        return len(self._buckets)


class Slots:
    """Work in flight, at most `total` and `per_source` at once (a source with none in flight
    takes no memory)."""

    def __init__(self, total: int, per_source: int):
        self.total = total
        self.per_source = per_source
        self.used = 0
        self._by: dict[str, int] = {}

    def take(self, source: str) -> bool:
        n = self._by.get(source, 0)
        if self.used >= self.total or n >= self.per_source:
            return False
        self._by[source] = n + 1
        self.used += 1
        return True

    def give(self, source: str) -> None:
        n = self._by.get(source, 0) - 1
        if n <= 0:
            self._by.pop(source, None)
        else:
            self._by[source] = n
        self.used = max(0, self.used - 1)
