"""Length-prefixed frames on a libp2p stream: 4-byte big-endian length, then the payload."""

from __future__ import annotations

import struct


class FrameError(Exception):
    """The peer broke framing: oversized frame, or the stream ended inside one."""


async def read_exactly(stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise FrameError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def read_frame(stream, max_bytes: int) -> bytes:
    (length,) = struct.unpack(">I", await read_exactly(stream, 4))
    if length > max_bytes:
        raise FrameError(f"frame of {length} bytes is over the limit of {max_bytes}")
    return await read_exactly(stream, length)


async def write_frame(stream, payload: bytes) -> None:
    await stream.write(struct.pack(">I", len(payload)) + payload)
