"""Rent: hours of instance time of a priced model (docs/economy.md, "Rent"), on a real node (libp2p,
SQLite) whose scheduler runs on the in-memory VM backend (tests/fake_vms.py). An instance bound to
a model (its Formfile's MODEL) whose owner prices it per hour boots only once the instance's
owner's purse at the hosting node pays an hour in advance; each hour under way is paid before it
runs; when the purse cannot pay the next one the replica is stopped, its status saying why, and it
boots again once credits arrive. The model's owner runs its own model free."""

from __future__ import annotations

import time

from formation.crdt.keys import PrivateKey
from formation.crdt.kinds.credit_kinds import rent_key
from formation.node.charging import HOUR_MS
from tests.fake_vms import FakeVmHost
from tests.p2p.test_usage_metering import Clock, metered_node, until
from tests.support import User

BID = "img-" + "ef" * 30
KEY = PrivateKey(b"\x71" * 32)
TREASURY, CREATOR, OWNER = User(b"\x72" * 32), User(b"\x73" * 32), User(b"\x74" * 32)


def renting_node(root, host: FakeVmHost, clock: Clock):
    return metered_node(root, host, {}, clock, key=KEY, settings={"fog.treasury": TREASURY.address}, rent=True)


async def ask(rt, user: User, method: str, path: str, body: dict) -> str:
    m, b, s = user.request(method, path, body, ts=int(time.time()))
    return (await rt.submit_request(m, b, s)).key


async def grant(rt, amount: int) -> None:
    genesis = await rt.astore.get("fog", rt.fog_id)
    await ask(rt, TREASURY, "POST", "/v1/credits/grant", {"to": OWNER.address, "amount": amount, "at": rt.address,
                                                          "fog": {k: v for k, v in genesis.items()
                                                                  if k != "record_version"}})


async def test_an_instance_of_a_priced_model_runs_only_on_paid_hours(tmp_path):
    host = FakeVmHost(tmp_path / "vmhost")
    host.add_image(BID)
    clock = Clock()
    async with renting_node(tmp_path, host, clock) as rt:
        mid = await ask(rt, CREATOR, "POST", "/v1/models", {"name": "llm", "price_credits_per_hour": 4})
        formfile = f"NAME web\nMODEL required:{mid}\n"
        iid = await ask(rt, OWNER, "POST", "/v1/instance/create", {"name": "web", "build_id": BID, "replicas": 1,
                                                                   "formfile": formfile})
        assert (await rt.astore.get("instance", iid))["model_id"] == mid

        async def status() -> dict:
            return await rt.astore.get("instance_status", f"{iid}@{rt.address}") or {}

        async def waiting() -> bool:
            s = await status()
            return s.get("state") == "stopped" and "waiting for credits" in s.get("reason", "")

        # no credits: it does not boot, and says why
        await until("the replica to wait for credits", waiting)
        assert not host.driver.is_alive(iid)
        assert "4 credits an hour" in (await status())["reason"]

        await grant(rt, 10)  # two hours and 2 credits over
        await until("the replica to boot", lambda: _alive(host, iid))
        key = rent_key(OWNER.address, iid, rt.address)
        rent = await rt.astore.get("rent", key)
        assert (rent["hours"], rent["credits"], rent["creator"]) == (1, 4, CREATOR.address)
        assert rent["paid_until"] == clock.ms + HOUR_MS

        clock.ms += HOUR_MS  # the second hour: paid from the purse, the VM runs on
        await until("the second hour paid", lambda: _hours(rt, key, 2))
        assert host.driver.is_alive(iid)
        clock.ms += HOUR_MS  # a third: 2 credits left, not enough: stopped, saying why
        await until("the replica to stop for want of credits", waiting)
        await until("its VM to be down", lambda: _down(host, iid))
        figures = await rt.charger.balance(OWNER.address)
        assert (figures["spent"], figures["balance"]) == (8, 2)
        creator = await rt.charger.balance(CREATOR.address)
        operator = await rt.charger.balance(rt.address)
        assert (creator["earned"], operator["earned"]) == (8 - 8 * 20 // 100, 8 * 20 // 100)

        await grant(rt, 2)  # 4 now: the next hour is paid and it boots again
        await until("the replica to boot again", lambda: _alive(host, iid))
        assert (await rt.astore.get("rent", key))["hours"] == 3

        # the model's owner runs its own model free
        own = await ask(rt, CREATOR, "POST", "/v1/instance/create", {"name": "own", "build_id": BID, "replicas": 1,
                                                                      "formfile": formfile})
        await until("the owner's own instance to boot", lambda: _alive(host, own))
        assert await rt.astore.get("rent", rent_key(CREATOR.address, own, rt.address)) is None


async def _alive(host, iid) -> bool:
    return host.driver.is_alive(iid)


async def _down(host, iid) -> bool:
    return not host.driver.is_alive(iid)


async def _hours(rt, key, n) -> bool:
    rent = await rt.astore.get("rent", key)
    return rent is not None and rent["hours"] == n
