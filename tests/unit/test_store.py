"""The store: persistence, queries, the pending buffer and its bounds, registers."""

import pytest

from formation.crdt.keys import PrivateKey
from formation.crdt.op import make_op
from formation.crdt.replica import PENDING_OVERHEAD, PENDING_PER_MISSING_DEP
from formation.crdt.store import Limits, Store
from tests.support import Node, User


def test_reopen_restores_state_without_rebuilding(tmp_path):
    path = str(tmp_path / "s.db")
    node = Node(Store(path))
    users = [User() for _ in range(3)]
    for i, u in enumerate(users):
        node.relay(u, "POST", "/models", {"name": f"model {i}", "tags": ["llm", f"t{i}"]}, ts=100 + i)
        node.heartbeat(i)
    h, heads, n = node.store.state_hash(), node.store.heads(), len(node.store)
    node.store.close()
    again = Store(path)
    assert (again.state_hash(), again.heads(), len(again)) == (h, heads, n)
    # and a rebuild from the log agrees with the stored projection
    fresh = Store()
    assert fresh.ingest(list(again.all_wires())).rejected == []
    assert fresh.state_hash() == h
    # writing continues from where it stopped
    Node(again, secret=node.key.secret).heartbeat(99)
    assert len(again) == n + 1


def test_queries_by_owner_tag_type_and_text():
    node = Node()
    a, b = User(), User()
    node.relay(a, "POST", "/models", {"name": "Llama Large", "model_type": "llm", "tags": ["chat"],
                                     "description": "A big language model"})
    node.relay(a, "POST", "/models", {"name": "Whisper", "model_type": "audio", "tags": ["speech"]}, ts=2)
    node.relay(b, "POST", "/models", {"name": "Tiny llama", "model_type": "llm", "tags": ["chat", "small"]}, ts=3)
    node.relay(b, "POST", "/agents", {"name": "Helper", "agent_type": "assistant", "tags": ["chat"]}, ts=4)
    s = node.store
    names = lambda rows: sorted(r["name"] for r in rows)  # noqa: E731
    assert names(s.list("model", owner=a.address)) == ["Llama Large", "Whisper"]
    assert names(s.list("model", owner=a.address.upper().replace("0X", "0x"))) == ["Llama Large", "Whisper"]
    assert names(s.list("model", tag="chat")) == ["Llama Large", "Tiny llama"]
    assert names(s.list("model", type="llm")) == ["Llama Large", "Tiny llama"]
    assert names(s.search("model", "LLAMA")) == ["Llama Large", "Tiny llama"]
    assert names(s.search("model", "language big")) == ["Llama Large"]
    assert names(s.search("model", "small")) == ["Tiny llama"]  # tags are searched too
    assert names(s.search("model", "100%_")) == []  # LIKE wildcards are literal
    assert names(s.list("agent", tag="chat")) == ["Helper"]
    assert len(s.list("model", limit=1)) == 1 and len(s.list("model", limit=10, offset=2)) == 1
    mid = s.list("model", owner=a.address, type="audio")[0]["model_id"]
    node.relay(a, "DELETE", f"/models/{mid}", None, ts=5)
    assert names(s.list("model", owner=a.address)) == ["Llama Large"]


def test_ops_wait_for_their_deps_then_deliver():
    src = Node()
    for i in range(5):
        src.heartbeat(i)
    wires = list(src.store.all_wires())
    dst = Store()
    res = dst.ingest(wires[::-1][:4])  # the last four, newest first: all wait for the first op
    assert res.accepted == [] and res.pending == 4
    assert dst.missing() == {src.store.ops[next(iter(src.store.ops))].id}
    res = dst.ingest(wires[:1])
    assert len(res.accepted) == 5 and res.pending == 0 and dst.missing() == set()
    assert dst.state_hash() == src.store.state_hash()


def test_pending_buffer_is_bounded_per_source():
    src = Node()
    for i in range(10):
        src.heartbeat(i)
    wires = list(src.store.all_wires())
    dst = Store(limits=Limits(pending_ops_per_source=3))
    res = dst.ingest(wires[1:], source="flooder")
    assert res.pending == 3 and res.dropped == 6
    # another source still has room
    assert dst.ingest(wires[5:7], source="other").pending == 5
    # bytes bound too
    small = Store(limits=Limits(pending_bytes_per_source=len(wires[1]) + PENDING_OVERHEAD + PENDING_PER_MISSING_DEP + 10))
    res = small.ingest(wires[1:4], source="x")
    assert res.pending == 1 and res.dropped == 2
    # dropped ops come back later (sync) and everything converges
    dst.ingest(wires)
    assert dst.state_hash() == src.store.state_hash() and dst.pending_count == 0


def test_concurrent_writes_are_siblings_resolved_the_same_way_everywhere():
    a, b = Node(), Node()
    u = User()
    op = a.relay(u, "POST", "/models", {"name": "m"})
    b.store.ingest(list(a.store.all_wires()))
    a.relay(u, "PUT", f"/models/{op.key}", {"description": "from a"}, ts=10)
    b.relay(u, "PUT", f"/models/{op.key}", {"description": "from b"}, ts=11)
    a.store.ingest(list(b.store.all_wires()))
    b.store.ingest(list(a.store.all_wires()))
    assert a.store.state_hash() == b.store.state_hash()
    sib = a.store.siblings("model", op.key)
    assert sib[0][1]["description"] == "from b"  # the record: later user time wins
    assert sorted(v["description"] for _, v in sib[1:]) == ["from a", "from b"]  # each head on its own
    # the next write supersedes both siblings
    a.relay(u, "PUT", f"/models/{op.key}", {"description": "merged"}, ts=12)
    assert len(a.store.siblings("model", op.key)) == 2  # the record and its one head


