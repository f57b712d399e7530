"""Every node setting, declared once: section, key, default, type, check, and what it does.

config.py derives the defaults, the checks and the typed sections from SETTINGS, and
`render_toml()` writes the commented formation.toml at the repository root from the same list
(tests/unit/test_config.py fails when the two disagree; regenerate with
`python -m formation.node.settings > formation.toml`).
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any

from . import checks as c

HEADER = """\
# formation.toml: settings of one Formation node.
#
# Every value below is the default, so this file changes nothing as shipped; edit what you need
# and pass it with `form node --config formation.toml`. Without --config the node uses these
# same defaults. Unknown sections or keys and ill-typed values are errors, never ignored.
# Relative paths are relative to the directory of this file; `~` is your home directory.
# Command-line flags (--data-dir, --api-port, --p2p-port, --bootstrap) override this file.
# (Generated from formation/node/settings.py: `python -m formation.node.settings`.)
"""


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    default: Any
    type: Any  # the Python type of the checked value
    check: c.Checker
    doc: str
    example: str | None = None  # shown commented out when there is no default

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}"


SECTION_DOCS = {
    "fog": "Membership: the fog this node belongs to (made here, or joined with an invite).",
    "mesh": "formnet: the WireGuard mesh between nodes.",
    "dns": "The node's DNS server (docs/dns.md).",
    "proxy": "The host-routing HTTP proxy: a request for a name the fog serves goes to a running "
             "replica of its instance over formnet (docs/proxy.md).",
}


def _ip(value: Any, _origin: c.Origin) -> str:
    try:
        return str(ipaddress.ip_address(value if isinstance(value, str) else ""))
    except ValueError:
        raise c.Bad(f"expected an IP address, got {c.show(value)}") from None


def _region(value: Any, _origin: c.Origin) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9._-]{0,64}", value):
        raise c.Bad(f"expected a region name (up to 64 letters, digits, '.', '_', '-'), got {c.show(value)}")
    return value


def _treasury(value: Any, _origin: c.Origin) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"(0x[0-9a-fA-F]{40})?", value):
        raise c.Bad(f"expected an address (0x and 40 hex digits) or empty, got {c.show(value)}")
    return value.lower()


def _percent(value: Any, _origin: c.Origin) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise c.Bad(f"expected an integer from 0 to 100, got {c.show(value)}")
    return value


def _upstreams(value: Any, _origin: c.Origin) -> tuple[str, ...]:
    """IP addresses with optional ports: "192.0.2.53", "192.0.2.53:5353", "[2001:db8::53]:53"."""
    if not isinstance(value, list):
        raise c.Bad(f"expected an array of IP addresses, got {c.show(value)}")
    for i, item in enumerate(value):
        host, port = (item, "53") if isinstance(item, str) else ("", "")
        if isinstance(item, str) and item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ("53" if not rest else "")
        elif isinstance(item, str) and item.count(":") == 1:
            host, _, port = item.partition(":")
        try:
            ipaddress.ip_address(host)
            ok = port.isdigit() and 1 <= int(port) <= 65535
        except ValueError:
            ok = False
        if not ok:
            raise c.Bad(f"item {i}: expected an IP address with an optional :port, got {c.show(item)}")
    return tuple(value)

S = Setting
SETTINGS: tuple[Setting, ...] = (
    S("node", "data_dir", "~/.local/share/formation", str, c.path,
      "Where the node keeps everything: operator.key (the encrypted operator keystore), state.db "
      "(the replicated op log), the image cache and VM runtime files."),
    S("node", "log_json", False, bool, c.boolean,
      "Write log lines as JSON objects (for log collectors) instead of plain text."),
    S("node", "password_file", None, str | None, c.optional_path,
      "A file whose content (one line; the trailing newline is ignored) is the keystore password. "
      "The password is taken from, in order: the FORMATION_PASSWORD environment variable, this "
      "file, an interactive prompt. Keep the file readable by the node's user only (chmod 600).",
      example='"/etc/formation/password"'),
    S("node", "heartbeat_seconds", 30, int, c.positive,
      "How often the node refreshes its signed `node` record (its heartbeat in the shared state) "
      "and delivers ops that arrived dated ahead of its clock."),
    S("node", "placement_deadline_seconds", 900, int, c.positive,
      "How long a replica placed on another node may take to report running (its image built "
      "and booted) before this node doubts it there. Once enough members doubt it, the replica "
      "is placed elsewhere (the doubted node is tried again an hour later)."),
    S("node", "health_interval_seconds", 10, int, c.positive,
      "How often the node probes each of its running replicas (a TCP connection to the first "
      "port its Formfile EXPOSEs, or an HTTP GET of the path of an agent that runs its build). "
      "Two failures in a row mark it unhealthy in its signed status, one success healthy again; "
      "names, the proxy and /agents/:id/hire leave unhealthy replicas out. Keep it well under "
      "the DNS TTL (`dns.ttl`, 30 s) so a replica drops out within the TTL."),
    S("node", "usage_interval_seconds", 60, int, c.positive,
      "How often the node measures its replicas (CPU time, booked memory and disk over the time "
      "their VMs are up, their taps' network bytes) and the calls it proxied to them, and "
      "writes the totals that changed as signed `usage` records (docs/economy.md). Each write "
      "is an op kept in every node's log: shorter means fresher figures and a faster-growing log."),
    S("node", "region", "", str, _region,
      "Where this node is (any name the fog's operators agree on, e.g. \"eu-west\"), published in "
      "its node record. Its DNS server answers with the replicas on nodes of its own region "
      "first, then the others (empty: no order by region)."),
    S("api", "host", "127.0.0.1", str, c.host,
      "The local HTTP API that `form` and users' signed requests talk to. Bound to the loopback "
      'address by default; set "0.0.0.0" (or a specific address) to serve other hosts.'),
    S("api", "port", 3004, int, c.port, "TCP port of the HTTP API."),
    S("p2p", "listen", "/ip4/0.0.0.0/tcp/53333", str, c.listen,
      "libp2p listen address (TCP). `form node --p2p-port N` replaces the port."),
    S("p2p", "bootstrap", [], tuple[str, ...], c.bootstrap,
      "Peers to dial when joining the fog, as full multiaddrs including the peer id, e.g. "
      '["/ip4/192.0.2.10/tcp/53333/p2p/16Uiu2HAm...", "/dns4/fog.example.org/tcp/53333/p2p/16Uiu2HAm..."]'),
    S("p2p", "announce", [], tuple[str, ...], c.announce,
      "Addresses other nodes should dial to reach this one, when they differ from what the node "
      "sees itself listening on (NAT, containers). Without /p2p/: the node appends its own peer "
      "id. Empty: the listen address, with 0.0.0.0 replaced by this host's addresses."),
    S("p2p", "sync_interval_seconds", 10, int, c.positive,
      "Anti-entropy: sync with a random connected peer at least this often (seconds). Gossip "
      "makes delivery fast; this is what makes it certain."),
    S("p2p", "sync_sessions_per_peer", 1, int, c.positive,
      "Sync sessions served at once to one peer; a stream over the bound is reset."),
    S("p2p", "sync_sessions", 8, int, c.positive, "Sync sessions served at once to all peers."),
    S("p2p", "sync_budget_mb", 64, int, c.positive,
      "Op bytes served to one peer by sync per window (MiB); a peer past it is refused until "
      "its budget refills."),
    S("p2p", "sync_budget_seconds", 60, int, c.positive, "The window of sync_budget_mb (seconds)."),
    S("p2p", "author_ops_per_second", 100, int, c.positive,
      "Ops one author (a node key) may have forwarded by gossip per second, after a burst of "
      "author_burst; a batch past it is not forwarded here and its ops come later by sync "
      "(slowed, never refused)."),
    S("p2p", "author_burst", 1000, int, c.positive, "The burst of author_ops_per_second (ops)."),
    S("p2p", "push", True, bool, c.boolean,
      "Send this node's op batches on the push tree (plumtree over one libp2p stream per peer, "
      "docs/p2p.md) rather than by gossipsub, which stays subscribed either way (older nodes). "
      "false: gossipsub only, as before."),
    S("fog", "invite", "", str, c.string,
      "An invite token (`fmi1.…`, made by a member with `form invite create`) this node claims at "
      "its first start to become a member of that fog; its bootstrap peers are dialed too. Empty, "
      "and with no bootstrap peers either, the node's first start makes a new fog of its own "
      "(its genesis). A node with bootstrap peers but no invite syncs the state and runs no "
      "workloads until it is admitted."),
    S("fog", "name", "", str, c.string, "The name a new fog is given at its genesis (shown, not used)."),
    S("fog", "treasury", "", str, _treasury,
      "The treasury a new fog names at its genesis: the address (a user key, `form kit init`) whose "
      "signed grants are the only way credits enter the fog (`form account grant`). Empty: the fog "
      "has no economy (nothing is charged, grants are refused, accounts show the 100 credits they "
      "start with); with a treasury, accounts start with 0 (docs/economy.md). Used at genesis only."),
    S("fog", "operator_share_percent", 20, int, _percent,
      "The split a new fog names at its genesis: the percentage of what a call, a plan or an hour of "
      "rent costs that goes to the operator of the node whose replica answered (or that sold the plan, "
      "or hosts the replica), the rest to the agent's or model's creator. Used at genesis only."),
    S("mesh", "enabled", "auto", str, c.choice("auto", "true", "false", bools=True),
      'formnet: a WireGuard interface whose peers are the fog\'s members (their `peer` records), '
      'so that nodes and VMs reach each other by overlay address. "auto": on when the node runs '
      'as root and wireguard-go (or kernel WireGuard) is there; "true" makes a missing '
      'requirement an error at start.'),
    S("mesh", "wireguard_port", 51820, int, c.port, "UDP port of this node's WireGuard interface."),
    S("mesh", "overlay_cidr", "10.42.0.0/16", str, c.cidr,
      "Address range of the overlay network; every node takes its overlay address from it."),
    S("dns", "enabled", True, bool, c.boolean,
      "Run the node's DNS server (UDP and TCP): the fog's names (<instance id>.fog, "
      "<name>.<owner>.fog, replicas, agents, models), vanity domains their DNS proves, and "
      "everything else forwarded or refused (docs/dns.md). A port that cannot be bound is "
      "logged and the node runs without DNS."),
    S("dns", "host", "127.0.0.1", str, _ip,
      'The address the DNS server listens on: loopback by default; "0.0.0.0" or the VM bridge\'s '
      "address to serve VMs and other hosts (with `outside = \"forward\"` that is a resolver for "
      "whoever reaches it: keep client_qps)."),
    S("dns", "port", 5453, int, c.port,
      "UDP and TCP port of the DNS server; 53 to be a host's resolver (needs root or "
      "CAP_NET_BIND_SERVICE)."),
    S("dns", "outside", "forward", str, c.choice("forward", "refuse"),
      'Names outside the fog\'s zones: "forward" them to the upstreams (cached), or "refuse" them.'),
    S("dns", "upstreams", [], tuple[str, ...], _upstreams,
      'Resolvers to forward to and to check vanity domains through, tried in order: IP addresses, '
      'optionally with a port ("192.0.2.53", "[2001:db8::53]:5353"). Empty: the nameservers of '
      "/etc/resolv.conf (this server's own address left out)."),
    S("dns", "upstream_timeout_ms", 2000, int, c.positive,
      "How long one upstream may take to answer before the next is tried (milliseconds)."),
    S("dns", "cache_entries", 10_000, int, c.positive,
      "Forwarded answers kept (at most 32 MiB whatever their number), each for its TTL."),
    S("dns", "client_qps", 1000, int, c.positive,
      "Queries per second one source address may send (bursts of twice that); past it UDP "
      "queries are dropped and TCP connections closed."),
    S("dns", "ttl", 30, int, c.positive,
      "TTL (seconds) of the names the fog makes: instances, replicas, agents, models."),
    S("dns", "ttl_min", 5, int, c.positive,
      "The shortest TTL an owner's `dns` record gets (a shorter one is raised to this)."),
    S("dns", "ttl_max", 3600, int, c.positive,
      "The longest TTL an owner's `dns` record gets (a longer one is lowered to this)."),
    S("dns", "verify_min_seconds", 60, int, c.positive,
      "A vanity domain's proof (TXT _formation.<domain>) is checked again when its TTL runs out, "
      "but not sooner than this (nor later than ttl_max)."),
    S("proxy", "enabled", True, bool, c.boolean,
      "Run the node's HTTP proxy: a request whose Host is a name the node's DNS serves (an "
      "instance's or agent's name, a verified vanity domain) goes to a running replica of it, "
      "at the lowest port its Formfile EXPOSEs (an agent's name: the agent's port); a replica that does not take the connection is "
      "left out for down_seconds and the next one is tried. It routes by the zone the DNS view "
      "builds: with dns.enabled = false every request is answered 503. A port that cannot be "
      "bound is logged and the node runs without the proxy."),
    S("proxy", "host", "127.0.0.1", str, _ip,
      'The address the proxy listens on: loopback by default; "0.0.0.0" to publish the fog\'s '
      "services to other hosts (everyone who reaches it reaches every instance's lowest "
      "EXPOSEd port: that is what EXPOSE publishes)."),
    S("proxy", "port", 8080, int, c.port, "TCP port of the proxy (plain HTTP)."),
    S("proxy", "max_connections", 1024, int, c.positive,
      "Client connections open at once; past it a new connection is answered 503 and closed."),
    S("proxy", "max_connections_per_ip", 64, int, c.positive,
      "Client connections open at once from one address; past it 429 and closed."),
    S("proxy", "max_header_kb", 32, int, c.positive,
      "Largest request head (request line and headers, KiB); a larger one is answered 431."),
    S("proxy", "max_body_mb", 64, int, c.positive,
      "Largest request body (MiB): a larger Content-Length is answered 413, a chunked body "
      "growing past it is cut off. Bodies up to 1 MiB are kept until the replica answers, so "
      "that an idempotent request can be sent again to another replica."),
    S("proxy", "connect_timeout_ms", 2000, int, c.positive,
      "How long a replica may take to accept the connection before it is marked down and the "
      "next one is tried (milliseconds)."),
    S("proxy", "down_seconds", 10, int, c.positive,
      "How long a replica that refused or timed out a connection is tried only after the "
      "others (seconds)."),
    S("proxy", "idle_timeout_seconds", 30, int, c.positive,
      "A client connection with no request for this long is closed; so is an exchange in which "
      "the client or the replica sends nothing for this long once the answer has started."),
    S("proxy", "header_timeout_seconds", 10, int, c.positive,
      "A request head must arrive whole within this many seconds of its first byte (a client "
      "trickling its headers is answered 408 and closed)."),
    S("proxy", "request_timeout_seconds", 300, int, c.positive,
      "The longest one exchange may take, the replica's whole answer included (a replica that "
      "has not started its answer by then: 504)."),
    S("vm", "enabled", "auto", str, c.choice("auto", "true", "false", bools=True),
      'Workloads run in QEMU VMs. "auto": on when QEMU is installed and the node runs as root '
      '(taps and a bridge need it); "true" makes a missing requirement an error at start; '
      '"false" runs no VMs.'),
    S("vm", "accel", "auto", str, c.choice("auto", "kvm", "tcg"),
      '"auto" uses KVM only when /dev/kvm is hardware virtualisation (vmx/svm, not PVM), else TCG.'),
    S("vm", "machine", "microvm", str, c.choice("microvm", "q35"),
      '"microvm" (fast boot, virtio-mmio) or "q35" (PCI and ACPI; boots without a TSC hint).'),
    S("vm", "bridge", "formbr0", str, c.ifname,
      "The Linux bridge the VMs' taps join; the node holds the subnet's first address on it."),
    S("vm", "subnet", "auto", str, c.auto_or(c.cidr),
      'The VMs\' addresses on this node: a CIDR, or "auto" for a /24 chosen from the node\'s address.'),
    S("vm", "cache_dir", "", str, c.empty_or(c.path),
      'Where the guest kernel kit, the Debian base and the built images are kept; "" = '
      "<data_dir>/cache. Nodes on one host may share it (everything in it is content-addressed)."),
    S("vm", "build_timeout_seconds", 1800, int, c.positive,
      "A build (all RUN and INSTALL steps in the build VM) taking longer fails."),
    S("vm", "nat", True, bool, c.boolean,
      "VMs reach beyond their host (the internet) with the host's address (nftables masquerade; "
      "needs the nft command). Traffic between the fog's VMs and nodes is not translated: it goes "
      "over formnet with the VMs' own addresses. Builds are sealed whatever this says."),
    S("vm", "build_network", False, bool, c.boolean,
      "Whether RUN steps may open outbound connections (pip install, curl ...), through QEMU's "
      "user-mode NAT. Off: builds are sealed; packages come from INSTALL (fetched by the host)."),
    S("vm", "context_limit_mb", 64, int, c.positive, "Largest build context accepted, unpacked (MiB)."),
    S("store", "synchronous", "FULL", str, c.synchronous,
      "SQLite `synchronous` mode of the op log: OFF, NORMAL, FULL or EXTRA. FULL fsyncs the log "
      "at every commit, so an op the node has acknowledged survives a power loss; NORMAL is "
      "faster but may lose the last commits on power loss (never on a crash of the process alone)."),
    S("store", "pending_ops_per_source", 25_000, int, c.positive,
      "Ops buffered for one peer while they wait for their dependencies (or for their time, when "
      "dated ahead of this node's clock); past the bound they are dropped and fetched again by "
      "sync, so a misbehaving peer cannot exhaust memory. All peers together hold at most "
      "100,000 ops and 128 MiB; a waiting op expires after 10 minutes."),
    S("store", "pending_bytes_per_source", 32 * 1024 * 1024, int, c.positive,
      "The same bound in bytes (each op counted as its size + 1 KiB + 0.5 KiB per dep it waits for)."),
)
del S


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # strings, ints and empty arrays are spelled alike in TOML


def _comment(text: str, width: int = 96) -> list[str]:
    lines, line = [], "#"
    for word in text.split():
        if len(line) + 1 + len(word) > width and line != "#":
            lines.append(line)
            line = "#"
        line += " " + word
    return lines + [line]


def render_toml() -> str:
    """The commented formation.toml, every value at its default."""
    out = [HEADER]
    section = None
    for s in SETTINGS:
        if s.section != section:
            section = s.section
            out.append(f"\n[{section}]")
            if section in SECTION_DOCS:
                out += _comment(SECTION_DOCS[section])
        out += _comment(s.doc)
        if s.default is None:
            out.append(f"# {s.key} = {s.example}")
        else:
            out.append(f"{s.key} = {_toml_value(s.default)}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render_toml(), end="")
