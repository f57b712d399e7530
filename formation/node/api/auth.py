"""Signed requests (DESIGN.md §2): X-Message, X-Signature, X-Recovery-Id.

X-Message must be exactly `"<METHOD> <PATH?QUERY> <unix-seconds> <sha256-hex(body)>"` for the
request that carries it; X-Signature is the EIP-191 signature of that string (65 bytes hex, with
or without 0x; v as 0/1 or 27/28), X-Recovery-Id optional when v is present. Refused, each with
its own reason: a missing header, a message that does not match this request, a timestamp
outside ±120 s, a signature already used inside that window, a bad or mismatched signature.
X-Address (optional) names the signer, so a tampered message is reported as such rather than
recovering to some other address. There is no "localhost is admin" shortcut: every caller signs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from formation.crdt.intents import split_message
from formation.crdt.keys import (
    SignatureError,
    format_address,
    is_low_s,
    parse_address,
    parse_signature,
    recover_personal,
)
from formation.crdt.kinds import Invalid

WINDOW_SECONDS = 120
# A replayed signed read (GET, or a POST search) can only re-read, within the window, what its
# signer may read; refusing them would make every client that polls (same second, same message,
# same RFC 6979 signature) fail. Every write is one use per signature.
SAFE_METHODS = frozenset({"GET", "HEAD"})


class AuthError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Signed:
    address: str  # 0x-lowercase address of the signer
    message: str
    signature: bytes  # 65 bytes, recid 0/1


class ReplayGuard:
    """Signatures seen in the last window; one use each."""

    def __init__(self, window: int = WINDOW_SECONDS):
        self.window = window
        self._seen: dict[bytes, float] = {}

    def check_and_remember(self, signature: bytes, now: float) -> None:
        if len(self._seen) > 10_000:
            self._seen = {s: t for s, t in self._seen.items() if t > now - 2 * self.window}
        seen = self._seen.get(signature)
        if seen is not None and seen > now - 2 * self.window:
            raise AuthError("replay", "this signature was already used; sign each request anew")
        self._seen[signature] = now


def has_signature(headers) -> bool:
    return "X-Signature" in headers or "X-Message" in headers


@dataclass(frozen=True)
class SignedHeaders:
    """A signed request's headers, checked without its body (`check_headers`)."""
    message: str
    signature: bytes  # 65 bytes, recid 0/1, low s
    digest: str  # the SHA-256 (hex) of the body the message signs


def check_headers(method: str, path_query: str, headers, now: float) -> SignedHeaders:
    """Everything about a signed request that its headers alone decide: present, well formed,
    signing this method and path, inside the window, a well-formed low-s signature. The node
    runs this before it reads the body (docs/api.md: cheap checks first); `verify` finishes."""
    message = headers.get("X-Message")
    sig_text = headers.get("X-Signature")
    if not message:
        raise AuthError("missing_header", "X-Message header is missing")
    if not sig_text:
        raise AuthError("missing_header", "X-Signature header is missing")
    try:  # the grammar every node applies to the request carried in an op: one definition
        parts = split_message(message)
    except Invalid as exc:
        raise AuthError("bad_message", f"X-Message: {exc.detail}") from None
    ts = parts[2]
    if parts[0] != method.upper():
        raise AuthError("method_mismatch", f"X-Message signs {parts[0]}, the request is {method.upper()}")
    if parts[1] != path_query:
        raise AuthError("path_mismatch", f"X-Message signs {parts[1]!r}, the request is for {path_query!r}")
    if message != f"{parts[0]} {path_query} {ts} {parts[3]}":  # e.g. a timestamp with leading zeros
        raise AuthError("bad_message", f"X-Message must be exactly '{parts[0]} {path_query} {ts} <sha256-hex "
                                       "of the body>'")
    if abs(now - ts) > WINDOW_SECONDS:
        raise AuthError("stale", f"timestamp {ts} is more than {WINDOW_SECONDS} s from the node's clock ({int(now)})")
    rid_text = headers.get("X-Recovery-Id")
    try:
        rid = int(rid_text) if rid_text not in (None, "") else None
    except ValueError:
        raise AuthError("bad_signature", "X-Recovery-Id must be 0, 1, 27 or 28") from None
    try:
        sig = parse_signature(sig_text, rid)
    except SignatureError as exc:
        reason = "recovery_id_mismatch" if "does not match" in str(exc) else "bad_signature"
        raise AuthError(reason, str(exc)) from None
    if not is_low_s(sig):
        raise AuthError("bad_signature", "signature has a high s value; wallets sign with low s")
    return SignedHeaders(message, sig, parts[3])


def verify(method: str, path_query: str, body: bytes, headers, now: float, guard: ReplayGuard,
           *, one_use: bool = True) -> Signed:
    checked = check_headers(method, path_query, headers, now)
    message, sig = checked.message, checked.signature
    if checked.digest != hashlib.sha256(body).hexdigest():
        raise AuthError("body_mismatch", "the body's SHA-256 is not the one in X-Message")
    try:
        signer = recover_personal(message.encode(), sig)
    except SignatureError as exc:
        raise AuthError("bad_signature", str(exc)) from None
    claimed = headers.get("X-Address")
    if claimed:
        # Optional: without it a tampered message just recovers to some other address (which
        # then owns nothing); with it, the node can say exactly what went wrong.
        try:
            claimed_raw = parse_address(claimed)
        except ValueError as exc:
            raise AuthError("bad_address", f"X-Address: {exc}") from None
        if claimed_raw != signer:
            raise AuthError("signer_mismatch", "the signature was not made by X-Address over this X-Message")
    if one_use and method.upper() not in SAFE_METHODS:
        guard.check_and_remember(sig[:64], now)
    return Signed(format_address(signer), message, sig)
