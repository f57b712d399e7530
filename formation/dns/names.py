"""The fog's names, from the state: records in, a frozen zone out (no IO, no clock).

Names are scoped so that no two users can want the same one (DESIGN.md §3 rule 8):

    <instance id>.fog                      every running replica's address (A/AAAA)
    <node>.<instance id>.fog               one replica: the one on that node
    <instance name>.<owner>.fog            the owner's instance of that name (its oldest)
    <agent id>.agent.fog                   an agent: TXT (id, owner) and the addresses of the
    <agent name>.<owner>.agent.fog           running replicas of its build (as /hire finds them)
    <model id>.model.fog                   a model: TXT (id, owner)
    <model name>.<owner>.model.fog
    <anything>.<owner>.fog                 the owner's own `dns` records (no proof needed)
    app.example.com                        a `dns` record outside .fog: served only while
                                             TXT _formation.app.example.com names its owner
    _<port>._tcp.<any name above>          SRV: one per replica, for each EXPOSEd port

`<owner>` and `<node>` are addresses in the short form `owner_label` makes: the 20 bytes of the
address in base32 (RFC 4648, lowercase, no padding), 32 characters, one to one with the
address. The hex form (40 hex digits, with or without 0x) is accepted in queries and records.

Every value read from the state is hostile: labels, lengths, addresses, ports and TTLs are
checked again here, and what fails is left out (counted in `Zone.dropped`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

FOG = "fog"
AGENT_ZONE = "agent.fog"
MODEL_ZONE = "model.fog"

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_NOT_LABEL = re.compile(r"[^a-z0-9-]+")
_ADDRESS = re.compile(r"0x[0-9a-f]{40}")
_HEX40 = re.compile(r"(?:0x)?([0-9a-f]{40})")
_B32 = re.compile(r"[a-z2-7]{32}")
MAX_NAME = 253  # characters of a name in text, without the final dot
MAX_REPLICAS = 64  # per instance (an instance asks for at most 64)
MAX_PORTS = 64  # SRV ports per name
MAX_TARGETS = 64  # addresses in one dns record


# ---- labels ---------------------------------------------------------------------------------

def is_label(text: str) -> bool:
    return _LABEL.fullmatch(text) is not None


def to_label(name: str) -> str | None:
    """A user's name as one DNS label: lowercase; every run of characters other than letters,
    digits and '-' becomes '-'; no '-' at either end; at most 63 characters. None when nothing
    is left. ("My Agent" -> "my-agent", "web_1.v2" -> "web-1-v2".)"""
    if not isinstance(name, str) or len(name) > 1024:
        return None
    return _to_label(name)


@functools.lru_cache(maxsize=65536)  # a zone build asks for every record's name, each time
def _to_label(name: str) -> str | None:
    label = _NOT_LABEL.sub("-", name.lower()).strip("-")[:63].rstrip("-")
    return label if is_label(label) else None


def owner_label(address: str) -> str:
    """The short, unambiguous form of an address in names: its 20 bytes in base32 (32 chars)."""
    if not isinstance(address, str) or not _ADDRESS.fullmatch(address):
        raise ValueError(f"not a lowercase 0x address: {address!r}")
    return _owner_label(address)


@functools.lru_cache(maxsize=65536)  # a zone build asks for every record's owner, each time
def _owner_label(address: str) -> str:
    return base64.b32encode(bytes.fromhex(address[2:])).decode().lower()


def label_address(label: str) -> str | None:
    """The address a label names: its base32 form (32 chars) or hex (40 digits, 0x optional)."""
    label = label.lower()
    if len(label) == 32 and _B32.fullmatch(label):
        try:
            return "0x" + base64.b32decode(label.upper()).hex()
        except (binascii.Error, ValueError):
            return None
    m = _HEX40.fullmatch(label)
    return "0x" + m.group(1) if m else None


def canonical_label(label: str) -> str:
    """A label as the zone keys it: an address in hex becomes its base32 form."""
    if len(label) in (40, 42):
        m = _HEX40.fullmatch(label)
        if m:
            return base64.b32encode(bytes.fromhex(m.group(1))).decode().lower()
    return label


def canonical_name(name: str) -> str | None:
    """A domain as the zone keys it (lowercase, no final dot, addresses in base32), or None
    when it is not a host name of labels of letters, digits and inner '-'."""
    if not isinstance(name, str):
        return None
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > MAX_NAME:
        return None
    labels = name.split(".")
    if not all(is_label(x) for x in labels):
        return None
    if labels[-1] == FOG:
        labels = [canonical_label(x) for x in labels]
    return ".".join(labels)


def in_fog(name: str) -> bool:
    return name == FOG or name.endswith(".fog")


def replica_name(node: str, instance_id: str) -> str:
    return f"{owner_label(node)}.{instance_id}.{FOG}"


def instance_names(instance: dict) -> list[str]:
    """The names an instance gets (without its replicas' and SRV names)."""
    out = []
    iid, owner = instance.get("instance_id"), instance.get("owner")
    if isinstance(iid, str) and is_label(iid):
        out.append(f"{iid}.{FOG}")
    label = to_label(instance.get("name", ""))
    if label and isinstance(owner, str) and _ADDRESS.fullmatch(owner):
        out.append(f"{label}.{owner_label(owner)}.{FOG}")
    return out


# ---- the zone ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Entry:
    """What one name holds. An entry may be shared by several names (an instance's id name and
    its owner-scoped name are one object)."""

    ttl: int
    a: tuple[str, ...] = ()
    aaaa: tuple[str, ...] = ()
    cname: str | None = None
    txt: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()  # SRV records live at _<port>._tcp.<name>
    targets: tuple[str, ...] = ()  # the names SRV records point at (replica names)


@dataclass(frozen=True)
class Limits:
    ttl: int = 30  # TTL of the names the fog makes (instances, replicas, agents, models)
    ttl_min: int = 5  # an owner's TTL is clamped into [ttl_min, ttl_max]
    ttl_max: int = 3600
    negative_ttl: int = 5  # SOA minimum: how long a "no such name" may be cached
    max_names: int = 250_000  # names in the zone, all owners together
    max_names_per_owner: int = 10_000


@dataclass(frozen=True)
class Zone:
    names: Mapping[str, Entry]  # canonical name -> entry: .fog names and served vanity domains
    ents: frozenset[str]  # names under .fog that hold nothing but have names below them
    serial: int = 0
    limits: Limits = field(default_factory=Limits)
    dropped: int = 0  # values from the state left out (invalid, over a bound)
    vanity: frozenset[str] = frozenset()  # the vanity domains served

    def exists(self, name: str) -> bool:
        return name == FOG or name in self.names or name in self.ents


EMPTY = Zone(names={}, ents=frozenset({AGENT_ZONE, MODEL_ZONE}))


@dataclass(frozen=True)
class Replica:
    node: str  # address
    ip: str


def is_vm_address(ip: str, subnet: str | None) -> bool:
    """A VM address in its node's subnet: never the network, broadcast or gateway (.1) address,
    so that no node can point a name at its host, at loopback or at anyone else."""
    if not subnet:
        return False
    try:
        addr, net = ipaddress.ip_address(ip), ipaddress.ip_network(subnet, strict=False)
    except (ValueError, TypeError):
        return False
    if addr.version != net.version or addr not in net:
        return False
    return addr not in (net.network_address, net.broadcast_address, net.network_address + 1)


def counts(status: dict) -> bool:
    """Does a replica's instance_status make it one to send traffic to: reported running, and
    not found unhealthy by its own node's probe ("unknown": not probed, e.g. no EXPOSEd port,
    counts). The one rule names, SRV records, the proxy (which routes from the zone) and
    /agents/:id/hire follow; who reported it and where it points is checked apart."""
    return isinstance(status, dict) and status.get("state") == "running" and status.get("health") != "unhealthy"


def running_replicas(statuses: Iterable[dict], serving: Mapping[str, str]) -> dict[str, list[Replica]]:
    """instance id -> its replicas that count: reported running and not unhealthy (`counts`), by
    a node in `serving` (member, alive: the caller decides), at an address in that node's VM
    subnet."""
    out: dict[str, list[Replica]] = {}
    for s in statuses:
        if not counts(s):
            continue
        iid, node, ip = s.get("instance_id"), s.get("node"), s.get("ip")
        if not (isinstance(iid, str) and is_label(iid) and isinstance(node, str)
                and _ADDRESS.fullmatch(node) and isinstance(ip, str)):
            continue
        if not is_vm_address(ip, serving.get(node)):
            continue
        reps = out.setdefault(iid, [])
        if len(reps) < MAX_REPLICAS * 4:
            reps.append(Replica(node, str(ipaddress.ip_address(ip))))
    for iid, reps in out.items():
        out[iid] = sorted(reps, key=lambda r: r.node)[:MAX_REPLICAS]
    return out


def _ports(raw: Iterable) -> tuple[int, ...]:
    ok = {p for p in raw if isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535}
    return tuple(sorted(ok)[:MAX_PORTS])


def _clamp_ttl(ttl, limits: Limits) -> int:
    if not isinstance(ttl, int) or isinstance(ttl, bool):
        ttl = limits.ttl
    return max(limits.ttl_min, min(limits.ttl_max, ttl))


def _split(ips: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    v4, v6 = [], []
    for ip in ips:
        try:
            addr = ipaddress.ip_address(ip)
        except (ValueError, TypeError):
            continue
        (v4 if addr.version == 4 else v6).append(str(addr))
    return tuple(dict.fromkeys(v4)), tuple(dict.fromkeys(v6))


def _creation_order(records: Iterable, id_field: str) -> list[dict]:
    rows = [r for r in records if isinstance(r, dict) and isinstance(r.get(id_field), str)]
    return sorted(rows, key=lambda r: (r.get("created_at") if isinstance(r.get("created_at"), int) else 0,
                                       r[id_field]))


def _may_act(record: dict, who: str) -> bool:
    """`who` owns the record or holds a grant on it (crdt/kinds/owned.py level_of > 0)."""
    auth = record.get("authorized")
    return record.get("owner") == who or (isinstance(auth, dict) and bool(auth.get(who)))


class _Builder:
    def __init__(self, limits: Limits):
        self.limits = limits
        self.names: dict[str, Entry] = {}
        self.per_owner: dict[str, int] = {}
        self.dropped = 0

    def room(self, owner: str, n: int = 1) -> bool:
        if (len(self.names) + n > self.limits.max_names
                or self.per_owner.get(owner, 0) + n > self.limits.max_names_per_owner):
            self.dropped += 1
            return False
        self.per_owner[owner] = self.per_owner.get(owner, 0) + n
        return True

    def put(self, name: str, entry: Entry, *, replace: bool = False) -> bool:
        if len(name) > MAX_NAME:
            self.dropped += 1
            return False
        if name in self.names and not replace:
            return False
        self.names[name] = entry
        return True


def build_zone(*, instances: Iterable[dict] = (), statuses: Iterable[dict] = (),
               serving: Mapping[str, str] | None = None, ports: Mapping[str, Sequence[int]] | None = None,
               agents: Iterable[dict] = (), models: Iterable[dict] = (), records: Iterable[dict] = (),
               verified: Mapping[str, Collection[str]] | None = None, limits: Limits = Limits(),
               serial: int = 0, regions: Mapping[str, str] | None = None, near: str = "") -> Zone:
    """The zone of the fog's names.

    `serving`: node address -> VM subnet, for the nodes whose replicas count (the fog's live
    members); `ports`: instance id -> its EXPOSEd ports; `verified`: vanity domain -> the
    addresses its TXT record at _formation.<domain> names (the verifier's current word);
    `regions`: node address -> its region, and `near` the answering node's: the replicas on
    nodes of that region come first in each answer (then by node address)."""
    b = _Builder(limits)
    ports = ports or {}
    verified = verified or {}
    replicas = running_replicas(statuses, serving or {})
    if near and regions:
        for reps in replicas.values():
            reps.sort(key=lambda r: regions.get(r.node) != near)  # stable: by node within each
    by_id: dict[str, tuple[dict, Entry]] = {}  # instance id -> (record, its entry)

    # instances: <id>.fog, <node>.<id>.fog, <name>.<owner>.fog (first created wins a name)
    for inst in _creation_order(instances, "instance_id"):
        iid, owner = inst["instance_id"], inst.get("owner")
        if not is_label(iid) or not isinstance(owner, str) or not _ADDRESS.fullmatch(owner):
            b.dropped += 1
            continue
        reps = replicas.get(iid, [])
        if not b.room(owner, 2 + len(reps)):
            continue
        p = _ports(ports.get(iid, ()))
        rnames = tuple(replica_name(r.node, iid) for r in reps)
        a, aaaa = _split(r.ip for r in reps)
        entry = Entry(ttl=limits.ttl, a=a, aaaa=aaaa, ports=p, targets=rnames if p else ())
        b.put(f"{iid}.{FOG}", entry)
        by_id[iid] = (inst, entry)
        for r, rname in zip(reps, rnames, strict=True):
            ra, raaaa = _split([r.ip])
            b.put(rname, Entry(ttl=limits.ttl, a=ra, aaaa=raaaa, ports=p, targets=(rname,) if p else ()))
        label = to_label(inst.get("name", ""))
        if label:
            b.put(f"{label}.{owner_label(owner)}.{FOG}", entry)

    # agents and models: TXT with what they are; agents also the replicas /hire would use
    by_build: dict[str, list[tuple[dict, Entry]]] = {}
    for inst, entry in by_id.values():
        if isinstance(inst.get("build_id"), str):
            by_build.setdefault(inst["build_id"], []).append((inst, entry))
    for kind, zone, rows, id_field in (("agent", AGENT_ZONE, agents, "agent_id"),
                                       ("model", MODEL_ZONE, models, "model_id")):
        for rec in _creation_order(rows, id_field):
            rid, owner = rec[id_field], rec.get("owner")
            if rec.get("is_private", False) is not False:
                continue  # a private record has no public name
            if not is_label(rid) or not isinstance(owner, str) or not _ADDRESS.fullmatch(owner):
                b.dropped += 1
                continue
            if not b.room(owner, 2):
                continue
            txt = (f"kind={kind}", f"id={rid}", f"owner={owner}")
            a: tuple[str, ...] = ()
            aaaa: tuple[str, ...] = ()
            p: tuple[int, ...] = ()
            targets: tuple[str, ...] = ()
            port = rec.get("port")
            if kind == "agent" and isinstance(rec.get("build_id"), str) and isinstance(port, int):
                serving_entries = [e for inst, e in by_build.get(rec["build_id"], [])
                                   if _may_act(inst, owner) and port in e.ports]
                a = tuple(dict.fromkeys(ip for e in serving_entries for ip in e.a))[:MAX_REPLICAS]
                aaaa = tuple(dict.fromkeys(ip for e in serving_entries for ip in e.aaaa))[:MAX_REPLICAS]
                targets = tuple(dict.fromkeys(t for e in serving_entries for t in e.targets))[:MAX_REPLICAS]
                p = (port,) if targets else ()
            entry = Entry(ttl=limits.ttl, a=a, aaaa=aaaa, txt=txt, ports=p, targets=targets)
            b.put(f"{rid}.{zone}", entry)
            label = to_label(rec.get("name", ""))
            if label:
                b.put(f"{label}.{owner_label(owner)}.{zone}", entry)

    # dns records: in the owner's own space under .fog, or vanity domains proven by their DNS
    groups: dict[str, dict[str, list[dict]]] = {}  # domain -> owner -> records (creation order)
    for rec in _creation_order(records, "record_id"):
        owner = rec.get("owner")
        domain = canonical_name(rec.get("domain"))
        if domain is None or not isinstance(owner, str) or not _ADDRESS.fullmatch(owner):
            b.dropped += 1
            continue
        if in_fog(domain):
            space = f"{owner_label(owner)}.{FOG}"
            if domain != space and not domain.endswith("." + space):
                b.dropped += 1  # under .fog only in the owner's own space
                continue
        elif owner not in verified.get(domain, ()):
            continue  # not (yet) proven by the domain's own DNS
        groups.setdefault(domain, {}).setdefault(owner, []).append(rec)
    vanity = set()
    for domain in sorted(groups):
        owner = min(groups[domain])  # one owner per name: under .fog there is only one
        if not b.room(owner):
            continue
        entry = _record_entry(groups[domain][owner], by_id, limits)
        if entry is not None and b.put(domain, entry, replace=True) and not in_fog(domain):
            vanity.add(domain)

    ents = {AGENT_ZONE, MODEL_ZONE}
    for name in b.names:
        if not in_fog(name):
            continue
        parent = name.partition(".")[2]
        while parent and parent != FOG and parent not in ents and parent not in b.names:
            ents.add(parent)
            parent = parent.partition(".")[2]
    return Zone(names=b.names, ents=frozenset(ents), serial=serial, limits=limits, dropped=b.dropped,
                vanity=frozenset(vanity))


def _record_entry(recs: list[dict], by_id: Mapping[str, tuple[dict, Entry]], limits: Limits) -> Entry | None:
    """One owner's records for one name, merged: a CNAME (the first) stands alone; otherwise the
    A and AAAA targets together. A target that is an instance id stands for its running
    replicas (and brings their SRV names)."""
    for rec in recs:
        if rec.get("record_type") == "CNAME":
            target = canonical_name(rec.get("cname_target"))
            if target is None:
                continue
            return Entry(ttl=_clamp_ttl(rec.get("ttl"), limits), cname=target)
    a: list[str] = []
    aaaa: list[str] = []
    p: set[int] = set()
    targets: list[str] = []
    ttls = []
    for rec in recs:
        rtype = rec.get("record_type")
        if rtype not in ("A", "AAAA") or not isinstance(rec.get("targets"), list):
            continue
        ttls.append(_clamp_ttl(rec.get("ttl"), limits))
        for t in rec["targets"][:MAX_TARGETS]:
            if not isinstance(t, str):
                continue
            if t in by_id:
                e = by_id[t][1]
                ips = e.a if rtype == "A" else e.aaaa
                p.update(e.ports)
                targets += e.targets
            else:
                v4, v6 = _split([t])
                ips = v4 if rtype == "A" else v6
            (a if rtype == "A" else aaaa).extend(ips)
    if not ttls:
        return None
    return Entry(ttl=min(ttls), a=tuple(dict.fromkeys(a))[:MAX_REPLICAS],
                 aaaa=tuple(dict.fromkeys(aaaa))[:MAX_REPLICAS], ports=_ports(p),
                 targets=tuple(dict.fromkeys(targets))[:MAX_REPLICAS] if p else ())
