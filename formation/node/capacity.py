"""What this host offers: vCPUs, memory, disk, VM addresses, and whether VMs get hardware KVM.

Disk is what the node's VMs may fill, for placement to book their DISK against
(placement.BOOKED): the free space of the filesystem the VMs' overlays are on, plus what the
overlays there hold already (their instances are booked already), less a reserve kept for
everything else the node writes (its op log, images, build contexts, logs). Each overlay is
capped at its instance's DISK (vm/driver.py), so the VMs together cannot fill more than was
booked, and the reserve stays free.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from formation.pack.formfile import GPU_MODELS
from formation.vm import gpus as host_gpus
from formation.vm.accel import kvm_problem

GIB = 1024**3
DISK_RESERVE_BYTES = 5 * GIB  # at least this, or DISK_RESERVE_SHARE of the filesystem if more
DISK_RESERVE_SHARE = 0.05


def detect(data_dir: Path, vms: Any = None, gpus: Iterable[host_gpus.Gpu] | None = None) -> dict:
    """The capacity a node record advertises. `vms`: the node's VM side (vmside.py); when it
    has a VM host, its subnet's VM addresses are advertised too, and the GPUs it can give VMs
    (`gpus` overrides what it finds)."""
    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    page_size = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    host = getattr(vms, "host", None)  # VmsStarting and VmsOn have one
    out = {
        "vcpus": os.cpu_count() or 1,
        "memory_mb": pages * page_size // (1024 * 1024),
        "disk_gb": vm_disk_gb(data_dir, host.disk_in_use() if host is not None else 0),
        # a node without a VM host gives no GPU to any VM
        **gpu_capacity(gpus if gpus is not None else host.gpus() if host is not None else ()),
        # the same test the QEMU driver chooses its accelerator by: what the node advertises is
        # what its VMs get
        "kvm": kvm_problem() is None,
    }
    if host is not None:
        out["vm_addresses"] = host.vm_addresses()
    return out


def vm_disk_gb(data_dir: Path, in_use: int = 0) -> int:
    """GiB the VMs may fill: free space + `in_use` (bytes the VMs' disks hold now) - the reserve."""
    try:
        usage = shutil.disk_usage(data_dir)
    except OSError:
        return 0
    reserve = max(DISK_RESERVE_BYTES, int(usage.total * DISK_RESERVE_SHARE))
    return max(0, usage.free + in_use - reserve) // GIB


@functools.cache
def host_gpu_list() -> tuple[host_gpus.Gpu, ...]:
    """This host's GPUs, read once (a GPU is bound to vfio-pci before the node starts)."""
    return tuple(host_gpus.detect())


def gpu_model(gpu: host_gpus.Gpu) -> str:
    """The Formfile's name for a GPU (GPU H100:2) when its PCI name contains one, else its name."""
    squashed = re.sub(r"[^A-Z0-9]", "", gpu.name.upper())
    for model in GPU_MODELS:
        if model in squashed:
            return model
    return re.sub(r"[^A-Za-z0-9._ -]", "", gpu.name)[:64] or f"{gpu.vendor_id}:{gpu.device_id}"


def gpu_capacity(gpus: Iterable[host_gpus.Gpu]) -> dict:
    """What a node advertises of its GPUs: those a VM can be given (VFIO), and their models."""
    usable = [g for g in gpus if g.passthrough]
    return {"gpus": len(usable), "gpu_models": [gpu_model(g) for g in usable]}
