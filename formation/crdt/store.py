"""The replicated state of one node: hash graph of signed ops, registers, and their SQLite log.

Delivery (DESIGN.md §3):
- an op is delivered only after all its deps; until then it waits in a pending buffer bounded
  per source (count and bytes); past the bound it is dropped and sync fetches it again later;
- validity is decided from the op and its causal past only: the base value of its (kind, key)
  is resolved from the op's `prev` (which are among its deps), then the kind's rule decides;
- each (kind, key) is a multi-value register whose heads are the valid ops on it that no other
  valid op names in `prev`. The visible value: among the heads, the lineage with the earliest
  root wins (a later, unrelated "create" cannot take over a key), then the highest clock, then
  the highest op id. A user's write is clocked by the time inside the user's signed request, so
  a relay cannot reorder a user's writes.

Persistence: an append-only `ops` table and the `records` projection, written in the same
transaction per batch; `ingest` returns only after the commit, so an ack means durable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from . import codec
from .hlc import Hlc, from_unix_seconds
from .intents import parse_request
from .keys import PrivateKey, parse_signature, sha256
from .kinds import Invalid, get_kind
from .op import MAX_DEPS, Op, OpError, decode_op, make_op, user_request

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ops(
  seq INTEGER PRIMARY KEY,
  id BLOB NOT NULL,  -- unique by construction (checked in memory); no index: random keys are costly
  kind TEXT NOT NULL,
  key TEXT NOT NULL,
  author BLOB NOT NULL,
  hlc INTEGER NOT NULL,
  clock INTEGER NOT NULL,
  height INTEGER NOT NULL,
  deps BLOB NOT NULL,
  prev BLOB NOT NULL,
  root BLOB NOT NULL,
  root_hlc INTEGER NOT NULL,
  write_id BLOB,
  wire BLOB NOT NULL,
  value BLOB
);
CREATE TABLE IF NOT EXISTS records(
  kind TEXT NOT NULL,
  key TEXT NOT NULL,
  heads BLOB NOT NULL,
  winner BLOB NOT NULL,
  doc TEXT,
  owner TEXT,
  type TEXT,
  text TEXT,
  updated_seq INTEGER NOT NULL,
  PRIMARY KEY(kind, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_owner ON records(kind, owner);
CREATE INDEX IF NOT EXISTS records_type ON records(kind, type);
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v BLOB);
"""

_NO_VALUE = object()
log = logging.getLogger("formation.crdt.store")


def _join(ids: Iterable[bytes]) -> bytes:
    return b"".join(ids)


def _split(blob: bytes) -> tuple[bytes, ...]:
    return tuple(blob[i:i + 32] for i in range(0, len(blob), 32))


class OpMeta:
    """What the graph keeps in memory per delivered op (the value lives in SQLite)."""

    __slots__ = ("id", "seq", "kind", "key", "author", "hlc", "clock", "height", "deps", "prev",
                 "root", "root_hlc", "write_id")

    def __init__(self, id, seq, kind, key, author, hlc, clock, height, deps, prev, root, root_hlc, write_id):
        self.id = id
        self.seq = seq
        self.kind = kind
        self.key = key
        self.author = author
        self.hlc = hlc
        self.clock = clock
        self.height = height
        self.deps = deps
        self.prev = prev
        self.root = root
        self.root_hlc = root_hlc
        self.write_id = write_id

    @property
    def root_order(self) -> tuple[int, bytes]:
        return (self.root_hlc, self.root)


class Register:
    """Current ops (heads) of one (kind, key) with their values, and the resolved winner."""

    __slots__ = ("heads", "winner", "value")

    def __init__(self):
        self.heads: dict[bytes, tuple[OpMeta, Any]] = {}
        self.winner: OpMeta | None = None
        self.value: Any = None

    def resolve(self) -> None:
        self.winner, self.value = resolve(self.heads.values())


def resolve(candidates: Iterable[tuple[OpMeta, Any]]) -> tuple[OpMeta | None, Any]:
    """Earliest lineage wins; inside it the highest (clock, op id)."""
    best = None
    for meta, value in candidates:
        if best is None:
            best = (meta, value)
            continue
        bm = best[0]
        ro, bro = meta.root_order, bm.root_order
        if ro < bro or (ro == bro and (meta.clock, meta.id) > (bm.clock, bm.id)):
            best = (meta, value)
    return best if best is not None else (None, None)


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
    pending: int = 0  # ops of this call still waiting for deps
    dropped: int = 0  # ops not kept because the pending buffer of their source was full


