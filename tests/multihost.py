"""Several "hosts" for tests: network namespaces joined through a bridge namespace, as in
../shared/notes/infra.md §2, plus an optional "internet" namespace with a tiny HTTP server.

    with hosts(3, internet=True) as hs:
        h1, h2, h3 = hs
        assert h1.ping(h2.ip)
        assert hs.internet.token in h3.http_get(hs.internet.url)
        cut(h2)                       # h2's link to the bridge goes down ...
        heal(h2)                      # ... and up again
        block(h1, h2)                 # h1 and h2 no longer reach each other (both reach h3) ...
        unblock(h1, h2)               # ... and do again
        proc = h1.popen("wireguard-go", "-f", f"wg{h1.name}")  # killed and waited for on exit
        srv = h2.serve_http(h2.ip)    # "<token> <client address>" to any GET; srv.requests()
    assert not hs.leftovers()

Layout of one run, tag = "fm" + 4 random hex digits (or prefix + 4 hex):
    <tag>br     bridge namespace with br0; the veth <tag>v<i> of host i is a port of br0
    <tag><i>    host i (1..n): lo up, eth0 = 10.A.B.i/24, net.ipv4.ip_forward=1
    <tag>net    the internet stand-in (internet=True): eth0 = 10.A.B.254/24, HTTP on port 80;
                `hs.internet.requests()` lists who asked it what
10.A.B.0/24 is picked at random (A in 200..250) among the subnets the root namespace does not use.
Nothing is created in the root namespace. Everything is removed on exit, also when the body
raises or is cancelled (trio.Cancelled, KeyboardInterrupt): first the processes started through
`Host.popen` (SIGTERM to their process group, then SIGKILL), then whatever else still runs in the
namespaces (SIGKILL), then the namespaces, which takes their veths with them.

Interface names that the kernel or wireguard-go keeps in a shared place (/var/run/wireguard/ is not
per namespace) must be unique per host: derive them from `Host.name`, which is unique machine-wide.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import re
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.vm_support import ip

INTERNET_INDEX = 254
INTERNET_PORT = 80
_TERM_GRACE = 3.0  # seconds a popen'd process gets between SIGTERM and SIGKILL

# ICMP echo over a raw socket (root), so that tests do not depend on iputils-ping being installed
_PING = r"""
import os, socket, struct, sys, time
addr, timeout = sys.argv[1], float(sys.argv[2])
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF
ident = os.getpid() & 0xFFFF
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
deadline = time.monotonic() + timeout
seq = 0
while time.monotonic() < deadline:
    seq += 1
    head = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"formation-ping"
    pkt = head[:2] + struct.pack("!H", csum(head)) + head[4:]
    try:
        sock.sendto(pkt, (addr, 0))
    except OSError:
        pass  # e.g. ENETUNREACH while the link is down: retry until the deadline
    resend = min(deadline, time.monotonic() + 0.3)
    while (left := resend - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, src = sock.recvfrom(2048)
        except (socket.timeout, OSError):
            break
        ihl = (data[0] & 15) * 4
        typ, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
        if typ == 0 and rid == ident and src[0] == addr:
            sys.exit(0)
sys.exit(1)
"""

# GET url; prints the body, exit status 1 if nothing answered
_GET = r"""
import sys, urllib.request
sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read().decode())
"""

# answers every GET with "<token> <client address>", so a test sees which source address arrived;
# GET /.requests answers the requests so far instead, one "<client address> <path>" line each
_SERVER = r"""
import http.server, sys
addr, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen = []
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/.requests":
            body = "".join(f"{a} {p}\n" for a, p in list(seen)).encode()
        else:
            seen.append((self.client_address[0], self.path))
            body = f"{token} {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer((addr, port), Handler)
