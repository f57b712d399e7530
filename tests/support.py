"""Helpers shared by tests: users that sign requests, nodes that relay them."""

from __future__ import annotations

import json

import msgpack

from formation.crdt.intents import canonical_message, parse_request, with_base
from formation.crdt.keys import PrivateKey, eip191_hash, format_address, parse_signature, sha256
from formation.crdt.op import PAYLOAD_NODE, PAYLOAD_USER, VERSION, user_request
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

    def request_bytes(self, method: str, path: str, body: bytes, *, ts: int = TS, base: str = ""):
        """Like `request` with the body bytes as given (for bodies `json.dumps` never makes)."""
        message = canonical_message(method, with_base(path, base), ts, body)
        return message, body, self.key.personal_sign(message.encode())

    def sign(self, message: str):
        """Sign any message at all (a request with a made-up message)."""
        return self.key.personal_sign(message.encode())


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


def records_dump(store: Store) -> list[tuple]:
    """The records projection, every column but `updated_seq` (a local delivery number)."""
    return list(store.log.db.execute(
        "SELECT kind, key, heads, version, doc, owner, type, text, over_quota FROM records ORDER BY kind, key"))


def _sorted_maps(value):
    if isinstance(value, dict):
        return {k: _sorted_maps(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_sorted_maps(v) for v in value]
    return value


def raw_op_wire(signer: PrivateKey, kind, key, *, deps, prev=(), hlc, value=None,
                request: tuple | None = None, payload: list | None = None) -> bytes:
    """The wire `op.make_op` would sign, built without any of its checks: what an attacker with
    a node key can send. Maps are key-sorted (the one canonical thing kept, so that a value the
    decoder accepts gets the same bytes as from `make_op`); `payload` overrides the payload."""
    prev_l = sorted(set(prev))
    deps_l = sorted(set(deps) | set(prev_l))
    if payload is None:
        if request is None:
            payload = [PAYLOAD_NODE, _sorted_maps(value)]
        else:
            message, body, usig = request
            payload = [PAYLOAD_USER, message, bytes(body), parse_signature(usig)]
    body_bytes = msgpack.packb([VERSION, kind, key, signer.address, deps_l, prev_l, hlc, payload],
                               use_bin_type=True)
    sig = signer.sign_digest(eip191_hash(sha256(body_bytes)))
    return msgpack.packb([body_bytes, sig], use_bin_type=True)
