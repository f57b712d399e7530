"""Build-context archives read as a stream, within named limits, by a tar reader of our own.

A context is an upload from anyone who can sign a request, so its archive is read as hostile:
one 512-byte header at a time out of a bounded gzip stream, never a whole member in memory.
tarfile is not used to read it: it reads a PAX or GNU long-name header's data whole, whatever
size the header declares (a 298 KiB upload took a node to 331 MB), and its extraction filter
checks a link against the tree as it stands, so the order of the entries decides what escapes.

`check` reads the whole archive and raises at the first entry over a limit or unsafe; `unpack`
checks it first and then reads it again to write it, enforcing every limit a second time while
writing (and writing only through directory descriptors, never following a link), so a
disagreement between the two passes cannot write past a limit or outside the destination. The
node's memory stays flat whatever the archive: a header (at most `header` bytes), 256 KiB of
inflated data, and one 16-byte key per path (at most `entries` + `dirs` of them).

What is refused, and what each refusal names (`ContextError.limit`, `.entry`):
- over a limit (`ContextTooLarge`, HTTP 413): packed, unpacked, entries, dirs, header, metadata,
  path, name, depth, ratio (see `Limits`);
- unsafe or damaged (`ContextError`, HTTP 400): absolute paths and '..', a path through a link
  or a file, the same path twice, hard links, devices, fifos and sparse files, a link that is
  absolute or leaves the context, names that are not UTF-8, a broken archive.

A link's target is refused unless its '..' come first and stay inside the context (`a/l ->
../b/c`): resolved against a tree where every entry's parents are real folders, such a link
cannot reach outside however the other links point, whatever order the archive holds them in.
"""

from __future__ import annotations

import hashlib
import os
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MiB = 1024 * 1024
BLOCK = 512
IN_CHUNK = 64 * 1024  # packed bytes fed to zlib at a time
OUT_CHUNK = 256 * 1024  # inflated bytes asked of zlib at a time: the memory a read may take
WRITE_CHUNK = 1 * MiB


@dataclass(frozen=True)
class Limits:
    """What a build context may hold. Each is named in the refusal that it causes."""

    packed: int = 64 * MiB  # bytes of the archive as uploaded (tar or tar.gz)
    unpacked: int = 64 * MiB  # bytes of all regular files together
    entries: int = 20_000  # files, links and folders in the archive
    dirs: int = 4_000  # folders made, named in the archive or implied by a path
    header: int = 64 * 1024  # bytes of one PAX or GNU long-name header
    metadata: int = 32 * MiB  # bytes of the archive that are not file contents (headers, padding)
    path: int = 1024  # bytes of one entry's path, or of a link's target
    name: int = 255  # bytes of one path component (Linux's NAME_MAX)
    depth: int = 32  # components of one path
    ratio: int = 200  # inflated bytes per packed byte, once past `ratio_after`
    ratio_after: int = 8 * MiB

    @classmethod
    def of_size(cls, limit: int) -> Limits:
        """The defaults, with `limit` bytes packed and unpacked (the node's context_limit_mb)."""
        return cls(packed=limit, unpacked=limit)


DEFAULT = Limits()

# What each limit is, and what to do about it, for the refusal's words.
_ADVICE = {
    "packed": ("the archive is {value} bytes, over the limit of {max}",
               "leave big files out of the folder (packages come from INSTALL)"),
    "unpacked": ("its files come to {value} bytes unpacked, over the limit of {max}",
                 "leave big files out of the folder (packages come from INSTALL)"),
    "entries": ("{value} entries, over the limit of {max}",
                "leave generated folders (caches, node_modules, .git) out of the context, or "
                "archive them into one file"),
    "dirs": ("{value} folders, over the limit of {max}",
             "leave generated folders out of the context, or archive them into one file"),
    "header": ("a header of {value} bytes, over the limit of {max}",
               "shorten the entry's name and drop extended attributes"),
    "metadata": ("{value} bytes of headers, over the limit of {max}", "use fewer, shorter names"),
    "path": ("a path of {value} bytes, over the limit of {max}", "shorten it"),
    "name": ("a name of {value} bytes, over the limit of {max}", "shorten it"),
    "depth": ("a path of {value} components, over the limit of {max}", "flatten the folder tree"),
    "ratio": ("{value} bytes inflated from its first {packed} packed bytes, over the limit of "
              "{max} times", "leave files of zeros or repeats out; make them in a RUN step"),
}


