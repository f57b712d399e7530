"""Named blobs fetched from a peer on /formation/blob/1: one request, one answer.

Request: one frame, the blob's name (UTF-8, at most 256 bytes). Answer: one frame b"none", or
b"size N" followed by the blob in frames of at most 1 MiB. The node decides what a name means
and what it serves (`provide`); the fetcher says how much it accepts and must check what it got
(contexts, for instance, are checked by rebuilding their content address).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from .framing import FrameError, read_frame, write_frame

PROTOCOL = "/formation/blob/1"
MAX_NAME = 256
CHUNK = 1 << 20
TIMEOUT = 120.0  # seconds for a whole fetch

Provider = Callable[[str], Awaitable[bytes | None]]


async def serve(stream, provide: Provider) -> None:
    try:
        with trio.fail_after(30):
            name = (await read_frame(stream, MAX_NAME)).decode()
        blob = await provide(name)
        if blob is None:
            await write_frame(stream, b"none")
            return
        await write_frame(stream, f"size {len(blob)}".encode())
        for at in range(0, len(blob), CHUNK):
            await write_frame(stream, blob[at:at + CHUNK])
    finally:
        await stream.close()


async def fetch(stream, name: str, limit: int) -> bytes | None:
    """The blob, or None if the peer has none. Raises FrameError on a broken or oversized answer."""
    if len(name.encode()) > MAX_NAME:
        raise ValueError(f"blob name over {MAX_NAME} bytes")
    with trio.fail_after(TIMEOUT):
        await write_frame(stream, name.encode())
        head = (await read_frame(stream, 64)).decode(errors="replace")
        if head == "none":
            return None
        word, _, size_text = head.partition(" ")
        if word != "size" or not size_text.isdecimal():
            raise FrameError(f"bad blob answer {head!r}")
        size = int(size_text)
        if size > limit:
            raise FrameError(f"blob {name} is {size} bytes, over the limit of {limit}")
        out = bytearray()
        while len(out) < size:
            out += await read_frame(stream, min(CHUNK, size - len(out)))
        return bytes(out)
