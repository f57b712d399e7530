"""Per-account quotas: which of an account's records take effect, the same on every node.

Every account may hold a bounded number of live records of each kind it can create, and its
instances may book a bounded amount of vCPUs, memory, disk and replicas in all. The account a
record counts against is its creator (the signer of its create), not its current owner: a
transfer cannot push someone else over their quota.

Why this is a view and not op validity: an op's validity may read only the op and its causal
past (that is what makes every node decide alike whatever order ops arrive in), and nothing in
an op's causal past bounds what the same account writes concurrently through other nodes, or
what a Byzantine node wraps for it. So validity accepts such writes, and the state decides which
of an account's records are effective, by one rule every node computes from the same records:

    an account's live records of a kind, ordered by (signed time of the create, record id), are
    taken in that order; a record is effective if, with it, the account stays within every
    quota; otherwise it is inert (over quota) and the ones after it are still considered.

An inert record is stored and replicated like any other, but lists, placement, names and hire
leave it out; deleting or shrinking an effective record can bring an inert one back, on every
node alike. A node refuses to make a write itself (the API's 402) when it would leave the
written record inert or push one of the account's effective records over, so an honest client
only meets an inert record when it wrote the same quota through two nodes at once.

The numbers are fog-wide constants (QUOTAS) until the fog's genesis record carries them; they
are never a per-node setting, as nodes that counted differently would show different states.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .registers import UserRegister


@dataclass(frozen=True)
class Quotas:
    records: Mapping[str, int] = field(default_factory=lambda: {
        "instance": 64, "agent": 128, "model": 128, "dns": 256})  # live records per account
    replicas: int = 128  # replicas of an account's instances, in total
    vcpus: int = 256  # booked: each instance's vCPUs times its replicas, in total
    memory_mb: int = 2 * 1024 * 1024  # two replicas of the largest instance (1 TiB each)
    disk_gb: int = 8 * 1024


QUOTAS = Quotas()

# what an instance books, in the order of the quotas above
_COST_NAMES = ("replicas", "vCPUs", "MiB of memory", "GB of disk")


@dataclass(frozen=True, slots=True)
class Entry:
    creator: str
    order: tuple[int, str]  # (signed time of the create, record id)
    cost: tuple[int, int, int, int]  # replicas, vcpus, memory_mb, disk_gb (instances only)


def entry_of(kind: str, key: str, reg, quotas: Quotas = QUOTAS) -> Entry | None:
    """What a record counts against its creator's quota; None when it counts for nothing (a
    kind without a quota, a deleted record, a node's record)."""
    if kind not in quotas.records or not isinstance(reg, UserRegister) or reg.value is None:
        return None
    create = next((w for w in reg.writes.values() if not w.parents), None)
    if create is None:  # cannot happen: every other write names a version
        return None
    cost = (0, 0, 0, 0)
    if kind == "instance":
        n = int(reg.value.get("replicas", 1))
        res = reg.value.get("resources") or {}
        cost = (n, n * int(res.get("vcpus", 1)), n * int(res.get("memory_mb", 512)), n * int(res.get("disk_gb", 5)))
    return Entry(create.signer, (create.clock, key), cost)


def _inert(kind: str, entries: Iterable[tuple[str, Entry]], quotas: Quotas) -> dict[str, str]:
    """key -> why, for the records of one (creator, kind) that are over quota."""
    limit = quotas.records[kind]
    caps = (quotas.replicas, quotas.vcpus, quotas.memory_mb, quotas.disk_gb)
    used = [0, 0, 0, 0]
    count = 0
    out: dict[str, str] = {}
    for key, e in sorted(entries, key=lambda ke: ke[1].order):
        if count >= limit:
            out[key] = (f"over the quota of {limit} {kind} records per account; delete one of "
                        f"{e.creator}'s {kind} records to bring this one back")
            continue
        over = [i for i in range(4) if used[i] + e.cost[i] > caps[i]]
        if over:
            i = over[0]
            out[key] = (f"over the quota of {caps[i]} {_COST_NAMES[i]} booked by one account's instances "
                        f"({used[i]} booked before this one, which asks {e.cost[i]}); stop using, shrink "
                        f"or delete another of {e.creator}'s instances")
            continue
        count += 1
        used = [u + c for u, c in zip(used, e.cost, strict=True)]
    return out


