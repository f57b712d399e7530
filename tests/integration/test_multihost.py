"""The multi-host harness (tests/multihost.py) itself: hosts reach each other and the internet
stand-in over the bridge, `cut`/`heal` partition a host, and nothing of a run is left behind (no
namespace, veth or process; the root namespace's links and routes as they were), also when the
body raises or is cancelled. All traffic stays inside the namespaces the tests create."""

from __future__ import annotations

import itertools
import re
import subprocess
from pathlib import Path

import pytest
import trio

from tests.multihost import cut, heal, hosts
from tests.vm_support import ip, needs_root

pytestmark = [pytest.mark.slow, needs_root]


def root_state() -> tuple[dict[str, str], list[str], str]:
    """The root namespace's links (by name), routes (v4 and v6) and ip_forward."""
    links = {}
    for line in ip("-o", "link", "show").stdout.splitlines():
        m = re.match(r"\d+: ([^:@\s]+)", line)
        if m:
            links[m.group(1)] = line
    routes = ip("route", "show").stdout.splitlines() + ip("-6", "route", "show").stdout.splitlines()
    return links, routes, Path("/proc/sys/net/ipv4/ip_forward").read_text()


def assert_root_unchanged(before, after, hs) -> None:
    """Equal, except for links that appeared or went away whole and are not ours: other tests on
    this machine (tests/netns_node.py) add veths to the root namespace while we run."""
    (links_b, routes_b, fwd_b), (links_a, routes_a, fwd_a) = before, after
    others = links_b.keys() ^ links_a.keys()
    assert not [name for name in others if name.startswith(hs.tag)], others
    common = links_b.keys() & links_a.keys()
    assert {n: links_b[n] for n in common} == {n: links_a[n] for n in common}

    def mine(routes):
        return [r for r in routes if not any(f"dev {name} " in r + " " for name in others)]

    assert mine(routes_b) == mine(routes_a)
    prefix = str(hs.subnet.network_address).rsplit(".", 1)[0] + "."
    assert not [r for r in routes_a if prefix in r]
    assert fwd_b == fwd_a


def assert_gone(hs) -> None:
    assert hs.leftovers() == []
    names = ip("netns", "list").stdout
    assert not [ns for ns in hs.namespaces if ns in names.split()]


def test_hosts_reach_each_other_and_the_internet():
    before = root_state()
    with hosts(3, internet=True) as hs:
        assert [h.index for h in hs] == [1, 2, 3]
        assert len({h.name for h in hs} | {hs.internet.name, hs.bridge}) == 5
        assert all(h.name.startswith(hs.tag) for h in hs)
        assert [h.ip for h in hs] == [str(hs.subnet.network_address + i) for i in (1, 2, 3)]
        for a, b in itertools.permutations(hs, 2):
            assert a.ping(b.ip), f"{a} cannot ping {b}"
        for h in hs:
            assert h.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
            assert h.run("ip", "-o", "-4", "addr", "show", "dev", "eth0").stdout.count("inet ") == 1
            # the server saw the host's own underlay address: nothing in between
            assert h.http_get(hs.internet.url) == f"{hs.internet.token} {h.ip}\n"
        # the root namespace has no way into the underlay (checked without sending anything)
        assert f"dev {hs.tag}" not in ip("route", "get", hs.internet.ip).stdout
        assert hs.internet.port == 80 and hs.internet.url.startswith(f"http://{hs.internet.ip}:")
    assert_gone(hs)
    assert_root_unchanged(before, root_state(), hs)


def test_cut_partitions_a_host_and_heal_brings_it_back():
    with hosts(3, internet=True) as hs:
        h1, h2, h3 = hs
        assert h1.ping(h2.ip)
        cut(h2)
        assert not h1.ping(h2.ip, timeout=1.0)
        assert not h2.ping(h3.ip, timeout=1.0)
        assert h2.http_get(hs.internet.url, timeout=1.0) is None
        assert h1.ping(h3.ip)  # the others stay connected
        heal(h2)
        assert h1.ping(h2.ip, timeout=5.0)
        assert h2.http_get(hs.internet.url) == f"{hs.internet.token} {h2.ip}\n"
    assert_gone(hs)


def test_everything_is_removed_when_the_body_raises():
    before = root_state()
    with pytest.raises(RuntimeError, match="boom"), hosts(2, internet=True) as hs:
        h1, h2 = hs
        tracked = h1.popen("sleep", "300")
        child = h2.popen("sh", "-c", "sleep 300 & wait")  # the group is killed, not only sh
        # escapes both the harness and its own parent: only the namespace sweep can find it
        h2.run("sh", "-c", "setsid sleep 300 >/dev/null 2>&1 < /dev/null &", check=True)
        assert len(ip("netns", "pids", h2.name).stdout.split()) == 3
        raise RuntimeError("boom")
    assert tracked.poll() is not None and child.poll() is not None
    assert len(hs._net.killed) >= 1  # the setsid sleep, found and killed at teardown
    assert_gone(hs)
    assert_root_unchanged(before, root_state(), hs)


async def test_everything_is_removed_when_a_trio_test_is_cancelled():
    with trio.move_on_after(0.5) as scope, hosts(1) as hs:
        proc = hs[0].popen("sleep", "300", stdout=subprocess.PIPE)
        await trio.sleep(30)
    assert scope.cancelled_caught
    assert proc.poll() is not None and proc.stdout.closed
    assert_gone(hs)


def test_two_runs_at_once_do_not_collide():
    with hosts(1) as a, hosts(1, prefix="fmx") as b:
        assert a.tag != b.tag and b.tag.startswith("fmx")
        assert not set(a.namespaces) & set(b.namespaces)
        assert a[0].ip != b[0].ip or a.subnet != b.subnet
        # separate bridges: a's host cannot reach b's, whatever the addresses
        assert not a[0].ping(b[0].ip, timeout=0.5)
    assert_gone(a)
    assert_gone(b)
