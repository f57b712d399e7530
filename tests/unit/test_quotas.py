"""Per-account quotas (crdt/quotas.py): a node refuses to make a write over quota, and records
over quota that arrive from peers are inert on every node alike, whatever order they arrive in."""

from __future__ import annotations

import random

import pytest

from formation.crdt.kinds import Invalid
from formation.crdt.quotas import Quotas, _inert
from formation.crdt.store import Store
from tests.support import Node, User, records_dump

SMALL = Quotas(records={"instance": 3, "agent": 3, "model": 2, "dns": 4}, replicas=6, vcpus=8,
               memory_mb=4096, disk_gb=100)
BIG = Quotas(records={"instance": 100, "agent": 100, "model": 100, "dns": 100}, replicas=1000, vcpus=10_000,
             memory_mb=10**7, disk_gb=10**6)


def assert_book_consistent(store: Store) -> None:
    """The quota book's shortcuts (group totals, inert counts) agree with a full recount."""
    book = store.replica.quota
    inert = {}
    for (creator, kind), members in book.groups.items():
        inert.update({(kind, k): why for k, why in _inert(kind, members.items(), book.quotas).items()})
        used = [sum(e.cost[i] for e in members.values()) for i in range(4)]
        assert book.totals[(creator, kind)] == (len(members), *used)
        assert book.inert_count.get((creator, kind), 0) == sum(1 for k in members if (kind, k) in book.inert)
    assert book.inert == inert
    assert set(book.totals) == set(book.groups)


def quota_state(store: Store) -> list[tuple]:
    return list(store.log.db.execute("SELECT kind, key, over_quota FROM records ORDER BY kind, key"))


def test_a_create_over_the_record_quota_is_refused_with_the_quota_named_and_leaves_no_trace():
    node = Node(Store(quotas=SMALL))
    alice, bob = User(), User()
    for i in range(2):
        node.relay(alice, "POST", "/models", {"name": f"m{i}"}, ts=10 + i)
    before, ops = records_dump(node.store), len(node.store)
    with pytest.raises(Invalid) as e:
        node.relay(alice, "POST", "/models", {"name": "m2"}, ts=20)
    assert e.value.code == "quota_exceeded"
    assert "quota of 2 model records per account" in e.value.detail and "delete one" in e.value.detail
    assert records_dump(node.store) == before and len(node.store) == ops
    # another account has its own quota; kinds count apart
    node.relay(bob, "POST", "/models", {"name": "b0"}, ts=21)
    node.relay(alice, "POST", "/agents", {"name": "a0"}, ts=22)
    # a delete makes room again
    mid = node.store.list("model", owner=alice.address)[0]["model_id"]
    node.relay(alice, "DELETE", f"/models/{mid}", None, ts=23)
    node.relay(alice, "POST", "/models", {"name": "m2"}, ts=24)
    assert len(node.store.list("model", owner=alice.address)) == 2


def test_booked_resources_count_replicas_times_size_and_an_update_may_not_push_another_over():
    node = Node(Store(quotas=SMALL))
    alice = User()
    web = node.relay(alice, "POST", "/instance/create",
                     {"name": "web", "replicas": 2, "resources": {"vcpus": 2, "memory_mb": 1024}}, ts=10).key
    with pytest.raises(Invalid, match="quota of 4096 MiB of memory") as e:
        node.relay(alice, "POST", "/instance/create",
                   {"name": "db", "replicas": 1, "resources": {"vcpus": 1, "memory_mb": 3000}}, ts=11)
    assert e.value.code == "quota_exceeded"
    db = node.relay(alice, "POST", "/instance/create",
                    {"name": "db", "replicas": 1, "resources": {"vcpus": 1, "memory_mb": 2048}}, ts=12).key
    # scaling the older one up would make the newer inert: refused, it names the other record
    with pytest.raises(Invalid, match=f"push instance {db} over the quota") as e:
        node.relay(alice, "POST", f"/instance/{web}/update", {"replicas": 3}, ts=13)
    assert e.value.code == "quota_exceeded"
    assert {i["instance_id"] for i in node.store.list("instance")} == {web, db}
    assert node.store.over_quota("instance", db) is None


