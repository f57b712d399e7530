"""A query message in, a response message out, from a Zone: no IO, no clock.

`answer` returns None for a question outside the fog's zones: the server forwards it upstream
(or refuses it). `from_upstream` turns an upstream's answer into the response to the client's
query; `render` makes the wire bytes, truncated (TC) to what the client can take over UDP.
"""

from __future__ import annotations

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.TXT import TXT

from .names import FOG, Entry, Zone, canonical_label

EDNS_PAYLOAD = 1232  # what we advertise and send at most over UDP (the DNS flag day 2020 value)
MAX_CNAME_CHAIN = 8
_A, _AAAA, _CNAME, _TXT, _SRV, _SOA = (dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.CNAME,
                                       dns.rdatatype.TXT, dns.rdatatype.SRV, dns.rdatatype.SOA)
_ANY = dns.rdatatype.ANY
_ADDRESS_TYPES = frozenset({_A, _AAAA, _CNAME, _SRV, _ANY})  # what a vanity name answers itself
_ZONE_TRANSFERS = frozenset({dns.rdatatype.AXFR, dns.rdatatype.IXFR})
_FOG = dns.name.from_text(FOG)
_IN = dns.rdataclass.IN


def name_key(name: dns.name.Name) -> str:
    """The zone's key of a query name: lowercase, no final dot, address labels under .fog in
    base32 (names.canonical_label); "" for the root."""
    text = name.to_text(omit_final_dot=True).lower()
    if text == ".":
        return ""
    if text == FOG or text.endswith(".fog"):
        labels = text.split(".")
        if any(len(x) in (40, 42) for x in labels):
            text = ".".join(canonical_label(x) for x in labels)
    return text


def max_udp_size(query: dns.message.Message) -> int:
    if query.edns < 0:
        return 512
    return max(512, min(query.payload, EDNS_PAYLOAD))


def render(response: dns.message.Message, limit: int) -> bytes:
    """Wire bytes of at most `limit` (65535 over TCP): over it, sections are dropped and TC set."""
    return response.to_wire(max_size=limit, prefer_truncation=True)


def error_for(wire: bytes, rcode: int) -> bytes | None:
    """A bare response (header only) to a message that could not be parsed, echoing its id,
    opcode and RD; None for what is not worth answering (too short to be a query, a response)."""
    if len(wire) < 12 or wire[2] & 0x80:
        return None
    flags = 0x8000 | ((wire[2] & 0x79) << 8) | (rcode & 0xF)  # QR, opcode, RD
    return wire[:2] + flags.to_bytes(2, "big") + b"\x00" * 8


def _response(query: dns.message.Message, *, recursion: bool) -> dns.message.Message:
    return dns.message.make_response(query, recursion_available=recursion, our_payload=EDNS_PAYLOAD)


def status(query: dns.message.Message, rcode: int, *, recursion: bool = False) -> dns.message.Message:
    resp = _response(query, recursion=recursion)
    resp.set_rcode(rcode)
    return resp


def check(query: dns.message.Message, *, recursion: bool) -> dns.message.Message | None:
    """The error response a query gets before any lookup (None: it is one we answer)."""
    if query.opcode() != dns.opcode.QUERY:
        return status(query, dns.rcode.NOTIMP, recursion=recursion)
    if len(query.question) != 1:
        return status(query, dns.rcode.FORMERR, recursion=recursion)
    if query.edns > 0:
        return status(query, dns.rcode.BADVERS, recursion=recursion)
    q = query.question[0]
    if q.rdtype == dns.rdatatype.OPT:
        return status(query, dns.rcode.FORMERR, recursion=recursion)
    if q.rdclass not in (_IN, dns.rdataclass.ANY):
        return status(query, dns.rcode.REFUSED, recursion=recursion)
    return None


def answer(query: dns.message.Message, zone: Zone, *, recursion: bool = False) -> dns.message.Message | None:
    """The response from the zone, or None when the question is not the fog's to answer."""
    bad = check(query, recursion=recursion)
    if bad is not None:
        return bad
    q = query.question[0]
    key = name_key(q.name)
    fog = key == FOG or key.endswith(".fog")
    if not fog and not _vanity_answers(zone, key, q.rdtype):
        return None  # not ours; or a type of a vanity name (MX, TXT ...) that its own DNS answers
    if q.rdtype in _ZONE_TRANSFERS:
        return status(query, dns.rcode.REFUSED, recursion=recursion)
    resp = _response(query, recursion=recursion)
    resp.flags |= dns.flags.AA
    name, rdtype = q.name, q.rdtype
    entry = zone.names.get(key)
    if entry is None:
        srv = _srv(zone, key)
        if srv is not None:
            base, port = srv
            if rdtype in (_SRV, _ANY):
                resp.answer.append(_srv_rrset(name, base, port))
                _glue(resp, zone, base.targets)
            elif fog:
                resp.authority.append(_soa(zone))
            return resp
        if zone.exists(key) or _tcp_node(zone, key):
            if rdtype == _SOA and key == FOG:
                resp.answer.append(_soa(zone, name))
            else:
                resp.authority.append(_soa(zone))  # NODATA
            return resp
        resp.set_rcode(dns.rcode.NXDOMAIN)
        resp.authority.append(_soa(zone))
        return resp
    for _ in range(MAX_CNAME_CHAIN):
        if entry.cname is not None:
            target = dns.name.from_text(entry.cname)
            resp.answer.append(dns.rrset.from_text_list(name, entry.ttl, _IN, _CNAME, [target.to_text()]))
            if rdtype in (_CNAME, _ANY):
                return resp
            entry = zone.names.get(name_key(target))
            if entry is None:
                return resp  # a target outside the zone: the client's resolver follows it
            name = target
            continue
        rrsets = _rrsets(name, entry, rdtype)
        resp.answer += rrsets
        if not rrsets and in_fog_name(name):
            resp.authority.append(_soa(zone))  # NODATA
        return resp
    return resp  # a CNAME loop: what was found so far


