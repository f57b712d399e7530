"""Typed records: dataclasses whose fields carry a checker, validated from untrusted dicts.

Every record that enters the state passes `Record.from_dict`, which rejects unknown fields and
checks each known one, raising RecordError naming the field (dotted for nested records).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable
from typing import Any, ClassVar, Self

from .keys import format_address, parse_address
from .strict import text_problem


class RecordError(ValueError):
    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r}: {problem}")
        self.field = field
        self.problem = problem


Check = Callable[[Any], Any]  # returns the normalized value or raises ValueError


def field(check: Check, *, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if default is dataclasses.MISSING and factory is dataclasses.MISSING:
        return dataclasses.field(metadata={"check": check})
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"check": check})
    return dataclasses.field(default=default, metadata={"check": check})


class Record:
    """Mixin for dataclass records. Subclasses are `@dataclasses.dataclass(frozen=True)`."""

    _specs_cache: ClassVar[dict[type, tuple]] = {}

    @classmethod
    def _specs(cls) -> tuple:
        got = Record._specs_cache.get(cls)
        if got is None:
            got = tuple(
                (f.name, f.metadata["check"], f.default, f.default_factory)
                for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            )
            Record._specs_cache[cls] = got
        return got

    @classmethod
    def normalize(cls, data: Any, *, prefix: str = "") -> dict:
        """Check every field of an untrusted dict; return the normalized dict, defaults filled.

        This is the hot path of op validation, so it builds the dict directly instead of going
        through a dataclass instance and back.
        """
        if not isinstance(data, dict):
            raise RecordError(prefix or cls.__name__, f"must be an object, got {type(data).__name__}")
        out = {}
        seen = 0
        for name, check, default, factory in cls._specs():
            if name in data:
                seen += 1
                try:
                    out[name] = check(data[name])
                except RecordError as exc:
                    raise RecordError(f"{prefix}{name}.{exc.field}", exc.problem) from None
                except (ValueError, TypeError) as exc:
                    raise RecordError(prefix + name, str(exc)) from None
            elif factory is not dataclasses.MISSING:
                out[name] = factory()
            elif default is not dataclasses.MISSING:
                out[name] = default
            else:
                raise RecordError(prefix + name, "is required")
        if seen != len(data):
            for k in data:
                if k not in out:
                    raise RecordError(prefix + str(k), f"unknown field for {cls.__name__}")
        return out

    @classmethod
    def from_dict(cls, data: Any, *, prefix: str = "") -> Self:
        return cls(**cls.normalize(data, prefix=prefix))

    def to_dict(self) -> dict:
        return {name: _plain(getattr(self, name)) for name, *_ in self._specs()}


_SCALAR_TYPES = frozenset({str, int, bool, float, type(None)})


def _plain(v: Any) -> Any:
    if type(v) in _SCALAR_TYPES:
        return v
    if isinstance(v, Record):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


# ---- checkers -------------------------------------------------------------------------------

def text(max_len: int, *, min_len: int = 0, pattern: str | None = None, what: str = "") -> Check:
    rx = re.compile(pattern) if pattern else None

    def check(v):
        if not isinstance(v, str):
            raise ValueError(f"must be a string, got {type(v).__name__}")
        if not min_len <= len(v) <= max_len:
            raise ValueError(f"must be {min_len}..{max_len} characters, got {len(v)}")
        if rx is not None and not rx.fullmatch(v):
            raise ValueError(f"must be {what or 'of the form ' + pattern}")
        problem = text_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    return check


SLUG = text(64, min_len=1, pattern=r"[a-z0-9][a-z0-9._-]*", what="lowercase letters, digits, '.', '_' or '-'")
NAME = text(64, min_len=1, pattern=r"[A-Za-z0-9][A-Za-z0-9 ._-]*", what="letters, digits, spaces, '.', '_' or '-'")
DESCRIPTION = text(4096)
OBJECT_ID = text(64, min_len=1, pattern=r"[a-z0-9][a-z0-9_-]*", what="lowercase letters, digits, '_' or '-'")


def integer(lo: int, hi: int) -> Check:
    def check(v):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"must be an integer, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {v}")
        return v

    return check


def number(lo: float, hi: float) -> Check:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"must be a number, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {v}")
        return v

    return check


def boolean(v):
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, got {type(v).__name__}")
    return v


_CANONICAL_ADDRESS = re.compile(r"0x[0-9a-f]{40}")


def address(v):
    """An Ethereum address; normalized to lowercase 0x-hex."""
    if type(v) is str and _CANONICAL_ADDRESS.fullmatch(v):
        return v
    return format_address(parse_address(v))


def one_of(*values: str) -> Check:
    allowed = frozenset(values)

    def check(v):
        if v not in allowed:
            raise ValueError(f"must be one of {', '.join(sorted(allowed))}, got {v!r}")
        return v

    return check


def optional(inner: Check) -> Check:
    def check(v):
        return None if v is None else inner(v)

    return check


def list_of(inner: Check, max_items: int, *, unique: bool = False) -> Check:
    def check(v):
        if not isinstance(v, list):
            raise ValueError(f"must be a list, got {type(v).__name__}")
        if len(v) > max_items:
            raise ValueError(f"must have at most {max_items} items, got {len(v)}")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(inner(x))
            except ValueError as exc:
                raise ValueError(f"item {i}: {exc}") from None
        if unique and len(set(map(repr, out))) != len(out):
            raise ValueError("must not contain duplicates")
        return out

    return check


def map_of(key: Check, value: Check, max_items: int) -> Check:
    def check(v):
        if not isinstance(v, dict):
            raise ValueError(f"must be an object, got {type(v).__name__}")
        if len(v) > max_items:
            raise ValueError(f"must have at most {max_items} entries, got {len(v)}")
        out = {}
        for k, x in v.items():
            try:
                nk = key(k)
                out[nk] = value(x)
            except ValueError as exc:
                raise ValueError(f"entry {k!r}: {exc}") from None
        return out

    return check


def nested(cls: type[Record]) -> Check:
    def check(v):
        return cls.normalize(v)

    return check


def ip_address(v):
    if not isinstance(v, str):
        raise ValueError("must be an IP address string")
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ValueError(f"{v!r} is not an IP address") from None


def ip_network(v):
    if not isinstance(v, str):
        raise ValueError("must be a CIDR string like 10.1.2.0/24")
    try:
        return str(ipaddress.ip_network(v, strict=True))
    except ValueError as exc:
        raise ValueError(f"{v!r} is not a network in CIDR form ({exc})") from None


def endpoint(v):
    """host:port with an IP or DNS host; IPv6 in brackets."""
    if not isinstance(v, str) or len(v) > 262:
        raise ValueError("must be a 'host:port' string")
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{v!r} is not host:port with a port in 1..65535")
    if host.startswith("[") and host.endswith("]"):
        ip_address(host[1:-1])
    elif not is_host_name(host):
        raise ValueError(f"{host!r} is not an IPv4 address or DNS name")
    return v


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*")


def is_host_name(text: str) -> bool:
    """A DNS name: labels of 1-63 letters, digits and inner hyphens, 253 characters in all, no
    trailing dot. The one definition for records, endpoints, domains and the node's settings."""
    return _HOST_NAME.fullmatch(text) is not None

TAGS = list_of(text(32, min_len=1, pattern=r"[a-z0-9][a-z0-9._+-]*", what="a lowercase tag"), 32, unique=True)
METADATA = map_of(text(64, min_len=1), text(1024), 64)
TIMESTAMP = integer(0, 2**62)
# secrets (formation/sealed.py): a name becomes an environment variable in the guest
SECRET_NAME = text(64, min_len=1, pattern=r"[A-Za-z_][A-Za-z0-9_]*", what="a letter or '_', then letters, digits or '_'")
SEALED_BOX = text(4096, min_len=16, pattern=r"[A-Za-z0-9+/]+={0,2}", what="a base64 sealed box")
SHA256_HEX = text(64, min_len=64, pattern=r"[0-9a-f]{64}", what="64 lowercase hex digits")
