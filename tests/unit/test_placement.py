"""Placement without a coordinator: every node computes the same replicas from the state."""

import random

from formation.node.placement import (
    DOUBT_TTL,
    MAX_DOUBTS,
    Doubts,
    live_nodes,
    place,
    place_all,
    shortfall,
    unvouched,
)

NOW = 10_000_000


def addr(i: int) -> str:
    return f"0x{i:040x}"


def node(i, *, vcpus=8, mem=16384, disk=100, beat=NOW, gpus=0, seen=None):
    # by default every node is connected to every other (what `seen` says): all are vouched for
    return {"address": addr(i), "heartbeat": beat,
            "capacity": {"vcpus": vcpus, "memory_mb": mem, "disk_gb": disk, "gpus": gpus},
            "seen": [addr(j) for j in range(100) if j != i] if seen is None else seen}


def inst(i, replicas=2, **res):
    return {"instance_id": f"inst-{i}", "replicas": replicas,
            "resources": {"vcpus": 1, "memory_mb": 512, "disk_gb": 5, **res}}


def test_three_nodes_two_replicas_distinct_and_agreed():
    nodes = [node(i) for i in range(3)]
    for k in range(50):
        views = []
        for _ in range(3):  # each node sees the records in its own order
            shuffled = nodes[:]
            random.shuffle(shuffled)
            views.append(place(inst(k), shuffled, now_ms=NOW))
        assert views[0] == views[1] == views[2]
        assert len(set(views[0])) == 2


def test_spreads_load_and_moves_little_when_a_node_dies():
    nodes = [node(i) for i in range(5)]
    before = {k: place(inst(k, replicas=1), nodes, now_ms=NOW)[0] for k in range(500)}
    counts = {a: list(before.values()).count(a) for a in {n["address"] for n in nodes}}
    assert min(counts.values()) > 60  # roughly 100 each
    dead = nodes[2]["address"]
    nodes[2]["heartbeat"] = NOW - 200_000
    after = {k: place(inst(k, replicas=1), nodes, now_ms=NOW)[0] for k in range(500)}
    moved = [k for k in before if before[k] != after[k]]
    assert all(before[k] == dead for k in moved) and dead not in after.values()


def test_capacity_and_gpu_filter():
    nodes = [node(0, vcpus=2), node(1, vcpus=16), node(2, gpus=1)]
    # node 0 has too few vCPUs: only two nodes can hold it, whatever the replicas asked for
    assert set(place(inst(1, replicas=3, vcpus=8), nodes, now_ms=NOW)) == {nodes[1]["address"], nodes[2]["address"]}
    assert place(inst(2, replicas=2, gpu={"count": 1}), nodes, now_ms=NOW) == [nodes[2]["address"]]
    assert place(inst(3, replicas=1, memory_mb=10**6), nodes, now_ms=NOW) == []


def test_memory_and_gpus_are_booked_in_creation_order():
    nodes = [node(i, mem=2048) for i in range(3)]
    insts = [dict(inst(k, replicas=1, memory_mb=1024), created_at=100 + k) for k in range(7)]
    placed = place_all(insts, nodes, now_ms=NOW)
    per_node = [sum(1 for k in range(6) if placed[f"inst-{k}"] == [n["address"]]) for n in nodes]
    assert per_node == [2, 2, 2]  # six fit, two per node, whatever their hashes prefer
    assert placed["inst-6"] == []  # the seventh finds no node with 1 GiB left
    # a newer instance never moves an older one; the record order does not matter either
    more = place_all(list(reversed(insts)) + [dict(inst(9, replicas=1), created_at=999)], nodes, now_ms=NOW)
    assert all(more[f"inst-{k}"] == placed[f"inst-{k}"] for k in range(7))
    # when a node dies its instances take what the others have left (none here)
    nodes[0]["heartbeat"] = NOW - 10**6
    after = place_all(insts, nodes, now_ms=NOW)
    assert sum(1 for k in range(7) if after[f"inst-{k}"]) == 4
    # GPUs: one per node with one GPU
    gpu_nodes = [node(i, gpus=1) for i in range(2)]
    g = place_all([dict(inst(k, replicas=1, gpu={"count": 1}), created_at=k) for k in range(3)], gpu_nodes, now_ms=NOW)
    assert sorted(len(v) for v in g.values()) == [0, 1, 1]


