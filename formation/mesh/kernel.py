"""One WireGuard interface of the kernel module (`ip link add NAME type wireguard`), configured
with `wg` (wireguard-tools) through the same changes as wireguard-go's UAPI socket
(uapi.wg_set_args, uapi.parse_dump). Chosen at run time where the module exists (backend.py).

Not run on these machines: the kernel here has no WireGuard module (../shared/notes/infra.md),
so the unit tests check the arguments and the parsing, and tests/integration/test_relay.py drives
`wg` against a wireguard-go interface (wg speaks to both).
"""

from __future__ import annotations

import base64

import trio

from formation.iproute import NetworkError, ip

from .uapi import Device, PeerChange, parse_dump, wg_set_args
from .wggo import MeshError, WireGuardInterface

NOT_THERE = ("Cannot find device", "does not exist")


async def wg(*args: str, stdin: bytes = b"") -> str:
    cmd = ["wg", *args]
    proc = await trio.run_process(cmd, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False)
    if proc.returncode != 0:
        raise MeshError(f"{' '.join(cmd[:3])}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode(errors="replace")


class KernelWireGuard(WireGuardInterface):
    kind = "kernel"

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Make the interface and own it: it is deleted when this ends (a stale one that a killed
        node left is replaced first)."""
        await ip("link", "del", "dev", self.name, ok_if=NOT_THERE)
        await ip("link", "add", "dev", self.name, "type", "wireguard")
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await ip("link", "del", "dev", self.name, ok_if=NOT_THERE)

    async def configure(self, *, private_key: bytes | None = None, listen_port: int | None = None,
                        changes: list[PeerChange] = ()) -> None:
        stdin = base64.b64encode(private_key) + b"\n" if private_key is not None else b""
        await wg(*wg_set_args(self.name, private_key_file="/dev/stdin" if private_key is not None else None,
                              listen_port=listen_port, changes=changes), stdin=stdin)

    async def device(self) -> Device:
        return parse_dump(await wg("show", self.name, "dump"))


async def kernel_module_works(name: str) -> bool:
    """Whether the kernel makes WireGuard interfaces: one is made under `name` and deleted."""
    try:
        await ip("link", "add", "dev", name, "type", "wireguard")
    except NetworkError:  # "Unknown device type" / "Operation not supported": no module
        return False
    await ip("link", "del", "dev", name, ok_if=NOT_THERE)
    return True

