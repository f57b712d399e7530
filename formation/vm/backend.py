"""What the node needs of a VM backend, declared: the QEMU driver (driver.py) implements it, and so
does the in-memory fake beside it (fake.py), on which the scheduler's tests run without root,
QEMU or a bridge (the real-VM tests run the driver itself).

A backend owns VMs by id: their spec (what to boot), their process, their console. Everything it
is asked is idempotent where that makes sense (booting a running VM, stopping a stopped one,
deleting a missing one), so a caller that lost track after a crash can simply ask again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .spec import VmMetrics, VmSpec, VmStatus


class VmBackend(Protocol):
    accel: str  # "kvm" or "tcg": what its VMs run on

    def list(self) -> list[str]:
        """The VMs it holds, running or not (what a restarted node adopts)."""

    def is_alive(self, vm_id: str) -> bool: ...

    def spec_of(self, vm_id: str) -> VmSpec | None:
        """The spec the VM was created with; None when there is no such VM."""

    async def create(self, spec: VmSpec) -> Path:
        """Make (or re-make with a new spec, when stopped) the VM; boots nothing."""

    async def boot(self, vm_id: str) -> float: ...

    async def stop(self, vm_id: str, timeout: float = 30.0) -> str:
        """Stop cleanly (power button), killing after `timeout`; says which it took. A paused VM
        is resumed first (a paused guest cannot see the button)."""

    async def pause(self, vm_id: str) -> None:
        """Stop the running VM's vCPUs; it keeps its memory, process and tap (status: paused)."""

    async def resume(self, vm_id: str) -> None:
        """Run a paused VM's vCPUs again."""

    async def delete(self, vm_id: str) -> None:
        """The VM, its disk overlay and its tap, gone (stopping it first)."""

    def console_log(self, vm_id: str, tail_bytes: int | None = None) -> str: ...

    def console_size(self, vm_id: str) -> int:
        """Bytes the console holds (-1: none); unchanged means nothing new to read."""

    async def status(self, vm_id: str) -> VmStatus: ...

    async def metrics(self, vm_id: str) -> VmMetrics: ...

    async def run_to_exit(self, spec: VmSpec, timeout: float,
                          on_line: Callable[[str], Any] | None = None) -> int:
        """Boot a throw-away VM and follow its console until it powers off (the builder's VM)."""

