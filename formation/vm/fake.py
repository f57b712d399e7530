"""An in-memory VM backend (backend.VmBackend) for tests of what sits above the driver: no QEMU,
no root, no bridge. Its VMs live in a dict; a boot prints the guest init's markers on the console
at once (formation.guest's protocol), so a scheduler sees the service start on its next look.
`crash` makes a VM's process end on its own; `events` records every lifecycle call in order; a
paused VM is alive with its status "paused", as QEMU's is after QMP stop.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from formation import guest

from .spec import VmError, VmMetrics, VmSpec, VmStatus

BOOT_LOG = f"{guest.BOOT}\nguest init: mounting root\n{guest.SERVICE_START}\n"


@dataclass
class FakeVm:
    spec: VmSpec
    alive: bool = False
    paused: bool = False
    boots: int = 0
    console: str = ""


@dataclass
class FakeBackend:
    state_dir: Path
    boot_log: str = BOOT_LOG
    accel: str = "tcg"
    vms: dict[str, FakeVm] = field(default_factory=dict)
    events: list[tuple[str, str]] = field(default_factory=list)  # (what, vm_id), in order
    metered: dict[str, VmMetrics] = field(default_factory=dict)  # what `metrics` says of a VM (a test sets it)

    def list(self) -> list[str]:
        return sorted(self.vms)

    def is_alive(self, vm_id: str) -> bool:
        vm = self.vms.get(vm_id)
        return vm is not None and vm.alive

    def running(self) -> list[str]:
        return sorted(i for i, vm in self.vms.items() if vm.alive)

    def spec_of(self, vm_id: str) -> VmSpec | None:
        vm = self.vms.get(vm_id)
        return vm.spec if vm else None

    async def create(self, spec: VmSpec) -> Path:
        await trio.lowlevel.checkpoint()  # as a real backend does: a cancel lands here
        self.events.append(("create", spec.vm_id))
        for name in ("kernel", "initrd", "image"):
            path = getattr(spec, name)
            if path is not None and not path.is_file():
                raise VmError(f"VM {spec.vm_id}: {name} {path} does not exist")
        vm = self.vms.get(spec.vm_id)
        if vm is not None and vm.spec != spec and vm.alive:
            raise VmError(f"VM {spec.vm_id} is running with another spec; stop it first")
        if vm is None:
            self.vms[spec.vm_id] = FakeVm(spec)
        else:
            vm.spec = spec
        vm_dir = self.state_dir / f"vm-{spec.vm_id}"
        vm_dir.mkdir(parents=True, exist_ok=True)
        return vm_dir

    async def boot(self, vm_id: str) -> float:
        await trio.lowlevel.checkpoint()  # as a real backend does: a cancel lands here
        vm = self._vm(vm_id)
        if vm.alive:
            return 0.0
        self.events.append(("boot", vm_id))
        vm.alive, vm.boots = True, vm.boots + 1
        vm.console += self.boot_log
        return 0.0

    async def stop(self, vm_id: str, timeout: float = 30.0) -> str:
        await trio.lowlevel.checkpoint()  # as a real backend does: a cancel lands here
        vm = self.vms.get(vm_id)
        if vm is None or not vm.alive:
            return "stopped"
        self.events.append(("stop", vm_id))
        vm.alive = vm.paused = False
        return "powerdown"

    async def pause(self, vm_id: str) -> None:
        await trio.lowlevel.checkpoint()
        vm = self._vm(vm_id)
        if not vm.alive:
            raise VmError(f"VM {vm_id} is not running")
        self.events.append(("pause", vm_id))
        vm.paused = True

    async def resume(self, vm_id: str) -> None:
        await trio.lowlevel.checkpoint()
        vm = self._vm(vm_id)
        if not vm.alive:
            raise VmError(f"VM {vm_id} is not running")
        self.events.append(("resume", vm_id))
        vm.paused = False

    async def delete(self, vm_id: str) -> None:
        await trio.lowlevel.checkpoint()  # as a real backend does: a cancel lands here
        if vm_id in self.vms:
            self.events.append(("delete", vm_id))
            del self.vms[vm_id]
        shutil.rmtree(self.state_dir / f"vm-{vm_id}", ignore_errors=True)

    def console_log(self, vm_id: str, tail_bytes: int | None = None) -> str:
        vm = self.vms.get(vm_id)
        text = vm.console if vm else ""
        return text[-tail_bytes:] if tail_bytes else text

    def console_size(self, vm_id: str) -> int:
        vm = self.vms.get(vm_id)
        return len(vm.console.encode()) if vm else -1

    async def status(self, vm_id: str) -> VmStatus:
        vm = self.vms.get(vm_id)
        if vm is None:
            return VmStatus("missing")
        if not vm.alive:
            return VmStatus("stopped")
        return VmStatus("paused", 1, "paused") if vm.paused else VmStatus("running", 1, "running")

    async def metrics(self, vm_id: str) -> VmMetrics:
        if not self.is_alive(vm_id):
            raise VmError(f"VM {vm_id} is not running")
        return self.metered.get(vm_id) or VmMetrics(cpu_seconds=0.0, rss_bytes=0, uptime_s=0.0)

    async def run_to_exit(self, spec: VmSpec, timeout: float,
                          on_line: Callable[[str], Any] | None = None) -> int:
        await self.create(spec)
        for line in self.boot_log.splitlines():
            if on_line is not None:
                on_line(line)
        return 0

    # ---- what a test does to its VMs ----

    def crash(self, vm_id: str) -> None:
        """The VM's process exits on its own."""
        vm = self._vm(vm_id)
        vm.alive = vm.paused = False

    def say(self, vm_id: str, text: str) -> None:
        """The guest prints `text` on its console."""
        self._vm(vm_id).console += text

    def _vm(self, vm_id: str) -> FakeVm:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise VmError(f"no VM {vm_id!r}")
        return vm
