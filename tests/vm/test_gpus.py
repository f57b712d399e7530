"""GPUs: detection from a fake sysfs tree (and pci.ids), what a node advertises, placement by
count and model, the reason an instance no node can take is pending, and the QEMU arguments
that give a VM its GPUs (VFIO)."""

from __future__ import annotations

from pathlib import Path

import pytest

from formation.crdt.kinds import get_kind
from formation.node import capacity, placement
from formation.vm.driver import QemuDriver
from formation.vm.gpus import detect
from formation.vm.spec import VmSpec

PCI_IDS = """\
# a few lines of the PCI ID database's shape
1234  QEMU
\t1111  Virtual Video Controller
10de  NVIDIA Corporation
\t2330  GH100 [H100 SXM5 80GB]
\t\t10de 16c1  H100 SXM5 80GB
\t2b85  GB202 [GeForce RTX 5090]
1af4  Red Hat, Inc.
\t1041  Virtio network device
C 03  Display controller
\t00  VGA compatible controller
"""


def fake_pci(root: Path, address: str, cls: str, vendor: str, device: str, *, group: str | None = None,
             driver: str | None = None) -> None:
    dev = root / "sys" / "devices" / "pci0000:00" / address
    dev.mkdir(parents=True)
    for name, value in (("class", cls), ("vendor", vendor), ("device", device)):
        (dev / name).write_text(value + "\n")
    if group is not None:
        target = root / "sys" / "kernel" / "iommu_groups" / group
        target.mkdir(parents=True, exist_ok=True)
        (dev / "iommu_group").symlink_to(target)
    if driver is not None:
        target = root / "sys" / "bus" / "pci" / "drivers" / driver
        target.mkdir(parents=True, exist_ok=True)
        (dev / "driver").symlink_to(target)
    links = root / "sys" / "bus" / "pci" / "devices"
    links.mkdir(parents=True, exist_ok=True)
    (links / address).symlink_to(dev)


@pytest.fixture
def host(tmp_path):
    fake_pci(tmp_path, "0000:00:02.0", "0x030000", "0x1234", "0x1111")  # the VM's own VGA: no group
    fake_pci(tmp_path, "0000:00:03.0", "0x020000", "0x1af4", "0x1041", group="3", driver="virtio-pci")  # a NIC
    fake_pci(tmp_path, "0000:41:00.0", "0x030200", "0x10de", "0x2330", group="12", driver="vfio-pci")
    fake_pci(tmp_path, "0000:42:00.0", "0x030200", "0x10de", "0x2330", group="13", driver="vfio-pci")
    fake_pci(tmp_path, "0000:43:00.0", "0x030000", "0x10de", "0x2b85", group="14", driver="nvidia")  # the host's
    ids = tmp_path / "usr" / "share" / "misc" / "pci.ids"
    ids.parent.mkdir(parents=True)
    ids.write_text(PCI_IDS)
    return tmp_path


def test_gpus_are_found_with_names_groups_and_drivers_and_only_vfio_ones_count(host):
    gpus = detect(host)
    assert [g.pci for g in gpus] == ["0000:00:02.0", "0000:41:00.0", "0000:42:00.0", "0000:43:00.0"]
    h100 = gpus[1]
    assert (h100.vendor, h100.name, h100.iommu_group, h100.driver) == (
        "NVIDIA Corporation", "GH100 [H100 SXM5 80GB]", "12", "vfio-pci")
    assert [g.passthrough for g in gpus] == [False, True, True, False]
    assert [capacity.gpu_model(g) for g in gpus] == ["Virtual Video Controller", "H100", "H100", "RTX5090"]
    cap = capacity.gpu_capacity(gpus)
    assert cap == {"gpus": 2, "gpu_models": ["H100", "H100"]}
    # what a node advertises passes the node record's rules
    node = get_kind("node").validate({"address": "0x" + "ab" * 20,
                                      "capacity": {"vcpus": 8, "memory_mb": 65536, "disk_gb": 500, **cap}})
    assert node["capacity"]["gpu_models"] == ["H100", "H100"]
    # without pci.ids: the vendor's short name and the device id
    (host / "usr" / "share" / "misc" / "pci.ids").unlink()
    bare = detect(host)[1]
    assert (bare.vendor, bare.name) == ("NVIDIA", "2330")


