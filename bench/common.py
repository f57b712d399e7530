"""Small pieces every bench script uses."""

from __future__ import annotations

import tempfile
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