print("ready", server.server_address[1], flush=True)
server.serve_forever()
"""


class _Net:
    """What one `hosts()` run made, in creation order, and what it has to kill."""

    def __init__(self, tag: str):
        self.tag = tag
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.killed: list[tuple[int, str]] = []  # (pid, start time) of processes found at teardown


class Host:
    """One namespace attached to the bridge. `name` is the namespace's name (unique machine-wide),
    `ip` its underlay address on eth0, `link` the veth end in the bridge namespace."""

    def __init__(self, net: _Net, name: str, index: int, ip_: str, bridge: str, link: str):
        self._net = net
        self.name, self.index, self.ip = name, index, ip_
        self.bridge, self.link = bridge, link

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.index}, {self.ip!r})"

    def run(self, *cmd: str, timeout: float = 10.0, check: bool = False,
            input: str | None = None) -> subprocess.CompletedProcess:
        """`ip netns exec NAME cmd...`, output captured as text."""
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd], capture_output=True,
                              text=True, timeout=timeout, check=check, input=input)

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        """A long-running `cmd` in this namespace (`ip netns exec` execs, so the Popen's pid is
        cmd's). It runs in a new session; on exit the harness SIGTERMs its process group, then
        SIGKILLs it, and waits for it. Pass stdout=... etc. as for subprocess.Popen."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kw)
        self._net.procs.append(proc)
        return proc

    def ping(self, addr: str, timeout: float = 2.0) -> bool:
        """True if `addr` answered an ICMP echo from this namespace within `timeout` seconds."""
        try:
            proc = self.run(sys.executable, "-c", _PING, addr, str(timeout), timeout=timeout + 10)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0

    def http_get(self, url: str, timeout: float = 3.0) -> str | None:
        """The body of GET url made from this namespace, or None if nothing answered."""
        try:
            proc = self.run(sys.executable, "-c", _GET, url, str(timeout), timeout=timeout + 10)
        except subprocess.TimeoutExpired:
            return None
        return proc.stdout if proc.returncode == 0 else None

    def serve_http(self, addr: str, port: int = 0) -> HttpServer:
        """An HTTP server on addr:port (0: any free port) in this namespace, answering every GET
        with "<token> <client address>" (stopped with the other popen'd processes)."""
        token = secrets.token_hex(8)
        proc = self.popen(sys.executable, "-c", _SERVER, addr, str(port), token,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        line = proc.stdout.readline().decode() if ready else ""
        if not line.startswith("ready "):
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise RuntimeError(f"the HTTP server on {self.name} {addr}:{port} did not start: "
                               f"{err.decode()[-2000:]}")
        return HttpServer(self, addr, int(line.split()[1]), token)


class HttpServer:
    """A server started by `Host.serve_http`: its address, port and token, and who asked it what."""

    def __init__(self, host: Host, ip_: str, port: int, token: str):
        self.host, self.ip, self.port, self.token = host, ip_, port, token

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}/"

    def requests(self) -> list[tuple[str, str]] | None:
        """(client address, path) of every GET the server answered so far (None if it did not
        say): asked from its own namespace, so the asking is not one of them."""
        body = self.host.http_get(self.url + ".requests")
        if body is None:
            return None
        return [tuple(line.split(" ", 1)) for line in body.splitlines() if " " in line]


class Internet(Host):
    """The stand-in for the outside world: a host with an HTTP server on ip:port whose answer to
    any GET is "<token> <client address>"."""

    server: HttpServer

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def token(self) -> str:
        return self.server.token

    @property
    def url(self) -> str:
        return self.server.url

    def requests(self) -> list[tuple[str, str]] | None:
        """(client address, path) of every GET the server answered so far."""
        return self.server.requests()


class Hosts(list):
    """The hosts (a list of Host, index i at position i-1) and what the run is made of."""

    tag: str
    bridge: str
    subnet: ipaddress.IPv4Network
    internet: Internet | None

    def __init__(self, net: _Net, bridge: str, subnet: ipaddress.IPv4Network):
        super().__init__()
        self._net = net
        self.tag, self.bridge, self.subnet, self.internet = net.tag, bridge, subnet, None

    @property
    def namespaces(self) -> list[str]:
        return list(self._net.namespaces)

    def leftovers(self) -> list[str]:
        """What of this run still exists: namespaces, processes, links named after the tag in the
        root namespace. Empty once the context has exited cleanly."""
        left: list[str] = []
        existing = _netns_names()
        left += [f"netns {ns}" for ns in self._net.namespaces if ns in existing]
        left += [f"process {p.pid} {' '.join(map(str, p.args[4:]))[:60]}" for p in self._net.procs if p.poll() is None]
        left += [f"process {pid} (found in a namespace at teardown)"
                 for pid, start in self._net.killed if _start_time(pid) == start]
        links = ip("-o", "link", "show").stdout
        left += [f"root link {m}" for m in re.findall(r"^\d+: ([^:@\s]+)", links, re.M)
                 if m.startswith(self.tag)]
        return left


def cut(host: Host) -> None:
    """Take the host's link down (its veth end in the bridge namespace): it is partitioned from
    every other host and the internet until `heal(host)`."""
    ip("-n", host.bridge, "link", "set", host.link, "down")


def heal(host: Host) -> None:
    ip("-n", host.bridge, "link", "set", host.link, "up")


_BLOCK_TABLE = "fmblock"


def block(a: Host, b: Host) -> None:
    """Drop every IPv4 packet between a and b, both ways, until `unblock(a, b)`; each still reaches
    every other host. Done in the bridge namespace (nftables' bridge family: the hosts see
    nothing of it) where the kernel has that family, else in the two hosts' own namespaces."""
    if _bridge_filter(a.bridge):
        _nft(a.bridge, f"add element bridge {_BLOCK_TABLE} cut {{ {a.ip} . {b.ip}, {b.ip} . {a.ip} }}")
        return
    for me, other in ((a, b), (b, a)):
        _host_filter(me.name)
        _nft(me.name, f"add element inet {_BLOCK_TABLE} cut {{ {other.ip} }}")


def unblock(a: Host, b: Host) -> None:
    if _nft(a.bridge, f"list table bridge {_BLOCK_TABLE}", check=False).returncode == 0:
        _nft(a.bridge, f"delete element bridge {_BLOCK_TABLE} cut {{ {a.ip} . {b.ip}, {b.ip} . {a.ip} }}",
             check=False)
    for me, other in ((a, b), (b, a)):
        if _nft(me.name, f"list table inet {_BLOCK_TABLE}", check=False).returncode == 0:
            _nft(me.name, f"delete element inet {_BLOCK_TABLE} cut {{ {other.ip} }}", check=False)


def _nft(netns: str, script: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=script, text=True,
                          capture_output=True, timeout=10)
    if check and proc.returncode != 0:
        raise RuntimeError(f"nft in {netns}: {proc.stderr.strip()}\n{script}")
    return proc


def _bridge_filter(netns: str) -> bool:
    """The bridge namespace's filter (made once): frames between two ports whose IPv4 addresses
    are a pair in the set `cut` are dropped. False where the kernel has no bridge family."""
    if _nft(netns, f"list table bridge {_BLOCK_TABLE}", check=False).returncode == 0:
        return True
    return _nft(netns, f"""table bridge {_BLOCK_TABLE} {{
  set cut {{ type ipv4_addr . ipv4_addr; }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    ip saddr . ip daddr @cut drop
  }}
}}
""", check=False).returncode == 0


def _host_filter(netns: str) -> None:
    if _nft(netns, f"list table inet {_BLOCK_TABLE}", check=False).returncode == 0:
        return
    _nft(netns, f"""table inet {_BLOCK_TABLE} {{
  set cut {{ type ipv4_addr; }}
  chain input {{
    type filter hook input priority 0; policy accept;
    ip saddr @cut drop
  }}
  chain output {{
    type filter hook output priority 0; policy accept;
    ip daddr @cut drop
  }}
}}
""")


@contextlib.contextmanager
def hosts(n: int, *, prefix: str | None = None, internet: bool = False) -> Iterator[Hosts]:
    """n hosts (1 <= n <= 250) joined through a bridge namespace; see the module docstring."""
    if not 1 <= n <= 250:
        raise ValueError(f"n must be in 1..250, not {n}")
    prefix = "fm" if prefix is None else prefix
    if not re.fullmatch(r"[a-z][a-z0-9]{0,5}", prefix):
        raise ValueError(f"prefix must be 1-6 lowercase letters/digits, starting with a letter: {prefix!r}")
    net = _Net(_fresh_tag(prefix))
    subnet = _free_subnet()
    bridge = f"{net.tag}br"
    try:
        _add_netns(net, bridge)
        ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        ip("-n", bridge, "link", "set", "br0", "up")
        hs = Hosts(net, bridge, subnet)
        for i in range(1, n + 1):
            hs.append(_attach(net, Host, f"{net.tag}{i}", i, subnet, bridge, f"{net.tag}v{i}"))
        if internet:
            hs.internet = _attach(net, Internet, f"{net.tag}net", INTERNET_INDEX, subnet, bridge,
                                  f"{net.tag}vn")
            _serve(hs.internet)
        yield hs
    finally:
        _teardown(net)


def _attach(net: _Net, cls: type, name: str, index: int, subnet: ipaddress.IPv4Network,
            bridge: str, link: str):
    addr = str(subnet.network_address + index)
    _add_netns(net, name)
    ip("-n", bridge, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", name)
    ip("-n", bridge, "link", "set", link, "master", "br0")
    ip("-n", bridge, "link", "set", link, "up")
    ip("-n", name, "addr", "add", f"{addr}/{subnet.prefixlen}", "dev", "eth0")
    ip("-n", name, "link", "set", "eth0", "up")
    subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
                   check=True, capture_output=True, timeout=10)
    return cls(net, name, index, addr, bridge, link)


def _serve(inet: Internet) -> None:
    inet.server = inet.serve_http(inet.ip, INTERNET_PORT)


def _add_netns(net: _Net, name: str) -> None:
    ip("netns", "add", name)
    net.namespaces.append(name)
    ip("-n", name, "link", "set", "lo", "up")


def _teardown(net: _Net) -> None:
    """Never raises: it runs while the body's exception (if any) propagates."""
    with contextlib.suppress(Exception):
        _stop(net.procs)
    for ns in reversed(net.namespaces):
        with contextlib.suppress(Exception):
            _kill_all_in(net, ns)
        with contextlib.suppress(Exception):
            ip("netns", "del", ns, check=False)


def _stop(procs: list[subprocess.Popen]) -> None:
    def signal_all(sig: int) -> None:
        for p in procs:
            # the group may outlive its leader (children of a shell), so signal it either way
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, sig)
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + _TERM_GRACE
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.0, deadline - time.monotonic()))
    signal_all(signal.SIGKILL)
    for p in procs:
        p.wait()
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