class QuotaBook:
    """The quota view of the records: every counted record by its creator, and which are inert.
    `plan` computes the effect of changed registers without changing anything; `commit` makes a
    plan current (after the batch it belongs to is durable)."""

    def __init__(self, quotas: Quotas = QUOTAS):
        self.quotas = quotas
        self.groups: dict[tuple[str, str], dict[str, Entry]] = {}  # (creator, kind) -> key -> entry
        self.entry: dict[tuple[str, str], Entry] = {}  # (kind, key) -> its entry
        self.inert: dict[tuple[str, str], str] = {}  # (kind, key) -> why
        # per (creator, kind): how many records and what they book in all, and how many are
        # inert: a group whose totals fit its quotas has no inert record, which `plan` sees
        # without sorting the group (an account's every write used to sort all its records)
        self.totals: dict[tuple[str, str], tuple[int, int, int, int, int]] = {}
        self.inert_count: dict[tuple[str, str], int] = {}

    def plan(self, changed: Mapping[tuple[str, str], object]) -> Plan:
        """The quota view after registers change: (kind, key) -> register (any value)."""
        p = Plan()
        touched: set[tuple[str, str]] = set()
        for (kind, key), reg in changed.items():
            if kind not in self.quotas.records:
                continue
            old, new = self.entry.get((kind, key)), entry_of(kind, key, reg, self.quotas)
            if old == new:
                continue
            p.entries[(kind, key)] = new
            for e in (old, new):
                if e is not None:
                    touched.add((e.creator, kind))
        for creator, kind in touched:
            if self._fits(creator, kind, p.entries):
                continue  # nothing of this group is inert now, nor becomes so
            members = dict(self.groups.get((creator, kind), {}))
            for (k, key), e in p.entries.items():
                if k != kind:
                    continue
                if e is not None and e.creator == creator:
                    members[key] = e
                elif key in members:
                    members.pop(key)
            now = _inert(kind, members.items(), self.quotas)
            for key in members:
                was = self.inert.get((kind, key))
                if now.get(key) != was:
                    p.inert[(kind, key)] = now.get(key)
        for (kind, key), e in p.entries.items():
            if e is None and (kind, key) in self.inert:
                p.inert[(kind, key)] = None  # gone: no longer inert (nor anything)
        return p

    def _fits(self, creator: str, kind: str, changed: Mapping[tuple[str, str], Entry | None]) -> bool:
        """Whether the (creator, kind) group, with the changed entries, is within every quota
        and has no inert record now: then none is inert after the change either (costs are
        positive, so no prefix of the group books more than all of it)."""
        group = (creator, kind)
        if self.inert_count.get(group):
            return False
        count, *used = self.totals.get(group, (0, 0, 0, 0, 0))
        for (k, key), e in changed.items():
            if k != kind:
                continue
            old = self.entry.get((k, key))
            if old is not None and old.creator == creator:
                count, used = count - 1, [u - c for u, c in zip(used, old.cost, strict=True)]
            if e is not None and e.creator == creator:
                count, used = count + 1, [u + c for u, c in zip(used, e.cost, strict=True)]
        q = self.quotas
        caps = (q.replicas, q.vcpus, q.memory_mb, q.disk_gb)
        return count <= q.records[kind] and all(u <= c for u, c in zip(used, caps, strict=True))

    def _count(self, keys, sign: int) -> None:
        """Add (or take back) these records' part in their groups' inert counts."""
        for k in keys:
            e = self.entry.get(k)
            if e is not None and k in self.inert:
                group = (e.creator, k[0])
                self.inert_count[group] = self.inert_count.get(group, 0) + sign
                if not self.inert_count[group]:
                    del self.inert_count[group]

    def _book(self, e: Entry, kind: str, sign: int) -> None:
        group = (e.creator, kind)
        count, *used = self.totals.get(group, (0, 0, 0, 0, 0))
        new = (count + sign, *(u + sign * c for u, c in zip(used, e.cost, strict=True)))
        if new[0]:
            self.totals[group] = new
        else:
            self.totals.pop(group, None)

    def commit(self, p: Plan) -> None:
        affected = set(p.entries) | set(p.inert)
        self._count(affected, -1)
        for (kind, key), e in p.entries.items():
            old = self.entry.pop((kind, key), None)
            if old is not None:
                self._book(old, kind, -1)
                group = self.groups.get((old.creator, kind))
                if group is not None:
                    group.pop(key, None)
                    if not group:
                        del self.groups[(old.creator, kind)]
            if e is not None:
                self.entry[(kind, key)] = e
                self.groups.setdefault((e.creator, kind), {})[key] = e
                self._book(e, kind, +1)
        for k, why in p.inert.items():
            if why is None:
                self.inert.pop(k, None)
            else:
                self.inert[k] = why
        self._count(affected, +1)


@dataclass
class Plan:
    entries: dict[tuple[str, str], Entry | None] = field(default_factory=dict)
    inert: dict[tuple[str, str], str | None] = field(default_factory=dict)  # flips: why, or None

    def refusal(self, kind: str, key: str) -> str | None:
        """Why a write to (kind, key) must not be made here: it would be inert itself, or make
        another effective record of its account inert. None: it is within quota."""
        why = self.inert.get((kind, key))
        if why:
            return why
        for (k, other), reason in self.inert.items():
            if reason and (k, other) != (kind, key):
                return f"this write would push {k} {other} {reason[0].lower()}{reason[1:]}"
        return None
