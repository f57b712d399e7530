"""Secrets sealed to the nodes that host an instance: secp256k1 ECIES with AES-256-GCM.

A secret's value travels in the replicated state only as boxes, one per hosting node, that only
that node's key opens. The owner signs a *commitment* to the value (SHA-256 over the instance,
the name, a random salt and the value) in the instance record; the salt travels inside each box.
So a box that some other node made (a host re-sealing for a new host when a replica moves) is
believed only if what it holds matches the owner's commitment: a node that never held the value
cannot make one that passes, and the commitment says nothing about the value (the salt is 32
random bytes).

Box: base64(version 1 | ephemeral public key (33) | nonce (12) | AES-GCM(salt (32) | value)).
Key: HKDF-SHA256 over the ECDH secret, bound to both public keys; the associated data binds the
box to (instance, name, recipient), so a box cannot be replayed for another secret or node.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from dataclasses import dataclass

import coincurve
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = 1
SALT_BYTES = 32
MAX_VALUE = 2048  # bytes of a secret's value: API keys, passwords, tokens (the request body bounds the boxes)
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_INFO = b"formation-secret-v1"


class SealError(ValueError):
    """A box that does not open with this key, or whose content breaks the owner's commitment."""


@dataclass(frozen=True)
class Plain:
    """A secret's value with the salt its commitment was made with."""

    value: bytes
    salt: bytes

    @classmethod
    def new(cls, value: bytes) -> Plain:
        if len(value) > MAX_VALUE:
            raise ValueError(f"a secret's value is at most {MAX_VALUE} bytes, this one has {len(value)}")
        return cls(value, os.urandom(SALT_BYTES))


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"{name!r} is not a secret name: a letter or '_', then letters, digits or '_', "
                         "up to 64 (it becomes an environment variable)")
    return name


def commitment(instance_id: str, name: str, plain: Plain) -> str:
    h = hashlib.sha256(b"formation-secret-commit-v1\0")
    for part in (instance_id.encode(), name.encode(), plain.salt, plain.value):
        h.update(len(part).to_bytes(4, "big") + part)
    return h.hexdigest()


def _aad(instance_id: str, name: str, target: str) -> bytes:
    return b"\0".join((_INFO, instance_id.encode(), name.encode(), target.lower().encode()))


def _key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=_INFO + ephemeral + recipient).derive(shared)


def seal(plain: Plain, recipient_public: bytes, *, instance_id: str, name: str, target: str) -> str:
    """A box of `plain` that only the key of `recipient_public` (33-byte compressed) opens."""
    recipient = coincurve.PublicKey(recipient_public).format(compressed=True)
    ephemeral = coincurve.PrivateKey()
    eph_pub = ephemeral.public_key.format(compressed=True)
    key = _key(ephemeral.ecdh(recipient), eph_pub, recipient)
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, plain.salt + plain.value, _aad(instance_id, name, target))
    return base64.b64encode(bytes([VERSION]) + eph_pub + nonce + sealed).decode()


def unseal(secret_key: bytes, box: str, *, instance_id: str, name: str, target: str, commit: str) -> Plain:
    """The value (and salt) in `box` for the node whose private key is `secret_key`; SealError when the box
    is not for it, is damaged, or holds something other than what the owner committed to."""
    try:
        raw = base64.b64decode(box, validate=True)
    except (binascii.Error, ValueError):
        raise SealError("the box is not base64") from None
    if len(raw) < 1 + 33 + 12 + 16 + SALT_BYTES or raw[0] != VERSION:
        raise SealError("the box is too short or of an unknown version")
    eph_pub, nonce, sealed = raw[1:34], raw[34:46], raw[46:]
    me = coincurve.PrivateKey(secret_key)
    try:
        shared = me.ecdh(eph_pub)
    except ValueError:
        raise SealError("the box's ephemeral key is not a curve point") from None
    key = _key(shared, eph_pub, me.public_key.format(compressed=True))
    try:
        opened = AESGCM(key).decrypt(nonce, sealed, _aad(instance_id, name, target))
    except InvalidTag:
        raise SealError("the box does not open with this node's key") from None
    plain = Plain(opened[SALT_BYTES:], opened[:SALT_BYTES])
    if commitment(instance_id, name, plain) != commit:
        raise SealError("the box's content does not match the owner's commitment")
    return plain


def public_key_hex(secret_key: bytes) -> str:
    return coincurve.PrivateKey(secret_key).public_key.format(compressed=True).hex()
