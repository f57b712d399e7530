"""formnet's logic without interfaces: the UAPI text, peer diffs, overlay addresses and what a
member may route (the real wireguard-go runs in tests/integration/test_formnet.py)."""

from __future__ import annotations

import ipaddress

import pytest

from formation.mesh import keys
from formation.mesh.addressing import overlay_addresses
from formation.mesh.uapi import PeerChange, PeerConfig, UapiError, diff, parse_answer, set_request
from formation.node.formnet import allowed_subnets, desired_peers

CIDR = "10.42.0.0/16"


def member(i: int) -> str:
    return f"0x{i:040x}"


def pub(i: int) -> bytes:
    return keys.public_of(bytes([i]) * 32)


def record(i: int, *, subnet: str | None = None, key: int | None = None) -> dict:
    return {"address": member(i), "public_key": keys.b64(pub(key or i)), "overlay_ip": "10.42.9.9",
            "endpoints": [f"192.0.2.{i}:51820"], "vm_subnet": subnet}


def test_set_request_names_each_change_and_ends_with_a_blank_line():
    p = PeerConfig(pub(2), "192.0.2.2:51820", ("10.42.0.2/32", "10.201.0.0/24"))
    text = set_request(private_key=b"\x01" * 32, listen_port=51820,
                       changes=[PeerChange(p), PeerChange(PeerConfig(pub(3)), remove=True)]).decode()
    assert text.endswith("\n\n") and text.startswith("set=1\nprivate_key=" + "01" * 32)
    assert f"public_key={pub(2).hex()}\nendpoint=192.0.2.2:51820\npersistent_keepalive_interval=25\n" \
           "replace_allowed_ips=true\nallowed_ip=10.42.0.2/32\nallowed_ip=10.201.0.0/24\n" in text
    assert f"public_key={pub(3).hex()}\nremove=true\n" in text


def test_an_answer_is_parsed_and_an_errno_is_an_error():
    dev = parse_answer(f"listen_port=51820\npublic_key={pub(2).hex()}\nendpoint=1.2.3.4:5\n"
                       "allowed_ip=10.42.0.2/32\nerrno=0\n\n")
    assert dev.listen_port == 51820
    assert dev.public_keys[pub(2)] == {"allowed_ips": ["10.42.0.2/32"], "endpoint": "1.2.3.4:5"}
    with pytest.raises(UapiError, match="errno 1"):
        parse_answer("errno=1\n\n")


def test_diff_touches_only_the_peers_that_changed():
    a, b, c = (PeerConfig(pub(i), f"192.0.2.{i}:1", (f"10.42.0.{i}/32",)) for i in (2, 3, 4))
    b2 = PeerConfig(b.public_key, "192.0.2.33:1", b.allowed_ips)
    changes = diff({a.public_key: a, b.public_key: b}, {b.public_key: b2, c.public_key: c})
    assert changes == [PeerChange(a, remove=True), PeerChange(b2), PeerChange(c)]
    assert diff({a.public_key: a}, {a.public_key: a}) == []


def test_overlay_addresses_are_the_same_for_every_order_and_unique():
    members = [member(i) for i in range(200)]
    one = overlay_addresses(members, CIDR)
    assert one == overlay_addresses(list(reversed(members)), CIDR)
    assert len(set(one.values())) == 200
    net = ipaddress.ip_network(CIDR)
    assert all(ipaddress.ip_address(a) in net and a not in (str(net.network_address), str(net.broadcast_address))
               for a in one.values())
    # a tiny range forces collisions: still unique, still deterministic
    tiny = overlay_addresses(members[:6], "10.42.0.0/29")
    assert len(set(tiny.values())) == 6 and tiny == overlay_addresses(members[:6][::-1], "10.42.0.0/29")
    with pytest.raises(ValueError, match="full"):
        overlay_addresses(members[:7], "10.42.0.0/29")


