"""Byzantine eventual consistency, property-tested (op format 2).

A scenario is generated from a seed: honest nodes relay users' requests (creates, updates,
authorize, transfer, delete), each on the version of the record the relaying node holds, and
write their own node records; nodes sync now and then, so concurrent writes happen between
syncs (accounts have small quotas, so concurrent creates go over them). Then a Byzantine node adds invalid ops (a damaged signature, a node record written by
another node, a stranger's update, a request re-wrapped onto a prev other than its signed base,
a "create" of someone else's record, ops on top of invalid ops), ops that wait forever (a forged
dep) and Byzantine but valid ops (equivocation, re-wraps of earlier requests, an owner's request
relayed on an old version). Fresh replicas receive all of it shuffled, duplicated and in random
batches; every replica must end byte-identical (state_hash and the records table), reject the
same ops for the same reasons, and equal a replica that never saw the invalid ops.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formation.crdt.intents import version_of
from formation.crdt.keys import PrivateKey, format_address, sha256
from formation.crdt.kinds import Invalid
from formation.crdt.op import Op, OpError, decode_op, make_op
from formation.crdt.quotas import Quotas
from formation.crdt.store import Store
from tests.support import TS, Node, User, records_dump

EXAMPLES = int(os.environ.get("FORMATION_PROPERTY_EXAMPLES", "25"))
NOW_MS = (TS + 86_400) * 1000  # every store's clock: a day after the scenario, nothing is held
BYZ_SECRET = b"\x66" * 32
# small enough that concurrent creates go over them: which records are inert must not depend on
# the order ops arrive in either
SMALL_QUOTAS = Quotas(records={"model": 2, "dns": 1, "instance": 2, "agent": 2})


def clock() -> int:
    return NOW_MS


@dataclass
class Relayed:
    """A user's request an honest node accepted, and the op that carried it."""

    user: User
    method: str
    path: str
    body: dict | None
    ts: int
    base: str
    op: Op

    @property
    def signed(self) -> tuple[str, bytes, bytes]:
        return self.user.request(self.method, self.path, self.body, ts=self.ts, base=self.base)


