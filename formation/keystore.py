"""A secp256k1 key encrypted at rest (DESIGN.md §2): the node operator's and a user's wallet.

Shared by the node (formation/node/setup.py: DATA_DIR/operator.key) and the `form` command (the
wallet, CONFIG_DIR/wallet.json), so it sits among the shared helpers: it imports formation.crdt
and nothing else of ours.

File format (JSON, version 1):

    {"version": 1, "address": "0x<40 hex, lowercase>",
     "kdf": {"name": "scrypt", "n": 32768, "r": 8, "p": 1, "salt": "<hex>"},
     "cipher": {"name": "aes-256-gcm", "nonce": "<hex>", "ciphertext": "<hex>"}}

The address is stored in clear so an operator can see which key a file holds without the
password; after decryption it is re-derived and compared, so a file whose address was edited
(or a ciphertext swapped in from another file) is refused rather than silently used.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import sys
import unicodedata
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from formation.crdt.keys import PrivateKey, format_address

VERSION = 1
PASSWORD_ENV = "FORMATION_PASSWORD"

# Written into new files. n=2**15, r=8 costs 32 MiB and ~0.1 s per unlock.
SCRYPT_PARAMS = {"n": 2**15, "r": 8, "p": 1}
_SALT_BYTES = 16
_NONCE_BYTES = 12

# Bounds on parameters read from a file: a corrupted or hostile file must not make us allocate
# gigabytes or spin for minutes before it can even fail.
_MAX_SCRYPT_MEMORY = 1 << 30  # bytes: 128 * n * r
_MAX_SCRYPT_P = 16

# Binds the ciphertext to this format, so it cannot be reinterpreted under a future version.
_AAD = b"formation-keystore/1"


class KeystoreError(Exception):
    """A keystore or its password could not be used; the message is meant for the operator."""


def create_keystore(
    path: str | os.PathLike, password: str, secret: bytes | None = None
) -> PrivateKey:
    """Encrypt `secret` (a new random key when None) into a new keystore file at `path`."""
    path = Path(path)
    if path.exists():
        # Overwriting would destroy the only copy of an identity; make the operator move it.
        raise KeystoreError(f"keystore {path} already exists; refusing to overwrite it")
    if not password:
        raise KeystoreError("refusing to create a keystore with an empty password")
    try:
        key = PrivateKey(secret)
    except ValueError as exc:
        raise KeystoreError(f"cannot create keystore {path}: {exc}") from None

    salt = secrets.token_bytes(_SALT_BYTES)
    nonce = secrets.token_bytes(_NONCE_BYTES)
    dk = _derive(password, salt, **SCRYPT_PARAMS)
    ciphertext = AESGCM(dk).encrypt(nonce, key.secret, _AAD)
    doc = {
        "version": VERSION,
        "address": format_address(key.address),
        "kdf": {"name": "scrypt", **SCRYPT_PARAMS, "salt": salt.hex()},
        "cipher": {"name": "aes-256-gcm", "nonce": nonce.hex(), "ciphertext": ciphertext.hex()},
    }
    _write_private(path, (json.dumps(doc, indent=2) + "\n").encode())
    return key


def load_keystore(path: str | os.PathLike, password: str) -> PrivateKey:
    """Decrypt the keystore at `path`; KeystoreError says what is wrong if it cannot."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KeystoreError(f"keystore {path} does not exist") from None
    except OSError as exc:
        raise KeystoreError(f"cannot read keystore {path}: {exc.strerror or exc}") from None

    address, salt, params, nonce, ciphertext = _parse(path, raw)
    dk = _derive(password, salt, **params)
    try:
        secret = AESGCM(dk).decrypt(nonce, ciphertext, _AAD)
    except InvalidTag:
        # GCM cannot tell a wrong password from a damaged ciphertext; the password is by far
        # the more likely cause, and the structural checks above already passed.
        raise KeystoreError(f"wrong password for keystore {path}") from None
    try:
        key = PrivateKey(secret)
    except ValueError:
        raise KeystoreError(f"keystore {path} is corrupt: it does not hold a valid key") from None
    if key.address != address:
        raise KeystoreError(
            f"keystore {path} is corrupt: it holds the key of {format_address(key.address)}, "
            f"but its address field says {format_address(address)}"
        )
    return key


OPERATOR = "the operator keystore"


def resolve_password(config_password_file: str | None, *, prompt: bool, confirm: bool,
                     what: str = OPERATOR, env_name: str = PASSWORD_ENV) -> str:
    """Where the password of the keystore `what` (named in the prompt and errors) comes from, in
    order: its environment variable (`env_name`: FORMATION_PASSWORD for the operator's, the
    wallet's own for a user's wallet), the password file named in formation.toml ([node]
    password_file, the operator's only), an interactive prompt."""
    env = os.environ.get(env_name)
    if env is not None:
        if not env:
            raise KeystoreError(f"{env_name} is set but empty")
        return env
    if config_password_file is not None:
        return _read_password_file(Path(config_password_file).expanduser())
    if prompt and stdin_is_tty():
        return _prompt(what, confirm)
    ways = [f"set the {env_name} environment variable"]
    if what == OPERATOR:
        ways.append("name a file holding it as password_file in the [node] section of "
                    "formation.toml")
    ways.append("run form in a terminal to be prompted")
    other = ""
    if env_name != PASSWORD_ENV and os.environ.get(PASSWORD_ENV):
        other = (f" ({PASSWORD_ENV} is set, but it is the node operator key's password, never "
                 f"used for {what})")
    raise KeystoreError(f"no password for {what}{other}; provide one in one of "
                        f"{_COUNT[len(ways)]} ways: {', '.join(ways[:-1])}, or {ways[-1]}")


