"""secp256k1 identities with Ethereum addresses and EIP-191 `personal_sign` signatures.

Every actor (a user, a node's operator) is a secp256k1 key; its address is the last 20 bytes of
Keccak-256 of the 64-byte uncompressed public key, so any Ethereum wallet can sign for a user
and our signatures verify in the Ethereum toolchain.
"""

from __future__ import annotations

import hashlib
import secrets

import coincurve
from Crypto.Hash import keccak as _keccak

try:  # safe-pysha3: a C Keccak, ~25x faster than pycryptodome's for 64-byte inputs
    from sha3 import keccak_256 as _fast_keccak
except ImportError:  # pragma: no cover - platforms without its wheel
    _fast_keccak = None


class SignatureError(ValueError):
    """A signature that is malformed or does not recover to the expected signer."""


def keccak256(data: bytes) -> bytes:
    # Not hashlib.sha3_256: that is NIST SHA3 (different padding, different digest).
    if _fast_keccak is not None:
        return _fast_keccak(data).digest()
    return keccak256_portable(data)


def keccak256_portable(data: bytes) -> bytes:
    return _keccak.new(data=data, digest_bits=256).digest()


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def address_of(public_key: coincurve.PublicKey) -> bytes:
    """20-byte Ethereum address of a public key."""
    return keccak256(public_key.format(compressed=False)[1:])[-20:]


def to_checksum(address: bytes) -> str:
    """EIP-55 mixed-case hex form, the way wallets print addresses."""
    hexaddr = address.hex()
    digest = keccak256(hexaddr.encode()).hex()
    return "0x" + "".join(c.upper() if int(d, 16) >= 8 else c for c, d in zip(hexaddr, digest[:40], strict=True))


def parse_address(text: str) -> bytes:
    """Accept 0x-prefixed or bare hex, any case; return the 20 bytes."""
    if not isinstance(text, str):
        raise ValueError("an address must be a hex string")
    body = text[2:] if text[:2] in ("0x", "0X") else text
    if len(body) != 40:
        raise ValueError(f"an address is 20 bytes (40 hex digits), got {len(body)} digits")
    try:
        return bytes.fromhex(body)
    except ValueError:
        raise ValueError("an address must be hexadecimal") from None


def format_address(address: bytes) -> str:
    """Canonical text form used in records and keys: lowercase, 0x-prefixed."""
    return "0x" + address.hex()


def eip191_hash(message: bytes) -> bytes:
    """Keccak-256 of the `personal_sign` envelope of `message`."""
    return keccak256(b"\x19Ethereum Signed Message:\n" + str(len(message)).encode() + message)


# secp256k1 group order. Signatures must have s <= n/2 (as libsecp256k1 and every wallet make
# them): otherwise (r, n-s) would be a second valid signature of the same thing, and a relay
# could re-issue a user's request under a new write id, or an op under a new id.
_HALF_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141 // 2


def is_low_s(sig: bytes) -> bool:
    """The one rule for signature malleability, used for ops and for signed requests alike."""
    return int.from_bytes(sig[32:64], "big") <= _HALF_N


def parse_signature(sig: bytes | str, recovery_id: int | None = None) -> bytes:
    """Normalize a signature to 65 bytes r||s||recid (recid 0 or 1).

    Accepts 65 bytes with v as 0/1 or 27/28 (wallets use 27/28), or 64 bytes r||s plus a
    separate recovery id. Hex strings are accepted with or without 0x.
    """
    if isinstance(sig, str):
        text = sig[2:] if sig[:2] in ("0x", "0X") else sig
        try:
            sig = bytes.fromhex(text)
        except ValueError:
            raise SignatureError("signature is not hexadecimal") from None
    if len(sig) == 64:
        if recovery_id is None:
            raise SignatureError("a 64-byte signature needs a recovery id")
        v = recovery_id
    elif len(sig) == 65:
        v = sig[64]
        if recovery_id is not None and _norm_v(recovery_id) != _norm_v(v):
            raise SignatureError("recovery id does not match the signature's v byte")
    else:
        raise SignatureError(f"a signature is 65 bytes (r||s||v), got {len(sig)}")
    return bytes(sig[:64]) + bytes([_norm_v(v)])


def _norm_v(v: int) -> int:
    if v in (0, 1):
        return v
    if v in (27, 28):
        return v - 27
    raise SignatureError(f"recovery id/v must be 0, 1, 27 or 28, got {v}")


def recover_digest(digest: bytes, sig65: bytes) -> bytes:
    """Address that signed the 32-byte `digest`; `sig65` is r||s||recid (recid 0/1)."""
    try:
        pub = coincurve.PublicKey.from_signature_and_message(sig65, digest, hasher=None)
    except Exception as exc:  # coincurve raises bare Exception/ValueError on bad points
        raise SignatureError(f"signature does not recover to a public key ({exc})") from None
    return address_of(pub)


def recover_personal(message: bytes, signature: bytes | str, recovery_id: int | None = None) -> bytes:
    """Address of whoever `personal_sign`ed `message` (EIP-191)."""
    return recover_digest(eip191_hash(message), parse_signature(signature, recovery_id))


class PrivateKey:
    """A secp256k1 signing key with its Ethereum address."""

    __slots__ = ("_sk", "address", "public_key")

    def __init__(self, secret: bytes | None = None):
        if secret is None:
            secret = secrets.token_bytes(32)
        if len(secret) != 32:
            raise ValueError("a private key is 32 bytes")
        try:
            self._sk = coincurve.PrivateKey(secret)
        except Exception:
            raise ValueError("not a valid secp256k1 private key (zero or above the group order)") from None
        self.public_key = self._sk.public_key
        self.address = address_of(self.public_key)

    @classmethod
    def from_hex(cls, text: str) -> PrivateKey:
        body = text[2:] if text[:2] in ("0x", "0X") else text
        try:
            return cls(bytes.fromhex(body))
        except ValueError as exc:
            raise ValueError(f"not a private key: {exc}") from None

    @property
    def secret(self) -> bytes:
        return self._sk.secret

    def sign_digest(self, digest: bytes) -> bytes:
        """65 bytes r||s||recid (0/1) over a 32-byte digest."""
        return self._sk.sign_recoverable(digest, hasher=None)

    def personal_sign(self, message: bytes) -> bytes:
        """EIP-191 signature as wallets produce it: r||s||v with v = 27/28."""
        sig = self.sign_digest(eip191_hash(message))
        return sig[:64] + bytes([sig[64] + 27])

    def __repr__(self) -> str:  # never print the secret
        return f"PrivateKey({to_checksum(self.address)})"
