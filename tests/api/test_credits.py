"""Credits through a real in-process node over real HTTP (docs/economy.md): the fog's treasury
(named in its genesis) grants credits; a self-grant, a grant signed by another key and a grant
carrying an altered or another fog's genesis change no balance; a priced agent called through
the real hire proxy (a loopback replica, conftest.py's `vnode`) is refused with 402 until the
caller holds its price, then each answered call moves the price from the caller to the creator
and the node's operator by the genesis's split, in the node's `charge` record."""

from __future__ import annotations

import json

import httpx
import pytest

from formation.client import ApiError, AsyncClient, sign_headers
from formation.crdt.keys import PrivateKey, format_address
from formation.crdt.kinds.credit_kinds import charge_key
from formation.crdt.kinds.fog_kinds import fog_id_of
from tests.api.conftest import VM_IP, status_of, vm_node
from tests.api.test_usage import token_agent
from tests.api.test_workloads import exposing, signed

BUILD = "d" * 64


def key(n: int) -> PrivateKey:
    return PrivateKey(bytes([n]) * 32)


TREASURY = key(40)
TREASURY_ADDRESS = format_address(TREASURY.address)


@pytest.fixture
async def tnode(tmp_path):
    async with vm_node(tmp_path, settings={"fog.treasury": TREASURY_ADDRESS, "fog.operator_share_percent": 20}) as rt:
        yield rt


async def credits(client: AsyncClient) -> dict:
    return await client.get("/v1/account/credits")


