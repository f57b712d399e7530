"""formation.toml: the node's settings, checked once at start (DESIGN.md §7).

Every setting is declared once in settings.py (default, type, check, doc); the defaults, the
checks, the typed sections below and the repository's formation.toml all follow from it, so a
node runs with no file at all. A file overrides defaults, and `overrides` (command-line flags)
override the file. Anything unknown or ill-typed is an error naming the file and the key: a typo
in a config file must not silently leave a default in force.

Paths (node.data_dir, node.password_file) are expanded (`~`) and made absolute at load time;
relative paths in a file are relative to that file's directory, relative paths given as
overrides are relative to the current directory.
"""

from __future__ import annotations

import copy
import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, make_dataclass
from pathlib import Path
from typing import Any

from .checks import SYNCHRONOUS_MODES, Bad, ConfigError, Origin, parse_multiaddr, show
from .settings import SETTINGS

__all__ = ["SYNCHRONOUS_MODES", "Config", "ConfigError", "DEFAULTS", "load_config", "with_tcp_port"]

KEYSTORE_FILE = "operator.key"
STATE_FILE = "state.db"

DEFAULTS: dict[str, dict[str, Any]] = {}
for _s in SETTINGS:
    DEFAULTS.setdefault(_s.section, {})[_s.key] = _s.default
_SETTING = {s.dotted: s for s in SETTINGS}


def _section_class(section: str) -> type:
    fields = [(s.key, s.type) for s in SETTINGS if s.section == section]
    return make_dataclass(f"{section.capitalize()}Config", fields, frozen=True)


NodeConfig = _section_class("node")
ApiConfig = _section_class("api")
P2pConfig = _section_class("p2p")
FogConfig = _section_class("fog")
MeshConfig = _section_class("mesh")
DnsConfig = _section_class("dns")
ProxyConfig = _section_class("proxy")
VmConfig = _section_class("vm")
StoreConfig = _section_class("store")


@dataclass(frozen=True)
class Config:
    node: NodeConfig
    api: ApiConfig
    p2p: P2pConfig
    fog: FogConfig
    mesh: MeshConfig
    dns: DnsConfig
    proxy: ProxyConfig
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
    "fog": FogConfig,
    "mesh": MeshConfig,
    "dns": DnsConfig,
    "proxy": ProxyConfig,
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
    origin: dict[str, Origin] = {
        f"{s}.{k}": Origin("defaults", None, Path.cwd()) for s in DEFAULTS for k in DEFAULTS[s]
    }

    if path is not None:
        path = Path(path)
        file_values = _read_toml(path)
        src = Origin(str(path), None, path.resolve().parent)
        for dotted, value in _flatten(file_values, src).items():
            section, key = dotted.split(".", 1)
            values[section][key] = value
            origin[dotted] = src

    names = override_names or {}
    for dotted, value in _flatten(overrides or {}, Origin("overrides", None, Path.cwd())).items():
        section, key = dotted.split(".", 1)
        values[section][key] = value
        origin[dotted] = Origin("command line", names.get(dotted), Path.cwd())

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
    parts = parse_multiaddr(multiaddr)
    return "".join(f"/{p}/{port if p == 'tcp' else v}" for p, v in parts)


# ---- reading ----------------------------------------------------------------------------------


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


def _flatten(tree: Mapping[str, Any], origin: Origin) -> dict[str, Any]:
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
                f"{origin.source}: {name}: expected a table [{name}], got {show(value)}"
            )
        for key, sub in value.items():
            _known(name, key, origin)
            flat[f"{name}.{key}"] = sub
    return flat


def _known(section: str, key: str | None, origin: Origin) -> None:
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


def _check(dotted: str, value: Any, origin: Origin) -> Any:
    try:
        return _SETTING[dotted].check(value, origin)
    except Bad as exc:
        raise origin.error(dotted, str(exc)) from None
