"""Usage through a real in-process node: calls through the real hire proxy to a replica on loopback
(conftest.py's `vnode`) are metered with the tokens the agent reports, the node's meter writes
them as its `usage` record, and GET /instance/{id}/usage and GET /account/usage report them to
whoever may see them (a non-member's rows never count). GET /metrics is scraped over HTTP and
parsed with prometheus-client's own parser."""

from __future__ import annotations

import contextlib
import functools
import json

import dns.message
import httpx
import pytest
import trio
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from formation.client import ApiError, AsyncClient
from formation.crdt.keys import PrivateKey, format_address
from formation.crdt.kinds.usage_kinds import COUNTERS
from formation.dns.server import DnsServer
from formation.node.metering import MAX_TOKENS_PER_CALL, TOKENS_HEADER, parse_tokens
from tests.api.conftest import VM_IP, running_node, status_of
from tests.api.test_workloads import build_body, exposing, signed, wait_build

BUILD = "c" * 64


def key(n: int) -> PrivateKey:
    return PrivateKey(bytes([n]) * 32)


@contextlib.asynccontextmanager
async def token_agent():
    """An agent on VM_IP that answers {"ok": true} with the X-Formation-Tokens header its caller
    asks for in the body ({"tokens": "..."}; none without), after {"sleep": seconds}."""
    async def handle(stream):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0)
        while len(body) < length:
            body += await stream.receive_some(65536)
        asked = json.loads(body)
        await trio.sleep(asked.get("sleep", 0))
        extra = f"{TOKENS_HEADER}: {asked['tokens']}\r\n".encode() if "tokens" in asked else b""
        answer = b'{"ok": true}'
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n"
                              b"Connection: close\r\n\r\n%s" % (extra, len(answer), answer))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host=VM_IP))
        try:
            yield listeners[0].socket.getsockname()[1]
        finally:
            nursery.cancel_scope.cancel()


def test_the_tokens_header_is_read_strictly():
    assert parse_tokens("in=12,out=40") == (12, 40)
    assert parse_tokens(" out=7 , in=3 ") == (3, 7)
    assert parse_tokens("out=5") == (0, 5)
    assert parse_tokens(f"in={MAX_TOKENS_PER_CALL}") == (MAX_TOKENS_PER_CALL, 0)
    for bad in (None, "", "in=1,in=2", "in=-1", "in=1.5", "in=abc", "tokens=3", "in=12;out=40", "in = 3",
                f"in={MAX_TOKENS_PER_CALL + 1}", "in=99999999999", "in=1," + "x" * 80, "in=٣"):
        assert parse_tokens(bad) is None, bad


