"""Budgets and bounds of the HTTP API, played as an attacker against a real in-process node:
cheap checks before expensive ones (body limits and signature headers before the body is read,
the signature before the body is parsed), /events signed, filtered, read in batches and capped,
hire refused to read_only grants, odd input answered 400 (never 500).

Bodies here go over raw sockets: a test can then send the head of a request and hold back its
body, and see whether the node answers before it has the body (it must) or waits for it.
"""

from __future__ import annotations

import hashlib
import json
import time
import tracemalloc
from dataclasses import dataclass

import httpx
import pytest
import trio

from formation.client import ApiError, AsyncClient, sign_headers
from formation.crdt.intents import MAX_BODY
from formation.crdt.keys import PrivateKey, format_address
from formation.node.api import records
from formation.node.api.hire import HIRE_MAX_BODY
from formation.node.events import Streams
from tests.api.conftest import VM_IP, status_of
from tests.api.test_workloads import BUILD, agent_server, exposing

BIG = 80 * 1024 * 1024
CHUNK = 64 * 1024


def key(n: int) -> PrivateKey:
    return PrivateKey(bytes([n]) * 32)


def addr(n: int) -> str:
    return format_address(key(n).address)


@dataclass
class Answer:
    status: int
    body: bytes
    sent: int  # bytes of the request body sent before the answer came

    def json(self) -> dict:
        return json.loads(self.body)


