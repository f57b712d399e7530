"""The guest: its two-stage init (the shell scripts `init` and `guest-init` beside this file, put
into every VM's initramfs by formation/vm/kit.py) and the console protocol they speak.

The guest has no agent: what the host knows of it is what its init prints on the serial console,
one marker per line. This module is the one place those markers are written down and read: the
node's scheduler reads a service's lifecycle from them (`read_service`), the image builder follows
its steps (`read_build_line`) and writes the step script that prints them (`step_begin`,
`step_end`). A marker that changes here must change in the scripts too (tests/unit/test_guest.py
reads the scripts to check that they print what this module parses).

It also writes the secrets disk (`secrets_tar`) that guest-init reads in run mode, and names the
guest's files that the image builder writes (`ENTRYPOINT_USER`, `SSH_CONFIG`).
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

DIR = Path(__file__).parent
SCRIPTS = ("init", "guest-init")

PREFIX = "FORMATION-GUEST"
BOOT = "FORMATION-GUEST-INIT"  # stage 1's first line: each boot's output starts after it
BOOT_FAILED = "FORMATION-GUEST-FAILED"  # stage 1 could not mount the root (then reboots)
SERVICE_START = "FORMATION-GUEST entrypoint-start"
SERVICE_EXIT = "FORMATION-GUEST entrypoint-exit rc="
NO_ENTRYPOINT = "FORMATION-GUEST ready (no entrypoint)"
BUILD_END = "FORMATION-GUEST build-end rc="
STEP = "FORMATION-STEP"  # the build script's own markers, one begin/end pair per step


@dataclass(frozen=True)
class ServiceView:
    """What the console says of the service in the current boot."""

    booted: bool  # the current boot's first marker is there
    no_entrypoint: bool  # the image has no ENTRYPOINT: the guest idles, ready
    started: int  # entrypoint starts in this boot
    exits: int  # entrypoint exits in this boot
    last_rc: str  # the last exit's status ("" when it never exited)
    output_tail: tuple[str, ...]  # the service's last lines, markers left out

    @property
    def exited_last(self) -> bool:
        """The entrypoint is down now (its last marker is an exit, the guest will retry it)."""
        return self.exits > 0 and self.exits >= self.started


def read_service(console: str, tail_lines: int = 3) -> ServiceView:
    """The current boot's service state, from a tail of the console (older boots are ignored)."""
    booted = BOOT in console
    text = console.rpartition(BOOT)[2]
    if booted:
        text = text.partition("\n")[2]  # the rest of the boot marker's own line is not output
    started = exits = 0
    last_rc = ""
    no_entrypoint = False
    output: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith(SERVICE_START):
            started += 1
        elif line.startswith(SERVICE_EXIT):
            exits += 1
            last_rc = line[len(SERVICE_EXIT):].split()[0] if line[len(SERVICE_EXIT):] else "?"
        elif line.startswith(NO_ENTRYPOINT):
            no_entrypoint = True
        elif line and PREFIX not in line:
            output.append(line)
    return ServiceView(booted, no_entrypoint, started, exits, last_rc, tuple(output[-tail_lines:]))


@dataclass(frozen=True)
class BuildLine:
    """One marker of the build VM: a step began or ended (step >= 0), or the build ended."""

    what: str  # "begin", "end" or "build-end"
    step: int = -1
    rc: int = 0


def read_build_line(line: str) -> BuildLine | None:
    """The build marker a console line is, or None for the steps' own output."""
    line = line.rstrip("\r\n")
    if line.startswith(STEP + " "):
        words = line.split()
        n = int(words[1]) if len(words) > 2 and words[1].isdecimal() else -1
        if n < 0:
            return None
        if words[2] == "begin":
            return BuildLine("begin", n)
        if words[2] == "end" and "rc=" in line:
            return BuildLine("end", n, _rc(line.rsplit("rc=", 1)[1]))
        return None
    if line.startswith(BUILD_END):
        return BuildLine("build-end", rc=_rc(line[len(BUILD_END):]))
    return None


def step_begin(n: int) -> str:
    """The shell line the build script runs before step n."""
    return f"echo '{STEP} {n} begin'"


def step_end(n: int) -> str:
    """The shell line the build script runs after step n (its status in $rc)."""
    return f'echo "{STEP} {n} end rc=$rc"'


def _rc(text: str) -> int:
    text = text.strip()
    return int(text) if text.isdecimal() else 1


# ---- the image's side: files the builder writes for guest-init ----------------------------------

ENTRYPOINT_USER = "/etc/formation/user"  # the Formfile's last USER: the entrypoint runs as it
SSH_CONFIG = "/etc/formation/ssh"  # shell assignments: how guest-init runs dropbear


# ---- the secrets disk --------------------------------------------------------------------------

SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
SECRET_MAX_BYTES = 64 * 1024


def secrets_tar(values: dict[str, bytes]) -> bytes:
    """The secrets disk of a VM: a ustar archive that guest-init (run mode) finds on its second
    virtio disk. `files/NAME` holds each value as given; it becomes /run/secrets/NAME, readable by
    the entrypoint's user only. `env` holds `export NAME='value'` lines, loaded into the
    entrypoint's environment after the image's ENV, except for values holding a NUL byte (no
    environment variable can): those are in files/ only. Names are shell variable names (up to
    64), values up to 64 KiB; anything else raises ValueError. Deterministic: the same values
    make the same bytes (no times, no owners)."""
    for name, value in values.items():
        if not isinstance(name, str) or not SECRET_NAME.fullmatch(name):
            raise ValueError(f"bad secret name {name!r}: a letter or '_', then letters, digits or '_' "
                             f"(64 at most)")
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError(f"secret {name}: the value must be bytes")
        if len(value) > SECRET_MAX_BYTES:
            raise ValueError(f"secret {name}: {len(value)} bytes, more than {SECRET_MAX_BYTES}")
    env = b"".join(b"export %s=%s\n" % (name.encode(), _sh_quote(bytes(v)))
                   for name, v in sorted(values.items()) if b"\0" not in v)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        _add(tar, "env", env)
        _add(tar, "files", None)
        for name, value in sorted(values.items()):
            _add(tar, f"files/{name}", bytes(value))
    return buf.getvalue()


def _sh_quote(value: bytes) -> bytes:
    return b"'" + value.replace(b"'", b"'\\''") + b"'"


def _add(tar: tarfile.TarFile, name: str, data: bytes | None) -> None:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    if data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o700
        tar.addfile(info)
    else:
        info.size, info.mode = len(data), 0o400
        tar.addfile(info, io.BytesIO(data))
