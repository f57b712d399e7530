"""Writing a file so that readers (and a crash) see the old content or the new, never half."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, *, fsync: bool = True) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`.

    The temporary name carries the pid, so two processes writing one file do not mix their
    halves; on failure it is removed. The content is made durable before the rename (fsync of
    the file) and the rename after it (fsync of the directory), so after a crash `path` holds
    the old content or the new, never an empty or partial file; `fsync=False` skips both, for
    files a crash may lose (caches, scratch).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make the entries of `directory` durable (a rename or a new file in it)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_tail(path: Path, max_bytes: int | None = None) -> str:
    """The last `max_bytes` of a (log) file as text, reading only those; "" if it is missing."""
    try:
        with open(path, "rb") as f:
            if max_bytes is not None:
                f.seek(max(0, os.fstat(f.fileno()).st_size - max_bytes))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
