"""A keyed Bloom filter of op ids.

Keyed (BLAKE2b with a random per-session key) so that a Byzantine peer cannot pick ops whose
ids collide in our filter and so hide them from reconciliation ("automerge poison").
"""

from __future__ import annotations

import hashlib
import secrets
import struct

BITS_PER_ITEM = 16  # with K = 11: about 0.05 % false positives
K = 11
MAX_BYTES = 4 * 1024 * 1024
KEY_BYTES = 16
_WORDS = struct.Struct("<16I").unpack  # a 64-byte digest as 16 little-endian 32-bit words


class BloomError(ValueError):
    pass


class Bloom:
    __slots__ = ("key", "k", "m", "bits")

    def __init__(self, expected_items: int, *, key: bytes | None = None, bits_per_item: int = BITS_PER_ITEM,
                 k: int = K):
        nbytes = min(MAX_BYTES, max(8, (expected_items * bits_per_item + 7) // 8))
        self.key = key if key is not None else secrets.token_bytes(KEY_BYTES)
        self.k = k
        self.m = nbytes * 8
        self.bits = bytearray(nbytes)

    def _positions(self, item: bytes):
        # k independent 32-bit positions from one 64-byte digest. (Double hashing h1 + i*h2
        # measured ~100x over the expected false-positive rate on small filters: two items
        # whose h2 agree modulo m share their whole probe sequence.)
        m = self.m
        return [w % m for w in _WORDS(hashlib.blake2b(item, digest_size=64, key=self.key).digest())[:self.k]]

    def add(self, item: bytes) -> None:
        bits = self.bits
        for p in self._positions(item):
            bits[p >> 3] |= 1 << (p & 7)

    def __contains__(self, item: bytes) -> bool:
        bits = self.bits
        for p in self._positions(item):  # noqa: SIM110 - a loop, not all(genexpr): half the time
            if not bits[p >> 3] & (1 << (p & 7)):
                return False
        return True

    def to_wire(self) -> list:
        return [self.key, self.k, bytes(self.bits)]

    @classmethod
    def from_wire(cls, wire) -> Bloom:
        if not (isinstance(wire, list) and len(wire) == 3):
            raise BloomError("bloom filter must be [key, k, bits]")
        key, k, bits = wire
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise BloomError(f"bloom key must be {KEY_BYTES} bytes")
        if not isinstance(k, int) or not 1 <= k <= 16:
            raise BloomError("bloom k must be 1..16")
        if not isinstance(bits, bytes) or not 8 <= len(bits) <= MAX_BYTES:
            raise BloomError(f"bloom bits must be 8..{MAX_BYTES} bytes")
        b = cls(0, key=key, k=k)
        b.m = len(bits) * 8
        b.bits = bytearray(bits)
        return b
