"""Small pieces every bench script uses."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path


def printer(quiet: bool):
    """print() for the human-readable part, silenced when only the JSON line is wanted."""

    def say(*a):
        if not quiet:
            print(*a, flush=True)

    return say


def workdir(base_dir: str | None, prefix: str) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """The directory to work in: `base_dir` if given (kept), else a temporary one to clean up."""
    if base_dir:
        return Path(base_dir), None
    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    return Path(tmp.name), tmp


def terminate(proc: subprocess.Popen | None, grace: float = 30.0) -> float:
    """SIGTERM, then SIGKILL after `grace` seconds; the seconds the process took to exit."""
    if proc is None or proc.poll() is not None:
        return 0.0
    t0 = time.monotonic()
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return time.monotonic() - t0
