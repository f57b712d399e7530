"""The README's workflow, command by command, against a real node with real VMs: a wallet, then
`form pack ship examples/hello-agent` (build, deploy, wait), `form agent register --build-id`,
`form agent hire` answered by the agent inside its VM through the node.

The example installs python3 (INSTALL), which the host downloads from the Debian mirror: the image
is built here first, outside the node's namespace (which has no route out), into the cache the
node shares; for the node that build is then a cache hit, as a second build is for any user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from formation.pack import context as ctx
from formation.pack.builder import Builder
from formation.vm.driver import QemuDriver
from tests.vm_support import CACHE, boot_kit, build_machine, needs_qemu, needs_root

pytestmark = [pytest.mark.slow, needs_qemu, needs_root]
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "hello-agent"


@pytest.fixture
def hello_image(tmp_path):
    """The example's image in the shared cache (built once per machine, ~2 min under TCG)."""
    builder = Builder(CACHE / "images", CACHE, build_machine(QemuDriver(tmp_path / "vms"), boot_kit()))
    plan = builder.prepare((EXAMPLE / "Formfile").read_text(), ctx.pack_dir(EXAMPLE), tmp_path / "w")
    return trio.run(builder.build, plan, tmp_path)


def form(node, cfg: Path, *args: str, timeout: float = 600) -> dict:
    proc = _form(node, cfg, *args, timeout=timeout)
    assert proc.returncode == 0, f"form {' '.join(args)}: {proc.stderr}\n{node.log_text()}"
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def _form(node, cfg: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "FORM_CONFIG_DIR": str(cfg), "FORM_WALLET_PASSWORD": "readme"}
    return subprocess.run([sys.executable, "-m", "formation.cli", *args, "--node",
                           f"http://{node.api_ip}:3004", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def hired_greeting(node, cfg: Path, agent_id: str) -> str | None:
    proc = _form(node, cfg, "agent", "hire", agent_id, "--data", '{"task": "say hello"}', timeout=60)
    return json.loads(proc.stdout).get("greeting") if proc.returncode == 0 and proc.stdout.strip() else None


def test_readme_workflow_ship_register_hire(hello_image, node, tmp_path):
    cfg = tmp_path / "form-config"
    form(node, cfg, "kit", "init")
    shipped = form(node, cfg, "pack", "ship", str(EXAMPLE))
    assert shipped["build_id"] == hello_image.image_id  # the node found it in the cache
    assert shipped["instance"]["replicas_status"][0]["state"] == "running"
    agent = form(node, cfg, "agent", "register", str(EXAMPLE / "agent.toml"), "--build-id", shipped["build_id"])
    answer = form(node, cfg, "agent", "hire", agent["id"], "--data", '{"task": "say hello"}')
    assert answer == {"greeting": "hello", "echo": {"task": "say hello"}}
    ips = form(node, cfg, "manage", "get-ip", shipped["instance_id"])
    assert ips["replicas"][0]["ip"].startswith("10.213.12.")
    assert form(node, cfg, "manage", "metrics", shipped["instance_id"])["vm_state"] == "running"
    logs = form(node, cfg, "manage", "logs", shipped["instance_id"])
    assert "FORMATION-GUEST entrypoint-start" in logs["log"]

    # a secret (docs/secrets.md): sealed by the CLI to the node, opened there, given to the VM,
    # which restarts and has it in its entrypoint's environment (over the Formfile's ENV)
    secret = "bonjour-from-a-sealed-secret"
    form(node, cfg, "secrets", "set", shipped["instance_id"], f"GREETING={secret}")
    deadline = time.monotonic() + 240
    while hired_greeting(node, cfg, agent["id"]) != secret:
        assert time.monotonic() < deadline, "the agent never answered with the secret\n" + node.log_text()
        time.sleep(2)
    assert secret not in logs["log"] + form(node, cfg, "manage", "logs", shipped["instance_id"])["log"]
    for db in node.data.glob("state.db*"):
        assert secret.encode() not in db.read_bytes(), f"{db.name} holds the secret in clear"
