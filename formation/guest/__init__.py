"""The guest: its two-stage init (the shell scripts `init` and `guest-init` beside this file, put
into every VM's initramfs by formation/vm/kit.py) and the console protocol they speak.

The guest has no agent: what the host knows of it is what its init prints on the serial console,
one marker per line. This module is the one place those markers are written down and read: the
node's scheduler reads a service's lifecycle from them (`read_service`), the image builder follows
its steps (`read_build_line`) and writes the step script that prints them (`step_begin`,
`step_end`). A marker that changes here must change in the scripts too (tests/unit/test_guest.py
reads the scripts to check that they print what this module parses).
"""

from __future__ import annotations

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
