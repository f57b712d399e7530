"""The signed op: its wire format, signing and verification.

Wire form: msgpack [body: bin, sig: bin(65)], where body is the canonical msgpack array

    [version, kind, key, author(20), deps[32...], prev[32...], hlc, payload]

and payload is either [0, value-or-nil] (a node's own fact; nil is a tombstone) or
[1, message, request-body, user-signature] (a user's signed HTTP request, DESIGN.md §2-3).
The op id is SHA-256 of the wire bytes; the author's signature is EIP-191 over SHA-256(body),
so an operator can sign ops with any Ethereum wallet, too.

`deps` are the heads of the whole graph when the op was made plus `prev`: the ops on the same
(kind, key) that this op supersedes. Keeping prev inside deps makes "prev is in my causal past"
a structural check instead of a graph walk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import codec
from .hlc import MAX_HLC
from .keys import (
    PrivateKey,
    SignatureError,
    eip191_hash,
    is_low_s,
    parse_signature,
    recover_digest,
    sha256,
)
from .strict import text_problem

# 2: record ids derive from their creator, user writes name the version they change, hlc is
# bounded (docs/state.md). A node speaking 1 is refused: no fog of format 1 is migrated.
VERSION = 2
MAX_OP_BYTES = 64 * 1024
MAX_DEPS = 64
MAX_KEY_LEN = 256
MAX_KIND_LEN = 32
MAX_MESSAGE_LEN = 4096

PAYLOAD_NODE = 0
PAYLOAD_USER = 1

class OpError(ValueError):
    """An op that must not be stored. `code` is a short machine-readable reason."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class UserRequest:
    """A user's signed HTTP request, carried verbatim so every node can re-check it."""

    message: str  # the X-Message line: "<METHOD> <PATH?QUERY> <unix-seconds> <sha256-hex(body)>"
    body: bytes
    signature: bytes  # 65 bytes r||s||recid
    signer: bytes = field(compare=False)  # recovered, never taken from the wire
    write_id: bytes = field(compare=False)  # SHA-256 of the signature: one request = one write


@dataclass(frozen=True, slots=True)
class Op:
    id: bytes
    wire: bytes
    kind: str
    key: str
    author: bytes
    deps: tuple[bytes, ...]
    prev: tuple[bytes, ...]
    hlc: int
    value: Any  # node payload (None = tombstone); None for user ops (derived later)
    request: UserRequest | None

    @property
    def is_user(self) -> bool:
        return self.request is not None


def user_request(message: str, body: bytes, usig: bytes) -> UserRequest:
    """Check a user's signature (65 bytes, recid 0/1) and recover who made it."""
    if not is_low_s(usig):
        raise OpError("bad_signature", "user signature has a high s value (malleable form)")
    try:
        user = recover_digest(eip191_hash(message.encode()), usig)
    except SignatureError as exc:
        raise OpError("bad_signature", f"user signature: {exc}") from None
    return UserRequest(message, body, usig, user, sha256(usig))


def _sorted_unique_hashes(hashes, what: str) -> list[bytes]:
    out = sorted(set(hashes))
    for h in out:
        if not isinstance(h, bytes) or len(h) != 32:
            raise OpError("malformed", f"{what} must be 32-byte hashes")
    return out


def make_op(
    signer: PrivateKey,
    kind: str,
    key: str,
    *,
    deps,
    prev=(),
    hlc: int,
    value: Any = None,
    request: tuple[str, bytes, bytes] | None = None,
) -> Op:
    """Build and sign an op. `request` is (message, body, user signature) for a user's write."""
    prev_l = _sorted_unique_hashes(prev, "prev")
    deps_l = _sorted_unique_hashes(list(deps) + prev_l, "deps")
    if len(deps_l) > MAX_DEPS:
        raise OpError("malformed", f"an op may have at most {MAX_DEPS} deps")
    req = None
    if request is None:
        payload = [PAYLOAD_NODE, value]
    else:
        message, body, usig = request
        req = user_request(message, bytes(body), parse_signature(usig))
        payload = [PAYLOAD_USER, message, req.body, req.signature]
        value = None
    try:
        body_bytes = codec.pack([VERSION, kind, key, signer.address, deps_l, prev_l, hlc, payload])
    except codec.CodecError as exc:  # the code a peer would give the same op
        raise OpError("malformed", f"op body: {exc}") from None
    sig = signer.sign_digest(eip191_hash(sha256(body_bytes)))
    wire = codec.pack_trusted([body_bytes, sig])
    # What a peer will check, checked here by the same function: a node never makes an op its
    # peers refuse (and then ban it for).
    return decode_op(wire)


