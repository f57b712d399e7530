"""What the DNS tests share: a tiny authoritative server standing in for the internet's DNS
(dnspython, UDP and TCP on loopback), and a client that asks a server one question."""

from __future__ import annotations

import shutil
import socket
import struct

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import trio

from formation.dns.forward import receive_exactly


def free_port() -> int:
    """A port free for UDP and TCP both (the DNS server binds one port for the two)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


class Authority:
    """An authoritative server for whatever names `set` gives it: NXDOMAIN (with an SOA of
    `negative_ttl`) for the rest. Counts the questions it was asked."""

    def __init__(self, negative_ttl: int = 1):
        self.records: dict[tuple[str, int], dns.rrset.RRset] = {}
        self.negative_ttl = negative_ttl
        self.asked: list[tuple[str, str]] = []
        self.address: tuple[str, int] | None = None
        self.delay = 0.0  # seconds before each answer (a slow upstream)
        self.silent = False  # no answer at all (a dead upstream)

    def set(self, name: str, rdtype: str, values: list[str], ttl: int = 60) -> None:
        n = dns.name.from_text(name)
        t = dns.rdatatype.from_text(rdtype)
        if values:
            self.records[(n.to_text().lower(), t)] = dns.rrset.from_text_list(n, ttl, "IN", t, values)
        else:
            self.records.pop((n.to_text().lower(), t), None)

    def answer(self, wire: bytes) -> bytes | None:
        q = dns.message.from_wire(wire)
        question = q.question[0]
        key = question.name.to_text().lower()
        self.asked.append((key, dns.rdatatype.to_text(question.rdtype)))
        resp = dns.message.make_response(q)
        resp.flags |= dns.flags.AA
        rrset = self.records.get((key, question.rdtype))
        if rrset is not None:
            resp.answer.append(rrset)
        else:
            if not any(k == key for k, _ in self.records):
                resp.set_rcode(dns.rcode.NXDOMAIN)
            resp.authority.append(dns.rrset.from_text(
                dns.name.from_text(key).parent() if len(question.name) > 1 else question.name,
                self.negative_ttl, "IN", "SOA",
                f"ns.test. admin.test. 1 60 60 60 {self.negative_ttl}"))
        return resp.to_wire(max_size=65535)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        udp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        port = free_port()
        await udp.bind(("127.0.0.1", port))
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        self.address = ("127.0.0.1", port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._udp, udp, nursery)
            nursery.start_soon(trio.serve_listeners, self._tcp, listeners)
            task_status.started(self.address)

    async def _udp(self, sock, nursery) -> None:
        while True:
            data, addr = await sock.recvfrom(65535)
            nursery.start_soon(self._reply, sock, data, addr)

    async def _reply(self, sock, data, addr) -> None:
        if self.silent:
            return
        await trio.sleep(self.delay)
        wire = self.answer(data)
        if len(wire) > 512:
            msg = dns.message.from_wire(wire)
            wire = msg.to_wire(max_size=512, prefer_truncation=True)
        await sock.sendto(wire, addr)

    async def _tcp(self, stream) -> None:
        async with stream:
            try:
                (n,) = struct.unpack("!H", await receive_exactly(stream, 2))
                wire = self.answer(await receive_exactly(stream, n))
                await stream.send_all(struct.pack("!H", len(wire)) + wire)
            except (EOFError, trio.BrokenResourceError):
                pass


async def ask(address: tuple[str, int], name: str, rdtype: str = "A", *, tcp: bool = False,
              edns: int | None = 0, payload: int = 1232, timeout: float = 3.0) -> dns.message.Message:
    """One question to a DNS server over UDP or TCP (no retry, no fallback)."""
    q = dns.message.make_query(name, rdtype, use_edns=edns if edns is not None else False,
                               payload=payload)
    return await exchange(address, q, tcp=tcp, timeout=timeout)


async def exchange(address, q: dns.message.Message, *, tcp: bool = False, timeout: float = 3.0) -> dns.message.Message:
    wire = q.to_wire()
    with trio.fail_after(timeout):
        if tcp:
            stream = await trio.open_tcp_stream(*address)
            async with stream:
                await stream.send_all(struct.pack("!H", len(wire)) + wire)
                (n,) = struct.unpack("!H", await receive_exactly(stream, 2))
                return dns.message.from_wire(await receive_exactly(stream, n))
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
            await sock.connect(address)
            await sock.send(wire)
            while True:
                msg = dns.message.from_wire(await sock.recv(65535))
                if q.is_response(msg):
                    return msg


async def raw_udp(address, wire: bytes, *, timeout: float = 0.2) -> bytes | None:
    """Send bytes; the reply's bytes, or None if none came in time."""
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
        await sock.connect(address)
        await sock.send(wire)
        with trio.move_on_after(timeout):
            return await sock.recv(65535)
    return None


DIG = shutil.which("dig")


async def dig(address: tuple[str, int], *args: str) -> str:
    """dig's output (+short unless args say otherwise)."""
    proc = await trio.run_process([DIG, f"@{address[0]}", "-p", str(address[1]), "+time=3", "+tries=1", *args],
                                  capture_stdout=True, capture_stderr=True, check=False)
    return proc.stdout.decode()
