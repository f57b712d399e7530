"""A VM's disk is capped at its DISK: the overlay's virtual size is the instance's disk_gb, so
qcow2 allocates no more than that (and its tables) whatever the guest writes, and the guest's
block device ends there. An image larger than the disk is refused, not truncated.

The attack (found by an earlier session): the overlay took the image's size, and the image's
size came from the Formfile's DISK (up to 16 TB, sparse), not from what placement booked for the
instance, so a tenant could fill the host's disk. No guest is booted: qemu-io writes as a guest's
virtio-blk would (qemu's block layer refuses a request past the device's end either way).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from formation.vm.driver import QemuDriver
from formation.vm.spec import VmError, VmSpec
from tests.vm_support import needs_qemu

GIB = 1024**3
pytestmark = needs_qemu


def kit(tmp_path: Path) -> tuple[Path, Path]:
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd.img"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    return kernel, initrd


def info(path: Path) -> dict:
    return json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                                     capture_output=True, text=True, check=True).stdout)


def write(path: Path, offset: int, length: int) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0xab {offset} {length}", str(path)],
                          capture_output=True, text=True)


async def test_the_overlay_is_as_big_as_the_instances_disk_and_no_bigger(tmp_path):
    kernel, initrd = kit(tmp_path)
    image = tmp_path / "image.raw"
    with open(image, "wb") as f:
        f.truncate(64 * 1024 * 1024)  # a filesystem smaller than the disk: fine
    driver = QemuDriver(tmp_path / "state", accel="tcg")
    overlay = await driver.create(VmSpec("a", kernel, initrd, image, disk_gb=1)) / "overlay.qcow2"
    assert info(overlay)["virtual-size"] == 1 * GIB
    assert write(overlay, GIB - 65536, 65536).returncode == 0  # its last block: written
    beyond = write(overlay, GIB, 65536)  # one past the end: refused
    assert beyond.returncode != 0 and "write failed" in beyond.stdout + beyond.stderr
    assert overlay.stat().st_blocks * 512 < 2 * 1024 * 1024


async def test_an_image_larger_than_the_disk_is_refused_and_a_new_disk_size_gives_a_fresh_overlay(tmp_path):
    kernel, initrd = kit(tmp_path)
    image = tmp_path / "image.raw"
    with open(image, "wb") as f:
        f.truncate(20 * GIB)  # a Formfile's DISK 20, sparse: costs nothing to make
    driver = QemuDriver(tmp_path / "state", accel="tcg")
    # the instance booked 5 GB: before, its overlay was the image's 20 GiB
    with pytest.raises(VmError, match=r"its image's filesystem is 20 GiB, more than its disk of 5 GiB"):
        await driver.create(VmSpec("a", kernel, initrd, image, disk_gb=5))
    assert not (driver.vm_dir("a") / "overlay.qcow2").exists()
    vm_dir = await driver.create(VmSpec("a", kernel, initrd, image, disk_gb=20))
    assert info(vm_dir / "overlay.qcow2")["virtual-size"] == 20 * GIB
    keep = tmp_path / "first-overlay"  # a second name keeps its inode from being reused
    os.link(vm_dir / "overlay.qcow2", keep)
    made = os.stat(keep).st_ino
    await driver.create(VmSpec("a", kernel, initrd, image, disk_gb=30))  # the owner gave it more
    assert info(vm_dir / "overlay.qcow2")["virtual-size"] == 30 * GIB
    assert os.stat(vm_dir / "overlay.qcow2").st_ino != made
    # build VMs and specs without a disk size keep the image's size (what they had)
    plain = await driver.create(VmSpec("b", kernel, initrd, image))
    assert info(plain / "overlay.qcow2")["virtual-size"] == 20 * GIB
