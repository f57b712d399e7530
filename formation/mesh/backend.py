"""Which WireGuard implementation runs formnet's interface, chosen when formnet starts: the
kernel module where it exists (and `wg` from wireguard-tools is there to configure it), else
wireguard-go. Whether the module exists is known only by asking the kernel for an interface
(a module may load on demand), so `choose` takes that probe as a parameter: the unit tests fake
it, since no machine here has the module (../shared/notes/infra.md).
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable

from .kernel import KernelWireGuard, kernel_module_works
from .wggo import MeshError, WireGuardGo, WireGuardInterface

KERNEL, USERSPACE = "kernel", "wireguard-go"


def pick(*, kernel_module: bool, have_wg: bool, have_wireguard_go: bool) -> str:
    """The implementation to use; MeshError when there is none."""
    if kernel_module and have_wg:
        return KERNEL
    if have_wireguard_go:
        return USERSPACE
    if kernel_module:
        raise MeshError("the kernel has WireGuard but wg is not installed to configure it "
                        "(apt-get install wireguard-tools), nor is wireguard-go")
    raise MeshError("the kernel has no WireGuard module and wireguard-go is not installed "
                    "(apt-get install wireguard-go)")


async def choose(name: str, *, probe: Callable[[str], Awaitable[bool]] = kernel_module_works,
                 which: Callable[[str], str | None] = shutil.which) -> WireGuardInterface:
    """The interface `name` on the implementation this host has (not started: run it)."""
    have_wg = which("wg") is not None
    module = have_wg and await probe(name)  # without wg the module is of no use: do not probe
    kind = pick(kernel_module=module, have_wg=have_wg, have_wireguard_go=which("wireguard-go") is not None)
    return KernelWireGuard(name) if kind == KERNEL else WireGuardGo(name)
