"""The checks of node settings: each takes an untrusted value and where it came from, and
returns the value to use or raises Bad saying what was expected (config.py adds where)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from formation.crdt.schema import is_host_name


class ConfigError(Exception):
    """A setting that cannot be used; the message names where it came from and the key."""

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")


@dataclass(frozen=True)
class Origin:
    source: str  # a file path, "defaults" or "command line"
    name: str | None  # the flag an override came from, if known
    base: Path  # what relative paths are relative to

    def error(self, dotted: str, message: str) -> ConfigError:
        where = self.name or dotted
        if self.source == "command line" and self.name:
            return ConfigError(f"{where} ({dotted}): {message}")
        return ConfigError(f"{self.source}: {where}: {message}")


Checker = Callable[[Any, "Origin"], Any]


def show(value: Any) -> str:
    if value is None:
        return "no value"
    kind = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)
    return f"{kind} {value!r}" if not isinstance(value, (list, dict)) else kind


class Bad(Exception):
    """Raised by a checker with what was expected; _check adds where."""


def _int(value: Any) -> int:
    # TOML booleans are Python bools, which are ints: `port = true` must not mean port 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise Bad(f"expected an integer, got {show(value)}")
    return value


def port(value: Any, _origin: Origin) -> int:
    value = _int(value)
    if not 1 <= value <= 65535:
        raise Bad(f"expected a port number from 1 to 65535, got {value}")
    return value


def positive(value: Any, _origin: Origin) -> int:
    value = _int(value)
    if value < 1:
        raise Bad(f"expected a positive integer, got {value}")
    return value


def boolean(value: Any, _origin: Origin) -> bool:
    if not isinstance(value, bool):
        raise Bad(f"expected true or false, got {show(value)}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Bad(f"expected a non-empty string, got {show(value)}")
    return value


def string(value: Any, _origin: Origin) -> str:
    """Any text, empty included (what it must be is checked where it is used)."""
    if not isinstance(value, str) or any(ord(ch) < 32 for ch in value):
        raise Bad(f"expected a string on one line, got {show(value)}")
    return value


def path(value: Any, origin: Origin) -> str:
    path = Path(_string(value)).expanduser()
    return str(path if path.is_absolute() else (origin.base / path))


def optional_path(value: Any, origin: Origin) -> str | None:
    return None if value is None else path(value, origin)


def _host_name(text: str) -> bool:
    return is_host_name(text[:-1] if text.endswith(".") else text)  # a fully qualified name too


def host(value: Any, _origin: Origin) -> str:
    value = _string(value)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _host_name(value):
            raise Bad(f"expected an IP address or host name, got {value!r}") from None
    return value


def cidr(value: Any, _origin: Origin) -> str:
    value = _string(value)
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as exc:
        raise Bad(f"expected a network like 10.42.0.0/16, got {value!r} ({exc})") from None


def choice(*choices: str, bools: bool = False) -> Checker:
    def check(value: Any, _origin: Origin) -> str:
        if bools and isinstance(value, bool):
            return "true" if value else "false"
        if not isinstance(value, str) or value not in choices:
            raise Bad(f"expected one of {', '.join(choices)}, got {show(value)}")
        return value

    return check


def auto_or(inner: Checker) -> Checker:
    return lambda value, origin: value if value == "auto" else inner(value, origin)


def empty_or(inner: Checker) -> Checker:
    return lambda value, origin: "" if value == "" else inner(value, origin)


def ifname(value: Any, _origin: Origin) -> str:
    value = _string(value)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", value):
        raise Bad(f"expected a network interface name (at most 15 letters, digits, '_', '.', '-'), got {value!r}")
    return value


def synchronous(value: Any, _origin: Origin) -> str:
    if not isinstance(value, str) or value.upper() not in SYNCHRONOUS_MODES:
        raise Bad(f"expected one of {', '.join(SYNCHRONOUS_MODES)}, got {show(value)}")
    # Goes into a PRAGMA verbatim, so it must be one of these words and nothing else.
    return value.upper()


def listen(value: Any, _origin: Origin) -> str:
    value = _string(value)
    try:
        parts = parse_multiaddr(value)
    except ValueError as exc:
        example = "/ip4/0.0.0.0/tcp/53333"
        raise Bad(f"expected a multiaddr like {example}, got {value!r} ({exc})") from None
    if [p for p, _ in parts] not in (["ip4", "tcp"], ["ip6", "tcp"]):
        raise Bad(f"expected a multiaddr of the form /ip4/ADDRESS/tcp/PORT, got {value!r}")
    return value


def bootstrap(value: Any, _origin: Origin) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise Bad(f"expected an array of multiaddrs, got {show(value)}")
    for i, item in enumerate(value):
        example = "/ip4/192.0.2.1/tcp/53333/p2p/16Uiu2HAm..."
        if not isinstance(item, str):
            raise Bad(f"item {i}: expected a multiaddr string like {example}, got {show(item)}")
        try:
            parts = parse_multiaddr(item)
        except ValueError as exc:
            msg = f"item {i}: expected a multiaddr like {example}, got {item!r} ({exc})"
            raise Bad(msg) from None
        protocols = [p for p, _ in parts]
        # The /p2p/ peer id is required: it is what the Noise handshake authenticates, so
        # without it we could not know that we reached the peer we meant.
        if protocols[1:] != ["tcp", "p2p"] or protocols[0] not in _HOST_PROTOCOLS:
            raise Bad(f"item {i}: expected /ip4|ip6|dns/HOST/tcp/PORT/p2p/PEER_ID, got {item!r}")
    return tuple(value)


def announce(value: Any, _origin: Origin) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise Bad(f"expected an array of multiaddrs, got {show(value)}")
    for i, item in enumerate(value):
        try:
            parts = parse_multiaddr(item) if isinstance(item, str) else None
        except ValueError as exc:
            raise Bad(f"item {i}: {exc}") from None
        if not parts or [p for p, _ in parts][1:] != ["tcp"] or parts[0][0] not in _HOST_PROTOCOLS:
            raise Bad(f"item {i}: expected /ip4|ip6|dns/HOST/tcp/PORT, got {show(item)}")
    return tuple(value)


_HOST_PROTOCOLS = ("ip4", "ip6", "dns", "dns4", "dns6")
_BASE58 = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{20,128}$")


def parse_multiaddr(text: str) -> list[tuple[str, str]]:
    """Split the text form of a multiaddr into (protocol, value) pairs, checking each value.

    Only the protocols a node uses today (IP/DNS, TCP, peer id); a small parser instead of a
    dependency, since nothing else of the multiaddr library is needed here.
    """
    if not text.startswith("/"):
        raise ValueError("a multiaddr starts with /")
    words = text[1:].split("/")
    if len(words) % 2:
        raise ValueError("every protocol needs a value")
    parts = list(zip(words[::2], words[1::2], strict=True))
    for proto, val in parts:
        if proto == "ip4":
            try:
                ipaddress.IPv4Address(val)
            except ValueError:
                raise ValueError(f"bad IPv4 address {val!r}") from None
        elif proto == "ip6":
            try:
                ipaddress.IPv6Address(val)
            except ValueError:
                raise ValueError(f"bad IPv6 address {val!r}") from None
        elif proto in ("dns", "dns4", "dns6"):
            if not _host_name(val):
                raise ValueError(f"bad host name {val!r}")
        elif proto == "tcp":
            if not val.isdigit() or not 1 <= int(val) <= 65535:
                raise ValueError(f"bad TCP port {val!r}, expected 1 to 65535")
        elif proto == "p2p":
            if not _BASE58.match(val):
                raise ValueError(f"bad peer id {val!r}")
        else:
            raise ValueError(f"unsupported protocol {proto!r}")
    return parts



