"""server.py and forward.py over real sockets on loopback, in the test's trio run: UDP and TCP,
truncation and TCP fallback, forwarding (cache, one question in flight, timeouts) and refusal,
and hostile traffic: malformed packets, oversized queries, huge names, floods."""

from __future__ import annotations

import os
import random
import struct

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trio

from formation.dns.bounds import LruCache, RateLimiter, Slots
from formation.dns.forward import Forwarder, Upstream, cache_ttl, parse_upstream, system_upstreams
from formation.dns.names import build_zone, owner_label
from formation.dns.server import DnsServer, ServerLimits, question_end
from tests.dns.support import DIG, Authority, ask, dig, exchange, raw_udp

ALICE = "0x" + "a1" * 20
N1 = "0x" + "01" * 20
IID = "0123456789abcdef0123456789abcdef"
OL = owner_label(ALICE)


def zone():
    return build_zone(
        instances=[{"instance_id": IID, "owner": ALICE, "name": "web", "created_at": 1}],
        statuses=[{"instance_id": IID, "node": N1, "state": "running", "ip": "10.201.1.5"}],
        serving={N1: "10.201.1.0/24"}, ports={IID: [8080]},
        records=[{"record_id": "r3", "owner": ALICE, "domain": f"big.{OL}.fog", "record_type": "A",
                  "targets": [f"192.0.2.{i}" for i in range(1, 61)]}])


async def start(nursery, *, forward=True, upstream=None, limits=None, timeout=1.0, clock=trio.current_time, **fw):
    forwarder = Forwarder([Upstream(*upstream)] if upstream else [], timeout=timeout, **fw)
    server = DnsServer(zone(), forwarder=forwarder, forward=forward, limits=limits or ServerLimits(), clock=clock)
    addr = await nursery.start(server.serve, "127.0.0.1", 0)
    return server, addr


@pytest.fixture
async def authority(nursery):
    auth = Authority()
    auth.set("www.example.org", "A", ["192.0.2.80"], ttl=300)
    auth.set("big.example.org", "TXT", [f'"{"x" * 200}{i}"' for i in range(20)], ttl=300)
    await nursery.start(auth.serve)
    return auth


async def test_udp_and_tcp_answer_alike_and_the_cache_keeps_ids_and_case(nursery):
    server, addr = await start(nursery)
    for tcp in (False, True):
        r = await ask(addr, f"{IID}.fog", tcp=tcp)
        assert [rd.to_text() for rd in r.answer[0]] == ["10.201.1.5"]
    # the same question again, other ids and letter cases: from the response cache, still right
    for name in (f"{IID}.fog", f"{IID.upper()}.FOG", f"{IID}.fog"):
        q = dns.message.make_query(name, "A", use_edns=0)
        r = await exchange(addr, q)
        assert r.id == q.id and r.question[0].name.to_text() == name + "."
        assert r.answer[0].name.to_text() == name + "."
    assert server.stats.cache_hits >= 2
    nx = await ask(addr, f"web.{OL}.fog", "TXT")
    assert nx.rcode() == dns.rcode.NOERROR and not nx.answer
    assert (await ask(addr, "nothing.fog")).rcode() == dns.rcode.NXDOMAIN


async def test_a_new_zone_is_seen_at_once(nursery):
    server, addr = await start(nursery)
    assert (await ask(addr, f"{IID}.fog")).answer
    server.set_zone(build_zone())
    assert (await ask(addr, f"{IID}.fog")).rcode() == dns.rcode.NXDOMAIN


async def test_truncation_and_tcp_fallback(nursery):
    server, addr = await start(nursery)
    udp = await ask(addr, f"big.{OL}.fog", edns=None)
    assert udp.flags & dns.flags.TC and not udp.answer
    tcp = await ask(addr, f"big.{OL}.fog", edns=None, tcp=True)
    assert not tcp.flags & dns.flags.TC and len(tcp.answer[0]) == 60
    edns = await ask(addr, f"big.{OL}.fog", payload=4096)  # 60 A records fit in 1232 bytes
    assert not edns.flags & dns.flags.TC and len(edns.answer[0]) == 60
    assert edns.payload == 1232  # what we advertise


@pytest.mark.skipif(DIG is None and not os.environ.get("CI"), reason="dig (bind9-dnsutils) is not installed")
async def test_dig_falls_back_to_tcp(nursery):
    server, addr = await start(nursery)
    out = await dig(addr, f"big.{OL}.fog", "A", "+noedns", "+short")
    assert len(out.split()) == 60
    full = await dig(addr, f"big.{OL}.fog", "A", "+noedns")
    assert "Truncated, retrying in TCP mode" in full


