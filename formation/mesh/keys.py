"""WireGuard keys: X25519, shown base64 as WireGuard does, kept hex on the UAPI socket."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

_RAW = {"encoding": serialization.Encoding.Raw, "format": serialization.PublicFormat.Raw}


def new_private() -> bytes:
    return X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(**_RAW)


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def from_b64(text: str) -> bytes:
    key = base64.b64decode(text, validate=True)
    if len(key) != 32:
        raise ValueError("a WireGuard key is 32 bytes")
    return key


def load_or_create(path: Path) -> bytes:
    """This node's WireGuard private key, made once (0600, beside the operator key)."""
    if path.exists():
        return from_b64(path.read_text().strip())
    key = new_private()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(b64(key) + "\n")
    return key
