"""The node's VM side: whether it can run VMs, the guest boot kit, its bridge and subnet, the
QEMU driver, and the build machine the image builder boots its steps in.

VMs need root (taps, a bridge) and QEMU. With `vm.enabled = "auto"` a node lacking either still
runs (state, gossip, API) and says why it runs no VMs; with "true" that is an error at start.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import trio

from formation.mesh.wggo import iface_name
from formation.pack.builder import Builder
from formation.vm import network
from formation.vm.backend import VmBackend
from formation.vm.driver import QemuDriver
from formation.vm.gpus import Gpu
from formation.vm.kit import BootKit, KitError, ensure_kit
from formation.vm.spec import VmSpec

from . import capacity
from .config import Config

log = logging.getLogger("formation.vm")


class VmUnavailable(Exception):
    pass


# the fog's VM address space: where "auto" subnets come from, and the only VM subnets formnet
# routes to another member (a member naming a LAN range must not capture the hosts' own traffic)
VM_SPACE = (ipaddress.ip_address("10.200.0.0"), ipaddress.ip_address("10.249.255.255"))


def in_vm_space(subnet: ipaddress.IPv4Network) -> bool:
    low, high = VM_SPACE
    return low <= subnet.network_address and subnet.broadcast_address <= high


def auto_subnet(address: str) -> str:
    """A /24 in 10.200.0.0-10.249.255.0 chosen by the node's address, so that nodes of one fog
    (whose VM subnets formnet will route) rarely collide without any coordination."""
    h = hashlib.sha256(address.lower().encode()).digest()
    return f"10.{200 + h[0] % 50}.{h[1]}.0/24"


def requirements_problem() -> str:
    if os.geteuid() != 0:
        return "the node is not running as root (VM taps and the bridge need it)"
    for tool in ("qemu-system-x86_64", "qemu-img", "ip"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    return ""


class VmHost:
    def __init__(self, config: Config, address: str):
        vm = config.vm
        self.config = config
        self.address = address
        self.data_dir = config.data_dir
        self.cache_dir = Path(vm.cache_dir) if vm.cache_dir else config.data_dir / "cache"
        # images are immutable and content-addressed: nodes sharing a cache share them
        self.images_dir = self.cache_dir / "images"
        self.subnet = ipaddress.ip_network(auto_subnet(address) if vm.subnet == "auto" else vm.subnet)
        self.gateway = next(self.subnet.hosts())
        self.bridge = vm.bridge
        self.machine = vm.machine
        self.driver: VmBackend = QemuDriver(self.data_dir / "vms", None if vm.accel == "auto" else vm.accel)
        self.kit: BootKit | None = None
        self.nat = False  # VMs reach beyond the host (set up by `setup`)

    @classmethod
    def check(cls, config: Config, address: str) -> tuple[VmHost | None, str]:
        """The VM host, or None and why VMs are off on this node."""
        setting = config.vm.enabled
        if setting == "false":
            return None, "VMs are disabled in the configuration (vm.enabled = false)"
        problem = requirements_problem()
        if problem:
            if setting == "true":
                raise VmUnavailable(f"vm.enabled = true but {problem}")
            return None, problem
        try:
            return cls(config, address), ""
        except Exception as exc:  # noqa: BLE001 - e.g. kvm asked for and unusable
            if setting == "true":
                raise VmUnavailable(str(exc)) from None
            return None, str(exc)

    async def setup(self, progress: Callable[[str], None] = log.info) -> None:
        """Kit (downloaded and made once), bridge up with the gateway address."""
        try:
            self.kit = await trio.to_thread.run_sync(ensure_kit, self.cache_dir / "kit", progress)
        except KitError as exc:
            raise VmUnavailable(str(exc)) from None
        # forwarding: VMs reach other nodes' VMs over formnet, and beyond the host with NAT
        await network.ensure_bridge(self.bridge, f"{self.gateway}/{self.subnet.prefixlen}",
                                    ip_forward=True)
        if self.config.vm.nat and shutil.which("nft"):
            # the members route a VM subnet back over formnet only inside the fog's VM space
            # (formnet.allowed_subnets); from elsewhere, a VM's packets would arrive with a source
            # the peer's WireGuard drops, so they leave with this host's overlay address instead
            await network.ensure_nat(str(self.subnet),
                                     mesh_iface=iface_name(self.address) if in_vm_space(self.subnet) else None)
            self.nat = True
        elif self.config.vm.nat:
            log.warning("VMs have no way out of this host: vm.nat needs nft (apt-get install nftables)")
        self.images_dir.mkdir(parents=True, exist_ok=True)
        log.info("VMs on: accel %s, %s, bridge %s %s/%d, kernel %s", self.driver.accel, self.machine,
                 self.bridge, self.gateway, self.subnet.prefixlen, self.kit.kernel_version)

    def describe(self) -> dict:
        """What `form node status` and /health say of the VM side."""
        return {"accel": self.driver.accel, "machine": self.machine, "bridge": self.bridge,
                "subnet": str(self.subnet), "kernel": self.kit.kernel_version if self.kit else None,
                "nat": self.nat}

    def builder(self) -> Builder:
        vm = self.config.vm
        return Builder(self.images_dir, self.cache_dir, self.build_machine,
                       context_limit=vm.context_limit_mb * 1024 * 1024,
                       timeout=float(vm.build_timeout_seconds), network=vm.build_network)

    async def build_machine(self, image: Path, *, vcpus: int, memory_mb: int, timeout: float,
                            on_line: Callable[[str], None], network: bool = False) -> None:
        """The builder's VM: boots `image` writable in build mode; no network unless asked, and
        then only QEMU's user-mode NAT (outbound connections, nothing reaches in)."""
        assert self.kit is not None
        vm_id = f"build-{secrets.token_hex(6)}"
        spec = VmSpec(vm_id=vm_id, kernel=self.kit.kernel, initrd=self.kit.initrd, image=image,
                      vcpus=vcpus, memory_mb=memory_mb, mode="build", writable_image=True,
                      machine=self.machine, user_net=network)
        try:
            await self.driver.run_to_exit(spec, timeout, on_line)
        finally:
            with trio.CancelScope(shield=True):
                await self.driver.delete(vm_id)

    def spec_for(self, instance_id: str, ip: str, *, vcpus: int, memory_mb: int, image: Path,
                 hostname: str, disk_gb: int | None = None, gpus: tuple[str, ...] = (),
                 secrets: Path | None = None) -> VmSpec:
        """`gpus`: PCI addresses from `pick_gpus`; a VM with GPUs is a q35 machine (PCI).
        `secrets`: the instance's secrets disk (node/secrets.py), None when it has none."""
        assert self.kit is not None
        try:
            return VmSpec(vm_id=instance_id, kernel=self.kit.kernel, initrd=self.kit.initrd, image=image,
                          vcpus=vcpus, memory_mb=memory_mb, tap=network.tap_name(instance_id),
                          mac=network.mac_for(instance_id), ip_cidr=f"{ip}/{self.subnet.prefixlen}",
                          gateway=str(self.gateway), hostname=hostname,
                          machine="q35" if gpus else self.machine,
                          bridge=self.bridge, disk_gb=disk_gb, gpus=gpus, secrets=secrets)
        except ValueError as exc:  # what the record allows and a VM cannot be (a version skew)
            raise VmUnavailable(f"cannot make a VM of this instance: {exc}") from None

    def gpus(self) -> tuple[Gpu, ...]:
        """This host's GPUs (read once per process: a GPU is bound to vfio-pci before the node starts)."""
        return capacity.host_gpu_list()

    def pick_gpus(self, gpu: dict, taken: set[str]) -> tuple[str, ...]:
        """PCI addresses of the host GPUs (VFIO-ready) an instance asks for (`resources.gpu`:
        count and model), none of them in `taken` (other local VMs'). VmUnavailable, saying
        what is missing, when the host has too few free."""
        return pick_gpus(self.gpus(), gpu, taken)

    def pick_ip(self, instance_id: str, taken: set[str]) -> str:
        return pick_address(self.subnet, instance_id, taken)

    def disk_in_use(self) -> int:
        """Bytes the VMs' disks (their overlays) hold on this host now."""
        total = 0
        for overlay in (self.data_dir / "vms").glob("vm-*/overlay.qcow2"):
            try:
                total += overlay.stat().st_blocks * 512
            except OSError:
                continue  # deleted meanwhile
        return total

    def vm_addresses(self) -> int:
        """How many VMs the subnet holds (what the node advertises; placement books one each)."""
        return address_count(self.subnet)


