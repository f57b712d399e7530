"""`form account usage` and `form manage usage ID` against a real node: tables people read (one row
per instance or measuring node, then the total) and --json (the node's answer)."""

from __future__ import annotations

from formation.cli.usage import duration, hours
from formation.client import AsyncClient
from formation.crdt.kinds.usage_kinds import COUNTERS
from formation.keystore import load_keystore
from tests.api.conftest import running_node
from tests.unit.test_client_cli import PASSWORD, cfg, form, rows  # noqa: F401 - fixtures

USAGE = {"cpu_seconds": 3725, "memory_mb_seconds": 1024 * 7200, "disk_gb_seconds": 5 * 7200,
         "net_rx_bytes": 3 * 1024 * 1024, "net_tx_bytes": 2048, "hires": 7, "hire_ms": 2500,
         "tokens_in": 120, "tokens_out": 480}


def test_figures_read_as_people_read_them():
    assert [duration(s) for s in (0, 0.25, 12, 185, 7260, 2 * 86400 + 3 * 3600)] == \
        ["0s", "0.25s", "12s", "3m05s", "2h01m", "2d03h"]
    assert [hours(x) for x in (0, 36, 7200, 3600 * 250)] == ["0", "0.01", "2.00", "250"]
    assert hours(1024 * 7200, 1024) == "2.00"


async def test_usage_commands_against_a_node(form, cfg, tmp_path):  # noqa: F811 - fixtures
    async with running_node(tmp_path / "node") as rt:
        await form("kit", "init", "--node", rt.base_url)
        me = AsyncClient(rt.base_url, load_keystore(cfg / "wallet.json", PASSWORD))
        iid = (await me.post("/v1/instance/create", {"name": "web", "build_id": "b" * 64}))["id"]
        idle = (await me.post("/v1/instance/create", {"name": "idle", "build_id": "b" * 64}))["id"]

        _, out, _ = await form("manage", "usage", iid)
        assert out.startswith(f"no usage of instance {iid} recorded yet")
        # the node's own record of what it measured (as its meter writes it)
        owner = (await me.get(f"/v1/instance/{iid}/get"))["owner"]
        await rt.write("usage", f"{iid}@{rt.address}", {"instance_id": iid, "node": rt.address, "owner": owner,
                                                        **USAGE, "started_at": 1_700_000_000_000,
                                                        "updated_at": 1_700_000_360_000})

        doc = await form.json("manage", "usage", iid)
        assert doc["instance_id"] == iid and [n["node"] for n in doc["nodes"]] == [rt.address]
        assert doc["total"] == USAGE
        _, out, _ = await form("manage", "usage", iid)
        lines = out.splitlines()
        assert lines[0].split() == ["NODE", "CPU", "MEM-GB-H", "DISK-GB-H", "NET-IN", "NET-OUT", "HIRES", "HIRE-TIME",
                                    "TOKENS-IN/OUT", "UPDATED"]
        assert lines[1].split()[:10] == [rt.address, "1h02m", "2.00", "10.00", "3", "MiB", "2.0", "KiB", "7", "2.5s"]
        assert "120/480" in lines[1] and "2023-11-14 22:19 UTC" in lines[1]
        assert lines[2].split()[0] == "total" and "120/480" in lines[2]

        doc = await form.json("account", "usage")
        assert doc["count"] == 2 and doc["total"] == USAGE
        by_id = {i["instance_id"]: i for i in doc["instances"]}
        assert {c: by_id[iid][c] for c in COUNTERS} == USAGE and by_id[idle]["hires"] == 0
        _, out, _ = await form("account", "usage")
        table = rows(out)
        assert table[0][:4] == ["INSTANCE", "NAME", "NODES", "CPU"]
        assert {r[0] for r in table[1:]} == {iid, idle, "total"}
        web = next(r for r in table if r[0] == iid)
        assert web[1:5] == ["web", "1", "1h02m", "2.00"]
        assert table[-1][:3] == ["total", "1h02m", "2.00"]

        # someone else's instance: the node's refusal, exit 1
        other_cfg = str(tmp_path / "cfg2")
        await form("kit", "init", "--node", rt.base_url, "--config-dir", other_cfg)
        _, _, err = await form("manage", "usage", iid, "--config-dir", other_cfg, code=1)
        assert "forbidden" in err and "HTTP 403" in err
        _, out, _ = await form("account", "usage", "--config-dir", other_cfg)
        assert out.startswith("account ") and "owns no instances" in out