class ContextError(ValueError):
    """The archive is refused. `limit` names the limit it is over (None: unsafe or damaged),
    `entry` the entry where it was found (None: the archive as a whole)."""

    def __init__(self, message: str, *, limit: str | None = None, entry: str | None = None):
        super().__init__(message)
        self.message = message
        self.limit = limit
        self.entry = entry


class ContextTooLarge(ContextError):
    """Over one of the `Limits` (HTTP 413)."""


def _over(limit: str, value: int, limits: Limits, entry: str | None = None, packed: int = 0) -> ContextTooLarge:
    what, todo = _ADVICE[limit]
    where = f" at entry {entry!r}" if entry else ""
    text = what.format(value=value, max=getattr(limits, limit), packed=packed)
    return ContextTooLarge(f"the build context is refused (limit '{limit}'): {text}{where}; {todo}",
                           limit=limit, entry=entry)


def _bad(entry: str | None, why: str) -> ContextError:
    if entry is None:
        return ContextError(f"the build context is refused: {why}")
    return ContextError(f"build context entry {entry!r}: {why}", entry=entry)


# ---- the stream -------------------------------------------------------------------------------


class _Inflated:
    """The tar bytes of `data` (gzip, possibly several members, or plain tar), read in order,
    never more than OUT_CHUNK inflated at once; counts what it gave against the ratio bound."""

    def __init__(self, data: bytes, limits: Limits):
        self.src = memoryview(data)
        self.limits = limits
        self.pos = 0  # packed bytes fed to the decompressor
        self.out = 0  # tar bytes given
        self.buf = b""
        self.at = 0
        self.gzip = data[:2] == b"\x1f\x8b"
        self.z = zlib.decompressobj(16 + zlib.MAX_WBITS) if self.gzip else None
        self.ended = False
        self.where: str | None = None  # the entry being read, for refusals

    def _more(self) -> bytes:
        if self.z is None:  # a plain tar
            piece = bytes(self.src[self.pos:self.pos + OUT_CHUNK])
            self.pos += len(piece)
            return piece
        while not self.ended:
            if self.z.unconsumed_tail:
                piece = self.z.decompress(self.z.unconsumed_tail, OUT_CHUNK)
            elif self.z.eof:
                rest = self.z.unused_data
                self.pos -= len(rest)
                if bytes(self.src[self.pos:self.pos + 2]) != b"\x1f\x8b":
                    self.ended = True  # the end, or trailing bytes (as gzip's own tool ignores)
                    return b""
                self.z = zlib.decompressobj(16 + zlib.MAX_WBITS)  # the next gzip member
                continue
            else:
                chunk = self.src[self.pos:self.pos + IN_CHUNK]
                if not chunk:
                    raise _bad(None, "the gzip stream ends early (a truncated upload?)")
                self.pos += len(chunk)
                try:
                    piece = self.z.decompress(chunk, OUT_CHUNK)
                except zlib.error as exc:
                    raise _bad(None, f"the gzip stream is damaged ({exc})") from None
            if piece:
                self._count(len(piece))
                return piece
        return b""

    def _count(self, n: int) -> None:
        self.out += n
        packed = max(1, self.pos - len(self.z.unconsumed_tail if self.z else b""))
        if self.out > self.limits.ratio_after and self.out > self.limits.ratio * packed:
            raise _over("ratio", self.out, self.limits, self.where, packed=packed)

    def read(self, n: int) -> bytes:
        """Exactly n bytes, or fewer at the end of the stream (n is bounded by the caller)."""
        parts = []
        while n > 0:
            if self.at >= len(self.buf):
                self.buf, self.at = self._more(), 0
                if not self.buf:
                    break
            piece = self.buf[self.at:self.at + n]
            self.at += len(piece)
            n -= len(piece)
            parts.append(piece)
        return b"".join(parts)

    def chunks(self, n: int) -> Iterator[bytes]:
        """n bytes in pieces of at most OUT_CHUNK; raises if the stream ends first."""
        while n > 0:
            piece = self.read(min(n, OUT_CHUNK))
            if not piece:
                raise _bad(None, "the archive ends inside a file (a truncated upload?)")
            n -= len(piece)
            yield piece


# ---- tar headers ------------------------------------------------------------------------------

