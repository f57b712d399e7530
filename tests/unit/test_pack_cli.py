"""`form pack build|status|logs|ship` and `form manage get-ip|logs` against a real in-process node.

The node's VM side is the fake of tests/api/test_workloads.py: real BuildService, a Builder
that pretends, a scheduler with one console; replicas' states are written by the test.
"""

from __future__ import annotations

import json
import re

import pytest
import trio

from formation import keystore
from formation.cli import build, pack
from formation.dns.names import replica_name
from formation.node.vmside import VmsOff, VmsStarting
from tests.api.test_workloads import vm_node
from tests.unit.test_client_cli import PASSWORD, Runner

FORMFILE = "NAME web\nVCPU 2\nMEMORY 1024\nDISK 10\nCOPY app.txt /srv/app.txt\nRUN echo hello\n"


@pytest.fixture
def cfg(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FORM_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("FORM_WALLET_PASSWORD", PASSWORD)
    monkeypatch.delenv("FORMATION_PASSWORD", raising=False)
    monkeypatch.setattr(keystore, "SCRYPT_PARAMS", {"n": 2**10, "r": 8, "p": 1})
    monkeypatch.setattr(build, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(pack, "SHIP_POLL_SECONDS", 0.05)
    return tmp_path / "cfg"


@pytest.fixture
def form(capsys):
    return Runner(capsys)


@pytest.fixture
def app_dir(tmp_path):
    d = tmp_path / "app"
    d.mkdir()
    (d / "Formfile").write_text(FORMFILE)
    (d / "app.txt").write_text("hello\n")
    return d


# ---- local checks: nothing reaches a node --------------------------------------------------------


async def test_parsing_and_local_errors(form, cfg, tmp_path, app_dir, monkeypatch):
    _, out, _ = await form("pack", "build", "--help")
    assert "--no-wait" in out and "--formfile" in out
    for argv in (("pack", "ship", str(app_dir), "--replicas", "0"), ("pack", "logs"),
                 ("manage", "logs", "x", "--tail", "0"), ("pack", "build", "--wait=3")):
        await form(*argv, code=2)
    # no Formfile
    (tmp_path / "empty").mkdir()
    _, out, err = await form("pack", "build", str(tmp_path / "empty"), code=2)
    assert out == "" and "no Formfile at" in err and "--formfile" in err
    _, _, err = await form("pack", "ship", str(tmp_path / "nowhere"), code=2)
    assert "no such folder" in err
    # a Formfile with errors: every one with its line, nothing sent
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "Formfile").write_text("NAME x\nVCPU 0\nFROM debian\n")
    _, _, err = await form("pack", "build", str(tmp_path / "bad"), code=2)
    assert re.search(r"Formfile:2: VCPU", err) and re.search(r"Formfile:3: unknown instruction", err)
    assert "has 2 errors" in err and "nothing was sent" in err
    # a context over the limit (a small one here) is refused before anything is sent
    await form("kit", "init", "--node", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(build, "CONTEXT_LIMIT", 100)
    (app_dir / "big.bin").write_bytes(bytes(1000))
    _, out, err = await form("pack", "build", str(app_dir), code=2)
    assert out == "" and "over the limit" in err
    assert "leave big files out" in err
    # the Formfile elsewhere, with --formfile
    (app_dir / "big.bin").unlink()
    _, _, err = await form("pack", "build", str(app_dir), code=2)  # the tar.gz itself is over 100 bytes
    assert "over the limit of 100" in err and "leave big files out of the folder" in err
    monkeypatch.setattr(build, "CONTEXT_LIMIT", 64 * 1024 * 1024)
    (tmp_path / "Other").write_text(FORMFILE)
    _, _, err = await form("pack", "build", str(app_dir), "--formfile", str(tmp_path / "Other"), code=3)
    assert "cannot reach the node" in err


# ---- against a node ----------------------------------------------------------------------------


async def test_build_status_logs(form, cfg, tmp_path, app_dir):
    async with vm_node(tmp_path / "vm") as rt:
        await form("kit", "init", "--node", rt.base_url)
        _, out, err = await form("pack", "build", str(app_dir))
        assert "[1/2] line 5: COPY app.txt /srv/app.txt" in err and "[2/2] line 6: RUN echo hello" in err
        assert "output of echo hello" in err
        fields = dict(line.split(None, 1) for line in out.splitlines())
        bid = fields["build"]
        assert fields["state"] == "done" and fields["name"] == "web" and len(bid) == 64
        # again: a cache hit, as JSON
        doc = await form.json("pack", "build", str(app_dir), "--quiet")
        assert doc["build_id"] == bid and doc["state"] == "done" and doc["image"]["vcpus"] == 2
        # status: a table, and one build
        _, out, _ = await form("pack", "status")
        assert out.split()[:6] == ["BUILD", "NAME", "STATE", "STEP", "SUBMITTED", "ERROR"]
        assert bid[:16] in out and "done" in out
        one = await form.json("pack", "status", bid)
        assert one["state"] == "done" and one["steps"] == 2
        _, out, _ = await form("pack", "status", bid)
        assert "2 vCPU, 1024 MB, 10 GB disk" in out
        # logs
        _, out, _ = await form("pack", "logs", bid)
        assert "--- step 2/2 (line 6): echo hello" in out
        logs = await form.json("pack", "logs", bid, "--follow")
        assert logs["state"] == "done" and "output of echo hello" in logs["log"]
        # someone else's view: nothing
        await form("kit", "init", "--node", rt.base_url, "--config-dir", str(tmp_path / "c2"))
        _, _, err = await form("pack", "status", bid, "--config-dir", str(tmp_path / "c2"), code=1)
        assert "not_found" in err
        # --no-wait: queued, and a hint
        (app_dir / "app.txt").write_text("changed\n")
        doc = await form.json("pack", "build", str(app_dir), "--no-wait")
        assert doc["state"] in ("queued", "building", "done") and doc["build_id"] != bid


async def test_failed_and_refused_builds_exit_1(form, cfg, tmp_path, app_dir):
    async with vm_node(tmp_path / "vm") as rt:
        await form("kit", "init", "--node", rt.base_url)
        (app_dir / "Formfile").write_text(FORMFILE + "RUN false\n")
        _, out, err = await form("pack", "build", str(app_dir), code=1)
        assert out == ""
        assert re.search(r"form: error: build [0-9a-f]{16} failed at .*Formfile:7 \(RUN false\): RUN failed", err)
        assert "  | boom" in err
        rc, out, err = await form("pack", "build", str(app_dir), "--json", "--quiet", code=1)
        assert json.loads(out)["state"] == "failed" and "form: error:" in err
        # refused at submission: a COPY source missing from the context
        (app_dir / "app.txt").unlink()
        (app_dir / "Formfile").write_text(FORMFILE)
        _, _, err = await form("pack", "build", str(app_dir), code=1)
        assert "the build was refused at" in err and "Formfile:5 (COPY app.txt /srv/app.txt)" in err
        assert "no such file" in err
        # a node without VMs
        rt.vms = VmsOff("no /dev/kvm")
        _, _, err = await form("pack", "build", str(app_dir), code=1)
        assert "runs no VMs" in err and "no /dev/kvm" in err and "sudo ./dev run" in err and "--node" in err


async def test_a_build_waits_for_the_nodes_vms_to_start(form, cfg, tmp_path, app_dir, monkeypatch):
    """Right after `./dev run` starts, the node's VM side is not up: the build waits for it, says
    so, and goes on once it is; a bounded wait that ends says what to do."""
    monkeypatch.setattr(build, "VM_POLL_SECONDS", 0.05)
    async with vm_node(tmp_path / "vm") as rt, trio.open_nursery() as nursery:
        on = rt.vms
        await form("kit", "init", "--node", rt.base_url)
        rt.vms = VmsStarting(on.host)

        async def come_up():
            await trio.sleep(1.0)
            rt.vms = on

        nursery.start_soon(come_up)
        doc = await form.json("pack", "build", str(app_dir))
        assert doc["state"] == "done"
        _, _, err = await form("pack", "build", str(app_dir), "--no-wait", code=0)  # on: no waiting
        assert "starting" not in err

        rt.vms = VmsStarting(on.host)
        nursery.start_soon(come_up)
        _, out, err = await form("pack", "build", str(app_dir))
        assert "the node's VMs are starting (VMs are starting (guest kernel kit, bridge))" in err
        assert "waiting for them, at most" in err and "the node's VMs are on; sending the build again" in err
        assert "state" in out
        # never up: the wait ends, saying what to look at and what to run then
        rt.vms = VmsStarting(on.host)
        _, out, err = await form("pack", "ship", str(app_dir), "--vm-wait", "1", code=1)
        assert out == "" and "still has its VMs starting after 1 s" in err
        assert "form node status" in err and "--vm-wait" in err
        assert await rt.astore.list("instance", limit=10) == []  # nothing deployed
        # it gives up starting VMs meanwhile: why, and what to do
        rt.vms = VmsStarting(on.host)

        async def give_up():
            await trio.sleep(0.5)
            rt.vms = VmsOff("VMs are off: no bridge")

        nursery.start_soon(give_up)
        _, _, err = await form("pack", "build", str(app_dir), code=1)
        assert "runs no VMs" in err and "no bridge" in err


async def _report(rt, states: list[tuple[str, str | None, str]], delay: float = 0.1):
    """Play the node's part: wait for the instance, then report its replica's states in turn."""
    with trio.fail_after(20):
        while not (rows := await rt.astore.list("instance", limit=10)):
            await trio.sleep(0.02)
    iid = rows[0]["instance_id"]
    for state, ip, reason in states:
        await trio.sleep(delay)
        await rt.write("instance_status", f"{iid}@{rt.address}",
                       {"instance_id": iid, "node": rt.address, "state": state, "ip": ip, "reason": reason})
    return iid


async def test_ship_builds_deploys_and_waits(form, cfg, tmp_path, app_dir):
    async with vm_node(tmp_path / "vm") as rt, trio.open_nursery() as nursery:
        await form("kit", "init", "--node", rt.base_url)
        # each state lasts 0.6 s: the CLI (polling every 0.05 s) sees every one even on a busy machine
        nursery.start_soon(_report, rt, [("building", None, ""), ("booting", None, "starting QEMU"),
                                         ("running", "10.7.0.2", "")], 0.6)
        _, out, err = await form("pack", "ship", str(app_dir), "--replicas", "1")
        iid = out.strip()
        ship_err = err
        inst = (await rt.astore.list("instance", limit=10))[0]
        assert inst["instance_id"] == iid and inst["name"] == "web" and inst["formfile"] == FORMFILE
        assert inst["resources"] == {"vcpus": 2, "memory_mb": 1024, "disk_gb": 10, "gpu": None}
        assert inst["build_id"] and len(inst["build_id"]) == 64
        assert "booting: starting QEMU" in err and "running at 10.7.0.2" in err
        # get-ip and logs of the instance
        _, out, _ = await form("manage", "get-ip", iid)
        assert out.split()[:3] == ["NODE", "STATE", "IP"] and "10.7.0.2" in out and "running" in out
        ips = await form.json("manage", "get-ip", iid)
        assert ips["replicas"][0]["ip"] == "10.7.0.2"
        assert ips["replicas"][0]["name"] == replica_name(ips["replicas"][0]["node"], iid)
        assert f".{iid}.fog" in out  # the replica's DNS name beside its address
        assert f"its names (every node's DNS): {iid}.fog, web." in ship_err
        # as in the original's workflow: by build id, every instance of the build
        _, out, _ = await form("manage", "get-ip", "--build-id", inst["build_id"])
        assert out.split()[:4] == ["INSTANCE", "NODE", "STATE", "IP"] and iid in out and "10.7.0.2" in out
        by_build = await form.json("manage", "get-ip", "--build-id", inst["build_id"])
        assert [(r["instance_id"], r["ip"]) for r in by_build["replicas"]] == [(iid, "10.7.0.2")]
        _, out, _ = await form("manage", "get-ip", "--build-id", "e" * 64)
        assert "no instance of build" in out
        _, _, err = await form("manage", "get-ip", code=2)
        assert "give an instance ID or --build-id" in err
        rt.vms.scheduler.consoles[iid] = "boot\nready\n"
        _, out, _ = await form("manage", "logs", iid)
        assert out == "boot\nready\n"
        assert (await form.json("manage", "logs", iid, "--tail", "6"))["log"] == "ready\n"
        _, _, err = await form("manage", "logs", "nope", code=1)
        assert "not_found" in err


async def test_ship_with_a_build_id_and_a_failing_replica(form, cfg, tmp_path, app_dir):
    async with vm_node(tmp_path / "vm") as rt, trio.open_nursery() as nursery:
        await form("kit", "init", "--node", rt.base_url)
        nursery.start_soon(_report, rt, [("booting", None, ""), ("failed", None, "the image is missing")])
        rc, out, err = await form("pack", "ship", str(app_dir), "--build-id", "c" * 64, "--name", "other",
                                  "--json", code=1)
        doc = json.loads(out)
        assert doc["build_id"] == "c" * 64 and doc["build"] is None and doc["instance_id"]
        assert doc["instance"]["replicas_status"][0]["state"] == "failed"
        assert "form: error: the replica of instance" in err and "the image is missing" in err
        inst = (await rt.astore.list("instance", limit=10))[0]
        assert inst["name"] == "other"
        # --no-wait: just the id
        doc = await form.json("pack", "ship", str(app_dir), "--build-id", "d" * 64, "--no-wait")
        assert doc["instance"] is None and doc["op_id"]
