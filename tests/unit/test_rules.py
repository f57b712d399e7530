"""Who may write what: the validity rules of every kind, through the real store."""

import pytest

from formation.crdt.kinds import Invalid
from formation.crdt.store import Store
from tests.support import Node, User


@pytest.fixture
def node():
    return Node(Store())


def test_account_is_written_only_by_its_address_and_never_self_credits(node):
    alice = User()
    op = node.relay(alice, "POST", "/v1/account/create", {"name": "Alice"})
    assert op.key == alice.address
    acct = node.store.get("account", alice.address)
    assert acct["credits"] == 100 and acct["name"] == "Alice"
    with pytest.raises(Invalid, match="credits"):
        node.relay(alice, "POST", "/account/update", {"credits": 10**9}, ts=2)
    with pytest.raises(Invalid, match="is_global_admin"):
        node.relay(alice, "POST", "/account/update", {"is_global_admin": True}, ts=3)
    with pytest.raises(Invalid, match="already exists"):
        node.relay(alice, "POST", "/account/create", {"name": "Again"}, ts=4)
    node.relay(alice, "POST", "/account/update", {"name": "Alice B"}, ts=5)
    assert node.store.get("account", alice.address)["name"] == "Alice B"
    node.relay(alice, "POST", "/account/delete", None, ts=6)
    assert node.store.get("account", alice.address) is None


def test_account_op_for_another_address_is_rejected():
    """A node cannot put Alice's request under Bob's key."""
    from formation.crdt.keys import PrivateKey
    from formation.crdt.op import make_op

    alice, bob = User(), User()
    store = Store()
    n = PrivateKey()
    m, b, s = alice.request("POST", "/account/create", {"name": "x"})
    op = make_op(n, "account", bob.address, deps=[], hlc=1, request=(m, b, s))
    res = store.ingest([op.wire])
    assert [r.code for r in res.rejected] == ["bad_key"]
    assert store.get("account", bob.address) is None


def test_bad_field_is_named(node):
    u = User()
    with pytest.raises(Invalid, match="'name'"):
        node.relay(u, "POST", "/models", {"name": ""})
    with pytest.raises(Invalid, match="resources.vcpus"):
        node.relay(u, "POST", "/instance/create", {"name": "web", "resources": {"vcpus": 0}})
    with pytest.raises(Invalid, match="'colour'"):
        node.relay(u, "POST", "/agents", {"name": "a", "colour": "red"})
    with pytest.raises(Invalid, match="item 0"):
        node.relay(u, "POST", "/models", {"name": "m", "tags": ["Not A Tag"]})
    with pytest.raises(Invalid, match="cname_target"):
        node.relay(u, "POST", "/dns/create", {"domain": "x.fog", "record_type": "CNAME"})


def test_owner_manager_operator_readonly_levels(node):
    owner, mgr, op_user, ro, stranger = User(), User(), User(), User(), User()
    inst = node.relay(owner, "POST", "/instance/create", {"name": "web", "replicas": 2}).key
    base = f"/instance/{inst}"
    for who, level, ts in ((mgr, "manager", 2), (op_user, "operator", 3), (ro, "read_only", 4)):
        node.relay(owner, "POST", base + "/authorize", {"address": who.address, "level": level}, ts=ts)
    assert node.store.get("instance", inst)["authorized"] == {
        mgr.address: "manager", op_user.address: "operator", ro.address: "read_only"}

    # operator: lifecycle yes, config no
    node.relay(op_user, "POST", base + "/stop", None, ts=10)
    assert node.store.get("instance", inst)["desired_state"] == "stopped"
    with pytest.raises(Invalid, match="manager"):
        node.relay(op_user, "POST", base + "/update", {"replicas": 5}, ts=11)
    # read-only: nothing
    with pytest.raises(Invalid, match="operator"):
        node.relay(ro, "POST", base + "/start", None, ts=12)
    # manager: config yes, grant operator yes, grant manager no, delete no, transfer no
    node.relay(mgr, "POST", base + "/update", {"replicas": 5}, ts=13)
    assert node.store.get("instance", inst)["replicas"] == 5
    node.relay(mgr, "POST", base + "/authorize", {"address": stranger.address, "level": "operator"}, ts=14)
    with pytest.raises(Invalid, match="higher level"):
        node.relay(mgr, "POST", base + "/authorize", {"address": stranger.address, "level": "manager"}, ts=15)
    with pytest.raises(Invalid, match="higher level"):
        node.relay(mgr, "POST", base + "/authorize", {"address": mgr.address, "level": None}, ts=16)
    with pytest.raises(Invalid, match="owner"):
        node.relay(mgr, "POST", base + "/delete", None, ts=17)
    with pytest.raises(Invalid, match="owner"):
        node.relay(mgr, "POST", base + "/transfer", {"to": mgr.address}, ts=18)
    # nobody else may change the owner or the authorized list through update
    with pytest.raises(Invalid, match="owner"):
        node.relay(mgr, "POST", base + "/update", {"owner": mgr.address}, ts=19)
    with pytest.raises(Invalid, match="manager"):
        node.relay(stranger, "POST", base + "/update", {"description": "mine"}, ts=20)
    # restart bumps the generation
    node.relay(op_user, "POST", base + "/restart", None, ts=21)
    assert node.store.get("instance", inst)["generation"] == 1


