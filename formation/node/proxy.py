"""The host-routing proxy (docs/proxy.md): HTTP/1.1 by Host header to a running replica of what
the name stands for, over formnet, so that a user publishes a service on a name without knowing
where it runs (the original's form-rplb).

Routing is the DNS's, not a second set of rules: a Host routes when the zone the node's DNS view
built holds it (instance, owner-scoped, replica and agent names under .fog, owners' `dns`
records naming instances, vanity domains the verifier proved: the zone holds only those), and
it goes to the replicas that name's SRV targets are, the replicas the DNS counts: reported
running by a live member of the fog, at an address inside that member's VM subnet as formnet
routes it, and not found unhealthy by that member's own probe (names.running_replicas and
names.counts, the rule /agents/:id/hire follows too). The port is the
lowest one the instance's Formfile EXPOSEs (for an agent's name, the agent's port). The proxy
connects to nothing else: an IP literal, a host name outside the zone, a `dns` record's own
addresses are never dialed, so it is not an open proxy.

Failover: the replicas are tried in turn (round robin among the healthy, then those marked
down), at most MAX_ATTEMPTS of them; one that refuses or times out the connection is marked down
for `down_seconds` and the next is tried. No byte of the request is lost meanwhile: up to 1 MiB
of the body is read and kept before the first connection, the rest is read only once a replica
took the connection. A replica that took the connection and closed it without a byte of answer
is marked down too, and the request goes to the next one when sending it again is safe: an
idempotent method whose body was kept whole. `Proxy.healthy` is this node's passive view on
top of the zone (whose replicas already passed their own node's probes).

Bounds: connections in total and per client address, the request head's size and the time it
may take to arrive (slowloris), idle time, the whole exchange's time, the body's size, requests
per connection. Plain HTTP; `listeners` is the seam where TLS (a context choosing the
certificate by SNI) would wrap the TCP listeners.
"""

from __future__ import annotations

import errno
import http
import itertools
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import h11
import trio

from formation.dns.names import Zone, canonical_name, label_address

from .config import Config

log = logging.getLogger("formation.proxy")

RETRY_BODY = 1024 * 1024  # bytes of a request body kept until a replica answers (for a retry)
MAX_ATTEMPTS = 4  # replicas one request is offered to
MAX_HOPS = 4  # proxies a request may have passed through (a name pointing back at a proxy)
HOPS_HEADER = b"x-formation-hops"
REPLICA_HEADER = b"x-formation-replica"  # on the answer: the node whose replica answered
RECEIVE = 64 * 1024  # bytes read at once
RESPONSE_HEAD = 64 * 1024  # the largest head of a replica's answer
MAX_REQUESTS_PER_CONNECTION = 1000
MAX_DOWN = 4096  # replicas remembered as down
MAX_CNAMES = 8  # CNAMEs followed inside the zone (as the DNS does)
MAX_REFUSING = 256  # connections over a bound answered at once (the others are just closed)
LINGER = 2.0  # seconds a connection closed with a request unread waits for the client to read the answer
REFUSE_LINGER = 0.5  # the same for a connection refused over a bound
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # in a header value (tab is fine)
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
# hop-by-hop: about one connection, never passed on (RFC 9110 §7.6.1); Expect is answered here
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"proxy-authenticate",
                        b"proxy-authorization", b"expect"})


@dataclass(frozen=True)
class ProxyLimits:
    max_connections: int = 1024
    max_connections_per_ip: int = 64
    max_header: int = 32 * 1024  # bytes of a request head
    max_body: int = 64 * 1024 * 1024
    connect_timeout: float = 2.0
    down_seconds: float = 10.0
    idle_timeout: float = 30.0
    header_timeout: float = 10.0
    request_timeout: float = 300.0

    @classmethod
    def from_config(cls, config: Config) -> ProxyLimits:
        p = config.proxy
        return cls(max_connections=p.max_connections, max_connections_per_ip=p.max_connections_per_ip,
                   max_header=p.max_header_kb * 1024, max_body=p.max_body_mb * 1024 * 1024,
                   connect_timeout=p.connect_timeout_ms / 1000, down_seconds=float(p.down_seconds),
                   idle_timeout=float(p.idle_timeout_seconds),
                   header_timeout=float(p.header_timeout_seconds),
                   request_timeout=float(p.request_timeout_seconds))