async def exchange(rt, method: str, path: str, headers: dict[str, str], *, length: int | None = None,
                   body: int = 0, chunked: bool = False, timeout: float = 10) -> Answer:
    """Send the head of a request, then up to `body` bytes of body ("a"s, in 64 KiB pieces, with
    Content-Length `length` or chunked) while watching for the answer; stop sending as soon as
    it comes. `body=0` holds the body back: an answer then came before the node had it."""
    port = int(rt.base_url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    head = f"{method} {path} HTTP/1.1\r\nHost: node\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {length if length is not None else body}\r\n"
    got = bytearray()
    answered = trio.Event()
    sent = 0

    async def read():
        while True:
            data = await stream.receive_some(65536)
            if not data:
                break
            got.extend(data)
            head_end = got.find(b"\r\n\r\n")
            if head_end >= 0:
                lines = bytes(got[:head_end]).decode().split("\r\n")
                size = next((int(v) for k, v in (h.split(":", 1) for h in lines[1:]) if k.lower() == "content-length"), None)
                if size is not None and len(got) >= head_end + 4 + size:
                    break
        answered.set()

    async def write():
        nonlocal sent
        piece = b"a" * CHUNK
        try:
            while sent < body and not answered.is_set():
                n = min(CHUNK, body - sent)
                await stream.send_all((b"%x\r\n%s\r\n" % (n, piece[:n])) if chunked else piece[:n])
                sent += n
            if chunked and not answered.is_set():
                await stream.send_all(b"0\r\n\r\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with stream:
        await stream.send_all(head.encode() + b"\r\n")
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                nursery.start_soon(write)
                await answered.wait()
                nursery.cancel_scope.cancel()
    head_end = got.find(b"\r\n\r\n")
    assert head_end >= 0, bytes(got[:200])
    return Answer(int(got[9:12]), bytes(got[head_end + 4:]), sent)


def signed_for(k: PrivateKey, method: str, path: str, size: int, *, ts: int | None = None) -> dict[str, str]:
    """Signature headers for a body of `size` "a"s (hashed in pieces, never held whole)."""
    digest = hashlib.sha256()
    for done in range(0, size, CHUNK):
        digest.update(b"a" * min(CHUNK, size - done))
    message = f"{method} {path} {int(time.time()) if ts is None else ts} {digest.hexdigest()}"
    return {"X-Message": message, "X-Signature": "0x" + k.personal_sign(message.encode()).hex(),
            "X-Address": "0x" + k.address.hex()}


# ---- bodies: limits and signature headers before the body is read --------------------------------


async def test_a_body_over_the_routes_limit_is_413_before_it_is_read(node):
    # the head alone says 80 MB: the node answers without waiting for a byte of it
    for path in ("/v1/models", "/v1/models/search", "/v1/instance/create"):
        for headers in ({}, signed_for(key(1), "POST", path, BIG)):
            r = await exchange(node, "POST", path, headers, length=BIG)
            assert r.status == 413 and r.json()["error"] == "too_large", (path, r.body)
            assert str(MAX_BODY) in r.json()["detail"]
    # the hire route takes more than a write, still far less than a build's context
    r = await exchange(node, "POST", "/v1/agents/x/hire", {}, length=HIRE_MAX_BODY + 1)
    assert r.status == 413 and str(HIRE_MAX_BODY) in r.json()["detail"]
    # a GET takes no body
    r = await exchange(node, "GET", "/v1/models", {}, length=10)
    assert r.status == 413


async def test_signature_headers_are_checked_before_the_body(node):
    """A route that wants a signature refuses missing or malformed signature headers before it
    reads the body: the build route's body may be ~89 MB, so this is what an attacker without
    a key meets."""
    path = "/v1/pack/build"
    now = int(time.time())
    cases = {
        "missing_header": {},
        "bad_message": {"X-Message": "hello", "X-Signature": "00" * 65},
        "path_mismatch": signed_for(key(2), "POST", "/v1/models", BIG),
        "method_mismatch": signed_for(key(2), "PUT", path, BIG),
        "stale": signed_for(key(2), "POST", path, BIG, ts=now - 1000),
        "bad_signature": {**signed_for(key(2), "POST", path, BIG), "X-Signature": "zz"},
    }
    for reason, headers in cases.items():
        r = await exchange(node, "POST", path, headers, length=BIG)  # no body sent
        assert (r.status, r.json()["error"]) == (401, reason), r.body
        assert r.sent == 0
    # a search (signature optional) with a malformed one: refused the same way
    r = await exchange(node, "POST", "/v1/models/search", {"X-Message": "x", "X-Signature": "00"}, length=100)
    assert (r.status, r.json()["error"]) == (401, "bad_message")
    # the signature is verified before the body is parsed: a bad body under a bad signature is 401
    body = b'{"name": "a", "name": "b"}'
    h = sign_headers(key(2), "POST", "/v1/models", b"{}")
    async with httpx.AsyncClient(base_url=node.base_url) as http:
        r2 = await http.post("/v1/models", content=body, headers=h)
    assert (r2.status_code, r2.json()["error"]) == (401, "body_mismatch")


async def test_a_chunked_body_is_counted_and_cut_at_the_limit(node):
    # no length up front: the node counts what arrives and stops at the route's limit
    path = "/v1/models"
    r = await exchange(node, "POST", path, signed_for(key(3), "POST", path, BIG), body=BIG, chunked=True)
    assert r.status == 413 and r.json()["error"] == "too_large", r.body
    assert r.sent < 4 * 1024 * 1024, f"the node read {r.sent} bytes of a body over its {MAX_BODY}-byte limit"
    # a chunked body within the limit is a body like any other
    body = json.dumps({"name": "chunked"}).encode()
    async def pieces():
        yield body[:5]
        yield body[5:]
    async with httpx.AsyncClient(base_url=node.base_url) as http:
        ok = await http.post(path, content=pieces(), headers=sign_headers(key(3), "POST", path, body))
    assert ok.status_code == 201, ok.text


async def test_an_unsigned_80_mb_body_costs_the_node_almost_nothing(node):
    """Measured: before the checks came first, this cost the node ~162 MiB (the body, then a
    copy of it) on every route; now it is refused from its head."""
    tracemalloc.start()
    try:
        for path, chunked in (("/v1/pack/build", False), ("/v1/pack/build", True), ("/v1/models", False)):
            tracemalloc.reset_peak()
            r = await exchange(node, "POST", path, {}, length=None if chunked else BIG, body=BIG, chunked=chunked)
            peak = tracemalloc.get_traced_memory()[1]
            assert r.status in (401, 413), r.body
            assert peak < 8 * 1024 * 1024, f"{path}: {peak / 2**20:.1f} MiB for an unsigned body"
    finally:
        tracemalloc.stop()


async def test_bodies_in_other_encodings_and_duplicate_keys_are_400_naming_them(node):
    c = AsyncClient(node.base_url, key(4))
    text = json.dumps({"name": "enc"})
    cases = {"UTF-16": [text.encode("utf-16"), text.encode("utf-16-le"), text.encode("utf-16-be")],
             "UTF-32": [text.encode("utf-32"), text.encode("utf-32-le")],
             "UTF-8 with a byte order mark": [b"\xef\xbb\xbf" + text.encode()]}
    async with httpx.AsyncClient(base_url=node.base_url) as http:
        for name, bodies in cases.items():
            for body in bodies:
                for path in ("/v1/models", "/v1/models/search"):
                    r = await http.post(path, content=body, headers=sign_headers(key(4), "POST", path, body))
                    assert r.status_code == 400 and r.json()["error"] == "bad_encoding", (path, body, r.text)
                    assert name in r.json()["detail"], r.text
        body = b'{"name": "a", "name": "b"}'
        for path in ("/v1/models", "/v1/models/search"):
            r = await http.post(path, content=body, headers=sign_headers(key(4), "POST", path, body))
            assert r.status_code == 400 and "'name' appears twice" in r.json()["detail"], r.text
    assert (await c.post("/v1/models", {"name": "still fine"}))["kind"] == "model"


async def test_a_long_text_search_is_400_not_500(node):
    words = "a " * 1200  # one SQL condition per word: past SQLite's expression depth it was a 500
    async with httpx.AsyncClient(base_url=node.base_url) as http:
        r = await http.get("/v1/models", params={"q": words})
        assert r.status_code == 400 and "'q'" in r.json()["detail"], r.text
        r = await http.post("/v1/agents/search", content=json.dumps({"text": words}))
        assert r.status_code == 400 and "'text'" in r.json()["detail"], r.text
        r = await http.get("/v1/models", params={"q": "a b c"})
        assert r.status_code == 200


# ---- /events ---------------------------------------------------------------------------------------


async def test_events_are_signed_and_show_only_what_the_caller_may_see(node):
    async with httpx.AsyncClient(base_url=node.base_url) as http:
        r = await http.get("/v1/events", params={"since": "0"})
    assert r.status_code == 401 and r.json()["error"] == "missing_header"
    with pytest.raises(ApiError) as e:
        async for _ in AsyncClient(node.base_url).events():
            pass
    assert e.value.status == 401
    owner, stranger = AsyncClient(node.base_url, key(5)), AsyncClient(node.base_url, key(6))
    secret = (await owner.post("/v1/models", {"name": "secret", "is_private": True}))["id"]
    iid = (await owner.post("/v1/instance/create", {"name": "mine"}))["id"]
    marker = (await owner.post("/v1/models", {"name": "public"}))["op_id"]

    async def keys_seen(client):
        seen = []
        with trio.fail_after(10):
            async for ev in client.events(since=0):
                seen.append(ev.get("key"))
                if ev.get("op_id") == marker:
                    return seen
    assert secret in await keys_seen(owner) and iid in await keys_seen(owner)
    shown = await keys_seen(stranger)
    assert secret not in shown and iid not in shown and addr(5) not in shown


async def test_events_replay_reads_the_store_in_batches(node, monkeypatch):
    """A replay from 0 took one store call per op (and each waits for the store's lock, shared
    with every write and sync); now one call reads a batch."""
    monkeypatch.setattr(records, "EVENTS_BATCH", 50)
    n = 300

    def many(store):
        for i in range(n):
            store.write(node.key, "instance_status", f"i{i}@{node.address}",
                        {"instance_id": f"i{i}", "node": node.address, "state": "running", "ip": None,
                         "reason": ""})

    await node.astore.run(many, node.store)
    marker = (await AsyncClient(node.base_url, key(7)).post("/v1/models", {"name": "after"}))["op_id"]
    calls = 0
    real_run = node.astore.run

    async def counting(fn, *args, **kw):
        nonlocal calls
        calls += 1
        return await real_run(fn, *args, **kw)

    monkeypatch.setattr(node.astore, "run", counting)
    with trio.fail_after(20):
        async for ev in AsyncClient(node.base_url, key(7)).events(since=0):
            if ev.get("op_id") == marker:
                break
    assert calls <= n // 50 + 6, f"{calls} store calls to replay {n} ops"


async def test_event_streams_are_capped_per_caller_and_in_all(node):
    node.changes.streams = Streams(per_caller=2, total=3)
    held = []

    async def open_stream(k: PrivateKey, stack):
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=node.base_url, timeout=10))
        path = "/v1/events?since=0"
        resp = await stack.enter_async_context(http.stream("GET", path, headers=sign_headers(k, "GET", path, b"")))
        if resp.status_code == 200:
            lines = resp.aiter_lines()
            held.append(lines)  # (an iterator dropped half read would close the stream)
            assert json.loads(await lines.__anext__())["event"] == "hello"
        else:
            await resp.aread()
        return resp

    import contextlib
    async with contextlib.AsyncExitStack() as a_streams, contextlib.AsyncExitStack() as b_streams:
        for _ in range(2):
            assert (await open_stream(key(8), a_streams)).status_code == 200
        async with contextlib.AsyncExitStack() as s:
            third = await open_stream(key(8), s)
            assert third.status_code == 429 and third.json()["error"] == "too_many_streams"
            assert "one caller" in third.json()["detail"]
        assert (await open_stream(key(9), b_streams)).status_code == 200
        async with contextlib.AsyncExitStack() as s:
            over = await open_stream(key(10), s)
            assert over.status_code == 429 and "this node serves 3" in over.json()["detail"]
        await a_streams.aclose()  # two streams end: their slots come back
        with trio.fail_after(10):
            while node.changes.streams.open > 1:
                await trio.sleep(0.02)
        async with contextlib.AsyncExitStack() as s:
            assert (await open_stream(key(10), s)).status_code == 200


