"""The original README's requests (seeds/formation-README.txt, "Deploying Your First Agent (via
API)"), sent as its curl examples send them, to a real node over HTTP, signed as every request
is here (docs/api.md): POST /instance/create with {formfile, name} answers the README's fields
beside ours, GET /instance/<name>/get_by_build_id finds the instance by the name it was given,
POST /agents/<id>/run_task forwards the README's task to the agent's VM and streams its answer
back. Then pause/resume, and the registry plan's agent and model fields (with hostile values).
"""

from __future__ import annotations

import json

import httpx
import pytest

from formation.client import ApiError, AsyncClient, sign_headers
from formation.crdt.keys import PrivateKey, format_address
from formation.node.vmside import VmsOff, VmsStarting
from tests.api.conftest import VM_IP, status_of
from tests.api.test_workloads import agent_server
from tests.pack.test_formfile import README_EXAMPLE

# The README's Formfile.my-simple-agent, as its "Creating the Agent Instance" writes it: its USER
# line gives `passwd:somepassword` in clear, which no op may carry (crdt/passwords.py), so the
# README's request is refused saying what to do; the same Formfile with the password hashed (what
# `form pack ship` sends) is what the rest of these requests send.
README_CLEAR_FORMFILE = README_EXAMPLE
SOMEPASSWORD_HASH = "$6$formation$ld.4s13O1OIbzU2kRhlc8QQ1b1vfrqAfS/bUJVBzdg8fx8Ew/shGZyfksn9O.Qw0xblmtCTqdCKbipzC4ofyR/"  # openssl passwd -6 -salt formation somepassword
README_FORMFILE = README_EXAMPLE.replace("passwd:somepassword", f"'passwd:{SOMEPASSWORD_HASH}'")

AGENT_BUILD_NAME = "my-first-agent-from-file"
# the README's AGENT_JSON_PAYLOAD, byte for byte
AGENT_JSON_PAYLOAD = b'{"task": "translate_text", "source_language": "en", "target_language": "es", "text": "Hello, world!"}'


def key(n: int) -> PrivateKey:
    return PrivateKey(bytes([n]) * 32)


def addr(n: int) -> str:
    return format_address(key(n).address)


def jq_payload(formfile: str, name: str) -> bytes:
    """What `jq -n --arg ff "$FORMFILE_CONTENT" --arg name "$AGENT_BUILD_NAME" '{formfile: $ff,
    name: $name}'` prints (indented by two; $(cat ...) drops the last newline)."""
    return json.dumps({"formfile": formfile.rstrip("\n"), "name": name}, indent=2).encode()


async def curl(rt, k: PrivateKey, method: str, path: str, body: bytes = b"", headers: dict | None = None
               ) -> httpx.Response:
    """One request as the README's curl sends it: the body as given, Content-Type JSON, signed."""
    h = {"Content-Type": "application/json", **sign_headers(k, method, path, body), **(headers or {})}
    async with httpx.AsyncClient(base_url=rt.base_url, timeout=30) as http:
        return await http.request(method, path, content=body, headers=h)


