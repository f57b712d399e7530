"""A VM host without QEMU, root or a bridge, for tests of the scheduler.

FakeDriver keeps its VMs in a dict and mirrors the parts of QemuDriver's API the scheduler uses
(list, is_alive, create, boot, stop, delete, vm_dir, spec, console_log). A booted VM's console
shows the guest init's markers at once, so the scheduler reports it running on its next pass.
FakeVmHost has what the scheduler reads of a VmHost (driver, images_dir, pick_ip, spec_for);
FakeBuilds is a build service that knows no builds.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from formation.vm import network
from formation.vm.driver import VmError, VmSpec

BOOT_LOG = "FORMATION-GUEST-INIT\nguest init: mounting root\nFORMATION-GUEST entrypoint-start\n"


@dataclass
class FakeVm:
    spec: VmSpec
    alive: bool = False
    boots: int = 0
    console: str = ""


@dataclass
class FakeDriver:
    state_dir: Path
    boot_log: str = BOOT_LOG
    vms: dict[str, FakeVm] = field(default_factory=dict)
    events: list[tuple[str, str]] = field(default_factory=list)  # (what, vm_id), in order

    def vm_dir(self, vm_id: str) -> Path:
        return self.state_dir / f"vm-{vm_id}"

    def spec(self, vm_id: str) -> VmSpec:
        if vm_id not in self.vms:
            raise VmError(f"no VM {vm_id!r}")
        return self.vms[vm_id].spec

    def list(self) -> list[str]:
        return sorted(self.vms)

    def is_alive(self, vm_id: str) -> bool:
        vm = self.vms.get(vm_id)
        return vm is not None and vm.alive

    def running(self) -> list[str]:
        return sorted(i for i, vm in self.vms.items() if vm.alive)

    async def create(self, spec: VmSpec) -> Path:
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
        vm_dir = self.vm_dir(spec.vm_id)
        vm_dir.mkdir(parents=True, exist_ok=True)
        (vm_dir / "spec.json").write_text(spec.to_json())  # the scheduler looks for it
        return vm_dir

    async def boot(self, vm_id: str) -> float:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise VmError(f"no VM {vm_id!r}")
        if vm.alive:
            return 0.0
        self.events.append(("boot", vm_id))
        vm.alive, vm.boots = True, vm.boots + 1
        vm.console += self.boot_log
        return 0.0

    async def stop(self, vm_id: str, timeout: float = 30.0) -> str:
        vm = self.vms.get(vm_id)
        if vm is None or not vm.alive:
            return "stopped"
        self.events.append(("stop", vm_id))
        vm.alive = False
        return "powerdown"

    async def delete(self, vm_id: str) -> None:
        if vm_id in self.vms:
            self.events.append(("delete", vm_id))
            del self.vms[vm_id]
        shutil.rmtree(self.vm_dir(vm_id), ignore_errors=True)

    def console_log(self, vm_id: str, tail_bytes: int | None = None) -> str:
        vm = self.vms.get(vm_id)
        text = vm.console if vm else ""
        return text[-tail_bytes:] if tail_bytes else text

    def crash(self, vm_id: str) -> None:
        """The VM's QEMU exits on its own."""
        self.vms[vm_id].alive = False


class FakeVmHost:
    def __init__(self, root: Path, subnet: str = "10.77.0.0/24"):
        root.mkdir(parents=True, exist_ok=True)
        self.driver = FakeDriver(root / "vms")
        self.images_dir = root / "images"
        self.images_dir.mkdir(exist_ok=True)
        self.subnet = ipaddress.ip_network(subnet)
        self.bridge = "fmfake-no-such"  # the scheduler's orphan-tap sweep finds no such bridge
        self.kernel, self.initrd = root / "vmlinuz", root / "initrd.img"
        self.kernel.write_bytes(b"kernel")
        self.initrd.write_bytes(b"initrd")

    def add_image(self, build_id: str) -> Path:
        """An image `find_image` finds: images/<build_id>/manifest.json and image.raw."""
        d = self.images_dir / build_id
        d.mkdir(parents=True, exist_ok=True)
        (d / "image.raw").write_bytes(b"\0" * 4096)
        (d / "manifest.json").write_text(json.dumps({"id": build_id}))
        return d / "image.raw"

    def pick_ip(self, instance_id: str, taken: set[str]) -> str:
        hosts = list(self.subnet.hosts())[1:]
        start = int.from_bytes(hashlib.sha256(instance_id.encode()).digest()[:4], "big") % len(hosts)
        for i in range(len(hosts)):
            ip = str(hosts[(start + i) % len(hosts)])
            if ip not in taken:
                return ip
        raise AssertionError("fake subnet full")

    def spec_for(self, instance_id: str, ip: str, *, vcpus: int, memory_mb: int, image: Path,
                 hostname: str) -> VmSpec:
        return VmSpec(vm_id=instance_id, kernel=self.kernel, initrd=self.initrd, image=image,
                      vcpus=vcpus, memory_mb=memory_mb, tap=network.tap_name(instance_id),
                      ip_cidr=f"{ip}/{self.subnet.prefixlen}", gateway=str(next(self.subnet.hosts())),
                      hostname=hostname)


class FakeBuilds:
    """A build service that builds instantly: submit() puts the image into `vms` when the inputs
    are the ones `expected` names (build id -> context bytes), and records every call."""

    def __init__(self, vms: FakeVmHost | None = None, expected: dict[str, bytes] | None = None):
        self.vms = vms
        self.expected = expected or {}
        self.contexts: dict[str, bytes] = {}  # contexts uploaded to this node, by build id
        self.submitted: list[tuple] = []

    def status(self, build_id: str) -> dict | None:
        return None

    def context_bytes(self, build_id: str) -> bytes | None:
        return self.contexts.get(build_id)

    async def image_id_of(self, formfile: str, context: bytes | None) -> str:
        return "formfile-alone-" + "0" * 40  # no instance of these tests builds without a context

    async def submit(self, formfile: str, context: bytes | None, owner: str) -> dict:
        self.submitted.append((formfile, context, owner))
        for bid, wanted in self.expected.items():
            if context == wanted and self.vms is not None:
                self.vms.add_image(bid)
                return {"build_id": bid, "state": "done"}
        raise AssertionError(f"unexpected build: context {context!r}")
