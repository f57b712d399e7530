"""A VM host without QEMU, root or a bridge, for tests of the scheduler: FakeVmHost has what the
scheduler needs of a VmHost (ports.VmHostPort) over the shipped in-memory backend
(formation/vm/fake.py); FakeBuilds is a build service that knows no builds.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from formation.node.vmhost import VmUnavailable, address_count, pick_address, pick_gpus
from formation.vm import network
from formation.vm.fake import FakeBackend
from formation.vm.spec import VmSpec


class FakeVmHost:
    def __init__(self, root: Path, subnet: str = "10.77.0.0/24"):
        root.mkdir(parents=True, exist_ok=True)
        self.driver = FakeBackend(root / "vms")
        self.images_dir = root / "images"
        self.images_dir.mkdir(exist_ok=True)
        self.subnet = ipaddress.ip_network(subnet)
        self.bridge = "fmfake-no-such"  # the scheduler's orphan-tap sweep finds no such bridge
        self.kernel, self.initrd = root / "vmlinuz", root / "initrd.img"
        self.kernel.write_bytes(b"kernel")
        self.initrd.write_bytes(b"initrd")

    def describe(self) -> dict:
        return {"accel": self.driver.accel, "machine": "microvm", "bridge": self.bridge,
                "subnet": str(self.subnet), "kernel": "fake", "nat": False}

    def add_image(self, build_id: str) -> Path:
        """An image `find_image` finds: images/<build_id>/manifest.json and image.raw."""
        d = self.images_dir / build_id
        d.mkdir(parents=True, exist_ok=True)
        (d / "image.raw").write_bytes(b"\0" * 4096)
        (d / "manifest.json").write_text(json.dumps({"id": build_id}))
        return d / "image.raw"

    def pick_ip(self, instance_id: str, taken: set[str]) -> str:
        return pick_address(self.subnet, instance_id, taken)  # the real one: it is pure

    def vm_addresses(self) -> int:
        return address_count(self.subnet)

    def disk_in_use(self) -> int:
        return 0  # its VMs have no disks

    host_gpus: tuple = ()  # the fake host's GPUs (formation.vm.gpus.Gpu), for GPU placement tests

    def gpus(self) -> tuple:
        return self.host_gpus

    def pick_gpus(self, gpu: dict, taken: set[str]) -> tuple[str, ...]:
        return pick_gpus(self.host_gpus, gpu, taken)

    def spec_for(self, instance_id: str, ip: str, *, vcpus: int, memory_mb: int, image: Path,
                 hostname: str, disk_gb: int | None = None, gpus: tuple[str, ...] = (),
                 secrets: Path | None = None) -> VmSpec:
        try:
            return VmSpec(vm_id=instance_id, kernel=self.kernel, initrd=self.initrd, image=image,
                          vcpus=vcpus, memory_mb=memory_mb, tap=network.tap_name(instance_id),
                          ip_cidr=f"{ip}/{self.subnet.prefixlen}", gateway=str(next(self.subnet.hosts())),
                          hostname=hostname, disk_gb=disk_gb, gpus=gpus, machine="q35" if gpus else "microvm",
                          secrets=secrets)
        except ValueError as exc:  # as VmHost.spec_for says it
            raise VmUnavailable(f"cannot make a VM of this instance: {exc}") from None


class FakeBuilds:
    """A build service that builds instantly: submit() puts the image into `vms` when the inputs
    are the ones `expected` names (build id -> context bytes), and records every call."""

    def __init__(self, vms: FakeVmHost | None = None, expected: dict[str, bytes] | None = None):
        self.vms = vms
        self.expected = expected or {}
        self.contexts: dict[str, bytes] = {}  # contexts uploaded to this node, by build id
        self.submitted: list[tuple] = []
        self.checked: list[bytes] = []  # contexts given to image_id_of

    def status(self, build_id: str) -> dict | None:
        return None

    def context_bytes(self, build_id: str) -> bytes | None:
        return self.contexts.get(build_id)

    async def image_id_of(self, formfile: str, context: bytes | None) -> str:
        """The id `expected` names for this context; any other context makes another image (the
        scheduler checks a fetched context with this before it builds)."""
        if context is None:
            return "formfile-alone-" + "0" * 40  # no instance of these tests builds without a context
        self.checked.append(context)
        made = [bid for bid, wanted in self.expected.items() if context == wanted]
        return made[0] if made else "another-image-" + "0" * 40

    async def submit(self, formfile: str, context: bytes | None, owner: str) -> dict:
        self.submitted.append((formfile, context, owner))
        for bid, wanted in self.expected.items():
            if context == wanted and self.vms is not None:
                self.vms.add_image(bid)
                return {"build_id": bid, "state": "done"}
        raise AssertionError(f"unexpected build: context {context!r}")
