"""The DNS server: UDP and TCP on one port, in the caller's trio nursery.

The query path never waits on anything but the network: a query is answered from the zone
the node swapped in last (`set_zone`), from the response cache, or forwarded upstream by a
task of its own. Every structure is bounded, in total and per source address:

- a token bucket per source (`client_qps`; over it a UDP query is dropped, a TCP connection
  closed), the table of sources bounded;
- the response cache: responses keyed by the query bytes (id aside, name case folded), so a
  repeated question costs one dictionary lookup; emptied when a new zone is swapped in;
- forwarded questions in flight, total and per source (past either: SERVFAIL);
- TCP connections, total and per source, each closed when idle.

A query that cannot be parsed gets FORMERR (when it has a header), a response is never
answered, a query longer than `max_query_bytes` is dropped.
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import trio

from . import answer as ans
from .bounds import LruCache, RateLimiter, Slots
from .forward import Busy, Forwarder, UpstreamFailed, receive_exactly
from .names import EMPTY, Zone

log = logging.getLogger("formation.dns")

_FREE_PORT_ATTEMPTS = 8


@dataclass(frozen=True)
class ServerLimits:
    client_qps: float = 1000.0  # per source address; 0: no limit
    client_burst: float | None = None  # default: twice the rate
    max_sources: int = 65_536  # sources the rate limiter remembers
    max_query_bytes: int = 4096
    cache_entries: int = 20_000  # the response cache
    cache_bytes: int = 16 * 1024 * 1024
    forwards: int = 1024  # forwarded queries waiting for an answer
    forwards_per_source: int = 64
    tcp_connections: int = 256
    tcp_per_source: int = 16
    tcp_idle_seconds: float = 10.0
    tcp_queries_per_connection: int = 10_000


@dataclass
class Stats:
    queries: int = 0
    cache_hits: int = 0
    answered: int = 0  # from the zone
    forwarded: int = 0
    refused: int = 0
    servfail: int = 0
    formerr: int = 0
    dropped: int = 0  # too long, a response, unparseable without a header
    rate_limited: int = 0
    truncated: int = 0
    tcp_refused: int = 0  # connections over the bounds

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Forward:
    """A query to send upstream: the response comes from a task of its own."""

    query: dns.message.Message
    key: bytes | None
    end: int
    limit: int
    zone: Zone | None = None  # the zone that did not answer it (its answer is cached only while it is)


def question_end(wire: bytes) -> int | None:
    """Where the name of the one question of a plain query ends (a key for the response
    cache): None for anything else (a response, several questions, compression, too short)."""
    n = len(wire)
    if n < 17 or wire[2] & 0x80 or wire[4:10] != b"\x00\x01\x00\x00\x00\x00" or wire[10] or wire[11] > 1:
        return None
    i = 12
    while True:
        if i >= n:
            return None
        length = wire[i]
        if length == 0:
            break
        if length > 63:
            return None
        i += length + 1
    end = i + 1
    if end - 12 > 255 or end + 4 > n:
        return None
    return end


class DnsServer:
    def __init__(self, zone: Zone = EMPTY, *, forwarder: Forwarder | None = None, forward: bool = True,
                 limits: ServerLimits = ServerLimits(), clock: Callable[[], float] = trio.current_time):
        self.zone = zone
        self.forwarder = forwarder
        self.forwarding = forward and forwarder is not None and bool(forwarder.upstreams)
        self.limits = limits
        self.clock = clock
        self.stats = Stats()
        self.limiter = RateLimiter(limits.client_qps, limits.client_burst, max_sources=limits.max_sources)
        self.cache: LruCache[tuple[bytes, float]] = LruCache(limits.cache_entries, limits.cache_bytes)
        self.forwards = Slots(limits.forwards, limits.forwards_per_source)
        self.tcp = Slots(limits.tcp_connections, limits.tcp_per_source)
        self.address: tuple[str, int] | None = None
        self._sockets: tuple | None = None

    def set_zone(self, zone: Zone) -> None:
        """Swap in a new zone (atomic: the next query sees it whole)."""
        self.zone = zone
        self.cache.clear()

    # ---- the query path (synchronous: no await between a query and its answer) ----------------

    def respond(self, wire: bytes, *, tcp: bool) -> bytes | Forward | None:
        """The answer to one query's bytes: wire bytes, a Forward to do, or None (no reply)."""
        self.stats.queries += 1
        if len(wire) > self.limits.max_query_bytes:
            self.stats.dropped += 1
            return None
        end = question_end(wire)
        key = None
        if end is not None:
            key = (b"T" if tcp else b"U") + wire[2:12] + wire[12:end].lower() + wire[end:]
            hit = self.cache.get(key)
            if hit is not None and hit[1] >= self.clock():
                self.stats.cache_hits += 1
                out = hit[0]
                return wire[:2] + out[2:12] + wire[12:end] + out[end:]
        if len(wire) < 12 or wire[2] & 0x80:
            self.stats.dropped += 1
            return None
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - any malformed input at all: FORMERR, never a crash
            self.stats.formerr += 1
            return ans.error_for(wire, dns.rcode.FORMERR)
        limit = 65535 if tcp else ans.max_udp_size(query)
        try:
            resp = ans.answer(query, self.zone, recursion=self.forwarding)
        except Exception:  # noqa: BLE001 - a bug must cost one answer, not the server
            log.exception("dns: answering %s failed", query.question[:1])
            self.stats.servfail += 1
            return _render(ans.status(query, dns.rcode.SERVFAIL, recursion=self.forwarding), limit)
        if resp is None:
            q = query.question[0]
            if not self.forwarding or q.rdtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
                self.stats.refused += 1
                resp = ans.status(query, dns.rcode.REFUSED, recursion=self.forwarding)
            else:
                self.stats.forwarded += 1
                return Forward(query, key, end or 0, limit, self.zone)
        else:
            self.stats.answered += 1
        out = _render(resp, limit)
        if out[2] & 0x02:
            self.stats.truncated += 1
        if key is not None:
            self._keep(key, end, out, float("inf"))
        return out

    def _keep(self, key: bytes, end: int, out: bytes, expires: float) -> None:
        # only a response whose question sits where the query's did can be spliced
        if out[4:6] == b"\x00\x01" and out[12:end].lower() == key[11:11 + end - 12]:
            self.cache.put(key, (out, expires), len(key) + len(out) + 100)

    async def forward(self, fwd: Forward, source: str) -> bytes:
        """The answer to a forwarded query (SERVFAIL when upstreams fail or bounds are hit)."""
        q = fwd.query
        question = q.question[0]
        try:
            msg, age = await self.forwarder.resolve(
                question.name, question.rdtype, rdclass=question.rdclass,
                dnssec=bool(q.ednsflags & dns.flags.DO), cd=bool(q.flags & dns.flags.CD), source=source)
        except (Busy, UpstreamFailed) as exc:
            log.debug("dns: forwarding %s: %s", question, exc)
            self.stats.servfail += 1
            return _render(ans.status(q, dns.rcode.SERVFAIL, recursion=True), fwd.limit)
        out = _render(ans.from_upstream(q, msg, age), fwd.limit)
        if fwd.key is not None:
            ttls = [r.ttl for s in (msg.answer, msg.authority) for r in s]
            left = (min(ttls) if ttls else 0) - age
            if left >= 1 and fwd.zone is self.zone:
                self._keep(fwd.key, fwd.end, out, self.clock() + 1.0)
        return out

    # ---- sockets ----------------------------------------------------------------------------

    async def open(self, host: str, port: int) -> tuple[str, int]:
        """Bind UDP and TCP on host:port (port 0: one free port for both). Raises OSError."""
        # With port 0 the kernel picks a free UDP port, which another program may hold for TCP;
        # then pick again (a few times) rather than fail a start that asked for any port.
        for attempt in range(_FREE_PORT_ATTEMPTS):
            try:
                return await self._open_once(host, port)
            except OSError as exc:
                if port != 0 or exc.errno != errno.EADDRINUSE or attempt == _FREE_PORT_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def _open_once(self, host: str, port: int) -> tuple[str, int]:
        family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
        udp = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
        try:
            await udp.bind((host, port))
            port = udp.getsockname()[1]
            tcp = trio.socket.socket(family, trio.socket.SOCK_STREAM)
            try:
                tcp.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
                await tcp.bind((host, port))
                tcp.listen(128)
            except BaseException:
                tcp.close()
                raise
        except BaseException:
            udp.close()
            raise
        self._sockets = (udp, trio.SocketListener(tcp))
        self.address = (host, port)
        return self.address

    async def serve(self, host: str | None = None, port: int = 0, *,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (binding first unless `open` did); started with (host, port)."""
        if self._sockets is None:
            await self.open(host or "127.0.0.1", port)
        udp, listener = self._sockets
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._udp_loop, udp, nursery)
                nursery.start_soon(trio.serve_listeners, self._tcp_connection, [listener])
                task_status.started(self.address)
        finally:
            self._sockets = None
            udp.close()
            with trio.CancelScope(shield=True):
                await listener.aclose()

    async def _udp_loop(self, sock, nursery: trio.Nursery) -> None:
        limiter, clock = self.limiter, self.clock
        while True:
            try:
                data, addr = await sock.recvfrom(65535)
            except OSError:
                continue
            source = addr[0]
            if not limiter.allow(source, clock()):
                self.stats.rate_limited += 1
                continue
            try:
                out = self.respond(data, tcp=False)
            except Exception:  # noqa: BLE001 - one query's trouble never ends the server
                log.exception("dns: a query failed")
                continue
            if out is None:
                continue
            if isinstance(out, Forward):
                if not self.forwards.take(source):
                    self.stats.servfail += 1
                    out = _render(ans.status(out.query, dns.rcode.SERVFAIL, recursion=True), out.limit)
                else:
                    nursery.start_soon(self._udp_forward, sock, out, addr)
                    continue
            try:
                await sock.sendto(out, addr)
            except OSError:
                pass

    async def _udp_forward(self, sock, fwd: Forward, addr) -> None:
        try:
            out = await self.forward(fwd, addr[0])
            await sock.sendto(out, addr)
        except OSError:
            pass
        except Exception:  # noqa: BLE001
            log.exception("dns: forwarding failed")
        finally:
            self.forwards.give(addr[0])

    async def _tcp_connection(self, stream: trio.SocketStream) -> None:
        try:
            source = stream.socket.getpeername()[0]
        except OSError:
            await stream.aclose()
            return
        if not self.tcp.take(source):
            self.stats.tcp_refused += 1
            await stream.aclose()
            return
        lim = self.limits
        try:
            async with stream:
                for _ in range(lim.tcp_queries_per_connection):
                    n, wire = -1, b""
                    with trio.move_on_after(lim.tcp_idle_seconds):
                        (n,) = struct.unpack("!H", await receive_exactly(stream, 2))
                        if n > lim.max_query_bytes or n < 12:
                            self.stats.dropped += 1
                            return
                        wire = await receive_exactly(stream, n)
                    if not wire or len(wire) != n:
                        return  # idle, or a query that never came whole
                    if not self.limiter.allow(source, self.clock()):
                        self.stats.rate_limited += 1
                        return
                    out = self.respond(wire, tcp=True)
                    if isinstance(out, Forward):
                        if not self.forwards.take(source):
                            self.stats.servfail += 1
                            out = _render(ans.status(out.query, dns.rcode.SERVFAIL, recursion=True), 65535)
                        else:
                            try:
                                out = await self.forward(out, source)
                            finally:
                                self.forwards.give(source)
                    if out is None:
                        continue
                    with trio.move_on_after(lim.tcp_idle_seconds) as cs:
                        await stream.send_all(struct.pack("!H", len(out)) + out)
                    if cs.cancelled_caught:
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError, OSError):
            pass
        except Exception:  # noqa: BLE001 - one connection's trouble never ends the server
            log.exception("dns: a TCP connection failed")
        finally:
            self.tcp.give(source)


def _render(resp: dns.message.Message, limit: int) -> bytes:
    return ans.render(resp, limit)
