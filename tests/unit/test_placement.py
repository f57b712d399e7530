"""Placement without a coordinator: every node computes the same replicas from the state."""

import random

from formation.node.placement import place

NOW = 10_000_000


def node(i, *, vcpus=8, mem=16384, disk=100, beat=NOW, gpus=0):
    return {"address": f"0x{i:040x}", "heartbeat": beat,
            "capacity": {"vcpus": vcpus, "memory_mb": mem, "disk_gb": disk, "gpus": gpus}}


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