async def test_grants_prices_and_402_over_http(tnode):
    creator, consumer, treasury = (AsyncClient(tnode.base_url, k) for k in (key(41), key(42), TREASURY))
    c_addr, u_addr = format_address(key(41).address), format_address(key(42).address)
    fog = await consumer.get("/v1/fog")
    assert fog["treasury"] == TREASURY_ADDRESS and fog["operator_share_percent"] == 20
    assert fog_id_of(fog) == fog["fog_id"] == tnode.fog_id
    await consumer.post("/v1/account/create", {"name": "consumer"})
    mine = await credits(consumer)
    # a fog with a treasury: accounts start with 0 (credits enter only by grants)
    assert (mine["start"], mine["balance"], mine["treasury"]) == (0, 0, TREASURY_ADDRESS)
    assert (await consumer.get(f"/v1/account/{u_addr}/get"))["credits"] == 0

    # forged grants, as real signed HTTP requests: refused, nothing changes
    for who, body, code in (
            (consumer, {"to": u_addr, "amount": 1000, "at": tnode.address, "fog": fog}, "unauthorized"),  # a self-grant
            (creator, {"to": u_addr, "amount": 1000, "at": tnode.address, "fog": fog}, "unauthorized"),  # another key
            # the genesis with the consumer as treasury, under the fog's id: does not hash to it
            (consumer, {"to": u_addr, "amount": 1000, "at": tnode.address, "fog": {**fog, "treasury": u_addr}}, "bad_field"),
            (treasury, {"to": u_addr, "amount": 0, "at": tnode.address, "fog": fog}, "bad_field"),
            (treasury, {"to": u_addr, "amount": 10**12 + 1, "at": tnode.address, "fog": fog}, "bad_field"),
            (treasury, {"to": u_addr, "amount": 1.5, "at": tnode.address, "fog": fog}, "bad_field"),
            (treasury, {"to": "me", "amount": 5, "at": tnode.address, "fog": fog}, "bad_field"),
            (treasury, {"to": u_addr, "amount": 5, "fog": fog}, "bad_field"),  # held nowhere
            (treasury, {"to": u_addr, "amount": 5, "at": "0x" + "ab" * 20, "fog": fog}, "not_a_member"),
            (treasury, {"to": u_addr, "amount": 5}, "bad_field"),
            (treasury, {"to": u_addr, "amount": 5, "fog": fog, "treasury": u_addr}, "unauthorized")):
        with pytest.raises(ApiError) as e:
            await who.post("/v1/credits/grant", body)
        assert e.value.error == code, (body, e.value)
    # a genesis of a fog of the consumer's own making (it hashes, names the consumer treasury):
    # valid as a record, but a grant of another fog, which counts in no balance here
    own = {**fog, "treasury": u_addr, "name": "mine"}
    own["fog_id"] = fog_id_of(own)
    await consumer.post("/v1/credits/grant", {"to": u_addr, "amount": 1000, "at": tnode.address, "fog": own})
    assert (await credits(consumer))["balance"] == 0

    async with token_agent() as port:
        aid = (await creator.post("/v1/agents", {"name": "paid", "build_id": BUILD, "port": port, "path": "/",
                                                 "price_credits_per_call": 5}))["id"]
        iid = (await creator.post("/v1/instance/create", {"name": "paid", "build_id": BUILD,
                                                          "formfile": exposing(port)}))["id"]
        await status_of(tnode, tnode.key, iid, "running", VM_IP)
        # no credits: 402 with the balance, the price and what to do
        r = await signed(tnode, key(42), "POST", f"/v1/agents/{aid}/hire", {"x": 1})
        assert r.status_code == 402, r.text
        answer = r.json()
        assert answer["error"] == "insufficient_credits" and (answer["balance"], answer["price"]) == (0, 5)
        assert "form account credits" in answer["detail"] and "treasury" in answer["detail"]
        r = await signed(tnode, key(42), "POST", f"/v1/agents/{aid}/run_task", {"x": 1})
        assert r.status_code == 402

        grant = await treasury.post("/v1/credits/grant", {"to": u_addr, "amount": 12, "memo": "welcome", "at": tnode.address, "fog": fog})
        mine = await credits(consumer)
        assert (mine["granted"], mine["balance"]) == (12, 12)
        assert [(g["grant_id"], g["amount"], g["memo"]) for g in mine["grants"]] == [(grant["id"], 12, "welcome")]
        assert (await consumer.get(f"/v1/account/{u_addr}/get"))["credits"] == 12

        # a priced call's signature pays once, at the node it names: the same signed request again
        # is refused, unpaid; so is one that names no node, or another
        raw = json.dumps({"x": 1}).encode()

        async def raw_call(path: str) -> tuple[httpx.Response, httpx.Response]:
            headers = {**sign_headers(key(42), "POST", path, raw), "Content-Type": "application/json"}
            async with httpx.AsyncClient(base_url=tnode.base_url) as http:
                return (await http.post(path, content=raw, headers=headers),
                        await http.post(path, content=raw, headers=headers))

        for node in ("", "?node=0x" + "ab" * 20):
            refused, _ = await raw_call(f"/v1/agents/{aid}/hire{node}")
            assert refused.status_code == 401 and refused.json()["error"] == "node_not_named", refused.text
            assert "?node=" + tnode.address in refused.json()["detail"]
        assert (await credits(consumer))["balance"] == 12
        first, again = await raw_call(f"/v1/agents/{aid}/hire?node={tnode.address}")
        assert first.status_code == 200 and first.json() == {"ok": True}, first.text
        assert again.status_code == 401 and again.json()["error"] == "replay", again.text
        assert await consumer.post(f"/v1/agents/{aid}/run_task", {"x": 2}) == {"ok": True}
        r = await signed(tnode, key(42), "POST", f"/v1/agents/{aid}/hire", {"x": 3})
        assert r.status_code == 402 and (r.json()["balance"], r.json()["price"]) == (2, 5)
        # its creator calls its own agent free
        assert await creator.post(f"/v1/agents/{aid}/hire", {"x": 4}) == {"ok": True}

    charge = await tnode.astore.get("charge", charge_key(u_addr, aid, tnode.address, tnode.address))
    assert (charge["calls"], charge["credits"], charge["creator"]) == (2, 10, c_addr)
    mine = await credits(consumer)
    assert (mine["spent"], mine["calls"], mine["balance"]) == (10, 2, 2)
    made = await credits(creator)
    assert (made["earned"], made["balance"]) == (8, 8)  # 10 less the operator's 20 %
    operator = await AsyncClient(tnode.base_url, tnode.key).get("/v1/account/credits")
    assert (operator["earned"], operator["balance"]) == (2, 2)
    # credits are shown to their own account only; charges and grants are not shown raw
    with pytest.raises(ApiError) as e:
        await creator.get("/v1/account/credits", query={"address": u_addr})
    assert e.value.status == 403
    with pytest.raises(ApiError) as e:
        await consumer.get(f"/v1/records/charge/{charge_key(u_addr, aid, tnode.address, tnode.address)}")
    assert e.value.status in (403, 404)


