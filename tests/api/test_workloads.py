"""Builds, instance consoles and addresses, and hiring agents, against a real in-process node.

The node's VM side is replaced where a VM would be needed (conftest.py's `vnode`): a real
BuildService runs builds through a Builder whose `build` only pretends (no debootstrap, no VM),
and `runtime.scheduler` is a fake that knows one console.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import tarfile

import httpx
import pytest
import trio

from formation.client import ApiError, AsyncClient, one_use_path, sign_headers
from formation.crdt.keys import PrivateKey, format_address
from formation.node.api.app import create_app
from formation.node.api.workloads import CONTEXT_LIMIT
from formation.node.vmside import VmsOff
from tests.api.conftest import VM_IP, free_port, status_of, vm_node

BUILD = "b" * 64


def key(n: int) -> PrivateKey:
    return PrivateKey(bytes([n]) * 32)


def addr(k: PrivateKey) -> str:
    return format_address(k.address)


def tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


FORMFILE = "NAME web\nVCPU 2\nMEMORY 1024\nCOPY app.txt /srv/app.txt\nRUN echo hello\n"


def build_body(formfile: str = FORMFILE, files: dict[str, bytes] | None = None) -> dict:
    body = {"formfile": formfile}
    if files is not None:
        body["context"] = base64.b64encode(tar_gz(files)).decode()
    return body


async def signed(rt, k: PrivateKey, method: str, path: str, body=None) -> httpx.Response:
    path = one_use_path(method, path, rt.address)  # a call that may be charged names its node, once
    raw = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = sign_headers(k, method, path, raw)
    if raw:
        headers["Content-Type"] = "application/json"
    async with httpx.AsyncClient(base_url=rt.base_url, timeout=30) as http:
        return await http.request(method, path, content=raw, headers=headers)


async def wait_build(client: AsyncClient, bid: str) -> dict:
    with trio.fail_after(10):
        while True:
            st = await client.get(f"/v1/pack/builds/{bid}")
            if st["state"] in ("done", "failed"):
                return st
            await trio.sleep(0.02)


# ---- builds -----------------------------------------------------------------------------------


async def test_build_is_accepted_and_readable_by_its_owners_only(vnode):
    alice, bob = AsyncClient(vnode.base_url, key(1)), AsyncClient(vnode.base_url, key(2))
    gate = vnode.vms.builds.builder.gate = trio.Event()
    resp = await signed(vnode, key(1), "POST", "/v1/pack/build", build_body(files={"app.txt": b"hi"}))
    assert resp.status_code == 202, resp.text
    st = resp.json()
    bid = st["build_id"]
    assert st["state"] == "queued" and st["name"] == "web" and "owners" not in st
    with trio.fail_after(5):
        while (await alice.get(f"/v1/pack/builds/{bid}"))["state"] != "building":
            await trio.sleep(0.02)
    gate.set()
    done = await wait_build(alice, bid)
    assert done["state"] == "done" and done["image"]["vcpus"] == 2 and done["steps"] == 2
    # the context is kept for the other nodes placed for instances of it (p2p blobs)
    kept = vnode.vms.builds.context_bytes(bid)
    with tarfile.open(fileobj=io.BytesIO(kept)) as tar:
        assert tar.extractfile("app.txt").read() == b"hi"
    assert vnode.vms.builds.context_bytes("../" + bid) is None
    # the log, from an offset
    first = await alice.get(f"/v1/pack/builds/{bid}/logs")
    assert "--- step 1/2 (line 4): app.txt /srv/app.txt" in first["log"] and first["state"] == "done"
    assert first["offset"] == len(first["log"].encode())
    rest = await alice.get(f"/v1/pack/builds/{bid}/logs", query={"offset": 10})
    assert rest["log"] == first["log"][10:] and rest["offset"] == first["offset"]
    assert (await alice.get(f"/v1/pack/builds/{bid}/logs", query={"offset": first["offset"]}))["log"] == ""
    listed = await alice.get("/v1/pack/builds")
    assert [b["build_id"] for b in listed["builds"]] == [bid]
    # someone else sees nothing of it
    for path in (f"/v1/pack/builds/{bid}", f"/v1/pack/builds/{bid}/logs"):
        with pytest.raises(ApiError) as e:
            await bob.get(path)
        assert e.value.status == 404
    assert (await bob.get("/v1/pack/builds"))["count"] == 0
    # the same inputs again: a cache hit (200), and the second submitter becomes an owner
    again = await signed(vnode, key(2), "POST", "/v1/pack/build", build_body(files={"app.txt": b"hi"}))
    assert again.status_code == 200 and again.json()["build_id"] == bid and again.json()["state"] == "done"
    assert (await bob.get(f"/v1/pack/builds/{bid}"))["state"] == "done"
    # a signed build is one use
    body = json.dumps(build_body(files={"app.txt": b"hi", "more.txt": b"x"})).encode()
    headers = sign_headers(key(1), "POST", "/v1/pack/build", body)
    async with httpx.AsyncClient(base_url=vnode.base_url) as http:
        assert (await http.post("/v1/pack/build", content=body, headers=headers)).status_code == 202
        replay = await http.post("/v1/pack/build", content=body, headers=headers)
    assert replay.status_code == 401 and replay.json()["error"] == "replay"
    # unsigned: 401
    async with httpx.AsyncClient(base_url=vnode.base_url) as http:
        assert (await http.get("/v1/pack/builds")).status_code == 401


async def test_refused_builds_say_why(vnode):
    bad = await signed(vnode, key(3), "POST", "/v1/pack/build",
                       build_body("NAME x\nVCPU 0\nRUN echo\n"))
    doc = bad.json()
    assert bad.status_code == 400 and doc["error"] == "build_refused"
    assert "Formfile:2: VCPU" in doc["detail"]
    copy = await signed(vnode, key(3), "POST", "/v1/pack/build", build_body(files={"other.txt": b"x"}))
    doc = copy.json()
    assert copy.status_code == 400 and doc["failure"]["line"] == 4 and doc["failure"]["instruction"] == "COPY"
    assert "no such file" in doc["detail"]
    for body, needle in (({"context": "aGk="}, "formfile"), ({"formfile": FORMFILE, "context": "not base64!"}, "base64"),
                         ({"formfile": FORMFILE, "colour": "red"}, "colour"), ({"formfile": 3}, "formfile")):
        r = await signed(vnode, key(3), "POST", "/v1/pack/build", body)
        assert r.status_code == 400 and r.json()["error"] == "bad_field" and needle in r.json()["detail"], r.text
    r = await signed(vnode, key(3), "POST", "/v1/pack/build", b"[1]")
    assert r.status_code == 400 and r.json()["error"] == "bad_request"


async def test_a_failing_step_names_its_line_and_output(vnode):
    c = AsyncClient(vnode.base_url, key(4))
    st = await c.post("/v1/pack/build", build_body("NAME f\nRUN echo one\nRUN false\n"))
    failed = await wait_build(c, st["build_id"])
    assert failed["state"] == "failed"
    assert failed["error"]["line"] == 3 and failed["error"]["output_tail"][-1] == "boom"
    assert "BUILD FAILED" in (await c.get(f"/v1/pack/builds/{st['build_id']}/logs"))["log"]


async def test_context_over_the_limit_is_413(tmp_path):
    async with vm_node(tmp_path, context_limit=1024) as rt:
        body = {"formfile": FORMFILE, "context": base64.b64encode(bytes(4000)).decode()}
        r = await signed(rt, key(5), "POST", "/v1/pack/build", body)
        assert r.status_code == 413 and r.json()["error"] == "too_large"
        assert "over this node's limit of 1 KiB" in r.json()["detail"], r.text
        # within the limit packed, over it unpacked: the builder refuses it, naming the limit
        body = build_body(files={"app.txt": bytes(5000)})
        r = await signed(rt, key(5), "POST", "/v1/pack/build", body)
        assert r.status_code == 413 and r.json()["limit"] == "unpacked", r.text
        assert "5000 bytes unpacked, over the limit of 1024" in r.json()["detail"], r.text


async def test_vm_disabled_is_503(node):
    node.vms = VmsOff("no /dev/kvm on this host")
    r = await signed(node, key(6), "POST", "/v1/pack/build", build_body())
    assert r.status_code == 503 and r.json()["error"] == "vm_disabled"
    assert "no /dev/kvm" in r.json()["detail"]
    r = await signed(node, key(6), "GET", "/v1/pack/builds")
    assert r.status_code == 503
    # no replica here either: instance logs are a 404 that says so
    c = AsyncClient(node.base_url, key(6))
    iid = (await c.post("/v1/instance/create", {"name": "web"}))["id"]
    with pytest.raises(ApiError) as e:
        await c.get(f"/v1/instance/{iid}/logs")
    assert e.value.status == 404 and "runs no VMs" in e.value.detail


# ---- instances --------------------------------------------------------------------------------


async def test_instance_logs_and_ips(vnode):
    owner, stranger = AsyncClient(vnode.base_url, key(7)), AsyncClient(vnode.base_url, key(8))
    here = (await owner.post("/v1/instance/create", {"name": "here", "replicas": 2}))["id"]
    away = (await owner.post("/v1/instance/create", {"name": "away"}))["id"]
    vnode.vms.scheduler.consoles[here] = "booting\n" + "x" * 100 + "\nready\n"
    other_node = key(99)
    await status_of(vnode, vnode.key, here, "running", "10.1.0.5")
    await status_of(vnode, other_node, here, "booting", None, "copying the image")
    await status_of(vnode, other_node, away, "running", "10.2.0.9")

    logs = await owner.get(f"/v1/instance/{here}/logs")
    assert logs == {"instance_id": here, "node": vnode.address, "log": vnode.vms.scheduler.consoles[here]}
    assert (await owner.get(f"/v1/instance/{here}/logs", query={"tail": 6}))["log"] == "ready\n"
    with pytest.raises(ApiError) as e:
        await owner.get(f"/v1/instance/{away}/logs")
    assert e.value.status == 404 and addr(other_node) in e.value.detail and "running" in e.value.detail
    with pytest.raises(ApiError) as e:
        await owner.get(f"/v1/instance/{here}/logs", query={"tail": 0})
    assert e.value.status == 400

    metrics = await owner.get(f"/v1/instance/{here}/metrics")
    assert metrics["node"] == vnode.address and metrics["vm_state"] == "running" and metrics["cpu_seconds"] == 1.5
    with pytest.raises(ApiError) as e:
        await owner.get(f"/v1/instance/{away}/metrics")
    assert e.value.status == 404 and addr(other_node) in e.value.detail

    ips = await owner.get(f"/v1/instance/{here}/ips")
    assert ips["instance_id"] == here
    assert sorted((r["node"], r["state"], r["ip"]) for r in ips["replicas"]) == sorted([
        (vnode.address, "running", "10.1.0.5"), (addr(other_node), "booting", None)])
    assert {r["reason"] for r in ips["replicas"]} == {"", "copying the image"}
    # a node without a fresh heartbeat (here: none at all) is flagged: its last word may be stale
    assert {r["node"]: r["node_alive"] for r in ips["replicas"]} == {vnode.address: True,
                                                                     addr(other_node): False}
    got = await owner.get(f"/v1/instance/{here}/get")
    assert {r["node"]: r["node_alive"] for r in got["replicas_status"]}[addr(other_node)] is False

    for path in (f"/v1/instance/{here}/logs", f"/v1/instance/{here}/ips", f"/v1/instance/{here}/metrics"):
        with pytest.raises(ApiError) as e:
            await stranger.get(path)
        assert e.value.status == 403
    with pytest.raises(ApiError) as e:
        await owner.get("/v1/instance/nope/ips")
    assert e.value.status == 404


# ---- hire -------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def agent_server(*, status: int = 200, content_type: str = "application/json"):
    """A tiny HTTP/1.1 server on VM_IP (a replica's address): answers every request with
    {"echo": <its JSON body>}."""
    seen: list[tuple[str, dict, bytes]] = []

    async def handle(stream):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            body += await stream.receive_some(65536)
        seen.append((lines[0], headers, body))
        answer = json.dumps({"echo": json.loads(body) if body else None}).encode()
        await stream.send_all(b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                              b"Connection: close\r\n\r\n%s" % (status, content_type.encode(), len(answer), answer))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host=VM_IP))
        try:
            yield listeners[0].socket.getsockname()[1], seen
        finally:
            nursery.cancel_scope.cancel()


async def test_hire_proxies_to_a_running_replica(vnode):
    owner, caller = AsyncClient(vnode.base_url, key(11)), AsyncClient(vnode.base_url, key(12))
    async with agent_server(status=201, content_type="application/vnd.answer+json") as (port, seen):
        aid = (await owner.post("/v1/agents", {"name": "bot", "build_id": BUILD, "port": port,
                                               "path": "/run"}))["id"]
        iid = (await owner.post("/v1/instance/create", {"name": "bot", "build_id": BUILD,
                                                        "formfile": exposing(port)}))["id"]
        # no replica yet, then one that is booting: 503 naming the states
        with pytest.raises(ApiError) as e:
            await caller.post(f"/v1/agents/{aid}/hire", {"q": 1})
        assert e.value.status == 503 and e.value.error == "no_replica"
        await status_of(vnode, vnode.key, iid, "booting")
        with pytest.raises(ApiError) as e:
            await caller.post(f"/v1/agents/{aid}/hire", {"q": 1})
        assert e.value.status == 503 and "booting" in e.value.detail
        # a node may report any address: only a VM address of its subnet is sent a hire
        for bad in ("127.0.0.1", "127.77.0.1", "10.0.0.5"):  # loopback, the node's gateway, elsewhere
            await status_of(vnode, vnode.key, iid, "running", bad)
            with pytest.raises(ApiError) as e:
                await caller.post(f"/v1/agents/{aid}/hire", {"q": 1})
            assert e.value.status == 503 and "not a VM address" in e.value.detail, bad
        assert len(seen) == 0
        await status_of(vnode, vnode.key, iid, "running", VM_IP)
        resp = await signed(vnode, key(12), "POST", f"/v1/agents/{aid}/hire", {"question": "hi?"})
        assert resp.status_code == 201, resp.text
        assert resp.headers["content-type"] == "application/vnd.answer+json"
        assert resp.json() == {"echo": {"question": "hi?"}}
        assert resp.headers["x-formation-replica"] == vnode.address
        request_line, headers, _ = seen[-1]
        assert request_line == "POST /run HTTP/1.1"
        assert headers["x-formation-caller"] == addr(key(12)) and headers["x-formation-agent"] == aid
        # a signed hire of a free agent is a call, not a write: the same signature may be used
        # again (a priced call's may not: tests/api/test_credits.py)
        body = json.dumps({"n": 2}).encode()
        h = sign_headers(key(12), "POST", f"/v1/agents/{aid}/hire", body)
        async with httpx.AsyncClient(base_url=vnode.base_url) as http:
            for _ in range(2):
                assert (await http.post(f"/v1/agents/{aid}/hire", content=body, headers=h)).status_code == 201
        r = await signed(vnode, key(12), "POST", f"/v1/agents/{aid}/hire", b"{not json")
        assert r.status_code == 400
        # a replica its node's probe finds unhealthy is not sent a hire; healthy again, it is
        await status_of(vnode, vnode.key, iid, "running", VM_IP, health="unhealthy")
        with pytest.raises(ApiError) as e:
            await caller.post(f"/v1/agents/{aid}/hire", {"q": 1})
        assert e.value.status == 503 and "unhealthy" in e.value.detail
        await status_of(vnode, vnode.key, iid, "running", VM_IP, health="healthy")
        assert (await signed(vnode, key(12), "POST", f"/v1/agents/{aid}/hire", {"q": 3})).status_code == 201


GHOST_BUILD = "f" * 64


def exposing(port: int) -> str:
    return f"NAME bot\nEXPOSE {port}\nENTRYPOINT [\"/bin/agent\"]\n"


async def test_hire_failures(vnode):
    owner, mallory = AsyncClient(vnode.base_url, key(13)), AsyncClient(vnode.base_url, key(14))
    with pytest.raises(ApiError) as e:
        await owner.post("/v1/agents/nope/hire", {})
    assert e.value.status == 404
    bare = (await owner.post("/v1/agents", {"name": "bare"}))["id"]
    with pytest.raises(ApiError) as e:
        await owner.post(f"/v1/agents/{bare}/hire", {})
    assert e.value.status == 409 and "build_id" in e.value.detail
    secret = (await owner.post("/v1/agents", {"name": "s", "build_id": BUILD, "is_private": True}))["id"]
    with pytest.raises(ApiError) as e:
        await mallory.post(f"/v1/agents/{secret}/hire", {})
    assert e.value.status == 404
    # a running replica nobody listens on: 502
    dead = free_port()
    aid = (await owner.post("/v1/agents", {"name": "dead", "build_id": BUILD, "port": dead}))["id"]
    iid = (await owner.post("/v1/instance/create", {"name": "dead", "build_id": BUILD,
                                                    "formfile": exposing(dead)}))["id"]
    await status_of(vnode, vnode.key, iid, "running", VM_IP)
    with pytest.raises(ApiError) as e:
        await owner.post(f"/v1/agents/{aid}/hire", {})
    assert e.value.status == 502 and e.value.error == "agent_unreachable"
    # an agent on a port its instances' Formfile does not EXPOSE is not reached there
    unexposed = (await owner.post("/v1/agents", {"name": "unexposed", "build_id": BUILD, "port": 9}))["id"]
    with pytest.raises(ApiError) as e:
        await owner.post(f"/v1/agents/{unexposed}/hire", {})
    assert e.value.status == 503 and "does not EXPOSE port 9" in e.value.detail
    # a replica "running" on a node that stopped sending heartbeats is not tried
    ghost = (await owner.post("/v1/instance/create", {"name": "ghost", "build_id": GHOST_BUILD,
                                                      "formfile": exposing(8000)}))["id"]
    ghost_agent = (await owner.post("/v1/agents", {"name": "ghost", "build_id": GHOST_BUILD}))["id"]
    await status_of(vnode, key(98), ghost, "running", VM_IP)
    with pytest.raises(ApiError) as e:
        await owner.post(f"/v1/agents/{ghost_agent}/hire", {})
    assert e.value.status == 503 and "stopped sending heartbeats" in e.value.detail
    # an agent naming someone else's build does not reach their instances
    other = (await mallory.post("/v1/agents", {"name": "copycat", "build_id": BUILD, "port": dead}))["id"]
    with pytest.raises(ApiError) as e:
        await mallory.post(f"/v1/agents/{other}/hire", {})
    assert e.value.status == 503 and "no instance runs build" in e.value.detail


async def test_openapi_documents_the_new_endpoints(vnode):
    async with httpx.AsyncClient(base_url=vnode.base_url) as http:
        spec = (await http.get("/openapi.json")).json()
    paths = spec["paths"]
    assert "202" in paths["/v1/pack/build"]["post"]["responses"]
    assert "503" in paths["/v1/pack/build"]["post"]["responses"]
    assert {"502", "503"} <= set(paths["/v1/agents/{id}/hire"]["post"]["responses"])
    assert any(p["name"] == "tail" for p in paths["/v1/instance/{id}/logs"]["get"]["parameters"])
    # a whole context in base64 fits in one request; the write routes keep their own limit
    assert create_app(vnode).config["MAX_CONTENT_LENGTH"] >= 4 * CONTEXT_LIMIT // 3 + len(FORMFILE)
    big = json.dumps({"name": "x", "description": "y" * 60_000}).encode()
    r = await signed(vnode, key(15), "POST", "/v1/models", big)
    assert r.status_code == 413
