"""Helpers shared by tests: users that sign requests, nodes that relay them."""

from __future__ import annotations

import json

from formation.crdt.intents import canonical_message, parse_request, with_base
from formation.crdt.op import user_request
from formation.crdt.keys import PrivateKey, format_address, parse_signature
from formation.crdt.store import Store

TS = 1_700_000_000


class User:
    def __init__(self, secret: bytes | None = None):
        self.key = PrivateKey(secret)
        self.address = format_address(self.key.address)

    def request(self, method: str, path: str, body: dict | None = None, *, ts: int = TS, base: str = ""):
        raw = b"" if body is None else json.dumps(body).encode()
        message = canonical_message(method, with_base(path, base), ts, raw)
        return message, raw, self.key.personal_sign(message.encode())


class Node:
    """A node key relaying requests into a store, with a private clock."""

    def __init__(self, store: Store | None = None, secret: bytes | None = None):
        self.key = PrivateKey(secret)
        self.address = format_address(self.key.address)
        self.store = store if store is not None else Store()
        self.now = TS * 1000  # the clock of a node in the same minute as its users

    def relay(self, user: User, method: str, path: str, body: dict | None = None, *, ts: int = TS,
              base: str | None = None):
        """Relay the user's request; `base` defaults to the record's current version here."""
        self.now += 1
        if base is None:
            base = current_version(self.store, user, method, path, body)
        m, b, s = user.request(method, path, body, ts=ts, base=base)
        return self.store.write_request(self.key, m, b, s, now_ms=self.now)

    def put(self, kind: str, key: str, value):
        self.now += 1
        return self.store.write(self.key, kind, key, value, now_ms=self.now)

    def heartbeat(self, beat: int = 0):
        return self.put("node", self.address, {"address": self.address, "heartbeat": beat})


def current_version(store: Store, user: User, method: str, path: str, body: dict | None) -> str:
    """The version a client would read before writing (none for a create)."""
    m, b, s = user.request(method, path, body)
    kind, intent = parse_request(user_request(m, b, parse_signature(s)))
    if intent.action == "create" and kind.name != "account":
        return ""
    return store.record_version(kind.name, kind.key_of(intent)) or ""