def test_nodes_that_run_no_vms_get_no_replicas():
    nodes = [node(0), node(1), node(2)]
    nodes[1]["capacity"]["vms"] = False
    nodes[2]["capacity"]["vms"] = True
    assert set(place(inst(1, replicas=3), nodes, now_ms=NOW)) == {nodes[0]["address"], nodes[2]["address"]}


def test_shortfall_says_why_an_instance_is_not_placed():
    nodes = [node(0), node(1, gpus=1)]
    gpu4 = inst(1, replicas=1, gpu={"count": 4})
    assert shortfall(gpu4, place(gpu4, nodes, now_ms=NOW), nodes, now_ms=NOW) == \
        "0 of 1 replicas placed: no live node has 4 GPUs a VM can be given (VFIO)"
    big = inst(2, replicas=1, memory_mb=10**6)
    assert "no live node has 1000000 MB of memory" in shortfall(big, [], nodes, now_ms=NOW)
    three = inst(3, replicas=3)
    assert shortfall(three, place(three, nodes, now_ms=NOW), nodes, now_ms=NOW) == \
        "2 of 3 replicas placed: the nodes that fit are full or too few (2 live)"
    ok = inst(4, replicas=2)
    assert shortfall(ok, place(ok, nodes, now_ms=NOW), nodes, now_ms=NOW) is None
    assert "no live node in the fog" in shortfall(ok, [], [node(0, beat=0)], now_ms=NOW)
    no_vms = [{**node(0), "capacity": {**node(0)["capacity"], "vms": False}}]
    assert shortfall(ok, [], no_vms, now_ms=NOW).endswith("no live node runs VMs")


def test_a_node_is_live_on_another_members_evidence_not_its_own_claim():
    stale = 90_000
    honest = [node(1, seen=[addr(2)]), node(2, seen=[addr(1)])]
    liar = node(3, seen=[addr(1), addr(2)], beat=NOW + 60_000)  # fresh claims, nobody sees it
    assert [n["address"] for n in live_nodes([*honest, liar], NOW, stale)] == [addr(1), addr(2)]
    far_future = node(4, beat=NOW + 10**9)  # a heartbeat dated ahead is no heartbeat
    assert far_future not in live_nodes([*honest, far_future], NOW, stale)
    # vouched for only by a node that is itself stale: not live
    ghost = node(5, seen=[addr(6)], beat=NOW - 10**6)
    lonely = node(6, seen=[addr(5)])
    assert live_nodes([ghost, lonely], NOW, stale) == [lonely]  # alone: its own heartbeat counts
    assert place(inst(1, replicas=3), [*honest, liar], now_ms=NOW, stale_ms=stale) == \
        place(inst(1, replicas=3), honest, now_ms=NOW, stale_ms=stale)


def test_a_node_back_from_a_partition_is_unvouched_until_the_others_list_it_again():
    stale = 90_000
    # the others' newest records, from before they saw it again, do not list node 1
    back = [node(1, seen=[addr(2), addr(3)]), node(2, seen=[addr(3)]), node(3, seen=[addr(2)])]
    assert addr(1) not in [n["address"] for n in live_nodes(back, NOW, stale)]
    assert unvouched(back, addr(1), NOW, stale)
    assert not unvouched(back, addr(2), NOW, stale)  # live
    assert not unvouched([node(1, seen=[])], addr(1), NOW, stale)  # alone: live on its own beat
    assert not unvouched([node(1, beat=NOW - 10**6), *back[1:]], addr(1), NOW, stale)  # stale: gone
    assert not unvouched(back[1:], addr(1), NOW, stale)  # no record (not a member)
    back[1]["seen"] = [addr(1), addr(3)]  # node 2 beats again, connected to it
    assert not unvouched(back, addr(1), NOW, stale)


