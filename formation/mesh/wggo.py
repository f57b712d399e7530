"""One WireGuard interface served by wireguard-go (the Debian package): its process, owned by a
trio task, and its UAPI socket. The kernel module is missing on many hosts (these machines
among them: ../shared/notes/infra.md); wireguard-go is the same protocol in user space, measured
here at ~50 ms to a first ping and ~690 Mbit/s.

/var/run/wireguard/ is not per network namespace, so interface names must be unique per host
(`iface_name` derives one from the node's address). `WireGuardInterface` is what this and the
kernel's interface (kernel.py) share; backend.py chooses between them at run time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import trio

from formation.iproute import ip

from .uapi import GET_REQUEST, Device, PeerChange, parse_answer, set_request

log = logging.getLogger("formation.mesh")
SOCKET_DIR = Path("/var/run/wireguard")
START_TIMEOUT = 10.0
MAX_ANSWER = 1 << 20


class MeshError(Exception):
    pass


def iface_name(address: str) -> str:
    """fm + 8 hex of the node's address: deterministic, unique per node, within IFNAMSIZ."""
    return "fm" + hashlib.sha256(address.lower().encode()).hexdigest()[:8]


def requirements_problem() -> str:
    """Why this host can run no WireGuard interface ("" when it may: which implementation is
    chosen when formnet starts, backend.py)."""
    if os.geteuid() != 0:
        return "the node is not running as root (a WireGuard interface needs it)"
    if not shutil.which("ip"):
        return "ip (iproute2) is not installed"
    if not shutil.which("wireguard-go") and not shutil.which("wg"):
        return ("neither wireguard-go nor wg (wireguard-tools, for the kernel module) is installed "
                "(apt-get install wireguard-go)")
    return ""


class WireGuardInterface:
    """What both implementations share: the interface's address, routes and forwarding."""

    kind = ""

    def __init__(self, name: str):
        self.name = name
        self._forward_warned = False

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError

    async def configure(self, *, private_key: bytes | None = None, listen_port: int | None = None,
                        changes: list[PeerChange] = ()) -> None:
        raise NotImplementedError

    async def device(self) -> Device:
        raise NotImplementedError

    async def up(self, address_cidr: str) -> None:
        await ip("address", "replace", address_cidr, "dev", self.name)
        await ip("link", "set", self.name, "up")

    def forward(self) -> bool:
        """Packets that come in on this interface may be routed out of it: how this node relays
        between two of its peers (relay.py). Only this interface's flag, not the host-wide
        ip_forward: nothing from elsewhere is routed because of it. Checked with each pass (a
        host-wide `ip_forward=0` clears it). /proc/sys/net belongs to the network namespace of
        whoever opens it: this process's. False when it cannot be set."""
        path = Path("/proc/sys/net/ipv4/conf") / self.name / "forwarding"
        try:
            if path.read_text().strip() != "1":
                path.write_text("1\n")
            return True
        except OSError as exc:
            if not self._forward_warned:
                log.warning("%s: cannot turn on forwarding (this node cannot relay): %s", self.name, exc)
                self._forward_warned = True
            return False

    async def route(self, cidr: str) -> None:
        await ip("route", "replace", cidr, "dev", self.name)

    async def unroute(self, cidr: str) -> None:
        await ip("route", "del", cidr, "dev", self.name, ok_if=("No such process", "not found"))


class WireGuardGo(WireGuardInterface):
    kind = "wireguard-go"

    def __init__(self, name: str):
        super().__init__(name)
        self.socket = SOCKET_DIR / f"{name}.sock"

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Start wireguard-go in the foreground and own it: the interface lives while this runs."""
        env = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
        proc = await trio.lowlevel.open_process(["wireguard-go", "-f", self.name], env=env,
                                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE)
        try:
            with trio.move_on_after(START_TIMEOUT):
                # the socket's file appears when wireguard-go binds it, a moment before it listens:
                # a request in between was refused (seen under load), so wait for a connection
                while proc.poll() is None and not await self._listening():
                    await trio.sleep(0.01)
            if proc.poll() is not None or not await self._listening():
                err = (await proc.stderr.receive_some(4096)).decode(errors="replace").strip() if proc.stderr else ""
                raise MeshError(f"wireguard-go did not start {self.name}: {err or 'no socket'}")
            task_status.started()
            await proc.wait()
            raise MeshError(f"wireguard-go for {self.name} exited (status {proc.returncode})")
        finally:
            if proc.returncode is None:
                proc.terminate()  # wireguard-go removes its interface and socket on SIGTERM
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    with trio.CancelScope(shield=True):
                        await proc.wait()

    async def _listening(self) -> bool:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        with sock:
            try:
                await sock.connect(str(self.socket))
            except OSError:  # not there yet, or not listening yet
                return False
        return True

    async def request(self, data: bytes) -> Device:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        with sock:
            await sock.connect(str(self.socket))
            await sock.send(data)
            answer = b""
            while not answer.endswith(b"\n\n"):
                chunk = await sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
                if len(answer) > MAX_ANSWER:
                    raise MeshError(f"{self.name}: the UAPI answer is over {MAX_ANSWER} bytes")
        return parse_answer(answer.decode(errors="replace"))

    async def configure(self, *, private_key: bytes | None = None, listen_port: int | None = None,
                        changes: list[PeerChange] = ()) -> None:
        await self.request(set_request(private_key=private_key, listen_port=listen_port, changes=changes))

    async def device(self) -> Device:
        return await self.request(GET_REQUEST)