async def test_forwarding_caches_and_asks_once_per_question(nursery, authority):
    server, addr = await start(nursery, upstream=authority.address)
    r = await ask(addr, "www.example.org")
    assert [rd.to_text() for rd in r.answer[0]] == ["192.0.2.80"]
    assert r.flags & dns.flags.RA and not r.flags & dns.flags.AA
    assert (await ask(addr, "WWW.example.org")).answer[0].ttl <= 300
    assert authority.asked.count(("www.example.org.", "A")) == 1
    nx = await ask(addr, "missing.example.org")
    assert nx.rcode() == dns.rcode.NXDOMAIN
    # twenty clients asking one slow question at once: one upstream query
    authority.delay = 0.3
    answers = []

    async def one():
        answers.append(await ask(addr, "slow.example.org", "AAAA"))

    async with trio.open_nursery() as n:
        for _ in range(20):
            n.start_soon(one)
    assert len(answers) == 20 and authority.asked.count(("slow.example.org.", "AAAA")) == 1


async def test_forwarded_answers_too_big_for_udp_come_whole_over_tcp(nursery, authority):
    server, addr = await start(nursery, upstream=authority.address)
    r = await ask(addr, "big.example.org", "TXT", tcp=True)  # the upstream truncated: we asked again by TCP
    assert len(r.answer[0]) == 20
    udp = await ask(addr, "big.example.org", "TXT", edns=None)
    assert udp.flags & dns.flags.TC


async def test_refusal_and_failing_upstreams(nursery, authority):
    _, refusing = await start(nursery, forward=False, upstream=authority.address)
    r = await ask(refusing, "www.example.org")
    assert r.rcode() == dns.rcode.REFUSED and not r.flags & dns.flags.RA
    assert (await ask(refusing, f"{IID}.fog")).answer  # the fog's names still answered
    authority.silent = True
    _, addr = await start(nursery, upstream=authority.address, timeout=0.2)
    with trio.fail_after(2):
        assert (await ask(addr, "www.example.org")).rcode() == dns.rcode.SERVFAIL
    _, none = await start(nursery, upstream=None)
    assert (await ask(none, "www.example.org")).rcode() == dns.rcode.REFUSED  # no upstream: refused


async def test_malformed_packets_get_formerr_or_nothing_and_the_server_goes_on(nursery):
    server, addr = await start(nursery)
    q = dns.message.make_query(f"{IID}.fog", "A").to_wire()
    # shorter than a header, a response, trailing junk, a pointer loop, a label past the name
    assert await raw_udp(addr, b"\x01") is None
    assert await raw_udp(addr, b"\x12\x34\x84\x00" + q[4:]) is None
    junk = await raw_udp(addr, q + b"\x00\x01junk")
    assert dns.message.from_wire(junk).rcode() == dns.rcode.FORMERR
    loop = q[:12] + b"\xc0\x0c" + q[-4:]
    assert dns.message.from_wire(await raw_udp(addr, loop)).rcode() == dns.rcode.FORMERR
    huge = q[:12] + (b"\x3f" + b"a" * 63) * 5 + b"\x00" + q[-4:]  # a name of 320 bytes
    assert dns.message.from_wire(await raw_udp(addr, huge)).rcode() == dns.rcode.FORMERR
    assert await raw_udp(addr, q[:12] + b"a" * 5000) is None  # oversized: dropped
    rng = random.Random(7)
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
        await sock.connect(addr)
        for i in range(600):
            if i % 2:
                blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200)))
            else:
                mutated = bytearray(q)
                for _ in range(3):
                    mutated[rng.randrange(len(mutated))] = rng.getrandbits(8)
                blob = bytes(mutated)
            await sock.send(blob)
            if i % 20 == 0:
                await trio.sleep(0.001)
    assert (await ask(addr, f"{IID}.fog")).answer  # still serving
    assert server.stats.formerr >= 3 and server.stats.dropped >= 2


async def closed(stream, within: float = 2.0) -> None:
    with trio.fail_after(within):
        try:
            assert await stream.receive_some(10) == b""
        except trio.BrokenResourceError:
            pass  # closed with our bytes unread: a reset


async def test_tcp_garbage_and_idle_connections_are_closed(nursery):
    server, addr = await start(nursery, limits=ServerLimits(tcp_idle_seconds=0.3, tcp_per_source=3))
    stream = await trio.open_tcp_stream(*addr)
    await stream.send_all(struct.pack("!H", 65535) + b"x" * 100)  # longer than any query: closed
    await closed(stream)
    await closed(await trio.open_tcp_stream(*addr))  # said nothing: closed after the idle time
    # more connections than one source may hold: the extra ones are closed at once
    held = [await trio.open_tcp_stream(*addr) for _ in range(3)]
    await closed(await trio.open_tcp_stream(*addr), within=0.2)
    for s in held:
        await s.aclose()
    assert server.stats.tcp_refused >= 1
    r = await ask(addr, f"{IID}.fog", tcp=True)  # pipelined queries on one connection still work
    assert r.answer


