"""The scheduler with real VMs: a `form node` process in its own network namespace builds an
instance's image in a build VM, boots it, restarts it when its QEMU is killed, adopts it after
a node restart, stops/starts it, reports a failing build, and deletes it without leftovers.

The node's API is reached over a veth pair into the namespace; the VMs' bridge and taps live in
the namespace only, so nothing here touches the host's own network.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from formation.client import Client
from formation.crdt.keys import PrivateKey
from formation.node.control import ControlClient
from tests.vm_support import CACHE, boot_kit, http_get, ip, needs_qemu, needs_root, netns

pytestmark = [pytest.mark.slow, needs_qemu, needs_root]
ROOT = Path(__file__).resolve().parents[2]

TINY = """\
NAME tiny
RUN mkdir -p /srv/www && echo hello-instance > /srv/www/index.html
EXPOSE 8000
ENTRYPOINT httpd -f -p 8000 -h /srv/www
"""


class NodeInNetns:
    def __init__(self, ns: str, base: Path, api_ip: str):
        self.ns, self.base, self.api_ip = ns, base, api_ip
        self.data = base / "data"
        self.config = base / "formation.toml"
        self.config.write_text(
            f'[node]\nheartbeat_seconds = 5\n'
            f'[api]\nhost = "{api_ip}"\nport = 3004\n'
            f'[p2p]\nlisten = "/ip4/{api_ip}/tcp/4001"\n'
            f'[vm]\nenabled = "true"\nsubnet = "10.213.12.0/24"\nbridge = "fmtbr1"\n'
            f'cache_dir = "{CACHE}"\nbuild_timeout_seconds = 300\n')
        self.proc: subprocess.Popen | None = None
        self.log_path = base / "node.log"

    def start(self) -> None:
        env = {**os.environ, "FORMATION_PASSWORD": "test"}
        self.log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "formation.cli", "node",
             "--config", str(self.config), "--data-dir", str(self.data)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_text()
            with contextlib.suppress(OSError, ValueError):
                st = ControlClient(self.data / "control.sock", timeout=5).call(cmd="status")
                if st.get("vms", {}).get("enabled"):
                    return
            time.sleep(0.5)
        raise AssertionError("node did not start with VMs on:\n" + self.log_text())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def qemu_pid(self, iid: str) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.data / "vms" / f"vm-{iid}" / "qemu.pid").read_text())
            if (self.data / "vms").as_posix().encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        return None


@pytest.fixture
def node(tmp_path):
    boot_kit()  # made (or found) outside the namespace, which has no route to the mirror
    with netns() as ns:
        host_if = f"fmv{secrets.token_hex(3)}"
        ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("addr", "add", "10.213.11.1/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("-n", ns, "addr", "add", "10.213.11.2/30", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        n = NodeInNetns(ns, tmp_path, "10.213.11.2")
        try:
            n.start()
            yield n
        finally:
            n.stop()
            # whatever the test left: QEMU of this node's VMs (the netns teardown kills the rest)
            for pid_file in (n.data / "vms").glob("*/qemu.pid"):
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
            ip("link", "del", host_if, check=False)


def wait_replica(client: Client, iid: str, want, timeout: float = 180.0, log=lambda: "") -> dict:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        reps = client.get(f"/v1/instance/{iid}/get")["replicas_status"]
        if reps:
            if not seen or seen[-1] != (reps[0]["state"], reps[0]["reason"]):
                seen.append((reps[0]["state"], reps[0]["reason"]))
            if want(reps[0]):
                return reps[0]
        time.sleep(0.5)
    raise AssertionError(f"replica never matched; states seen: {seen}\n{log()}")


def test_instance_lifecycle_with_real_vms(node):
    user = Client(f"http://{node.api_ip}:3004", PrivateKey(secrets.token_bytes(32)))
    iid = user.post("/v1/instance/create", {"name": "tiny", "formfile": TINY, "replicas": 1})["id"]

    # built in a build VM from the Formfile alone, then booted, then answering
    rep = wait_replica(user, iid, lambda r: r["state"] == "running", log=node.log_text)
    assert rep["ip"].startswith("10.213.12.")
    assert http_get(node.ns, f"http://{rep['ip']}:8000/") == "hello-instance\n"

    # QEMU killed -> restarted, and the status says so
    pid = node.qemu_pid(iid)
    os.kill(pid, signal.SIGKILL)
    rep = wait_replica(user, iid, lambda r: r["state"] == "running" and "restarted 1 time" in r["reason"],
                       timeout=90, log=node.log_text)
    new_pid = node.qemu_pid(iid)
    assert new_pid and new_pid != pid
    assert http_get(node.ns, f"http://{rep['ip']}:8000/") == "hello-instance\n"

    # node restart -> the running VM is adopted: same QEMU, no second one
    node.stop()
    assert node.qemu_pid(iid) == new_pid
    node.start()
    time.sleep(6)  # a few reconcile passes
    assert node.qemu_pid(iid) == new_pid
    assert len(list((node.data / "vms").iterdir())) == 1
    assert http_get(node.ns, f"http://{rep['ip']}:8000/") == "hello-instance\n"

    # stop (graceful) and start again
    user.post(f"/v1/instance/{iid}/stop")
    wait_replica(user, iid, lambda r: r["state"] == "stopped", timeout=60, log=node.log_text)
    assert node.qemu_pid(iid) is None
    user.post(f"/v1/instance/{iid}/start")
    rep = wait_replica(user, iid, lambda r: r["state"] == "running", timeout=90, log=node.log_text)
    assert http_get(node.ns, f"http://{rep['ip']}:8000/") == "hello-instance\n"

    # a Formfile whose RUN fails: the instance says which line, the node keeps running
    bad = user.post("/v1/instance/create", {"name": "bad", "replicas": 1,
                                            "formfile": "NAME bad\nRUN echo oops && false\n"})["id"]
    rep = wait_replica(user, bad, lambda r: r["state"] == "failed", timeout=120, log=node.log_text)
    assert "line 2" in rep["reason"] and "RUN" in rep["reason"], rep
    assert node.proc.poll() is None

    # delete -> no QEMU, tap, overlay or bookkeeping left; the status records are withdrawn
    for i in (iid, bad):
        user.post(f"/v1/instance/{i}/delete")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (node.qemu_pid(iid) or list((node.data / "vms").iterdir())):
        time.sleep(0.5)
    assert node.qemu_pid(iid) is None
    assert list((node.data / "vms").iterdir()) == []
    assert list((node.data / "instances").glob("*.json")) == []
    assert "fmt" not in ip("-n", node.ns, "-o", "link", "show", "type", "tun").stdout
    control = ControlClient(node.data / "control.sock", timeout=10)
    me = control.call(cmd="status")["address"].lower()
    assert control.call(cmd="get", kind="instance_status", key=f"{iid}@{me}")["value"] is None
    assert node.proc.poll() is None