def password_available(config_password_file: str | None = None, env_name: str = PASSWORD_ENV) -> bool:
    """Whether resolve_password can find a password (or ask for one) without failing."""
    return bool(os.environ.get(env_name) or config_password_file or stdin_is_tty())


def stdin_is_tty() -> bool:
    """Whether a prompt on stdin can be answered (False for a replaced or closed stdin)."""
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


_COUNT = {2: "two", 3: "three"}


# ---- internals --------------------------------------------------------------------------------


def _normalize(password: str) -> str:
    # The same password typed on two systems can arrive in different Unicode forms
    # (composed vs decomposed accents); NFC makes them unlock the same file.
    return unicodedata.normalize("NFC", password)


def _derive(password: str, salt: bytes, *, n: int, r: int, p: int) -> bytes:
    kdf = Scrypt(salt=salt, length=32, n=n, r=r, p=p)
    return kdf.derive(_normalize(password).encode("utf-8"))


def _parse(path: Path, raw: bytes) -> tuple[bytes, bytes, dict, bytes, bytes]:
    """Check the structure of a keystore file before any expensive work is done on it."""

    def bad(what: str) -> KeystoreError:
        return KeystoreError(f"keystore {path} is corrupt: {what}")

    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise bad("expected a JSON object")

    version = doc.get("version")
    if version != VERSION:
        if isinstance(version, int) and not isinstance(version, bool):
            raise KeystoreError(
                f"keystore {path} has version {version}; this version of form reads version "
                f"{VERSION} only"
            )
        raise bad("missing or invalid 'version'")

    kdf, cipher = doc.get("kdf"), doc.get("cipher")
    if not isinstance(kdf, dict) or kdf.get("name") != "scrypt":
        raise bad("'kdf' must be an object with name 'scrypt'")
    if not isinstance(cipher, dict) or cipher.get("name") != "aes-256-gcm":
        raise bad("'cipher' must be an object with name 'aes-256-gcm'")

    params = {}
    for name in ("n", "r", "p"):
        value = kdf.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad(f"kdf.{name} must be a positive integer")
        params[name] = value
    n, r, p = params["n"], params["r"], params["p"]
    if n < 2 or n & (n - 1) or 128 * n * r > _MAX_SCRYPT_MEMORY or p > _MAX_SCRYPT_P:
        raise bad(f"scrypt parameters out of range (n={n}, r={r}, p={p})")

    address = _hex_field(doc, "address", 20, bad, prefixed=True)
    salt = _hex_field(kdf, "salt", None, bad, where="kdf.")
    nonce = _hex_field(cipher, "nonce", _NONCE_BYTES, bad, where="cipher.")
    ciphertext = _hex_field(cipher, "ciphertext", 32 + 16, bad, where="cipher.")  # key + GCM tag
    if len(salt) < 8:
        raise bad("kdf.salt is too short")
    return address, salt, params, nonce, ciphertext


def _hex_field(obj: dict, name: str, size: int | None, bad, *, where: str = "",
               prefixed: bool = False) -> bytes:
    value = obj.get(name)
    if not isinstance(value, str):
        raise bad(f"missing or non-string '{where}{name}'")
    if prefixed:
        if not value.startswith("0x"):
            raise bad(f"'{where}{name}' must start with 0x")
        value = value[2:]
    try:
        data = bytes.fromhex(value)
    except ValueError:
        raise bad(f"'{where}{name}' is not hexadecimal") from None
    if size is not None and len(data) != size:
        raise bad(f"'{where}{name}' must be {size} bytes, got {len(data)}")
    return data


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600 so a reader never sees a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # O_EXCL + 0600 at creation: the secret-bearing file is never readable by others,
        # not even between open() and a later chmod().
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the umask can only remove bits; make the mode exact
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.close(fd)
        if path.exists():  # another process may have created it while we derived the key
            raise KeystoreError(f"keystore {path} already exists; refusing to overwrite it")
        os.replace(tmp, path)
    except OSError as exc:
        raise KeystoreError(f"cannot write keystore {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; without it a crash can leave no keystore at all.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_password_file(path: Path) -> str:
    where = "password file"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeystoreError(
            f"{where} {path} (node.password_file in formation.toml) does not exist"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise KeystoreError(f"cannot read {where} {path}: {reason or exc}") from None
    # Editors and `echo pw > file` add a newline that is not part of the password.
    password = text.rstrip("\r\n")
    if not password:
        raise KeystoreError(f"{where} {path} is empty")
    return password


def _prompt(what: str, confirm: bool) -> str:
    password = getpass.getpass(f"Password for {what}: ")
    if not password:
        raise KeystoreError("empty password")
    if confirm and getpass.getpass("Repeat the password: ") != password:
        raise KeystoreError("the two passwords do not match")
    return password
