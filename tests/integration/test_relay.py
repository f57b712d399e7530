"""formnet relays across hosts: three `form` nodes in network namespaces (tests/multihost.py);
hosts 2 and 3 cannot reach each other (nftables in the bridge namespace drops what goes between
them), each reaches host 1. Their pair is routed through host 1 (formation/mesh/relay.py), back
to direct once the path is open, and through host 1 again when it breaks under a live tunnel."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import trio

from formation.mesh.wggo import WireGuardGo
from tests.integration.test_formnet import form_fog, logs, status, wait
from tests.multihost import block, hosts, unblock
from tests.vm_support import needs_root

pytestmark = [pytest.mark.slow, needs_root,
              pytest.mark.skipif(shutil.which("wireguard-go") is None and not os.environ.get("CI"),
                                 reason="wireguard-go is not installed (./dev test installs it)"),
              pytest.mark.skipif(shutil.which("nft") is None and not os.environ.get("CI"),
                                 reason="nft is not installed (./dev test installs it)")]


def relays(data) -> dict | None:
    st = status(data)
    return st["mesh"]["relays"] if st else None


def entry_with(data, ip: str) -> list[str]:
    """The allowed IPs of the peer entry that carries `ip`/32 (None: no entry does)."""
    device = trio.run(WireGuardGo(status(data)["mesh"]["iface"]).device)
    got = [p["allowed_ips"] for p in device.public_keys.values() if f"{ip}/32" in p["allowed_ips"]]
    return got[0] if got else None


def test_two_hosts_that_cannot_reach_each_other_talk_through_a_third(tmp_path):
    with hosts(3) as hs:
        # the relay forwards with formnet's own switch on its interface, not the host-wide one
        assert hs[0].run("sysctl", "-qw", "net.ipv4.ip_forward=0").returncode == 0
        block(hs[1], hs[2])
        data = [tmp_path / f"node{h.index}" for h in hs]
        t0 = time.monotonic()
        overlay = form_fog(hs, data, tmp_path)
        t_meshed = time.monotonic() - t0
        addr = [status(d)["address"].lower() for d in data]
        try:
            # never reached directly: once their endpoints were tried, 2 and 3 go through 1
            wait("2 and 3 relayed through 1", lambda: relays(data[1]) == {addr[2]: addr[0]}
                 and relays(data[2]) == {addr[1]: addr[0]}, 90)
            t_relayed = time.monotonic() - t0
            assert wait("2 -> 3 through 1", lambda: hs[1].ping(overlay[2], 1.0), 30)
            assert wait("3 -> 2 through 1", lambda: hs[2].ping(overlay[1], 1.0), 30)
            t_ping = time.monotonic() - t0
            assert relays(data[0]) == {}
            # on 2, 3's addresses are on 1's entry; 3's own entry is kept, with none
            assert overlay[2] + "/32" in entry_with(data[1], overlay[0])
            assert hs[0].run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"

            # the path opens: direct again
            unblock(hs[1], hs[2])
            t1 = time.monotonic()
            wait("2 and 3 direct again", lambda: relays(data[1]) == {} and relays(data[2]) == {}, 120)
            t_direct = time.monotonic() - t1
            assert entry_with(data[1], overlay[2]) == [f"{overlay[2]}/32"]
            assert wait("2 -> 3 direct", lambda: hs[1].ping(overlay[2], 1.0), 30)

            # the path breaks under a live tunnel: found by the probes, relayed again
            block(hs[1], hs[2])
            t2 = time.monotonic()
            wait("2 and 3 relayed again", lambda: relays(data[1]) == {addr[2]: addr[0]}
                 and relays(data[2]) == {addr[1]: addr[0]}, 120)
            t_again = time.monotonic() - t2
            assert wait("2 -> 3 through 1 again", lambda: hs[1].ping(overlay[2], 1.0), 30)
            t_again_ping = time.monotonic() - t2
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{logs(tmp_path)}") from None
        print(f"meshed {t_meshed:.1f} s; relayed {t_relayed:.1f} s and pinging {t_ping:.1f} s after the "
              f"first start; direct {t_direct:.1f} s after unblock; relayed again {t_again:.1f} s "
              f"(ping {t_again_ping:.1f} s) after a block under a live tunnel")