async def test_a_fog_without_treasury_keeps_100_and_refuses_every_grant(vnode):
    alice = AsyncClient(vnode.base_url, key(43))
    a_addr = format_address(key(43).address)
    await alice.post("/v1/account/create", {})
    fog = await alice.get("/v1/fog")
    assert fog.get("treasury") is None
    assert (await credits(alice))["balance"] == 100
    with pytest.raises(ApiError) as e:
        await alice.post("/v1/credits/grant", {"to": a_addr, "amount": 5, "at": vnode.address, "fog": fog})
    assert e.value.error == "unauthorized" and "no treasury" in e.value.detail
    assert (await credits(alice))["balance"] == 100


async def test_credits_move_as_priced_and_every_node_agrees(tmp_path):
    """Two in-process nodes over real libp2p: the second joins with an invite; calls admitted and
    charged by the first; both compute the same figures for every account from the records."""
    import trio

    from tests.api.conftest import running_node

    async with vm_node(tmp_path / "a", settings={"fog.treasury": TREASURY_ADDRESS,
                                                 "fog.operator_share_percent": 30}) as a:
        token = await a.create_invite(expires_s=600)
        async with running_node(tmp_path / "b", secret=b"\x0b" * 32, bootstrap=a.p2p.addrs(),
                                settings={"fog.invite": token.encode()}) as b:
            creator, consumer, treasury = (AsyncClient(a.base_url, k) for k in (key(51), key(52), TREASURY))
            fog = await treasury.get("/v1/fog")
            u_addr, c_addr = format_address(key(52).address), format_address(key(51).address)
            await treasury.post("/v1/credits/grant", {"to": u_addr, "amount": 100, "at": a.address, "fog": fog})
            async with token_agent() as port:
                aid = (await creator.post("/v1/agents", {"name": "paid", "build_id": BUILD, "port": port,
                                                         "path": "/", "price_credits_per_call": 7}))["id"]
                iid = (await creator.post("/v1/instance/create", {"name": "paid", "build_id": BUILD,
                                                                  "formfile": exposing(port)}))["id"]
                await status_of(a, a.key, iid, "running", VM_IP)
                for n in range(3):
                    assert await consumer.post(f"/v1/agents/{aid}/hire", {"n": n}) == {"ok": True}
            who = {"consumer": u_addr, "creator": c_addr, "operator": a.address, "b": b.address}

            async def figures(node) -> dict:
                out = {}
                for name, addr in who.items():
                    f = await node.charger.balance(addr)
                    out[name] = (f["granted"], f["earned"], f["spent"], f["balance"])
                return out

            with trio.fail_after(30):
                while not (b.admitted and await figures(b) == await figures(a)):
                    await trio.sleep(0.1)
            got = await figures(a)
            share = 21 * 30 // 100
            expected = {"consumer": (100, 0, 21, 79), "creator": (0, 21 - share, 0, 21 - share),
                        "operator": (0, share, 0, share), "b": (0, 0, 0, 0)}
            assert got == expected == await figures(b)
            assert sum(v[3] for v in got.values()) == 100  # credits moved, none made or lost


