"""What this host offers: vCPUs, memory, disk, and whether VMs get hardware KVM."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from formation.vm.accel import kvm_problem


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
        # the same test the QEMU driver chooses its accelerator by: what the node advertises is
        # what its VMs get
        "kvm": kvm_problem() is None,
    }
