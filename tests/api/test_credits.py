"""Credits through a real in-process node over real HTTP (docs/economy.md): the fog's treasury
(named in its genesis) grants credits; a self-grant, a grant signed by another key and a grant
carrying an altered or another fog's genesis change no balance; a priced agent called through
the real hire proxy (a loopback replica, conftest.py's `vnode`) is refused with 402 until the
caller holds its price, then each answered call moves the price from the caller to the creator
and the node's operator by the genesis's split, in the node's `charge` record."""

from __future__ import annotations

import pytest

from formation.client import ApiError, AsyncClient
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
            (consumer, {"to": u_addr, "amount": 1000, "fog": fog}, "unauthorized"),  # a self-grant
            (creator, {"to": u_addr, "amount": 1000, "fog": fog}, "unauthorized"),  # another key
            # the genesis with the consumer as treasury, under the fog's id: does not hash to it
            (consumer, {"to": u_addr, "amount": 1000, "fog": {**fog, "treasury": u_addr}}, "bad_field"),
            (treasury, {"to": u_addr, "amount": 0, "fog": fog}, "bad_field"),
            (treasury, {"to": u_addr, "amount": 10**12 + 1, "fog": fog}, "bad_field"),
            (treasury, {"to": u_addr, "amount": 1.5, "fog": fog}, "bad_field"),
            (treasury, {"to": "me", "amount": 5, "fog": fog}, "bad_field"),
            (treasury, {"to": u_addr, "amount": 5}, "bad_field"),
            (treasury, {"to": u_addr, "amount": 5, "fog": fog, "treasury": u_addr}, "unauthorized")):
        with pytest.raises(ApiError) as e:
            await who.post("/v1/credits/grant", body)
        assert e.value.error == code, (body, e.value)
    # a genesis of a fog of the consumer's own making (it hashes, names the consumer treasury):
    # valid as a record, but a grant of another fog, which counts in no balance here
    own = {**fog, "treasury": u_addr, "name": "mine"}
    own["fog_id"] = fog_id_of(own)
    await consumer.post("/v1/credits/grant", {"to": u_addr, "amount": 1000, "fog": own})
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

        grant = await treasury.post("/v1/credits/grant", {"to": u_addr, "amount": 12, "memo": "welcome", "fog": fog})
        mine = await credits(consumer)
        assert (mine["granted"], mine["balance"]) == (12, 12)
        assert [(g["grant_id"], g["amount"], g["memo"]) for g in mine["grants"]] == [(grant["id"], 12, "welcome")]
        assert (await consumer.get(f"/v1/account/{u_addr}/get"))["credits"] == 12

        assert await consumer.post(f"/v1/agents/{aid}/hire", {"x": 1}) == {"ok": True}
        assert await consumer.post(f"/v1/agents/{aid}/run_task", {"x": 2}) == {"ok": True}
        r = await signed(tnode, key(42), "POST", f"/v1/agents/{aid}/hire", {"x": 3})
        assert r.status_code == 402 and (r.json()["balance"], r.json()["price"]) == (2, 5)
        # its creator calls its own agent free
        assert await creator.post(f"/v1/agents/{aid}/hire", {"x": 4}) == {"ok": True}

    charge = await tnode.astore.get("charge", charge_key(u_addr, aid, tnode.address))
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
        await consumer.get(f"/v1/records/charge/{charge_key(u_addr, aid, tnode.address)}")
    assert e.value.status in (403, 404)


async def test_a_fog_without_treasury_keeps_100_and_refuses_every_grant(vnode):
    alice = AsyncClient(vnode.base_url, key(43))
    a_addr = format_address(key(43).address)
    await alice.post("/v1/account/create", {})
    fog = await alice.get("/v1/fog")
    assert fog.get("treasury") is None
    assert (await credits(alice))["balance"] == 100
    with pytest.raises(ApiError) as e:
        await alice.post("/v1/credits/grant", {"to": a_addr, "amount": 5, "fog": fog})
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
            await treasury.post("/v1/credits/grant", {"to": u_addr, "amount": 100, "fog": fog})
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
