"""Undoing what a failed run made: the files it created or replaced, the directories it made."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from formation.files import write_atomic

from .steps import JoinError


class Rollback:
    """What this run changed, undone in reverse order when it fails; `commit` keeps it all."""

    def __init__(self):
        self._undo: list[tuple[str, Callable[[], None]]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def add(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    def created(self, path: Path) -> None:
        self.add(path.name, lambda: path.unlink(missing_ok=True))

    def replaced(self, path: Path, old: bytes, mode: int) -> None:
        def restore() -> None:
            write_atomic(path, old)
            os.chmod(path, mode)

        self.add(f"{path.name} (its old content)", restore)

    def made_dir(self, path: Path) -> None:
        self.add(f"{path}/", lambda: path.rmdir())

    def made_state(self, path: Path) -> None:
        def remove() -> None:  # SQLite's files beside the store go with it
            for suffix in ("", "-wal", "-shm", "-journal"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)

        self.add(path.name, remove)

    def commit(self) -> None:
        self._undo.clear()

    def undo(self) -> tuple[list[str], list[str]]:
        """Undo everything, newest first: (what was undone, what could not be and why)."""
        undone, failed = [], []
        while self._undo:
            what, fn = self._undo.pop()
            try:
                fn()
                undone.append(what)
            except OSError as exc:
                failed.append(f"{what} ({exc.strerror or exc})")
        return undone, failed

    def undo_note(self) -> str:
        """Undo, and say so in a few words for the error line."""
        if not self._undo:
            return "nothing was written"
        undone, failed = self.undo()
        note = f"removed what this run made ({', '.join(reversed(undone))})" if undone else ""
        if failed:
            note += ("; " if note else "") + f"could not undo {', '.join(failed)}"
        return note


def make_dirs(path: Path, rollback: Rollback, mode: int = 0o700) -> None:
    """`path` and its missing parents, each one undone (if still empty) on failure."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise JoinError(f"{p} is not a directory", f"choose another place than {path}")
    for d in reversed(missing):
        d.mkdir(mode=mode if d == path else 0o755)
        rollback.made_dir(d)


def put_file(path: Path, data: str | bytes, rollback: Rollback, mode: int = 0o644) -> None:
    """Write `path` whole (atomically); on rollback remove it, or put back what it held."""
    old = path.read_bytes() if path.exists() else None
    old_mode = path.stat().st_mode & 0o7777 if old is not None else 0
    write_atomic(path, data, fsync=True)
    if old is None:
        rollback.created(path)
    else:
        rollback.replaced(path, old, old_mode)
    os.chmod(path, old_mode if old is not None else mode)  # a replaced file keeps its mode