def test_a_replica_not_run_in_time_is_placed_elsewhere_on_two_members_word():
    nodes = [node(i) for i in range(1, 6)]
    first = place(inst(7, replicas=1), nodes, now_ms=NOW)[0]
    others = [n for n in nodes if n["address"] != first]
    # one member's doubt moves nothing where two others could say so
    others[0]["doubts"] = [f"inst-7@{first}"]
    assert place(inst(7, replicas=1), nodes, now_ms=NOW) == [first]
    # the doubted node's own "doubt" of itself is no evidence either
    next(n for n in nodes if n["address"] == first)["doubts"] = [f"inst-7@{first}"]
    assert place(inst(7, replicas=1), nodes, now_ms=NOW) == [first]
    others[1]["doubts"] = [f"inst-7@{first}"]
    moved = place(inst(7, replicas=1), nodes, now_ms=NOW)
    assert moved and moved != [first]
    # only that instance moves: the doubted node keeps the rest of its placements
    assert all(place(inst(i, replicas=1), nodes, now_ms=NOW) ==
               place(inst(i, replicas=1), [node(j) for j in range(1, 6)], now_ms=NOW) for i in range(20) if i != 7)
    assert "did not run it in time" in shortfall(inst(7, replicas=5), place(inst(7, replicas=5), nodes, now_ms=NOW),
                                                 nodes, now_ms=NOW)
    # with one other member, its word is all there is
    pair = [node(1), node(2)]
    only = place(inst(8, replicas=1), pair, now_ms=NOW)[0]
    other = next(n for n in pair if n["address"] != only)
    other["doubts"] = [f"inst-8@{only}"]
    assert place(inst(8, replicas=1), pair, now_ms=NOW) == [other["address"]]


def test_a_node_reporting_more_than_it_declares_is_not_placed_on():
    nodes = [node(1, mem=4096), node(2, mem=4096)]
    big = [{"instance_id": f"big-{i}", "resources": {"memory_mb": 3000}} for i in range(3)]
    reports = [{"instance_id": b["instance_id"], "node": addr(1), "state": "running"} for b in big]
    assert place(inst(1, replicas=2), nodes, now_ms=NOW, statuses=reports[:2]) == \
        place(inst(1, replicas=2), nodes, now_ms=NOW)  # 6000 MB of 4096: a retiring overlap
    placed = place_all([*big, inst(1, replicas=2)], nodes, now_ms=NOW, statuses=reports)  # 9000 > 2 x 4096
    assert placed["inst-1"] == [addr(2)]
    # reports of something else (stopped, unknown instances) cost nothing
    noise = [{**r, "state": "stopped"} for r in reports] + [{"instance_id": "nope", "node": addr(1), "state": "running"}]
    assert len(place_all([*big, inst(1, replicas=2)], nodes, now_ms=NOW, statuses=noise)["inst-1"]) == 2
    # a paused VM keeps its memory: paused reports count as running ones do
    paused = [{**r, "state": "paused"} for r in reports]
    assert place_all([*big, inst(1, replicas=2)], nodes, now_ms=NOW, statuses=paused)["inst-1"] == [addr(2)]


def test_doubts_come_from_the_watchers_own_clock_and_lapse():
    book = Doubts(deadline=60.0)
    pair = ("inst-1", addr(2))
    assert not book.observe(0.0, {pair: 1}, set(), {"inst-1"})
    assert not book.observe(59.0, {pair: 1}, set(), {"inst-1"})
    assert book.observe(60.0, {pair: 1}, set(), {"inst-1"})
    assert book.published() == [f"inst-1@{addr(2)}"]
    # a new generation restarts nothing already doubted, and running ends the doubt
    assert book.observe(61.0, {pair: 1}, {pair}, {"inst-1"}) and book.published() == []
    # a generation change restarts the wait
    book.observe(100.0, {pair: 1}, set(), {"inst-1"})
    book.observe(150.0, {pair: 2}, set(), {"inst-1"})
    assert not book.observe(200.0, {pair: 2}, set(), {"inst-1"})
    assert book.observe(210.0, {pair: 2}, set(), {"inst-1"})
    # placed elsewhere now (not expected): the doubt stays until it lapses, the instance goes
    # or the node runs it
    assert not book.observe(300.0, {}, set(), {"inst-1"})
    assert book.published() and book.observe(211.0 + DOUBT_TTL, {}, set(), {"inst-1"})
    book.observe(0.0, {pair: 1}, set(), {"inst-1"})
    book.observe(60.0, {pair: 1}, set(), {"inst-1"})
    assert book.observe(61.0, {}, set(), set()) and book.published() == []  # deleted
    # bounded: the newest MAX_DOUBTS
    many = {(f"i{k}", addr(2)): 1 for k in range(MAX_DOUBTS + 10)}
    book.observe(0.0, many, set(), {i for i, _ in many})
    book.observe(60.0, many, set(), {i for i, _ in many})
    assert len(book.published()) == MAX_DOUBTS