class Scenario:
    def __init__(self, seed: int, steps: int = 40):
        rnd = self.rnd = random.Random(seed)
        self.nodes = [Node(Store(clock=clock, quotas=SMALL_QUOTAS), secret=bytes([i + 1]) * 32) for i in range(3)]
        self.users = [User(bytes([i + 10]) * 32) for i in range(3)]
        self.ids: list[tuple[str, str]] = []  # (kind, id) of every record created
        self.relayed: list[Relayed] = []
        ts = TS
        # A fixed start, so every scenario has a record with an update on it.
        self._relay(self.nodes[0], self.users[0], "POST", "/v1/models", {"name": "first", "tags": ["llm"]}, ts)
        self._relay(self.nodes[0], self.users[0], "PUT", f"/v1/models/{self.ids[0][1]}", {"description": "d"}, ts)
        for _ in range(steps):
            ts += rnd.choice([0, 1, 1, 2])  # equal signed times happen
            node = rnd.choice(self.nodes)
            action = rnd.random()
            if action < 0.2:
                a, b = rnd.sample(self.nodes, 2)
                b.store.ingest(list(a.store.all_wires()))
                if rnd.random() < 0.5:
                    a.store.ingest(list(b.store.all_wires()))
            elif action < 0.3:
                node.heartbeat(ts)
            else:
                self._user_action(node, ts)
        self.ts = ts
        self.honest = [w for n in self.nodes for w in n.store.all_wires()]
        self.invalid: dict[bytes, str] = {}  # decodable invalid op wire -> the code it must get
        self.undecodable: dict[bytes, str] = {}  # wire the decoder refuses -> its code
        self.valid_extra: list[bytes] = []  # Byzantine but valid: they may change the state
        self.same_write: list[bytes] = []  # re-wraps of delivered requests: accepted, change nothing
        self.pending_forever: list[bytes] = []
        self._byzantine()

    def _relay(self, node: Node, user: User, method: str, path: str, body, ts: int) -> None:
        try:
            op = node.relay(user, method, path, body, ts=ts)
        except Invalid:
            return  # refused by the rules on this node's version: not stored
        base = _base_of(op)
        self.relayed.append(Relayed(user, method, path, body, ts, base, op))
        if not base:
            self.ids.append((op.kind, op.key))

    def _user_action(self, node: Node, ts: int) -> None:
        rnd = self.rnd
        user = rnd.choice(self.users)
        known = [(k, i) for k, i in self.ids if (k, i) in node.store.registers]
        live = [(k, i) for k, i in known if node.store.get(k, i) is not None]
        if not known or rnd.random() < 0.15:
            if rnd.random() < 0.7:
                req = ("POST", "/v1/models", {"name": f"m{rnd.randrange(99)}", "tags": ["llm"]})
            else:
                req = ("POST", "/v1/dns/create", {"domain": f"h{rnd.randrange(9)}.fog", "targets": ["10.0.0.1"]})
        else:
            kind, rid = rnd.choice(live if live and rnd.random() < 0.9 else known)
            value = node.store.get(kind, rid)
            if value is not None and rnd.random() < 0.7:  # mostly someone with rights on it
                allowed = [value["owner"], *value["authorized"]]
                user = rnd.choice([u for u in self.users if u.address in allowed] or [user])
            base = "/v1/models" if kind == "model" else "/v1/dns"
            other = rnd.choice(self.users).address
            update = ({"description": f"d{rnd.randrange(99)}"} if kind == "model"
                      else {"ttl": rnd.randrange(1, 999)})
            req = rnd.choice([
                ("PUT", f"{base}/{rid}", update) if kind == "model" else ("POST", f"{base}/{rid}/update", update),
                ("PUT", f"{base}/{rid}", update) if kind == "model" else ("POST", f"{base}/{rid}/update", update),
                ("POST", f"{base}/{rid}/authorize",
                 {"address": other, "level": rnd.choice(["manager", "operator", "read_only", None])}),
                ("POST", f"{base}/{rid}/transfer", {"to": other}),
                ("DELETE", f"{base}/{rid}", None) if kind == "model" else ("POST", f"{base}/{rid}/delete", None),
            ])
        self._relay(node, user, *req, ts)

    def _byzantine(self) -> None:
        rnd = self.rnd
        byz = Node(Store(clock=clock, quotas=SMALL_QUOTAS), secret=BYZ_SECRET)
        victim = self.nodes[0]
        view = Store(clock=clock, quotas=SMALL_QUOTAS)
        assert view.ingest(self.honest).rejected == []
        heads = view.heads()
        hlc = max(m.hlc for m in view.ops.values()) + 1
        stranger = User(b"\x77" * 32)
        ts = self.ts + 5

        def op(kind, key, **kw):
            kw.setdefault("deps", heads)
            kw.setdefault("hlc", hlc)
            return make_op(byz.key, kind, key, **kw)

        def carriers(kind: str, key: str) -> list[bytes]:
            reg = view.registers[(kind, key)]
            return sorted(reg.writes[w].carrier for w in reg.heads)

        # 1. an honest op with its signature damaged (r changed: recovers to someone else)
        body, sig = msgpack.unpackb(rnd.choice(self.honest))
        self.undecodable[msgpack.packb([body, sig[:5] + bytes([sig[5] ^ 0x40]) + sig[6:]])] = "bad_signature"
        # 2. a node record written by another node
        wrong_node = op("node", victim.address, value={"address": victim.address})
        self.invalid[wrong_node.wire] = "unauthorized"
        # 3. a stranger's update of a live record, on its current version
        live = [(k, i) for k, i in self.ids if view.get(k, i) is not None and k == "model"]
        strangers_update = None
        if live:
            kind, rid = rnd.choice(live)
            m, b, s = stranger.request("PUT", f"/v1/models/{rid}", {"description": "pwned"}, ts=ts,
                                       base=view.record_version(kind, rid))
            strangers_update = op(kind, rid, prev=carriers(kind, rid), request=(m, b, s))
            self.invalid[strangers_update.wire] = "unauthorized"
        # 4. re-wraps of earlier requests (new op, other deps and clock, same signed request on
        #    carriers of the same writes): the same write, nothing changes
        for r in rnd.sample(self.relayed, min(3, len(self.relayed))):
            deps = rnd.choice([heads, list(r.op.prev), [rnd.choice(heads)]])
            again = op(r.op.kind, r.op.key, deps=deps, prev=r.op.prev, hlc=hlc + rnd.randrange(1, 5),
                       request=r.signed)
            assert again.id != r.op.id
            self.same_write.append(again.wire)
        # 5. a request re-wrapped onto a prev other than the version it signed
        for r in self.relayed:
            now = carriers(r.op.kind, r.op.key)
            if sorted(r.op.prev) != now:
                self.invalid[op(r.op.kind, r.op.key, prev=now, request=r.signed).wire] = "bad_prev"
                break
        else:
            raise AssertionError("the fixed start makes a request on an older version")
        #    and one never delivered before: only the version it signed tells
        first = next(r for r in self.relayed if not r.base and r.op.kind == "model")
        after_create = version_of([first.op.request.write_id])
        m, b, s = first.user.request("PUT", f"/v1/models/{first.op.key}", {"tags": ["elsewhere"]}, ts=first.ts,
                                     base=after_create)
        elsewhere = carriers("model", first.op.key)
        if elsewhere == [first.op.id]:
            elsewhere = []
        self.invalid[op("model", first.op.key, prev=elsewhere, request=(m, b, s)).wire] = "bad_prev"
        # 6. a forged dep: names an op nobody has; it waits forever
        ghost = bytes(rnd.randrange(256) for _ in range(32))
        self.pending_forever.append(op("node", byz.address, deps=[*heads, ghost],
                                       value={"address": byz.address}).wire)
        # 7. equivocation: two different ops, same author, deps, clock and record
        for beat in (1, 2):
            self.valid_extra.append(op("node", byz.address, value={"address": byz.address, "heartbeat": beat}).wire)
        # 8. a "create" of someone else's record: naming its id, or carried under its key
        kind, rid = self.ids[0]
        m, b, s = stranger.request("POST", "/v1/models", {"model_id": rid, "name": "stolen"}, ts=ts)
        self.invalid[op("model", rid, request=(m, b, s)).wire] = "bad_field"
        m, b, s = stranger.request("POST", "/v1/models", {"name": "stolen"}, ts=ts + 1)
        self.invalid[op("model", rid, request=(m, b, s)).wire] = "bad_key"
        # 9. ops on top of invalid ops are invalid too
        self.invalid[make_op(byz.key, "node", byz.address, deps=[wrong_node.id], hlc=hlc + 9,
                             value={"address": byz.address}).wire] = "bad_dep"
        if strangers_update is not None:
            m, b, s = stranger.request("PUT", f"/v1/models/{rid}", {"description": "again"}, ts=ts + 2)
            self.invalid[make_op(byz.key, "node", byz.address, deps=[strangers_update.id], hlc=hlc + 9,
                                 value={"address": byz.address, "heartbeat": 9}).wire] = "bad_dep"
        # 10. valid but late: the creator's request signed on the version right after its create,
        #     relayed only now (concurrent with everything since)
        m, b, s = first.user.request("PUT", f"/v1/models/{first.op.key}", {"tags": ["late"]}, ts=first.ts,
                                     base=after_create)
        self.valid_extra.append(op("model", first.op.key, prev=[first.op.id], request=(m, b, s)).wire)

    def all_ops(self) -> list[bytes]:
        return (self.honest + list(self.invalid) + list(self.undecodable) + self.valid_extra + self.same_write
                + self.pending_forever)


