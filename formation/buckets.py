"""Token buckets by key (a peer, an op's author, a DNS client): the one rate limiter that the
sync server's byte budget, gossip's author budget and the DNS server's query limit share.

A bucket holds up to `capacity` tokens and refills at `rate` per second. `take` spends only what
is there; `charge` may leave a bucket in debt (an answer already allowed is sent whole, and its
key then waits until the debt is refilled). Keys are free to make (peer ids, keys, addresses),
so at most `max_keys` buckets are kept: past it the full ones are forgotten (the same as a key
never seen), then the least recently charged (which gets a full bucket back): a bound on memory,
not a ban list.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable


class TokenBuckets:
    def __init__(self, rate: float, capacity: float, *, max_keys: int = 4096,
                 clock: Callable[[], float] = time.monotonic):
        self.rate = float(rate)
        self.capacity = float(capacity)
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def tokens(self, key: Hashable, now: float | None = None) -> float:
        now = self.clock() if now is None else now
        tokens, at = self._buckets.get(key, (self.capacity, now))
        return min(self.capacity, tokens + (now - at) * self.rate)

    def charge(self, key: Hashable, amount: float, now: float | None = None) -> None:
        """Spend `amount` (into debt if need be)."""
        now = self.clock() if now is None else now
        self._buckets[key] = (self.tokens(key, now) - amount, now)
        self._buckets.move_to_end(key)
        if len(self._buckets) > self.max_keys:
            for k in [k for k in self._buckets if self.tokens(k, now) >= self.capacity]:
                del self._buckets[k]  # full: the same as a key never seen
            while len(self._buckets) > self.max_keys:  # all in use: the least recently charged goes
                self._buckets.popitem(last=False)

    def take(self, key: Hashable, amount: float = 1.0, now: float | None = None) -> bool:
        """Spend `amount` if the bucket holds it; False (nothing spent) otherwise."""
        now = self.clock() if now is None else now
        if self.tokens(key, now) < amount:
            return False
        self.charge(key, amount, now)
        return True

    def __len__(self) -> int:
        return len(self._buckets)
