"""formation.toml: the node's settings, checked once at start (DESIGN.md §7).

Every setting has a default (DEFAULTS, mirrored by the repository's formation.toml), so a node
runs with no file at all. A file overrides defaults, and `overrides` (command-line flags)
override the file. Anything unknown or ill-typed is an error naming the file and the key: a typo
in a config file must not silently leave a default in force.

Paths (node.data_dir, node.password_file) are expanded (`~`) and made absolute at load time;
relative paths in a file are relative to that file's directory, relative paths given as
overrides are relative to the current directory.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEYSTORE_FILE = "operator.key"
STATE_FILE = "state.db"

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")

# The defaults. formation.toml at the repository root spells out the same values with comments;
# tests/unit/test_config.py checks that the two agree.
DEFAULTS: dict[str, dict[str, Any]] = {
    "node": {"data_dir": "~/.local/share/formation", "log_json": False, "password_file": None,
             "heartbeat_seconds": 30},
    "api": {"host": "127.0.0.1", "port": 3004},
    "p2p": {"listen": "/ip4/0.0.0.0/tcp/53333", "bootstrap": [], "announce": [],
            "sync_interval_seconds": 10, "sync_sessions_per_peer": 1, "sync_sessions": 8,
            "sync_budget_mb": 64, "sync_budget_seconds": 60},
    "mesh": {"wireguard_port": 51820, "overlay_cidr": "10.42.0.0/16"},
    "dns": {"port": 5453},
    "vm": {"enabled": "auto", "accel": "auto", "machine": "microvm", "bridge": "formbr0",
           "subnet": "auto", "cache_dir": "", "build_timeout_seconds": 1800, "build_network": False,
           "context_limit_mb": 64},
    "store": {
        "synchronous": "FULL",
        "pending_ops_per_source": 25_000,
        "pending_bytes_per_source": 32 * 1024 * 1024,
    },
}


class ConfigError(Exception):
    """A setting that cannot be used; the message names where it came from and the key."""


@dataclass(frozen=True)
class NodeConfig:
    data_dir: str
    log_json: bool
    password_file: str | None
    heartbeat_seconds: int


@dataclass(frozen=True)
class ApiConfig:
    host: str
    port: int


@dataclass(frozen=True)
class P2pConfig:
    listen: str
    bootstrap: tuple[str, ...]
    announce: tuple[str, ...]
    sync_interval_seconds: int
    sync_sessions_per_peer: int
    sync_sessions: int
    sync_budget_mb: int
    sync_budget_seconds: int


@dataclass(frozen=True)
class MeshConfig:
    wireguard_port: int
    overlay_cidr: str


@dataclass(frozen=True)
class DnsConfig:
    port: int


@dataclass(frozen=True)
class VmConfig:
    enabled: str  # "auto" | "true" | "false"
    accel: str
    machine: str
    bridge: str
    subnet: str  # "auto" or a CIDR
    cache_dir: str  # "" = <data_dir>/cache
    build_timeout_seconds: int
    build_network: bool
    context_limit_mb: int


@dataclass(frozen=True)
class StoreConfig:
    synchronous: str
    pending_ops_per_source: int
    pending_bytes_per_source: int


@dataclass(frozen=True)
class Config:
    node: NodeConfig
    api: ApiConfig
    p2p: P2pConfig
    mesh: MeshConfig
    dns: DnsConfig
    vm: VmConfig
    store: StoreConfig

    @property
    def data_dir(self) -> Path:
        return Path(self.node.data_dir)

    @property
    def keystore_path(self) -> Path:
        return self.data_dir / KEYSTORE_FILE

    @property
    def state_path(self) -> Path:
        return self.data_dir / STATE_FILE


_SECTIONS: dict[str, type] = {
    "node": NodeConfig,
    "api": ApiConfig,
    "p2p": P2pConfig,
    "mesh": MeshConfig,
    "dns": DnsConfig,
    "vm": VmConfig,
    "store": StoreConfig,
}


def load_config(
    path: str | os.PathLike | None,
    overrides: Mapping[str, Any] | None = None,
    *,
    override_names: Mapping[str, str] | None = None,
) -> Config:
    """Defaults, then the TOML file at `path` (if any), then `overrides`.

    `overrides` maps dotted keys ("api.port") to values; nested {"api": {"port": ...}} is also
    accepted. `override_names` says how each override was given (e.g. {"api.port":
    "--api-port"}) so an error can point at the flag instead of the key.
    """
    values = copy.deepcopy(DEFAULTS)
    # Which source set each key, for error messages and for resolving relative paths.
    origin: dict[str, _Origin] = {
        f"{s}.{k}": _Origin("defaults", None, Path.cwd()) for s in DEFAULTS for k in DEFAULTS[s]
    }

    if path is not None:
        path = Path(path)
        file_values = _read_toml(path)
        src = _Origin(str(path), None, path.resolve().parent)
        for dotted, value in _flatten(file_values, src).items():
            section, key = dotted.split(".", 1)
            values[section][key] = value
            origin[dotted] = src

    names = override_names or {}
    for dotted, value in _flatten(overrides or {}, _Origin("overrides", None, Path.cwd())).items():
        section, key = dotted.split(".", 1)
        values[section][key] = value
        origin[dotted] = _Origin("command line", names.get(dotted), Path.cwd())

    sections = {}
    for section, cls in _SECTIONS.items():
        fields = {}
        for key, value in values[section].items():
            dotted = f"{section}.{key}"
            fields[key] = _check(dotted, value, origin[dotted])
        sections[section] = cls(**fields)
    return Config(**sections)


def with_tcp_port(multiaddr: str, port: int) -> str:
    """`multiaddr` with its /tcp/ port replaced (for --p2p-port)."""
    parts = _parse_multiaddr(multiaddr)
    return "".join(f"/{p}/{port if p == 'tcp' else v}" for p, v in parts)


# ---- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Origin:
    source: str  # a file path, "defaults" or "command line"
    name: str | None  # the flag an override came from, if known
    base: Path  # what relative paths are relative to

    def error(self, dotted: str, message: str) -> ConfigError:
        where = self.name or dotted
        if self.source == "command line" and self.name:
            return ConfigError(f"{where} ({dotted}): {message}")
        return ConfigError(f"{self.source}: {where}: {message}")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: the file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _flatten(tree: Mapping[str, Any], origin: _Origin) -> dict[str, Any]:
    """{"api": {"port": 1}} or {"api.port": 1} -> {"api.port": 1}; unknown names are errors."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        if "." in name:
            section, key = name.split(".", 1)
            _known(section, key, origin)
            flat[name] = value
            continue
        _known(name, None, origin)
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{origin.source}: {name}: expected a table [{name}], got {_show(value)}"
            )
        for key, sub in value.items():
            _known(name, key, origin)
            flat[f"{name}.{key}"] = sub
    return flat