async def test_two_nodes_cut_off_from_each_other_never_spend_more_than_the_consumer_holds(tmp_path):
    """The partition property (docs/economy.md): the consumer's 100 credits are held 60 at A and
    40 at B (a grant at A, a move A -> B that A carried out). A and B are cut off from each other
    (real libp2p, both blocking); during the cut the consumer calls a priced agent through both
    at once, several calls in flight on each, and asks B for a move A could make (A never hears of
    it). Each node admits only what its own purse covers: 6 + 4 calls of 10, then 402; after the
    heal both nodes agree, nothing is negative, and what was spent is exactly what was held."""
    import trio

    settings = {"fog.treasury": TREASURY_ADDRESS, "fog.operator_share_percent": 20}
    async with vm_node(tmp_path / "a", settings=settings) as a:
        token = await a.create_invite(expires_s=600)
        async with vm_node(tmp_path / "b", secret=b"\x0b" * 32, bootstrap=a.p2p.addrs(),
                           settings={**settings, "fog.invite": token.encode()}) as b:
            with trio.fail_after(30):
                while not b.admitted:
                    await trio.sleep(0.1)
            creator, treasury = AsyncClient(a.base_url, key(61)), AsyncClient(a.base_url, TREASURY)
            via = {"a": AsyncClient(a.base_url, key(62)), "b": AsyncClient(b.base_url, key(62))}
            u_addr, c_addr = format_address(key(62).address), format_address(key(61).address)
            fog = await treasury.get("/v1/fog")
            await treasury.post("/v1/credits/grant", {"to": u_addr, "amount": 100, "at": a.address, "fog": fog})
            # a move naming a node that is not in the fog is refused where it is asked
            with pytest.raises(ApiError) as e:
                await via["b"].post("/v1/credits/move", {"from_node": a.address, "to_node": "0x" + "cd" * 20,
                                                         "amount": 5})
            assert e.value.error == "not_a_member"
            await via["b"].post("/v1/credits/move", {"from_node": a.address, "to_node": b.address, "amount": 40})

            async def purses(node) -> dict[str, int]:
                return {p["node"]: p["held"] for p in (await node.charger.balance(u_addr))["purses"]}

            with trio.fail_after(30):
                while not await purses(a) == await purses(b) == {a.address: 60, b.address: 40}:
                    await trio.sleep(0.1)

            async with token_agent() as port:
                aid = (await creator.post("/v1/agents", {"name": "paid", "build_id": BUILD, "port": port,
                                                         "path": "/", "price_credits_per_call": 10}))["id"]
                iid = (await creator.post("/v1/instance/create", {"name": "paid", "build_id": BUILD,
                                                                  "formfile": exposing(port)}))["id"]
                with trio.fail_after(30):  # both nodes know the agent and the instance
                    while await b.astore.get("instance", iid) is None or await b.astore.get("agent", aid) is None:
                        await trio.sleep(0.1)
                for n in (a, b):  # a replica on each node (each reports its own)
                    await status_of(n, n.key, iid, "running", VM_IP)

                await a.p2p.block(b.p2p.peer_id)
                await b.p2p.block(a.p2p.peer_id)
                with trio.fail_after(15):
                    while b.p2p.peer_id in a.p2p.connected() or a.p2p.peer_id in b.p2p.connected():
                        await trio.sleep(0.1)
                # B is asked to move 60 more to itself: only A could, and A does not hear of it
                await via["b"].post("/v1/credits/move", {"from_node": a.address, "to_node": b.address, "amount": 60})

                answered = {"a": 0, "b": 0}
                refused = {"a": 0, "b": 0}

                async def caller(name: str, calls: int) -> None:
                    for n in range(calls):
                        r = await signed(a if name == "a" else b, key(62), "POST", f"/v1/agents/{aid}/hire",
                                         {"n": n})
                        if r.status_code == 200:
                            answered[name] += 1
                        else:
                            assert r.status_code == 402 and r.json()["error"] == "insufficient_credits", r.text
                            refused[name] += 1

                async with trio.open_nursery() as nursery:  # 3 callers on each node at once, 4 calls each
                    for name in ("a", "b"):
                        for _ in range(3):
                            nursery.start_soon(caller, name, 4)
                assert answered == {"a": 6, "b": 4} and refused == {"a": 6, "b": 8}
                assert await purses(a) == {a.address: 0, b.address: 40}  # A sees its own spending only
                assert await purses(b) == {a.address: 60, b.address: 0}

                a.p2p.unblock(b.p2p.peer_id)
                b.p2p.unblock(a.p2p.peer_id)
                who = {"consumer": u_addr, "creator": c_addr, "a": a.address, "b": b.address}

                async def figures(node) -> dict:
                    return {name: (await node.charger.balance(addr))["balance"] for name, addr in who.items()}

                with trio.fail_after(60):
                    while await figures(a) != await figures(b) or await purses(a) != await purses(b):
                        await trio.sleep(0.2)
                # the move asked during the cut finds A's purse empty: nothing moves
                await a.charger.carry_out_moves()
                assert await purses(a) == {a.address: 0, b.address: 0}
                assert await figures(a) == {"consumer": 0, "creator": 80, "a": 12, "b": 8}
                assert await figures(b) == await figures(a)


