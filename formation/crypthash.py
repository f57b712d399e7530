"""Client side of "no password in clear in any op" (crdt/passwords.py): the CLI rewrites each
clear USER passwd of a Formfile into a crypt hash before the text leaves the machine.

The hash is yescrypt (`$y$`) computed by the system's libcrypt (libxcrypt: libcrypt.so.1, on
every Debian and Ubuntu) through ctypes, or SHA-512 crypt (`$6$`, computed here) where there is
no libcrypt or it has no yescrypt. Python's `crypt` module is deprecated (PEP 594) and not used.

The salt is deterministic: HMAC-SHA256 keyed by the user's signing key over the Formfile's NAME,
the username and the password. So the same client building the same Formfile sends the same
text every time (its image id, which hashes the canonical Formfile, is the same, and the image
cache hits), while two users, or two Formfiles, with one password get different hashes. The key
never leaves the HMAC; the salt says nothing about it.

Only the text sent is rewritten (the Formfile on disk is not touched), line for line: a USER
line is re-written on its first physical line and its continuation lines are left blank, so
every line number (the build's errors name them) stays where it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import hmac
import json
import shlex
from functools import lru_cache

from formation.crdt.passwords import (
    clear_passwords,
    instruction,
    is_crypt_hash,
    logical_spans,
    split_words,
    user_field,
)

SALT_CONTEXT = b"formation formfile passwd salt v1\0"
_B64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
CRYPT_DATA_SIZE = 32768  # sizeof(struct crypt_data) in libxcrypt's crypt.h
GENSALT_OUTPUT_SIZE = 192  # CRYPT_GENSALT_OUTPUT_SIZE


class PasswordError(ValueError):
    """A Formfile password that cannot be hashed here (the message says which line and why)."""


# ---- the hash --------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _libcrypt():
    """libxcrypt's crypt_gensalt_rn and crypt_rn, or None where there is none."""
    for name in ("libcrypt.so.1", ctypes.util.find_library("crypt")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            gensalt, crypt_rn = lib.crypt_gensalt_rn, lib.crypt_rn
        except (OSError, AttributeError):
            continue
        gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_int]
        gensalt.restype = ctypes.c_char_p
        crypt_rn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
        crypt_rn.restype = ctypes.c_char_p
        return gensalt, crypt_rn
    return None


def yescrypt(password: str, salt: bytes) -> str | None:
    """`$y$...` by libcrypt with these salt bytes (default cost), or None where it cannot."""
    lib = _libcrypt()
    if lib is None:
        return None
    gensalt, crypt_rn = lib
    out = ctypes.create_string_buffer(GENSALT_OUTPUT_SIZE)
    setting = gensalt(b"$y$", 0, salt, len(salt), out, len(out))
    if not setting:
        return None
    data = ctypes.create_string_buffer(CRYPT_DATA_SIZE)  # zeroed, as crypt_rn wants it
    got = crypt_rn(password.encode(), setting, data, CRYPT_DATA_SIZE)
    if not got or got.startswith(b"*"):
        return None
    text = got.decode("ascii")
    return text if is_crypt_hash(text) else None


