"""formnet across hosts: three `form` nodes, each in its own network namespace (tests/multihost.py)
— the first started with `form join --genesis`, the others with `form join <invite>` — bring up
wireguard-go interfaces whose peers follow the members' peer records, and every host pings every
other host's overlay address. A host that leaves is removed from the others' peers by diff."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from formation.mesh.wggo import WireGuardGo
from formation.node.control import ControlClient
from tests.multihost import hosts
from tests.vm_support import needs_root

pytestmark = [pytest.mark.slow, needs_root,
              pytest.mark.skipif(shutil.which("wireguard-go") is None and not os.environ.get("CI"),
                                 reason="wireguard-go is not installed (./dev test installs it)")]
ROOT = Path(__file__).resolve().parents[2]


def start(host, data: Path, *args: str):
    log = open(data.parent / f"{data.name}.log", "ab")  # noqa: SIM115 - closed with the process
    env = {**os.environ, "FORMATION_PASSWORD": "test", "PYTHONPATH": str(ROOT)}
    return host.popen(sys.executable, "-m", "formation.cli", *args, "--data-dir", str(data),
                      "--vms", "false", cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def status(data: Path) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        c = ControlClient(data / "control.sock", timeout=5)
        try:
            return c.call(cmd="status")
        finally:
            c.close()
    return None


def wait(what: str, check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")))


def form_fog(hs, data: list[Path], tmp_path: Path) -> list[str]:
    """Host 1 runs `form join --genesis`, the others `form join <invite of host 1>`; the overlay
    addresses once every node has the others as peers."""
    start(hs[0], data[0], "join", "--genesis")
    wait("the genesis node", lambda: status(data[0]), 60)
    for i in range(1, len(hs)):
        c = ControlClient(data[0] / "control.sock", timeout=10)
        try:
            token = c.call(cmd="invite", expires=600)["token"]
        finally:
            c.close()
        start(hs[i], data[i], "join", token)

    def meshed():
        sts = [status(d) for d in data]
        if not all(s and s["mesh"]["enabled"] and s["mesh"]["peers"] == len(hs) - 1 for s in sts):
            return None
        return [s["mesh"]["overlay_ip"] for s in sts]

    try:
        return wait(f"{len(hs)} nodes meshed", meshed, 90)
    except AssertionError:
        raise AssertionError(logs(tmp_path)) from None


def form(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FORMATION_PASSWORD": "test", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "formation.cli", *args], env=env,
                          capture_output=True, text=True, timeout=30)


def test_three_hosts_join_and_reach_each_other_over_formnet(tmp_path):
    with hosts(3) as hs:
        data = [tmp_path / f"node{h.index}" for h in hs]
        t0 = time.monotonic()
        overlay = form_fog(hs, data, tmp_path)
        t_meshed = time.monotonic() - t0
        try:
            for h in hs:
                for j, ip in enumerate(overlay):
                    if j != h.index - 1:
                        assert wait(f"{h.name} -> {ip}", lambda h=h, ip=ip: h.ping(ip, 1.0), 20)
        except AssertionError:
            raise AssertionError(logs(tmp_path)) from None
        print(f"join --genesis to a full 3-node mesh with pings: {t_meshed:.1f} s")
        shown = form("manage", "formnet-up", "--json", "--data-dir", str(data[0]))
        assert shown.returncode == 0, shown.stderr
        mesh = json.loads(shown.stdout)
        assert mesh["enabled"] and mesh["peers"] == 2 and mesh["overlay_ip"] == overlay[0]

        assert len(set(overlay)) == 3

        # a member leaves (form manage leave): the others drop its peer by diff, the rest stays up
        left = form("manage", "leave", "--data-dir", str(data[2]))
        assert left.returncode == 0, left.stderr

        def dropped():
            sts = [status(d) for d in data[:2]]
            return all(s and s["mesh"]["peers"] == 1 for s in sts)

        try:
            wait("the two remaining nodes to drop the one that left", dropped, 30)
        except AssertionError:
            raise AssertionError(logs(tmp_path)) from None
        assert hs[0].ping(overlay[1], 2.0) and hs[1].ping(overlay[0], 2.0)
        for d in data[:2]:  # what each interface really has, asked over its UAPI socket
            device = trio.run(WireGuardGo(status(d)["mesh"]["iface"]).device)
            assert len(device.public_keys) == 1


def test_a_cut_host_comes_back_with_its_tunnels_and_the_state_it_missed(tmp_path):
    """Cut one host's link: the other two keep reaching each other; what is written meanwhile
    reaches the cut host once its link is back, and so do the tunnels, with no manual step."""
    from tests.multihost import cut, heal

    with hosts(3) as hs:
        data = [tmp_path / f"node{h.index}" for h in hs]
        overlay = form_fog(hs, data, tmp_path)
        try:
            cut(hs[2])
            assert wait("h1 -> h2 while h3 is cut", lambda: hs[0].ping(overlay[1], 1.0), 20)
            assert not hs[0].ping(overlay[2], 1.0)
            # a member leaves while h3 is away: h3 learns it only after the link is back
            leave = form("manage", "leave", "--data-dir", str(data[1]))
            assert leave.returncode == 0, leave.stderr
            time.sleep(2)
            assert status(data[2])["mesh"]["peers"] == 2  # h3 has not heard of it
            heal(hs[2])
            assert wait("h1 -> h3 after the link is back", lambda: hs[0].ping(overlay[2], 1.0), 60)
            assert wait("h3 hears of the leave and drops that peer",
                        lambda: status(data[2])["mesh"]["peers"] == 1, 60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{logs(tmp_path)}") from None


@pytest.mark.skipif(shutil.which("wg") is None, reason="wg (wireguard-tools) is not installed")
def test_the_kernel_interfaces_configuration_through_wg_carries_traffic():
    """The kernel backend (formation/mesh/kernel.py) configures its interface with `wg set` and
    reads it with `wg show dump`. No kernel here has the module, but wg speaks to wireguard-go
    too: two wireguard-go interfaces configured only through KernelWireGuard reach each other,
    and an entry's allowed IPs are cleared, and the entry removed, as formnet's diffs say."""
    from formation.mesh import keys
    from formation.mesh.kernel import KernelWireGuard
    from formation.mesh.uapi import PeerChange, PeerConfig
    from formation.mesh.wggo import SOCKET_DIR

    with hosts(2) as hs:
        names = [f"wg{h.name}" for h in hs]
        env = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
        for h, name in zip(hs, names, strict=True):
            h.popen("wireguard-go", "-f", name, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait("wireguard-go sockets", lambda: all((SOCKET_DIR / f"{n}.sock").exists() for n in names), 15)
        private = [keys.new_private() for _ in hs]
        public = [keys.public_of(k) for k in private]
        ifaces = [KernelWireGuard(n) for n in names]

        def peer(j: int, allowed=None) -> PeerConfig:
            return PeerConfig(public[j], f"{hs[j].ip}:51820", (f"10.99.0.{j + 1}/32",) if allowed is None else allowed)

        async def configure():
            for i, wg in enumerate(ifaces):
                await wg.configure(private_key=private[i], listen_port=51820,
                                   changes=[PeerChange(peer(1 - i))])

        trio.run(configure)
        for i, (h, name) in enumerate(zip(hs, names, strict=True)):
            assert h.run("ip", "addr", "add", f"10.99.0.{i + 1}/24", "dev", name).returncode == 0
            assert h.run("ip", "link", "set", name, "up").returncode == 0
        assert wait("h1 -> h2 over the interfaces wg configured", lambda: hs[0].ping("10.99.0.2", 1.0), 20)
        dev = trio.run(ifaces[0].device)
        got = dev.public_keys[public[1]]
        assert dev.listen_port == 51820 and got["allowed_ips"] == ["10.99.0.2/32"]
        assert got["endpoint"] == f"{hs[1].ip}:51820" and int(got["last_handshake_time_sec"]) > 0
        assert int(got["rx_bytes"]) > 0 and got["persistent_keepalive_interval"] == "25"
        trio.run(lambda: ifaces[0].configure(changes=[PeerChange(peer(1, ()))]))
        assert trio.run(ifaces[0].device).public_keys[public[1]]["allowed_ips"] == []
        trio.run(lambda: ifaces[0].configure(changes=[PeerChange(peer(1), remove=True)]))
        assert trio.run(ifaces[0].device).public_keys == {}