def decode_op(wire: bytes, *, signers: tuple[bytes, bytes | None] | None = None) -> Op:
    """Decode and verify an op's form and signatures. Raises OpError with the reason.

    `signers` = (author, user or None) skips signature recovery: only for ops read back from
    this node's own log, which were verified when they were stored.
    """
    try:
        outer = codec.unpack(wire, max_bytes=MAX_OP_BYTES)
    except codec.CodecError as exc:
        code = "too_large" if "over the limit" in str(exc) else "malformed"
        raise OpError(code, f"op envelope: {exc}") from None
    if not (isinstance(outer, list) and len(outer) == 2 and isinstance(outer[0], bytes)
            and isinstance(outer[1], bytes)):
        raise OpError("malformed", "op envelope must be [body: bytes, signature: bytes]")
    body_bytes, sig = outer
    if len(sig) != 65 or sig[64] > 1 or not is_low_s(sig):
        raise OpError("malformed", "op signature must be 65 bytes r||s||recid, recid 0 or 1, low s")
    try:
        body = codec.unpack(body_bytes, max_bytes=MAX_OP_BYTES)
    except codec.CodecError as exc:
        raise OpError("malformed", f"op body: {exc}") from None
    if not isinstance(body, list) or len(body) != 8:
        raise OpError("malformed", "op body must be an array of 8 fields")
    version, kind, key, author, deps, prev, hlc, payload = body
    if type(version) is not int or version != VERSION:
        raise OpError("malformed", f"unsupported op version {version!r} (this node speaks {VERSION})")
    if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND_LEN or text_problem(kind):
        raise OpError("malformed", f"kind must be a string of 1..{MAX_KIND_LEN} plain characters")
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LEN or text_problem(key):
        raise OpError("malformed", f"key must be a string of 1..{MAX_KEY_LEN} plain characters")
    if not isinstance(author, bytes) or len(author) != 20:
        raise OpError("malformed", "author must be a 20-byte address")
    if not isinstance(hlc, int) or isinstance(hlc, bool) or not 0 < hlc <= MAX_HLC:
        raise OpError("malformed", f"hlc must be an integer in 1..{MAX_HLC}")
    for name, lst in (("deps", deps), ("prev", prev)):
        if not isinstance(lst, list) or len(lst) > MAX_DEPS:
            raise OpError("malformed", f"{name} must be a list of at most {MAX_DEPS} hashes")
        last = b""
        for h in lst:
            if type(h) is not bytes or len(h) != 32:
                raise OpError("malformed", f"{name} must be 32-byte hashes")
            if h <= last:
                raise OpError("malformed", f"{name} must be sorted and without duplicates")
            last = h
    if not set(prev) <= set(deps):
        raise OpError("malformed", "every prev must also be a dep")
    if not isinstance(payload, list) or not payload:
        raise OpError("malformed", "payload must be a non-empty array")
    request = None
    value = None
    tag = payload[0] if type(payload[0]) is int else None  # 0.0 and false are not 0: one encoding
    if tag == PAYLOAD_NODE and len(payload) == 2:
        value = payload[1]
    elif tag == PAYLOAD_USER and len(payload) == 4:
        message, req_body, usig = payload[1:]
        if not isinstance(message, str) or len(message) > MAX_MESSAGE_LEN:
            raise OpError("malformed", f"user message must be a string of at most {MAX_MESSAGE_LEN} characters")
        if not isinstance(req_body, bytes) or not isinstance(usig, bytes) or len(usig) != 65 or usig[64] > 1:
            raise OpError("malformed", "user request must carry body bytes and a 65-byte signature")
        if signers is not None and signers[1] is not None:
            request = UserRequest(message, req_body, usig, signers[1], sha256(usig))
        else:
            request = user_request(message, req_body, usig)
    else:
        raise OpError("malformed", "payload must be [0, value] or [1, message, body, signature]")
    if signers is not None:
        signer = signers[0]
    else:
        try:
            signer = recover_digest(eip191_hash(sha256(body_bytes)), sig)
        except SignatureError as exc:
            raise OpError("bad_signature", f"op signature: {exc}") from None
    if signer != author:
        raise OpError("bad_signature", "op signature was not made by its author")
    return Op(sha256(wire), bytes(wire), kind, key, author, tuple(deps), tuple(prev), hlc, value, request)