def _kill_all_in(net: _Net, ns: str) -> None:
    """SIGKILL whatever still runs in ns (not started through popen, or escaped its group), and
    wait a little for it to go: a process in the namespace keeps it, and its veth, alive."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pids = [int(p) for p in ip("netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            start = _start_time(pid)
            if start is not None and (pid, start) not in net.killed:
                net.killed.append((pid, start))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/pid/stat, so that a reused pid is not taken for the process we killed."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie has left its namespace; only its exit status remains
        return None
    return fields[19]


def _netns_names() -> set[str]:
    return {line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()}


def _fresh_tag(prefix: str) -> str:
    taken = _netns_names()
    while True:
        tag = prefix + secrets.token_hex(2)
        if not any(name.startswith(tag) for name in taken):
            return tag


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.A.B.0/24 (A in 200..250) that overlaps no address or route of the root
    namespace."""
    used = []
    for line in ip("-o", "-4", "addr", "show").stdout.splitlines():
        m = re.search(r"inet (\S+)", line)
        if m:
            used.append(ipaddress.ip_network(m.group(1), strict=False))
    for line in ip("-4", "route", "show", "table", "all").stdout.splitlines():
        words = line.split()
        while words and words[0] in ("unicast", "local", "broadcast", "multicast", "throw",
                                     "unreachable", "prohibit", "blackhole", "nat"):
            words = words[1:]
        if words and words[0] != "default":
            with contextlib.suppress(ValueError):
                used.append(ipaddress.ip_network(words[0], strict=False))
    rng = random.SystemRandom()
    for _ in range(1000):
        subnet = ipaddress.ip_network(f"10.{rng.randint(200, 250)}.{rng.randint(0, 255)}.0/24")
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise RuntimeError("no free 10.200-250.x.0/24 subnet in the root namespace")