def _vanity_answers(zone: Zone, key: str, rdtype: int) -> bool:
    """A served vanity name answers its addresses (A, AAAA, or every type when it is a CNAME)
    and the SRV names of its ports; every other type is left to the domain's own DNS."""
    if key in zone.vanity:
        entry = zone.names[key]
        return entry.cname is not None or rdtype in _ADDRESS_TYPES
    return rdtype in (_SRV, _ANY) and _srv(zone, key) is not None


def in_fog_name(name: dns.name.Name) -> bool:
    return name.is_subdomain(_FOG)


def _srv(zone: Zone, key: str) -> tuple[Entry, int] | None:
    """`_<port>._tcp.<name>` for a name holding that EXPOSEd port: (its entry, the port)."""
    if not key.startswith("_"):
        return None
    first, _, rest = key.partition(".")
    proto, _, base_name = rest.partition(".")
    if proto != "_tcp" or not first[1:].isdigit() or len(first) > 6:
        return None
    port = int(first[1:])
    base = zone.names.get(base_name)
    if base is None or port not in base.ports or base.cname is not None:
        return None
    return base, port


def _tcp_node(zone: Zone, key: str) -> bool:
    """`_tcp.<name>` exists (no data of its own) when the name has SRV records below it."""
    if not key.startswith("_tcp."):
        return False
    base = zone.names.get(key[5:])
    return base is not None and bool(base.ports) and base.cname is None


_RDATA: dict[tuple[int, str], dns.rdata.Rdata] = {}  # rdata are immutable: made once per address
_RDATA_MAX = 200_000


def _rdata(rdtype: int, text: str) -> dns.rdata.Rdata:
    rd = _RDATA.get((rdtype, text))
    if rd is None:
        if len(_RDATA) >= _RDATA_MAX:
            _RDATA.clear()
        rd = _RDATA[(rdtype, text)] = dns.rdata.from_text(_IN, rdtype, text)
    return rd


def _address_rrset(name: dns.name.Name, ttl: int, rdtype: int, texts: tuple[str, ...]) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(name, _IN, rdtype)
    rrset.update_ttl(ttl)
    for t in texts:
        rrset.add(_rdata(rdtype, t))
    return rrset


def _rrsets(name: dns.name.Name, entry: Entry, rdtype: int) -> list[dns.rrset.RRset]:
    out = []
    if entry.a and rdtype in (_A, _ANY):
        out.append(_address_rrset(name, entry.ttl, _A, entry.a))
    if entry.aaaa and rdtype in (_AAAA, _ANY):
        out.append(_address_rrset(name, entry.ttl, _AAAA, entry.aaaa))
    if entry.txt and rdtype in (_TXT, _ANY):
        rrset = dns.rrset.RRset(name, _IN, _TXT)
        for s in entry.txt:
            rrset.add(TXT(_IN, _TXT, [s.encode()[:255]]), entry.ttl)
        out.append(rrset)
    return out


def _srv_rrset(name: dns.name.Name, base: Entry, port: int) -> dns.rrset.RRset:
    return dns.rrset.from_text_list(name, base.ttl, _IN, _SRV,
                                    [f"0 1 {port} {t}." for t in base.targets])


def _glue(resp: dns.message.Message, zone: Zone, targets: tuple[str, ...]) -> None:
    for t in targets:
        e = zone.names.get(t)
        if e is not None:
            tname = dns.name.from_text(t)
            resp.additional += _rrsets(tname, e, _A) + _rrsets(tname, e, _AAAA)


def _soa(zone: Zone, name: dns.name.Name = _FOG) -> dns.rrset.RRset:
    neg = zone.limits.negative_ttl
    return dns.rrset.from_text(name, neg, _IN, _SOA,
                               f"fog. hostmaster.fog. {zone.serial & 0xFFFFFFFF} 3600 600 86400 {neg}")


# ---- forwarded answers ------------------------------------------------------------------------

def from_upstream(query: dns.message.Message, upstream: dns.message.Message, age: float) -> dns.message.Message:
    """The client's response from an upstream's answer received `age` seconds ago (TTLs aged)."""
    resp = _response(query, recursion=True)
    resp.set_rcode(upstream.rcode())
    dnssec = bool(query.ednsflags & dns.flags.DO)
    if upstream.flags & dns.flags.AD and (dnssec or query.flags & dns.flags.AD):
        resp.flags |= dns.flags.AD
    if dnssec:
        resp.want_dnssec(True)
    elapsed = max(0, int(age))
    for section, theirs in ((resp.answer, upstream.answer), (resp.authority, upstream.authority),
                            (resp.additional, upstream.additional)):
        for rrset in theirs:
            copy = dns.rrset.RRset(rrset.name, rrset.rdclass, rrset.rdtype, rrset.covers)
            copy.update(rrset)
            copy.ttl = max(0, rrset.ttl - elapsed)
            section.append(copy)
    return resp