async def test_readme_instance_create_answers_the_readme_fields_and_is_found_by_its_name(vnode):
    # the README's own request: its password in clear is refused, with where and what to do
    r = await curl(vnode, key(1), "POST", "/instance/create", jq_payload(README_CLEAR_FORMFILE, AGENT_BUILD_NAME))
    assert r.status_code == 400 and r.json()["error"] == "bad_field", r.text
    detail = r.json()["detail"]
    assert "field 'formfile': line 5: USER passwd is not a crypt hash" in detail
    assert "`form pack build/ship` does it for you" in detail and "openssl passwd -6" in detail
    assert "somepassword" not in r.text
    assert await vnode.astore.list("instance", limit=10) == []
    r = await curl(vnode, key(1), "POST", "/instance/create", jq_payload(README_FORMFILE, AGENT_BUILD_NAME))
    assert r.status_code == 202, r.text
    doc = r.json()
    iid = doc["id"]
    assert doc == {"op_id": doc["op_id"], "kind": "instance", "key": iid, "id": iid,
                   "instanceId": iid, "buildId": AGENT_BUILD_NAME, "status": "REQUEST_RECEIVED",
                   "message": "Instance creation request received and is being processed."}
    # "GET /instance/:build_id/get_by_build_id (the name you provided during creation)"
    r = await curl(vnode, key(1), "GET", f"/instance/{AGENT_BUILD_NAME}/get_by_build_id")
    assert r.status_code == 200, r.text
    assert [i["instance_id"] for i in r.json()["instances"]] == [iid]
    assert r.json()["instances"][0]["formfile"] == README_FORMFILE.rstrip("\n")
    r = await curl(vnode, key(1), "GET", f"/instance/{iid}/get")
    assert r.status_code == 200 and r.json()["name"] == AGENT_BUILD_NAME
    # someone else's instance of the same name is theirs: not in your answer, nor yours in theirs
    other = (await AsyncClient(vnode.base_url, key(2)).post("/v1/instance/create", {"name": AGENT_BUILD_NAME}))["id"]
    mine = (await AsyncClient(vnode.base_url, key(1)).get(f"/v1/instance/{AGENT_BUILD_NAME}/get_by_build_id"))
    theirs = (await AsyncClient(vnode.base_url, key(2)).get(f"/v1/instance/{AGENT_BUILD_NAME}/get_by_build_id"))
    assert [i["instance_id"] for i in mine["instances"]] == [iid]
    assert [i["instance_id"] for i in theirs["instances"]] == [other]
    # an instance deployed from a build is found by its build id, and answers it as its buildId
    built = await AsyncClient(vnode.base_url, key(1)).post("/v1/instance/create", {"name": "web", "build_id": "b" * 64})
    assert built["buildId"] == "b" * 64 and built["instanceId"] == built["id"]
    by_build = await AsyncClient(vnode.base_url, key(1)).get(f"/v1/instance/{'b' * 64}/get_by_build_id")
    assert [i["instance_id"] for i in by_build["instances"]] == [built["id"]]
    # what is not a name is not searched for (and finds nothing)
    r = await curl(vnode, key(1), "GET", "/instance/NOT.A-NAME/get_by_build_id")
    assert r.status_code == 200 and r.json() == {"instances": [], "count": 0}


async def test_every_instance_write_answers_the_readme_fields(vnode):
    c = AsyncClient(vnode.base_url, key(3))
    iid = (await c.post("/v1/instance/create", {"name": "web"}))["id"]
    for action, message in (("stop", "Instance stop request received and is being processed."),
                            ("start", "Instance start request received and is being processed."),
                            ("restart", "Instance restart request received and is being processed.")):
        res = await c.post(f"/v1/instance/{iid}/{action}")
        assert (res["instanceId"], res["buildId"], res["status"], res["message"]) == (
            iid, "web", "REQUEST_RECEIVED", message)
    res = await c.post(f"/v1/instance/{iid}/update", {"description": "d"})
    assert res["message"] == "Instance update request received." and res["id"] == iid
    res = await c.post(f"/v1/instance/{iid}/delete")
    assert res["message"] == "Instance deletion request received and is being processed."
    assert res["buildId"] is None and res["instanceId"] == iid  # the record is gone