def test_transfer_moves_control(node):
    a, b = User(), User()
    mid = node.relay(a, "POST", "/models", {"name": "m1", "is_private": True}).key
    node.relay(a, "POST", f"/models/{mid}/transfer", {"to": b.address}, ts=2)
    assert node.store.get("model", mid)["owner"] == b.address
    with pytest.raises(Invalid, match="manager"):
        node.relay(a, "PUT", f"/models/{mid}", {"description": "still mine?"}, ts=3)
    node.relay(b, "PUT", f"/models/{mid}", {"description": "mine now"}, ts=4)
    node.relay(b, "DELETE", f"/models/{mid}", None, ts=5)
    assert node.store.get("model", mid) is None


def test_node_peer_and_status_records_are_written_by_their_node_only(node):
    other = Node(node.store)
    node.heartbeat(1)
    with pytest.raises(Invalid, match="own key"):
        other.put("node", node.address, {"address": node.address})
    with pytest.raises(Invalid, match="own key"):
        other.put("peer", node.address, {"address": node.address, "public_key": "A" * 43 + "=",
                                        "overlay_ip": "10.42.0.1"})
    with pytest.raises(Invalid, match="only that node"):
        other.put("instance_status", f"abc@{node.address}",
                  {"instance_id": "abc", "node": node.address, "state": "running"})
    node.put("instance_status", f"abc@{node.address}",
             {"instance_id": "abc", "node": node.address, "state": "running", "ip": "10.0.0.2"})
    with pytest.raises(Invalid, match="state"):
        node.put("instance_status", f"abc@{node.address}",
                 {"instance_id": "abc", "node": node.address, "state": "exploded"})
    # users cannot write node-owned kinds, nodes cannot write user-owned kinds directly
    with pytest.raises(Invalid):
        node.put("model", "m", {"model_id": "m", "owner": node.address, "name": "x"})


def test_dns_records_belong_to_their_creator(node):
    """No first-come names: each owner's record for a domain is its own record."""
    a, b = User(), User()
    rid = node.relay(a, "POST", "/dns/create", {"domain": "Shop.Fog.", "targets": ["10.0.0.5"]}).key
    assert node.store.get("dns", rid)["owner"] == a.address
    assert node.store.get("dns", rid)["domain"] == "shop.fog"
    other = node.relay(b, "POST", "/dns/create", {"domain": "shop.fog", "targets": ["10.6.6.6"]}, ts=2).key
    assert other != rid and node.store.get("dns", rid)["targets"] == ["10.0.0.5"]
    with pytest.raises(Invalid, match="manager"):
        node.relay(b, "POST", f"/dns/{rid}/update", {"targets": ["10.6.6.6"]}, ts=3)
    node.relay(a, "POST", f"/dns/{rid}/update", {"targets": ["10.0.0.7"], "ttl": 30}, ts=4)
    assert node.store.get("dns", rid)["targets"] == ["10.0.0.7"]


def test_request_body_must_match_signed_hash(node):
    u = User()
    m, b, s = u.request("POST", "/models", {"name": "honest"})
    with pytest.raises(Invalid, match="does not match the hash"):
        node.store.write_request(node.key, m, b'{"name": "evil"}', s, now_ms=5)


def test_unknown_route_and_bad_message(node):
    u = User()
    with pytest.raises(Invalid, match="not a write this node knows"):
        node.relay(u, "POST", "/teleport", {})
    with pytest.raises(Invalid, match="signed message must be"):
        node.store.write_request(node.key, "hello", b"", u.key.personal_sign(b"hello"), now_ms=5)


def test_unicode_digits_in_a_signed_timestamp_are_rejected_not_a_crash():
    from formation.crdt.keys import PrivateKey
    from formation.crdt.op import make_op

    u = User()
    msg = "POST /models \u00b2 " + "0" * 64
    op = make_op(PrivateKey(), "model", "x", deps=[], hlc=1, request=(msg, b"", u.key.personal_sign(msg.encode())))
    res = Store().ingest([op.wire])
    assert [r.code for r in res.rejected] == ["bad_request"]
