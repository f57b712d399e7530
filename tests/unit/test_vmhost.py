"""The node's VM side, without VMs: when it is on or off (and why), its subnet, addresses."""

from __future__ import annotations

import ipaddress

import pytest

from formation.node import vmhost
from formation.node.config import load_config
from formation.node.vmhost import VmHost, VmUnavailable, auto_subnet

ADDR = "0x" + "ab" * 20


def cfg(tmp_path, **vm):
    return load_config(None, {"node.data_dir": str(tmp_path), **{f"vm.{k}": v for k, v in vm.items()}})


def test_off_by_configuration_or_missing_requirements(tmp_path, monkeypatch):
    host, why = VmHost.check(cfg(tmp_path, enabled="false"), ADDR)
    assert host is None and "vm.enabled = false" in why
    monkeypatch.setattr(vmhost, "requirements_problem", lambda: "qemu-img is not installed")
    host, why = VmHost.check(cfg(tmp_path), ADDR)  # auto: the node runs without VMs, says why
    assert host is None and why == "qemu-img is not installed"
    with pytest.raises(VmUnavailable, match="vm.enabled = true but qemu-img is not installed"):
        VmHost.check(cfg(tmp_path, enabled="true"), ADDR)


def test_on_with_a_subnet_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(vmhost, "requirements_problem", lambda: "")
    host, why = VmHost.check(cfg(tmp_path, accel="tcg"), ADDR)
    assert why == "" and host.subnet == ipaddress.ip_network(auto_subnet(ADDR))
    assert str(host.gateway).endswith(".1") and host.images_dir == tmp_path / "cache" / "images"
    fixed, _ = VmHost.check(cfg(tmp_path, accel="tcg", subnet="10.9.8.0/29", cache_dir=str(tmp_path / "c")), ADDR)
    assert str(fixed.subnet) == "10.9.8.0/29" and fixed.images_dir == tmp_path / "c" / "images"
    # addresses: never the gateway, never one taken, deterministic per instance
    taken: set[str] = set()
    for i in range(5):
        ip = fixed.pick_ip(f"inst-{i}", taken)
        assert ip not in taken and ip != "10.9.8.1" and ipaddress.ip_address(ip) in fixed.subnet
        taken.add(ip)
    assert fixed.pick_ip("inst-0", set()) == fixed.pick_ip("inst-0", set())
    with pytest.raises(VmUnavailable, match="no free address"):
        fixed.pick_ip("inst-9", taken | {"10.9.8.2", "10.9.8.3", "10.9.8.4", "10.9.8.5", "10.9.8.6"})


def test_auto_subnets_spread_and_stay_private():
    nets = {auto_subnet(f"0x{i:040x}") for i in range(200)}
    assert len(nets) > 190
    assert all(ipaddress.ip_network(n).subnet_of(ipaddress.ip_network("10.0.0.0/8")) for n in nets)