async def test_readme_run_task_is_forwarded_to_the_agent_and_answered_by_it(vnode):
    owner = AsyncClient(vnode.base_url, key(4))
    async with agent_server() as (port, seen):
        formfile = README_FORMFILE.replace("EXPOSE 8000", f"EXPOSE {port}")
        r = await curl(vnode, key(4), "POST", "/instance/create", jq_payload(formfile, AGENT_BUILD_NAME))
        iid = r.json()["instanceId"]
        # nothing runs yet: 503 naming the replicas' states
        r = await curl(vnode, key(4), "POST", f"/agents/{AGENT_BUILD_NAME}/run_task", AGENT_JSON_PAYLOAD)
        assert r.status_code == 503 and r.json()["error"] == "no_replica", r.text
        await status_of(vnode, vnode.key, iid, "running", VM_IP)
        # the README's request: AGENT_ID is the name given at creation, the body its task
        r = await curl(vnode, key(4), "POST", f"/agents/{AGENT_BUILD_NAME}/run_task", AGENT_JSON_PAYLOAD)
        assert r.status_code == 200, r.text
        assert r.json() == {"echo": json.loads(AGENT_JSON_PAYLOAD)}  # what the agent answered
        assert r.headers["x-formation-replica"] == vnode.address
        request_line, headers, body = seen[-1]
        assert request_line == "POST / HTTP/1.1" and body == AGENT_JSON_PAYLOAD
        assert headers["x-formation-caller"] == addr(4)
        # the README signs the payload itself in X-Message: refused, saying what to sign
        readme_headers = {"X-Message": AGENT_JSON_PAYLOAD.decode()}
        r = await curl(vnode, key(4), "POST", f"/agents/{AGENT_BUILD_NAME}/run_task", AGENT_JSON_PAYLOAD,
                       readme_headers)
        assert r.status_code == 401 and r.json()["error"] == "bad_message"
        assert "<METHOD> <PATH?QUERY> <unix-seconds> <sha256-hex>" in r.json()["detail"]

        # a registered agent: run_task is its hire (its port and path)
        aid = (await owner.post("/v1/agents", {"name": "translator", "build_id": AGENT_BUILD_NAME,
                                               "port": port, "path": "/task"}))["id"]
        await owner.post(f"/v1/instance/{iid}/update", {"build_id": AGENT_BUILD_NAME})
        r = await curl(vnode, key(5), "POST", f"/agents/{aid}/run_task", AGENT_JSON_PAYLOAD)
        assert r.status_code == 200 and r.json() == {"echo": json.loads(AGENT_JSON_PAYLOAD)}, r.text
        request_line, headers, _ = seen[-1]
        assert request_line == "POST /task HTTP/1.1" and headers["x-formation-agent"] == aid

        # who may send traffic: not a stranger to your instances, not a read_only grantee
        r = await curl(vnode, key(5), "POST", f"/agents/{AGENT_BUILD_NAME}/run_task", AGENT_JSON_PAYLOAD)
        assert r.status_code == 404 and "form agent register" in r.json()["detail"]
        await owner.post(f"/v1/instance/{iid}/authorize", {"address": addr(5), "level": "read_only"})
        r = await curl(vnode, key(5), "POST", f"/agents/{AGENT_BUILD_NAME}/run_task", AGENT_JSON_PAYLOAD)
        assert r.status_code == 404 and "level operator" in r.json()["detail"]
        await owner.put(f"/v1/agents/{aid}", {"is_private": True})
        await owner.post(f"/v1/agents/{aid}/authorize", {"address": addr(5), "level": "read_only"})
        r = await curl(vnode, key(5), "POST", f"/agents/{aid}/run_task", AGENT_JSON_PAYLOAD)
        assert r.status_code == 403 and "needs level operator" in r.json()["detail"]
        # an operator on the instance may call it by its name
        await owner.post(f"/v1/instance/{iid}/authorize", {"address": addr(5), "level": "operator"})
        r = await curl(vnode, key(5), "POST", f"/agents/{AGENT_BUILD_NAME}/run_task", AGENT_JSON_PAYLOAD)
        assert r.status_code == 200, r.text
        n = len(seen)
        r = await curl(vnode, key(4), "POST", f"/agents/{AGENT_BUILD_NAME}/run_task", b"{not json")
        assert r.status_code == 400 and len(seen) == n  # refused here, never sent


async def test_pause_and_resume_an_instance(vnode):
    owner, op, reader = (AsyncClient(vnode.base_url, key(n)) for n in (6, 7, 8))
    iid = (await owner.post("/v1/instance/create", {"name": "web"}))["id"]
    await owner.post(f"/v1/instance/{iid}/authorize", {"address": addr(7), "level": "operator"})
    await owner.post(f"/v1/instance/{iid}/authorize", {"address": addr(8), "level": "read_only"})
    with pytest.raises(ApiError) as e:
        await reader.post(f"/v1/instance/{iid}/pause")
    assert e.value.status == 403 and "needs level operator" in e.value.detail
    r = await curl(vnode, key(7), "POST", f"/v1/instance/{iid}/pause?base="
                   + (await op.get(f"/v1/records/instance/{iid}"))["record_version"])
    assert r.status_code == 202, r.text
    assert r.json()["message"] == "Instance pause request received and is being processed."
    assert (await owner.get(f"/v1/instance/{iid}/get"))["desired_state"] == "paused"
    await op.post(f"/v1/instance/{iid}/pause")  # again: still paused
    await op.post(f"/v1/instance/{iid}/resume")
    assert (await owner.get(f"/v1/instance/{iid}/get"))["desired_state"] == "running"
    await op.post(f"/v1/instance/{iid}/stop")
    for action in ("pause", "resume"):
        with pytest.raises(ApiError) as e:
            await op.post(f"/v1/instance/{iid}/{action}")
        assert e.value.status == 422 and f"form manage start {iid}" in e.value.detail
    assert (await owner.get(f"/v1/instance/{iid}/get"))["desired_state"] == "stopped"  # nothing changed
    with pytest.raises(ApiError) as e:
        await op.post(f"/v1/instance/{iid}/pause", {"now": True})
    assert e.value.status == 400 and "now" in e.value.detail


