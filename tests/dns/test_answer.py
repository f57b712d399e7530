"""answer.py: query message -> response message (pure: no IO, fast)."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset

from formation.dns.answer import answer, error_for, from_upstream, max_udp_size, render
from formation.dns.names import build_zone, owner_label

ALICE = "0x" + "a1" * 20
N1 = "0x" + "01" * 20
IID = "0123456789abcdef0123456789abcdef"
OL = owner_label(ALICE)
RNAME = f"{owner_label(N1)}.{IID}.fog"


def zone():
    many = [f"192.0.2.{i}" for i in range(1, 61)]
    return build_zone(
        instances=[{"instance_id": IID, "owner": ALICE, "name": "web", "created_at": 1}],
        statuses=[{"instance_id": IID, "node": N1, "state": "running", "ip": "10.201.1.5"},
                  {"instance_id": IID, "node": "0x" + "02" * 20, "state": "running", "ip": "fd00::5"}],
        serving={N1: "10.201.1.0/24", "0x" + "02" * 20: "fd00::/64"}, ports={IID: [8080]},
        models=[{"model_id": "m1", "owner": ALICE, "name": "m", "created_at": 1}],
        records=[{"record_id": "r1", "owner": ALICE, "domain": f"alias.{OL}.fog", "record_type": "CNAME",
                  "cname_target": f"web.{OL}.fog", "ttl": 300},
                 {"record_id": "r2", "owner": ALICE, "domain": f"loop.{OL}.fog", "record_type": "CNAME",
                  "cname_target": f"loop.{OL}.fog"},
                 {"record_id": "r3", "owner": ALICE, "domain": f"big.{OL}.fog", "record_type": "A",
                  "targets": many},
                 {"record_id": "r4", "owner": ALICE, "domain": "app.example.com", "record_type": "A",
                  "targets": [IID]},
                 {"record_id": "r5", "owner": ALICE, "domain": f"ext.{OL}.fog", "record_type": "CNAME",
                  "cname_target": "example.org"}],
        verified={"app.example.com": {ALICE}}, serial=7)


Z = zone()


def ask(name, rdtype="A", **kw):
    return answer(dns.message.make_query(name, rdtype, **kw), Z, recursion=True)


def texts(section):
    return sorted(r.to_text() for rrset in section for r in [rrset])


def test_instance_names_answer_with_their_replicas():
    r = ask(f"{IID}.fog")
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA and r.flags & dns.flags.RA
    assert [rd.to_text() for rd in r.answer[0]] == ["10.201.1.5"] and r.answer[0].ttl == 30
    assert [rd.to_text() for rd in ask(f"{IID}.fog", "AAAA").answer[0]] == ["fd00::5"]
    assert [rd.to_text() for rd in ask(f"web.{OL}.fog").answer[0]] == ["10.201.1.5"]
    assert [rd.to_text() for rd in ask(RNAME).answer[0]] == ["10.201.1.5"]
    assert len(ask(f"{IID}.fog", "ANY").answer) == 2


def test_names_are_case_insensitive_and_answered_as_asked():
    r = ask(f"WeB.{OL.upper()}.FoG")
    assert r.answer[0].name == dns.name.from_text(f"WeB.{OL.upper()}.FoG")
    assert r.answer[0].name.to_text() == f"WeB.{OL.upper()}.FoG."  # the case as asked (0x20)
    hexed = ask(f"web.0x{'A1' * 20}.fog")  # the owner's address in hex works too
    assert [rd.to_text() for rd in hexed.answer[0]] == ["10.201.1.5"]
    assert hexed.answer[0].name.to_text() == f"web.0x{'A1' * 20}.fog."


def test_srv_for_exposed_ports_with_glue():
    r = ask(f"_8080._tcp.web.{OL}.fog", "SRV")
    assert sorted(rd.to_text() for rd in r.answer[0]) == sorted(
        f"0 1 8080 {t}." for t in Z.names[f"{IID}.fog"].targets)
    assert any(rrset.name == dns.name.from_text(RNAME) for rrset in r.additional)
    assert ask(f"_8080._tcp.{RNAME}", "SRV").answer[0][0].target == dns.name.from_text(RNAME)
    nodata = ask(f"_8080._tcp.{IID}.fog", "A")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer and nodata.authority
    assert ask(f"_9999._tcp.{IID}.fog", "SRV").rcode() == dns.rcode.NXDOMAIN
    assert ask(f"_tcp.{IID}.fog", "SRV").rcode() == dns.rcode.NOERROR  # an empty non-terminal
    assert ask(f"_8080._udp.{IID}.fog", "SRV").rcode() == dns.rcode.NXDOMAIN


def test_nxdomain_and_nodata_carry_the_soa():
    nx = ask("nothing.fog")
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.flags & dns.flags.AA
    soa = nx.authority[0]
    assert soa.rdtype == dns.rdatatype.SOA and soa[0].minimum == 5 and soa[0].serial == 7
    for name, rdtype in ((f"{IID}.fog", "TXT"), (f"{OL}.fog", "A"), ("fog", "A"), ("agent.fog", "A"),
                         (f"{IID}.fog", "MX")):
        r = ask(name, rdtype)
        assert r.rcode() == dns.rcode.NOERROR and not r.answer and r.authority[0].rdtype == dns.rdatatype.SOA, name
    assert ask("fog", "SOA").answer[0].rdtype == dns.rdatatype.SOA
    assert ask("m1.model.fog", "TXT").answer[0][0].strings == (b"kind=model",)


def test_cnames_are_followed_inside_the_zone_and_loops_end():
    r = ask(f"alias.{OL}.fog")
    assert [rr.rdtype for rr in r.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    assert r.answer[0].ttl == 300
    assert [rr.rdtype for rr in ask(f"alias.{OL}.fog", "CNAME").answer] == [dns.rdatatype.CNAME]
    loop = ask(f"loop.{OL}.fog")
    assert 1 <= len(loop.answer) <= 8 and loop.rcode() == dns.rcode.NOERROR
    ext = ask(f"ext.{OL}.fog")
    assert [rr.rdtype for rr in ext.answer] == [dns.rdatatype.CNAME]  # outside: the client follows


def test_vanity_names_answer_addresses_and_leave_the_rest_to_their_dns():
    r = ask("APP.example.com")
    assert [rd.to_text() for rd in r.answer[0]] == ["10.201.1.5"] and r.flags & dns.flags.AA
    assert not ask("app.example.com", "AAAA").answer  # NODATA: ours, and no v6 target
    assert ask("app.example.com", "MX") is None and ask("app.example.com", "TXT") is None
    assert ask("_formation.app.example.com", "TXT") is None
    assert ask("x.app.example.com") is None and ask("example.com") is None and ask(".") is None
    assert ask("_8080._tcp.app.example.com", "SRV").answer


def test_errors():
    q = dns.message.make_query(f"{IID}.fog", "A")
    q.set_opcode(dns.opcode.NOTIFY)
    assert answer(q, Z).rcode() == dns.rcode.NOTIMP
    q = dns.message.make_query(f"{IID}.fog", "A", use_edns=1)
    assert answer(q, Z).rcode() == dns.rcode.BADVERS
    assert ask(f"{IID}.fog", "A", rdclass="CH").rcode() == dns.rcode.REFUSED
    assert ask("fog", "AXFR").rcode() == dns.rcode.REFUSED
    q = dns.message.make_query(f"{IID}.fog", "A")
    q.question.append(q.question[0])
    assert answer(q, Z).rcode() == dns.rcode.FORMERR


def test_truncation_to_what_the_client_takes():
    q = dns.message.make_query(f"big.{OL}.fog", "A")  # no EDNS: 512 bytes
    r = answer(q, Z)
    assert len(r.answer[0]) == 60
    small = dns.message.from_wire(render(r, max_udp_size(q)))
    assert small.flags & dns.flags.TC and not small.answer
    whole = dns.message.from_wire(render(r, 65535))
    assert not whole.flags & dns.flags.TC and len(whole.answer[0]) == 60
    q = dns.message.make_query(f"big.{OL}.fog", "A", use_edns=0, payload=4096)
    assert max_udp_size(q) == 1232 and not dns.message.from_wire(render(answer(q, Z), max_udp_size(q))).flags & dns.flags.TC
    q = dns.message.make_query(f"big.{OL}.fog", "A", use_edns=0, payload=100)
    assert max_udp_size(q) == 512


def test_error_for_garbage():
    assert error_for(b"\x12\x34", dns.rcode.FORMERR) is None
    assert error_for(b"\x12\x34\x80" + b"\x00" * 9, dns.rcode.FORMERR) is None  # a response
    out = error_for(b"\x12\x34\x01\x00" + b"\xff" * 20, dns.rcode.FORMERR)
    m = dns.message.from_wire(out)
    assert m.id == 0x1234 and m.rcode() == dns.rcode.FORMERR and m.flags & dns.flags.QR and m.flags & dns.flags.RD


def test_from_upstream_ages_ttls_and_keeps_the_clients_question():
    q = dns.message.make_query("WWW.Example.org", "A", use_edns=0, want_dnssec=True)
    up = dns.message.make_response(dns.message.make_query("www.example.org", "A"))
    up.answer.append(dns.rrset.from_text("www.example.org.", 300, "IN", "A", "192.0.2.80"))
    up.flags |= dns.flags.AD
    r = from_upstream(q, up, 20.7)
    assert r.id == q.id and r.question[0].name.to_text() == "WWW.Example.org."
    assert r.answer[0].ttl == 280 and r.flags & dns.flags.RA and r.flags & dns.flags.AD
    assert up.answer[0].ttl == 300  # the cached answer itself is untouched
    assert from_upstream(q, up, 1000).answer[0].ttl == 0
