"""`form secrets set|list|unset` against a real node's API: the CLI seals each value to the
node the instance is placed on, the node can open it, and the request carries no value."""

from __future__ import annotations

import argparse

import trio

from formation.cli.session import context
from formation.node.secrets import Keeper
from tests.api.conftest import vm_node
from tests.unit.test_client_cli import cfg, form, rows  # noqa: F401 - fixtures

VALUE = "sk-live-51b0c6a9e7"


async def test_set_list_unset_a_secret_through_the_cli(form, cfg, tmp_path):  # noqa: F811
    async with vm_node(tmp_path) as rt:
        await rt.register()  # its record says it runs VMs now (the fake VM side): it is placed
        await form("kit", "init", "--node", rt.base_url)
        # an instance to hold the secrets, created with the wallet the CLI uses
        ctx = context(argparse.Namespace(json=True, node=rt.base_url, config_dir=str(cfg), wallet=None))
        made = await trio.to_thread.run_sync(lambda: ctx.call("POST", "/v1/instance/create", {"name": "web"}))
        iid = made["id"]

        _, out, _ = await form("secrets", "set", iid, f"API_KEY={VALUE}", "MODE=fast")
        assert "API_KEY, MODE" in out and "sealed to 1 node" in out
        inst = await rt.astore.get("instance", iid)
        assert set(inst["secrets"]) == {"API_KEY", "MODE"} and inst["generation"] == 1
        opened = await Keeper(rt, rt.key.secret).open_all(inst)
        assert opened["API_KEY"].value == VALUE.encode() and opened["MODE"].value == b"fast"
        listed = await form.json("secrets", "list", iid)
        assert [(s["name"], s["sealed_to"]) for s in listed["secrets"]] == [
            ("API_KEY", [rt.address]), ("MODE", [rt.address])]
        _, out, _ = await form("secrets", "list", iid)
        assert rows(out)[0][:2] == ["NAME", "COMMIT"]

        await form("secrets", "unset", iid, "MODE")
        assert set((await rt.astore.get("instance", iid))["secrets"]) == {"API_KEY"}
        # bad input: exit 2 before anything is sent; an unknown name: the node's refusal, exit 1
        _, _, err = await form("secrets", "set", iid, "1BAD=x", code=2)
        assert "not a secret name" in err
        _, _, err = await form("secrets", "set", iid, "NOEQUALS", code=2)
        assert "NAME=VALUE" in err
        _, _, err = await form("secrets", "unset", iid, "NOPE", code=1)
        assert "has no secret 'NOPE'" in err
        state = b"".join(p.read_bytes() for p in (tmp_path / "node").glob("state.db*"))
        assert VALUE.encode() not in state
