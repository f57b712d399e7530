"""The host-routing proxy in-process, against a zone built as the node builds it and fake
replicas on loopback (tests/proxy/support.py): routing by Host, the port rule, failover on a
refused, timed-out or dropped connection, no open proxy, and every bound."""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import pytest
import trio

from formation.dns.names import owner_label
from formation.node.proxy import Refusal, host_name
from tests.proxy.support import (
    IP,
    OWNER,
    A,
    B,
    Dialer,
    FakeReplica,
    instance,
    raw,
    running,
    source,
    start_proxy,
)

OL = owner_label(OWNER)
WEB = f"web.{OL}.fog"


async def replicas(nursery, *names: str) -> list[FakeReplica]:
    return [await nursery.start(FakeReplica(n).serve) for n in names]


async def web_proxy(nursery, port: int = 8080, **limits):
    """Instance web (i1), one replica on each node, both served by fake replicas."""
    ra, rb = await replicas(nursery, "ra", "rb")
    dialer = Dialer({(IP[A], port): ra, (IP[B], port): rb})
    src = source([instance("i1", "web", f"EXPOSE {port}\n")], [running("i1", A), running("i1", B)])
    proxy, url = await start_proxy(nursery, src, dialer, **limits)
    return proxy, url, dialer, ra, rb


async def get(url: str, host: str, path: str = "/", **kw) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(url + path, headers={"Host": host, **kw.pop("headers", {})}, **kw)


def test_host_names():
    assert host_name([b"Web.Example.COM:8080"]) == "web.example.com"
    assert host_name([b"web.0X" + OWNER[2:].upper().encode() + b".fog."]) == WEB
    for bad in ([], [b"a", b"b"], [b"a\x01b"], [b"x" * 301], [b"a b"], [b"a:port"], [b"-a.fog"]):
        with pytest.raises(Refusal) as r:
            host_name(bad)
        assert r.value.status == 400
    with pytest.raises(Refusal) as r:
        host_name([b"[::1]:80"])
    assert r.value.status == 404


async def test_routes_by_host_to_every_running_replica(nursery):
    proxy, url, dialer, ra, rb = await web_proxy(nursery)
    seen = set()
    async with httpx.AsyncClient(timeout=10) as client:
        for host in (WEB, f"WEB.{OL}.fog:8080", "i1.fog", f"web.{OWNER}.fog"):
            r = await client.get(url + "/hello?x=1", headers={"Host": host, "X-Forwarded-For": "192.0.2.7",
                                                              "Connection": "keep-alive, x-drop-me",
                                                              "X-Drop-Me": "1", "X-Keep": "2"})
            assert r.status_code == 200, r.text
            got = r.json()
            seen.add(got["replica"])
            headers = dict(got["headers"])
            assert got["target"] == "/hello?x=1" and headers["host"] == host
            assert headers["x-forwarded-for"] == "192.0.2.7, 127.0.0.1"
            assert headers["x-forwarded-proto"] == "http" and headers["x-forwarded-host"] == host
            assert headers["x-keep"] == "2" and "x-drop-me" not in headers
            assert headers["connection"] == "close"
            assert r.headers["x-formation-replica"] == {"ra": A, "rb": B}[got["replica"]]
            assert "x-secret-hop" not in r.headers  # the replica's hop-by-hop headers stay there
    assert seen == {"ra", "rb"}  # round robin
    assert set(dialer.dialed) == {(IP[A], 8080), (IP[B], 8080)}
    # one client connection carried the four requests
    assert proxy.stats["connections"] == 1 and proxy.stats["proxied"] == 4


async def test_a_replica_name_pins_its_replica_and_answers_stream_through(nursery):
    _, url, _, _, _ = await web_proxy(nursery)
    for _ in range(3):
        r = await get(url, f"{owner_label(B)}.i1.fog")
        assert r.json()["replica"] == "rb"
    r = await get(url, f"{owner_label(A)}.i1.fog", "/chunked")
    assert r.status_code == 200 and r.text == "part0;part1;part2;"
    async with httpx.AsyncClient(timeout=10) as client:  # HEAD: no body
        r = await client.head(url + "/", headers={"Host": WEB})
        assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0


async def test_the_port_is_the_lowest_exposed_and_an_agent_name_its_port(nursery):
    r9000, r8080 = await replicas(nursery, "p9000", "p8080")
    dialer = Dialer({(IP[B], 9000): r9000, (IP[B], 8080): r8080})
    agent = {"agent_id": "ag1", "owner": OWNER, "name": "helper", "build_id": "b" * 64, "port": 8080,
             "created_at": 1}
    agent["port"] = 9000
    src = source([instance("i2", "svc", "EXPOSE 9000\nEXPOSE 8080\n", build="b" * 64)], [running("i2", B)],
                 agents=[agent])
    _, url = await start_proxy(nursery, src, dialer)
    assert (await get(url, f"svc.{OL}.fog")).json()["replica"] == "p8080"  # the lowest (Formfiles keep them sorted)
    assert (await get(url, "ag1.agent.fog")).json()["replica"] == "p9000"
    assert (await get(url, f"helper.{OL}.agent.fog")).json()["replica"] == "p9000"


