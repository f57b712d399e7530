"""The delivery core of a replica: graph, registers, pending buffer, validity. Sans-IO.

Ops come in (already decoded and signature-checked by `op.decode_op`, the one decoder every
path uses); what to store comes out as a `Stage`, which the caller makes durable and then
`apply`s. Nothing in memory changes before that: a batch whose commit fails leaves no trace,
and a rejected op never touches the staged state either (each op's changes are built on copies
and kept only when every check passed).

Validity (`_validate`) reads only the op and its causal past, never a clock, the arrival path
or the stack depth, so every honest node reaches the same verdict. The wall clock enters in one
place, admission: an op dated more than `max_future_ms` ahead of this node's clock waits in the
pending buffer (bounded) instead of being delivered, so no peer can drag our clock forward.
(About 400 lines: the validity rules and the buffer they guard are read together.)
"""

from __future__ import annotations

import json
import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

from . import codec
from .hlc import Hlc, from_unix_seconds, to_ms
from .intents import parse_request, split_message, version_of
from .kinds import Invalid, Kind, get_kind
from .op import Op, OpError
from .quotas import QUOTAS, Plan, QuotaBook, Quotas
from .registers import NodeRegister, OpMeta, UserRegister, Write, fold

log = logging.getLogger("formation.crdt.replica")


@dataclass
class Rejection:
    id: bytes | None
    code: str
    detail: str


@dataclass
class IngestResult:
    accepted: list[bytes] = field(default_factory=list)
    duplicates: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    pending: int = 0  # ops held in the pending buffer after this call
    dropped: int = 0  # ops not kept: a pending bound was reached (sync fetches them again)
    held: int = 0  # ops of this call dated too far ahead of our clock: they wait


@dataclass
class Limits:
    pending_ops: int = 100_000  # ops waiting (for deps or for their time), in total
    pending_bytes: int = 128 * 1024 * 1024  # their cost (wire + PENDING_OVERHEAD each), in total
    pending_ops_per_source: int = 25_000  # one peer (or peer id) fills at most this share
    pending_bytes_per_source: int = 32 * 1024 * 1024
    pending_ttl_ms: int = 10 * 60_000  # a pending op whose deps never come is dropped after this
    max_future_ms: int = 180_000  # ops dated further ahead of our clock wait
    hold_horizon_ms: int = 3_600_000  # ...and ops further ahead than this are not kept at all
    rejected_memory: int = 100_000  # ids of rejected ops remembered, to refuse them cheaply


# Memory an entry costs beyond its wire (the decoded Op, dict slots): measured ~ 1 KiB, plus
# ~0.5 KiB for each dep it waits for (its decoded id and its entry in the missing-deps index:
# measured ~38 KiB of RSS per op waiting on 64 invented deps). Both count against the bounds.
PENDING_OVERHEAD = 1024
SWEEP_MS = 1000
PENDING_PER_MISSING_DEP = 512


class _Entry:
    __slots__ = ("op", "source", "need", "added_ms", "not_before_ms", "cost")

    def __init__(self, op: Op, source: str, need: int, added_ms: int, not_before_ms: int):
        self.op, self.source, self.need = op, source, need
        self.added_ms, self.not_before_ms = added_ms, not_before_ms
        self.cost = len(op.wire) + PENDING_OVERHEAD + need * PENDING_PER_MISSING_DEP