async def test_token_prices_hold_the_most_and_charge_what_the_agent_reported(tnode):
    """An agent priced per call and per 1,000 tokens: a call holds its most (max_billed_tokens
    billed) when admitted and costs what the agent reported in X-Formation-Tokens, never more
    than it held; the owner's agent report shows the calls as charged, to its owner only."""
    creator, consumer, treasury = (AsyncClient(tnode.base_url, k) for k in (key(71), key(72), TREASURY))
    u_addr = format_address(key(72).address)
    fog = await treasury.get("/v1/fog")
    await treasury.post("/v1/credits/grant", {"to": u_addr, "amount": 10, "at": tnode.address, "fog": fog})
    async with token_agent() as port:
        aid = (await creator.post("/v1/agents", {
            "name": "tok", "build_id": BUILD, "port": port, "path": "/", "price_credits_per_call": 1,
            "price_credits_per_1k_tokens": 2, "max_billed_tokens": 1000}))["id"]
        iid = (await creator.post("/v1/instance/create", {"name": "tok", "build_id": BUILD,
                                                          "formfile": exposing(port)}))["id"]
        await status_of(tnode, tnode.key, iid, "running", VM_IP)
        for body, balance in (({"tokens": "in=400,out=200"}, 7),  # 1 + ceil(600 x 2 / 1000)
                              ({"tokens": "in=5000"}, 4),  # billed up to 1,000 tokens: 1 + 2
                              ({}, 3),  # no report: the call's price alone
                              ({"tokens": "in=1"}, 1)):  # holds 3 of the 3 left, costs 2
            assert await consumer.post(f"/v1/agents/{aid}/hire", body) == {"ok": True}
            assert (await credits(consumer))["balance"] == balance
        r = await signed(tnode, key(72), "POST", f"/v1/agents/{aid}/hire", {})
        assert r.status_code == 402 and (r.json()["available"], r.json()["price"]) == (1, 3), r.text
    report = await creator.get(f"/v1/agents/{aid}/usage")
    assert report["charged"]["calls"] == 4 and report["charged"]["credits"] == 9
    assert (report["charged"]["tokens_in"], report["charged"]["tokens_out"]) == (5401, 200)
    assert report["charged"]["consumers"] == 1
    assert [(n["node"], n["host"], n["calls"]) for n in report["charged"]["nodes"]] == [
        (tnode.address, tnode.address, 4)]
    assert [i["instance_id"] for i in report["instances"]] == [iid]
    with pytest.raises(ApiError) as e:
        await consumer.get(f"/v1/agents/{aid}/usage")
    assert e.value.status == 403


