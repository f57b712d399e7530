"""The user side of `form` (formation/cli/: kit, account, model, agent, manage, dns, node status)
against a real node, and its failures."""

from __future__ import annotations

import argparse
import io
import json
import sys
import tomllib

import pytest
import trio

from formation import cli, keystore
from formation.cli import catalog, node
from formation.client import Client
from formation.crdt.keys import PrivateKey, format_address, to_checksum
from formation.keystore import load_keystore
from tests.api.conftest import free_port, running_node

PASSWORD = "wallet-pw"
IMPORT_HEX = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"


@pytest.fixture
def cfg(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/.config/form must not be touched
    monkeypatch.setenv("FORM_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("FORM_WALLET_PASSWORD", PASSWORD)
    monkeypatch.delenv("FORMATION_PASSWORD", raising=False)  # the node's: never the wallet's
    # wallets made here unlock in ~1 ms instead of ~150 ms (the file records its own parameters)
    monkeypatch.setattr(keystore, "SCRYPT_PARAMS", {"n": 2**10, "r": 8, "p": 1})
    return tmp_path / "cfg"


class Runner:
    def __init__(self, capsys):
        self.capsys = capsys

    async def __call__(self, *argv: str, code: int | None = 0) -> tuple[int, str, str]:
        rc = await trio.to_thread.run_sync(cli.main, list(argv))
        out, err = self.capsys.readouterr()
        assert "Traceback" not in out + err
        if code is not None:
            assert rc == code, (argv, rc, out, err)
        return rc, out, err

    async def json(self, *argv: str):
        _, out, _ = await self(*argv, "--json")
        return json.loads(out)


@pytest.fixture
def form(capsys):
    return Runner(capsys)


def rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.strip()]


# ---- kit init ----------------------------------------------------------------------------------


async def test_kit_init_creates_wallet_and_config(form, cfg):
    _, out, err = await form("kit", "init")
    address = out.strip()
    key = load_keystore(cfg / "wallet.json", PASSWORD)
    assert address == to_checksum(key.address)
    conf = tomllib.loads((cfg / "config.toml").read_text())
    assert conf == {"node": "http://127.0.0.1:3004", "wallet": str(cfg / "wallet.json")}
    assert (cfg / "wallet.json").stat().st_mode & 0o777 == 0o600
    # a second init must not destroy the only copy of the key
    _, _, err = await form("kit", "init", code=2)
    assert "already exists" in err and "form: error:" in err


async def test_kit_init_imports_a_key_from_stdin(form, cfg, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stdin", io.StringIO("0x" + IMPORT_HEX + "\n"))
    doc = await form.json("kit", "init", "--import-key", "--node", "http://10.1.2.3:3004/")
    assert doc["address"] == to_checksum(PrivateKey.from_hex(IMPORT_HEX).address)
    assert tomllib.loads((cfg / "config.toml").read_text())["node"] == "http://10.1.2.3:3004"
    monkeypatch.setattr(sys, "stdin", io.StringIO("not a key"))
    _, _, err = await form("kit", "init", "--import-key", "--config-dir", str(tmp_path / "c2"), code=2)
    assert "does not hold a private key" in err and "not a key" not in err


async def test_the_wallet_has_its_own_password_variable(form, cfg, monkeypatch):
    await form("kit", "init")
    # the node's password is set, the wallet's is not (and no terminal to ask in): not used, said so
    monkeypatch.delenv("FORM_WALLET_PASSWORD")
    monkeypatch.setenv("FORMATION_PASSWORD", PASSWORD)
    _, _, err = await form("account", "get", code=2)
    assert "no password for the wallet" in err and "FORM_WALLET_PASSWORD" in err
    assert "FORMATION_PASSWORD is set, but it is the node operator key's password" in err
    assert "password_file" not in err  # the operator's way only
    _, _, err = await form("kit", "init", "--config-dir", str(cfg.parent / "c3"), code=2)
    assert "FORM_WALLET_PASSWORD" in err and not (cfg.parent / "c3" / "wallet.json").exists()
    monkeypatch.setenv("FORM_WALLET_PASSWORD", "")
    _, _, err = await form("account", "get", code=2)
    assert "FORM_WALLET_PASSWORD is set but empty" in err


async def test_local_problems_exit_2(form, cfg, tmp_path, monkeypatch):
    _, _, err = await form("account", "get", code=2)
    assert "no wallet at" in err and "form kit init" in err
    await form("kit", "init")
    for name, text in (("bad.toml", "name = [unclosed"), ("list.json", "[1, 2]"),
                       ("model.yaml", "name: x"), ("empty.toml", "")):
        (tmp_path / name).write_text(text)
        _, _, err = await form("model", "register", str(tmp_path / name), code=2)
        assert err.startswith("form: error:") and name in err
    _, _, err = await form("model", "register", str(tmp_path / "missing.toml"), code=2)
    assert "no such file" in err
    _, _, err = await form("model", "authorize", "abc", "0x1234", "read_only", code=2)
    assert "not an address" in err
    await form("model", "authorize", "abc", "0x" + "11" * 20, "boss", code=2)  # argparse choices
    _, _, err = await form("model", "get", "a/b", code=2)
    assert "not valid" in err
    await form("dns", "add", "x.fog", code=2)
    (cfg / "config.toml").write_text('node = "http://127.0.0.1:3004"\nnod = "typo"\n')
    _, _, err = await form("node", "status", code=2)
    assert "unknown setting 'nod'" in err
    monkeypatch.setenv("FORM_WALLET_PASSWORD", "wrong")
    (cfg / "config.toml").unlink()
    _, _, err = await form("account", "get", code=2)
    assert "wrong password" in err


async def test_unreachable_node_exits_3_and_says_where(form, cfg):
    url = f"http://127.0.0.1:{free_port()}"
    _, out, err = await form("node", "status", "--node", url, code=3)
    assert out == "" and url in err and "cannot reach the node" in err and "form node" in err
    await form("kit", "init", "--node", url)
    _, _, err = await form("model", "list", code=3)  # URL from config.toml
    assert url in err


# ---- against a node ----------------------------------------------------------------------------


async def test_user_commands_against_a_node(form, cfg, tmp_path):
    async with running_node(tmp_path / "node") as rt:
        url = rt.base_url
        me = (await form("kit", "init", "--node", url))[1].strip()
        me_lower = me.lower()
        other_cfg = str(tmp_path / "cfg2")
        other = (await form.json("kit", "init", "--node", url, "--config-dir", other_cfg))["address"].lower()

        # account
        _, out, _ = await form("account", "create", "--name", "alice")
        assert out.startswith(f"created account {me}")
        acct = await form.json("account", "get")
        assert acct["name"] == "alice" and acct["credits"] == 100
        _, out, _ = await form("account", "get")
        assert "alice" in out and "credits" in out
        _, _, err = await form("account", "create", code=1)
        assert "the node refused: conflict" in err and "already exists" in err

        # models
        (tmp_path / "llama.toml").write_text(
            'name = "Llama Test"\nmodel_type = "llm"\nframework = "pytorch"\n'
            'tags = ["chat", "en"]\ndescription = "a small llama"\n')
        res = await form.json("model", "register", str(tmp_path / "llama.toml"))
        mid = res["id"]
        assert res["kind"] == "model" and len(res["op_id"]) == 64
        (tmp_path / "whisper.json").write_text(json.dumps({"model": {"name": "Whisper", "model_type": "audio"}}))
        _, out, _ = await form("model", "register", str(tmp_path / "whisper.json"))
        assert out.startswith("registered model ")

        _, out, _ = await form("model", "list")
        table = rows(out)
        assert table[0][:3] == ["ID", "NAME", "TYPE"] and len(table) == 3
        assert any(r[0] == mid and r[1:3] == ["Llama", "Test"] for r in table)
        assert (await form.json("model", "list", "--type", "llm"))["count"] == 1
        assert (await form.json("model", "list", "--mine"))["count"] == 2
        assert (await form.json("model", "list", "--owner", other))["count"] == 0

        found = await form.json("model", "search", "llama")
        assert [m["model_id"] for m in found["models"]] == [mid]
        found = await form.json("model", "search", "--framework", "pytorch", "--tag", "chat", "--tag", "en")
        assert [m["model_id"] for m in found["models"]] == [mid]
        _, out, _ = await form("model", "search", "nothing-like-this")
        assert out.strip() == "no models match"

        _, out, _ = await form("model", "get", mid)
        assert "Llama Test" in out and "model_type" in out

        (tmp_path / "update.toml").write_text('description = "now bigger"\nversion = "2"\n')
        _, out, _ = await form("model", "update", mid, str(tmp_path / "update.toml"))
        assert out.startswith(f"updated model {mid}")
        assert (await form.json("model", "get", mid))["description"] == "now bigger"

        # refused writes name the node's reason, exit 1
        _, _, err = await form("model", "update", mid, str(tmp_path / "update.toml"),
                               "--config-dir", other_cfg, code=1)
        assert "unauthorized" in err and "needs level manager" in err and "HTTP 403" in err
        (tmp_path / "badfield.toml").write_text('colour = "red"\n')
        _, _, err = await form("model", "update", mid, str(tmp_path / "badfield.toml"), code=1)
        assert "bad_field" in err and "colour" in err

        _, out, _ = await form("model", "authorize", mid, other, "read_only")
        assert f"authorized {other} as read_only" in out
        assert (await form.json("model", "get", mid))["authorized"] == {other: "read_only"}
        await form("model", "authorize", mid, other, "none")
        assert (await form.json("model", "get", mid))["authorized"] == {}

        _, out, _ = await form("model", "transfer", mid, other)
        assert f"transferred model {mid} to {other}" in out
        assert (await form.json("model", "get", mid))["owner"] == other
        _, _, err = await form("model", "delete", mid, code=1)
        assert "unauthorized" in err
        await form("model", "delete", mid, "--config-dir", other_cfg)
        _, _, err = await form("model", "get", mid, code=1)
        assert "not_found" in err

        # agents
        (tmp_path / "bot.json").write_text(json.dumps({"name": "Helper", "agent_type": "assistant",
                                                       "tags": ["chat"], "port": 8080}))
        aid = (await form.json("agent", "register", str(tmp_path / "bot.json")))["id"]
        assert (await form.json("agent", "get", aid))["port"] == 8080
        assert [a["agent_id"] for a in (await form.json("agent", "search", "--tag", "chat"))["agents"]] == [aid]
        _, out, _ = await form("agent", "list")
        assert aid in out

        # instances: created through the API (deploying is another command's job)
        key = load_keystore(cfg / "wallet.json", PASSWORD)
        with Client(url, key) as c:
            iid = (await trio.to_thread.run_sync(lambda: c.post("/v1/instance/create", {"name": "web"})))["id"]
        _, out, _ = await form("manage", "list")
        assert rows(out)[1][:3] == [iid, "web", "running"]
        _, out, _ = await form("manage", "get", iid)
        assert "desired_state" in out and "web" in out
        _, out, _ = await form("manage", "stop", iid)
        assert out.startswith(f"stop of instance {iid} accepted")
        inst = await form.json("manage", "get", iid)
        assert inst["desired_state"] == "stopped" and inst["replicas_status"] == []
        await form("manage", "authorize", iid, other, "operator")
        await form("manage", "start", iid, "--config-dir", other_cfg)
        assert (await form.json("manage", "get", iid))["desired_state"] == "running"
        # pause and resume: an operator may; the answer carries the README's fields too
        _, out, _ = await form("manage", "pause", iid, "--config-dir", other_cfg)
        assert out.startswith(f"pause of instance {iid} accepted") and f"form manage get {iid}" in out
        assert (await form.json("manage", "get", iid))["desired_state"] == "paused"
        doc = await form.json("manage", "resume", iid)
        assert doc["status"] == "REQUEST_RECEIVED" and doc["instanceId"] == iid
        assert (await form.json("manage", "get", iid))["desired_state"] == "running"
        await form("manage", "stop", iid)
        _, _, err = await form("manage", "pause", iid, code=1)
        assert "is stopped" in err and f"form manage start {iid}" in err
        await form("manage", "start", iid)
        _, _, err = await form("manage", "delete", iid, "--config-dir", other_cfg, code=1)
        assert "needs level owner" in err

        # dns
        _, out, _ = await form("dns", "add", "App.Fog.", "--target", "10.0.0.1", "--ttl", "30")
        assert out.startswith("added A record app.fog")
        await form("dns", "add", "v6.fog", "--target", "fd00::1")
        await form("dns", "add", "www.fog", "--cname", "app.fog")
        listed = await form.json("dns", "list")
        assert {r["domain"]: r["record_type"] for r in listed["records"]} == {
            "app.fog": "A", "v6.fog": "AAAA", "www.fog": "CNAME"}
        _, out, _ = await form("dns", "list", "--owner")
        assert [r[:2] for r in rows(out)[1:]] == [["app.fog", "A"], ["v6.fog", "AAAA"], ["www.fog", "CNAME"]]
        assert (await form.json("dns", "list", "--owner", other))["count"] == 0
        await form("dns", "update", "app.fog", "--target", "10.0.0.2", "--target", "10.0.0.3")
        rec = [r for r in (await form.json("dns", "list"))["records"] if r["domain"] == "app.fog"][0]
        assert rec["targets"] == ["10.0.0.2", "10.0.0.3"] and rec["ttl"] == 30
        # no first-come names: another owner's record for the name is its own record
        await form("dns", "add", "app.fog", "--target", "10.9.9.9", "--config-dir", other_cfg)
        assert (await form.json("dns", "list", "--owner", other))["count"] == 1
        _, out, _ = await form("dns", "remove", "app.fog")
        assert out.startswith("removed record app.fog")
        assert [r[0] for r in rows((await form("dns", "list", "--owner"))[1])[1:]] == ["v6.fog", "www.fog"]

        # node status
        _, out, _ = await form("node", "status")
        assert "healthy" in out and rt.address in out.lower()
        assert any(r[0] == "*" and r[1] == rt.address for r in rows(out))
        st = await form.json("node", "status")
        assert st["health"]["status"] == "healthy" and [n["address"] for n in st["nodes"]] == [rt.address]

        # the account goes last
        await form("account", "delete")
        _, _, err = await form("account", "get", code=1)
        assert "not_found" in err
        assert me_lower == format_address(key.address)


def test_commands_plug_into_the_form_parser():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"kit", "account", "model", "agent", "manage", "dns"} <= set(sub.choices)
    assert parser.parse_args(["node", "--once"]).func is node.cmd_node  # `form node` still runs the node
    args = parser.parse_args(["node", "status", "--json", "--node", "http://h:1"])
    assert args.func is node.cmd_node_status and args.json and args.node == "http://h:1"
    args = parser.parse_args(["model", "list", "--mine"])
    assert args.func is catalog.cmd_catalog_list and args.kind == "model"