# ---- hire ------------------------------------------------------------------------------------------


async def test_read_only_grants_cannot_send_traffic_to_the_vm(vnode):
    owner, reader, operator = (AsyncClient(vnode.base_url, key(n)) for n in (21, 22, 23))
    async with agent_server() as (port, seen):
        iid = (await owner.post("/v1/instance/create", {"name": "bot", "build_id": BUILD,
                                                        "formfile": exposing(port)}))["id"]
        await status_of(vnode, vnode.key, iid, "running", VM_IP)
        aid = (await owner.post("/v1/agents", {"name": "bot", "build_id": BUILD, "port": port, "path": "/run",
                                               "is_private": True}))["id"]
        await owner.post(f"/v1/agents/{aid}/authorize", {"address": addr(22), "level": "read_only"})
        await owner.post(f"/v1/agents/{aid}/authorize", {"address": addr(23), "level": "operator"})
        # read_only on a private agent: may read it, not call it
        assert (await reader.get(f"/v1/agents/{aid}"))["name"] == "bot"
        with pytest.raises(ApiError) as e:
            await reader.post(f"/v1/agents/{aid}/hire", {"q": 1})
        assert e.value.status == 403 and "operator" in e.value.detail
        assert seen == []
        assert (await operator.post(f"/v1/agents/{aid}/hire", {"q": 2})) == {"echo": {"q": 2}}
        assert len(seen) == 1
        # read_only on the instance: an agent of the grantee's own naming that build (any path)
        # does not reach the VM
        await owner.post(f"/v1/instance/{iid}/authorize", {"address": addr(22), "level": "read_only"})
        own = (await reader.post("/v1/agents", {"name": "mine", "build_id": BUILD, "port": port,
                                                "path": "/admin/shutdown"}))["id"]
        with pytest.raises(ApiError) as e:
            await reader.post(f"/v1/agents/{own}/hire", {"q": 3})
        assert e.value.status == 503 and e.value.error == "no_replica" and "operator" in e.value.detail
        assert len(seen) == 1
        # operator on the instance may (it may run the instance: start, stop, restart)
        await owner.post(f"/v1/instance/{iid}/authorize", {"address": addr(22), "level": "operator"})
        assert (await reader.post(f"/v1/agents/{own}/hire", {"q": 4})) == {"echo": {"q": 4}}
        assert seen[-1][0] == "POST /admin/shutdown HTTP/1.1"


