"""What the proxy tests share: fake replicas (tiny HTTP servers on loopback that say who they
are and what they were sent), a dialer that maps the VM addresses the state names to them, a
zone built the way the node builds it, and a proxy on a free port."""

from __future__ import annotations

import errno
import hashlib
import json

import h11
import trio

from formation.dns.names import Zone, build_zone
from formation.node.proxy import Proxy, ProxyLimits, dial, listeners

A = "0x" + "a1" * 20  # two nodes of the fog
B = "0x" + "b2" * 20
OWNER = "0x" + "0c" * 20
SUBNETS = {A: "10.202.1.0/24", B: "10.201.1.0/24"}
IP = {A: "10.202.1.5", B: "10.201.1.5"}  # the replica each runs


class FakeReplica:
    """An HTTP/1.1 server (on 127.0.0.1 unless told) answering every request with JSON: its name, the method,
    target, headers, and the body's length and sha256. `mode`: "ok", "reset" (takes the
    connection and closes it), "hang" (takes it and says nothing), "early" (answers 413 to the
    head and closes, reading no body)."""

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0):
        self.name = name
        self.host = host
        self.mode = "ok"
        self.port = port
        self.requests: list[dict] = []
        self._scope: trio.CancelScope | None = None

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        lst = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = lst[0].socket.getsockname()[1]
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.serve_listeners, self._handle, lst)
                task_status.started(self)

    def stop(self) -> None:
        """Stop listening and drop every connection: connecting is refused from now on."""
        assert self._scope is not None
        self._scope.cancel()

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self.mode == "reset":
            await stream.aclose()
            return
        if self.mode == "hang":
            await trio.sleep_forever()
        conn = h11.Connection(h11.SERVER)
        if self.mode == "early":  # answers as soon as it has the head, reads no body, closes
            while not isinstance(ev := conn.next_event(), h11.Request):
                conn.receive_data(await stream.receive_some(65536))
            self.requests.append({"replica": self.name, "early": True})
            await stream.send_all(b"HTTP/1.1 413 Too Large\r\ncontent-length: 5\r\nconnection: close\r\n\r\nearly")
            await stream.aclose()
            return
        try:
            while True:
                req, body = None, b""
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(ev, h11.Request):
                        req = ev
                    elif isinstance(ev, h11.Data):
                        body += ev.data
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    else:
                        return
                seen = {"replica": self.name, "method": req.method.decode(), "target": req.target.decode(),
                        "headers": [[n.decode(), v.decode()] for n, v in req.headers],
                        "body_len": len(body), "body_sha256": hashlib.sha256(body).hexdigest()}
                self.requests.append(seen)
                out = json.dumps(seen).encode()
                if req.target == b"/chunked":  # an answer of unknown length, in pieces
                    await stream.send_all(conn.send(h11.Response(status_code=200, headers=[])))
                    for i in range(3):
                        await stream.send_all(conn.send(h11.Data(data=f"part{i};".encode())))
                else:
                    await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                        ("content-type", "application/json"), ("content-length", str(len(out))),
                        ("x-secret-hop", "1"), ("connection", "x-secret-hop")])))
                    await stream.send_all(conn.send(h11.Data(data=out)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, h11.ProtocolError):
            return
        finally:
            await stream.aclose()


class Dialer:
    """The proxy's dialer in tests: (VM address, port) -> a fake replica on loopback, or "hang"
    (the connection is never taken). Everything dialed is recorded; anything unmapped is
    refused (and shows in `dialed`)."""

    def __init__(self, mapping: dict | None = None):
        self.mapping: dict[tuple[str, int], FakeReplica | str] = dict(mapping or {})
        self.dialed: list[tuple[str, int]] = []

    async def __call__(self, ip: str, port: int) -> trio.abc.Stream:
        self.dialed.append((ip, port))
        target = self.mapping.get((ip, port))
        if target == "hang":
            await trio.sleep_forever()
        if not isinstance(target, FakeReplica):
            raise OSError(errno.ECONNREFUSED, "Connection refused (not a test replica)")
        return await dial("127.0.0.1", target.port)


class StaticSource:
    def __init__(self, zone: Zone):
        self.zone = zone


def instance(iid: str, name: str, formfile: str = "EXPOSE 8080\n", build: str | None = None) -> dict:
    formfile = f"NAME {name}\n{formfile}"
    return {"instance_id": iid, "owner": OWNER, "name": name, "formfile": formfile, "created_at": 1,
            "build_id": build}


def running(iid: str, node: str, ip: str | None = None) -> dict:
    return {"instance_id": iid, "node": node, "state": "running", "ip": ip or IP[node]}


def source(instances: list[dict], statuses: list[dict], *, records=(), agents=(), verified=None) -> StaticSource:
    """A zone as the node's DNS view builds it, from these records (both nodes live)."""
    from formation.pack.formfile import exposed_ports

    ports = {i["instance_id"]: tuple(exposed_ports(i["formfile"])) for i in instances}
    zone = build_zone(instances=instances, statuses=statuses, serving=SUBNETS, ports=ports,
                      agents=agents, records=records, verified=verified)
    return StaticSource(zone)


async def start_proxy(nursery: trio.Nursery, src, dialer=None, **limits) -> tuple[Proxy, str]:
    proxy = Proxy(src, ProxyLimits(**limits), dialer=dialer)
    listening = await listeners("127.0.0.1", 0)
    await nursery.start(proxy.serve, listening)
    port = listening[0].listener.socket.getsockname()[1]
    return proxy, f"http://127.0.0.1:{port}"


async def raw(url: str, data: bytes, *, read_for: float = 3.0) -> bytes:
    """Send bytes to the proxy, return everything it answers before closing (or read_for s)."""
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    out = b""
    async with stream:
        await stream.send_all(data)
        with trio.move_on_after(read_for):
            while chunk := await stream.receive_some(65536):
                out += chunk
    return out