def _base_of(op: Op) -> str:
    path = op.request.message.split(" ")[1]
    return path.partition("?base=")[2]


def deliver(wires: list[bytes], rnd: random.Random) -> Store:
    """A fresh replica fed the ops shuffled, partly duplicated, in random batches."""
    ops = wires + rnd.sample(wires, k=len(wires) // 3)
    rnd.shuffle(ops)
    store = Store(clock=clock, quotas=SMALL_QUOTAS)
    i = 0
    while i < len(ops):
        n = rnd.randint(1, 8)
        store.ingest(ops[i:i + n], source=rnd.choice(["p1", "p2"]))
        i += n
    return store


def rejected(store: Store) -> dict[bytes, str]:
    return {i: r.code for i, r in store.replica.rejected.items()}


def fed(wires: list[bytes]) -> Store:
    store = Store(clock=clock, quotas=SMALL_QUOTAS)
    res = store.ingest(wires)
    assert res.rejected == [] and res.pending == 0
    return store


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), orders=st.lists(st.integers(0, 2**32 - 1), min_size=3, max_size=3))
def test_any_order_any_duplication_same_state(seed, orders):
    sc = Scenario(seed)
    replicas = [deliver(sc.all_ops(), random.Random(o)) for o in orders]
    reference = replicas[0]
    for r in replicas[1:]:
        assert r.state_hash() == reference.state_hash()
        assert records_dump(r) == records_dump(reference)  # byte-identical projection
        assert set(r.ops) == set(reference.ops)
        assert rejected(r) == rejected(reference)  # the same ops, for the same reasons
        assert r.pending_count == reference.pending_count == len(sc.pending_forever)
    # every invalid op is rejected with its reason; the rest is delivered
    invalid = {decode_op(w).id: code for w, code in sc.invalid.items()}
    assert rejected(reference) == invalid
    for w in sc.undecodable:
        assert not reference.has(sha256(w))
    with_extra = fed(sc.honest + sc.valid_extra)
    everything = fed(sc.honest + sc.valid_extra + sc.same_write)
    assert set(reference.ops) == set(everything.ops)
    assert len(everything) == len(with_extra) + len(sc.same_write)
    # the invalid ops changed nothing, nor did the re-wraps: the same state as a replica that
    # never saw either
    for other in (everything, with_extra):
        assert reference.state_hash() == other.state_hash()
        assert records_dump(reference) == records_dump(other)


