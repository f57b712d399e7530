"""Forwarding to upstream resolvers: a bounded cache, one upstream query per question in flight
(the rest wait for it), timeouts, and bounds on what each source may start.

Each upstream query goes from a fresh UDP socket (a random port) with a random id, and only an
answer from that upstream with that id and question is taken (no spoofed answer is cached);
an answer with TC is asked again over TCP.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import trio

from .bounds import LruCache, Slots

log = logging.getLogger("formation.dns")

UPSTREAM_PAYLOAD = 1232
MAX_UPSTREAMS_TRIED = 3
NEGATIVE_TTL_MAX = 900  # RFC 2308's advice: at most a few hours; we keep it shorter
SERVFAIL_TTL = 2  # a failing question is not asked again upstream for this long


class Busy(Exception):
    """Too many upstream queries in flight (for everyone, or for this source)."""


@dataclass(frozen=True, order=True)
class Upstream:
    host: str
    port: int = 53

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def family(self) -> int:
        return trio.socket.AF_INET6 if ":" in self.host else trio.socket.AF_INET


def parse_upstream(text: str) -> Upstream:
    """"192.0.2.53", "192.0.2.53:5353", "2001:db8::53", "[2001:db8::53]:5353"."""
    if not isinstance(text, str):
        raise ValueError("an upstream is an IP address, optionally with :port")
    text = text.strip()
    host, port = text, 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: expected [IPv6]:port")
        port = int(rest[1:]) if rest else 53
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        if not p.isdigit():
            raise ValueError(f"{text!r}: the port must be a number")
        port = int(p)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"{text!r}: the upstream must be an IP address (not a name: no resolver "
                         "to find it with)") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port out of range")
    return Upstream(host, port)


def system_upstreams(path: str = "/etc/resolv.conf") -> list[Upstream]:
    """The nameservers of resolv.conf (port 53), in its order."""
    out = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                out.append(parse_upstream(parts[1].split("%")[0]))
            except ValueError:
                continue
    return list(dict.fromkeys(out))


def cache_ttl(msg: dns.message.Message, max_ttl: int) -> float:
    """How long an upstream answer may be kept: its smallest TTL; a negative answer its SOA's
    (RFC 2308); a failure briefly; an answer with nothing to go by, not at all."""
    rcode = msg.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        return SERVFAIL_TTL if rcode == dns.rcode.SERVFAIL else 0
    if msg.answer and rcode == dns.rcode.NOERROR:
        return min(max_ttl, min(r.ttl for r in msg.answer))
    for rrset in msg.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return min(max_ttl, NEGATIVE_TTL_MAX, rrset.ttl, next(iter(rrset)).minimum)
    return 0


@dataclass
class Cached:
    message: dns.message.Message
    received: float
    expires: float


class _Pending:
    __slots__ = ("done", "result")

    def __init__(self):
        self.done = trio.Event()
        self.result: Cached | None = None


class Forwarder:
    """Asks the upstreams, in order, what the fog's zones do not answer."""

    def __init__(self, upstreams: Iterable[Upstream], *, timeout: float = 2.0, cache_entries: int = 10_000,
                 cache_bytes: int = 32 * 1024 * 1024, max_inflight: int = 256, max_inflight_per_source: int = 32,
                 max_ttl: int = 3600, clock: Callable[[], float] = trio.current_time):
        self.upstreams = list(dict.fromkeys(upstreams))
        self.timeout = timeout
        self.max_ttl = max_ttl
        self.clock = clock
        self.cache: LruCache[Cached] = LruCache(cache_entries, cache_bytes)
        self.slots = Slots(max_inflight, max_inflight_per_source)
        self._pending: dict[tuple, _Pending] = {}
        self.queries = 0  # sent upstream
        self.failures = 0

    async def resolve(self, name: dns.name.Name, rdtype: int, *, rdclass: int = dns.rdataclass.IN,
                      dnssec: bool = False, cd: bool = False, source: str = "") -> tuple[dns.message.Message, float]:
        """(the upstream's answer, its age in seconds). Raises Busy when over a bound, and
        UpstreamFailed when no upstream answered in time."""
        key = (name.to_text().lower(), int(rdtype), int(rdclass), dnssec, cd)
        now = self.clock()
        hit = self.cache.get(key)
        if hit is not None and hit.expires > now:
            return hit.message, now - hit.received
        pending = self._pending.get(key)
        if pending is not None:  # someone asked this already: wait for their answer
            await pending.done.wait()
            if pending.result is None:
                raise UpstreamFailed(f"no upstream answered {name} {dns.rdatatype.to_text(rdtype)}")
            return pending.result.message, self.clock() - pending.result.received
        if not self.slots.take(source):
            raise Busy(f"too many upstream queries in flight (source {source or '-'})")
        pending = self._pending[key] = _Pending()
        try:
            msg = await self._ask(name, rdtype, rdclass, dnssec=dnssec, cd=cd)
            if msg is None:
                self.failures += 1
                raise UpstreamFailed(f"no upstream answered {name} {dns.rdatatype.to_text(rdtype)}")
            now = self.clock()
            pending.result = Cached(msg, now, now + cache_ttl(msg, self.max_ttl))
            if pending.result.expires > now:
                self.cache.put(key, pending.result, _size(msg))
            return msg, 0.0
        finally:
            self.slots.give(source)
            del self._pending[key]
            pending.done.set()

    async def _ask(self, name, rdtype, rdclass, *, dnssec: bool, cd: bool) -> dns.message.Message | None:
        query = dns.message.make_query(name, rdtype, rdclass, use_edns=0, payload=UPSTREAM_PAYLOAD,
                                       want_dnssec=dnssec)
        if cd:
            query.flags |= dns.flags.CD
        last = None
        for up in self.upstreams[:MAX_UPSTREAMS_TRIED]:
            self.queries += 1
            try:
                with trio.fail_after(self.timeout):
                    msg = await self._udp(up, query)
                    if msg.flags & dns.flags.TC:
                        msg = await self._tcp(up, query)
            except (trio.TooSlowError, OSError, dns.exception.DNSException, EOFError, ValueError) as exc:
                log.debug("upstream %s: %s", up, exc)
                continue
            if msg.rcode() in (dns.rcode.SERVFAIL, dns.rcode.REFUSED, dns.rcode.NOTIMP):
                last = msg
                continue
            return msg
        return last

    async def _udp(self, up: Upstream, query: dns.message.Message) -> dns.message.Message:
        wire = query.to_wire()
        with trio.socket.socket(up.family, trio.socket.SOCK_DGRAM) as sock:
            await sock.connect((up.host, up.port))  # the kernel drops datagrams from anyone else
            await sock.send(wire)
            while True:
                data = await sock.recv(65535)
                try:
                    msg = dns.message.from_wire(data)
                except Exception:  # noqa: BLE001 - junk from the network: wait for the real answer
                    continue
                if query.is_response(msg):
                    return msg

    async def _tcp(self, up: Upstream, query: dns.message.Message) -> dns.message.Message:
        wire = query.to_wire()
        stream = await trio.open_tcp_stream(up.host, up.port)
        async with stream:
            await stream.send_all(struct.pack("!H", len(wire)) + wire)
            (n,) = struct.unpack("!H", await receive_exactly(stream, 2))
            msg = dns.message.from_wire(await receive_exactly(stream, n))
            if not query.is_response(msg):
                raise ValueError("a TCP answer to another question")
            return msg


class UpstreamFailed(Exception):
    pass


def _size(msg: dns.message.Message) -> int:
    """What a cached answer counts for: its records, roughly as on the wire, plus overhead."""
    n = 512
    for section in (msg.answer, msg.authority, msg.additional):
        for rrset in section:
            n += 64 + sum(len(r.to_wire()) + 16 for r in rrset)
    return n


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise EOFError("the connection closed")
        buf += chunk
    return bytes(buf)