async def test_unknown_names_are_404_and_nothing_else_is_ever_dialed(nursery):
    ra, = await replicas(nursery, "ra")
    dialer = Dialer({(IP[A], 8080): ra})
    records = [  # an owner's record pointing at addresses of its choosing: DNS serves it, the proxy does not go there
        {"record_id": "r1", "owner": OWNER, "domain": f"mine.{OL}.fog", "record_type": "A",
         "targets": ["127.0.0.1"], "created_at": 1},
        {"record_id": "r2", "owner": OWNER, "domain": "app.example.test", "record_type": "A",
         "targets": ["i1"], "created_at": 2},
        {"record_id": "r3", "owner": OWNER, "domain": "ok.example.test", "record_type": "A",
         "targets": ["i1"], "created_at": 3},
        {"record_id": "r4", "owner": OWNER, "domain": "alias.example.test", "record_type": "CNAME",
         "cname_target": WEB, "created_at": 4},
    ]
    src = source([instance("i1", "web"), instance("i3", "stopped")], [running("i1", A)], records=records,
                 verified={"ok.example.test": {OWNER}, "alias.example.test": {OWNER}})
    _, url = await start_proxy(nursery, src, dialer)
    for host, status, words in [
        ("example.com", 404, "no name example.com in this fog"),
        ("127.0.0.1:3004", 404, "no name 127.0.0.1"),
        ("localhost", 404, "no name localhost"),
        ("[::1]:8080", 404, "is an address"),
        ("app.example.test", 404, "no name app.example.test"),  # not verified: not served
        (f"mine.{OL}.fog", 503, "no replica"),  # the record's own address is never dialed
        ("i3.fog", 503, "no replica of it runs"),
        (f"nothing.{OL}.fog", 404, "no name"),
    ]:
        r = await get(url, host)
        assert r.status_code == status and words in r.text, (host, r.status_code, r.text)
        assert r.headers["content-type"].startswith("text/plain") and r.headers["connection"] == "close"
    assert dialer.dialed == []
    # a verified vanity domain, and a CNAME inside the zone, route like the names they stand for
    assert (await get(url, "ok.example.test")).json()["replica"] == "ra"
    assert (await get(url, "alias.example.test")).json()["replica"] == "ra"
    # absolute-form targets and CONNECT: this is no forward proxy
    out = await raw(url, b"GET http://127.0.0.1:3004/ HTTP/1.1\r\nHost: " + WEB.encode() + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and b"absolute URLs" in out
    out = await raw(url, b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 405 ")
    assert dialer.dialed == [(IP[A], 8080)] * 2


async def test_no_dns_view_is_503(nursery):
    _, url = await start_proxy(nursery, None, Dialer())
    r = await get(url, WEB)
    assert r.status_code == 503 and "DNS view is off" in r.text


async def test_hostile_host_headers_are_refused(nursery):
    _, url, dialer, _, _ = await web_proxy(nursery)
    head = b"GET / HTTP/1.1\r\n"
    for host, status in [(b"web\x01.fog", b"400"), (b"web\x7f.fog", b"400"),
                         (b"a" * 65536, b"431"), (b"", b"400"), (b"a b.fog", b"400")]:
        out = await raw(url, head + b"Host: " + host + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 " + status + b" "), (host[:20], out[:80])
    out = await raw(url, head + b"Host: " + WEB.encode() + b"\r\nHost: i1.fog\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    out = await raw(url, b"GET / HTTP/1.0\r\n\r\n")  # HTTP/1.0 without Host
    assert out.startswith(b"HTTP/1.1 400 ") and b"exactly one Host" in out
    out = await raw(url, head + b"Host: " + WEB.encode() + b"\r\nX-Evil: a\x00b\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    out = await raw(url, head + b"Host: " + WEB.encode() + b"\r\nX-Formation-Hops: 4\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 508 ")  # a name that points back at a proxy
    assert dialer.dialed == []


async def test_failover_when_a_replica_stops(nursery):
    proxy, url, dialer, ra, rb = await web_proxy(nursery, down_seconds=1.0)
    async with httpx.AsyncClient(timeout=10) as client:
        async def ask():
            r = await client.post(url + "/", headers={"Host": WEB}, content=b"payload")
            assert r.status_code == 200, r.text
            assert r.json()["body_len"] == 7
            return r.json()["replica"]

        assert {await ask() for _ in range(4)} == {"ra", "rb"}
        ra.stop()
        dialer.dialed.clear()
        assert [await ask() for _ in range(6)] == ["rb"] * 6  # no error, whatever the turn
        assert dialer.dialed.count((IP[A], 8080)) == 1  # tried once, then left out while down
        assert not proxy.healthy(next(r for r in proxy.route(WEB) if r.node == A))
        await trio.sleep(1.1)  # down for 1 s: tried again, refused again, marked down again
        dialer.dialed.clear()
        assert [await ask() for _ in range(3)] == ["rb"] * 3
        assert dialer.dialed.count((IP[A], 8080)) == 1
        # both gone: 502, saying what each replica did
        rb.stop()
        r = await client.get(url + "/", headers={"Host": WEB})
        assert r.status_code == 502 and "Connection refused" in r.text and A in r.text and B in r.text


async def test_failover_when_a_replica_does_not_take_the_connection(nursery):
    proxy, url, dialer, ra, rb = await web_proxy(nursery, connect_timeout=0.3)
    dialer.mapping[(IP[A], 8080)] = "hang"
    t0 = time.monotonic()
    got = [(await get(url, WEB)).json()["replica"] for _ in range(4)]
    assert got == ["rb"] * 4 and time.monotonic() - t0 < 2.0  # one connect timeout, once
    assert dialer.dialed.count((IP[A], 8080)) == 1
    dialer.mapping[(IP[B], 8080)] = "hang"
    proxy.health.mark_up(next(r for r in proxy.route(WEB) if r.node == B))
    r = await get(url, WEB)
    assert r.status_code == 504 and "within 0.3 s" in r.text


async def test_a_replica_that_takes_the_connection_and_never_answers_is_504(nursery):
    proxy, url, _, _, rb = await web_proxy(nursery, request_timeout=0.5)
    rb.mode = "hang"
    t0 = time.monotonic()
    r = await get(url, f"{owner_label(B)}.i1.fog")
    assert r.status_code == 504 and "answered within 0.5 s" in r.text
    assert 0.5 <= time.monotonic() - t0 < 1.5
    assert proxy.healthy(proxy.route(WEB)[1])  # slow is not down: no failover for that


async def test_a_dropped_connection_is_retried_only_when_that_is_safe(nursery):
    _, url, dialer, ra, rb = await web_proxy(nursery)
    ra.mode = "reset"  # takes the connection, closes it without a word
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(2):  # idempotent, body kept whole: sent again to the other replica
            r = await client.put(url + "/", headers={"Host": WEB}, content=b"x" * 1000)
            assert r.status_code == 200 and r.json()["replica"] == "rb" and r.json()["body_len"] == 1000
        ra.mode, rb.mode = "ok", "reset"
        r = await client.post(url + "/", headers={"Host": f"{owner_label(B)}.i1.fog"}, content=b"y")
        assert r.status_code == 502 and "not sent again" in r.text  # a POST may not be repeated
        # a body larger than what is kept (1 MiB) goes to the first replica that takes the connection
        big = bytes(range(256)) * 8192  # 2 MiB
        r = await client.put(url + "/", headers={"Host": f"{owner_label(B)}.i1.fog"}, content=big)
        assert r.status_code == 502 and "not sent again" in r.text
        rb.stop()  # refused: nothing was lost, so even the large body fails over
        r = await client.put(url + "/", headers={"Host": WEB}, content=big)
        assert r.status_code == 200 and r.json()["replica"] == "ra"
        assert r.json()["body_sha256"] == hashlib.sha256(big).hexdigest()

        async def chunks():
            for _ in range(32):
                yield b"z" * 65536

        r = await client.post(url + "/", headers={"Host": WEB}, content=chunks())  # chunked, 2 MiB
        assert r.status_code == 200 and r.json()["body_len"] == 32 * 65536
        assert ["transfer-encoding", "chunked"] in r.json()["headers"]


async def test_an_answer_before_the_whole_body_is_relayed(nursery):
    _, url, _, ra, rb = await web_proxy(nursery)
    ra.mode = rb.mode = "early"
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    out = b""
    async with stream:
        await stream.send_all(b"PUT / HTTP/1.1\r\nHost: " + WEB.encode() + b"\r\nContent-Length: 4194304\r\n\r\n")
        with trio.move_on_after(5):
            try:
                for _ in range(24):  # 1.5 MiB of the 4: more than the proxy keeps
                    await stream.send_all(b"b" * 65536)
            except trio.BrokenResourceError:
                pass
            while chunk := await stream.receive_some(65536):
                out += chunk
    assert out.startswith(b"HTTP/1.1 413 ") and out.endswith(b"early"), out[:200]
    assert len(ra.requests) + len(rb.requests) == 1


async def test_bodies_over_the_bound_are_413(nursery):
    _, url, dialer, _, _ = await web_proxy(nursery, max_body=1000)
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(url + "/", headers={"Host": WEB}, content=b"x" * 1001)
        assert r.status_code == 413
        r = await client.post(url + "/", headers={"Host": WEB}, content=b"x" * 1000)
        assert r.status_code == 200

        async def chunks():
            for _ in range(4):
                yield b"z" * 400

        r = await client.post(url + "/", headers={"Host": WEB}, content=chunks())
        assert r.status_code == 413
    out = await raw(url, b"POST / HTTP/1.1\r\nHost: " + WEB.encode() +
                    b"\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n", read_for=0.5)
    assert out.startswith(b"HTTP/1.1 100 ")  # asked to continue, then waits for the body


async def test_slow_clients_are_cut_off(nursery):
    _, url, dialer, _, _ = await web_proxy(nursery, header_timeout=0.5, idle_timeout=0.5)
    host, port = url.removeprefix("http://").split(":")
    # slowloris: a head trickling in, a byte at a time, never complete
    stream = await trio.open_tcp_stream(host, int(port))
    t0 = time.monotonic()
    out = b""
    async with stream:
        with trio.move_on_after(5):
            for b in b"GET / HTTP/1.1\r\nHost: " + WEB.encode() + b"\r\nX-A: " + b"a" * 100:
                try:
                    await stream.send_all(bytes([b]))
                except trio.BrokenResourceError:
                    break
                with trio.move_on_after(0.05):
                    out += await stream.receive_some(65536)
                if out:
                    break
    assert out.startswith(b"HTTP/1.1 408 ") and time.monotonic() - t0 < 1.5
    # a connection that says nothing is closed after idle_timeout
    t0 = time.monotonic()
    assert await raw(url, b"", read_for=5) == b"" and time.monotonic() - t0 < 1.5
    # a body that stalls: 408
    out = await raw(url, b"POST / HTTP/1.1\r\nHost: " + WEB.encode() + b"\r\nContent-Length: 10\r\n\r\nabc")
    assert out.startswith(b"HTTP/1.1 408 ")
    assert dialer.dialed == []


async def test_connections_are_bounded_per_address_and_in_total(nursery):
    proxy, url, _, _, _ = await web_proxy(nursery, max_connections_per_ip=4, max_connections=6)
    host, port = url.removeprefix("http://").split(":")

    async def connect():
        return await trio.open_tcp_stream(host, int(port))

    held = [await connect() for _ in range(4)]
    await wait_for(lambda: proxy.connections == 4)
    assert (await raw(url, b"GET / HTTP/1.1\r\nHost: " + WEB.encode() + b"\r\n\r\n")).startswith(b"HTTP/1.1 429 ")
    await held.pop().aclose()
    await wait_for(lambda: proxy.connections == 3)
    assert (await get(url, WEB)).status_code == 200  # room again
    proxy.limits = type(proxy.limits)(max_connections=3, max_connections_per_ip=100)
    assert (await raw(url, b"GET / HTTP/1.1\r\nHost: " + WEB.encode() + b"\r\n\r\n")).startswith(b"HTTP/1.1 503 ")
    for s in held:
        await s.aclose()
    await wait_for(lambda: proxy.connections == 0 and not proxy.per_ip)
    assert proxy.stats["refused_connections"] == 2


async def test_many_connections_at_once_are_all_answered(nursery):
    proxy, url, _, ra, rb = await web_proxy(nursery)
    results = []

    async def one(client):
        r = await client.get(url + "/", headers={"Host": WEB})
        results.append(r.status_code)

    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(timeout=20, limits=limits) as client, trio.open_nursery() as n:
        for _ in range(100):
            n.start_soon(one, client)
    assert results == [200] * 100
    assert len(ra.requests) + len(rb.requests) == 100 and ra.requests and rb.requests
    assert proxy.connections == 0 or proxy.connections <= 50


async def wait_for(check, timeout=5.0):
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.01)


def test_the_settings_render_into_formation_toml():
    from pathlib import Path

    from formation.node.config import load_config
    from formation.node.settings import render_toml

    text = render_toml()
    assert "[proxy]" in text and "port = 8080" in text
    assert (Path(__file__).resolve().parents[2] / "formation.toml").read_text() == text
    cfg = load_config(None, {"proxy.port": 18080, "proxy.max_body_mb": 1})
    from formation.node.proxy import ProxyLimits

    limits = ProxyLimits.from_config(cfg)
    assert limits.max_body == 1024 * 1024 and limits.connect_timeout == 2.0 and cfg.proxy.port == 18080
    assert json.dumps(cfg.proxy.enabled) == "true"