FILE, DIR, LINK = "file", "folder", "link"
_TYPES = {b"0": FILE, b"\0": FILE, b"7": FILE, b"5": DIR, b"2": LINK}
_REFUSED = {b"1": "hard links are not supported (pack the file itself, or use a relative symlink)",
            b"3": "devices are not allowed: only files, folders and relative links are allowed",
            b"4": "devices are not allowed: only files, folders and relative links are allowed",
            b"6": "fifos are not allowed: only files, folders and relative links are allowed",
            b"S": "sparse files are not supported: only files, folders and relative links are allowed",
            b"M": "multi-volume archives are not supported", b"V": "volume labels are not supported"}
_EXTENDED = (b"x", b"g", b"L", b"K")
_PAX_KEYS = {"path", "linkpath", "size"}  # the keys that change what an entry is; others ignored


@dataclass(frozen=True)
class Entry:
    name: str  # as the archive names it (for messages)
    kind: str
    size: int  # bytes of content that follow (files only)
    mode: int
    mtime: int
    target: str = ""  # a link's


def _number(field: bytes, entry: str | None) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256
        if field[0] == 0xFF:
            raise _bad(entry, "a negative number in its header")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise _bad(entry, "a header that is not a tar header (bad number)") from None


def _text(raw: bytes, entry: str | None, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(entry, f"its {what} is not UTF-8") from None


def _signed_sum(block: bytes) -> int:
    """The checksum as some old tars wrote it: over signed bytes."""
    rest = block[:148] + block[156:]
    return sum(rest) - 256 * sum(1 for b in rest if b > 127) + 256


def _pax(data: bytes, entry: str | None) -> dict[str, str]:
    """The records of a PAX header ('LEN key=value\\n' each) that change what an entry is."""
    out: dict[str, str] = {}
    at = 0
    while at < len(data):
        if data[at] == 0:
            break  # padding
        space = data.find(b" ", at, at + 24)
        if space < 0 or not data[at:space].isdigit():
            raise _bad(entry, "a damaged PAX header")
        length = int(data[at:space])
        record = data[space + 1:at + length]
        if length <= space - at or at + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise _bad(entry, "a damaged PAX header")
        key, _, value = record[:-1].partition(b"=")
        name = key.decode("utf-8", errors="replace")
        if name.startswith("GNU.sparse."):
            raise _bad(entry, "sparse files are not supported: only files, folders and relative links are allowed")
        if name in _PAX_KEYS:
            out[name] = _text(value, entry, f"PAX {name}")
        at += length
    return out


class _Tar:
    """The entries of a tar stream, one header at a time. The content of a file that the caller
    did not read is skipped before the next header. Counts header bytes against `metadata`."""

    def __init__(self, data: bytes, limits: Limits):
        self.src = _Inflated(data, limits)
        self.limits = limits
        self.meta = 0
        self.unread = 0  # content bytes of the current entry not yet read
        self.padding = 0

    def _meta(self, n: int, entry: str | None) -> None:
        self.meta += n
        if self.meta > self.limits.metadata:
            raise _over("metadata", self.meta, self.limits, entry)

    def _skip(self, n: int) -> None:
        for _ in self.src.chunks(n):
            pass

    def entries(self) -> Iterator[Entry]:
        pax: dict[str, str] = {}
        long_name = long_link = None
        while True:
            self._skip(self.unread)
            self._skip(self.padding)
            self.unread = self.padding = 0
            first = self.meta == 0
            block = self.src.read(BLOCK)
            if not block and not first:
                return  # no end-of-archive blocks: accepted, as tar accepts it
            if len(block) < BLOCK:
                raise _bad(None, "it is not a tar or tar.gz archive" if first else
                           "the archive ends inside a header (a truncated upload?)")
            if block == bytes(BLOCK):
                return  # the end of the archive; whatever follows is never read
            self._meta(BLOCK, long_name)
            shown = long_name or pax.get("path") or block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            stored = _number(block[148:156], shown)
            if stored != sum(block) - sum(block[148:156]) + 256 and stored != _signed_sum(block):
                if first:
                    raise _bad(None, "it is not a tar or tar.gz archive")
                raise _bad(shown, "a damaged header (bad checksum)")
            kind = block[156:157]
            size = _number(block[124:136], shown)
            if kind in _EXTENDED:
                if size > self.limits.header:
                    raise _over("header", size, self.limits, shown)
                data = self.src.read(size)
                if len(data) < size:
                    raise _bad(shown, "the archive ends inside a header (a truncated upload?)")
                pad = -size % BLOCK
                self._skip(pad)
                self._meta(size + pad, shown)
                if kind == b"x":
                    pax.update(_pax(data, shown))
                elif kind == b"g":
                    if _pax(data, shown):
                        raise _bad(shown, "a global PAX header that sets a path, a link or a size "
                                          "for every entry (not supported)")
                elif kind == b"L":
                    long_name = _text(data.split(b"\0", 1)[0], shown, "name")
                else:
                    long_link = _text(data.split(b"\0", 1)[0], shown, "link target")
                continue
            if long_name is not None:
                name = long_name
            elif "path" in pax:
                name = pax["path"]
            else:
                raw = block[:100].split(b"\0", 1)[0]
                if block[257:263] == b"ustar\0":  # POSIX: a prefix for long names
                    prefix = block[345:500].split(b"\0", 1)[0]
                    if prefix:
                        raw = prefix + b"/" + raw
                name = _text(raw, repr(raw)[2:-1], "name")
            if "size" in pax:
                if not (pax["size"].isascii() and pax["size"].isdigit()):
                    raise _bad(name, f"a damaged PAX header (size {pax['size'][:40]!r})")
                size = int(pax["size"])
            target = long_link if long_link is not None else pax.get(
                "linkpath", _text(block[157:257].split(b"\0", 1)[0], name, "link target"))
            pax, long_name, long_link = {}, None, None
            if kind in _REFUSED:
                raise _bad(name, _REFUSED[kind])
            if kind not in _TYPES:
                raise _bad(name, f"an entry of unknown type {kind!r}: only files, folders and "
                                 "relative links are allowed")
            what = _TYPES[kind]
            if what == FILE and kind == b"\0" and name.endswith("/"):
                what = DIR  # the old tar format's folders
            self.src.where = name
            if what == FILE:
                self.unread, self.padding = size, -size % BLOCK
                self._meta(self.padding, name)
            yield Entry(name, what, size if what == FILE else 0, _number(block[100:108], name) & 0o7777,
                        _number(block[136:148], name), target if what == LINK else "")

    def content(self) -> Iterator[bytes]:
        """The current file's content, in pieces of at most OUT_CHUNK."""
        while self.unread > 0:
            piece = self.src.read(min(self.unread, OUT_CHUNK))
            if not piece:
                raise _bad(self.src.where, "the archive ends inside this file (a truncated upload?)")
            self.unread -= len(piece)
            yield piece


# ---- what an entry may be ----------------------------------------------------------------------


def _key(parts: tuple[str, ...]) -> bytes:
    return hashlib.blake2b("/".join(parts).encode(), digest_size=16).digest()


class _Rules:
    """Every limit and rule over the entries seen so far; one per pass over an archive."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.entries = 0
        self.dirs = 0
        self.unpacked = 0
        self.kinds: dict[bytes, str] = {}  # path -> kind; at most entries + dirs keys

    def _parts(self, name: str, entry: str, what: str = "path") -> tuple[str, ...]:
        lim = self.limits
        size = len(name.encode())
        if size > lim.path:
            raise _over("path", size, lim, entry[:200])
        if "\0" in name:
            raise _bad(entry, f"its {what} holds a NUL byte")
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        for p in parts:
            if len(p.encode()) > lim.name:
                raise _over("name", len(p.encode()), lim, entry[:200])
        if len(parts) > lim.depth:
            raise _over("depth", len(parts), lim, entry[:200])
        return parts

    def admit(self, e: Entry) -> tuple[str, ...]:
        """The entry's path components, or a refusal; counts it."""
        lim = self.limits
        self.entries += 1
        if self.entries > lim.entries:
            raise _over("entries", self.entries, lim, e.name)
        if e.name.startswith("/"):
            raise _bad(e.name, "points outside the context (an absolute path); use paths relative "
                               "to the context folder")
        parts = self._parts(e.name, e.name)
        if ".." in parts:
            raise _bad(e.name, "points outside the context ('..' in its path)")
        if not parts:
            if e.kind == DIR:
                return parts  # the context folder itself ('./')
            raise _bad(e.name, "an entry with an empty name")
        for i in range(1, len(parts)):
            key = _key(parts[:i])
            kind = self.kinds.get(key)
            if kind is None:
                self._dir(e.name)
                self.kinds[key] = DIR
            elif kind != DIR:
                raise _bad(e.name, f"is inside {'/'.join(parts[:i])!r}, which is a {kind}, not a folder")
        key = _key(parts)
        kind = self.kinds.get(key)
        if kind is not None and not (kind == DIR and e.kind == DIR):
            raise _bad(e.name, f"appears twice in the archive (as a {kind} and as a {e.kind})")
        if kind is None and e.kind == DIR:
            self._dir(e.name)
        self.kinds[key] = e.kind
        if e.kind == FILE:
            self.unpacked += e.size
            if self.unpacked > lim.unpacked:
                raise _over("unpacked", self.unpacked, lim, e.name)
        elif e.kind == LINK:
            self._link(e, parts)
        return parts

    def _dir(self, entry: str) -> None:
        self.dirs += 1
        if self.dirs > self.limits.dirs:
            raise _over("dirs", self.dirs, self.limits, entry)

    def _link(self, e: Entry, parts: tuple[str, ...]) -> None:
        if not e.target:
            raise _bad(e.name, "a link to nothing")
        if e.target.startswith("/"):
            raise _bad(e.name, f"links to the absolute path {e.target!r}; use a relative link "
                               "inside the context")
        target = self._parts(e.target, e.name, "link target")
        up = 0
        while up < len(target) and target[up] == "..":
            up += 1
        rest = target[up:]
        if up > len(parts) - 1:
            raise _bad(e.name, f"links outside the build context ({e.target!r})")
        if ".." in rest:
            raise _bad(e.name, f"links through '..' after a name ({e.target!r}); write the target "
                               "with its '..' first (like ../lib/x)")


# ---- the passes -------------------------------------------------------------------------------


def check(data: bytes, limits: Limits = DEFAULT) -> int:
    """Read the whole archive without writing anything; the number of entries. Raises
    ContextTooLarge over a limit, ContextError when unsafe or damaged."""
    if len(data) > limits.packed:
        raise _over("packed", len(data), limits)
    rules = _Rules(limits)
    for e in _Tar(data, limits).entries():
        rules.admit(e)
    return rules.entries


def unpack(data: bytes, dest: Path, limits: Limits = DEFAULT) -> None:
    """Check the archive (`check`), then write it into the empty or new folder `dest`, checking
    every limit and rule again as it goes. Modes as tarfile's 'data' filter leaves them."""
    check(data, limits)
    dest.mkdir(parents=True, exist_ok=True)
    root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    writer = _Writer(root)
    try:
        rules, tar = _Rules(limits), _Tar(data, limits)
        for e in tar.entries():
            parts = rules.admit(e)
            if parts:
                writer.write(e, parts, tar)
    finally:
        writer.close()
        os.close(root)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _Writer:
    """Writes entries under the folder `root` (a descriptor) through descriptors of their
    parents, opened without following links: a link in the tree is never gone through."""

    def __init__(self, root: int):
        self.root = root
        self.parent: tuple[tuple[str, ...], int] | None = None  # the last parent, still open

    def close(self) -> None:
        if self.parent is not None:
            os.close(self.parent[1])
            self.parent = None

    def _parent(self, parts: tuple[str, ...], entry: str) -> int:
        if self.parent is not None and self.parent[0] == parts:
            return self.parent[1]
        self.close()
        fd = os.dup(self.root)
        try:
            for p in parts:
                try:
                    os.mkdir(p, dir_fd=fd)
                except FileExistsError:
                    pass
                try:
                    nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    raise _bad(entry, f"cannot be written: {p!r} is not a folder ({exc.strerror})") from None
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        self.parent = (parts, fd)
        return fd

    def write(self, e: Entry, parts: tuple[str, ...], tar: _Tar) -> None:
        at = self._parent(parts[:-1], e.name)
        name = parts[-1]
        try:
            if e.kind == DIR:
                try:
                    os.mkdir(name, dir_fd=at)  # the system's default mode, as tarfile's filter
                except FileExistsError:
                    if not stat.S_ISDIR(os.stat(name, dir_fd=at, follow_symlinks=False).st_mode):
                        raise _bad(e.name, "appears twice in the archive") from None
            elif e.kind == LINK:
                os.symlink(e.target, name, dir_fd=at)
            else:
                self._file(e, name, at, tar)
        except FileExistsError:
            raise _bad(e.name, "appears twice in the archive") from None
        except OSError as exc:
            raise _bad(e.name, f"cannot be written ({exc.strerror})") from None

    @staticmethod
    def _file(e: Entry, name: str, at: int, tar: _Tar) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=at)
        try:
            written = 0
            for piece in tar.content():
                written += len(piece)
                if written > e.size:  # cannot happen: content() gives the size it was given
                    raise _bad(e.name, "more content than its header says")
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view):]
            mode = e.mode & 0o755
            if not mode & 0o100:
                mode &= ~0o111
            os.fchmod(fd, mode | 0o600)
            mtime = min(max(e.mtime, 0), 2**33)
            os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)