def test_a_member_cannot_route_the_overlay_or_another_members_subnet():
    recs = {member(1): record(1, subnet="10.201.1.0/24"), member(2): record(2, subnet="10.201.1.0/25"),
            member(3): record(3, subnet="10.42.5.0/24"), member(4): record(4, subnet="0.0.0.0/0"),
            member(5): record(5, subnet="10.202.0.0/24"), member(6): record(6, subnet="bogus"),
            member(7): record(7, subnet="192.168.1.0/24"), member(8): record(8, subnet="10.213.0.0/16")}
    # a LAN range or a net wider than the fog's VM space (10.200-10.249) would pull hosts' own
    # traffic into the tunnel on every node
    assert allowed_subnets(recs, CIDR) == {member(1): "10.201.1.0/24", member(5): "10.202.0.0/24",
                                           member(8): "10.213.0.0/16"}
    assert allowed_subnets({member(9): record(9, subnet="10.0.0.0/8")}, CIDR) == {}


def test_a_peer_claiming_this_nodes_own_subnet_is_not_routed_there():
    me = member(5)
    members = frozenset({me, member(2)})
    recs = {member(2): record(2, subnet="10.205.0.0/24")}  # smaller address: the fog keeps it for 2
    _, peers, _ = desired_peers(me, members, recs, CIDR, own_subnet="10.205.0.0/24")
    assert peers[pub(2)].allowed_ips == (f"{overlay_addresses(members, CIDR)[member(2)]}/32",)


def test_peers_are_members_only_with_derived_addresses():
    me = member(1)
    members = frozenset({me, member(2), member(3)})
    recs = {m: record(i, subnet=f"10.20{i}.0.0/24") for i, m in
            ((1, member(1)), (2, member(2)), (3, member(3)), (4, member(4)))}
    mine, peers, owner = desired_peers(me, members, recs, CIDR)
    overlay = overlay_addresses(members, CIDR)
    assert mine == overlay[me]
    assert set(owner.values()) == {member(2), member(3)}  # member(4) has a record, not admission
    p2 = peers[pub(2)]
    assert p2.allowed_ips == (f"{overlay[member(2)]}/32", "10.202.0.0/24")  # not the record's overlay_ip
    assert p2.endpoint == "192.0.2.2:51820"


def test_two_members_with_one_key_get_no_peer():
    me = member(1)
    members = frozenset({me, member(2), member(3)})
    recs = {member(2): record(2, key=9), member(3): record(3, key=9)}
    _, peers, _ = desired_peers(me, members, recs, CIDR)
    assert peers == {}
    # nor does a third one with that key (it got the peer before), and none is named an owner
    members |= {member(4)}
    recs[member(4)] = record(4, key=9)
    _, peers, owner = desired_peers(me, members, recs, CIDR)
    assert peers == {} and owner == {}


def test_a_node_not_admitted_has_no_address_and_no_peer():
    mine, peers, _ = desired_peers(member(1), frozenset({member(2)}), {member(2): record(2)}, CIDR)
    assert mine is None and peers == {}


def test_the_key_file_is_made_once_and_private(tmp_path):
    path = tmp_path / "wireguard.key"
    k = keys.load_or_create(path)
    assert keys.load_or_create(path) == k and len(k) == 32
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_silent_peer_is_tried_at_its_next_endpoint_round_and_round():
    from formation.node.formnet import HANDSHAKE_STALE, TRY_ENDPOINT, next_endpoint

    wall = 1_000_000
    assert next_endpoint(3, 0, 0.0, 0, TRY_ENDPOINT - 1, wall) == (0, 0.0)  # still being tried
    assert next_endpoint(3, 0, 0.0, 0, TRY_ENDPOINT, wall) == (1, TRY_ENDPOINT)  # no handshake: next
    assert next_endpoint(3, 2, 0.0, 0, 100.0, wall) == (0, 100.0)  # round and round
    assert next_endpoint(3, 1, 0.0, wall - 10, 100.0, wall) == (1, 0.0)  # handshakes come: keep it
    assert next_endpoint(3, 1, 0.0, wall - HANDSHAKE_STALE, 100.0, wall) == (2, 100.0)  # gone stale
    assert next_endpoint(1, 0, 0.0, 0, 100.0, wall) == (0, 0.0)  # one candidate: nothing to try
