"""A `form node` process with VMs on, in its own network namespace, reached over a veth pair.

The VMs' bridge and taps live in the namespace only, so nothing touches the host's network; the
node's API listens on the namespace's end of the veth, which the test process can reach.
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

from formation.node.control import ControlClient
from tests.vm_support import CACHE, boot_kit, debian_base, ip, netns

ROOT = Path(__file__).resolve().parents[1]


class NodeInNetns:
    def __init__(self, ns: str, base: Path, api_ip: str):
        self.ns, self.base, self.api_ip = ns, base, api_ip
        self.data = base / "data"
        self.config = base / "formation.toml"
        self.config.write_text(
            f'[node]\nheartbeat_seconds = 5\n'
            f'[api]\nhost = "{api_ip}"\nport = 3004\n'
            f'[p2p]\nlisten = "/ip4/{api_ip}/tcp/4001"\n'
            f'[mesh]\nenabled = "false"\n'
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
    debian_base()
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