async def test_a_flood_from_one_source_is_cut_and_memory_stays_bounded(nursery, authority):
    # the server's clock stands still: the flood gets its burst (400) and nothing more, however
    # fast or slow this machine sends
    limits = ServerLimits(client_qps=200, cache_entries=100, forwards=8, forwards_per_source=4)
    server, addr = await start(nursery, upstream=authority.address, limits=limits, cache_entries=50,
                               clock=lambda: 0.0)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.connect(addr)
    got = 0
    with sock:
        for i in range(3000):  # distinct names: no cache can hold them all
            await sock.send(dns.message.make_query(f"n{i}.fog" if i % 2 else f"n{i}.example.org", "A").to_wire())
            if i % 50 == 0:
                await trio.sleep(0)
        with trio.move_on_after(0.3):
            while True:
                await sock.recv(4096)
                got += 1
    assert server.stats.queries <= 400 and got <= 400 and server.stats.rate_limited >= 1000
    assert len(server.cache) <= 100 and len(server.forwarder.cache) <= 50
    assert server.forwards.used <= 8 and server.forwarder.slots.used <= 256
    server.limiter.clear()  # time passes: the bucket is full again (loopback is one source)
    assert (await ask(addr, f"{IID}.fog")).answer


async def test_forwards_in_flight_are_bounded_per_source(nursery, authority):
    authority.delay = 0.5
    limits = ServerLimits(forwards=100, forwards_per_source=5)
    server, addr = await start(nursery, upstream=authority.address, limits=limits, timeout=2)
    rcodes = []

    async def one(i):
        rcodes.append((await ask(addr, f"q{i}.example.org", timeout=5)).rcode())

    async with trio.open_nursery() as n:
        for i in range(12):
            n.start_soon(one, i)
            await trio.sleep(0.01)
    assert rcodes.count(dns.rcode.SERVFAIL) >= 7 and rcodes.count(dns.rcode.NXDOMAIN) >= 1
    assert server.forwards.used == 0


def test_bounds():
    c = LruCache(3, 100)
    for i in range(10):
        c.put(i, i, 10)
    assert len(c) == 3 and c.get(9) == 9 and c.get(0) is None
    c.put("big", 1, 101)
    assert c.get("big") is None
    c.put("x", 1, 80)
    assert c.bytes <= 100
    r = RateLimiter(10, 5, max_sources=100)
    assert sum(r.allow("a", 0.0) for _ in range(20)) == 5
    assert r.allow("a", 0.1) and not r.allow("a", 0.1)
    for i in range(1000):
        r.allow(f"s{i}", 1.0)
    assert len(r) == 100
    s = Slots(3, 2)
    assert s.take("a") and s.take("a") and not s.take("a") and s.take("b") and not s.take("c")
    s.give("a")
    assert s.take("c")


def test_question_end_and_upstream_parsing(tmp_path):
    q = dns.message.make_query("web.fog", "A", use_edns=0).to_wire()
    assert question_end(q) == 12 + len(b"\x03web\x03fog\x00")
    assert question_end(q[:14]) is None and question_end(b"\x00" * 11) is None
    assert question_end(q[:2] + b"\x81\x00" + q[4:]) is None  # a response
    assert parse_upstream("192.0.2.1") == Upstream("192.0.2.1", 53)
    assert parse_upstream("192.0.2.1:5353") == Upstream("192.0.2.1", 5353)
    assert parse_upstream("[2001:db8::1]:54") == Upstream("2001:db8::1", 54)
    assert parse_upstream("2001:db8::1") == Upstream("2001:db8::1", 53)
    for bad in ("dns.google", "1.2.3.4:x", "[::1", "1.2.3.4:0"):
        with pytest.raises(ValueError):
            parse_upstream(bad)
    conf = tmp_path / "resolv.conf"
    conf.write_text("# x\nnameserver 192.0.2.1\nnameserver fe80::1%eth0\nnameserver junk\nsearch x\n")
    assert system_upstreams(str(conf)) == [Upstream("192.0.2.1"), Upstream("fe80::1")]
    assert system_upstreams(str(tmp_path / "none")) == []


def test_cache_ttl_follows_the_answer():
    q = dns.message.make_query("a.example", "A")
    r = dns.message.make_response(q)
    assert cache_ttl(r, 3600) == 0  # nothing to go by
    r.set_rcode(dns.rcode.SERVFAIL)
    assert cache_ttl(r, 3600) == 2
    r.set_rcode(dns.rcode.NXDOMAIN)
    r.authority.append(dns.rrset.from_text("example.", 600, "IN", "SOA", "ns. a. 1 1 1 1 30"))
    assert cache_ttl(r, 3600) == 30


async def test_any_port_is_picked_again_when_its_tcp_twin_is_taken(nursery, monkeypatch):
    # port 0 binds UDP first; a program already holding that port for TCP must not fail the start
    import errno
    real = DnsServer._open_once
    calls = []

    async def first_collides(self, host, port):
        calls.append(port)
        if len(calls) == 1:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        return await real(self, host, port)

    monkeypatch.setattr(DnsServer, "_open_once", first_collides)
    server, addr = await start(nursery)
    assert calls == [0, 0] and (await ask(addr, f"{IID}.fog")).answer
    # a port that was asked for by number is not swapped for another
    taken = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    await taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        with pytest.raises(OSError):
            await DnsServer(zone()).open("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
