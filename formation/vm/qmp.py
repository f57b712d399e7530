"""A QMP client (QEMU Machine Protocol) over a unix socket, for trio.

QMP is newline-delimited JSON: a greeting, then `qmp_capabilities`, then commands answered in
order ({"return": ...} or {"error": {"class", "desc"}}), with asynchronous events interleaved
({"event": ..., "data": ..., "timestamp": ...}). One reader task routes answers to the waiting
command (by id) and events to a channel; commands may be sent from several tasks.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import trio

MAX_LINE = 16 * 1024 * 1024


class QmpError(Exception):
    """QEMU refused a command (error class and description), or the connection broke."""

    def __init__(self, error_class: str, desc: str):
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class QmpClient:
    def __init__(self, stream: trio.abc.Stream):
        self._stream = stream
        self._ids = itertools.count(1)
        self._waiting: dict[str, trio.MemorySendChannel] = {}
        self._send_lock = trio.Lock()
        self._events_send, self.events = trio.open_memory_channel(math.inf)
        self.greeting: dict | None = None
        self._closed = False

    @classmethod
    async def connect(cls, path: str | Path, nursery: trio.Nursery, *, timeout: float = 10.0) -> QmpClient:
        """Connect (retrying while QEMU creates the socket), negotiate, start the reader in `nursery`."""
        with trio.fail_after(timeout):
            while True:
                try:
                    stream = await trio.open_unix_socket(str(path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    await trio.sleep(0.01)
            client = cls(stream)
            buf = bytearray()
            client.greeting, buf = await client._read_line(buf)
            if "QMP" not in client.greeting:
                raise QmpError("ProtocolError", f"not a QMP greeting: {client.greeting!r}")
            nursery.start_soon(client._reader, buf)
            await client.execute("qmp_capabilities")
        return client

    async def _read_line(self, buf: bytearray) -> tuple[dict, bytearray]:
        while b"\n" not in buf:
            data = await self._stream.receive_some(65536)
            if not data:
                raise QmpError("ConnectionClosed", "QEMU closed the QMP socket")
            buf += data
            if len(buf) > MAX_LINE:
                raise QmpError("ProtocolError", "QMP line too long")
        line, _, rest = bytes(buf).partition(b"\n")
        try:
            return json.loads(line), bytearray(rest)
        except ValueError as exc:
            raise QmpError("ProtocolError", f"not JSON: {exc}") from None

    async def _reader(self, buf: bytearray) -> None:
        try:
            while True:
                msg, buf = await self._read_line(buf)
                if "event" in msg:
                    self._events_send.send_nowait(msg)
                    continue
                waiter = self._waiting.pop(str(msg.get("id")), None)
                if waiter is not None:
                    waiter.send_nowait(msg)
        except (QmpError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._closed = True
            for waiter in self._waiting.values():
                waiter.send_nowait({"error": {"class": "ConnectionClosed", "desc": "QMP connection closed"}})
            self._waiting.clear()
            self._events_send.close()

    async def execute(self, command: str, arguments: dict | None = None, *, timeout: float = 30.0) -> Any:
        if self._closed:
            raise QmpError("ConnectionClosed", "QMP connection closed")
        cid = str(next(self._ids))
        send, recv = trio.open_memory_channel(1)
        self._waiting[cid] = send
        msg = {"execute": command, "id": cid}
        if arguments:
            msg["arguments"] = arguments
        with trio.fail_after(timeout):
            async with self._send_lock:
                await self._stream.send_all(json.dumps(msg).encode() + b"\n")
            answer = await recv.receive()
        if "error" in answer:
            raise QmpError(answer["error"].get("class", "GenericError"), answer["error"].get("desc", ""))
        return answer.get("return")

    async def wait_event(self, name: str, *, timeout: float = 30.0) -> dict:
        with trio.fail_after(timeout):
            async for ev in self.events:
                if ev["event"] == name:
                    return ev
        raise QmpError("ConnectionClosed", f"QMP closed before event {name}")

    async def aclose(self) -> None:
        self._closed = True
        await self._stream.aclose()