class ZoneSource(Protocol):
    """What the proxy routes by: the DNS view (dnsview.DnsView) or a test's stand-in."""

    @property
    def zone(self) -> Zone: ...


class ProxyNode(Protocol):
    config: Config


@dataclass(frozen=True, slots=True)
class Replica:
    node: str  # the address of the node that runs it
    instance_id: str
    ip: str
    port: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.ip, self.port)

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port} (node {self.node})"


class Refusal(Exception):
    """An answer the proxy gives itself: status and why."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


# ---- routing (no IO) ----------------------------------------------------------------------------

def host_name(values: list[bytes]) -> str:
    """The name a request's Host header asks for: port stripped, lowercase, as the zone keys it.
    Raises Refusal (400) for anything that is not one host name."""
    if len(values) != 1:
        raise Refusal(400, "a request needs exactly one Host header")
    raw = values[0]
    if not raw or len(raw) > 300 or any(b < 0x21 or b > 0x7E for b in raw):
        raise Refusal(400, "the Host header is not a host name (empty, too long, or control characters)")
    text = raw.decode("ascii")
    if text.startswith("["):
        raise Refusal(404, f"{text} is an address: this proxy serves the fog's names only")
    name, colon, port = text.rpartition(":") if ":" in text else (text, "", "")
    if colon and not (port.isdigit() and len(port) <= 5):
        raise Refusal(400, f"the Host header {text!r} is not host[:port]")
    canonical = canonical_name(name)
    if canonical is None:
        raise Refusal(400, f"the Host header {text!r} is not a domain name")
    return canonical


def route(zone: Zone, name: str) -> list[Replica]:
    """The replicas a name of the zone goes to (its SRV targets), each at the lowest port its
    instance EXPOSEs among those the name offers (an agent's name offers the agent's port
    only). Raises Refusal: 404 for a name the zone does not hold, 503 for one with no running
    replica on an EXPOSEd port."""
    entry = zone.names.get(name)
    hops = 0
    while entry is not None and entry.cname is not None and hops < MAX_CNAMES:
        target = entry.cname
        entry = zone.names.get(target)
        hops += 1
        if entry is None:
            raise Refusal(404, f"{name} is a CNAME to {target}, which this fog does not serve")
    if entry is None or entry.cname is not None:
        raise Refusal(404, f"no name {name} in this fog: the proxy serves <instance id>.fog, "
                           "<name>.<owner>.fog, replica and agent names, and vanity domains whose "
                           "TXT _formation.<domain> names their owner")
    out: list[Replica] = []
    for target in entry.targets:
        rep = zone.names.get(target)
        if rep is None:
            continue
        ips = rep.a + rep.aaaa
        node_label, _, rest = target.partition(".")
        node = label_address(node_label)
        ports = [p for p in rep.ports if p in entry.ports]
        if ips and node is not None and ports:
            out.append(Replica(node, rest.partition(".")[0], ips[0], min(ports)))
    if not out:
        why = ("its Formfile EXPOSEs no port" if (entry.a or entry.aaaa) and not entry.ports
               else "no replica of it runs on a live member of the fog")
        raise Refusal(503, f"{name}: no replica to send the request to ({why})")
    return out


class Health:
    """Replicas marked down (a refused or timed-out connection) until a moment of `clock`."""

    def __init__(self, down_seconds: float, clock: Callable[[], float] = trio.current_time):
        self.down_seconds = down_seconds
        self.clock = clock
        self._until: dict[tuple[str, int], float] = {}

    def healthy(self, replica: Replica) -> bool:
        until = self._until.get(replica.key)
        return until is None or until <= self.clock()

    def down_until(self, replica: Replica) -> float:
        return self._until.get(replica.key, 0.0)

    def mark_down(self, replica: Replica) -> None:
        now = self.clock()
        if replica.key not in self._until and len(self._until) >= MAX_DOWN:
            self._until = {k: t for k, t in self._until.items() if t > now}
            while len(self._until) >= MAX_DOWN:
                del self._until[min(self._until, key=self._until.__getitem__)]
        self._until[replica.key] = now + self.down_seconds

    def mark_up(self, replica: Replica) -> None:
        self._until.pop(replica.key, None)


# ---- listeners (the TLS seam) and the upstream side ------------------------------------------------

@dataclass(frozen=True)
class Listener:
    listener: trio.abc.Listener
    scheme: str = "http"  # what X-Forwarded-Proto says


async def listeners(host: str, port: int) -> list[Listener]:
    """The proxy's listeners: plain HTTP on (host, port). The seam for TLS: an https listener is
    `trio.SSLListener(tcp, context, https_compatible=True)` with scheme "https", the context's
    `sni_callback` choosing the certificate of the name asked (a verified vanity domain's, or the
    fog's); the proxy reads the stream it accepts and routes by Host the same way."""
    return [Listener(lst) for lst in await trio.open_tcp_listeners(port, host=host)]


async def dial(ip: str, port: int) -> trio.abc.Stream:
    """A TCP connection to a replica's address (an IP, never a name to resolve). Tests replace
    this: their replicas are on loopback."""
    sock = trio.socket.socket(trio.socket.AF_INET6 if ":" in ip else trio.socket.AF_INET,
                              trio.socket.SOCK_STREAM)
    try:
        await sock.connect((ip, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def peer_ip(stream: trio.abc.Stream) -> str:
    s = stream
    while not hasattr(s, "socket") and hasattr(s, "transport_stream"):
        s = s.transport_stream
    try:
        return str(s.socket.getpeername()[0])
    except (AttributeError, OSError, IndexError):
        return "unknown"


# ---- the proxy ------------------------------------------------------------------------------------

class _Abort(Exception):
    """The client broke the exchange off (timed out, sent too much, went away)."""

    def __init__(self, status: int | None = None, detail: str = ""):
        super().__init__(detail)
        self.status = status
        self.detail = detail


class _Retry(Exception):
    """The replica took the connection but gave no answer: the next one may be tried."""


class _Body:
    """A request body, read from the client through its h11 connection: `prefix` (kept for a
    retry, at most RETRY_BODY and one read more), then the rest, streamed once."""

    def __init__(self, conn: h11.Connection, stream: trio.abc.Stream, limits: ProxyLimits,
                 deadline: float):
        self.conn, self.stream, self.limits, self.deadline = conn, stream, limits, deadline
        self.prefix: list[bytes] = []
        self.size = 0
        self.complete = False

    async def _event(self):
        while True:
            try:
                ev = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Abort(exc.error_status_hint, f"the request body is malformed: {exc}") from None
            if ev is not h11.NEED_DATA:
                return ev
            with trio.move_on_at(min(self.deadline, trio.current_time() + self.limits.idle_timeout)) as cs:
                data = await self.stream.receive_some(RECEIVE)
            if cs.cancelled_caught:
                raise _Abort(408, "the request body stalled (or took longer than "
                                  f"{self.limits.request_timeout:g} s)")
            self.conn.receive_data(data)

    async def _chunk(self) -> bytes | None:
        """The next piece of the body; None at its end."""
        ev = await self._event()
        if isinstance(ev, h11.Data):
            self.size += len(ev.data)
            if self.size > self.limits.max_body:
                raise _Abort(413, f"the request body is larger than {self.limits.max_body} bytes")
            return bytes(ev.data)
        if isinstance(ev, h11.EndOfMessage):
            self.complete = True
            return None
        raise _Abort(None, "the client went away")

    async def read_prefix(self) -> None:
        while not self.complete and self.size < RETRY_BODY:
            chunk = await self._chunk()
            if chunk:
                self.prefix.append(chunk)

    async def next(self) -> bytes | None:
        """The next piece of the rest of the body (after the prefix); None at its end."""
        while not self.complete:
            chunk = await self._chunk()
            if chunk:
                return chunk
        return None


class Proxy:
    def __init__(self, source: ZoneSource | None, limits: ProxyLimits = ProxyLimits(), *,
                 dialer: Callable[[str, int], Awaitable[trio.abc.Stream]] | None = None):
        self.source = source
        self.limits = limits
        self.dialer = dialer  # None: the module's `dial`
        self.health = Health(limits.down_seconds)
        self.connections = 0
        self.per_ip: dict[str, int] = {}
        self.stats = {"connections": 0, "refused_connections": 0, "requests": 0, "proxied": 0,
                      "refused": 0, "failovers": 0, "failed": 0}
        self._turn = itertools.count()
        self._refusing = 0  # connections over a bound being told so

    # ---- choosing ----

    def healthy(self, replica: Replica) -> bool:
        """Whether a replica is offered a request before the others. Today: not marked down by
        a refused or timed-out connection (the hosting nodes' probes act through the zone)."""
        return self.health.healthy(replica)

    def route(self, name: str) -> list[Replica]:
        if self.source is None:
            raise Refusal(503, "this node's DNS view is off (dns.enabled = false, or its port could "
                               "not be bound): the proxy routes by the zone it builds")
        return route(self.source.zone, name)

    def order(self, replicas: list[Replica]) -> list[Replica]:
        """Round robin among the healthy replicas, then the others (longest down first)."""
        up = [r for r in replicas if self.healthy(r)]
        down = sorted((r for r in replicas if not self.healthy(r)), key=self.health.down_until)
        if up:
            k = next(self._turn) % len(up)
            up = up[k:] + up[:k]
        return (up + down)[:MAX_ATTEMPTS]

    # ---- serving ----

    async def serve(self, listening: list[Listener], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for lst in listening:
                nursery.start_soon(self._accept, lst, nursery)
            task_status.started(self)

    async def _accept(self, lst: Listener, nursery: trio.Nursery) -> None:
        async with lst.listener:
            while True:
                try:
                    stream = await lst.listener.accept()
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                        log.warning("proxy: accepting a connection failed (%s): retrying", exc.strerror)
                        await trio.sleep(0.1)
                        continue
                    raise
                nursery.start_soon(self._connection, stream, lst.scheme)

    async def _connection(self, stream: trio.abc.Stream, scheme: str) -> None:
        ip = peer_ip(stream)
        counted = False
        try:
            over = ((503, f"this proxy serves {self.limits.max_connections} connections at once: try again")
                    if self.connections >= self.limits.max_connections else
                    (429, f"{self.limits.max_connections_per_ip} connections at once from one address at most")
                    if self.per_ip.get(ip, 0) >= self.limits.max_connections_per_ip else None)
            if over is not None:
                self.stats["refused_connections"] += 1
                if self._refusing < MAX_REFUSING:  # past it (a flood), closed without a word
                    self._refusing += 1
                    try:
                        await self._canned(stream, *over)
                    finally:
                        self._refusing -= 1
                return
            counted = True
            self.connections += 1
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
            self.stats["connections"] += 1
            await self._requests(stream, ip, scheme)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, trio.TooSlowError):
            pass
        except Exception:  # noqa: BLE001 - a bug costs this connection, not the proxy
            log.exception("proxy: a connection from %s failed", ip)
        finally:
            if counted:
                self.connections -= 1
                left = self.per_ip.pop(ip) - 1
                if left:
                    self.per_ip[ip] = left
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _requests(self, stream: trio.abc.Stream, ip: str, scheme: str) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header)
        for _ in range(MAX_REQUESTS_PER_CONNECTION):
            req = await self._head(stream, conn)
            if req is None:
                break
            self.stats["requests"] += 1
            if not await self._exchange(stream, conn, req, ip, scheme):
                break
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                break
            conn.start_next_cycle()
        if conn.our_state in (h11.DONE, h11.MUST_CLOSE) and conn.their_state in (h11.IDLE, h11.SEND_BODY, h11.ERROR):
            # answered while the client may still be sending: closing now, with its bytes
            # unread, would reset the connection and could destroy the answer before it is read
            await self._linger(stream, b"", LINGER)

    async def _head(self, stream: trio.abc.Stream, conn: h11.Connection) -> h11.Request | None:
        """The next request's head: the first byte within idle_timeout, the whole head within
        header_timeout of it. None when the connection is over (closed, timed out, refused)."""
        started = bool(conn.trailing_data[0])
        deadline = trio.current_time() + (self.limits.header_timeout if started else self.limits.idle_timeout)
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                detail = (f"the request head is larger than {self.limits.max_header} bytes"
                          if status == 431 else f"malformed request: {exc}")
                await self._error(stream, conn, status, detail)
                return None
            if isinstance(ev, h11.Request):
                return ev
            if ev is not h11.NEED_DATA:
                return None  # ConnectionClosed
            with trio.move_on_at(deadline) as cs:
                data = await stream.receive_some(RECEIVE)
            if cs.cancelled_caught:
                if started:
                    await self._error(stream, conn, 408, "the request head did not arrive within "
                                                         f"{self.limits.header_timeout:g} s")
                return None
            if data and not started:
                started = True
                deadline = trio.current_time() + self.limits.header_timeout
            conn.receive_data(data)

    async def _exchange(self, stream: trio.abc.Stream, conn: h11.Connection, req: h11.Request,
                        ip: str, scheme: str) -> bool:
        """One request, answered: by a replica, or by the proxy. Whether the connection may
        serve another."""
        deadline = trio.current_time() + self.limits.request_timeout
        head_only = req.method == b"HEAD"
        try:
            replicas, name = self._check(req)
            body = _Body(conn, stream, self.limits, deadline)
            length = next((int(v) for n, v in req.headers if n == b"content-length"), None)
            if length is not None and length > self.limits.max_body:
                raise Refusal(413, f"the request body ({length} bytes) is larger than "
                                   f"{self.limits.max_body} bytes")
            if conn.client_is_waiting_for_100_continue:
                await self._send(stream, conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            await body.read_prefix()
            headers = self._upstream_headers(req, ip, scheme)
            failures: list[str] = []
            timeouts = 0
            with trio.move_on_at(deadline):
                for replica in self.order(replicas):
                    try:
                        up = await self._connect(replica)
                    except (OSError, trio.TooSlowError) as exc:
                        timeouts += isinstance(exc, trio.TooSlowError)
                        self._down(replica, name, failures, _why(exc, self.limits.connect_timeout))
                        continue
                    self.health.mark_up(replica)
                    try:
                        return await self._relay(stream, conn, req, headers, body, up, replica,
                                                 deadline, head_only)
                    except _Retry as exc:
                        self._down(replica, name, failures, str(exc))
            self.stats["failed"] += 1
            if conn.our_state is not h11.SEND_RESPONSE:
                return False  # the answer had started when the exchange ran out of time
            if not failures:
                raise Refusal(504, f"no replica of {name} answered within {self.limits.request_timeout:g} s")
            raise Refusal(504 if timeouts == len(failures) else 502,
                          f"no replica of {name} took the request: " + "; ".join(failures))
        except Refusal as r:
            self.stats["refused"] += 1
            await self._error(stream, conn, r.status, r.detail, head_only=head_only)
            return False
        except _Abort as a:
            if a.status is not None and conn.our_state is h11.SEND_RESPONSE:
                await self._error(stream, conn, a.status, a.detail, head_only=head_only)
            return False

    def _check(self, req: h11.Request) -> tuple[list[Replica], str]:
        if req.method == b"CONNECT":
            raise Refusal(405, "CONNECT: this proxy serves the fog's names, it opens no tunnels")
        if not (req.target.startswith(b"/") or (req.target == b"*" and req.method == b"OPTIONS")):
            raise Refusal(400, "the request target must be a path (absolute URLs are for forward proxies)")
        hosts = []
        for n, v in req.headers:
            if _CONTROL.search(v):
                raise Refusal(400, f"the {n.decode('latin-1')} header holds control characters")
            if n == b"host":
                hosts.append(bytes(v))
            elif n == HOPS_HEADER and (not v.isdigit() or len(v) > 3 or int(v) >= MAX_HOPS):
                raise Refusal(508, f"the request has passed through {MAX_HOPS} proxies already")
        name = host_name(hosts)
        return self.route(name), name

    def _down(self, replica: Replica, name: str, failures: list[str], why: str) -> None:
        self.health.mark_down(replica)
        self.stats["failovers"] += 1
        failures.append(f"{replica}: {why}")
        log.info("proxy: replica %s of %s: %s; marked down for %g s", replica, name, why,
                 self.limits.down_seconds)

    async def _connect(self, replica: Replica) -> trio.abc.Stream:
        opener = self.dialer if self.dialer is not None else dial
        with trio.fail_after(self.limits.connect_timeout):
            return await opener(replica.ip, replica.port)

    def _upstream_headers(self, req: h11.Request, ip: str, scheme: str) -> list[tuple[bytes, bytes]]:
        named = _connection_tokens(req.headers)
        chunked = any(n == b"transfer-encoding" for n, _ in req.headers)
        out: list[tuple[bytes, bytes]] = []
        xff: list[bytes] = []
        host = b""
        hops = 0
        for n, v in req.headers:
            if n in HOP_BY_HOP or n in named or (chunked and n == b"content-length"):
                continue
            if n == b"x-forwarded-for":
                xff.append(bytes(v))
            elif n == HOPS_HEADER:
                hops = int(v)
            elif n not in (b"x-forwarded-proto", b"x-forwarded-host"):
                out.append((bytes(n), bytes(v)))
                if n == b"host":
                    host = bytes(v)
        xff.append(ip.encode())
        out += [(b"x-forwarded-for", b", ".join(xff)), (b"x-forwarded-proto", scheme.encode()),
                (b"x-forwarded-host", host), (HOPS_HEADER, str(hops + 1).encode()),
                (b"connection", b"close")]
        if chunked:
            out.append((b"transfer-encoding", b"chunked"))
        return out

    async def _relay(self, stream: trio.abc.Stream, conn: h11.Connection, req: h11.Request,
                     headers: list[tuple[bytes, bytes]], body: _Body, up: trio.abc.Stream,
                     replica: Replica, deadline: float, head_only: bool) -> bool:
        """The request to a replica that took the connection, its answer to the client; whether
        the client's connection may serve another request. Raises _Retry when the replica
        answered nothing and sending the request again is safe, Refusal when the proxy answers."""
        uconn = h11.Connection(h11.CLIENT, max_incomplete_event_size=RESPONSE_HEAD)
        failed: BaseException | None = None
        aborted: list[_Abort] = []
        ok = False
        async with up:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, up, uconn, req, headers, body, nursery.cancel_scope, aborted)
                try:
                    resp = await self._answer_head(up, uconn, deadline)
                    self.stats["proxied"] += 1
                    tokens = _connection_tokens(resp.headers)
                    out = [(n, v) for n, v in resp.headers
                           if n not in HOP_BY_HOP and n not in tokens and n != REPLICA_HEADER]
                    out.append((REPLICA_HEADER, replica.node.encode()))
                    await self._send(stream, conn.send(h11.Response(
                        status_code=resp.status_code, headers=out, reason=resp.reason)), deadline)
                    ok = await self._answer_body(stream, conn, up, uconn, deadline)
                except (_Retry, Refusal) as exc:
                    failed = exc
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, trio.TooSlowError):
                    ok = False  # the client went away, or stopped reading
                nursery.cancel_scope.cancel()  # an answer may come before the whole body was sent
        if aborted:
            raise aborted[0]
        if isinstance(failed, _Retry) and not (body.complete and req.method in IDEMPOTENT):
            self.health.mark_down(replica)
            raise Refusal(502, f"replica {replica} {failed} (the request was not sent again: "
                               f"{req.method.decode()} with this body may not be repeated safely)")
        if failed is not None:
            raise failed
        return ok

    async def _pump(self, up: trio.abc.Stream, uconn: h11.Connection, req: h11.Request,
                    headers: list[tuple[bytes, bytes]], body: _Body, scope: trio.CancelScope,
                    aborted: list[_Abort]) -> None:
        """The request to the replica: head and kept body, then the rest as the client sends it.
        A replica that stops reading ends the pump quietly (its answer, if any, says why); a
        client that breaks the body off ends the exchange."""
        try:
            data = uconn.send(h11.Request(method=req.method, target=req.target, headers=headers))
            data += b"".join(uconn.send(h11.Data(data=chunk)) for chunk in body.prefix)
            if body.complete:
                data += uconn.send(h11.EndOfMessage())
            await self._send(up, data)
            if body.complete:
                return
            while (chunk := await body.next()) is not None:
                await self._send(up, uconn.send(h11.Data(data=chunk)))
            await self._send(up, uconn.send(h11.EndOfMessage()))
        except _Abort as exc:
            aborted.append(exc)
            scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, trio.TooSlowError,
                h11.LocalProtocolError):
            return

    async def _answer_head(self, up: trio.abc.Stream, uconn: h11.Connection, deadline: float) -> h11.Response:
        got = False
        while True:
            try:
                ev = uconn.next_event()
            except h11.RemoteProtocolError as exc:
                if not got:  # (h11's word for a close before the answer)
                    raise _Retry("took the connection, closed it without an answer") from None
                raise Refusal(502, f"the replica's answer is not HTTP/1.1: {exc}") from None
            if isinstance(ev, h11.Response):
                return ev
            if isinstance(ev, h11.InformationalResponse):
                if ev.status_code == 101:
                    raise Refusal(502, "the replica switched protocols: upgrades are not relayed")
                continue
            if ev is not h11.NEED_DATA:
                if got:
                    raise Refusal(502, "the replica closed the connection in the middle of its answer")
                raise _Retry("took the connection, closed it without an answer")
            with trio.move_on_at(deadline) as cs:
                try:
                    data = await up.receive_some(RECEIVE)
                except (trio.BrokenResourceError, OSError) as exc:
                    if got:
                        raise Refusal(502, f"the replica's connection broke: {exc}") from None
                    raise _Retry(f"took the connection, then it broke: {exc}") from None
            if cs.cancelled_caught:
                raise Refusal(504, f"the replica did not answer within {self.limits.request_timeout:g} s")
            got = got or bool(data)
            uconn.receive_data(data)

    async def _answer_body(self, stream: trio.abc.Stream, conn: h11.Connection, up: trio.abc.Stream,
                           uconn: h11.Connection, deadline: float) -> bool:
        """The answer's body, relayed; False when it broke off (the client's connection is then
        closed, so the client sees the answer cut)."""
        while True:
            try:
                ev = uconn.next_event()
            except h11.RemoteProtocolError:
                return False
            if isinstance(ev, h11.Data):
                await self._send(stream, conn.send(h11.Data(data=ev.data)), deadline)
                continue
            if isinstance(ev, h11.EndOfMessage):
                await self._send(stream, conn.send(h11.EndOfMessage()), deadline)
                return True
            if ev is not h11.NEED_DATA:
                return False
            with trio.move_on_at(min(deadline, trio.current_time() + self.limits.idle_timeout)) as cs:
                try:
                    data = await up.receive_some(RECEIVE)
                except (trio.BrokenResourceError, OSError):
                    return False
            if cs.cancelled_caught:
                return False
            uconn.receive_data(data)

    # ---- writing ----

    async def _send(self, stream: trio.abc.Stream, data: bytes, deadline: float | None = None) -> None:
        if not data:
            return
        at = trio.current_time() + self.limits.idle_timeout
        with trio.fail_at(at if deadline is None else min(at, deadline)):
            await stream.send_all(data)

    async def _error(self, stream: trio.abc.Stream, conn: h11.Connection, status: int, detail: str, *,
                     head_only: bool = False) -> None:
        """An answer of the proxy's own (text), then the connection closes."""
        body = b"" if head_only else _error_body(status, detail)
        headers = [(b"content-type", b"text/plain; charset=utf-8"),
                   (b"content-length", str(len(_error_body(status, detail))).encode()),
                   (b"connection", b"close")]
        try:
            data = conn.send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
            data += conn.send(h11.Data(data=body)) if body else b""
            data += conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return  # an answer has started already: the close says it broke off
        with trio.move_on_after(self.limits.idle_timeout):
            await stream.send_all(data)

    async def _canned(self, stream: trio.abc.Stream, status: int, detail: str) -> None:
        body = _error_body(status, detail)
        data = (f"HTTP/1.1 {status} {_reason(status)}\r\ncontent-type: text/plain; charset=utf-8\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body
        await self._linger(stream, data, REFUSE_LINGER)

    async def _linger(self, stream: trio.abc.Stream, data: bytes, seconds: float) -> None:
        """Send a last answer, then the end of the stream, then read (and drop) what the client
        still sends for at most `seconds`, so that the close does not reset the connection
        before the client has read the answer (a lingering close)."""
        with trio.move_on_after(seconds):
            try:
                await stream.send_all(data)
                if isinstance(stream, trio.SocketStream):
                    await stream.send_eof()
                    while await stream.receive_some(RECEIVE):
                        pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


def _connection_tokens(headers) -> set[bytes]:
    """The header names a Connection header lists (hop-by-hop too)."""
    return {t.strip().lower() for n, v in headers if n == b"connection" for t in bytes(v).split(b",")}


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _error_body(status: int, detail: str) -> bytes:
    return f"{status} {_reason(status).decode()}: {detail}\n".encode()


def _why(exc: BaseException, connect_timeout: float) -> str:
    if isinstance(exc, trio.TooSlowError):
        return f"did not take the connection within {connect_timeout:g} s"
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__


async def serve_proxy(node: ProxyNode, source: ZoneSource | None, *,
                      task_status=trio.TASK_STATUS_IGNORED) -> None:
    """The node's proxy, in the node's nursery, routing by `source` (the DNS view; None when the
    node runs no DNS: every request is then answered 503). Started with the Proxy, or None when
    its port cannot be bound (logged, and the node goes on without it)."""
    cfg = node.config.proxy
    proxy = Proxy(source, ProxyLimits.from_config(node.config))
    try:
        listening = await listeners(cfg.host, cfg.port)
    except OSError as exc:
        log.error("proxy: cannot listen on %s port %d (%s): this node runs without its HTTP proxy",
                  cfg.host, cfg.port, exc.strerror or exc)
        task_status.started(None)
        return
    if source is None:
        log.warning("proxy: the node runs no DNS view (dns.enabled = false or its port is taken): "
                    "the proxy answers every request 503")
    log.info("proxy: serving on %s port %d", cfg.host, cfg.port)
    await proxy.serve(listening, task_status=task_status)
