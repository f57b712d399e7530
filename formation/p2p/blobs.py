"""Named blobs fetched from a peer on /formation/blob/1: one request, one answer.

Request: one frame, the blob's name (UTF-8, at most 256 bytes). Answer: one frame b"none", or
b"refused REASON" (the node will not give it to this peer), or b"size N" followed by the blob in
frames of at most 1 MiB. The node decides what a name means and who may have it (`provide`,
called with the asking peer's address, derived from its key); a file is sent from disk a chunk
at a time, never whole in memory. The fetcher says how much it accepts (checked against the
announced size before a byte of the blob is read, and frame by frame) and must check what it
got: a context, for instance, is checked against its build id before anything is built from it.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from .framing import FrameError, read_frame, write_frame

PROTOCOL = "/formation/blob/1"
MAX_NAME = 256
MAX_HEAD = 256  # bytes of the answer's first frame (size, none, or refused and why)
CHUNK = 1 << 20
TIMEOUT = 120.0  # seconds for a whole fetch

# (the asking peer's node address, or None when its peer id holds no key; the blob's name) ->
# the blob (bytes, or a file to send), None when this node has none; raises Refused.
Provider = Callable[[str | None, str], Awaitable[bytes | Path | None]]


class Refused(Exception):
    """This peer may not have that blob (the serving side says why; the fetcher raises it)."""


async def serve(stream, provide: Provider, asker: str | None) -> None:
    try:
        with trio.fail_after(30):
            name = (await read_frame(stream, MAX_NAME)).decode()
        try:
            blob = await provide(asker, name)
        except Refused as exc:
            await write_frame(stream, f"refused {exc}".encode()[:MAX_HEAD])
            return
        if blob is None:
            await write_frame(stream, b"none")
        elif isinstance(blob, Path):
            await _send_file(stream, blob)
        else:
            await write_frame(stream, f"size {len(blob)}".encode())
            for at in range(0, len(blob), CHUNK):
                await write_frame(stream, blob[at:at + CHUNK])
    finally:
        await stream.close()


async def _send_file(stream, path: Path) -> None:
    try:
        f = await trio.open_file(path, "rb")
    except OSError:
        await write_frame(stream, b"none")
        return
    async with f:
        size = os.fstat(f.fileno()).st_size
        await write_frame(stream, f"size {size}".encode())
        left = size
        while left > 0:
            piece = await f.read(min(CHUNK, left))
            if not piece:
                raise FrameError(f"{path} got shorter while it was sent")
            left -= len(piece)
            await write_frame(stream, piece)


async def fetch(stream, name: str, limit: int) -> bytes | None:
    """The blob, or None if the peer has none. Raises Refused when the peer will not give it to
    us, FrameError on a broken answer or one over `limit` bytes (found before reading it)."""
    if len(name.encode()) > MAX_NAME:
        raise ValueError(f"blob name over {MAX_NAME} bytes")
    with trio.fail_after(TIMEOUT):
        await write_frame(stream, name.encode())
        head = (await read_frame(stream, MAX_HEAD)).decode(errors="replace")
        if head == "none":
            return None
        word, _, rest = head.partition(" ")
        if word == "refused":
            raise Refused(rest or "no reason given")
        if word != "size" or not rest.isdecimal() or len(rest) > 20:
            raise FrameError(f"bad blob answer {head[:80]!r}")
        size = int(rest)
        if size > limit:
            raise FrameError(f"blob {name} is {size} bytes, over the limit of {limit}")
        out = bytearray()
        while len(out) < size:
            piece = await read_frame(stream, min(CHUNK, size - len(out)))
            if not piece:
                raise FrameError(f"blob {name}: an empty frame after {len(out)} of {size} bytes")
            out += piece
        return bytes(out)
