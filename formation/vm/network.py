"""Host networking for VMs: a Linux bridge per network and a tap per VM, made with the `ip` command
(iproute2 is on every host that runs QEMU; no netlink library to pin). Every helper is idempotent
so that a node restarting half-way through can simply call it again, and takes an optional network
namespace (`ip -n NS`), which tests use to keep their bridges away from the host's.
"""

from __future__ import annotations

import hashlib
import json
import subprocess

import trio

from formation.iproute import NetworkError
from formation.iproute import ip as _ip

IFNAMSIZ = 15  # Linux interface names are at most 15 bytes
TAP_PREFIX = "fmt"


def tap_name(vm_id: str) -> str:
    """A VM's tap name: deterministic (a restarted node finds it again) and within IFNAMSIZ."""
    return TAP_PREFIX + hashlib.sha256(vm_id.encode()).hexdigest()[:IFNAMSIZ - len(TAP_PREFIX)]


def mac_for(vm_id: str) -> str:
    """A VM's MAC: 52:54:00 is QEMU's usual prefix, and 0x52 has the locally-administered bit set,
    so it never collides with a real NIC. Deterministic so a rebooted VM keeps its ARP entries."""
    tail = hashlib.sha256(b"mac:" + vm_id.encode()).digest()[:3]
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


def _check_name(name: str) -> None:
    if not name or len(name.encode()) > IFNAMSIZ or "/" in name or name.strip() != name:
        raise ValueError(f"bad interface name {name!r} (1-{IFNAMSIZ} bytes, no '/' or spaces)")


async def link_exists(name: str, netns: str | None = None) -> bool:
    _check_name(name)
    out = await _ip("-o", "link", "show", "dev", name, netns=netns, ok_if=("does not exist",))
    return bool(out.strip())


async def list_links(prefix: str = "", netns: str | None = None, *, master: str | None = None) -> list[str]:
    """Names of the links that start with `prefix` (and are ports of bridge `master`, if given):
    what a restarted node checks for orphans."""
    args = ("-j", "link", "show", *(("master", master) if master else ()))
    links = json.loads(await _ip(*args, netns=netns, ok_if=("does not exist",)) or "[]")
    return sorted(link["ifname"] for link in links if link["ifname"].startswith(prefix))


async def ensure_bridge(name: str, gateway_cidr: str, netns: str | None = None, *,
                        ip_forward: bool = False) -> None:
    """Bridge `name` exists, holds `gateway_cidr` (e.g. "10.213.5.1/24": the VMs' gateway) and is
    up. With ip_forward, the namespace routes (VMs reaching beyond the bridge)."""
    _check_name(name)
    if not await link_exists(name, netns):
        # two callers may race to create it; the loser's "File exists" is success
        await _ip("link", "add", name, "type", "bridge", netns=netns, ok_if=("File exists",))
    addrs = json.loads(await _ip("-j", "addr", "show", "dev", name, netns=netns) or "[]")
    have = {f"{a['local']}/{a['prefixlen']}" for link in addrs for a in link.get("addr_info", [])}
    if gateway_cidr not in have:
        await _ip("addr", "add", gateway_cidr, "dev", name, netns=netns, ok_if=("File exists",))
    await _ip("link", "set", "dev", name, "up", netns=netns)
    if ip_forward:
        await _enable_forwarding(netns)


NAT_TABLE = "formation"


async def ensure_nat(subnet: str, *, mesh_iface: str | None, netns: str | None = None) -> None:
    """VMs of `subnet` reach beyond this host through it: their connections leave with the host's
    address (nftables masquerade), except over the fog's own interface `mesh_iface` (formnet),
    where they keep their addresses (None: a subnet the other members do not route back, which
    is masqueraded there too, to this host's overlay address). Replaces this table's rules whole,
    so a restarted node calls it again."""
    if mesh_iface is not None:
        _check_name(mesh_iface)
    keep = f' oifname != "{mesh_iface}"' if mesh_iface else ""
    ruleset = (f"table ip {NAT_TABLE} {{}}\ndelete table ip {NAT_TABLE}\n"
               f"table ip {NAT_TABLE} {{\n  chain postrouting {{\n"
               f"    type nat hook postrouting priority srcnat; policy accept;\n"
               f"    ip saddr {subnet} ip daddr != {subnet}{keep} masquerade\n"
               f"  }}\n}}\n")
    cmd = ["nft", "-f", "-"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    proc = await trio.run_process(cmd, stdin=ruleset.encode(), capture_stderr=True, check=False)
    if proc.returncode != 0:
        raise NetworkError(cmd, proc.stderr.decode(errors="replace").strip())


async def _enable_forwarding(netns: str | None) -> None:
    # /proc/sys/net is per namespace: the write must happen from a process inside it
    cmd = ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    proc = await trio.run_process(cmd, capture_stderr=True, check=False, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise NetworkError(cmd, proc.stderr.decode(errors="replace").strip())


async def create_tap(name: str, bridge: str, netns: str | None = None) -> None:
    """A persistent tap `name` (QEMU opens it by name) attached to `bridge`, up."""
    _check_name(name)
    if not await link_exists(name, netns):
        await _ip("tuntap", "add", name, "mode", "tap", netns=netns, ok_if=("File exists",))
    await _ip("link", "set", "dev", name, "master", bridge, "up", netns=netns)


async def delete_link(name: str, netns: str | None = None) -> None:
    """Remove a link (tap or bridge); a missing one, or a missing namespace (which took its
    links with it), is not an error."""
    _check_name(name)
    await _ip("link", "del", "dev", name, netns=netns,
              ok_if=("Cannot find device", "does not exist", "Cannot open network namespace"))
