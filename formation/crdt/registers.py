"""The two kinds of register a (kind, key) can be, and how each resolves. Pure: no IO.

Node records (node, peer, instance_status) are written only by the node they are about, so a
register is its heads (ops no later op names in `prev`) and the visible value is the head with
the highest (hlc, op id): equivocation by that node is its own problem and still resolves the
same everywhere.

User records are written by users' signed requests. Their history is a DAG over the requests
themselves (write ids = SHA-256 of the user's signature), not over the ops that carry them:
each request names the version it was made on (`?base=`, a hash of the heads it saw), so the
relaying node cannot choose a base, and any number of ops carrying one request are one write.
The value at a set of writes is a fold over their causal past, in a deterministic order:
1. writes concurrent with an effective access change (a write that lowered someone's rights:
   revoke, transfer, delete) by a principal it demoted are void: access changes win
   (`_void_writes` says which access changes are effective);
2. the rest are applied in topological order, concurrent ones by (signed time, write id), each
   through the kind's own rule on the state so far; a write the rule refuses there is skipped.
A write's own value (the fold of its past, itself last) is computed once, when it is delivered,
and cached: a linear history costs one rule call per write.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable
from typing import Any

from .intents import version_of
from .kinds import Intent, Invalid, Kind

log = logging.getLogger("formation.crdt.registers")


class OpMeta:
    """What the graph keeps in memory per delivered op (its wire lives in the op log)."""

    __slots__ = ("id", "seq", "kind", "key", "author", "hlc", "deps", "prev", "write_id")

    def __init__(self, id, seq, kind, key, author, hlc, deps, prev, write_id):
        self.id = id
        self.seq = seq
        self.kind = kind
        self.key = key
        self.author = author
        self.hlc = hlc
        self.deps = deps
        self.prev = prev
        self.write_id = write_id


class NodeRegister:
    """Heads of a node-written record, with their values; the winner has the highest (hlc, id)."""

    __slots__ = ("heads", "winner", "value")

    def __init__(self):
        self.heads: dict[bytes, tuple[OpMeta, Any]] = {}
        self.winner: OpMeta | None = None
        self.value: Any = None

    def copy(self) -> NodeRegister:
        out = NodeRegister()
        out.heads = dict(self.heads)
        out.winner, out.value = self.winner, self.value
        return out

    def add(self, meta: OpMeta, value: Any) -> None:
        for p in meta.prev:
            self.heads.pop(p, None)
        self.heads[meta.id] = (meta, value)
        self.winner, self.value = max(self.heads.values(), key=lambda mv: (mv[0].hlc, mv[0].id))

    @property
    def head_ids(self) -> list[bytes]:
        return sorted(self.heads)

    @property
    def version(self) -> str:
        return version_of(self.heads)

    def siblings(self) -> list[tuple[bytes, Any]]:
        rest = sorted((m.id, v) for m, v in self.heads.values() if m is not self.winner)
        return [(self.winner.id, self.value), *rest]


class Write:
    """One user request in a record's history."""

    __slots__ = ("id", "parents", "clock", "signer", "intent", "value", "demoted", "carrier")

    def __init__(self, id, parents, clock, signer, intent, value, demoted, carrier):
        self.id: bytes = id
        self.parents: tuple[bytes, ...] = parents  # sorted write ids of the version it was made on
        self.clock: int = clock  # the signed time, as an hlc
        self.signer: str = signer
        self.intent: Intent = intent
        self.value: Any = value  # the record after this write, on its own past
        self.demoted: frozenset[str] = demoted
        self.carrier: bytes = carrier  # the first op that brought it (a prev for later ops)


class UserRegister:
    __slots__ = ("key", "writes", "heads", "value", "versions")

    def __init__(self, key: str):
        self.key = key
        self.writes: dict[bytes, Write] = {}
        self.heads: frozenset[bytes] = frozenset()
        self.value: Any = None
        # every version this record has had here -> its writes: a request made on any of them
        # can be relayed, not only one made on the newest
        self.versions: dict[str, frozenset[bytes]] = {"": frozenset()}

    def copy(self) -> UserRegister:
        out = UserRegister(self.key)
        out.writes = dict(self.writes)
        out.heads, out.value, out.versions = self.heads, self.value, dict(self.versions)
        return out

    @property
    def version(self) -> str:
        return version_of(self.heads)

    @property
    def head_ids(self) -> list[bytes]:
        return sorted(self.heads)

    def add(self, kind: Kind, write: Write) -> None:
        self.writes[write.id] = write
        self.heads = (self.heads - set(write.parents)) | {write.id}
        self.value = fold(kind, self, self.heads)
        self.versions[version_of(self.heads)] = self.heads

    def siblings(self) -> list[tuple[bytes, Any]]:
        """The value of the record, then the value each head has on its own past."""
        first = [(b"", self.value)]
        return first + [(w, self.writes[w].value) for w in sorted(self.heads)]