def _known(section: str, key: str | None, origin: _Origin) -> None:
    if section not in _SECTIONS:
        hint = _suggest(section, _SECTIONS)
        raise ConfigError(f"{origin.source}: unknown section [{section}]{hint}")
    if key is not None and key not in DEFAULTS[section]:
        raise ConfigError(
            f"{origin.source}: unknown key {section}.{key}{_suggest(key, DEFAULTS[section])}"
            f" (known keys in [{section}]: {', '.join(DEFAULTS[section])})"
        )


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _show(value: Any) -> str:
    if value is None:
        return "no value"
    kind = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)
    return f"{kind} {value!r}" if not isinstance(value, (list, dict)) else kind


# ---- checking ---------------------------------------------------------------------------------


class _Bad(Exception):
    """Raised by a checker with what was expected; _check adds where."""


def _check(dotted: str, value: Any, origin: _Origin) -> Any:
    checker = _CHECKERS[dotted]
    try:
        return checker(value, origin)
    except _Bad as exc:
        raise origin.error(dotted, str(exc)) from None


def _int(value: Any) -> int:
    # TOML booleans are Python bools, which are ints: `port = true` must not mean port 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Bad(f"expected an integer, got {_show(value)}")
    return value


def _port(value: Any, _origin: _Origin) -> int:
    value = _int(value)
    if not 1 <= value <= 65535:
        raise _Bad(f"expected a port number from 1 to 65535, got {value}")
    return value


def _positive(value: Any, _origin: _Origin) -> int:
    value = _int(value)
    if value < 1:
        raise _Bad(f"expected a positive integer, got {value}")
    return value


def _bool(value: Any, _origin: _Origin) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"expected true or false, got {_show(value)}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"expected a non-empty string, got {_show(value)}")
    return value


def _path(value: Any, origin: _Origin) -> str:
    path = Path(_string(value)).expanduser()
    return str(path if path.is_absolute() else (origin.base / path))


def _optional_path(value: Any, origin: _Origin) -> str | None:
    return None if value is None else _path(value, origin)


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def _host(value: Any, _origin: _Origin) -> str:
    value = _string(value)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME.match(value):
            raise _Bad(f"expected an IP address or host name, got {value!r}") from None
    return value


def _cidr(value: Any, _origin: _Origin) -> str:
    value = _string(value)
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as exc:
        raise _Bad(f"expected a network like 10.42.0.0/16, got {value!r} ({exc})") from None


def _choice(value: Any, choices: tuple[str, ...], bools: bool = False) -> str:
    if bools and isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, str) or value not in choices:
        raise _Bad(f"expected one of {', '.join(choices)}, got {_show(value)}")
    return value


