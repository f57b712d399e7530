"""Every answer of the API matches what /openapi.json documents for it: the success answers'
schemas built from the records, and the errors'.

One node with a faked VM side (conftest's `vnode`) is driven through every endpoint but the
event stream: records of every user kind with their optional fields set, replicas on this node
and on one that sends no heartbeats, builds done, cached, refused and failed. Each answer is
validated by schemathesis against the document the node serves, and every operation must have
answered 2xx at least once. The schemathesis run (test_fuzz.py) covers what a generator finds;
this covers the shapes only a real history reaches.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
import trio

from formation import sealed
from formation.client import ApiError, AsyncClient
from formation.crdt.keys import PrivateKey, format_address
from tests.api.conftest import status_of, vm_node

BUILD = "c" * 64
# answered by the agent, whatever it says (the schema is {}): its refusals are checked below
NOT_2XX = {"GET /v1/events", "POST /v1/agents/{id}/hire", "POST /v1/agents/{id}/run_task",
           # a move names two member nodes: its 2xx is in test_credits.py (two nodes); here its refusal
           "POST /v1/credits/move"}
TREASURY = PrivateKey(b"\x7e" * 32)


def key(n: int) -> PrivateKey:
    return PrivateKey(bytes([n]) * 32)


def addr(n: int) -> str:
    return format_address(key(n).address)


@pytest.fixture
async def tvnode(tmp_path):
    """conftest's `vnode` in a fog with a treasury (so that grants and credits answer)."""
    async with vm_node(tmp_path, settings={"fog.treasury": format_address(TREASURY.address)}) as rt:
        yield rt


