"""The original README's GET /instance/:instance_id/get ("Checking Agent Status and Boot
Completion"), sent over HTTP as its curl sends it (signed as every request is here): the answer
holds the README's camelCase fields (instanceId, buildId, ownerAddress, status, formnetIp,
createdAt, updatedAt) beside ours, with the same instanceId/buildId as the create's answer, and a
status that follows the replicas the live nodes report."""

from __future__ import annotations

import json
import re

import httpx

from formation.crdt.keys import PrivateKey, format_address
from tests.api.conftest import VM_IP, status_of
from tests.api.test_seed import AGENT_BUILD_NAME, README_FORMFILE, addr, curl, jq_payload, key

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
SEED_KEYS = {"instanceId", "buildId", "ownerAddress", "status", "formnetIp", "createdAt", "updatedAt"}


async def get(rt, iid: str) -> dict:
    r = await curl(rt, key(1), "GET", f"/instance/{iid}/get")
    assert r.status_code == 200, r.text
    return r.json()


async def test_get_answers_the_readmes_fields_beside_ours(vnode):
    r = await curl(vnode, key(1), "POST", "/instance/create", jq_payload(README_FORMFILE, AGENT_BUILD_NAME))
    created = r.json()
    iid = created["instanceId"]
    doc = await get(vnode, iid)
    assert set(doc) >= SEED_KEYS
    assert (doc["instanceId"], doc["buildId"]) == (created["instanceId"], created["buildId"]) == (iid, AGENT_BUILD_NAME)
    assert doc["ownerAddress"] == addr(1) == doc["owner"] and doc["instance_id"] == iid  # ours, still there
    assert ISO.fullmatch(doc["createdAt"]) and ISO.fullmatch(doc["updatedAt"])
    assert (doc["status"], doc["formnetIp"]) == ("PENDING_BUILD", None)  # its nodes build its Formfile
    assert "replicas_status" in doc and "placement" in doc

    # the README's states, from what this (live) node reports of its replica
    for state, ip, shown in (("building", None, "BUILDING"), ("booting", None, "STARTING"),
                             ("failed", None, "FAILED"), ("running", VM_IP, "RUNNING")):
        await status_of(vnode, vnode.key, iid, state, ip)
        doc = await get(vnode, iid)
        assert doc["status"] == shown, (state, doc["status"])
    assert doc["formnetIp"] == VM_IP
    # a node that sends no heartbeats is not believed: its "running" makes nothing RUNNING
    ghost = PrivateKey(b"\x33" * 32)
    await status_of(vnode, vnode.key, iid, "failed")
    await status_of(vnode, ghost, iid, "running", "127.77.0.9")
    doc = await get(vnode, iid)
    assert doc["status"] == "FAILED" and doc["formnetIp"] is None
    assert format_address(ghost.address) in [s["node"] for s in doc["replicas_status"]]

    # stopped by its owner
    r = await curl(vnode, key(1), "POST", f"/instance/{iid}/stop?base={doc['record_version']}")
    assert r.status_code == 202, r.text
    await status_of(vnode, vnode.key, iid, "stopped")
    doc = await get(vnode, iid)
    assert doc["status"] == "STOPPED" and doc["buildId"] == AGENT_BUILD_NAME


async def test_an_instance_of_a_build_is_pending_with_its_build_id(vnode):
    body = json.dumps({"name": "web", "build_id": "b" * 64}).encode()
    iid = (await curl(vnode, key(1), "POST", "/instance/create", body)).json()["id"]
    doc = await get(vnode, iid)
    assert (doc["status"], doc["buildId"]) == ("PENDING", "b" * 64)


async def test_the_documented_answer_names_the_readmes_fields(vnode):
    async with httpx.AsyncClient(base_url=vnode.base_url) as http:
        spec = (await http.get("/openapi.json")).json()
    ok = spec["paths"]["/v1/instance/{id}/get"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    props = ok["properties"]
    assert set(props) >= SEED_KEYS and set(ok["required"]) >= SEED_KEYS
    assert "RUNNING" in props["status"]["enum"] and "PENDING_BUILD" in props["status"]["enum"]
