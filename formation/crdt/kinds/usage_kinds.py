"""The `usage` kind: what a node measured of an instance, cumulative (docs/economy.md).

Key: "<instance_id>@<node address>", like `instance_status`, and written by that node alone:
its CPU time, booked memory and disk over the time its VM was up, the network bytes of its
tap, and the calls (hires) it proxied to the instance with their duration and the tokens the
agent reported. The counters are totals since the record started, so the state holds one
bounded record per instance per measuring node, however long it runs; the node rewrites it
(last writer by hlc wins, as for every node record) and never deletes it.

Validity checks what the op alone can show: the author is the key's node, the fields match
the key, every counter is an integer in 0..2**62, `updated_at >= started_at`, and no tombstone.
Whether the author hosted the instance, or counted honestly, is beyond validity: totals
(`by_instance`, `by_owner`) count only the rows of the fog's members, and the owner of an
instance is taken from its own record, never from the row's copy.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from ..op import Op
from ..schema import TIMESTAMP, Record, address, field, integer, text
from .base import Invalid, Kind, node_address

MAX_COUNTER = 2**62
COUNTER = integer(0, MAX_COUNTER)
# the counters of a usage record, in the order reports show them
COUNTERS = ("cpu_seconds", "memory_mb_seconds", "disk_gb_seconds", "net_rx_bytes", "net_tx_bytes",
            "hires", "hire_ms", "tokens_in", "tokens_out")


@dataclass(frozen=True, slots=True)
class Usage(Record):
    instance_id: str = field(text(64, min_len=1))
    node: str = field(address)  # the node that measured (and wrote) it
    owner: str = field(address)  # the instance's owner when last written: an index, not authority
    cpu_seconds: int = field(COUNTER, default=0)  # CPU time of the VM's process (QEMU), user + system
    memory_mb_seconds: int = field(COUNTER, default=0)  # booked memory (MB) x seconds its VM was up
    disk_gb_seconds: int = field(COUNTER, default=0)  # booked disk (GB) x seconds its VM was up
    net_rx_bytes: int = field(COUNTER, default=0)  # bytes into the VM (its tap's transmit side)
    net_tx_bytes: int = field(COUNTER, default=0)  # bytes out of the VM (its tap's receive side)
    hires: int = field(COUNTER, default=0)  # calls proxied to it by this node that it answered
    hire_ms: int = field(COUNTER, default=0)  # their total duration, request to the answer's end
    tokens_in: int = field(COUNTER, default=0)  # as the agent reported them (X-Formation-Tokens)
    tokens_out: int = field(COUNTER, default=0)
    started_at: int = field(TIMESTAMP, default=0)  # unix ms: when this node started counting
    updated_at: int = field(TIMESTAMP, default=0)  # unix ms: when it last wrote the record


class UsageKind(Kind):
    """Usage of an instance as one node measured it. Key: "<instance_id>@<node address>"."""

    name = "usage"
    record = Usage

    def node_write(self, op: Op) -> dict | None:
        instance_id, sep, node = op.key.rpartition("@")
        if not sep or not instance_id or node != node_address(op):
            raise Invalid("unauthorized", "a usage key is '<instance_id>@<node>' and only that node writes it")
        if op.value is None:
            raise Invalid("bad_field", "usage records are cumulative: they are rewritten, never deleted")
        value = self.validate(op.value)
        if value["instance_id"] != instance_id or value["node"] != node:
            raise Invalid("bad_field", "usage fields 'instance_id'/'node': must match the key")
        if value["updated_at"] < value["started_at"]:
            raise Invalid("bad_field", "usage field 'updated_at': must not be before 'started_at'")
        return value

    def index(self, value: dict) -> dict:
        # owner: by account; type: by instance (an exact, indexed match); text: the node
        return {"owner": value["owner"], "type": value["instance_id"], "text": value["node"]}


# ---- totals: a pure function of the state, the same on every node ------------------------------

def zero() -> dict[str, int]:
    return dict.fromkeys(COUNTERS, 0)


def add(total: dict[str, int], row: Mapping) -> dict[str, int]:
    """`total` plus the counters of `row` (saturating at MAX_COUNTER), in place; `total`."""
    for c in COUNTERS:
        v = row.get(c, 0)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            total[c] = min(MAX_COUNTER, total[c] + v)
    return total


def counted(rows: Iterable[Mapping], members: Collection[str] | None = None) -> list[Mapping]:
    """The rows that count: those written by a member of the fog (`members`; None: all)."""
    return [r for r in rows if members is None or r.get("node") in members]


def by_instance(rows: Iterable[Mapping], members: Collection[str] | None = None) -> dict[str, dict[str, int]]:
    """Each instance's usage summed over the nodes that measured it."""
    out: dict[str, dict[str, int]] = {}
    for r in counted(rows, members):
        add(out.setdefault(r["instance_id"], zero()), r)
    return out


def by_owner(rows: Iterable[Mapping], owner_of: Mapping[str, str],
             members: Collection[str] | None = None) -> dict[str, dict[str, int]]:
    """Each account's usage: the rows of the instances in `owner_of` (instance id -> its owner,
    from the instances' own records) summed by that owner. A row of an instance not in
    `owner_of` counts for no one: its `owner` field is only its writer's word."""
    out: dict[str, dict[str, int]] = {}
    for r in counted(rows, members):
        owner = owner_of.get(r["instance_id"])
        if owner is not None:
            add(out.setdefault(owner, zero()), r)
    return out


def total(rows: Iterable[Mapping], members: Collection[str] | None = None) -> dict[str, int]:
    out = zero()
    for r in counted(rows, members):
        add(out, r)
    return out
