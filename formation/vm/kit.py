"""The guest boot kit: the kernel and initramfs every Formation VM boots with.

Debian's cloud kernel (PVH-bootable once unpacked to vmlinux, so QEMU starts it in 64-bit mode
with no decompressor) has every virtio driver as a module and no `ip=`; our initramfs therefore
carries busybox, the modules a VM needs, and the two stages of the guest init in formation/guest.
Both packages are fetched with the host's apt into a private tree (formation.debian), so the host
can be any Debian or Ubuntu. The kit is made once per kernel version and init scripts, and kept.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from formation import guest
from formation.debian import AptError, AptTree, file_lock, unpack

KERNEL_META = "linux-image-cloud-amd64"
# what a VM needs: virtio over MMIO (microvm) and PCI (q35), disk, network, and the ACPI power
# button with its input device (graceful stop); their dependencies are found from modinfo
MODULES = ("virtio_mmio", "virtio_pci", "virtio_blk", "virtio_net", "button", "evdev")
LISTS_MAX_AGE = 24 * 3600


class KitError(Exception):
    pass


@dataclass(frozen=True)
class BootKit:
    kernel: Path  # vmlinux (PVH) or, if it could not be unpacked, the compressed bzImage
    initrd: Path
    kernel_version: str


def _init_hash() -> str:
    h = hashlib.sha256()
    for name in guest.SCRIPTS:
        h.update((guest.DIR / name).read_bytes())
    h.update(",".join(MODULES).encode())
    return h.hexdigest()[:12]


def ensure_kit(cache_dir: Path, progress: Callable[[str], None] = lambda _m: None) -> BootKit:
    """The kit in `cache_dir`, made first if missing (about 10 s, 40 MB of downloads). Blocking."""
    with file_lock(cache_dir / ".lock"):
        return _ensure_kit(cache_dir, progress)


def _ensure_kit(cache_dir: Path, progress: Callable[[str], None]) -> BootKit:
    apt_root = cache_dir / "apt"
    tree = AptTree.init(apt_root)
    lists = apt_root / "var/lib/apt/lists"
    fresh = any(lists.glob("*_Packages*")) and time.time() - lists.stat().st_mtime < LISTS_MAX_AGE
    try:
        if not fresh:
            progress("fetching Debian package lists")
            tree.update()
            os.utime(lists)
        version = tree.depends(KERNEL_META)[0].removeprefix("linux-image-")
    except (AptError, IndexError) as exc:
        # offline: the newest kit made with these init scripts, else the newest of any
        existing = sorted(cache_dir.glob("kit-*/kit.json"),
                          key=lambda p: (p.parent.name.endswith(_init_hash()), p.stat().st_mtime))
        if existing:
            return _load(existing[-1].parent)
        raise KitError(f"cannot find the guest kernel package {KERNEL_META}: {exc}") from None
    kit_dir = cache_dir / f"kit-{version}-{_init_hash()}"
    if (kit_dir / "kit.json").exists():
        return _load(kit_dir)
    progress(f"making the guest boot kit (kernel {version})")
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp_name:
        tmp = Path(tmp_name)
        debs = tree.download([f"linux-image-{version}", "busybox-static"], tmp / "debs")
        for deb in debs:
            unpack(deb, tmp / "root")
        root = tmp / "root"
        staging = tmp / "kit"
        staging.mkdir()
        vmlinuz = root / "boot" / f"vmlinuz-{version}"
        kernel = staging / "vmlinux"
        if not _extract_vmlinux(vmlinuz, kernel):
            kernel = staging / "vmlinuz"
            shutil.copyfile(vmlinuz, kernel)
        busybox = staging / "busybox"
        shutil.copyfile(root / "bin/busybox", busybox)
        busybox.chmod(0o755)
        modules = _module_closure(root / "lib/modules" / version, MODULES)
        _write_initramfs(staging / "initrd.gz", busybox, modules)
        meta = {"kernel": kernel.name, "initrd": "initrd.gz", "busybox": "busybox",
                "kernel_version": version, "modules": [m for m, _ in modules]}
        (staging / "kit.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(kit_dir, ignore_errors=True)
        staging.rename(kit_dir)
    progress(f"guest boot kit ready in {kit_dir}")
    return _load(kit_dir)


def _load(kit_dir: Path) -> BootKit:
    meta = json.loads((kit_dir / "kit.json").read_text())
    return BootKit(kernel=kit_dir / meta["kernel"], initrd=kit_dir / meta["initrd"],
                   kernel_version=meta["kernel_version"])


def _extract_vmlinux(vmlinuz: Path, out: Path) -> bool:
    """The ELF inside Debian's LZ4-compressed bzImage (lz4 legacy frame), if lz4 is installed."""
    data = vmlinuz.read_bytes()
    at = data.find(b"\x02\x21\x4c\x18")
    if at < 0 or not shutil.which("lz4"):
        return False
    # lz4 exits 1 on the bzImage's trailing bytes after the frame; the output is whole
    proc = subprocess.run(["lz4", "-dc"], input=data[at:], capture_output=True)
    if not proc.stdout.startswith(b"\x7fELF"):
        return False
    out.write_bytes(proc.stdout)
    return True


def _modinfo_depends(ko: Path) -> list[str]:
    for field in ko.read_bytes().split(b"\0"):
        if field.startswith(b"depends="):
            return [d for d in field[8:].decode().split(",") if d]
    return []


def _module_closure(moddir: Path, wanted: tuple[str, ...]) -> list[tuple[str, Path]]:
    """`wanted` and what they depend on, in load order (dependencies first)."""
    index = {}
    for ko in moddir.rglob("*.ko"):
        index[ko.stem.replace("-", "_")] = ko
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name not in index:  # built into the kernel
            return
        for dep in _modinfo_depends(index[name]):
            visit(dep)
        order.append((name, index[name]))

    for name in wanted:
        visit(name)
    return order


def _write_initramfs(out: Path, busybox: Path, modules: list[tuple[str, Path]]) -> None:
    """A gzip'd cpio (newc) made in Python: no cpio binary, no root-owned temp tree."""
    files: list[tuple[str, int, bytes]] = [
        ("bin", 0o040755, b""), ("dev", 0o040755, b""), ("proc", 0o040755, b""),
        ("sys", 0o040755, b""), ("newroot", 0o040755, b""), ("modules", 0o040755, b""),
        ("bin/busybox", 0o100755, busybox.read_bytes()),
        ("init", 0o100755, (guest.DIR / "init").read_bytes()),
        ("guest-init", 0o100644, (guest.DIR / "guest-init").read_bytes()),
        ("modules.order", 0o100644, "".join(f"{n}\n" for n, _ in modules).encode()),
    ]
    files += [(f"modules/{n}.ko", 0o100644, p.read_bytes()) for n, p in modules]
    buf = io.BytesIO()
    ino = 1
    # /dev/console must exist before devtmpfs is mounted, for the kernel to open it for /init
    entries = [("dev/console", 0o020600, b"", (5, 1))] + [(n, m, d, (0, 0)) for n, m, d in files]
    for name, mode, data, (rmaj, rmin) in [*entries, ("TRAILER!!!", 0, b"", (0, 0))]:
        raw = name.encode() + b"\0"
        header = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, rmaj, rmin, len(raw), 0))
        buf.write(header.encode() + raw)
        buf.write(b"\0" * (-(110 + len(raw)) % 4))
        buf.write(data)
        buf.write(b"\0" * (-len(data) % 4))
        ino += 1
    out.write_bytes(gzip.compress(buf.getvalue(), compresslevel=1, mtime=0))
