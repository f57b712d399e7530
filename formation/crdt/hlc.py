"""Hybrid logical clock packed in one integer: (unix milliseconds << 16) | counter.

The caller passes the wall clock in; nothing here reads time, so tests can drive it.
Every value is bounded by MAX_HLC (an op above it is malformed everywhere) and arithmetic
saturates there instead of overflowing: an HLC that reached the bound refuses to go on
(ClockError) rather than wrapping or writing what peers would refuse.
"""

from __future__ import annotations

LOGICAL_BITS = 16
MAX_HLC = 2**62 - 1  # year ~2248 in ms << 16; fits SQLite's signed 64-bit integers
MAX_TS = 2**32 - 1  # unix seconds in a user's signed message (year 2106)


class ClockError(RuntimeError):
    """The clock cannot move forward without passing MAX_HLC."""


def from_ms(ms: int) -> int:
    return min(max(ms, 0) << LOGICAL_BITS, MAX_HLC)


def to_ms(hlc: int) -> int:
    return hlc >> LOGICAL_BITS


def from_unix_seconds(ts: int) -> int:
    return from_ms(ts * 1000)


class Hlc:
    __slots__ = ("last",)

    def __init__(self, last: int = 0):
        self.last = last

    def observe(self, remote: int) -> None:
        if remote > self.last:
            self.last = min(remote, MAX_HLC)

    def next(self, now_ms: int, *, after: int = 0) -> int:
        """A timestamp greater than everything seen and than `after`, close to `now_ms`."""
        value = max(self.last + 1, from_ms(now_ms), after + 1)
        if value > MAX_HLC:
            raise ClockError("the logical clock reached its upper bound")
        self.last = value
        return value
