"""The economy through the real CLI against a real in-process node (docs/economy.md): three
wallets (the treasury, a creator, a consumer) in their own config dirs; `form account grant`,
`form agent price`, `form agent plan`, `form agent subscribe`, `form agent hire`, `form account
credits` (table and --json), `form agent usage`, and the CLI's own refusals (a wallet that is not
the treasury, bad amounts) before anything is sent."""

from __future__ import annotations

import json

from formation.client import AsyncClient
from formation.keystore import load_keystore
from tests.api.conftest import VM_IP, status_of, vm_node
from tests.api.test_usage import token_agent
from tests.api.test_workloads import exposing
from tests.unit.test_client_cli import PASSWORD
from tests.unit.test_pack_cli import cfg, form  # noqa: F401 (fixtures: a wallet and the `form` runner)

BUILD = "e" * 64


async def test_grant_price_plan_subscribe_and_hire_through_the_cli(form, cfg, tmp_path):  # noqa: F811
    dirs = {who: str(tmp_path / who) for who in ("treasury", "creator", "consumer")}
    addr = {}
    for who, d in dirs.items():
        addr[who] = (await form.json("kit", "init", "--config-dir", d, "--node", "http://127.0.0.1:9"))["address"]
    async with vm_node(tmp_path / "n", settings={"fog.treasury": addr["treasury"].lower()}) as rt:
        def as_(who: str, *argv: str) -> list[str]:
            return [*argv, "--config-dir", dirs[who], "--node", rt.base_url]

        # the CLI's own checks: nothing is sent
        _, _, err = await form(*as_("creator", "account", "grant", addr["consumer"], "5"), code=1)
        assert "grants are signed by the fog's treasury" in err
        _, _, err = await form(*as_("treasury", "account", "grant", addr["consumer"], "0"), code=2)
        assert "AMOUNT must be a whole number" in err

        _, out, _ = await form(*as_("treasury", "account", "grant", addr["consumer"], "30", "--memo", "hi"))
        assert "granted 30 credits" in out and rt.address in out
        async with token_agent() as port:
            spec = tmp_path / "agent.toml"
            spec.write_text(f'name = "paid"\nbuild_id = "{BUILD}"\nport = {port}\npath = "/"\n')
            aid = (await form.json(*as_("creator", "agent", "register", str(spec))))["id"]
            # its replica: an instance made with the creator's wallet key through the API
            creator_key = load_keystore(tmp_path / "creator" / "wallet.json", PASSWORD)
            iid = (await AsyncClient(rt.base_url, creator_key).post(
                "/v1/instance/create", {"name": "paid", "build_id": BUILD, "formfile": exposing(port)}))["id"]
            await status_of(rt, rt.key, iid, "running", VM_IP)

            _, out, _ = await form(*as_("creator", "agent", "price", aid, "4", "--per-1k-tokens", "2"))
            assert "costs 4 credits a call + 2 per 1,000 tokens" in out
            _, out, _ = await form(*as_("creator", "agent", "plan", aid, "basic", "--price", "10", "--calls", "5",
                                        "--days", "7"))
            assert "sells plan basic: 5 calls in 7 days for 10 credits" in out
            _, _, err = await form(*as_("creator", "agent", "plan", aid, "gold"), code=2)
            assert "--price" in err
            _, out, _ = await form(*as_("consumer", "agent", "subscribe", aid, "basic"))
            assert "calls left" in out and "5" in out
            for n in range(7):  # 5 by the plan, then 2 at the price (4 + 0 tokens)
                _, out, _ = await form(*as_("consumer", "agent", "hire", aid, "--data", json.dumps({"n": n})))
                assert json.loads(out) == {"ok": True}
        doc = await form.json(*as_("consumer", "account", "credits"))
        assert (doc["granted"], doc["spent"], doc["balance"]) == (30, 18, 12)
        assert [(s["plan"], s["calls_left"]) for s in doc["subscriptions"]] == [("basic", 0)]
        _, out, _ = await form(*as_("consumer", "account", "credits"))
        assert "HELD AT NODE" in out and rt.address in out and "hi" in out
        usage = await form.json(*as_("creator", "agent", "usage", aid))
        assert (usage["charged"]["calls"], usage["charged"]["credits"]) == (2, 8)
        _, out, err = await form(*as_("creator", "agent", "usage", aid))
        assert "CHARGED BY" in out and "1 consumer(s)" in err