def test_honest_nodes_converge_after_syncing():
    sc = Scenario(seed=5, steps=60)
    for a in sc.nodes:
        for b in sc.nodes:
            if a is not b:
                b.store.ingest(list(a.store.all_wires()))
    reference = fed(sc.honest)
    for n in sc.nodes:
        assert n.store.state_hash() == reference.state_hash()
        assert records_dump(n.store) == records_dump(reference)
    # concurrency really happened: some record has (or had) more than one head
    assert any(len(reg.heads) > 1 or any(len(w.parents) > 1 for w in reg.writes.values())
               for reg in reference.registers.values() if hasattr(reg, "writes"))


def test_invalid_ops_are_rejected_with_their_reason():
    sc = Scenario(seed=7, steps=60)
    store = fed(sc.honest)
    res = store.ingest(list(sc.invalid) + list(sc.undecodable))
    assert res.accepted == []
    assert sorted(r.code for r in res.rejected) == sorted([*sc.invalid.values(), *sc.undecodable.values()])
    assert {"bad_signature", "unauthorized", "bad_prev", "bad_field", "bad_key", "bad_dep"} <= {
        r.code for r in res.rejected}
    for w, code in sc.undecodable.items():
        try:
            decode_op(w)
        except OpError as exc:
            assert exc.code == code
        else:
            raise AssertionError("a damaged signature must not verify")
    assert store.state_hash() == fed(sc.honest).state_hash()
    # the forged dep waits, and is fetched for, and nothing else
    res = store.ingest(sc.pending_forever)
    assert res.accepted == [] and res.rejected == [] and res.pending == 1
    assert len(store.missing()) == 1


def test_rewrapped_request_is_the_same_write():
    sc = Scenario(seed=9)
    store = fed(sc.honest + sc.valid_extra)
    before, dump, n = store.state_hash(), records_dump(store), len(store)
    res = store.ingest(sc.same_write)
    assert len(res.accepted) == len(sc.same_write) and res.rejected == []
    assert store.state_hash() == before and records_dump(store) == dump and len(store) == n + len(sc.same_write)
    # and a re-wrap that arrives before the op it copies is the write itself
    first = Store(clock=clock, quotas=SMALL_QUOTAS)
    assert first.ingest(sc.same_write[:1] + sc.honest + sc.valid_extra + sc.same_write[1:]).rejected == []
    assert first.state_hash() == before


def test_equivocating_author_cannot_split_replicas():
    sc = Scenario(seed=11)
    a, b = Store(clock=clock, quotas=SMALL_QUOTAS), Store(clock=clock, quotas=SMALL_QUOTAS)
    a.ingest(sc.honest + sc.valid_extra)
    b.ingest(sc.honest + list(reversed(sc.valid_extra)))
    assert a.state_hash() == b.state_hash()
    # both equivocating ops are kept as siblings and the same one wins everywhere
    byz = format_address(PrivateKey(BYZ_SECRET).address)
    assert len(a.registers[("node", byz)].heads) == 2
    assert a.siblings("node", byz) == b.siblings("node", byz)


def test_create_cannot_take_over_an_existing_record():
    sc = Scenario(seed=3, steps=50)
    store = fed(sc.honest)
    kind, rid = sc.ids[0]
    before = store.get(kind, rid), store.record_version(kind, rid)
    res = store.ingest(list(sc.invalid))
    assert res.accepted == []
    assert (store.get(kind, rid), store.record_version(kind, rid)) == before
