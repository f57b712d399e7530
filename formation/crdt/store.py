"""The replicated state of one node: the delivery core (replica.py) over its op log (oplog.py).

Every op, whatever path it came by (made here, gossip, sync), goes through `ingest_ops`: the
replica validates it against its causal past and stages the change; the log commits the stage
in one transaction; only then does memory change. `ingest` returns after the commit, so an ack
means durable. Ops made here are decoded from their own wire by the decoder peers use
(`op.make_op`), so this node never accepts what its peers refuse, or the reverse.

The wall clock is read in one place, `clock` (injectable): admission holds ops dated ahead of
it (replica.py); validity never reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import codec, membership
from .hlc import to_ms
from .intents import parse_request
from .keys import PrivateKey, parse_signature, sha256
from .kinds import Invalid, get_kind, registry
from .op import MAX_DEPS, Op, OpError, decode_op, make_op, user_request
from .oplog import LogFormatError, OpLog
from .quotas import QUOTAS, Quotas
from .registers import NodeRegister, OpMeta, UserRegister
from .replica import IngestResult, Limits, Rejection, Replica, Stage, _record_row

# member and expel records read per fog (a budget: the records of a fog's sybils are valid ops too)
MAX_MEMBER_RECORDS = 100_000
MAX_CLAIMS_PER_INVITER = 1_000  # claims (and seals) of one inviter's invites read (serials <= max_admits count)

__all__ = ["IngestResult", "Limits", "LogFormatError", "Rejection", "Store"]

log = logging.getLogger("formation.crdt.store")


def _split(blob: bytes) -> tuple[bytes, ...]:
    return tuple(blob[i:i + 32] for i in range(0, len(blob), 32))


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Store:
    def __init__(self, path: str = ":memory:", *, limits: Limits | None = None, synchronous: str = "FULL",
                 clock: Callable[[], int] = wall_ms, quotas: Quotas = QUOTAS):
        self.path = path
        self.clock = clock
        self.log = OpLog(path, synchronous=synchronous)
        self.replica = Replica(limits, quotas)  # quotas: fog-wide (tests use small ones)
        self.on_commit: list = []  # callables(last_seq) run after each durable batch
        self._state_hash: tuple[int, bytes] | None = None  # (seq, hash) of the last state_hash
        self._members: dict[str, frozenset[str]] = {}  # fog id -> members, until membership changes
        self._load()

    @property
    def limits(self) -> Limits:
        return self.replica.limits

    # ---- loading ----------------------------------------------------------------------------

    def _load(self) -> None:
        """Rebuild memory from the log: metas for the graph, node registers from the projection,
        user registers by re-deriving their writes (cheap: no signatures are checked again)."""
        r = self.replica
        referenced: set[bytes] = set()
        for seq, id_, kind, key, author, hlc, deps, prev, write_id in self.log.metas():
            meta = OpMeta(id_, seq, kind, key, author, hlc, _split(deps), _split(prev), write_id)
            r.ops[id_] = meta
            r.by_seq.append(id_)
            referenced.update(meta.deps)
            r.seq = seq
            r.hlc.observe(hlc)
        r.heads = set(r.ops) - referenced
        kinds = registry().values()
        node_kinds = [k.name for k in kinds if not k.user_records]
        heads_of: dict[int, NodeRegister] = {}
        for kind, key, heads in self.log.record_heads(node_kinds):
            reg = r.registers[(kind, key)] = NodeRegister()
            for h in _split(heads):
                if h in r.ops:
                    heads_of[r.ops[h].seq] = reg
        for seq, value in self.log.values(list(heads_of)):
            heads_of[seq].add(r.ops[r.by_seq[seq - 1]], value)
        self._rederive_user_records([k.name for k in kinds if k.user_records])

    def _rederive_user_records(self, kinds: list[str]) -> None:
        r = self.replica
        stage = Stage(r)
        for wire, author, signer in self.log.user_ops(kinds):
            try:
                op = decode_op(wire, signers=(author, signer))
                _, reg, _, _ = r._validate(op, stage)
            except Exception as exc:  # noqa: BLE001 - a log written by older rules must not stop a start
                log.warning("op %s in the log no longer passes the rules (%s); left out", sha256(wire).hex()[:16], exc)
                continue
            stage.registers[(op.kind, op.key)] = reg
        r.registers.update(stage.registers)
        self._state_hash = None
        r.quota.commit(r.quota.plan(stage.registers))
        # The projection follows the rules of this version: rewrite rows that differ.
        stored = self.log.record_versions()
        fix = []
        for (kind, key), reg in stage.registers.items():
            row = _record_row(get_kind(kind), key, reg, r.seq, r.quota.inert.get((kind, key)))
            if stored.get((kind, key)) != (row[3], row[4], row[9]):
                fix.append(row)
        if fix:
            self.log.commit([], fix)

    def close(self) -> None:
        self.log.close()

    # ---- reading ----------------------------------------------------------------------------

    @property
    def seq(self) -> int:
        return self.replica.seq

    @property
    def ops(self) -> dict[bytes, OpMeta]:
        """Delivered ops by id (read-only use: tests and the crdt package)."""
        return self.replica.ops

    @property
    def registers(self) -> dict:
        return self.replica.registers

    def get(self, kind: str, key: str) -> Any:
        reg = self.replica.registers.get((kind, key))
        return None if reg is None else reg.value

    def record_version(self, kind: str, key: str) -> str | None:
        """What a user's write on this record names as its base (`?base=`); None if no record."""
        reg = self.replica.registers.get((kind, key))
        return None if reg is None else reg.version

    def over_quota(self, kind: str, key: str) -> str | None:
        """Why a record is inert, over its creator's quota (crdt/quotas.py); None: it counts."""
        return self.replica.quota.inert.get((kind, key))

    def siblings(self, kind: str, key: str) -> list[tuple[bytes, Any]]:
        """The record's value first, then each concurrent head's own value."""
        reg = self.replica.registers.get((kind, key))
        return [] if reg is None else reg.siblings()

    def heads(self) -> list[bytes]:
        return sorted(self.replica.heads)

    def has(self, op_id: bytes) -> bool:
        return op_id in self.replica.ops

    def holds(self, op_id: bytes) -> bool:
        """Applied, or verified and waiting in the pending buffer (for its deps or its time):
        a copy of it is the same bytes (the id hashes them), so it needs no checking again."""
        r = self.replica
        return op_id in r.ops or op_id in r.pending

    def op_meta(self, op_id: bytes) -> OpMeta | None:
        return self.replica.ops.get(op_id)

    def __len__(self) -> int:
        return len(self.replica.ops)

    def wires(self, ids: Iterable[bytes]) -> list[bytes]:
        """Wire bytes of delivered ops, in delivery (topological) order."""
        ops = self.replica.ops
        return self.log.wires([ops[i].seq for i in ids if i in ops])

    def all_wires(self) -> Iterable[bytes]:
        return self.log.all_wires()

    def since(self, seq: int, limit: int | None = None) -> list[OpMeta]:
        """Ops delivered after local sequence number `seq`, in delivery order (the first `limit`)."""
        r = self.replica
        start = max(seq, 0)
        return [r.ops[i] for i in r.by_seq[start:None if limit is None else start + max(limit, 0)]]

    def is_rejected(self, op_id: bytes) -> bool:
        return op_id in self.replica.rejected

    def missing(self, limit: int | None = None, *, source: str | None = None,
                exclude: frozenset[bytes] | set[bytes] = frozenset()) -> set[bytes]:
        """Deps that pending ops wait for and that are not pending themselves: fetch these
        (see `Pending.missing` for `source` and `limit`)."""
        return set(self.replica.missing(limit, source=source, exclude=exclude))

    @property
    def pending_count(self) -> int:
        return len(self.replica.pending)

    def list(self, kind: str, **filters) -> list[dict]:
        return self.log.list(kind, **filters)

    def changed_records(self, kinds: tuple[str, ...], after: int, limit: int = 10_000) -> list[tuple]:
        """(kind, key, record or None, seq) of the records of `kinds` changed after seq `after`,
        oldest change first, at most `limit`: None when the record is gone or inert (over its
        creator's quota), so a reader that keeps a copy drops it."""
        return [(kind, key, json.loads(doc) if doc is not None and quota is None else None, seq)
                for kind, key, doc, quota, seq in self.log.changed(kinds, after, limit)]

    def fog_members(self, fog_id: str) -> frozenset[str]:
        """The fog's current members (membership.py), from its genesis, claims and expulsions;
        computed again only after a batch touched a membership record (the scheduler, formnet,
        the dialer and the API ask often, and a fog's claims may be many)."""
        if fog_id not in self._members:
            self._members[fog_id] = self._compute_members(fog_id)
        return self._members[fog_id]

    def written_by(self, kind: str, owner: str, node: str, limit: int) -> list[dict]:
        """Node records of `kind` of `node`'s (key `...@<node>`) indexed under `owner`."""
        return self.log.owned_written_by(kind, owner, node, limit)

    def invited_by(self, kind: str, fog_id: str, inviter: str) -> list[dict]:
        """Claims ("member") or seals ("admit") of fog `fog_id` of the invites `inviter` signed."""
        return self.log.invited_by(kind, fog_id, [inviter], MAX_CLAIMS_PER_INVITER)

    def _compute_members(self, fog_id: str) -> frozenset[str]:
        """Claims, seals and leaves are read by walking the invite tree from the genesis, a level
        at a time: the claims of the invites the nodes reached signed, and their seals. Anyone can
        sign an invite and claim it for itself, so a fog's records may hold any number of such
        claims (and seals and leaves of their keys); read in key order under a bound, they pushed
        the members' own out of view. Walked from the genesis they are never read: only inviters
        reachable from the genesis are asked for, each for at most MAX_CLAIMS_PER_INVITER (its
        own flood hides only its own invitees). Expulsions are the genesis's alone (validity)."""
        fog = self.get("fog", fog_id)
        if fog is None:
            return frozenset()
        claims: list[dict] = []
        seals: list[dict] = []
        reached = {fog["genesis"]}
        level = [fog["genesis"]]
        while level and len(claims) < MAX_MEMBER_RECORDS:
            seals += self.log.invited_by("admit", fog_id, level, MAX_CLAIMS_PER_INVITER)
            found = self.log.invited_by("member", fog_id, level, MAX_CLAIMS_PER_INVITER)
            claims += found
            level = sorted({c["address"] for c in found} - reached)
            reached.update(level)
        leaves = self.log.docs("leave", sorted(reached))
        return membership.members(fog_id, fog, claims,
                                  self.log.list("expel", type=fog_id, limit=MAX_MEMBER_RECORDS), seals, leaves)

    def search(self, kind: str, text: str, **filters) -> list[dict]:
        """Words of `text` must all appear in the name, description or tags (case-insensitive)."""
        return self.log.list(kind, text=text, **filters)

    def state_hash(self) -> bytes:
        """Hash of every register (heads and value): equal on replicas with equal state. Kept
        until the next delivered op (status calls ask often; the hash is over all the state)."""
        seq = self.replica.seq
        if self._state_hash is None or self._state_hash[0] != seq:
            h = hashlib.sha256()
            regs = self.replica.registers
            for k in sorted(regs):
                reg = regs[k]
                h.update(codec.pack([k[0], k[1], reg.head_ids, reg.value]))
            self._state_hash = (seq, h.digest())
        return self._state_hash[1]

    def get_meta(self, k: str) -> bytes | None:
        return self.log.get_meta(k)

    def set_meta(self, k: str, v: bytes) -> None:
        self.log.set_meta(k, v)

    # ---- writing ----------------------------------------------------------------------------

    def write(self, signer: PrivateKey, kind: str, key: str, value: Any, *, now_ms: int | None = None) -> Op:
        """A node's own fact (value None = delete). Raises Invalid if the rules refuse it."""
        reg = self.replica.registers.get((kind, key))
        prev = reg.head_ids if isinstance(reg, NodeRegister) else []
        return self._write_local(signer, kind, key, prev, now_ms, value=value)

    def write_request(self, signer: PrivateKey, message: str, body: bytes, signature: bytes | str,
                      *, recovery_id: int | None = None, now_ms: int | None = None) -> Op:
        """Relay a user's signed request as an op signed by this node, on the version it names."""
        req = user_request(message, bytes(body), parse_signature(signature, recovery_id))
        kind, intent = parse_request(req)
        key = kind.key_of(intent)
        reg = self.replica.registers.get((kind.name, key))
        writes = reg.versions.get(intent.base) if isinstance(reg, UserRegister) else (None if intent.base else ())
        if writes is None:
            raise Invalid("unknown_version", f"{kind.name} {key} has no version {intent.base or '(none)'} here: "
                          "read the record again and sign your request with its record_version as ?base=")
        prev = sorted(reg.writes[w].carrier for w in writes) if writes else []
        return self._write_local(signer, kind.name, key, prev, now_ms, request=(message, req.body, req.signature))

    def _refuse_over_quota(self, op: Op) -> None:
        """A node does not make a user's write that its creator's quota leaves inert, or that
        pushes another of their records over (crdt/quotas.py). Not validity: the same write
        arriving from a peer is stored, and inert on every node alike."""
        _, reg, _, _ = self.replica._validate(op, Stage(self.replica))  # a dry run: changes nothing
        why = self.replica.quota.plan({(op.kind, op.key): reg}).refusal(op.kind, op.key)
        if why:
            raise Invalid("quota_exceeded", why)

    def _write_local(self, signer: PrivateKey, kind: str, key: str, prev: list[bytes], now_ms: int | None,
                     **payload) -> Op:
        now_ms = self.clock() if now_ms is None else now_ms
        ops = self.replica.ops
        room = MAX_DEPS - len(prev)
        heads = sorted(self.replica.heads, key=lambda h: ops[h].hlc, reverse=True)[:room]
        deps = set(heads) | set(prev)
        after = max((ops[d].hlc for d in deps), default=0)
        op = make_op(signer, kind, key, deps=deps, prev=prev, hlc=self.replica.hlc.next(now_ms, after=after),
                     **payload)
        if op.request is not None:
            self._refuse_over_quota(op)
        # Our clock may stand ahead of `now_ms` because of deps we accepted when they were due.
        res = self.ingest_ops([op], source="local", now_ms=max(now_ms, to_ms(op.hlc)))
        if res.rejected:
            r = res.rejected[0]
            raise Invalid(r.code, r.detail)
        if op.id not in ops:
            # Held for its time: refused here, so it must not take effect later either (the
            # client is told to sign again).
            if op.id in self.replica.pending:
                self.replica.pending.pop(op.id)
            raise Invalid("too_early", "the request is dated too far ahead of this node's clock; check the clocks")
        return op

    def ingest(self, wires: Iterable[bytes], *, source: str = "local", now_ms: int | None = None) -> IngestResult:
        """Verify, validate and durably store ops; returns after the batch is committed."""
        fresh, seen, known_bad = [], 0, []
        r = self.replica
        for w in wires:
            # Recognise what we already hold (or refused) before paying for its signatures:
            # sync and gossip both deliver many duplicates.
            oid = sha256(w) if isinstance(w, (bytes, bytearray)) else None
            if oid is not None and (oid in r.ops or oid in r.pending):
                seen += 1
            elif oid is not None and oid in r.rejected:
                known_bad.append(r.rejected[oid])
            else:
                fresh.append(w)
        res = self.ingest_ops(self._decode_all(fresh), source=source, now_ms=now_ms)
        res.duplicates += seen
        res.rejected.extend(known_bad)
        return res

    @staticmethod
    def _decode_all(wires: Iterable[bytes]) -> Iterable[Op | Rejection]:
        for wire in wires:
            try:
                yield decode_op(wire)
            except OpError as exc:
                yield Rejection(None, exc.code, exc.detail)

    def ingest_ops(self, ops: Iterable[Op | Rejection], *, source: str, now_ms: int | None = None) -> IngestResult:
        """Like `ingest`, for ops already decoded and verified (e.g. by a gossip validator)."""
        res, stage = self.replica.ingest(ops, source=source, now_ms=self.clock() if now_ms is None else now_ms)
        if stage:
            self.log.commit(stage.rows, stage.record_rows(), stage.quota_flips())  # raises: memory is untouched
            self.replica.apply(stage)
            if any(kind in membership.KINDS for kind, _ in stage.registers):
                self._members.clear()
            for cb in self.on_commit:
                cb(self.replica.seq)
        return res

    def tick(self, now_ms: int | None = None) -> IngestResult:
        """Deliver held ops whose time has come, drop expired ones (the node calls this often)."""
        self.replica.sweep_now()
        return self.ingest_ops([], source="local", now_ms=now_ms)
