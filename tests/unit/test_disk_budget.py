"""Disk accounting: DISK is bounded fog-wide at instance creation, booked per node like memory by
placement (against the disk a node advertises for its VMs, less a reserve), and handed to the VM
as the size of its disk (the overlay cap itself: tests/vm/test_disk_cap.py).

The attack (found by an earlier session): an instance could ask for 16 TB of DISK; placement
checked each instance's DISK alone against a node's free disk and booked none of it, so a tenant
could place instance after instance on one node until their overlays filled the host.
"""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from formation.crdt.kinds import Invalid
from formation.node import capacity
from formation.node.placement import place_all, shortfall
from formation.pack.formfile import FormfileError, parse
from tests.unit.test_scheduler_isolation import SizedRig
from tests.unit.test_scheduler_timers import BID

NOW = 10_000_000
GIB = 1024**3


def addr(i: int) -> str:
    return f"0x{i:040x}"


def node(i: int, disk: int) -> dict:
    return {"address": addr(i), "heartbeat": NOW, "seen": [addr(j) for j in range(10) if j != i],
            "capacity": {"vcpus": 64, "memory_mb": 1024 * 1024, "disk_gb": disk}}


def inst(i: int, disk: int, replicas: int = 1) -> dict:
    return {"instance_id": f"inst-{i}", "replicas": replicas, "created_at": i,
            "resources": {"vcpus": 1, "memory_mb": 512, "disk_gb": disk}}


# ---- the fog-wide bound ---------------------------------------------------------------------


async def test_a_disk_over_the_fog_wide_bound_is_refused_at_creation_with_a_clear_error(tmp_path, autojump_clock):
    rig = SizedRig(tmp_path, {"vcpus": 8, "memory_mb": 16384, "disk_gb": 100_000})
    with pytest.raises(Invalid, match=r"instance field 'resources.disk_gb': must be between 1 and 2048, got 16384"):
        await rig.create(build_id=BID, resources={"disk_gb": 16384})
    iid = await rig.create(build_id=BID, resources={"disk_gb": 2048})  # the bound itself is fine
    await rig.look()
    assert rig.backend.vms[iid].spec.disk_gb == 2048  # and is the size of the VM's disk


def test_a_formfile_asks_for_no_more_disk_than_an_instance_may():
    with pytest.raises(FormfileError, match="disk"):
        parse("NAME a\nDISK 16384\n")
    assert parse("NAME a\nDISK 2048\n").disk_gb == 2048


# ---- booked per node --------------------------------------------------------------------------


def test_disk_is_booked_per_node_in_creation_order():
    nodes = [node(0, disk=1000)]
    # each fits alone; before, all ten were placed on the one node (10 TB on 1 TB)
    placed = place_all([inst(k, disk=400) for k in range(10)], nodes, now_ms=NOW)
    assert [k for k in range(10) if placed[f"inst-{k}"]] == [0, 1]
    assert shortfall(inst(2, disk=400), [], nodes, now_ms=NOW, instances=[inst(k, disk=400) for k in range(10)]) \
        == "0 of 1 replicas placed: the nodes that fit are full or too few (1 live; disk taken on 1)"
    # a smaller one still fits in what is left; an older instance never moves for a newer one
    placed = place_all([inst(k, disk=400) for k in range(3)] + [inst(3, disk=200)], nodes, now_ms=NOW)
    assert placed == {"inst-0": [addr(0)], "inst-1": [addr(0)], "inst-2": [], "inst-3": [addr(0)]}


def test_a_full_node_sends_the_next_instances_elsewhere():
    nodes = [node(0, disk=500), node(1, disk=5000)]
    placed = place_all([inst(k, disk=300, replicas=2) for k in range(4)], nodes, now_ms=NOW)
    assert sorted(placed["inst-0"]) == [addr(0), addr(1)]
    on_small = [k for k in range(4) if addr(0) in placed[f"inst-{k}"]]
    assert on_small == [0]  # 300 of its 500 GB are booked: nothing of 300 fits there again
    assert all(addr(1) in placed[f"inst-{k}"] for k in range(4))


# ---- what a node advertises -------------------------------------------------------------------


class Host:
    """What capacity.detect reads of a VM host."""

    def __init__(self, in_use: int, addresses: int):
        self.in_use, self.addresses = in_use, addresses

    def disk_in_use(self) -> int:
        return self.in_use

    def vm_addresses(self) -> int:
        return self.addresses

    def gpus(self) -> tuple:
        return ()


class Side:
    def __init__(self, host: Host):
        self.host = host


def test_a_node_advertises_the_disk_its_vms_may_fill_and_its_vm_addresses(tmp_path: Path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(1000 * GIB, 600 * GIB, 400 * GIB))
    # free 400 GiB, less the reserve (5 % of 1000 GiB = 50 GiB, more than 5 GiB)
    assert capacity.vm_disk_gb(tmp_path) == 350
    # what the VMs' overlays hold already is theirs: booked already, it counts as theirs
    assert capacity.vm_disk_gb(tmp_path, in_use=100 * GIB) == 450
    cap = capacity.detect(tmp_path, Side(Host(in_use=100 * GIB, addresses=253)))
    assert cap["disk_gb"] == 450 and cap["vm_addresses"] == 253
    assert "vm_addresses" not in capacity.detect(tmp_path)  # no VM host: nothing to say
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(20 * GIB, 17 * GIB, 3 * GIB))
    assert capacity.vm_disk_gb(tmp_path) == 0  # less free than the reserve: no room at all


def test_the_vm_host_counts_what_its_overlays_hold(tmp_path: Path):
    from formation.node.config import load_config
    from formation.node.vmhost import VmHost

    config = load_config(None, {"node.data_dir": str(tmp_path), "vm.accel": "tcg"})
    host = VmHost(config, "0x" + "ab" * 20)
    assert host.disk_in_use() == 0
    for vm, size in (("a", 3 * 1024 * 1024), ("b", 1024 * 1024)):
        d = tmp_path / "vms" / f"vm-{vm}"
        d.mkdir(parents=True)
        (d / "overlay.qcow2").write_bytes(b"\1" * size)
    assert 4 * 1024 * 1024 <= host.disk_in_use() < 5 * 1024 * 1024
    assert host.vm_addresses() == 253
