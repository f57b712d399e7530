"""The copy of the records the DNS view and placement read (node/mirror.RecordMirror): read incrementally, it equals
a whole read of the store after every change, deletes and quota flips included (a flip changes
a record's standing without a write to it), and under a cap it keeps the first records by key."""

from __future__ import annotations

import random

from formation.crdt.store import Store
from formation.node.mirror import RecordMirror
from tests.support import Node, User
from tests.unit.test_quotas import SMALL, _over_quota_wires

KINDS = ("model", "agent")


def whole_read(store: Store, cap: int) -> dict[str, list[dict]]:
    out = {}
    for kind in KINDS:
        rows = store.list(kind, limit=cap)
        for r in rows:
            r.pop("record_version")
        out[kind] = rows
    return out


def test_an_incremental_read_equals_a_whole_read_after_every_change():
    rnd = random.Random(5)
    node = Node(Store())
    users = [User() for _ in range(3)]
    mirror = RecordMirror(KINDS, cap=1000)
    live: list[tuple[User, str, str]] = []  # (owner, kind path, id)
    for step in range(60):
        roll = rnd.random()
        if roll < 0.5 or not live:
            user, path = rnd.choice(users), rnd.choice(["models", "agents"])
            live.append((user, path, node.relay(user, "POST", f"/{path}", {"name": f"n{step}"}, ts=10 + step).key))
        elif roll < 0.8:
            user, path, rid = rnd.choice(live)
            node.relay(user, "PUT", f"/{path}/{rid}", {"description": f"d{step}"}, ts=10 + step)
        else:
            user, path, rid = live.pop(rnd.randrange(len(live)))
            node.relay(user, "DELETE", f"/{path}/{rid}", None, ts=10 + step)
        if rnd.random() < 0.5:  # reads between some changes only: several changes in one read
            assert mirror.read(node.store) == whole_read(node.store, 1000)
    assert mirror.read(node.store) == whole_read(node.store, 1000)
    assert len(mirror.read(node.store)["model"]) > 3


def test_a_quota_flip_reaches_the_copy_without_a_write_to_the_record():
    wires, keys, alice, byz = _over_quota_wires(4, 0)
    store = Store(quotas=SMALL)
    store.ingest(wires, source="peer")
    mirror = RecordMirror(KINDS, cap=1000)
    assert sorted(m["model_id"] for m in mirror.read(store)["model"]) == sorted(keys[:2])
    delete = byz.relay(alice, "DELETE", f"/models/{keys[0]}", None, ts=500)
    store.ingest(byz.store.wires([delete.id]), source="peer")  # keys[2] takes effect: no op names it
    assert sorted(m["model_id"] for m in mirror.read(store)["model"]) == sorted(keys[1:3])
    assert mirror.read(store) == whole_read(store, 1000)


def test_over_the_cap_the_copy_keeps_the_first_records_by_key_through_deletes():
    node = Node(Store())
    alice = User()
    mirror = RecordMirror(KINDS, cap=3)
    ids = [node.relay(alice, "POST", "/models", {"name": f"m{i}"}, ts=10 + i).key for i in range(6)]
    assert mirror.read(node.store) == whole_read(node.store, 3)
    for i, rid in enumerate(sorted(ids)[:2]):  # the kept ones go: the next by key move up
        node.relay(alice, "DELETE", f"/models/{rid}", None, ts=30 + i)
        assert mirror.read(node.store) == whole_read(node.store, 3)
    assert [m["model_id"] for m in mirror.read(node.store)["model"]] == sorted(ids)[2:5]