def _closure(start: Iterable[bytes], step) -> set[bytes]:
    seen: set[bytes] = set()
    stack = list(start)
    while stack:
        w = stack.pop()
        if w not in seen:
            seen.add(w)
            stack.extend(step(w))
    return seen


def _void_writes(writes: dict[bytes, Write], members: set[bytes],
                 children: dict[bytes, list[bytes]]) -> set[bytes] | None:
    """The writes that take no effect among `members` ("access changes win"), or None when
    access changes undo one another (see docs/state.md, rule 5).

    1. A delete anywhere in the past wins outright (None): it was made by the owner on its
       base, nothing can be written on top of it, and so "nothing signed on a branch from before
       a delete brings it back" holds whatever else was signed concurrently.
    2. Another access change is void when an effective access change concurrent with it demoted
       its signer; it is effective when every access change that could void it is void itself.
       Access changes left undecided void one another in a cycle: one owner signed two
       transfers on one version (a double spend). No causal rule can tell which came first, so
       neither party wins: the record is burned (resolves to deleted), and the former owner can
       never take back what they sold.
    3. A write concurrent with an effective access change that demoted its signer is void, and
       so is every access change that is not effective.
    """
    changes = [w for w in members if writes[w].demoted]
    if not changes:
        return set()
    if any(writes[a].value is None for a in changes):
        return None
    related: dict[bytes, set[bytes]] = {}
    for a in changes:
        related[a] = _closure([a], lambda w: writes[w].parents) | _closure([a], children.__getitem__)

    def voids(e: bytes, w: bytes) -> bool:
        return w not in related[e] and writes[w].signer in writes[e].demoted

    candidates = changes
    attackers = {x: [y for y in candidates if y != x and voids(y, x)] for x in candidates}
    verdict: dict[bytes, bool] = {}  # True: effective
    changed = True
    while changed:
        changed = False
        for x in candidates:
            if x in verdict:
                continue
            if any(verdict.get(y) is True for y in attackers[x]):
                verdict[x], changed = False, True
            elif all(verdict.get(y) is False for y in attackers[x]):
                verdict[x], changed = True, True
    if len(verdict) < len(candidates):
        return None
    effective = {x for x, ok in verdict.items() if ok}
    void = {w for w in members if w not in effective and any(voids(e, w) for e in effective)}
    return void | (set(changes) - effective)


def fold(kind: Kind, reg: UserRegister, tops: Iterable[bytes]) -> Any:
    """The record's value at the writes `tops` (see the module doc)."""
    tops = list(tops)
    if not tops:
        return None
    if len(tops) == 1:
        return reg.writes[tops[0]].value
    writes = reg.writes
    members = _closure(tops, lambda w: writes[w].parents)
    children: dict[bytes, list[bytes]] = {w: [] for w in members}
    for w in members:
        for p in writes[w].parents:
            children[p].append(w)
    void = _void_writes(writes, members, children)
    if void is None:
        return None  # deleted, or burned by access changes that undo each other
    pending = {w: len(writes[w].parents) for w in members}
    ready = [(writes[w].clock, w) for w, n in pending.items() if n == 0]
    heapq.heapify(ready)
    state = None
    while ready:
        _, w = heapq.heappop(ready)
        write = writes[w]
        if w not in void:
            try:
                state = kind.user_write(write.intent, reg.key, state)
            except Invalid:
                pass  # refused on this order of events: no effect
            except Exception:  # noqa: BLE001 - the same on every node; the log finds the bug
                log.exception("rule of kind %r raised while resolving", kind.name)
        for c in children[w]:
            pending[c] -= 1
            if pending[c] == 0:
                heapq.heappush(ready, (writes[c].clock, c))
    return state

