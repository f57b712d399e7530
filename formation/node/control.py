"""A local control socket (DATA_DIR/control.sock): newline-delimited JSON, one request per line.

For tools and tests on the same host (the HTTP API is the user-facing interface). Requests:
  {"cmd": "status"}
  {"cmd": "submit", "message": str, "body": base64, "signature": hex}   a user's signed write
  {"cmd": "get", "kind": str, "key": str}
  {"cmd": "sync", "peer": peer id or null}
  {"cmd": "invite", "expires": seconds}   an invite token from this member (form invite create)
  {"cmd": "leave"}                        this node leaves its fog (form manage leave)
  {"cmd": "block" | "unblock", "peer": peer id}                           cut a link (tests)
  {"cmd": "watch", "since": seq}       then one line per committed op: {"seq", "id", "t"}
Every answer is {"ok": true, ...} or {"ok": false, "error": code, "detail": text}.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import time
from pathlib import Path

import trio

from formation.crdt.op import OpError
from formation.crdt.strict import StrictError, parse_json

from .fog import InviteError
from .ports import ControlNode

log = logging.getLogger("formation.node.control")
MAX_LINE = 1024 * 1024


async def serve_control(node: ControlNode, path: Path, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    path = Path(path)
    if path.exists():
        path.unlink()  # left by a node that was killed; we hold the data dir now
    sock = trio.socket.from_stdlib_socket(_bind_private(path))
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        async with listener:
            task_status.started(path)
            await trio.serve_listeners(lambda s: _serve(node, s), [listener])
    finally:
        path.unlink(missing_ok=True)


def _bind_private(path: Path) -> socket.socket:
    """A Unix socket bound at `path` that only this user can ever connect to: the socket can
    write as this node, so it is created under umask 0o177 (mode 0600 from its first instant,
    not chmod-ed after a moment of being open to others). The umask is the process's: it is
    set around the one bind call, with no await in between."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)  # whatever the umask did, owner only
    except BaseException:
        sock.close()
        raise
    return sock


async def _serve(node: ControlNode, stream: trio.SocketStream) -> None:
    buf = b""
    async with stream:
        try:
            while True:
                while b"\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                    if len(buf) > MAX_LINE:
                        await _send(stream, _error("too_large", f"request over {MAX_LINE} bytes"))
                        return
                line, buf = buf.split(b"\n", 1)
                try:  # the strict parser: UTF-8 only, no duplicate keys, no NaN, 64-bit integers
                    req = parse_json(line, plain_text=False)
                    if not isinstance(req, dict):
                        raise StrictError("a request is a JSON object")
                except StrictError as exc:
                    await _send(stream, _error("bad_request", f"not a JSON object: {exc}"))
                    continue
                if req.get("cmd") == "watch":
                    since = req.get("since", 0)
                    if not isinstance(since, int) or isinstance(since, bool) or since < 0:
                        await _send(stream, _error("bad_request", "since: a sequence number (an integer >= 0)"))
                        continue
                    await _watch(node, stream, since)
                    return
                await _send(stream, await _handle(node, req))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def _handle(node: ControlNode, req: dict) -> dict:
    cmd = req.get("cmd")
    try:
        if cmd == "status":
            return {"ok": True, **(await node.status())}
        if cmd == "submit":
            op = await node.submit_request(str(req["message"]), base64.b64decode(req.get("body", "")),
                                           str(req["signature"]))
            return {"ok": True, "id": op.id.hex(), "kind": op.kind, "key": op.key}
        if cmd == "get":
            value = await node.astore.get(str(req["kind"]), str(req["key"]))
            return {"ok": True, "value": value}
        if cmd == "sync":
            peer = req.get("peer")
            peers = [peer] if peer else node.p2p.connected()
            results = [await node.p2p.sync_with(p) for p in peers]
            return {"ok": True, "synced": [r.peer for r in results if r is not None and r.ok]}
        if cmd == "invite":
            expires = int(req.get("expires", 3600))
            if not 60 <= expires <= 30 * 86400:
                return _error("bad_request", "expires: seconds from 60 to 2592000 (30 days)")
            try:
                token = await node.create_invite(expires_s=expires)
            except InviteError as exc:
                return _error("refused", str(exc))
            return {"ok": True, "token": token.encode(), "fog_id": token.invite["fog_id"],
                    "serial": token.invite["serial"], "expires": token.invite["expires"]}
        if cmd == "leave":
            try:
                fog_id = await node.leave()
            except InviteError as exc:
                return _error("refused", str(exc))
            return {"ok": True, "fog_id": fog_id}
        if cmd == "block":
            await node.p2p.block(str(req["peer"]))
            return {"ok": True}
        if cmd == "unblock":
            node.p2p.unblock(str(req["peer"]))
            return {"ok": True}
    except OpError as exc:
        return _error(exc.code, exc.detail)
    except (KeyError, TypeError, ValueError) as exc:
        return _error("bad_request", f"{type(exc).__name__}: {exc}")
    return _error("bad_request", f"unknown cmd {cmd!r}")


WATCH_BATCH = 1024  # ops read per store call


async def _watch(node: ControlNode, stream, seq: int) -> None:
    await _send(stream, {"ok": True})
    while True:
        newest = await node.changes.wait_past(seq)
        now = time.time()
        metas = await node.astore.since(seq, WATCH_BATCH)
        if len(metas) == WATCH_BATCH:
            newest = metas[-1].seq  # more to read: the next round does not wait
        # t: when the op's batch was committed (not when this loop woke up)
        lines = b"".join(json.dumps({"seq": m.seq, "id": m.id.hex(),
                                     "t": node.changes.commit_time(m.seq) or now}).encode() + b"\n"
                         for m in metas)
        await stream.send_all(lines)
        seq = max([newest] + [m.seq for m in metas])


def _error(code: str, detail: str) -> dict:
    return {"ok": False, "error": code, "detail": detail}


async def _send(stream, obj: dict) -> None:
    await stream.send_all(json.dumps(obj).encode() + b"\n")


class ControlClient:
    """Blocking client for scripts and tests."""

    def __init__(self, path: str | Path, timeout: float = 30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def call(self, **req) -> dict:
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        line = self.file.readline()
        if not line:
            raise ConnectionError("control socket closed")
        return json.loads(line)

    def lines(self):
        for line in self.file:
            yield json.loads(line)

    def close(self) -> None:
        self.file.close()
        self.sock.close()
