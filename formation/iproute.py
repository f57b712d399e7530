"""The `ip` command (iproute2), run from trio: the one runner of the VM network and the mesh.
iproute2 is on every host that runs QEMU or WireGuard, so no netlink library is pinned.
"""

from __future__ import annotations

import subprocess

import trio


class NetworkError(Exception):
    """An `ip` command failed: the command and ip's own message."""

    def __init__(self, command: list[str], message: str):
        super().__init__(f"{' '.join(command)}: {message}")
        self.command = command
        self.message = message


async def ip(*args: str, netns: str | None = None, ok_if: tuple[str, ...] = ()) -> str:
    """Run `ip [-n NS] ARGS`; its stdout. Fails with NetworkError unless stderr has one of ok_if."""
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    proc = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False,
                                  stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip()
        if any(s in message for s in ok_if):
            return ""
        raise NetworkError(cmd, message or f"exit status {proc.returncode}")
    return proc.stdout.decode(errors="replace")