class Pending:
    """Ops waiting for their deps or for their time. Bounded in total and per source."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.entries: dict[bytes, _Entry] = {}
        self.waiting: dict[bytes, set[bytes]] = {}  # missing dep -> ops waiting for it
        self.count: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.total_bytes = 0

    def __contains__(self, op_id: bytes) -> bool:
        return op_id in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: _Entry, missing: list[bytes]) -> bool:
        lim, src = self.limits, entry.source
        if (len(self.entries) >= lim.pending_ops or self.total_bytes + entry.cost > lim.pending_bytes
                or self.count[src] >= lim.pending_ops_per_source
                or self.bytes[src] + entry.cost > lim.pending_bytes_per_source):
            return False
        self.entries[entry.op.id] = entry
        self.count[src] += 1
        self.bytes[src] += entry.cost
        self.total_bytes += entry.cost
        for d in missing:
            self.waiting.setdefault(d, set()).add(entry.op.id)
        return True

    def pop(self, op_id: bytes) -> _Entry:
        e = self.entries.pop(op_id)
        self.count[e.source] -= 1
        self.bytes[e.source] -= e.cost
        self.total_bytes -= e.cost
        if self.count[e.source] <= 0:
            del self.count[e.source], self.bytes[e.source]
        for d in e.op.deps:
            waiters = self.waiting.get(d)
            if waiters is not None:
                waiters.discard(op_id)
                if not waiters:
                    del self.waiting[d]
        return e

    def waiters(self, dep: bytes) -> list[bytes]:
        return list(self.waiting.get(dep, ()))

    def arrived(self, dep: bytes) -> list[bytes]:
        """`dep` was delivered: it is missing no more; the ops that waited for it."""
        return list(self.waiting.pop(dep, ()))

    def expired(self, now_ms: int) -> list[bytes]:
        ttl = self.limits.pending_ttl_ms
        return [i for i, e in self.entries.items() if e.need > 0 and now_ms - e.added_ms > ttl]

    def due(self, now_ms: int) -> list[bytes]:
        """Held ops (deps complete) whose time has come."""
        horizon = now_ms + self.limits.max_future_ms
        return [i for i, e in self.entries.items() if e.need == 0 and e.not_before_ms <= horizon]

    def missing(self, limit: int | None = None, *, source: str | None = None,
                exclude: frozenset[bytes] | set[bytes] = frozenset()) -> list[bytes]:
        """Deps waited for that are not pending themselves: what to fetch. With `source`, only
        those the ops from that source wait for (an honest peer holds the deps of what it
        sent; nobody else need be asked for an invented one). At most `limit`, cheaply."""
        out: list[bytes] = []
        seen: set[bytes] = set()
        if source is None:
            candidates = iter(self.waiting)
        else:
            candidates = (d for e in self.entries.values() if e.source == source for d in e.op.deps)
        for d in candidates:
            if d in self.waiting and d not in self.entries and d not in exclude and d not in seen:
                seen.add(d)
                out.append(d)
                if limit is not None and len(out) >= limit:
                    break
        return out


class Stage:
    """What one batch changes, built on copies; `Replica.apply` makes it current."""

    def __init__(self, replica: Replica):
        self.replica = replica
        self.ops: dict[bytes, OpMeta] = {}
        self.registers: dict[tuple[str, str], NodeRegister | UserRegister] = {}
        self.rows: list[tuple] = []  # op log rows, in delivery order
        self.seq = replica.seq
        self._quota_plan: Plan | None = None

    def meta(self, op_id: bytes) -> OpMeta | None:
        return self.ops.get(op_id) or self.replica.ops.get(op_id)

    def register(self, kind: str, key: str):
        k = (kind, key)
        return self.registers.get(k) or self.replica.registers.get(k)

    def __bool__(self) -> bool:
        return bool(self.rows)

    @property
    def quota_plan(self) -> Plan:
        """What this stage changes in the quota view (crdt/quotas.py); computed once."""
        if self._quota_plan is None:
            self._quota_plan = self.replica.quota.plan(self.registers)
        return self._quota_plan

    def record_rows(self) -> list[tuple]:
        """The projection rows of the registers this stage changed (once per register)."""
        plan, inert = self.quota_plan, self.replica.quota.inert
        return [_record_row(get_kind(k), key, reg, self.seq, plan.inert.get((k, key), inert.get((k, key))))
                for (k, key), reg in self.registers.items()]

    def quota_flips(self) -> list[tuple[str | None, int, str, str]]:
        """(why or None, this stage's seq, kind, key) of the records whose quota standing this stage changes
        without changing the records themselves (an account's other records)."""
        return [(why, self.seq, k, key) for (k, key), why in self.quota_plan.inert.items()
                if (k, key) not in self.registers]


class Replica:
    def __init__(self, limits: Limits | None = None, quotas: Quotas = QUOTAS):
        self.limits = limits or Limits()
        self.ops: dict[bytes, OpMeta] = {}
        self.registers: dict[tuple[str, str], NodeRegister | UserRegister] = {}
        self.heads: set[bytes] = set()
        self.by_seq: list[bytes] = []  # op ids in delivery order: by_seq[seq - 1]
        self.seq = 0
        self.hlc = Hlc()
        self.pending = Pending(self.limits)
        self.rejected: OrderedDict[bytes, Rejection] = OrderedDict()
        self.rejected_total = 0  # ops rejected since the replica was made (a rejection remembered is not counted again)
        self.quota = QuotaBook(quotas)  # which user records are over their creator's quota (a view)
        self._next_sweep_ms = 0

    # ---- admission and delivery -------------------------------------------------------------

    def ingest(self, ops, *, source: str, now_ms: int) -> tuple[IngestResult, Stage]:
        """Admit decoded ops (or Rejections from the decoder); deliver what is ready."""
        res = IngestResult()
        stage = Stage(self)
        ready: list[Op] = []
        # Expiry and due held ops need a scan of the buffer: at most once a second, not per batch
        # (the buffer may hold 100,000 ops and gossip brings many small batches).
        sweep = now_ms >= self._next_sweep_ms
        if sweep:
            self._next_sweep_ms = now_ms + SWEEP_MS
            self._expire(now_ms)
        for op in ops:
            if isinstance(op, Rejection):
                res.rejected.append(op)
                continue
            if op.id in self.ops or op.id in self.pending or op.id in stage.ops:
                res.duplicates += 1
                continue
            if op.id in self.rejected:
                res.rejected.append(self.rejected[op.id])
                continue
            self._admit(op, source, now_ms, stage, ready, res)
            self._drain(ready, stage, res, now_ms)
        if sweep:
            for oid in self.pending.due(now_ms):
                ready.append(self.pending.pop(oid).op)
            self._drain(ready, stage, res, now_ms)
        res.pending = len(self.pending)
        return res, stage

    def sweep_now(self) -> None:
        """Let the next ingest scan for expired and due ops whatever the time of the last scan."""
        self._next_sweep_ms = 0

    def _admit(self, op: Op, source: str, now_ms: int, stage: Stage, ready: list[Op], res: IngestResult) -> None:
        missing = []
        for d in op.deps:
            if d in self.rejected:
                self._reject(op.id, "bad_dep", f"depends on rejected op {d.hex()[:16]}", res)
                return
            if stage.meta(d) is None:
                missing.append(d)
        not_before = _not_before_ms(op)
        if not missing and not_before <= now_ms + self.limits.max_future_ms:
            ready.append(op)
            return
        if not_before > now_ms + self.limits.hold_horizon_ms:
            res.dropped += 1  # far in the future: not worth holding; sync brings it when due
            return
        if not self.pending.add(_Entry(op, source, len(missing), now_ms, not_before), missing):
            res.dropped += 1
        elif not missing:
            res.held += 1

    def _drain(self, ready: list[Op], stage: Stage, res: IngestResult, now_ms: int) -> None:
        horizon = now_ms + self.limits.max_future_ms
        while ready:
            op = ready.pop()
            try:
                self._deliver(op, stage)
            except OpError as exc:
                self._reject(op.id, exc.code, exc.detail, res)
                continue
            except Exception as exc:  # noqa: BLE001 - a rule that crashes must not crash ingest
                # The same code runs on every node, so this rejection is deterministic too;
                # the log line is how the bug gets found.
                log.exception("rule of kind %r raised on op %s", op.kind, op.id.hex()[:16])
                self._reject(op.id, "internal", f"{type(exc).__name__} while validating", res)
                continue
            res.accepted.append(op.id)
            for waiter in self.pending.arrived(op.id):
                entry = self.pending.entries[waiter]
                entry.need -= 1
                if entry.need == 0 and entry.not_before_ms <= horizon:
                    ready.append(self.pending.pop(waiter).op)

    def _expire(self, now_ms: int) -> None:
        for oid in self.pending.expired(now_ms):
            self.pending.pop(oid)

    def _reject(self, op_id: bytes, code: str, detail: str, res: IngestResult) -> None:
        """Reject an op and, transitively, every pending op that depends on it."""
        stack = [(op_id, code, detail)]
        while stack:
            oid, c, d = stack.pop()
            waiters = self.pending.waiters(oid)
            if oid in self.pending:
                self.pending.pop(oid)
            rej = Rejection(oid, c, d)
            self.rejected[oid] = rej
            self.rejected_total += 1
            if len(self.rejected) > self.limits.rejected_memory:
                self.rejected.popitem(last=False)
            res.rejected.append(rej)
            stack.extend((w, "bad_dep", f"depends on rejected op {oid.hex()[:16]}") for w in waiters)

    def _deliver(self, op: Op, stage: Stage) -> None:
        kind, reg, write_id, value = self._validate(op, stage)
        # Every check passed; now build what changes, on copies, so a failure here (a value
        # that cannot be stored) still leaves nothing behind.
        # (storage only: the value was checked by its record's rules, and hashes never see it)
        value_blob = None if value is None else codec.pack_trusted(value)
        seq = stage.seq + 1
        meta = OpMeta(op.id, seq, op.kind, op.key, op.author, op.hlc, op.deps, op.prev, write_id)
        stage.seq = seq
        stage.ops[op.id] = meta
        stage.registers[(op.kind, op.key)] = reg
        signer = op.request.signer if op.request is not None else None
        stage.rows.append((seq, op.id, op.kind, op.key, op.author, op.hlc, b"".join(op.deps), b"".join(op.prev),
                           write_id, signer, op.wire, value_blob))

    def _validate(self, op: Op, stage: Stage) -> tuple[Kind, Any, bytes | None, Any]:
        """The validity function: (op, causal past) -> the new register, or Invalid."""
        kind = get_kind(op.kind)
        if kind is None:
            raise Invalid("unknown_kind", f"no kind named {op.kind!r}")
        deps = [stage.meta(d) for d in op.deps]
        if deps and op.hlc <= max(m.hlc for m in deps):
            raise Invalid("bad_clock", "an op's hlc must be greater than the hlc of each of its deps")
        prevs = [stage.meta(p) for p in op.prev]
        for m in prevs:
            if m.kind != op.kind or m.key != op.key:
                raise Invalid("bad_prev", f"prev {m.id.hex()[:16]} is an op on another record")
        old = stage.register(op.kind, op.key)
        if not kind.user_records:
            if op.request is not None:
                raise Invalid("unauthorized", f"{kind.name} records are written by nodes, not by users")
            value = kind.node_write(op)
            reg = old.copy() if old is not None else NodeRegister()
            meta = OpMeta(op.id, 0, op.kind, op.key, op.author, op.hlc, op.deps, op.prev, None)
            reg.add(meta, value)
            return kind, reg, None, value
        if op.request is None:
            raise Invalid("unauthorized", f"{kind.name} records are written by users' signed requests")
        ukind, intent = parse_request(op.request)
        if ukind is not kind:
            raise Invalid("bad_key", f"the user's request writes a {ukind.name}, the op says {op.kind}")
        if ukind.key_of(intent) != op.key:
            raise Invalid("bad_key", "the op's key is not the one the user's request names")
        if intent.action != "create" and not intent.base:
            raise Invalid("unknown_version", "every write but a create names the record_version it was made on "
                          "(?base=<record_version>)")
        parents = {m.write_id for m in prevs}
        if None in parents:
            raise Invalid("bad_prev", "a user's write supersedes only other users' writes")
        if version_of(parents) != intent.base:
            raise Invalid("bad_prev", "the op's prev are not the version the user signed (base)")
        write_id = op.request.write_id
        known = old.writes.get(write_id) if old is not None else None
        if known is not None:
            # Another op carrying the same request (a relay re-wrapped it): one write.
            if set(known.parents) != parents:
                raise Invalid("bad_prev", "this request is already in the record on another version")
            return kind, old, write_id, known.value
        reg = old.copy() if old is not None else UserRegister(op.key)
        base = fold(kind, reg, parents)
        value = kind.user_write(intent, op.key, base)
        reg.add(kind, Write(write_id, tuple(sorted(parents)), from_unix_seconds(intent.ts), intent.signer,
                            intent, value, kind.demoted(base, value), op.id))
        return kind, reg, write_id, value

    # ---- making a stage current -------------------------------------------------------------

    def apply(self, stage: Stage) -> None:
        """The stage is durable: make it the current state."""
        for meta in sorted(stage.ops.values(), key=lambda m: m.seq):
            self.ops[meta.id] = meta
            self.by_seq.append(meta.id)
            self.heads.difference_update(meta.deps)
            self.heads.add(meta.id)
            self.hlc.observe(meta.hlc)
        self.registers.update(stage.registers)
        self.quota.commit(stage.quota_plan)
        self.seq = stage.seq

    # ---- reading ----------------------------------------------------------------------------

    def missing(self, limit: int | None = None, **kw) -> list[bytes]:
        return self.pending.missing(limit, **kw)


def _not_before_ms(op: Op) -> int:
    """When an op is no longer from the future: its hlc, and for a user's write the signed time."""
    t = to_ms(op.hlc)
    if op.request is not None:
        try:
            t = max(t, split_message(op.request.message)[2] * 1000)
        except OpError:
            pass  # malformed: validation rejects it
    return t


def _record_row(kind: Kind, key: str, reg, seq: int, over_quota: str | None = None) -> tuple:
    """The projection row of a register (what queries read); `over_quota`: why it is inert."""
    value = reg.value
    if value is None:
        doc = owner = typ = text = None
    else:
        doc = json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
        idx = kind.index(value)
        owner, typ, text = idx["owner"], idx["type"], idx["text"]
        text = text.lower() if text else None
    return (kind.name, key, b"".join(reg.head_ids), reg.version, doc, owner, typ, text, seq,
            None if value is None else over_quota)