def test_user_clock_not_relay_clock_orders_concurrent_writes():
    """A relay that stamps a huge hlc cannot make an older user write win."""
    a, b = Node(), Node()
    u = User()
    op = a.relay(u, "POST", "/models", {"name": "m"})
    b.store.ingest(list(a.store.all_wires()))
    b.now += 10**8  # b's clock runs a day ahead (still in the past of this machine's clock)
    b.relay(u, "PUT", f"/models/{op.key}", {"description": "old"}, ts=10)
    a.relay(u, "PUT", f"/models/{op.key}", {"description": "new"}, ts=20)
    a.store.ingest(list(b.store.all_wires()))
    assert a.store.get("model", op.key)["description"] == "new"


def test_hlc_must_grow_along_deps():
    n = Node()
    first = n.heartbeat(1)
    k = n.key
    bad = make_op(k, "node", n.address, deps=[first.id], prev=[first.id], hlc=first.hlc,
                  value={"address": n.address})
    res = n.store.ingest([bad.wire])
    assert [r.code for r in res.rejected] == ["bad_clock"]


def test_prev_must_be_on_the_same_record():
    n = Node()
    first = n.heartbeat(1)
    peer_val = {"address": n.address, "public_key": "B" * 43 + "=", "overlay_ip": "10.42.0.9"}
    bad = make_op(n.key, "peer", n.address, deps=[first.id], prev=[first.id], hlc=first.hlc + 1, value=peer_val)
    assert [r.code for r in n.store.ingest([bad.wire]).rejected] == ["bad_prev"]


def test_unknown_kind_is_rejected_and_remembered():
    s = Store()
    k = PrivateKey()
    op = make_op(k, "spaceship", "x", deps=[], hlc=1, value={})
    assert [r.code for r in s.ingest([op.wire]).rejected] == ["unknown_kind"]
    assert [r.code for r in s.ingest([op.wire]).rejected] == ["unknown_kind"]  # cheap second time
    assert len(s) == 0


def test_local_write_refused_by_rules_is_not_stored():
    n = Node()
    with pytest.raises(Exception, match="unknown field"):
        n.put("node", n.address, {"address": n.address, "colour": "blue"})
    assert len(n.store) == 0 and n.store.log.db.execute("SELECT count(*) FROM ops").fetchone()[0] == 0


def _model_with_history():
    """A model on node a, shared with node b; returns (a, b, owner, model id, version 0)."""
    a, b = Node(), Node()
    owner = User()
    mid = a.relay(owner, "POST", "/models", {"name": "m"}).key
    b.store.ingest(list(a.store.all_wires()))
    return a, b, owner, mid, a.store.record_version("model", mid)


def _merge(a: Node, b: Node) -> None:
    a.store.ingest(list(b.store.all_wires()))
    b.store.ingest(list(a.store.all_wires()))
    assert a.store.state_hash() == b.store.state_hash()


def test_concurrent_deletes_delete():
    a, b, owner, mid, _ = _model_with_history()
    a.relay(owner, "DELETE", f"/models/{mid}", ts=10)
    b.relay(owner, "DELETE", f"/models/{mid}", ts=11)
    _merge(a, b)
    assert a.store.get("model", mid) is None


def test_a_delete_on_an_old_version_is_not_undone_by_later_owners():
    """A -> B -> C, and A's delete signed on the version before A sold it: deleted, never A's."""
    a, b, owner, mid, v0 = _model_with_history()
    buyer, third = User(), User()
    a.relay(owner, "POST", f"/models/{mid}/transfer", {"to": buyer.address}, ts=10)
    a.relay(buyer, "POST", f"/models/{mid}/transfer", {"to": third.address}, ts=11)
    b.relay(owner, "DELETE", f"/models/{mid}", ts=12, base=v0)
    _merge(a, b)
    assert a.store.get("model", mid) is None


def test_a_double_transfer_burns_the_record():
    a, b, owner, mid, v0 = _model_with_history()
    buyer, friend = User(), User()
    a.relay(owner, "POST", f"/models/{mid}/transfer", {"to": buyer.address}, ts=10)
    b.relay(owner, "POST", f"/models/{mid}/transfer", {"to": friend.address}, ts=5, base=v0)  # backdated
    _merge(a, b)
    assert a.store.get("model", mid) is None


def test_a_revoked_manager_s_concurrent_edit_is_void_but_others_stay():
    a, b, owner, mid, _ = _model_with_history()
    manager, editor = User(), User()
    for who, ts in ((manager, 2), (editor, 3)):
        a.relay(owner, "POST", f"/models/{mid}/authorize", {"address": who.address, "level": "manager"}, ts=ts)
    b.store.ingest(list(a.store.all_wires()))
    a.relay(owner, "POST", f"/models/{mid}/authorize", {"address": manager.address, "level": None}, ts=10)
    b.relay(manager, "PUT", f"/models/{mid}", {"description": "the manager's"}, ts=11)
    b.relay(editor, "PUT", f"/models/{mid}", {"license": "mit"}, ts=12)
    _merge(a, b)
    model = a.store.get("model", mid)
    assert manager.address not in model["authorized"]
    assert model["description"] == "" and model["license"] == "mit"
