"""What a VM is, as the driver and any other backend (backend.py) take it: the spec to boot, the
status and metrics they report, and the one error they raise."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# what an instance may ask for (its record's bounds): every instance the state holds can be made
# into a VM (QEMU itself takes up to 288 vCPUs)
from formation.crdt.kinds.user_kinds import MAX_DISK_GB, MAX_VCPUS

from .gpus import PCI_ADDRESS

VM_ID_RE = re.compile(r"[A-Za-z0-9_.@-]{1,128}")
# a value that goes on the kernel command line as key=value: one word, no quotes
CMDLINE_WORD_RE = re.compile(r"[A-Za-z0-9_.:/@+-]{1,253}")
MODES = ("run", "build", "probe")
MACHINES = ("microvm", "q35")
PATHS = ("kernel", "initrd", "image", "secrets")  # the spec's host files


class VmError(Exception):
    pass


@dataclass(frozen=True)
class VmSpec:
    vm_id: str
    kernel: Path
    initrd: Path
    image: Path | None  # raw ext4 root; None only for probe boots, which never mount a disk
    vcpus: int = 1
    memory_mb: int = 512
    tap: str | None = None
    mac: str | None = None
    ip_cidr: str | None = None
    gateway: str | None = None
    hostname: str | None = None
    mode: str = "run"
    extra_append: str = ""
    netns: str | None = None
    machine: str = "microvm"
    writable_image: bool = False  # build VMs write into the image itself (no overlay)
    # with a bridge, boot creates the tap on it; either way the tap is this VM's: delete removes it
    bridge: str | None = None
    # QEMU's user-mode network (NAT through the QEMU process; the host is 10.0.2.2): outbound
    # only, no tap, no root; what a build VM gets when builds may use the network
    user_net: bool = False
    # the size of the VM's disk (its overlay's virtual size, in GiB): what the guest can write at
    # most; None: as big as the image (build VMs, tests)
    disk_gb: int | None = None
    # PCI addresses of host GPUs given to the VM (VFIO passthrough: gpus.py); q35 machines only
    gpus: tuple[str, ...] = ()
    # the instance's secrets (formation.guest.secrets_tar): a second, read-only disk that the
    # guest unpacks into /run/secrets and the entrypoint's environment; None: no secrets
    secrets: Path | None = None

    def __post_init__(self) -> None:
        check_vm_id(self.vm_id)
        object.__setattr__(self, "gpus", tuple(self.gpus))
        for addr in self.gpus:
            if not isinstance(addr, str) or not PCI_ADDRESS.fullmatch(addr):
                raise ValueError(f"bad GPU PCI address {addr!r}: like 0000:01:00.0")
        if self.gpus and self.machine != "q35":
            raise ValueError("GPUs are given to q35 machines only (microvm has no PCI bus to put them on)")
        if len(set(self.gpus)) != len(self.gpus):
            raise ValueError("a GPU is given to a VM once")
        for name in PATHS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.machine not in MACHINES:
            raise ValueError(f"machine must be one of {MACHINES}, not {self.machine!r}")
        if self.image is None and self.mode != "probe":
            raise ValueError("only probe VMs may boot without an image")
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise ValueError(f"vcpus must be 1..{MAX_VCPUS}, not {self.vcpus}")
        if not 64 <= self.memory_mb <= 1024 * 1024:
            raise ValueError(f"memory_mb must be at least 64, not {self.memory_mb}")
        if self.disk_gb is not None and not 1 <= self.disk_gb <= MAX_DISK_GB:
            raise ValueError(f"disk_gb must be 1..{MAX_DISK_GB}, not {self.disk_gb}")
        for name in ("ip_cidr", "gateway", "hostname", "mac"):
            value = getattr(self, name)
            if value is not None and not CMDLINE_WORD_RE.fullmatch(value):
                raise ValueError(f"bad {name} {value!r}")
        if self.bridge is not None and self.tap is None:
            raise ValueError("a bridge needs a tap")
        if self.user_net and self.tap is not None:
            raise ValueError("a VM has a tap or the user-mode network, not both")

    def to_json(self) -> str:
        d = asdict(self)
        for name in PATHS:
            d[name] = None if d[name] is None else str(d[name])
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VmSpec:
        d = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class VmStatus:
    state: str  # "running" | "paused" | "stopped" | "missing"
    pid: int | None = None
    qemu_status: str | None = None  # QMP's own word (running, paused, internal-error, ...)
    launched_at: float | None = None  # wall-clock time of the last boot


@dataclass(frozen=True)
class VmMetrics:
    cpu_seconds: float
    rss_bytes: int
    uptime_s: float


def check_vm_id(vm_id: str) -> None:
    if not isinstance(vm_id, str) or not VM_ID_RE.fullmatch(vm_id):
        raise ValueError(f"bad VM id {vm_id!r}: 1-128 of A-Z a-z 0-9 _ . @ -")