def test_a_host_without_pci_or_with_junk_in_sysfs_has_no_gpus(tmp_path):
    assert detect(tmp_path) == []
    fake_pci(tmp_path, "0000:01:00.0", "not hex", "0x10de", "0x2330")
    fake_pci(tmp_path, "0000:02:00.0", "0x030000", "\u202e10de", "0x2330")
    (tmp_path / "sys" / "bus" / "pci" / "devices" / "../../../etc").mkdir(parents=True, exist_ok=True)
    assert detect(tmp_path) == []


def node(addr: str, **cap) -> dict:
    return {"address": addr, "heartbeat": 1_000_000, "capacity": {"vcpus": 8, "memory_mb": 65536, "disk_gb": 500,
                                                                   "vms": True, **cap}}


def instance(iid: str, gpu: dict | None, replicas: int = 1, created: int = 1) -> dict:
    return {"instance_id": iid, "replicas": replicas, "created_at": created,
            "resources": {"vcpus": 2, "memory_mb": 1024, "disk_gb": 10, "gpu": gpu}}


def test_placement_books_gpus_by_count_and_model_and_says_why_when_none_fits():
    a = "0x" + "0a" * 20
    b = "0x" + "0b" * 20
    nodes = [{**node(a), "seen": [b]}, {**node(b, gpus=2, gpu_models=["H100", "H100"]), "seen": [a]}]
    now = 1_000_000
    plain = instance("plain", None)
    one = instance("one", {"count": 1, "model": "H100"}, created=2)
    two = instance("two", {"count": 2}, created=3)
    other = instance("other", {"count": 1, "model": "B200"}, created=4)
    got = placement.place_all([plain, one, two, other], nodes, now_ms=now)
    assert got["one"] == [b] and got["two"] == [] and got["other"] == []
    assert b in placement.place(two, nodes, now_ms=now)  # alone it fits: the first took one GPU
    why = placement.shortfall(other, [], nodes, now_ms=now)
    assert why == "0 of 1 replicas placed: no live node has 1 B200 GPU a VM can be given (VFIO)"
    full = placement.shortfall(two, got["two"], nodes, now_ms=now, instances=[plain, one, two, other])
    assert "full" in full and "GPUs taken" in full
    # a fog with no GPU at all: the instance's placement problem says so
    assert "no live node has 2 GPUs" in placement.shortfall(two, [], [node(a)], now_ms=now)


def test_a_vm_gets_its_gpus_through_vfio_on_q35_only(tmp_path):
    files = {n: tmp_path / n for n in ("vmlinuz", "initrd", "root.img")}
    for f in files.values():
        f.write_bytes(b"x")
    spec = VmSpec("gpu-vm", files["vmlinuz"], files["initrd"], files["root.img"], machine="q35",
                  gpus=("0000:41:00.0", "0000:42:00.0"))
    cmd = QemuDriver(tmp_path / "vms", accel="tcg").command(spec)
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "-device" and cmd[i + 1].startswith("vfio")] == [
        "vfio-pci,host=0000:41:00.0", "vfio-pci,host=0000:42:00.0"]
    assert VmSpec.from_json(spec.to_json()).gpus == spec.gpus
    for bad, msg in (({"gpus": ("0000:41:00.0",)}, "q35"),
                     ({"gpus": ("41:00.0; rm",), "machine": "q35"}, "PCI address"),
                     ({"gpus": ("0000:41:00.0", "0000:41:00.0"), "machine": "q35"}, "once")):
        with pytest.raises(ValueError, match=msg):
            VmSpec("gpu-vm", files["vmlinuz"], files["initrd"], files["root.img"], **bad)


def test_a_node_gives_each_vm_free_gpus_of_the_model_asked_and_says_what_is_missing(host):
    from formation.node.vmhost import VmUnavailable, pick_gpus
    gpus = detect(host)
    assert pick_gpus(gpus, {"count": 1, "model": "H100"}, set()) == ("0000:41:00.0",)
    assert pick_gpus(gpus, {"count": 1}, {"0000:41:00.0"}) == ("0000:42:00.0",)
    assert pick_gpus(gpus, {"count": 2}, set()) == ("0000:41:00.0", "0000:42:00.0")
    with pytest.raises(VmUnavailable, match=r"2 such GPUs .*\(1 in use by other VMs\); the instance asks 2 H100 GPUs"):
        pick_gpus(gpus, {"count": 2, "model": "H100"}, {"0000:42:00.0"})
    # the host's own RTX 5090 is not bound to vfio-pci: not given
    with pytest.raises(VmUnavailable, match="0 such GPUs.*vfio-pci"):
        pick_gpus(gpus, {"count": 1, "model": "RTX5090"}, set())
