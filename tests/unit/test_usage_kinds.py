"""The `usage` kind's rules on a store, and the totals every node derives from the records."""

from __future__ import annotations

import pytest

from formation.crdt.kinds.usage_kinds import (
    COUNTERS,
    MAX_COUNTER,
    by_instance,
    by_owner,
    total,
    zero,
)
from formation.crdt.op import OpError
from tests.support import Node, User

OWNER, OTHER = User(b"\x51" * 32).address, User(b"\x52" * 32).address


def row(iid: str, node: str, owner: str = OWNER, **counts) -> dict:
    return {"instance_id": iid, "node": node, "owner": owner, **zero(), **counts,
            "started_at": 1_000, "updated_at": 2_000}


def test_only_the_keys_node_writes_a_usage_record_and_never_deletes_it():
    host, other = Node(secret=b"\x01" * 32), Node(secret=b"\x02" * 32)
    other.store = host.store
    key = f"i1@{host.address}"
    host.put("usage", key, row("i1", host.address, cpu_seconds=5))
    host.put("usage", key, row("i1", host.address, cpu_seconds=7))  # rewritten: last writer wins
    assert host.store.get("usage", key)["cpu_seconds"] == 7
    for who, k, value, code in (
            (other, key, row("i1", host.address, cpu_seconds=1), "unauthorized"),
            (host, f"i1@{other.address}", row("i1", other.address), "unauthorized"),
            (host, key, None, "bad_field"),
            (host, key, row("i2", host.address), "bad_field"),
            (host, key, row("i1", host.address, hires=MAX_COUNTER + 1), "bad_field"),
            (host, key, {**row("i1", host.address), "updated_at": 999}, "bad_field")):
        with pytest.raises(OpError) as e:
            who.put("usage", k, value)
        assert e.value.code == code
    assert host.store.get("usage", key)["cpu_seconds"] == 7
    assert [r["node"] for r in host.store.list("usage", type="i1")] == [host.address]  # indexed by instance
    assert [r["instance_id"] for r in host.store.list("usage", owner=OWNER)] == ["i1"]


def test_totals_by_instance_and_by_owner_count_members_rows_and_the_instances_own_owner():
    a, b, outsider = "0x" + "aa" * 20, "0x" + "bb" * 20, "0x" + "ee" * 20
    rows = [row("i1", a, cpu_seconds=10, hires=1), row("i1", b, cpu_seconds=5, tokens_in=7),
            row("i2", a, net_rx_bytes=100), row("i1", outsider, cpu_seconds=10**9),
            row("i3", a, owner=OWNER, hires=50)]  # i3's row names OWNER, but i3 is OTHER's
    members = {a, b}
    inst = by_instance(rows, members)
    assert inst["i1"] == {**zero(), "cpu_seconds": 15, "hires": 1, "tokens_in": 7}
    assert set(inst) == {"i1", "i2", "i3"}
    owners = by_owner(rows, {"i1": OWNER, "i2": OWNER, "i3": OTHER}, members)
    assert owners[OWNER] == {**zero(), "cpu_seconds": 15, "hires": 1, "tokens_in": 7, "net_rx_bytes": 100}
    assert owners[OTHER]["hires"] == 50
    assert "i4" not in by_owner([row("i4", a, hires=3)], {"i1": OWNER}, members)  # no instance: no one's
    assert by_owner([row("i4", a, hires=3)], {"i1": OWNER}, members) == {}
    assert total(rows, members)["cpu_seconds"] == 15 and total(rows)["cpu_seconds"] == 10**9 + 15
    huge = [row("i1", a, hires=MAX_COUNTER), row("i1", b, hires=MAX_COUNTER)]
    assert total(huge)["hires"] == MAX_COUNTER  # saturates
    assert set(zero()) == set(COUNTERS)