# ---- the registry plan's agent and model fields -------------------------------------------------

PLAN_MODEL = {"name": "llama", "model_type": "llm", "framework": "pytorch", "parameters": 7_000_000_000,
              "quantization": "GGUF", "context_length": 8192, "input_tokens_per_second": 120,
              "output_tokens_per_second": 40, "capabilities": ["chat", "code"],
              "formfile_template": "NAME llama\nVCPU 4\nMEM 16384\n",
              "resource_requirements": {"min_vcpus": 2, "recommended_vcpus": 4, "min_memory_mb": 8192,
                                        "recommended_memory_mb": 16384, "min_disk_gb": 20,
                                        "recommended_disk_gb": 50, "requires_gpu": True, "min_vram_gb": 24,
                                        "cuda_cores": 10496, "tensor_cores": 328}}
PLAN_AGENT = {"name": "helper", "agent_type": "assistant", "framework": "langchain",
              "compatible_model_types": ["llm", "embedding"], "tools": ["web_search", "calculator"],
              "capabilities": ["answer"], "formfile_template": "NAME helper\n",
              "resource_requirements": {"min_vcpus": 1, "recommended_vcpus": 2, "min_memory_mb": 512,
                                        "recommended_memory_mb": 1024, "min_disk_gb": 5, "recommended_disk_gb": 10}}


async def test_the_registry_plan_fields_are_kept(vnode):
    c = AsyncClient(vnode.base_url, key(9))
    mid = (await c.post("/v1/models", PLAN_MODEL))["id"]
    model = await c.get(f"/v1/models/{mid}")
    for k, v in PLAN_MODEL.items():
        if k != "resource_requirements":
            assert model[k] == v, k
    assert {k: model["resource_requirements"][k] for k in PLAN_MODEL["resource_requirements"]} == \
        PLAN_MODEL["resource_requirements"]
    agent = await c.get(f"/v1/agents/{(await c.post('/v1/agents', {**PLAN_AGENT, 'preferred_models': [mid]}))['id']}")
    assert agent["tools"] == ["web_search", "calculator"] and agent["preferred_models"] == [mid]
    assert agent["compatible_model_types"] == ["llm", "embedding"]
    assert agent["resource_requirements"]["recommended_memory_mb"] == 1024
    # half a pair: the other half follows it, so a minimum alone is never over its recommendation
    half = await c.get(f"/v1/agents/{(await c.post('/v1/agents', {'name': 'h', 'resource_requirements': {'min_vcpus': 8}}))['id']}")
    assert (half["resource_requirements"]["min_vcpus"], half["resource_requirements"]["recommended_vcpus"]) == (8, 8)
    assert (await c.get(f"/v1/agents/{(await c.post('/v1/agents', {'name': 'bare'}))['id']}"))["resource_requirements"] is None