def test_a_transfer_counts_against_the_creator_not_the_receiver():
    node = Node(Store(quotas=SMALL))
    alice, bob = User(), User()
    mids = [node.relay(alice, "POST", "/models", {"name": f"m{i}"}, ts=10 + i).key for i in range(2)]
    for i, mid in enumerate(mids):
        node.relay(alice, "POST", f"/models/{mid}/transfer", {"to": bob.address}, ts=20 + i)
    # bob holds two models he did not create: his own quota is untouched; alice's is still used
    for i in range(2):
        node.relay(bob, "POST", "/models", {"name": f"b{i}"}, ts=30 + i)
    with pytest.raises(Invalid, match="quota of 2 model records"):
        node.relay(alice, "POST", "/models", {"name": "more"}, ts=40)
    assert len(node.store.list("model", owner=bob.address)) == 4


def _over_quota_wires(n_models: int, n_instances: int) -> tuple[list[bytes], list[str], User, Node]:
    """Ops a node that counts no quota makes for one account (what a Byzantine or concurrent
    node can send): more creates than SMALL allows."""
    byz = Node(Store(quotas=BIG))
    alice = User()
    keys = [byz.relay(alice, "POST", "/models", {"name": f"m{i}"}, ts=100 + i).key for i in range(n_models)]
    for i in range(n_instances):
        byz.relay(alice, "POST", "/instance/create",
                  {"name": f"i{i}", "resources": {"memory_mb": 1500}}, ts=200 + i)
    return list(byz.store.all_wires()), keys, alice, byz


def test_records_over_quota_from_peers_are_inert_on_every_node_whatever_the_order():
    wires, keys, alice, byz = _over_quota_wires(5, 4)
    rnd = random.Random(7)
    states, lists = [], []
    for trial in range(6):
        order = list(wires)
        if trial:
            # any order that keeps each op after its deps: shuffle, then let the pending buffer wait
            rnd.shuffle(order)
        store = Store(quotas=SMALL)
        size = rnd.randint(1, 5) if trial else len(order)
        for i in range(0, len(order), size):
            store.ingest(order[i:i + size], source="peer")
            assert_book_consistent(store)
        assert len(store) == len(byz.store)  # every op stored: validity accepts them
        states.append(quota_state(store))
        lists.append(sorted(m["model_id"] for m in store.list("model")))
    assert all(s == states[0] for s in states) and all(ls == lists[0] for ls in lists)
    # the first two models by signed time count, the others are inert with the reason
    assert lists[0] == sorted(keys[:2])
    inert = {k: why for kind, k, why in states[0] if kind == "model" and why}
    assert set(inert) == set(keys[2:]) and all("quota of 2 model records" in w for w in inert.values())
    # memory: 1500 MiB each, 4096 in all: two instances count, the other two are inert
    store = Store(quotas=SMALL)
    store.ingest(wires, source="peer")
    assert len(store.list("instance")) == 2 and len(store.list("instance", over_quota=True)) == 4
    assert sum(1 for i in store.list("instance", over_quota=True) if "MiB of memory" in i.get("over_quota", "")) == 2


def test_a_delete_brings_an_inert_record_back_everywhere_and_a_restart_keeps_the_view(tmp_path):
    wires, keys, alice, byz = _over_quota_wires(4, 0)
    path = str(tmp_path / "state.db")
    store = Store(path, quotas=SMALL)
    store.ingest(wires, source="peer")
    assert sorted(m["model_id"] for m in store.list("model")) == sorted(keys[:2])
    delete = byz.relay(alice, "DELETE", f"/models/{keys[0]}", None, ts=500)
    store.ingest(byz.store.wires([delete.id]), source="peer")
    assert sorted(m["model_id"] for m in store.list("model")) == sorted(keys[1:3])
    assert store.over_quota("model", keys[2]) is None and store.over_quota("model", keys[3])
    assert_book_consistent(store)
    before = quota_state(store)
    store.close()
    again = Store(path, quotas=SMALL)
    assert quota_state(again) == before and again.over_quota("model", keys[3]) == store.over_quota("model", keys[3])
    # a log from before quotas (no column): the start adds it and fills it
    again.log.db.execute("ALTER TABLE records DROP COLUMN over_quota")
    again.close()
    third = Store(path, quotas=SMALL)
    assert quota_state(third) == before
    # a second delete: the group fits its quota again, and its last inert record takes effect
    delete = byz.relay(alice, "DELETE", f"/models/{keys[1]}", None, ts=501)
    third.ingest(byz.store.wires([delete.id]), source="peer")
    assert sorted(m["model_id"] for m in third.list("model")) == sorted(keys[2:4])
    assert third.over_quota("model", keys[3]) is None
    assert_book_consistent(third)
    third.close()
