"""Bridge and tap helpers, in a throwaway network namespace (nothing touches the host's links)."""

from __future__ import annotations

import json

import pytest

from formation.vm import network
from tests.vm_support import ip, needs_root, netns


def test_tap_name_is_short_deterministic_and_distinct():
    a = network.tap_name("web-1")
    assert a == network.tap_name("web-1")
    assert a != network.tap_name("web-2")
    assert a.startswith("fmt") and len(a) == 15
    assert len(network.tap_name("x" * 128)) == 15


def test_mac_is_local_unicast_and_deterministic():
    mac = network.mac_for("web-1")
    assert mac == network.mac_for("web-1") != network.mac_for("web-2")
    octets = [int(o, 16) for o in mac.split(":")]
    assert len(octets) == 6 and mac.startswith("52:54:00:")
    assert octets[0] & 0x02 and not octets[0] & 0x01  # locally administered, unicast


def test_bad_interface_names_are_refused():
    for bad in ("", "x" * 16, "a/b", " eth0"):
        with pytest.raises(ValueError):
            network._check_name(bad)


def _link(ns: str, name: str) -> dict:
    return json.loads(ip("-n", ns, "-j", "-d", "link", "show", "dev", name).stdout)[0]


@needs_root
async def test_bridge_and_tap_lifecycle():
    with netns() as ns:
        for _ in range(2):  # the second round must change nothing and raise nothing
            await network.ensure_bridge("fmbr0", "10.213.9.1/24", ns, ip_forward=True)
            await network.create_tap("fmt-test0", "fmbr0", ns)
        bridge = _link(ns, "fmbr0")
        assert bridge["linkinfo"]["info_kind"] == "bridge" and "UP" in bridge["flags"]
        addrs = json.loads(ip("-n", ns, "-j", "addr", "show", "dev", "fmbr0").stdout)[0]["addr_info"]
        inet = [f"{a['local']}/{a['prefixlen']}" for a in addrs if a["family"] == "inet"]
        assert inet == ["10.213.9.1/24"]
        tap = _link(ns, "fmt-test0")
        assert tap["master"] == "fmbr0" and tap["linkinfo"]["info_kind"] == "tun"
        forwarding = ip("netns", "exec", ns, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip()
        assert forwarding == "1"
        assert await network.link_exists("fmt-test0", ns)
        assert await network.list_links("fmt-", ns) == ["fmt-test0"]

        await network.delete_link("fmt-test0", ns)
        await network.delete_link("fmt-test0", ns)  # already gone: fine
        assert not await network.link_exists("fmt-test0", ns)
        assert await network.list_links("fmt-", ns) == []
        await network.delete_link("fmbr0", ns)
        assert await network.list_links("", ns) == ["lo"]


@needs_root
async def test_ip_errors_carry_the_command_and_ips_message():
    with netns() as ns:
        with pytest.raises(network.NetworkError) as exc:
            await network.ensure_bridge("fmbr1", "10.213.9.300/24", ns)
        assert "addr add 10.213.9.300/24" in str(exc.value)
        assert exc.value.message  # ip's own words
        with pytest.raises(network.NetworkError, match="fmbr-none"):
            await network.create_tap("fmt-test1", "fmbr-none", ns)
    # the namespace (and its links) is gone: deleting is still fine
    await network.delete_link("fmt-test1", ns)
