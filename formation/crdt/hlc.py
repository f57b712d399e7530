"""Hybrid logical clock packed in one integer: (unix milliseconds << 16) | counter.

The caller passes the wall clock in; nothing here reads time, so tests can drive it.
"""

from __future__ import annotations

LOGICAL_BITS = 16


def from_ms(ms: int) -> int:
    return ms << LOGICAL_BITS


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
            self.last = remote

    def next(self, now_ms: int, *, after: int = 0) -> int:
        """A timestamp greater than everything seen and than `after`, close to `now_ms`."""
        value = max(self.last + 1, from_ms(now_ms), after + 1)
        self.last = value
        return value