async def scrape(rt) -> dict[str, dict]:
    """GET /metrics, parsed: family name -> {sample name + labels: value}."""
    async with httpx.AsyncClient(base_url=rt.base_url) as http:
        resp = await http.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(resp.text):
        out[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    return out


async def test_hires_are_metered_and_reported_to_those_who_may_see_the_instance(vnode):
    owner, caller, stranger = (AsyncClient(vnode.base_url, key(n)) for n in (21, 22, 23))
    async with token_agent() as port:
        aid = (await owner.post("/v1/agents", {"name": "bot", "build_id": BUILD, "port": port, "path": "/run"}))["id"]
        iid = (await owner.post("/v1/instance/create", {"name": "bot", "build_id": BUILD,
                                                        "formfile": exposing(port)}))["id"]
        await status_of(vnode, vnode.key, iid, "running", VM_IP)
        # three hires (one reporting no tokens it can read), one without a header, one run_task
        for body in ({"tokens": "in=12,out=40", "sleep": 0.05}, {"tokens": "in=3,out=4"},
                     {"tokens": "in=lots"}, {}):
            assert await caller.post(f"/v1/agents/{aid}/hire", body) == {"ok": True}
        assert await owner.post(f"/v1/agents/{aid}/run_task", {"tokens": "out=1"}) == {"ok": True}
    # the proxy's ledger holds them until the meter takes them
    assert vnode.hires.pending[iid].hires == 5 and vnode.hires.pending[iid].tokens_in == 15
    [written] = await vnode.meter.tick()
    assert written["hires"] == 5 and (written["tokens_in"], written["tokens_out"]) == (15, 45)
    assert written["hire_ms"] >= 50 and written["cpu_seconds"] == 0 and written["owner"] == format_address(key(21).address)
    assert await vnode.meter.tick() == []  # nothing new: nothing written

    # a usage row of a node that is no member of the fog: stored (valid), but counts for no one
    outsider = key(99)
    await vnode.astore.run(vnode.store.write, outsider, "usage", f"{iid}@{format_address(outsider.address)}",
                           {**{c: 10**6 for c in COUNTERS}, "instance_id": iid, "owner": format_address(key(21).address),
                            "node": format_address(outsider.address), "started_at": 1, "updated_at": 2},
                           now_ms=1_700_000_000_000)

    report = await owner.get(f"/v1/instance/{iid}/usage")
    assert report["instance_id"] == iid and report["owner"] == format_address(key(21).address)
    assert [r["node"] for r in report["nodes"]] == [vnode.address]
    assert report["total"] == {c: written[c] for c in COUNTERS}
    # whoever may see the instance may see its usage; others may not; unsigned: 401
    with pytest.raises(ApiError) as e:
        await stranger.get(f"/v1/instance/{iid}/usage")
    assert e.value.status == 403
    async with httpx.AsyncClient(base_url=vnode.base_url) as http:
        assert (await http.get(f"/v1/instance/{iid}/usage")).status_code == 401
        # usage records are never shown raw (a node record of someone's instance)
        assert (await http.get(f"/v1/records/usage/{iid}@{vnode.address}")).status_code in (401, 403)
    await owner.post(f"/v1/instance/{iid}/authorize", {"address": format_address(key(23).address),
                                                       "level": "read_only"})
    assert (await stranger.get(f"/v1/instance/{iid}/usage"))["total"]["hires"] == 5

    mine = await owner.get("/v1/account/usage")
    assert mine["address"] == format_address(key(21).address) and mine["count"] == 1
    assert [(i["instance_id"], i["name"], i["nodes"], i["hires"]) for i in mine["instances"]] == [(iid, "bot", 1, 5)]
    assert mine["total"] == report["total"]
    # the account of someone with a grant on it is theirs, not the owner's; no one asks for another's
    assert (await stranger.get("/v1/account/usage"))["total"]["hires"] == 0
    with pytest.raises(ApiError) as e:
        await stranger.get("/v1/account/usage", query={"address": format_address(key(21).address)})
    assert e.value.status == 403
    # and no user writes usage: there is no such route
    r = await signed(vnode, key(21), "POST", "/v1/usage", {"instance_id": iid})
    assert r.status_code in (404, 405)

    figures = await scrape(vnode)
    assert figures["formation_hires"][("formation_hires_total", ())] == 5
    assert figures["formation_hire_tokens"][("formation_hire_tokens_total", (("direction", "out"),))] == 45
    assert figures["formation_usage_records_written"][("formation_usage_records_written_total", ())] == 1


async def test_metrics_are_scraped_and_parsed_per_node(tmp_path):
    async with running_node(tmp_path / "a", secret=b"\x31" * 32) as a, \
            running_node(tmp_path / "b", secret=b"\x32" * 32) as b:
        a.hires.record("x" * 32, 250, (5, 6))  # figures of node a only
        fa, fb = await scrape(a), await scrape(b)
        status = await a.status(full=False)
        info = fa["formation_node_info"]
        [(name, labels)] = info
        assert dict(labels) == {"version": status["version"], "address": status["address"],
                                "peer_id": status["peer_id"]}
        assert fa["formation_ops_applied"][("formation_ops_applied_total", ())] >= status["ops"] > 0
        assert fa["formation_ops_rejected"][("formation_ops_rejected_total", ())] == 0
        assert fa["formation_peers_connected"][("formation_peers_connected", ())] == 0
        assert fa["formation_fog_admitted"][("formation_fog_admitted", ())] == 1
        assert fa["formation_vms_enabled"][("formation_vms_enabled", ())] == 0
        assert {dict(lab)["result"] for _, lab in fa["formation_sync_sessions"]} == {"ok", "failed", "refused"}
        assert {dict(lab)["direction"] for _, lab in fa["formation_gossip_messages"]} == {"sent", "received"}
        assert fa["formation_dns_enabled"][("formation_dns_enabled", ())] == 0
        # each node its own figures: no registry shared between nodes of one process
        assert fa["formation_hires"][("formation_hires_total", ())] == 1
        assert fa["formation_hire_seconds"][("formation_hire_seconds_total", ())] == 0.25
        assert fb["formation_hires"][("formation_hires_total", ())] == 0
        assert not [m for m in REGISTRY.collect() if m.name.startswith("formation_")]
        # DNS queries, from the server's own counters
        a.dns_view = type("View", (), {"server": DnsServer()})()
        for _ in range(3):
            a.dns_view.server.respond(dns.message.make_query("web.fog.", "A").to_wire(), tcp=False)
        a.dns_view.server.respond(b"\x00", tcp=False)  # not a query: dropped
        fa = await scrape(a)
        assert fa["formation_dns_queries"][("formation_dns_queries_total", ())] == 4
        assert fa["formation_dns_dropped"][("formation_dns_dropped_total", (("reason", "malformed"),))] == 1
        # the first answer made from the zone, the next two from the cache
        assert sum(fa["formation_dns_responses"].values()) == 1
        assert fa["formation_dns_cache_hits"][("formation_dns_cache_hits_total", ())] == 2


async def test_metrics_count_builds_and_vms_by_state(vnode):
    alice = AsyncClient(vnode.base_url, key(24))
    resp = await signed(vnode, key(24), "POST", "/v1/pack/build", build_body(files={"app.txt": b"hi"}))
    assert (await wait_build(alice, resp.json()["build_id"]))["state"] == "done"
    failed = await signed(vnode, key(24), "POST", "/v1/pack/build",
                          build_body("NAME web\nRUN false\n"))
    assert (await wait_build(alice, failed.json()["build_id"]))["state"] == "failed"
    vnode.vms.scheduler.replicas.update({
        "i1": type("Rep", (), {"reported": {"state": "running"}})(),
        "i2": type("Rep", (), {"reported": {"state": "running"}})(),
        "i3": type("Rep", (), {"reported": {}})()})
    figures = await scrape(vnode)
    builds = {dict(lab)["state"]: v for (_, lab), v in figures["formation_builds"].items()}
    assert builds == {"queued": 0, "building": 0, "done": 1, "failed": 1}
    vms = {dict(lab)["state"]: v for (_, lab), v in figures["formation_vms"].items()}
    assert vms["running"] == 2 and vms["unreported"] == 1 and vms["failed"] == 0
    assert figures["formation_vms_enabled"][("formation_vms_enabled", ())] == 1
