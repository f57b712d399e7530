"""What this host offers: vCPUs, memory, disk, and whether VMs get hardware KVM."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def kvm_usable(cpuinfo: str | None = None, modules: str | None = None) -> bool:
    """Hardware KVM: /dev/kvm present, CPU has vmx/svm, and it is not PVM (notes/infra.md).

    PVM's /dev/kvm (the kvm_pvm module) cannot run a stock kernel, so it counts as no KVM.
    """
    if not os.path.exists("/dev/kvm"):
        return False
    if cpuinfo is None:
        cpuinfo = _read("/proc/cpuinfo")
    if modules is None:
        modules = _read("/proc/modules")
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"vmx", "svm"}) and "kvm_pvm" not in modules


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def detect(data_dir: Path) -> dict:
    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    page_size = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    try:
        disk_free = shutil.disk_usage(data_dir).free
    except OSError:
        disk_free = 0
    return {
        "vcpus": os.cpu_count() or 1,
        "memory_mb": pages * page_size // (1024 * 1024),
        "disk_gb": disk_free // (1024**3),
        "gpus": 0,
        "kvm": kvm_usable(),
    }
