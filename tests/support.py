"""Helpers shared by tests: users that sign requests, nodes that relay them."""

from __future__ import annotations

import json

from formation.crdt.intents import canonical_message
from formation.crdt.keys import PrivateKey, format_address
from formation.crdt.store import Store

TS = 1_700_000_000


class User:
    def __init__(self, secret: bytes | None = None):
        self.key = PrivateKey(secret)
        self.address = format_address(self.key.address)

    def request(self, method: str, path: str, body: dict | None = None, *, ts: int = TS):
        raw = b"" if body is None else json.dumps(body).encode()
        message = canonical_message(method, path, ts, raw)
        return message, raw, self.key.personal_sign(message.encode())


class Node:
    """A node key relaying requests into a store, with a private clock."""

    def __init__(self, store: Store | None = None, secret: bytes | None = None):
        self.key = PrivateKey(secret)
        self.address = format_address(self.key.address)
        self.store = store if store is not None else Store()
        self.now = 1_000_000

    def relay(self, user: User, method: str, path: str, body: dict | None = None, *, ts: int = TS):
        self.now += 1
        m, b, s = user.request(method, path, body, ts=ts)
        return self.store.write_request(self.key, m, b, s, now_ms=self.now)

    def put(self, kind: str, key: str, value):
        self.now += 1
        return self.store.write(self.key, kind, key, value, now_ms=self.now)

    def heartbeat(self, beat: int = 0):
        return self.put("node", self.address, {"address": self.address, "heartbeat": beat})