def _b64_from(digest: bytes, order: list[tuple[int, int, int]], tail: list[int]) -> str:
    out = []
    for a, b, c in order:
        w = (digest[a] << 16) | (digest[b] << 8) | digest[c]
        for _ in range(4):
            out.append(_B64[w & 0x3F])
            w >>= 6
    w = 0
    for i in tail:
        w = (w << 8) | digest[i]
    for _ in range((len(tail) * 8 + 5) // 6):
        out.append(_B64[w & 0x3F])
        w >>= 6
    return "".join(out)


# crypt's order of the 64 digest bytes: 21 rotating triples, then byte 63 alone
_SHA512_ORDER = [((i, i + 21, i + 42), (i + 21, i + 42, i), (i + 42, i, i + 21))[i % 3] for i in range(21)]


def sha512_crypt(password: str, salt: str, rounds: int = 5000) -> str:
    """SHA-512 crypt (`$6$`, Drepper's specification), as glibc and libxcrypt compute it."""
    key, s = password.encode(), salt[:16].encode()
    b = hashlib.sha512(key + s + key).digest()
    a = hashlib.sha512(key + s)
    n = len(key)
    while n > 64:
        a.update(b)
        n -= 64
    a.update(b[:n])
    n = len(key)
    while n:
        a.update(b if n & 1 else key)
        n >>= 1
    da = a.digest()
    dp = hashlib.sha512(key * len(key)).digest()
    p = (dp * (len(key) // 64 + 1))[:len(key)]
    ds = hashlib.sha512(s * (16 + da[0])).digest()
    sv = (ds * (len(s) // 64 + 1))[:len(s)]
    c = da
    for i in range(rounds):
        h = hashlib.sha512(p if i & 1 else c)
        if i % 3:
            h.update(sv)
        if i % 7:
            h.update(p)
        h.update(c if i & 1 else p)
        c = h.digest()
    body = _b64_from(c, _SHA512_ORDER, [63])
    head = f"$6$rounds={rounds}$" if rounds != 5000 else "$6$"
    return f"{head}{salt[:16]}${body}"


def salt_bytes(secret: bytes, name: str, username: str, password: str) -> bytes:
    """16 salt bytes: the same for one client, Formfile NAME, username and password."""
    msg = SALT_CONTEXT + json.dumps([name, username, password], ensure_ascii=False).encode()
    return hmac.new(secret, msg, hashlib.sha256).digest()[:16]


def crypt_hash(password: str, salt: bytes) -> str:
    """yescrypt through libcrypt, else SHA-512 crypt, of `password` with these salt bytes."""
    if "\0" in password:
        raise PasswordError("a password cannot hold a NUL character")
    got = yescrypt(password, salt)
    if got is not None:
        return got
    return sha512_crypt(password, "".join(_B64[b & 0x3F] for b in salt))


# ---- the Formfile ----------------------------------------------------------------------------

def _formfile_name(text: str) -> str:
    for _, _, line in logical_spans(text):
        word, arg = instruction(line)
        if word == "NAME" and arg:
            return arg
    return ""


def hash_passwords(text: str, secret: bytes) -> str:
    """The Formfile text with each USER passwd in clear replaced by its crypt hash (salted from
    `secret`, the user's signing key); the same text when there is none. PasswordError when a
    password in clear is left (a USER line that cannot be split into words): nothing that
    holds one is sent."""
    if not clear_passwords(text):
        return text
    name = _formfile_name(text)
    lines = text.splitlines(keepends=True)
    for start, end, line in logical_spans(text):
        word, arg = instruction(line)
        if word != "USER" or not arg:
            continue
        try:
            words = split_words(arg)
        except ValueError:
            continue  # reported below
        fields = [user_field(w) for w in words]
        if not any(k == "passwd" and sep and not is_crypt_hash(v) for k, sep, v in fields):
            continue
        username = next((v for k, sep, v in fields if k == "username" and sep), "")
        out = []
        for w, (k, sep, v) in zip(words, fields, strict=True):
            if k == "passwd" and sep and not is_crypt_hash(v):
                w = "passwd:" + crypt_hash(v, salt_bytes(secret, name, username, v))
            out.append(shlex.quote(w))
        first = lines[start - 1]
        lines[start - 1] = "USER " + " ".join(out) + first[len(first.rstrip("\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")):]
        for i in range(start, end):  # its continuation lines: blank, so every line keeps its number
            raw = lines[i]
            lines[i] = raw[len(raw.rstrip("\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")):]
    result = "".join(lines)
    left = clear_passwords(result)
    if left:
        no, why = left[0]
        raise PasswordError(f"line {no}: {why}")
    return result
