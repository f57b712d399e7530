"""The key reader: every command that needs a key (the node operator's or the user's wallet) finds,
reads, decrypts or creates it here, with the same password rules and messages.

A KeyFile names the keystore (formation/keystore.py: scrypt + AES-256-GCM), what to call it in
prompts and errors, the message when it is missing, and the exit code of any failure to read it:
1 for the operator's key (`form key`, a node's own file), 2 for the wallet (a user's input, like a
bad flag). The password comes from the key's own environment variable (FORMATION_PASSWORD for the
operator's key, FORM_WALLET_PASSWORD for the wallet: a node's password never unlocks a wallet by
accident), [node] password_file (the operator's only) or a prompt.
"""

from __future__ import annotations

import getpass
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from formation.cli.output import EXIT_FAILURE, CliError, note
from formation.crdt.keys import PrivateKey
from formation.keystore import (
    OPERATOR,
    PASSWORD_ENV,
    KeystoreError,
    create_keystore,
    load_keystore,
    password_available,
    resolve_password,
    stdin_is_tty,
)


@dataclass(frozen=True)
class KeyFile:
    path: Path
    what: str  # "the operator keystore", "the wallet PATH": in prompts and errors
    missing: str  # the error when there is no file: where it was looked for, how to make one
    exists: str  # the error when creating it over an existing one
    code: int  # exit code when it cannot be read, or is there already when creating it
    password_file: str | None = None
    password_env: str = PASSWORD_ENV  # the environment variable that holds its password


WALLET_PASSWORD_ENV = "FORM_WALLET_PASSWORD"  # the wallet's (a user's key), not the node's


def operator_key(path: Path, password_file: str | None) -> KeyFile:
    return KeyFile(path, OPERATOR,
                   missing=f"no keystore at {path}; create one with `form node` or `form key import`",
                   exists=f"keystore {path} already exists; refusing to overwrite it",
                   code=EXIT_FAILURE, password_file=password_file)


def read_key(kf: KeyFile) -> PrivateKey:
    """Unlock the key in `kf.path`, asking for its password if there is no other source."""
    if not kf.path.exists():
        raise CliError(kf.missing, kf.code)
    try:
        password = resolve_password(kf.password_file, prompt=True, confirm=False, what=kf.what,
                                    env_name=kf.password_env)
        return load_keystore(kf.path, password)
    except KeystoreError as exc:
        raise CliError(str(exc), kf.code) from None


def read_key_if_unlockable(kf: KeyFile) -> PrivateKey | None:
    """The key when there is one and a password can be had without failing; else None (for
    reads that anyone may make but that show more to a signer)."""
    if not kf.path.exists():
        return None
    if not password_available(kf.password_file, kf.password_env):
        note(f"no password for {kf.what} ({kf.password_env} is not set): reading unsigned, so "
             "private records are not shown")
        return None
    return read_key(kf)


def new_key(kf: KeyFile, *, import_hex: bool, prepare: Callable[[], None] = lambda: None
            ) -> PrivateKey:
    """Encrypt a new key (with `import_hex`, one read from stdin) into `kf.path`, which must not
    exist: the only copy of an identity is never overwritten. Everything is asked for (the key,
    the password twice) before `prepare` makes the directories and the file is written."""
    if kf.path.exists():
        raise CliError(kf.exists, kf.code)
    secret = read_hex_key(kf.code).secret if import_hex else None
    try:
        password = resolve_password(kf.password_file, prompt=True, confirm=True, what=kf.what,
                                    env_name=kf.password_env)
    except KeystoreError as exc:
        raise CliError(str(exc), kf.code) from None
    prepare()
    try:
        return create_keystore(kf.path, password, secret)
    except KeystoreError as exc:
        raise CliError(str(exc), EXIT_FAILURE) from None


def read_hex_key(code: int) -> PrivateKey:
    """A private key, 64 hex digits (0x optional), from stdin: typed without echo in a terminal,
    else read whole. The input is never repeated in an error: it may be a real key with a typo."""
    if stdin_is_tty():
        text = getpass.getpass("Private key (hex): ")
    else:
        text = sys.stdin.read() if sys.stdin is not None else ""
    text = text.strip()
    if not text:
        raise CliError("no private key on stdin (expected 64 hex digits, optionally 0x-prefixed)",
                       code)
    try:
        return PrivateKey.from_hex(text)
    except ValueError as exc:
        reason = "expected 64 hex digits" if "hex" in str(exc) or "32 bytes" in str(exc) else str(exc)
        raise CliError(f"stdin does not hold a private key ({reason})", code) from None