async def test_every_answer_is_as_documented(tvnode):
    vnode = tvnode
    async with httpx.AsyncClient(base_url=vnode.base_url) as http:
        schema = schemathesis.openapi.from_dict((await http.get("/openapi.json")).json())
    answered: set[str] = set()  # operations seen answering 2xx

    async def conforms(response: httpx.Response) -> None:
        await response.aread()
        req = response.request
        op = schema.find_operation_by_path(req.method, req.url.path)
        assert op is not None, f"{req.method} {req.url.path} is not in the document"
        op.validate_response(response)  # raises, naming what does not match
        if response.status_code < 300:
            answered.add(op.label)

    def client(n: int) -> AsyncClient:
        c = AsyncClient(vnode.base_url, key(n))
        c.http.event_hooks["response"] = [conforms]
        return c

    alice, bob = client(1), client(2)
    vnode.runs_vms = True  # so that placement has a node to name
    await vnode.register()
    await alice.get("/v1/health")
    await alice.get("/v1/openapi.json")
    await alice.get("/v1/node/list")
    await alice.get(f"/v1/node/{vnode.address}/get")
    await alice.get(f"/v1/records/node/{vnode.address}")

    await alice.post("/v1/account/create", {"name": "alice"})
    await alice.post("/v1/account/update", {"name": "alice two"})
    await alice.get(f"/v1/account/{addr(1)}/get")
    await alice.get("/v1/account/list")
    await alice.get(f"/v1/records/account/{addr(1)}")
    await bob.get("/v1/account/list")  # no account: an empty list

    full = {"model": {"name": "full", "version": "1", "context_length": 8192, "quantization": "q4",
                      "price_per_1k_tokens": 0.25, "weights_url": "https://w", "metadata": {"k": "v"},
                      "is_private": True, "tags": ["chat"], "input_tokens_per_second": 50,
                      "output_tokens_per_second": 20, "capabilities": ["chat"], "formfile_template": "NAME m\n",
                      "resource_requirements": {"min_vcpus": 2, "requires_gpu": True, "min_vram_gb": 24,
                                                "required_cpu_extensions": ["avx2"]}},
            "agent": {"name": "full", "build_id": BUILD, "port": 8080, "path": "/run", "capabilities": ["talk"],
                      "price_per_request": 1, "metadata": {"k": "v"}, "tags": ["chat"], "tools": ["search"],
                      "compatible_model_types": ["llm"], "preferred_models": ["m1"],
                      "resource_requirements": {"min_memory_mb": 2048}, "formfile_template": "NAME a\n"}}
    for kind, base in (("model", "/v1/models"), ("agent", "/v1/agents")):
        rid = (await alice.post(base, full[kind]))["id"]
        await alice.put(f"{base}/{rid}", {"description": "updated"})
        await alice.post(f"{base}/{rid}/authorize", {"address": addr(3), "level": "read_only"})
        await alice.get(base, query={"tag": "chat"})
        await alice.get(f"{base}/{rid}")
        await alice.post(f"{base}/search", {"text": "full", "limit": 5})
        await alice.get(f"/v1/records/{kind}/{rid}")
        with pytest.raises(ApiError):
            await alice.get(f"{base}/nope")
        await alice.post(f"{base}/{rid}/transfer", {"to": addr(2)})
        if kind == "model":
            await bob.delete(f"{base}/{rid}")
    agent_id = rid

    rid = (await alice.post("/v1/dns/create", {"domain": "web.fog", "targets": ["10.0.0.1"]}))["id"]
    await alice.post(f"/v1/dns/{rid}/update", {"record_type": "CNAME", "cname_target": "other.fog"})
    await alice.post(f"/v1/dns/{rid}/authorize", {"address": addr(3), "level": "manager"})
    await alice.get("/v1/dns/list", query={"owner": addr(1)})
    await alice.get(f"/v1/dns/{rid}/get")
    await alice.get(f"/v1/records/dns/{rid}")
    await alice.post(f"/v1/dns/{rid}/transfer", {"to": addr(2)})
    await bob.post(f"/v1/dns/{rid}/delete")

    here = (await alice.post("/v1/instance/create", {"name": "web", "build_id": BUILD, "replicas": 2}))["id"]
    gpu = (await alice.post("/v1/instance/create", {"name": "gpu", "resources": {"gpu": {"count": 2, "model": "a100"}}}))["id"]
    await status_of(vnode, vnode.key, here, "running", "10.1.0.5")
    await status_of(vnode, key(99), here, "booting", None, "copying the image")
    await status_of(vnode, key(99), gpu, "failed", None, "no GPU")
    vnode.vms.scheduler.consoles[here] = "booting\nready\n"
    await alice.post(f"/v1/instance/{here}/update", {"description": "the web"})
    await alice.post("/v1/instance/update", {"instance_id": here, "tags": ["web"]})
    await alice.post(f"/v1/instance/{here}/authorize", {"address": addr(3), "level": "operator"})
    for action in ("stop", "start", "pause", "resume", "restart"):
        await client(3).post(f"/v1/instance/{here}/{action}")
    plain = sealed.Plain.new(b"value")  # form secrets: sealed to the node, as the CLI does
    entry = {"commit": sealed.commitment(here, "TOKEN", plain),
             "boxes": {vnode.address: sealed.seal(plain, vnode.key.public_key.format(compressed=True),
                                                  instance_id=here, name="TOKEN", target=vnode.address)}}
    await alice.post(f"/v1/instance/{here}/secrets", {"set": {"TOKEN": entry}})
    await alice.post(f"/v1/instance/{here}/secrets", {"unset": ["TOKEN"]})
    for iid in (here, gpu):
        await alice.get(f"/v1/instance/{iid}/get")
        await alice.get(f"/v1/instance/{iid}/ips")
        await alice.get(f"/v1/records/instance/{iid}")
    await alice.get("/v1/instance/list", query={"limit": 1})
    await alice.get(f"/v1/instance/{BUILD}/get_by_build_id")
    await alice.get(f"/v1/instance/{here}/logs", query={"tail": 6})
    await alice.get(f"/v1/instance/{here}/metrics")
    # usage (docs/economy.md): the node's own record of a replica, reported per node and per account
    await vnode.write("usage", f"{here}@{vnode.address}", {"instance_id": here, "node": vnode.address, "owner": addr(1),
                                                           "cpu_seconds": 5, "hires": 2, "started_at": 1,
                                                           "updated_at": 2})
    await alice.get(f"/v1/instance/{here}/usage")
    await alice.get("/v1/account/usage")
    async with httpx.AsyncClient(base_url=vnode.base_url, event_hooks={"response": [conforms]}) as http:
        await http.get("/v1/metrics")  # Prometheus text
    for what in ("logs", "metrics"):  # no replica here: 404 naming the nodes that have one
        with pytest.raises(ApiError) as e:
            await alice.get(f"/v1/instance/{gpu}/{what}")
        assert e.value.status == 404
    with pytest.raises(ApiError) as e:
        await alice.post(f"/v1/agents/{agent_id}/hire", {"q": 1})  # its owner runs no instance of it
    assert e.value.status == 503
    with pytest.raises(ApiError) as e:
        await alice.post(f"/v1/agents/{agent_id}/run_task", {"task": "x"})  # the same call
    assert e.value.status == 503
    with pytest.raises(ApiError) as e:
        await alice.post("/v1/agents/nobody/run_task", {"task": "x"})
    assert e.value.status == 404
    await bob.get(f"/v1/agents/{agent_id}/usage")  # bob owns it now (transferred)
    with pytest.raises(ApiError) as e:
        await alice.get(f"/v1/agents/{agent_id}/usage")
    assert e.value.status == 403
    await bob.delete(f"/v1/agents/{agent_id}")
    await alice.post(f"/v1/instance/{gpu}/transfer", {"to": addr(2)})
    await bob.post(f"/v1/instance/{gpu}/delete")

    st = await alice.post("/v1/pack/build", {"formfile": "NAME web\nRUN echo hello\n"})
    failed = await alice.post("/v1/pack/build", {"formfile": "NAME f\nRUN echo one\nRUN false\n"})
    with trio.fail_after(10):
        for bid in (st["build_id"], failed["build_id"]):
            while (await alice.get(f"/v1/pack/builds/{bid}"))["state"] not in ("done", "failed"):
                await trio.sleep(0.02)
    await bob.post("/v1/pack/build", {"formfile": "NAME web\nRUN echo hello\n"})  # a cache hit: 200
    await alice.get("/v1/pack/builds", query={"limit": 5})
    await alice.get(f"/v1/pack/builds/{st['build_id']}/logs", query={"offset": 3})
    with pytest.raises(ApiError) as e:
        await alice.post("/v1/pack/build", {"formfile": "NAME x\nVCPU 0\nRUN echo\n"})
    assert e.value.status == 400 and e.value.error == "build_refused"

    treasury = client(0x7e)
    fog = await treasury.get("/v1/fog")
    await treasury.post("/v1/credits/grant", {"to": addr(1), "amount": 5, "at": vnode.address, "fog": fog})
    await alice.get("/v1/account/credits")
    planned = (await alice.post("/v1/agents", {"name": "planned", "plans": {"p": {"price_credits": 2, "calls": 1,
                                                                                  "days": 1}}}))["id"]
    await treasury.post("/v1/credits/grant", {"to": addr(2), "amount": 5, "at": vnode.address, "fog": fog})
    await bob.post(f"/v1/agents/{planned}/subscribe", {"plan": "p"})
    await bob.get("/v1/account/credits")  # with a subscription
    with pytest.raises(ApiError) as e:
        await alice.post("/v1/credits/move", {"from_node": vnode.address, "to_node": addr(3), "amount": 1})
    assert e.value.status == 422 and e.value.error == "not_a_member"

    await alice.post("/v1/account/delete")
    documented = {r.ok().label for r in schema.get_all_operations()}
    assert documented - answered == NOT_2XX