# ---- uploads: refused from the head when the node cannot take them ------------------------------


async def test_a_node_that_does_not_build_refuses_an_upload_from_its_head(node):
    """Measured by the soak (docs/soak.md): a node without VMs read each ~89 MB build body and
    checked its signature before it said 503; four at once took it from 111 to 484 MB."""
    path = "/v1/pack/build"
    r = await exchange(node, "POST", path, signed_for(key(4), "POST", path, BIG), length=BIG)  # no body sent
    assert (r.status, r.json()["error"]) == (503, "vm_disabled") and r.sent == 0, r.body


async def test_uploads_are_capped_at_once_per_source_and_in_all(vnode):
    """A build upload holds a slot from its head to its answer: two per client address, four in
    all; the next is 429 from its head, and a slot comes back when an upload ends."""
    from formation.node.api.http import UPLOADS_PER_SOURCE
    path = "/v1/pack/build"
    port = int(vnode.base_url.rsplit(":", 1)[1])
    held = []
    try:
        for n in range(UPLOADS_PER_SOURCE):  # heads sent, bodies held back: the node waits for them
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            h = signed_for(key(10 + n), "POST", path, BIG)
            head = f"POST {path} HTTP/1.1\r\nHost: node\r\nContent-Length: {BIG}\r\n" + "".join(
                f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
            await stream.send_all(head.encode())
            held.append(stream)
        await trio.sleep(0.3)
        r = await exchange(vnode, "POST", path, signed_for(key(20), "POST", path, BIG), length=BIG)
        assert (r.status, r.json()["error"]) == (429, "too_many_uploads") and r.sent == 0, r.body
        assert "uploads from 127.0.0.1 are under way" in r.json()["detail"]
    finally:
        for stream in held:
            await stream.aclose()
    # the slots come back once those connections end: the next upload is read (and judged on its body)
    with trio.fail_after(10):
        while True:
            r = await exchange(vnode, "POST", path, signed_for(key(21), "POST", path, 10), body=10)
            if r.status != 429:
                break
            await trio.sleep(0.1)
    assert r.status == 400, r.body  # read and parsed: not JSON