def _ifname(value: Any, _origin: _Origin) -> str:
    value = _string(value)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", value):
        raise _Bad(f"expected a network interface name (at most 15 letters, digits, '_', '.', '-'), got {value!r}")
    return value


def _synchronous(value: Any, _origin: _Origin) -> str:
    if not isinstance(value, str) or value.upper() not in SYNCHRONOUS_MODES:
        raise _Bad(f"expected one of {', '.join(SYNCHRONOUS_MODES)}, got {_show(value)}")
    # Goes into a PRAGMA verbatim, so it must be one of these words and nothing else.
    return value.upper()


def _listen(value: Any, _origin: _Origin) -> str:
    value = _string(value)
    try:
        parts = _parse_multiaddr(value)
    except ValueError as exc:
        example = "/ip4/0.0.0.0/tcp/53333"
        raise _Bad(f"expected a multiaddr like {example}, got {value!r} ({exc})") from None
    if [p for p, _ in parts] not in (["ip4", "tcp"], ["ip6", "tcp"]):
        raise _Bad(f"expected a multiaddr of the form /ip4/ADDRESS/tcp/PORT, got {value!r}")
    return value


def _bootstrap(value: Any, _origin: _Origin) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Bad(f"expected an array of multiaddrs, got {_show(value)}")
    for i, item in enumerate(value):
        example = "/ip4/192.0.2.1/tcp/53333/p2p/16Uiu2HAm..."
        if not isinstance(item, str):
            raise _Bad(f"item {i}: expected a multiaddr string like {example}, got {_show(item)}")
        try:
            parts = _parse_multiaddr(item)
        except ValueError as exc:
            msg = f"item {i}: expected a multiaddr like {example}, got {item!r} ({exc})"
            raise _Bad(msg) from None
        protocols = [p for p, _ in parts]
        # The /p2p/ peer id is required: it is what the Noise handshake authenticates, so
        # without it we could not know that we reached the peer we meant.
        if protocols[1:] != ["tcp", "p2p"] or protocols[0] not in _HOST_PROTOCOLS:
            raise _Bad(f"item {i}: expected /ip4|ip6|dns/HOST/tcp/PORT/p2p/PEER_ID, got {item!r}")
    return tuple(value)


def _announce(value: Any, _origin: _Origin) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Bad(f"expected an array of multiaddrs, got {_show(value)}")
    for i, item in enumerate(value):
        try:
            parts = _parse_multiaddr(item) if isinstance(item, str) else None
        except ValueError as exc:
            raise _Bad(f"item {i}: {exc}") from None
        if not parts or [p for p, _ in parts][1:] != ["tcp"] or parts[0][0] not in _HOST_PROTOCOLS:
            raise _Bad(f"item {i}: expected /ip4|ip6|dns/HOST/tcp/PORT, got {_show(item)}")
    return tuple(value)


_HOST_PROTOCOLS = ("ip4", "ip6", "dns", "dns4", "dns6")
_BASE58 = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{20,128}$")


def _parse_multiaddr(text: str) -> list[tuple[str, str]]:
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
            if not _HOSTNAME.match(val):
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


_Checker = Callable[[Any, _Origin], Any]
_CHECKERS: dict[str, _Checker] = {
    "node.data_dir": _path,
    "node.log_json": _bool,
    "node.password_file": _optional_path,
    "node.heartbeat_seconds": _positive,
    "api.host": _host,
    "api.port": _port,
    "p2p.listen": _listen,
    "p2p.bootstrap": _bootstrap,
    "p2p.announce": _announce,
    "p2p.sync_interval_seconds": _positive,
    "p2p.sync_sessions_per_peer": _positive,
    "p2p.sync_sessions": _positive,
    "p2p.sync_budget_mb": _positive,
    "p2p.sync_budget_seconds": _positive,
    "mesh.wireguard_port": _port,
    "mesh.overlay_cidr": _cidr,
    "dns.port": _port,
    "vm.enabled": lambda v, _o: _choice(v, ("auto", "true", "false"), bools=True),
    "vm.accel": lambda v, _o: _choice(v, ("auto", "kvm", "tcg")),
    "vm.machine": lambda v, _o: _choice(v, ("microvm", "q35")),
    "vm.bridge": _ifname,
    "vm.subnet": lambda v, o: v if v == "auto" else _cidr(v, o),
    "vm.cache_dir": lambda v, o: "" if v == "" else _path(v, o),
    "vm.build_timeout_seconds": _positive,
    "vm.build_network": _bool,
    "vm.context_limit_mb": _positive,
    "store.synchronous": _synchronous,
    "store.pending_ops_per_source": _positive,
    "store.pending_bytes_per_source": _positive,
}
