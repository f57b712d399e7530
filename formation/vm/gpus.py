"""The host's GPUs as sysfs shows them, and which of them a VM can be given (VFIO passthrough).

A GPU is a PCI function of the display class (0x03xxxx). A VM can have it when the host put it
in an IOMMU group (the IOMMU is on) and bound it to the vfio-pci driver: then QEMU takes it with
`-device vfio-pci,host=<address>` (driver.py). Binding is the host operator's choice (it takes
the GPU away from the host), never done here; docs/vms.md says how. Names come from the PCI ID
database (pci.ids, from the pciutils or hwdata package) when the host has it, else the ids.

Everything read here is the host's own sysfs; `root` lets tests hand a fake tree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PCI_ADDRESS = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
PCI_IDS = (Path("/usr/share/misc/pci.ids"), Path("/usr/share/hwdata/pci.ids"), Path("/usr/share/pci.ids"))
VENDORS = {"10de": "NVIDIA", "1002": "AMD", "8086": "Intel"}  # when there is no pci.ids
MAX_GPUS = 64


@dataclass(frozen=True)
class Gpu:
    pci: str  # "0000:01:00.0"
    vendor_id: str  # "10de"
    device_id: str  # "2330"
    vendor: str  # "NVIDIA Corporation", or VENDORS, or the id
    name: str  # "GH100 [H100 SXM5 80GB]", or the device id
    iommu_group: str | None
    driver: str | None

    @property
    def passthrough(self) -> bool:
        """Whether a VM can be given it now: in an IOMMU group and bound to vfio-pci."""
        return self.iommu_group is not None and self.driver == "vfio-pci"

    def to_dict(self) -> dict:
        return {"pci": self.pci, "vendor_id": self.vendor_id, "device_id": self.device_id, "vendor": self.vendor,
                "name": self.name, "iommu_group": self.iommu_group, "driver": self.driver,
                "passthrough": self.passthrough}


def detect(root: Path = Path("/"), pci_ids: Path | None = None) -> list[Gpu]:
    """The GPUs under `root`/sys/bus/pci/devices (at most MAX_GPUS), by PCI address."""
    devices = root / "sys" / "bus" / "pci" / "devices"
    try:
        entries = sorted(p for p in devices.iterdir() if PCI_ADDRESS.fullmatch(p.name))
    except OSError:
        return []
    found = []
    for dev in entries:
        cls = _read_hex(dev / "class")
        if cls is None or not cls.startswith("03"):
            continue
        vendor, device = _read_hex(dev / "vendor"), _read_hex(dev / "device")
        if vendor is None or device is None:
            continue
        found.append((dev, vendor[-4:], device[-4:]))
        if len(found) >= MAX_GPUS:
            break
    names = _names({v for _, v, _ in found}, pci_ids if pci_ids is not None else _pci_ids(root))
    out = []
    for dev, vendor, device in found:
        vname, devices_of = names.get(vendor, (VENDORS.get(vendor, vendor), {}))
        out.append(Gpu(dev.name, vendor, device, vname, devices_of.get(device, device),
                       _link_name(dev / "iommu_group"), _link_name(dev / "driver")))
    return out


def _read_hex(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip().lower()
    except OSError:
        return None
    text = text[2:] if text.startswith("0x") else text
    return text if re.fullmatch(r"[0-9a-f]{4,6}", text) else None


def _link_name(path: Path) -> str | None:
    try:
        return path.resolve(strict=True).name if path.is_symlink() else None
    except OSError:
        return None


def _pci_ids(root: Path) -> Path | None:
    for p in PCI_IDS:
        candidate = root / p.relative_to("/")
        if candidate.is_file():
            return candidate
    return None


def _names(vendors: set[str], path: Path | None) -> dict[str, tuple[str, dict[str, str]]]:
    """vendor id -> (vendor name, device id -> device name) for `vendors`, from pci.ids."""
    out: dict[str, tuple[str, dict[str, str]]] = {}
    if path is None or not vendors:
        return out
    current: dict[str, str] | None = None
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("C "):  # the class list follows the vendors
                    break
                if line[:1] not in ("\t", "#", "\n") and len(line) > 6 and line[4:6] == "  ":
                    vid = line[:4].lower()
                    if vid in vendors:
                        current = {}
                        out[vid] = (line[6:].strip()[:64], current)
                    else:
                        current = None
                elif current is not None and line.startswith("\t") and not line.startswith("\t\t"):
                    did, _, name = line[1:].partition("  ")
                    current[did.lower()] = name.strip()[:64]
    except OSError:
        return out
    return out
