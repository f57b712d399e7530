"""The HTTP API against a real running node: signatures, rules, reads, two nodes, events."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import trio

from formation.client import ApiError, AsyncClient, sign_headers
from formation.crdt.keys import PrivateKey
from tests.api.conftest import free_port, running_node

EIP191_TEST_KEY = "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"


def key(n: int) -> PrivateKey:
    return PrivateKey(bytes([n]) * 32)


async def test_health_and_openapi(node):
    async with httpx.AsyncClient(base_url=node.base_url) as http:
        for path in ("/health", "/v1/health"):
            r = await http.get(path)
            assert r.status_code == 200 and r.json()["status"] == "healthy"
        spec = (await http.get("/openapi.json")).json()
        assert spec["openapi"].startswith("3.") and "/v1/models" in spec["paths"]
        r = await http.get("/v1/nope")
        assert r.status_code == 404 and r.json()["error"] == "not_found"


async def test_published_test_key_signs_requests(node):
    k = PrivateKey.from_hex(EIP191_TEST_KEY)
    async with AsyncClient(node.base_url, k) as c:
        res = await c.post("/v1/account/create", {"name": "vector"})
        assert res["key"] == "0x2c7536e3605d9c16a7a3d7b1898e529396a65c23"
        acct = await c.get(f"/v1/account/{res['key']}/get")
        assert acct["name"] == "vector" and acct["credits"] == 100


async def _raw(node, method, path, body=b"", headers=None):
    async with httpx.AsyncClient(base_url=node.base_url) as http:
        return await http.request(method, path, content=body, headers=headers or {})


async def test_every_tampering_gets_401_with_its_reason(node):
    k = key(3)
    body = json.dumps({"name": "m"}).encode()
    good = sign_headers(k, "POST", "/v1/models", body)

    async def status(method="POST", path="/v1/models", b=body, h=None):
        r = await _raw(node, method, path, b, h if h is not None else good)
        return r.status_code, r.json().get("error")

    assert await status(b=b'{"name": "x"}') == (401, "body_mismatch")
    assert await status(path="/v1/agents") == (401, "path_mismatch")
    assert await status(method="PUT", path="/v1/models/abc") == (401, "method_mismatch")
    old = sign_headers(k, "POST", "/v1/models", body, ts=int(time.time()) - 1000)
    assert await status(h=old) == (401, "stale")
    assert await status(h={"X-Signature": good["X-Signature"]}) == (401, "missing_header")
    assert await status(h={"X-Message": good["X-Message"]}) == (401, "missing_header")
    wrong_rid = dict(good, **{"X-Recovery-Id": str(1 - (int(good["X-Signature"][-2:], 16) - 27))})
    assert await status(h=wrong_rid) == (401, "recovery_id_mismatch")
    ts = good["X-Message"].split()[2]
    ts_changed = dict(good, **{"X-Message": good["X-Message"].replace(ts, str(int(ts) + 1))})
    assert await status(h=ts_changed) == (401, "signer_mismatch")
    ok = await _raw(node, "POST", "/v1/models", body, good)
    assert ok.status_code == 201
    assert await status() == (401, "replay")


async def test_other_users_cannot_touch_your_things(node):
    a, b, mgr = AsyncClient(node.base_url, key(11)), AsyncClient(node.base_url, key(12)), AsyncClient(node.base_url, key(13))
    inst = await a.post("/v1/instance/create", {"name": "web", "replicas": 2})
    mid = (await a.post("/v1/models", {"name": "secret", "is_private": True}))["id"]
    aid = (await a.post("/v1/agents", {"name": "bot"}))["id"]
    iid = inst["id"]
    with pytest.raises(ApiError) as e:
        await b.post(f"/v1/instance/{iid}/update", {"replicas": 9})
    assert e.value.status == 403
    with pytest.raises(ApiError) as e:
        await b.post(f"/v1/instance/{iid}/delete")
    assert e.value.status == 403
    with pytest.raises(ApiError) as e:
        await b.get(f"/v1/instance/{iid}/get")
    assert e.value.status == 403
    with pytest.raises(ApiError) as e:
        await b.get(f"/v1/models/{mid}")
    assert e.value.status == 403
    with pytest.raises(ApiError) as e:
        await AsyncClient(node.base_url).get(f"/v1/models/{mid}", sign=False)
    assert e.value.status == 401
    assert (await b.get("/v1/models"))["count"] == 0  # the private model is not listed for b
    with pytest.raises(ApiError) as e:
        await b.put(f"/v1/agents/{aid}", {"description": "hijacked"})
    assert e.value.status == 403
    with pytest.raises(ApiError) as e:
        await b.delete(f"/v1/agents/{aid}")
    assert e.value.status == 403
    # a manager may configure, not delete; an unknown field names itself
    await a.post(f"/v1/instance/{iid}/authorize", {"address": "0x" + key(13).address.hex(), "level": "manager"})
    assert (await mgr.post(f"/v1/instance/{iid}/update", {"replicas": 3}))["kind"] == "instance"
    got = await mgr.get(f"/v1/instance/{iid}/get")
    assert got["replicas"] == 3
    # this node runs no VMs, and it is the whole fog: the answer says so instead of "pending"
    assert got["placement"] == {"nodes": [], "problem": "0 of 3 replicas placed: no live node runs VMs"}
    with pytest.raises(ApiError) as e:
        await mgr.post(f"/v1/instance/{iid}/delete")
    assert e.value.status == 403
    with pytest.raises(ApiError) as e:
        await mgr.post(f"/v1/instance/{iid}/update", {"colour": "red"})
    assert e.value.status == 400 and "colour" in e.value.detail
    # transfer: the old owner loses control
    await a.post(f"/v1/models/{mid}/transfer", {"to": "0x" + key(12).address.hex()})
    assert (await b.get(f"/v1/models/{mid}"))["owner"] == "0x" + key(12).address.hex()
    with pytest.raises(ApiError) as e:
        await a.put(f"/v1/models/{mid}", {"description": "mine?"})
    assert e.value.status == 403
    listed = await a.get("/v1/instance/list")
    assert [i["instance_id"] for i in listed["instances"]] == [iid]
    assert inst["op_id"] and len(inst["op_id"]) == 64


async def test_status_codes_of_writes(node):
    c = AsyncClient(node.base_url, key(21))
    r = await c.post("/v1/instance/create", {"name": "svc"})
    assert r["kind"] == "instance"
    async with httpx.AsyncClient(base_url=node.base_url) as http:
        body = json.dumps({"name": "svc2"}).encode()
        resp = await http.post("/instance/create", content=body,
                               headers=sign_headers(key(21), "POST", "/instance/create", body))
        assert resp.status_code == 202  # scheduled later: accepted, not done
        body = json.dumps({"name": "m1"}).encode()
        resp = await http.post("/models", content=body, headers=sign_headers(key(21), "POST", "/models", body))
        assert resp.status_code == 201
        mid = resp.json()["id"]
        body = json.dumps({"name": "m1", "model_id": mid}).encode()  # a create naming another's id
        resp = await http.post("/models", content=body, headers=sign_headers(key(21), "POST", "/models", body))
        assert resp.status_code == 400 and "assigned by the fog" in resp.json()["detail"]
        body = json.dumps({"name": "m2"}).encode()
        path = f"/models/{mid}?base={'0' * 32}"  # a version this record never had
        resp = await http.put(path, content=body, headers=sign_headers(key(21), "PUT", path, body))
        assert resp.status_code == 409 and resp.json()["error"] == "unknown_version"
        path = f"/models/{mid}"  # no version at all: the relay must not pick one
        resp = await http.put(path, content=body, headers=sign_headers(key(21), "PUT", path, body))
        assert resp.status_code == 409 and resp.json()["error"] == "unknown_version"
        big = json.dumps({"name": "x", "description": "y" * 60_000}).encode()
        resp = await http.post("/models", content=big, headers=sign_headers(key(21), "POST", "/models", big))
        assert resp.status_code == 413
        body = json.dumps({"domain": "a.fog", "record_type": "CNAME"}).encode()
        resp = await http.post("/dns/create", content=body, headers=sign_headers(key(21), "POST", "/dns/create", body))
        assert resp.status_code == 422
        body = b"not json"
        resp = await http.post("/models", content=body, headers=sign_headers(key(21), "POST", "/models", body))
        assert resp.status_code == 400 and resp.json()["error"] == "bad_request"


async def test_search_models_and_agents(node):
    c = AsyncClient(node.base_url, key(31))
    await c.post("/v1/models", {"name": "Llama 3", "model_type": "llm", "framework": "pytorch", "tags": ["chat"]})
    await c.post("/v1/models", {"name": "Whisper", "model_type": "audio", "tags": ["speech"]})
    await c.post("/v1/agents", {"name": "Helper", "agent_type": "assistant", "tags": ["chat"]})
    anon = AsyncClient(node.base_url)
    assert [m["name"] for m in (await anon.post("/v1/models/search", {"text": "llama"}, sign=False))["models"]] == ["Llama 3"]
    assert [m["name"] for m in (await anon.post("/v1/models/search", {"type": "audio"}, sign=False))["models"]] == ["Whisper"]
    assert [m["name"] for m in (await anon.post("/v1/models/search", {"framework": "pytorch", "tags": ["chat"]}, sign=False))["models"]] == ["Llama 3"]
    assert (await anon.get("/v1/agents", query={"tag": "chat"}, sign=False))["count"] == 1
    with pytest.raises(ApiError) as e:
        await anon.post("/v1/models/search", {"colour": "red"}, sign=False)
    assert e.value.status == 400


async def test_write_on_one_node_is_readable_on_the_other(tmp_path):
    async with running_node(tmp_path / "a", secret=b"\x01" * 32) as a:
        boot = [addr for addr in a.announce_addrs() if "/127.0.0.1/" in addr]
        async with running_node(tmp_path / "b", secret=b"\x02" * 32, bootstrap=boot) as b:
            ca, cb = AsyncClient(a.base_url, key(41)), AsyncClient(b.base_url, key(41))
            mid = (await ca.post("/v1/models", {"name": "replicated"}))["id"]
            with trio.fail_after(15):
                while True:
                    try:
                        got = await cb.get(f"/v1/models/{mid}")
                        break
                    except ApiError as exc:
                        assert exc.status == 404
                        await trio.sleep(0.1)
            assert got["name"] == "replicated"
            nodes = (await cb.get("/v1/node/list", sign=False))["nodes"]
            assert len(nodes) == 2


async def test_events_stream_resumes_from_an_op(node):
    c = AsyncClient(node.base_url, key(51))
    first = await c.post("/v1/models", {"name": "one"})
    seen = []
    with trio.fail_after(10):
        async for ev in c.events(since=first["op_id"]):
            seen.append(ev)
            if ev["event"] == "hello":
                await AsyncClient(node.base_url, key(51)).post("/v1/models", {"name": "two"})
            if ev["event"] == "op" and ev["kind"] == "model":
                break
    assert seen[-1]["value"]["name"] == "two"


async def test_odd_headers_are_401_not_500_and_signed_searches_repeat(node):
    odd = ("GET /v1/account/list \u00b2 " + "0" * 64).encode("latin-1")  # a header of raw bytes
    r = await _raw(node, "GET", "/v1/account/list", b"", {"X-Message": odd, "X-Signature": "00" * 65})
    assert r.status_code == 401 and r.json()["error"] == "bad_message"
    c = AsyncClient(node.base_url, key(61))
    for _ in range(2):  # same second, same body: a read, not a replayed write
        assert (await c.post("/v1/models/search", {"text": "x"}))["count"] == 0
    assert (await c.get("/v1/models", query={"type": None}))["count"] == 0


async def test_health_says_what_is_wrong(tmp_path):
    nobody = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/16Uiu2HAmBZpDp8E4NJ1xAs6SxTXVVH6rtHsmtGpDsyfRWJ9BFuAm"
    async with running_node(tmp_path / "lonely", bootstrap=[nobody]) as rt:
        async with httpx.AsyncClient(base_url=rt.base_url) as http:
            doc = (await http.get("/health")).json()
        assert doc["status"] == "degraded"
        assert any("connected to no peer" in p for p in doc["problems"])
        # a node told to join through peers, with no invite, waits to be admitted and says so
        assert any("not a member of any fog" in p for p in doc["problems"])
        rt.heartbeat_error = "disk full"
        assert any("disk full" in p for p in rt.health_problems(connected=1, pending=0))
        assert rt.health_problems(connected=1, pending=rt.store.limits.pending_ops) != []
        assert rt.public_api_url() is None  # the API listens on loopback: nobody else can use it


async def test_events_do_not_name_deleted_private_records(node):
    """A deleted record's value is gone, and with it who could see it: the stream does not send
    such deletions (a stranger would learn the ids of someone's private instances)."""
    owner, stranger = AsyncClient(node.base_url, key(52)), AsyncClient(node.base_url, key(53))
    secret = (await owner.post("/v1/models", {"name": "secret", "is_private": True}))["id"]
    await owner.delete(f"/v1/models/{secret}")
    marker = await stranger.post("/v1/models", {"name": "after"})
    seen = []
    with trio.fail_after(10):
        async for ev in stranger.events(since="0"):
            seen.append(ev)
            if ev.get("op_id") == marker["op_id"]:
                break
    assert all(ev.get("key") != secret for ev in seen), [ev for ev in seen if ev.get("key") == secret]


async def test_a_create_over_the_accounts_quota_is_402_with_the_quota_named_and_nothing_written(node):
    from formation.crdt.quotas import Quotas
    node.store.replica.quota.quotas = Quotas(records={"instance": 1, "agent": 1, "model": 2, "dns": 1})
    async with AsyncClient(node.base_url, key(41)) as c:
        for i in range(2):
            await c.post("/v1/models", {"name": f"m{i}"})
        ops = len(node.store)
        with pytest.raises(ApiError) as e:
            await c.post("/v1/models", {"name": "m2"})
        assert e.value.status == 402 and e.value.error == "quota_exceeded"
        assert "quota of 2 model records per account" in e.value.detail
        assert len(node.store) == ops and (await c.get("/v1/models"))["count"] == 2
        # what counts is the creator's: another account still has room
    async with AsyncClient(node.base_url, key(42)) as other:
        await other.post("/v1/models", {"name": "theirs"})