async def test_plans_are_bought_through_a_node_and_used_there(tnode):
    """A plan (a tier of calls for a price) bought through a node: its price leaves the
    consumer's purse there, its calls are admitted there without credits until they run out,
    then the per-call price applies; an agent with plans and no price is sold by plan only; a
    replayed subscribe request buys nothing twice."""
    creator, consumer, treasury = (AsyncClient(tnode.base_url, k) for k in (key(81), key(82), TREASURY))
    u_addr, c_addr = format_address(key(82).address), format_address(key(81).address)
    fog = await treasury.get("/v1/fog")
    await treasury.post("/v1/credits/grant", {"to": u_addr, "amount": 20, "at": tnode.address, "fog": fog})
    async with token_agent() as port:
        plans = {"basic": {"price_credits": 6, "calls": 2, "days": 30}}
        aid = (await creator.post("/v1/agents", {"name": "planned", "build_id": BUILD, "port": port, "path": "/",
                                                 "price_credits_per_call": 5, "plans": plans}))["id"]
        only = (await creator.post("/v1/agents", {"name": "plan-only", "build_id": BUILD, "port": port,
                                                  "path": "/", "plans": plans}))["id"]
        iid = (await creator.post("/v1/instance/create", {"name": "planned", "build_id": BUILD,
                                                          "formfile": exposing(port)}))["id"]
        await status_of(tnode, tnode.key, iid, "running", VM_IP)
        # sold by plan only: no plan, no call (402 naming the plans)
        r = await signed(tnode, key(82), "POST", f"/v1/agents/{only}/hire", {})
        assert r.status_code == 402 and r.json()["error"] == "plan_required", r.text
        assert "basic: 2 calls in 30 days for 6 credits" in r.json()["detail"]
        for body, code in (({"plan": "gold"}, "no_such_plan"), ({"plan": 1}, "bad_request"),
                           ({"plan": "basic", "x": 1}, "bad_request")):
            with pytest.raises(ApiError) as e:
                await consumer.post(f"/v1/agents/{aid}/subscribe", body)
            assert e.value.error == code
        with pytest.raises(ApiError) as e:
            await creator.post(f"/v1/agents/{aid}/subscribe", {"plan": "basic"})
        assert e.value.status == 409

        sub = await consumer.post(f"/v1/agents/{aid}/subscribe", {"plan": "basic"})
        assert (sub["calls_left"], sub["credits"], sub["node"]) == (2, 6, tnode.address)
        # the same signed request again: refused (one use), nothing bought twice
        raw = json.dumps({"plan": "basic"}).encode()
        path = f"/v1/agents/{aid}/subscribe?node={tnode.address}"
        headers = {**sign_headers(key(82), "POST", path, raw), "Content-Type": "application/json"}
        async with httpx.AsyncClient(base_url=tnode.base_url) as http:
            first = await http.post(path, content=raw, headers=headers)
            again = await http.post(path, content=raw, headers=headers)
        assert first.status_code == 200, first.text
        assert again.status_code == 401 and again.json()["error"] == "replay", again.text
        mine = await credits(consumer)
        assert mine["balance"] == 20 - 12
        assert [(s["agent_id"], s["plan"], s["calls_left"]) for s in mine["subscriptions"]] == [(aid, "basic", 4)]

        for _ in range(4):  # the plan's calls: no credits
            assert await consumer.post(f"/v1/agents/{aid}/hire", {}) == {"ok": True}
        assert (await credits(consumer))["balance"] == 8
        assert await consumer.post(f"/v1/agents/{aid}/hire", {}) == {"ok": True}  # the price again
        assert (await credits(consumer))["balance"] == 3
        r = await signed(tnode, key(82), "POST", f"/v1/agents/{aid}/hire", {})
        assert r.status_code == 402 and "basic: 2 calls" in r.json()["detail"]
    made = await credits(creator)
    operator = await AsyncClient(tnode.base_url, tnode.key).get("/v1/account/credits")
    # 12 for plans + 5 for a call = 17: the creator 80 % of each (floored), the operator the rest
    assert made["earned"] + operator["earned"] == 17 and operator["earned"] == 12 * 20 // 100 + 5 * 20 // 100
    assert c_addr == made["address"]
