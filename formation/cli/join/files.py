"""What the join writes besides the key and the state: formation.toml, and the systemd unit
that runs the node from it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from formation.node.checks import ConfigError
from formation.node.config import Config, load_config
from formation.node.settings import SETTINGS
from formation.node.settings import _toml_value as toml_value

from .steps import JoinError

CONFIG_NAME = "formation.toml"
ALWAYS_WRITTEN = ("node.data_dir", "p2p.bootstrap", "mesh.enabled")
UNIT_NAME = "formation-node.service"
UNIT_DIR = Path("/etc/systemd/system")
UNIT_DIR_ENV = "FORMATION_SYSTEMD_DIR"  # tests: write the unit there, never call systemctl
UNIT_MARK = "# Written by `form join`"


def render_config(config: Config) -> str:
    """formation.toml for `config`: the settings that differ from the defaults (and the data dir,
    the bootstrap peers and formnet, always)."""
    default = load_config(None)
    out = [f"{UNIT_MARK}: the settings of the node in {config.data_dir}.",
           "# Run it with `form node --config THIS_FILE`. Settings not here are at their defaults",
           "# (all of them, with what they do: `python -m formation.node.settings`)."]
    section = None
    for s in SETTINGS:
        value = getattr(getattr(config, s.section), s.key)
        if value is None or (s.dotted not in ALWAYS_WRITTEN
                             and value == getattr(getattr(default, s.section), s.key)):
            continue
        if s.section != section:
            section = s.section
            out += ["", f"[{section}]"]
        out.append(f"{s.key} = {toml_value(value)}")
    return "\n".join(out) + "\n"


def config_unchanged(path: Path, config: Config) -> bool:
    if not path.is_file():
        return False
    try:
        return load_config(path) == config
    except ConfigError:
        return False


def _systemd_word(word: str) -> str:
    word = word.replace("%", "%%").replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9_./:@+=,-]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_unit(config_path: Path, data_dir: Path) -> str:
    cmd = [sys.executable, "-m", "formation.cli", "node", "--config", str(config_path)]
    return "\n".join([
        f"{UNIT_MARK}: the Formation node of {_systemd_word(str(data_dir))}.",
        "[Unit]",
        "Description=Formation node (a member of a fog)",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(_systemd_word(w) for w in cmd),
        "Restart=on-failure",
        "RestartSec=5",
        "TimeoutStopSec=30",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def systemd_running() -> bool:
    return bool(shutil.which("systemctl")) and Path("/run/systemd/system").is_dir() \
        and not os.environ.get(UNIT_DIR_ENV)


def systemctl(*args: str) -> None:
    try:
        proc = subprocess.run(["systemctl", *args], capture_output=True, text=True,
                              errors="replace", timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise JoinError(f"systemctl {' '.join(args)} failed: {exc}") from None
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise JoinError(f"systemctl {' '.join(args)} failed: {why}",
                        f"see `systemctl status {UNIT_NAME}`")


def reload_quietly() -> None:
    """`systemctl daemon-reload` for a rollback: its failure must not hide the error reported."""
    with contextlib.suppress(JoinError):
        systemctl("daemon-reload")