HOSTILE = [
    ({"tools": ["t"] * 2 + [f"t{i}" for i in range(64)]}, "tools"),
    ({"tools": ["same", "same"]}, "duplicates"),
    ({"tools": [{"id": "search", "name": "search"}]}, "tools"),
    ({"tools": ["ok", "x" * 65]}, "tools"),
    ({"tools": ["evil\u202etxt"]}, "bidirectional"),
    ({"tools": ["line\nbreak"]}, "a tool name"),
    ({"compatible_model_types": ["LLM"]}, "compatible_model_types"),
    ({"preferred_models": ["../../etc"]}, "preferred_models"),
    ({"preferred_models": [["nested"]]}, "preferred_models"),
    ({"resource_requirements": {"min_vcpus": 4, "recommended_vcpus": 2}}, "min_vcpus (4) is more than"),
    ({"resource_requirements": {"min_vcpus": 0}}, "resource_requirements.min_vcpus"),
    ({"resource_requirements": {"min_vcpus": True}}, "resource_requirements.min_vcpus"),
    ({"resource_requirements": {"min_memory_mb": 2**40}}, "resource_requirements.min_memory_mb"),
    ({"resource_requirements": {"min_memory_mb": 2**70}}, "64 bits"),
    ({"resource_requirements": {"gpu": {"count": 1}}}, "resource_requirements.gpu"),
    ({"resource_requirements": {"required_cuda_version": "12.1; rm -rf /"}}, "required_cuda_version"),
    ({"resource_requirements": {"required_cpu_extensions": ["AVX2"]}}, "required_cpu_extensions"),
    ({"resource_requirements": [1, 2]}, "resource_requirements"),
    ({"resource_requirements": "lots"}, "resource_requirements"),
    ({"formfile_template": "x" * (32 * 1024 + 1)}, "formfile_template"),
    ({"formfile_template": 7}, "formfile_template"),
    ({"capabilities": "chat"}, "capabilities"),
]


async def test_hostile_registry_fields_are_400_naming_what_is_wrong(vnode):
    c = AsyncClient(vnode.base_url, key(10))
    aid = (await c.post("/v1/agents", {"name": "a", "tools": ["kept"]}))["id"]
    before = await c.get(f"/v1/agents/{aid}")
    for fields, named in HOSTILE:
        for method, path in (("POST", "/v1/agents"), ("PUT", f"/v1/agents/{aid}")):
            with pytest.raises(ApiError) as e:
                await c.request(method, path, {"name": "a", **fields} if method == "POST" else fields)
            assert e.value.status in (400, 413) and named in e.value.detail, (fields, e.value.detail)
        if not any(k in fields for k in ("tools", "compatible_model_types", "preferred_models")):
            with pytest.raises(ApiError) as e:  # the model's fields of the same name, the same checks
                await c.post("/v1/models", {"name": "m", **fields})
            assert e.value.status in (400, 413) and named in e.value.detail, (fields, e.value.detail)
    assert await c.get(f"/v1/agents/{aid}") == before  # nothing changed
    assert (await c.get("/v1/agents", query={"owner": addr(10)}))["count"] == 1
    assert (await c.get("/v1/models", query={"owner": addr(10)}))["count"] == 0


async def test_deeply_nested_requirements_are_refused_before_any_check(vnode):
    body = b'{"name": "a", "resource_requirements": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    r = await curl(vnode, key(10), "POST", "/v1/agents", body)
    assert r.status_code == 400 and "nest" in r.json()["detail"], r.text


async def test_a_build_sent_while_the_vms_start_is_503_vms_starting(vnode):
    """Right after `./dev run`: the VM side is starting; builds are asked to come again (the CLI
    waits on /health's vms.starting), and this is not the 503 of a node that runs no VMs."""
    on = vnode.vms
    vnode.vms = VmsStarting(on.host)
    r = await curl(vnode, key(11), "POST", "/v1/pack/build", json.dumps({"formfile": "NAME x\n"}).encode())
    assert r.status_code == 503 and r.json()["error"] == "vms_starting", r.text
    assert "ask again" in r.json()["detail"]
    async with httpx.AsyncClient(base_url=vnode.base_url) as http:
        vms = (await http.get("/health")).json()["vms"]
    assert vms["starting"] is True and vms["enabled"] is False
    vnode.vms = VmsOff("no /dev/kvm")
    r = await curl(vnode, key(11), "POST", "/v1/pack/build", json.dumps({"formfile": "NAME y\n"}).encode())
    assert r.status_code == 503 and r.json()["error"] == "vm_disabled"
    async with httpx.AsyncClient(base_url=vnode.base_url) as http:
        assert "starting" not in (await http.get("/health")).json()["vms"]
