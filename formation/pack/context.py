"""Build contexts: the folder a Formfile's COPY lines read from, carried as one tar.gz.

The client packs a folder (`pack_dir`); the node unpacks it (`unpack`, archive.py) refusing
anything that could write outside the destination (absolute paths, '..', links pointing out,
devices) and anything over a limit (sizes, entries, folders, headers, paths: archive.Limits),
found by reading the archive as a stream before a single file is written. The context's
identity (`digest`) covers names, modes and contents in a fixed order, so the same folder
always gives the same image id whatever the tar's own ordering or timestamps.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path, PurePosixPath

from . import archive
from .archive import ContextError, ContextTooLarge, Limits

DEFAULT_LIMIT = 64 * 1024 * 1024  # bytes of files, unpacked (and of the archive, packed)
__all__ = ["DEFAULT_LIMIT", "ContextError", "ContextTooLarge", "Limits", "digest", "pack_dir", "unpack"]


def pack_dir(folder: Path, limit: int = DEFAULT_LIMIT) -> bytes:
    """The folder as a deterministic tar.gz (sorted, no owners or times). Symlinks are kept as
    links; a link that points outside the folder is an error, as it would be when unpacked."""
    folder = folder.resolve()
    if not folder.is_dir():
        raise ContextError(f"build context {folder} is not a folder")
    buf = io.BytesIO()
    total = 0
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        for path in sorted(_walk(folder)):
            rel = path.relative_to(folder).as_posix()
            st = path.lstat()
            info = tarfile.TarInfo(rel)
            info.mode = stat.S_IMODE(st.st_mode)
            info.mtime = 0
            if stat.S_ISLNK(st.st_mode):
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(path)
                _check_link(rel, info.linkname)
                tar.addfile(info)
            elif stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                total += st.st_size
                if total > limit:
                    raise ContextTooLarge(f"build context {folder}: its files come to more than {limit} "
                                       f"bytes, over the limit, at {rel}; leave big files out of the folder "
                                       "(packages come from INSTALL)", limit="unpacked", entry=str(rel))
                info.size = st.st_size
                with path.open("rb") as f:
                    tar.addfile(info, f)
            # sockets, fifos and devices have no place in an image: skipped
    data = buf.getvalue()
    archive.check(data, Limits.of_size(limit))  # what a node would refuse, said before the upload
    return data


def _walk(folder: Path):
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            yield Path(root) / name


def _check_link(rel: str, target: str) -> None:
    if target.startswith("/"):
        raise ContextError(f"{rel}: links to the absolute path {target!r}; use a relative link "
                           f"inside the context")
    depth = len(PurePosixPath(rel).parts) - 1
    for part in PurePosixPath(target).parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            raise ContextError(f"{rel}: links outside the build context ({target!r})")


def unpack(data: bytes, dest: Path, limit: int = DEFAULT_LIMIT, limits: Limits | None = None) -> None:
    """Unpack a context made by `pack_dir` (or any plain tar/tar.gz) into `dest`: checked whole
    first, streaming, within `limits` (the defaults with `limit` bytes packed and unpacked), then
    written with every limit checked again (archive.py). Raises ContextError (ContextTooLarge
    over a limit) naming the limit and the entry."""
    archive.unpack(data, dest, limits or Limits.of_size(limit))


def digest(folder: Path) -> str:
    """sha256 over (path, type, mode, content or link target) of every entry, sorted."""
    h = hashlib.sha256()
    for path in sorted(_walk(folder)):
        rel = path.relative_to(folder).as_posix()
        st = path.lstat()
        h.update(rel.encode() + b"\0" + f"{stat.S_IFMT(st.st_mode):o}:{stat.S_IMODE(st.st_mode):o}".encode() + b"\0")
        if stat.S_ISLNK(st.st_mode):
            h.update(os.readlink(path).encode())
        elif stat.S_ISREG(st.st_mode):
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(hashlib.sha256(chunk).digest())
        h.update(b"\n")
    return h.hexdigest()
