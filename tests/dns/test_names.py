"""names.py: the zone built from state records (pure: no IO, fast)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formation.dns.names import (
    AGENT_ZONE,
    Limits,
    build_zone,
    canonical_name,
    counts,
    is_vm_address,
    label_address,
    owner_label,
    to_label,
)

ALICE = "0x" + "a1" * 20
BOB = "0x" + "b2" * 20
N1 = "0x" + "01" * 20
N2 = "0x" + "02" * 20
IID = "0123456789abcdef0123456789abcdef"
IID2 = "fedcba9876543210fedcba9876543210"
SERVING = {N1: "10.201.1.0/24", N2: "10.201.2.0/24"}


def inst(iid=IID, owner=ALICE, name="web", created=1, **kw):
    return {"instance_id": iid, "owner": owner, "name": name, "created_at": created, **kw}


def status(iid=IID, node=N1, ip="10.201.1.5", state="running"):
    return {"instance_id": iid, "node": node, "state": state, "ip": ip}


def rec(rid, domain, owner=ALICE, rtype="A", targets=(), cname=None, ttl=60, created=1):
    return {"record_id": rid, "domain": domain, "owner": owner, "record_type": rtype,
            "targets": list(targets), "cname_target": cname, "ttl": ttl, "created_at": created}


def test_owner_label_is_base32_of_the_address_and_round_trips():
    label = owner_label(ALICE)
    assert len(label) == 32 and label == base64.b32encode(bytes.fromhex("a1" * 20)).decode().lower()
    assert label_address(label) == ALICE
    assert label_address(label.upper()) == ALICE
    assert label_address("a1" * 20) == ALICE and label_address("0x" + "A1" * 20) == ALICE
    for junk in ("", "web", "0x1234", "z" * 33, "1" * 32, "g" * 40):
        assert label_address(junk) is None
    with pytest.raises(ValueError):
        owner_label("0x" + "A1" * 20)  # only the canonical lowercase form


def test_user_names_become_one_label():
    assert to_label("My Agent") == "my-agent"
    assert to_label("web_1.v2") == "web-1-v2"
    assert to_label("--x--") == "x"
    assert to_label("a" * 80) == "a" * 63
    assert to_label("a" * 62 + "-b") == "a" * 62  # no '-' left at the end after the cut
    for bad in ("", "---", "\x00\x01", "ééé", None, 5, "x" * 2000):
        assert to_label(bad) is None
    assert to_label("İstanbul") == "i-stanbul"  # whatever lower() makes of it, only a-z0-9-


def test_canonical_names_are_checked_and_addresses_folded():
    assert canonical_name("App.Example.COM.") == "app.example.com"
    assert canonical_name(f"x.0x{'a1' * 20}.fog") == f"x.{owner_label(ALICE)}.fog"
    assert canonical_name(f"x.{'a1' * 20}.example.com") == f"x.{'a1' * 20}.example.com"  # only under .fog
    for bad in ("", ".", "a..b", "-a.com", "a_b.com", "a b.com", "a\x00.com", "a." * 127 + "a",
                "x" * 64 + ".com", None, 3, "ü.com"):
        assert canonical_name(bad) is None


def test_vm_addresses_are_inside_their_subnet_and_not_its_edges():
    assert is_vm_address("10.201.1.5", "10.201.1.0/24")
    for ip in ("10.201.1.0", "10.201.1.1", "10.201.1.255", "10.201.2.5", "127.0.0.1", "::1", "junk"):
        assert not is_vm_address(ip, "10.201.1.0/24")
    assert not is_vm_address("10.201.1.5", None)


def test_instance_replica_and_owner_scoped_names():
    z = build_zone(instances=[inst()], statuses=[status(), status(node=N2, ip="10.201.2.7")],
                   serving=SERVING, ports={IID: [8080, 22]})
    ol = owner_label(ALICE)
    e = z.names[f"{IID}.fog"]
    assert e.a == ("10.201.1.5", "10.201.2.7") and e.ports == (22, 8080)
    assert z.names[f"web.{ol}.fog"] is e  # one entry, two names
    r1 = f"{owner_label(N1)}.{IID}.fog"
    assert z.names[r1].a == ("10.201.1.5",) and z.names[r1].targets == (r1,)
    assert set(e.targets) == {r1, f"{owner_label(N2)}.{IID}.fog"}
    assert f"{ol}.fog" in z.ents and z.exists(f"{ol}.fog") and z.exists("fog")


def test_replicas_that_do_not_count():
    statuses = [status(state="booting"), status(node=N2, ip="10.201.1.9"),  # N2 claims N1's subnet
                status(iid=IID2, node="0x" + "03" * 20, ip="10.201.3.5"),  # not serving
                status(iid=IID2, ip="10.201.1.1"),  # the gateway
                status(iid=IID2, ip="8.8.8.8"), {"junk": True}, "not a dict", status(node="nobody")]
    z = build_zone(instances=[inst(), inst(iid=IID2, name="db")], statuses=statuses, serving=SERVING)
    assert z.names[f"{IID}.fog"].a == () and z.names[f"{IID2}.fog"].a == ()
    assert not any(n.endswith(f".{IID}.fog") for n in z.names)


def test_an_unhealthy_replica_does_not_count_an_unknown_one_does():
    assert counts({"state": "running"}) and counts({"state": "running", "health": "unknown"})
    assert counts({"state": "running", "health": "healthy"})
    assert not counts({"state": "running", "health": "unhealthy"}) and not counts({"state": "booting"})
    sick = {**status(node=N2, ip="10.201.2.5"), "health": "unhealthy"}
    z = build_zone(instances=[inst()], statuses=[{**status(), "health": "healthy"}, sick],
                   serving=SERVING, ports={IID: [80]})
    assert z.names[f"{IID}.fog"].a == ("10.201.1.5",)
    assert z.names[f"{IID}.fog"].targets == (f"{owner_label(N1)}.{IID}.fog",)
    assert f"{owner_label(N2)}.{IID}.fog" not in z.names


def test_replicas_in_the_answering_nodes_region_come_first():
    statuses = [status(), status(node=N2, ip="10.201.2.5")]
    z = build_zone(instances=[inst()], statuses=statuses, serving=SERVING, ports={IID: [80]})
    assert z.names[f"{IID}.fog"].a == ("10.201.1.5", "10.201.2.5")  # by node address
    z = build_zone(instances=[inst()], statuses=statuses, serving=SERVING, ports={IID: [80]},
                   regions={N1: "us", N2: "eu"}, near="eu")
    assert z.names[f"{IID}.fog"].a == ("10.201.2.5", "10.201.1.5")
    assert z.names[f"{IID}.fog"].targets[0] == f"{owner_label(N2)}.{IID}.fog"


def test_first_created_instance_wins_a_shared_name_and_names_are_per_owner():
    z = build_zone(instances=[inst(iid=IID2, created=5), inst(iid=IID, created=3),
                              inst(iid="aa" * 16, owner=BOB, created=1)],
                   statuses=[status(), status(iid=IID2, ip="10.201.1.6")], serving=SERVING)
    assert z.names[f"web.{owner_label(ALICE)}.fog"].a == ("10.201.1.5",)
    assert f"web.{owner_label(BOB)}.fog" in z.names
    assert z.names[f"{IID2}.fog"].a == ("10.201.1.6",)  # the later one keeps its id name


def test_agents_and_models():
    build = "img-" + "ab" * 10
    agent = {"agent_id": "ag1", "owner": ALICE, "name": "Helper Bot", "build_id": build, "port": 8000,
             "is_private": False, "created_at": 1}
    private = {**agent, "agent_id": "ag2", "name": "secret", "is_private": True}
    model = {"model_id": "m1", "owner": BOB, "name": "Llama 3", "created_at": 1}
    theirs = inst(iid=IID2, owner=BOB, build_id=build)  # Bob's instance of the same build
    z = build_zone(instances=[inst(build_id=build), theirs], statuses=[status(), status(iid=IID2, ip="10.201.1.9")],
                   serving=SERVING, ports={IID: [8000], IID2: [8000]}, agents=[agent, private], models=[model])
    a = z.names[f"ag1.{AGENT_ZONE}"]
    assert z.names[f"helper-bot.{owner_label(ALICE)}.agent.fog"] is a
    assert a.a == ("10.201.1.5",)  # not Bob's instance: Alice may not act on it
    assert a.ports == (8000,) and a.txt == ("kind=agent", "id=ag1", f"owner={ALICE}")
    assert "ag2.agent.fog" not in z.names and f"secret.{owner_label(ALICE)}.agent.fog" not in z.names
    m = z.names["m1.model.fog"]
    assert m.txt[1] == "id=m1" and m.a == () and z.names[f"llama-3.{owner_label(BOB)}.model.fog"] is m


def test_records_in_the_owners_own_space_need_no_proof_and_others_are_dropped():
    ol = owner_label(ALICE)
    z = build_zone(instances=[inst()], statuses=[status()], serving=SERVING, ports={IID: [80]}, records=[
        rec("r1", f"api.0x{'a1' * 20}.fog", targets=[IID], ttl=1),  # hex form accepted, TTL raised
        rec("r2", f"web.{ol}.fog", targets=["192.0.2.1", "2001:db8::1"], ttl=99999),  # replaces the instance name
        rec("r3", f"x.{owner_label(BOB)}.fog", targets=["192.0.2.9"]),  # Bob's space: dropped
        rec("r4", "evil.fog", targets=["192.0.2.9"]),  # .fog itself: dropped
        rec("r5", f"{IID}.fog", targets=["192.0.2.9"]),  # an instance's name: dropped
    ])
    api = z.names[f"api.{ol}.fog"]
    assert api.a == ("10.201.1.5",) and api.ttl == 5 and api.ports == (80,) and api.targets
    web = z.names[f"web.{ol}.fog"]
    assert web.a == ("192.0.2.1",) and web.aaaa == () and web.ttl == 3600  # no v6 target in an A record
    assert f"x.{owner_label(BOB)}.fog" not in z.names and "evil.fog" not in z.names
    assert z.names[f"{IID}.fog"].a == ("10.201.1.5",)
    assert z.dropped == 3


def test_vanity_domains_need_the_proof_and_one_owner_is_chosen():
    recs = [rec("r1", "app.example.com", targets=["192.0.2.1"]),
            rec("r2", "app.example.com", owner=BOB, targets=["192.0.2.2"]),
            rec("r3", "app.example.com", rtype="AAAA", targets=["2001:db8::1"]),
            rec("r4", "cn.example.com", rtype="CNAME", cname=f"web.{owner_label(ALICE)}.fog"),
            rec("r5", "cn.example.com", targets=["192.0.2.3"])]
    assert build_zone(records=recs).names == {}  # nothing proven
    z = build_zone(records=recs, verified={"app.example.com": {BOB}})
    assert z.names["app.example.com"].a == ("192.0.2.2",) and z.vanity == {"app.example.com"}
    z = build_zone(records=recs, verified={"app.example.com": {ALICE, BOB}, "cn.example.com": {ALICE}})
    app = z.names["app.example.com"]
    assert app.a == ("192.0.2.1",) and app.aaaa == ("2001:db8::1",)  # the lower address's records
    assert z.names["cn.example.com"].cname == f"web.{owner_label(ALICE)}.fog"  # a CNAME stands alone


def test_bounds_per_owner_and_in_total():
    many = [inst(iid=f"{i:032x}", name=f"n{i}", created=i) for i in range(50)]
    z = build_zone(instances=many + [inst(iid="f" * 32, owner=BOB, created=99)],
                   limits=Limits(max_names_per_owner=10))
    alice = [n for n in z.names if n.endswith(f"{owner_label(ALICE)}.fog") or n[:32] in {f"{i:032x}" for i in range(50)}]
    assert len(alice) == 10 and f"{'f' * 32}.fog" in z.names and z.dropped == 45
    z = build_zone(instances=many, limits=Limits(max_names=7))
    assert len(z.names) <= 7


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=80),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                     max_leaves=12)
_field = st.sampled_from(["instance_id", "owner", "name", "created_at", "record_id", "domain", "record_type",
                          "targets", "cname_target", "ttl", "state", "node", "ip", "agent_id", "model_id",
                          "build_id", "port", "is_private", "authorized"])
_hostile = st.dictionaries(_field, _json | st.sampled_from([ALICE, IID, "10.201.1.5", "running", "A", "CNAME"]),
                           max_size=8)


@settings(max_examples=60, deadline=None)
@given(st.lists(_hostile, max_size=6), st.lists(_hostile, max_size=6), st.lists(_hostile, max_size=6),
       st.lists(_hostile, max_size=4))
def test_hostile_records_never_break_the_build(instances, statuses, records, agents):
    z = build_zone(instances=instances, statuses=statuses, records=records, agents=agents, models=agents,
                   serving={**SERVING, "junk": "not a net"}, ports={IID: ["x", -1, 70000, 80]},
                   verified={"app.example.com": {ALICE}})
    for name in z.names:
        assert len(name) <= 253 and all(0 < len(x) <= 63 for x in name.split("."))
        assert name.isascii() and name == name.lower()