@dataclass
class Limits:
    pending_ops_per_source: int = 100_000
    pending_bytes_per_source: int = 64 * 1024 * 1024
    rejected_memory: int = 100_000  # ids of rejected ops remembered, to refuse them cheaply


class Store:
    def __init__(self, path: str = ":memory:", *, limits: Limits | None = None, synchronous: str = "FULL"):
        self.path = path
        self.limits = limits or Limits()
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so an acknowledged batch survives power loss.
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        self.db.executescript(_SCHEMA)
        self.hlc = Hlc()
        self.on_commit: list = []  # callables(last_seq) run after each durable batch
        self._load()

    # ---- loading ----------------------------------------------------------------------------

    def _load(self) -> None:
        self.ops: dict[bytes, OpMeta] = {}
        self.registers: dict[tuple[str, str], Register] = {}
        self._write_ids: dict[tuple[str, str], dict[bytes, list[bytes]]] = {}
        self._heads: set[bytes] = set()
        self._pending: dict[bytes, tuple[Op, str]] = {}
        self._pending_need: dict[bytes, int] = {}
        self._waiting: dict[bytes, set[bytes]] = {}
        self._pending_count: Counter[str] = Counter()
        self._pending_bytes: Counter[str] = Counter()
        self._rejected: OrderedDict[bytes, Rejection] = OrderedDict()
        self._by_seq: list[bytes] = []  # op ids in delivery order: _by_seq[seq - 1]
        self.seq = 0
        referenced: set[bytes] = set()
        for row in self.db.execute(
            "SELECT seq,id,kind,key,author,hlc,clock,height,deps,prev,root,root_hlc,write_id FROM ops ORDER BY seq"
        ):
            seq, id_, kind, key, author, hlc, clock, height, deps, prev, root, root_hlc, write_id = row
            meta = OpMeta(id_, seq, kind, key, author, hlc, clock, height, _split(deps), _split(prev),
                          root, root_hlc, write_id)
            self.ops[id_] = meta
            self._by_seq.append(id_)
            referenced.update(meta.deps)
            if write_id is not None:
                self._write_ids.setdefault((kind, key), {}).setdefault(write_id, []).append(id_)
            self.seq = seq
            self.hlc.observe(hlc)
        self._heads = set(self.ops) - referenced
        head_ids: dict[bytes, Register] = {}
        for kind, key, heads in self.db.execute("SELECT kind, key, heads FROM records"):
            reg = Register()
            self.registers[(kind, key)] = reg
            for h in _split(heads):
                head_ids[h] = reg
        for id_, value in self._values(list(head_ids)):
            head_ids[id_].heads[id_] = (self.ops[id_], value)
        for reg in self.registers.values():
            reg.resolve()

    def _values(self, ids: list[bytes]) -> Iterable[tuple[bytes, Any]]:
        seqs = {self.ops[i].seq: i for i in ids}
        keys = list(seqs)
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            q = "SELECT seq, value FROM ops WHERE seq IN ({})".format(",".join("?" * len(chunk)))
            for seq, blob in self.db.execute(q, chunk):
                yield seqs[seq], None if blob is None else msgpack.unpackb(blob, raw=False)  # our own bytes

    def close(self) -> None:
        self.db.close()

    # ---- reading ----------------------------------------------------------------------------

    def get(self, kind: str, key: str) -> Any:
        reg = self.registers.get((kind, key))
        return None if reg is None else reg.value

    def siblings(self, kind: str, key: str) -> list[tuple[bytes, Any]]:
        """Every current value of a register (concurrent writes), winner first."""
        reg = self.registers.get((kind, key))
        if reg is None:
            return []
        rest = sorted(((m.id, v) for m, v in reg.heads.values() if m is not reg.winner), key=lambda t: t[0])
        return [(reg.winner.id, reg.value), *rest]

    def heads(self) -> list[bytes]:
        return sorted(self._heads)

    def has(self, op_id: bytes) -> bool:
        return op_id in self.ops

    def __len__(self) -> int:
        return len(self.ops)

    def wires(self, ids: Iterable[bytes]) -> list[bytes]:
        """Wire bytes of delivered ops, in delivery (topological) order."""
        wanted = sorted((self.ops[i].seq, i) for i in ids if i in self.ops)
        out = []
        for i in range(0, len(wanted), 500):
            chunk = [s for s, _ in wanted[i:i + 500]]
            q = "SELECT wire FROM ops WHERE seq IN ({}) ORDER BY seq".format(",".join("?" * len(chunk)))
            out.extend(w for (w,) in self.db.execute(q, chunk))
        return out

    def all_wires(self) -> Iterable[bytes]:
        for (w,) in self.db.execute("SELECT wire FROM ops ORDER BY seq"):
            yield w

    def since(self, seq: int) -> list[OpMeta]:
        """Ops delivered after local sequence number `seq`, in delivery order."""
        return [self.ops[i] for i in self._by_seq[max(seq, 0):]]

    def is_rejected(self, op_id: bytes) -> bool:
        return op_id in self._rejected

    def missing(self) -> set[bytes]:
        """Deps that pending ops wait for and that are not pending themselves: fetch these."""
        return {d for d in self._waiting if d not in self._pending}

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def list(self, kind: str, *, owner: str | None = None, type: str | None = None,
             tag: str | None = None, text: str | None = None, limit: int = 100, offset: int = 0) -> list[dict]:
        sql = ["SELECT doc FROM records WHERE kind = ? AND doc IS NOT NULL"]
        args: list[Any] = [kind]
        if owner is not None:
            sql.append("AND owner = ?")
            args.append(owner.lower())
        if type is not None:
            sql.append("AND type = ?")
            args.append(type)
        if tag is not None:
            sql.append("AND EXISTS (SELECT 1 FROM json_each(doc, '$.tags') WHERE json_each.value = ?)")
            args.append(tag)
        if text:
            for word in text.lower().split():
                sql.append("AND text LIKE ? ESCAPE '\\'")
                args.append("%" + word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        sql.append("ORDER BY key LIMIT ? OFFSET ?")
        args += [limit, offset]
        return [json.loads(d) for (d,) in self.db.execute(" ".join(sql), args)]

    def search(self, kind: str, text: str, **filters) -> list[dict]:
        """Words of `text` must all appear in the name, description or tags (case-insensitive)."""
        return self.list(kind, text=text, **filters)

    def state_hash(self) -> bytes:
        """Hash of every register (heads, winner, value): equal on replicas with equal state."""
        h = hashlib.sha256()
        for (kind, key) in sorted(self.registers):
            reg = self.registers[(kind, key)]
            h.update(codec.pack([kind, key, sorted(reg.heads), reg.winner.id, reg.value]))
        return h.digest()

    # ---- sync watermarks (per peer: local seq up to which that peer is known to hold our ops)

    def get_meta(self, k: str) -> bytes | None:
        row = self.db.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, k: str, v: bytes) -> None:
        self.db.execute("INSERT INTO meta(k, v) VALUES(?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v", (k, v))

    # ---- writing ----------------------------------------------------------------------------

    def write(self, signer: PrivateKey, kind: str, key: str, value: Any, *, now_ms: int) -> Op:
        """A node's own fact (value None = delete). Raises Invalid if the rules refuse it."""
        return self._write_local(signer, kind, key, now_ms, value=value)

    def write_request(self, signer: PrivateKey, message: str, body: bytes, signature: bytes | str,
                      *, recovery_id: int | None = None, now_ms: int) -> Op:
        """Relay a user's signed request as an op signed by this node."""
        req = user_request(message, bytes(body), parse_signature(signature, recovery_id))
        kind, intent = parse_request(req)
        key = kind.key_of(intent)
        return self._write_local(signer, kind.name, key, now_ms, request=(message, req.body, req.signature))

    def _write_local(self, signer: PrivateKey, kind: str, key: str, now_ms: int, **payload) -> Op:
        reg = self.registers.get((kind, key))
        prev = sorted(reg.heads) if reg else []
        room = MAX_DEPS - len(prev)
        heads = sorted(self._heads, key=lambda h: self.ops[h].hlc, reverse=True)[:room]
        deps = set(heads) | set(prev)
        after = max((self.ops[d].hlc for d in deps), default=0)
        op = make_op(signer, kind, key, deps=deps, prev=prev, hlc=self.hlc.next(now_ms, after=after), **payload)
        res = self.ingest_ops([op], source="local")
        if res.rejected:
            r = res.rejected[0]
            raise Invalid(r.code, r.detail)
        return op

    def ingest(self, wires: Iterable[bytes], *, source: str = "local") -> IngestResult:
        """Verify, validate and durably store ops; returns after the batch is committed."""
        fresh, seen, known_bad = [], 0, []
        for w in wires:
            # Recognise what we already hold (or refused) before paying for its signatures:
            # sync and gossip both deliver many duplicates.
            oid = sha256(w) if isinstance(w, (bytes, bytearray)) else None
            if oid is not None and (oid in self.ops or oid in self._pending):
                seen += 1
            elif oid is not None and oid in self._rejected:
                known_bad.append(self._rejected[oid])
            else:
                fresh.append(w)
        res = self.ingest_ops(self._decode_all(fresh), source=source)
        res.duplicates += seen
        res.rejected.extend(known_bad)
        return res

    def _decode_all(self, wires: Iterable[bytes]) -> Iterable[Op | Rejection]:
        for wire in wires:
            try:
                yield decode_op(wire)
            except OpError as exc:
                yield Rejection(None, exc.code, exc.detail)

    def ingest_ops(self, ops: Iterable[Op | Rejection], *, source: str) -> IngestResult:
        """Like `ingest`, for ops already decoded and verified (e.g. by a gossip validator)."""
        res = IngestResult()
        batch = _Batch()
        ready: list[Op] = []
        for op in ops:
            if isinstance(op, Rejection):
                res.rejected.append(op)
                continue
            if op.id in self.ops or op.id in self._pending:
                res.duplicates += 1
                continue
            if op.id in self._rejected:
                res.rejected.append(self._rejected[op.id])
                continue
            self._admit(op, source, ready, res)
            while ready:
                op = ready.pop()
                try:
                    self._deliver(op, batch)
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
                for waiter in self._waiting.pop(op.id, ()):
                    self._pending_need[waiter] -= 1
                    if self._pending_need[waiter] == 0:
                        ready.append(self._unpend(waiter))
        res.pending = len(self._pending)
        if batch.rows:
            self._commit(batch)
        return res

    def _admit(self, op: Op, source: str, ready: list[Op], res: IngestResult) -> None:
        need = 0
        for d in op.deps:
            if d in self._rejected:
                self._reject(op.id, "bad_dep", f"depends on rejected op {d.hex()[:16]}", res)
                return
            if d not in self.ops:
                need += 1
        if need == 0:
            ready.append(op)
            return
        size = len(op.wire)
        if (self._pending_count[source] >= self.limits.pending_ops_per_source
                or self._pending_bytes[source] + size > self.limits.pending_bytes_per_source):
            res.dropped += 1
            return
        self._pending[op.id] = (op, source)
        self._pending_need[op.id] = need
        self._pending_count[source] += 1
        self._pending_bytes[source] += size
        for d in op.deps:
            if d not in self.ops:
                self._waiting.setdefault(d, set()).add(op.id)

    def _unpend(self, op_id: bytes) -> Op:
        op, source = self._pending.pop(op_id)
        del self._pending_need[op_id]
        self._pending_count[source] -= 1
        self._pending_bytes[source] -= len(op.wire)
        return op

    def _reject(self, op_id: bytes, code: str, detail: str, res: IngestResult) -> None:
        """Reject an op and, transitively, every pending op that depends on it."""
        stack = [(op_id, code, detail)]
        while stack:
            oid, c, d = stack.pop()
            if oid in self._pending:
                self._unpend(oid)
            rej = Rejection(oid, c, d)
            self._rejected[oid] = rej
            if len(self._rejected) > self.limits.rejected_memory:
                self._rejected.popitem(last=False)
            res.rejected.append(rej)
            for waiter in self._waiting.pop(oid, ()):
                if waiter in self._pending:
                    stack.append((waiter, "bad_dep", f"depends on rejected op {oid.hex()[:16]}"))

    def _deliver(self, op: Op, batch: _Batch) -> None:
        kind = get_kind(op.kind)
        if kind is None:
            raise Invalid("unknown_kind", f"no kind named {op.kind!r}")
        deps = [self.ops[d] for d in op.deps]
        if deps and op.hlc <= max(m.hlc for m in deps):
            raise Invalid("bad_clock", "an op's hlc must be greater than the hlc of each of its deps")
        prevs = [self.ops[p] for p in op.prev]
        for m in prevs:
            if m.kind != op.kind or m.key != op.key:
                raise Invalid("bad_prev", f"prev {m.id.hex()[:16]} is an op on another record")
        reg = self.registers.get((op.kind, op.key))
        base = resolve((m, self._value_of(m.id, reg, batch)) for m in prevs)[1] if prevs else None
        write_id = None
        if op.request is not None:
            ukind, intent = parse_request(op.request)
            if ukind.name != op.kind:
                raise Invalid("bad_key", f"the user's request writes a {ukind.name}, the op says {op.kind}")
            if ukind.key_of(intent) != op.key:
                raise Invalid("bad_key", "the op's key is not the one the user's request names")
            write_id = op.request.write_id
            self._check_replay(op, write_id)
            value = ukind.user_write(intent, op.key, base)
            clock = from_unix_seconds(intent.ts)
        else:
            value = kind.node_write(op, base)
            clock = op.hlc
        if prevs:
            root_meta = min(prevs, key=lambda m: m.root_order)
            root, root_hlc = root_meta.root, root_meta.root_hlc
        else:
            root, root_hlc = op.id, op.hlc
        height = 1 + max((m.height for m in deps), default=0)
        self.seq += 1
        meta = OpMeta(op.id, self.seq, op.kind, op.key, op.author, op.hlc, clock, height, op.deps, op.prev,
                      root, root_hlc, write_id)
        self.ops[op.id] = meta
        self._by_seq.append(op.id)
        self.hlc.observe(op.hlc)
        self._heads.difference_update(op.deps)
        self._heads.add(op.id)
        if write_id is not None:
            self._write_ids.setdefault((op.kind, op.key), {}).setdefault(write_id, []).append(op.id)
        if reg is None:
            reg = self.registers[(op.kind, op.key)] = Register()
        for p in op.prev:
            old = reg.heads.pop(p, None)
            if old is not None:
                batch.values[p] = old[1]
        reg.heads[op.id] = (meta, value)
        reg.resolve()
        value_blob = None if value is None else codec.pack_trusted(value)  # storage, not hashing
        batch.rows.append((meta.seq, op.id, op.kind, op.key, op.author, op.hlc, clock, height, _join(op.deps),
                           _join(op.prev), root, root_hlc, write_id, op.wire, value_blob))
        batch.dirty[(op.kind, op.key)] = reg
        batch.values[op.id] = value

    def _value_of(self, op_id: bytes, reg: Register | None, batch: _Batch) -> Any:
        if reg is not None and op_id in reg.heads:
            return reg.heads[op_id][1]
        got = batch.values.get(op_id, _NO_VALUE)
        if got is not _NO_VALUE:
            return got
        for _, value in self._values([op_id]):
            return value
        raise AssertionError(f"op {op_id.hex()} is delivered but has no stored value")

    def _check_replay(self, op: Op, write_id: bytes) -> None:
        """The same signed request must not take effect twice along one history of a record."""
        earlier = self._write_ids.get((op.kind, op.key), {}).get(write_id)
        if not earlier:
            return
        targets = set(earlier)
        seen: set[bytes] = set()
        stack = list(op.prev)
        while stack:
            oid = stack.pop()
            if oid in targets:
                raise Invalid("replay", "this signed request was already applied to this record")
            if oid not in seen:
                seen.add(oid)
                stack.extend(self.ops[oid].prev)

    def _commit(self, batch: _Batch) -> None:
        rec_rows = []
        for (kind, key), reg in batch.dirty.items():
            value = reg.value
            if value is None:
                doc = owner = typ = text = None
            else:
                doc = json.dumps(value, separators=(",", ":"), sort_keys=True)
                idx = get_kind(kind).index(value)
                owner, typ, text = idx["owner"], idx["type"], idx["text"]
                text = text.lower() if text else None
            rec_rows.append((kind, key, _join(sorted(reg.heads)), reg.winner.id, doc, owner, typ, text, self.seq))
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("INSERT INTO ops VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", batch.rows)
            self.db.executemany(
                "INSERT INTO records(kind,key,heads,winner,doc,owner,type,text,updated_seq) VALUES (?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(kind,key) DO UPDATE SET heads=excluded.heads, winner=excluded.winner, doc=excluded.doc, "
                "owner=excluded.owner, type=excluded.type, text=excluded.text, updated_seq=excluded.updated_seq",
                rec_rows)
            self.db.execute("COMMIT")
        except BaseException:
            # Memory ran ahead of the disk: forget the batch by reloading what is durable.
            # Pending ops are dropped too; sync fetches them again.
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            self._load()
            raise
        for cb in self.on_commit:
            cb(self.seq)


class _Batch:
    __slots__ = ("rows", "dirty", "values")

    def __init__(self):
        self.rows: list[tuple] = []
        self.dirty: dict[tuple[str, str], Register] = {}
        self.values: dict[bytes, Any] = {}