def pick_gpus(host: Iterable[Gpu], gpu: dict, taken: set[str]) -> tuple[str, ...]:
    count, model = int(gpu.get("count", 0)), gpu.get("model")
    usable = [g for g in host if g.passthrough and (not model or capacity.gpu_model(g) == model)]
    free = [g.pci for g in usable if g.pci not in taken]
    if len(free) < count:
        what = f"{count} {model + ' ' if model else ''}GPU{'s' * (count != 1)}"
        raise VmUnavailable(
            f"this node has {len(usable)} such GPU{'s' * (len(usable) != 1)} a VM can be given "
            f"({len(usable) - len(free)} in use by other VMs); the instance asks {what}. A GPU is given to "
            "VMs once its host binds it to vfio-pci with the IOMMU on (docs/vms.md, \"GPUs\")")
    return tuple(free[:count])


def address_count(subnet: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    """VM addresses of a subnet: its hosts but the first, the gateway on the node's bridge."""
    hosts = subnet.num_addresses - 2 if subnet.prefixlen < subnet.max_prefixlen - 1 else subnet.num_addresses
    return max(0, hosts - 1)


def pick_address(subnet: ipaddress.IPv4Network | ipaddress.IPv6Network, instance_id: str,
                 taken: set[str]) -> str:
    """An address for a new VM: a probe sequence from the instance id's hash over the subnet's
    VM addresses (address_count), skipping those other local VMs hold. Arithmetic, not a list:
    a large subnet (a /16 holds 65,533 VMs) costs nothing more."""
    count = address_count(subnet)
    first = int(subnet.network_address) + (1 if subnet.num_addresses > 2 else 0) + 1  # after the gateway
    start = int.from_bytes(hashlib.sha256(instance_id.encode()).digest()[:4], "big") % max(count, 1)
    # at most len(taken) probes can hit a taken address: the next one is free, if any is
    for i in range(min(count, len(taken) + 1)):
        ip = str(ipaddress.ip_address(first + (start + i) % count))
        if ip not in taken:
            return ip
    raise VmUnavailable(
        f"no free address left for a VM on this node: its VM subnet {subnet} holds {count} VMs "
        f"and all are taken; a larger [vm] subnet in formation.toml (e.g. a /20 in "
        f"10.200.0.0-10.249.255.255: 4,093 VMs) gives room (docs/vms.md)")
