"""Hostile ops from a node that signs whatever it likes, through every path an op can take.

An attacker holds a node key (and a user key, Mallory). It sends ops with deps empty, old,
foreign or made up; clocks at and around every bound; records of other users and other nodes;
other users' signed requests re-wrapped onto other states; request bodies with duplicate keys,
lone surrogates, bidi and control characters, nesting and sizes at and over every limit.

Each op goes, on copies of one honest world, through the three paths into a store:
  local   `op.make_op` (which decodes its own wire) then `ingest_ops(source="local")`, and for a
          user's request signed on a version this node holds also `Store.write_request`;
  gossip  `gossip.encode_batch` / `decode_batch` then `ingest_ops(source="peer")`;
  sync    `Store.ingest([wire], source="peer")`.
The verdict (accepted / rejected with a code / held / pending / dropped) must be the same on
every path and the one an independent oracle predicts; afterwards (and after the missing deps
arrive and the clock moves on) the stores are byte-identical, no honest record changed owner,
content or access, the node keeps writing, and each store reopened from its file loads the
same state and keeps writing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formation.crdt import codec
from formation.crdt.hlc import MAX_HLC, MAX_TS, from_ms, to_ms
from formation.crdt.intents import MAX_BODY, version_of
from formation.crdt.keys import PrivateKey, eip191_hash, format_address, parse_signature, sha256
from formation.crdt.kinds import Invalid, get_kind
from formation.crdt.op import MAX_MESSAGE_LEN, MAX_OP_BYTES, OpError, decode_op, make_op
from formation.crdt.replica import Limits
from formation.crdt.schema import NAME
from formation.crdt.store import Store
from formation.crdt.strict import text_problem
from formation.p2p.gossip import BatchError, decode_batch, encode_batch
from tests.support import TS, Node, User, raw_op_wire, records_dump

EXAMPLES = int(os.environ.get("FORMATION_PROPERTY_EXAMPLES", "25"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

N0_SECRET, N1_SECRET, X_SECRET, F_SECRET = b"\x01" * 32, b"\x02" * 32, b"\x66" * 32, b"\x33" * 32
NOW_MS = (TS + 3600) * 1000  # every store's clock: an hour after the world was written
LATER_MS = NOW_MS + 20 * 60_000  # the clock when held ops are due and stale pending ones expired
LIMITS = Limits()
HELD_HLC = from_ms(NOW_MS + 10 * 60_000)  # beyond max_future_ms, within hold_horizon_ms
HUGE_HLC = from_ms(NOW_MS + 10 * 365 * 86_400_000)  # beyond the hold horizon
X = PrivateKey(X_SECRET)  # the attacker's node key
X_ADDR = format_address(X.address)
ALICE, BOB, CAROL, MALLORY, SIDEKICK = (User(bytes([i]) * 32) for i in range(0x0A, 0x0F))


def clock() -> int:
    return NOW_MS


ACCEPTED = ("accepted",)
HELD = ("held",)
PENDING = ("pending",)
DROPPED = ("dropped",)
ABSENT = ("absent",)


def rejected(code: str) -> tuple[str, str]:
    return ("rejected", code)


# ---- the honest world -------------------------------------------------------------------------

@dataclass(frozen=True)
class Req:
    """A user's signed request and the record it writes."""

    label: str
    kind: str
    key: str
    message: str
    body: bytes
    sig: bytes  # 65 bytes, recid 0/1

    @property
    def signed(self) -> tuple[str, bytes, bytes]:
        return self.message, self.body, self.sig

    @property
    def base(self) -> str:
        return self.message.split(" ")[1].partition("?base=")[2]

    @property
    def write_id(self) -> bytes:
        return sha256(self.sig)


def req_of(label: str, kind: str, key: str, signed) -> Req:
    m, b, s = signed
    return Req(label, kind, key, m, b, parse_signature(s))


@dataclass
class World:
    template: str  # a closed op log holding the world: each store starts as a copy of it
    store: Store  # the world, for reading
    ids: dict[str, str]  # "A" alice's model, "M" mallory's, "dns" and "agent" carol's
    signed: list[Req]  # requests the world holds
    presigned: list[tuple[Req, tuple]]  # Mallory's, signed while she was a manager, never relayed; what
    # the rules say of each where she signed it
    refused: Req  # bob's transfer of A: refused on the version it names
    protected: dict[tuple[str, str], Any]  # every honest record's value
    foreign: bytes  # an op of another fog, that arrives late
    heads: list[bytes] = field(default_factory=list)

    def hlc(self, op_id: bytes) -> int | None:
        if op_id == sha256(self.foreign):
            return FOREIGN_HLC
        meta = self.store.op_meta(op_id)
        return None if meta is None else meta.hlc

    def carriers(self, kind: str, key: str, version: str | None = None) -> list[bytes]:
        reg = self.store.registers[(kind, key)]
        writes = reg.heads if version is None else reg.versions[version]
        return sorted(reg.writes[w].carrier for w in writes)

    def node_heads(self, address: str) -> list[bytes]:
        return self.store.registers[("node", address)].head_ids


FOREIGN_HLC = from_ms(TS * 1000 + 5_000)


def _build_world(directory: str) -> World:
    n0, n1 = Node(Store(clock=clock), secret=N0_SECRET), Node(Store(clock=clock), secret=N1_SECRET)
    x = Node(Store(clock=clock), secret=X_SECRET)
    signed: list[Req] = []
    ts = iter(range(TS, TS + 1000))

    def relay(node: Node, user: User, method: str, path: str, body=None, label: str = "") -> str:
        op = node.relay(user, method, path, body, ts=next(ts))
        r = op.request
        signed.append(Req(label or f"{method} {path}", op.kind, op.key, r.message, r.body, r.signature))
        return op.key

    def sync(a: Node, b: Node) -> None:
        b.store.ingest(list(a.store.all_wires()))
        a.store.ingest(list(b.store.all_wires()))

    for n in (n0, n1, x):
        n.heartbeat(1)
    sync(n0, x)
    sync(n0, n1)
    relay(n0, ALICE, "POST", "/v1/account/create", {"name": "Alice"})
    a = relay(n0, ALICE, "POST", "/v1/models", {"name": "alpha", "tags": ["llm"]})
    relay(n0, ALICE, "POST", f"/v1/models/{a}/authorize", {"address": BOB.address, "level": "manager"})
    relay(n0, ALICE, "POST", f"/v1/models/{a}/authorize", {"address": MALLORY.address, "level": "manager"})
    v_mallory = n0.store.record_version("model", a)
    # Mallory signs requests on this version while she is a manager; they are relayed only later,
    # after her revocation: concurrent with it, so void (or refused where she signed them)
    presigned = [
        (req_of("mallory's edit", "model", a, MALLORY.request(
            "PUT", f"/v1/models/{a}", {"license": "mallory's"}, ts=next(ts), base=v_mallory)), ACCEPTED),
        (req_of("mallory's grant", "model", a, MALLORY.request(
            "POST", f"/v1/models/{a}/authorize", {"address": SIDEKICK.address, "level": "operator"},
            ts=next(ts), base=v_mallory)), ACCEPTED),
        (req_of("mallory's delete", "model", a, MALLORY.request(
            "DELETE", f"/v1/models/{a}", None, ts=next(ts), base=v_mallory)), rejected("unauthorized")),
        (req_of("mallory's transfer", "model", a, MALLORY.request(
            "POST", f"/v1/models/{a}/transfer", {"to": MALLORY.address}, ts=next(ts), base=v_mallory)),
         rejected("unauthorized")),
    ]
    relay(n0, BOB, "PUT", f"/v1/models/{a}", {"description": "by bob"})
    relay(n0, ALICE, "POST", f"/v1/models/{a}/authorize", {"address": MALLORY.address, "level": None})
    sync(n0, n1)
    dns = relay(n1, CAROL, "POST", "/v1/dns/create", {"domain": "carol.fog", "targets": ["10.0.0.7"]})
    agent = relay(n1, CAROL, "POST", "/v1/agents", {"name": "helper"})
    m = relay(n1, MALLORY, "POST", "/v1/models", {"name": "mine"})
    sync(n0, n1)
    relay(n0, ALICE, "PUT", f"/v1/models/{a}", {"tags": ["llm", "a"]})  # concurrent with the next
    relay(n1, BOB, "PUT", f"/v1/models/{a}", {"description": "bob again"})
    sync(n0, n1)
    relay(n1, CAROL, "POST", f"/v1/dns/{dns}/update", {"ttl": 300})
    sync(n0, n1)
    sync(n0, x)
    refused = req_of("bob's transfer", "model", a, BOB.request(
        "POST", f"/v1/models/{a}/transfer", {"to": BOB.address}, ts=next(ts),
        base=n0.store.record_version("model", a)))
    wires = list(n0.store.all_wires())
    template = os.path.join(directory, "world.db")
    t = Store(template, clock=clock)
    assert t.ingest(wires).rejected == []
    t.close()
    world = Store(clock=clock)
    world.ingest(wires)
    assert world.state_hash() == n0.store.state_hash() == n1.store.state_hash()
    # A ends with two concurrent heads (alice's and bob's last edits), mallory no longer on it
    assert len(world.registers[("model", a)].heads) == 2
    assert world.get("model", a)["authorized"] == {BOB.address: "manager"}
    foreign = make_op(PrivateKey(F_SECRET), "node", format_address(PrivateKey(F_SECRET).address), deps=[],
                      hlc=FOREIGN_HLC, value={"address": format_address(PrivateKey(F_SECRET).address)}).wire
    protected = {k: world.get(*k) for k in world.registers if k not in {("node", X_ADDR), ("model", m)}}
    return World(template, world, {"A": a, "M": m, "dns": dns, "agent": agent}, signed, presigned, refused,
                 protected, foreign, world.heads())


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return _build_world(str(tmp_path_factory.mktemp("world")))


# ---- a hostile op and what it must get --------------------------------------------------------

@dataclass
class Case:
    label: str
    kind: str
    key: str
    deps: list[bytes]
    prev: list[bytes]
    hlc: int
    value: Any = None
    request: tuple | None = None
    content: tuple | None = None  # what the rules say once it is delivered
    decode: tuple | None = None  # what the decoder says, if it refuses it
    missing: str = ""  # "foreign": its deps arrive later; "random": they never do
    relayable: bool = False  # a user's request on a version the world holds: Store.write_request too

    def wire(self) -> bytes:
        return raw_op_wire(X, self.kind, self.key, deps=self.deps, prev=self.prev, hlc=self.hlc,
                           value=self.value, request=self.request)

    def make(self):
        kw = {"request": self.request} if self.request is not None else {"value": self.value}
        return make_op(X, self.kind, self.key, deps=self.deps, prev=self.prev, hlc=self.hlc, **kw)

    @property
    def signed_ms(self) -> int:
        return int(self.request[0].split(" ")[2]) * 1000 if self.request is not None else 0


def expected(case: Case, world: World) -> tuple:
    """The oracle: what every path must answer when the op arrives (at NOW_MS)."""
    if case.decode == rejected("too_large"):
        return case.decode
    if not 1 <= case.hlc <= MAX_HLC:
        return rejected("malformed")
    if case.decode is not None:
        return case.decode
    not_before = max(to_ms(case.hlc), case.signed_ms)
    if case.missing or not_before > NOW_MS + LIMITS.max_future_ms:
        if not_before > NOW_MS + LIMITS.hold_horizon_ms:
            return DROPPED
        return PENDING if case.missing else HELD
    return delivered(case, world)


def delivered(case: Case, world: World) -> tuple:
    if get_kind(case.kind) is None:
        return rejected("unknown_kind")
    dep_hlcs = [world.hlc(d) for d in set(case.deps) | set(case.prev)]
    if dep_hlcs and case.hlc <= max(dep_hlcs):
        return rejected("bad_clock")
    assert case.content is not None, case.label
    return case.content


def expected_later(case: Case, world: World, first: tuple) -> tuple:
    """Its state after the foreign op arrived and the clock moved to LATER_MS."""
    if first[0] == "rejected":
        return ABSENT if case.decode is not None or not 1 <= case.hlc <= MAX_HLC else first
    if first == DROPPED:
        return ABSENT
    if first == PENDING and case.missing == "random":
        return ABSENT  # expired: its deps never came within pending_ttl_ms
    if first in (HELD, PENDING):
        not_before = max(to_ms(case.hlc), case.signed_ms)
        if not_before > LATER_MS + LIMITS.max_future_ms:
            return HELD
        return delivered(case, world)
    return first


# ---- the three paths --------------------------------------------------------------------------

def verdict(res, op_id: bytes) -> tuple:
    """The verdict of an ingest of exactly one op."""
    if res.rejected:
        assert len(res.rejected) == 1 and res.accepted == [], res
        return rejected(res.rejected[0].code)
    if res.accepted:
        assert res.accepted == [op_id], res
        return ACCEPTED
    if res.dropped:
        return DROPPED
    if res.held:
        return HELD
    if res.pending:
        return PENDING
    raise AssertionError(f"no verdict in {res}")


def status(store: Store, op_id: bytes) -> tuple:
    """Where the op is now, read from the store itself."""
    if store.has(op_id):
        return ACCEPTED
    if op_id in store.replica.rejected:
        return rejected(store.replica.rejected[op_id].code)
    entry = store.replica.pending.entries.get(op_id)
    if entry is not None:
        return HELD if entry.need == 0 else PENDING
    return ABSENT


def status_of(first: tuple, decoded: bool) -> tuple:
    """The status a first verdict leaves behind."""
    if first == DROPPED or (first[0] == "rejected" and not decoded):
        return ABSENT
    return first


_BATCH_CODE = re.compile(r"^op in gossip batch: (\w+): ")


def gossip_code(exc: BatchError, wire: bytes) -> str:
    got = _BATCH_CODE.match(str(exc))
    if got:
        return got.group(1)
    # decode_batch checks the size of each op before decoding it: its one refusal with no code
    assert str(exc) == "a gossip batch holds op byte strings" and len(wire) > MAX_OP_BYTES, exc
    return "too_large"


def open_copy(world: World, path: str) -> Store:
    shutil.copyfile(world.template, path)
    return Store(path, clock=clock, synchronous="OFF")


def check_same(stores: dict[str, Store]) -> None:
    ref_name, ref = next(iter(stores.items()))
    for name, s in stores.items():
        assert s.state_hash() == ref.state_hash(), (name, ref_name)
        assert records_dump(s) == records_dump(ref), (name, ref_name)


N0_ADDR = format_address(PrivateKey(N0_SECRET).address)


def check_honest_records(world: World, store: Store, *, beat: bool = False) -> None:
    """Every honest record as it was (`beat`: but the node record N0 has written since)."""
    for (kind, key), value in world.protected.items():
        if beat and (kind, key) == ("node", N0_ADDR):
            assert store.get(kind, key)["heartbeat"] in (7, 8)
            continue
        assert store.get(kind, key) == value, f"{kind} {key} changed"


def run_case(world: World, case: Case) -> tuple[tuple, tuple]:
    wire = case.wire()
    op_id = sha256(wire)
    first = expected(case, world)
    with tempfile.TemporaryDirectory() as d:
        stores = {p: open_copy(world, os.path.join(d, f"{p}.db")) for p in ("local", "gossip", "sync")}
        verdicts = {}
        # (a) local: the node signs it with make_op, which decodes its own wire
        try:
            op = case.make()
        except OpError as exc:
            verdicts["local"] = rejected(exc.code)
        else:
            assert op.wire == wire and op.id == op_id
            verdicts["local"] = verdict(stores["local"].ingest_ops([op], source="local"), op_id)
        # (b) gossip
        try:
            ops = decode_batch(encode_batch([wire]))
        except BatchError as exc:
            verdicts["gossip"] = rejected(gossip_code(exc, wire))
        else:
            assert [o.id for o in ops] == [op_id]
            verdicts["gossip"] = verdict(stores["gossip"].ingest_ops(ops, source="peer"), op_id)
        # (c) sync
        verdicts["sync"] = verdict(stores["sync"].ingest([wire], source="peer"), op_id)
        # a user's request relayed by an honest node on the version it names: same verdict
        if case.relayable:
            stores["relay"] = open_copy(world, os.path.join(d, "relay.db"))
            try:
                stores["relay"].write_request(PrivateKey(N0_SECRET), *case.request, now_ms=NOW_MS)
                verdicts["relay"] = ACCEPTED
            except OpError as exc:
                verdicts["relay"] = rejected(exc.code)
        assert set(verdicts.values()) == {first}, (case.label, verdicts, first)
        decoded = case.decode is None and 1 <= case.hlc <= MAX_HLC
        for p in ("local", "gossip", "sync"):
            assert status(stores[p], op_id) == status_of(first, decoded), p
        after(world, stores)
        # its deps arrive (or never do), the clock moves on
        later = expected_later(case, world, first)
        for s in stores.values():
            s.ingest([world.foreign], source="peer")
            s.tick(LATER_MS)
        for p in ("local", "gossip", "sync"):
            assert status(stores[p], op_id) == later, (case.label, p, later)
        after(world, stores)
        # the node keeps writing, and so does each store reopened from its file
        for s in stores.values():
            Node(s, secret=N0_SECRET).heartbeat(7)
        # (the relay store's op graph holds N0's op instead of the attacker's: its heartbeat differs)
        check_same({p: stores[p] for p in ("local", "gossip", "sync")})
        for name, s in stores.items():
            h, dump = s.state_hash(), records_dump(s)
            s.close()
            again = Store(os.path.join(d, f"{name}.db"), clock=clock)
            assert (again.state_hash(), records_dump(again)) == (h, dump), name
            check_honest_records(world, again, beat=True)
            beat = Node(again, secret=N0_SECRET)
            beat.now = LATER_MS
            assert again.has(beat.heartbeat(8).id)
            again.close()
    return first, later


def after(world: World, stores: dict[str, Store]) -> None:
    check_same(stores)
    for s in stores.values():
        check_honest_records(world, s)


# ---- generating cases -------------------------------------------------------------------------

# weighted towards a clean envelope, so that the rules' verdicts get compared as often as the core's
DEPS_MODES = ["heads", "heads", "heads", "old", "empty", "foreign", "random"]
HLC_MODES = ["next"] * 6 + ["equal", "zero", "one", "held", "huge", "max", "max+1", "int64"]


def envelope(world: World, deps_mode: str, hlc_mode: str, prev: list[bytes], ghost: bytes):
    """(deps, hlc, missing) for a deps mode and a clock mode."""
    deps = {"heads": world.heads, "old": [first_op(world)],
            "empty": [], "foreign": [sha256(world.foreign)], "random": [ghost]}[deps_mode]
    deps = sorted(set(deps) | set(prev))
    known = [h for h in (world.hlc(d) for d in deps) if h is not None]
    top = max(known, default=0)
    hlc = {"next": top + 1, "equal": top or 1, "zero": 0, "one": 1, "held": max(HELD_HLC, top + 1),
           "huge": HUGE_HLC, "max": MAX_HLC, "max+1": MAX_HLC + 1, "int64": 2**63 - 1}[hlc_mode]
    missing = {"foreign": "foreign", "random": "random"}.get(deps_mode, "")
    return deps, hlc, missing


def first_op(world: World) -> bytes:
    return world.store.replica.by_seq[0]


BAD_CHARS = ["\x00", "\x07", "\x1b", "\x7f", "\x85", "\u061c", "\u200e", "\u200f", "\u202a", "\u202e",
             "\u2066", "\u2069"]


def node_family(world: World, name: str, n: int) -> dict:
    """A node payload the attacker signs: (kind, key, prev, value, content[, decode])."""
    a, n0 = world.ids["A"], format_address(PrivateKey(N0_SECRET).address)
    own = world.node_heads(X_ADDR)
    if name == "own_beat":
        content = ACCEPTED if n <= 2**62 else rejected("bad_field")
        return dict(kind="node", key=X_ADDR, prev=own, value={"address": X_ADDR, "heartbeat": n}, content=content)
    if name == "own_sibling":
        return dict(kind="node", key=X_ADDR, prev=[], value={"address": X_ADDR, "heartbeat": 3}, content=ACCEPTED)
    if name == "own_tombstone":
        return dict(kind="node", key=X_ADDR, prev=own, value=None, content=ACCEPTED)
    if name == "other_node":
        return dict(kind="node", key=n0, prev=world.node_heads(n0), value={"address": n0},
                    content=rejected("unauthorized"))
    if name == "other_status":
        return dict(kind="instance_status", key=f"{a}@{n0}", prev=[],
                    value={"instance_id": a, "node": n0, "state": "failed"}, content=rejected("unauthorized"))
    if name == "bad_text":
        return dict(kind="node", key=X_ADDR, prev=own, value={"address": X_ADDR, "region": "eu" + BAD_CHARS[n % 12]},
                    content=rejected("bad_field"))
    if name == "deep":
        d = codec.MAX_DEPTH - 5 + n % 6  # innermost value at body depth MAX_DEPTH - 2 .. MAX_DEPTH + 3
        return deep_value(d)
    if name == "model_by_node":
        return dict(kind="model", key=a, prev=world.carriers("model", a), value={"name": "x"},
                    content=rejected("unauthorized"))
    if name == "unknown_kind":
        return dict(kind="spaceship", key="x", prev=[], value={}, content=None)
    if name == "bidi_key":
        return dict(kind="node", key=X_ADDR + BAD_CHARS[n % 12], prev=[], value={"address": X_ADDR},
                    decode=rejected("malformed"))
    raise AssertionError(name)


def nest(depth: int):
    v: Any = 0
    for _ in range(depth):
        v = [v]
    return v


def deep_value(d: int) -> dict:
    """An own node record with a field nested `d` lists deep. In the op body (array) the payload
    (array) holds the value (map) holding the lists: the innermost 0 sits at depth 3 + d."""
    decodable = 3 + d <= codec.MAX_DEPTH
    return dict(kind="node", key=X_ADDR, prev=[], value={"address": X_ADDR, "x": nest(d)},
                content=rejected("bad_field") if decodable else None,
                decode=None if decodable else rejected("malformed"))


def wrapped(world: World, r: Req, prev: list[bytes], rule: tuple) -> tuple:
    """What the core says of request `r` carried on `prev`; `rule` = what its kind says."""
    metas = [world.store.op_meta(p) for p in prev]
    if any(m.kind != r.kind or m.key != r.key or m.write_id is None for m in metas):
        return rejected("bad_prev")
    parents = {m.write_id for m in metas}
    if version_of(parents) != r.base:
        return rejected("bad_prev")
    reg = world.store.registers.get((r.kind, r.key))
    known = reg.writes.get(r.write_id) if reg is not None else None
    if known is not None:
        return ACCEPTED if set(known.parents) == parents else rejected("bad_prev")
    return rule


PREV_MODES = ["signed", "signed", "current", "empty", "older", "other_record", "node_op"]


def prev_for(world: World, r: Req, mode: str) -> list[bytes]:
    if mode == "signed":
        return world.carriers(r.kind, r.key, r.base)
    if mode == "current":
        return world.carriers(r.kind, r.key)
    if mode == "empty":
        return []
    if mode == "older":
        reg = world.store.registers[(r.kind, r.key)]
        create = next(w for w in reg.writes.values() if not w.parents)
        return [create.carrier]
    if mode == "other_record":
        return world.carriers("dns", world.ids["dns"]) if r.kind != "dns" else world.carriers("model", world.ids["A"])
    if mode == "node_op":
        return world.node_heads(X_ADDR)
    raise AssertionError(mode)


def user_family(world: World, name: str, n: int, prev_mode: str) -> dict:
    a, m = world.ids["A"], world.ids["M"]

    def create(body: dict, ts: int = TS + 500):
        sig = MALLORY.request("POST", "/v1/models", body, ts=ts)
        return sig, sha256(parse_signature(sig[2])).hex()[:32]

    if name == "update_others":
        req = MALLORY.request("PUT", f"/v1/models/{a}", {"description": "pwned"}, ts=TS + 500,
                              base=world.store.record_version("model", a))
        return dict(kind="model", key=a, prev=world.carriers("model", a), request=req,
                    content=rejected("unauthorized"), relayable=True)
    if name == "grant_self":
        req = MALLORY.request("POST", f"/v1/models/{a}/authorize", {"address": MALLORY.address, "level": "manager"},
                              ts=TS + 500, base=world.store.record_version("model", a))
        return dict(kind="model", key=a, prev=world.carriers("model", a), request=req,
                    content=rejected("unauthorized"), relayable=True)
    if name == "create_naming_others":
        req, _ = create({"model_id": a, "name": "stolen"})
        return dict(kind="model", key=a, prev=[], request=req, content=rejected("bad_field"), relayable=True)
    if name == "create_under_others":
        req, _ = create({"name": "stolen"})
        return dict(kind="model", key=a, prev=[], request=req, content=rejected("bad_key"))
    if name == "create":
        req, key = create({"name": f"m{n % 1000}"})
        return dict(kind="model", key=key, prev=[], request=req, content=ACCEPTED, relayable=True)
    if name == "create_future":
        ts = [NOW_MS // 1000 + 600, MAX_TS][n % 2]  # held, then beyond the hold horizon
        req, key = create({"name": "later"}, ts=ts)
        return dict(kind="model", key=key, prev=[], request=req, content=ACCEPTED)
    if name == "update_own_without_base":
        req = MALLORY.request("PUT", f"/v1/models/{m}", {"description": "x"}, ts=TS + 500)
        return dict(kind="model", key=m, prev=[], request=req, content=rejected("unknown_version"), relayable=True)
    if name == "update_own":
        req = MALLORY.request("PUT", f"/v1/models/{m}", {"description": "x"}, ts=TS + 500,
                              base=world.store.record_version("model", m))
        return dict(kind="model", key=m, prev=world.carriers("model", m), request=req, content=ACCEPTED,
                    relayable=True)
    if name == "account_of_others":
        req = MALLORY.request("POST", "/v1/account/create", {"name": "Alice"}, ts=TS + 500)
        return dict(kind="account", key=ALICE.address, prev=[], request=req, content=rejected("bad_key"))
    if name == "request_as_node_record":
        req, _ = create({"name": "x"})
        return dict(kind="node", key=X_ADDR, prev=[], request=req, content=rejected("unauthorized"))
    if name in ("rewrap", "refused", "presigned"):
        if name == "rewrap":
            r, rule = world.signed[n % len(world.signed)], None
        elif name == "refused":
            r, rule = world.refused, rejected("unauthorized")
        else:
            r, rule = world.presigned[n % len(world.presigned)]
        prev = prev_for(world, r, prev_mode)
        return dict(kind=r.kind, key=r.key, prev=prev, request=r.signed, content=wrapped(world, r, prev, rule),
                    relayable=prev_mode == "signed")
    raise AssertionError(name)


NODE_FAMILIES = ["own_beat", "own_beat", "own_sibling", "own_tombstone", "other_node", "other_status", "bad_text",
                 "deep", "model_by_node", "unknown_kind", "bidi_key"]
USER_FAMILIES = ["update_others", "grant_self", "create_naming_others", "create_under_others", "create",
                 "create_future", "update_own_without_base", "update_own", "account_of_others",
                 "request_as_node_record", "rewrap", "rewrap", "rewrap", "refused", "presigned", "presigned"]


def case_from(world: World, family: dict, label: str, deps_mode: str, hlc_mode: str, ghost: bytes) -> Case:
    prev = family.pop("prev")
    deps, hlc, missing = envelope(world, deps_mode, hlc_mode, prev, ghost)
    if family.get("relayable") and (deps_mode not in ("heads", "old", "empty") or hlc_mode != "next"):
        family["relayable"] = False  # write_request picks its own deps and clock
    return Case(label=f"{label} deps={deps_mode} hlc={hlc_mode}", deps=deps, prev=prev, hlc=hlc, missing=missing,
                **family)


ghosts = st.binary(min_size=32, max_size=32)


@SETTINGS
@given(name=st.sampled_from(NODE_FAMILIES), n=st.integers(0, 2**63 - 1), deps_mode=st.sampled_from(DEPS_MODES),
       hlc_mode=st.sampled_from(HLC_MODES), ghost=ghosts)
def test_hostile_node_ops_same_verdict_on_every_path(world, name, n, deps_mode, hlc_mode, ghost):
    family = node_family(world, name, n)
    run_case(world, case_from(world, family, name, deps_mode, hlc_mode, ghost))


@SETTINGS
@given(name=st.sampled_from(USER_FAMILIES), n=st.integers(0, 2**16), prev_mode=st.sampled_from(PREV_MODES),
       deps_mode=st.sampled_from(DEPS_MODES), hlc_mode=st.sampled_from(HLC_MODES), ghost=ghosts)
def test_hostile_user_requests_same_verdict_on_every_path(world, name, n, prev_mode, deps_mode, hlc_mode, ghost):
    family = user_family(world, name, n, prev_mode)
    run_case(world, case_from(world, family, name, deps_mode, hlc_mode, ghost))


def test_every_request_rewrapped_onto_every_state(world):
    """Each signed request of the world (delivered, refused, or Mallory's never relayed) on each
    kind of prev, in a clean envelope: the same write, bad_prev, or its rule's verdict."""
    seen = set()
    for name, count in (("rewrap", len(world.signed)), ("refused", 1), ("presigned", len(world.presigned))):
        for n in range(count):
            for prev_mode in dict.fromkeys(PREV_MODES):
                family = user_family(world, name, n, prev_mode)
                first, later = run_case(world, case_from(world, family, name, "heads", "next", b"\0" * 32))
                assert first == later == family["content"]
                seen.add((name, prev_mode, first))
    assert ("rewrap", "signed", ACCEPTED) in seen and ("presigned", "signed", ACCEPTED) in seen
    assert ("refused", "signed", rejected("unauthorized")) in seen
    assert ("presigned", "signed", rejected("unauthorized")) in seen
    # another prev is bad_prev, unless it is the same writes (a create's empty prev, the current
    # heads bob's refused transfer was signed on, the create a write directly after it names)
    assert ("rewrap", "current", rejected("bad_prev")) in seen and ("presigned", "empty", rejected("bad_prev")) in seen
    assert ("rewrap", "empty", ACCEPTED) in seen and ("rewrap", "older", ACCEPTED) in seen


# ---- hostile bodies ---------------------------------------------------------------------------

NASTY = ["\ud800", "\udbff", "\udc00", "\udfff", *BAD_CHARS, "\t", "\n", " ", "a", "-", "Z", "é", "\U0001f600"]
names = st.text(alphabet=st.one_of(st.characters(), st.sampled_from(NASTY)), max_size=12)


def body_case(world: World, body: bytes, content: tuple, ts: int = TS + 700) -> Case:
    req = MALLORY.request_bytes("POST", "/v1/models", body, ts=ts)
    key = sha256(parse_signature(req[2])).hex()[:32]
    top = max(world.hlc(h) for h in world.heads)
    return Case(label=f"body {body[:60]!r}", kind="model", key=key, deps=world.heads, prev=[], hlc=top + 1,
                request=req, content=content, relayable=True)


def name_verdict(name: str) -> tuple:
    if text_problem(name) is not None:
        return rejected("bad_request")  # every string of a body is checked while parsing
    try:
        NAME(name)
    except ValueError:
        return rejected("bad_field")
    return ACCEPTED


@SETTINGS
@given(name=names, ascii_only=st.booleans())
def test_hostile_text_in_a_request_body(world, name, ascii_only):
    """Lone surrogates (as JSON escapes), control and bidi characters, raw or escaped."""
    if not ascii_only:
        try:
            name.encode()
        except UnicodeEncodeError:
            ascii_only = True  # a lone surrogate exists in JSON only as an escape
    body = json.dumps({"name": name}, ensure_ascii=ascii_only).encode()
    run_case(world, body_case(world, body, name_verdict(name)))


def _int_verdict(v: int) -> tuple:
    if not -(2**63) <= v <= 2**63 - 1:
        return rejected("bad_request")
    return ACCEPTED if 0 <= v <= 2**62 else rejected("bad_field")


BODIES = {
    "duplicate key": (b'{"name":"a","name":"b"}', rejected("bad_request")),
    "duplicate key, nested": (b'{"name":"a","metadata":{"k":"1","k":"2"}}', rejected("bad_request")),
    "surrogate key": (b'{"name":"a","\\udc00":1}', rejected("bad_request")),
    "escaped bidi": (b'{"name":"a\\u202eb"}', rejected("bad_request")),
    "raw bidi": ('{"name":"a\u2067b"}'.encode(), rejected("bad_request")),
    "escaped nul": (b'{"name":"a\\u0000"}', rejected("bad_request")),
    "raw control": (b'{"name":"a\x07"}', rejected("bad_request")),
    "NaN": (b'{"name":"a","price_per_1k_tokens":NaN}', rejected("bad_request")),
    "Infinity": (b'{"name":"a","price_per_1k_tokens":-Infinity}', rejected("bad_request")),
    "1e999": (b'{"name":"a","price_per_1k_tokens":1e999}', rejected("bad_request")),
    "finite float": (b'{"name":"a","price_per_1k_tokens":1.5e3}', ACCEPTED),
    "not utf-8": (b'{"name":"\xff"}', rejected("bad_request")),
    "BOM": (b'\xef\xbb\xbf{"name":"a"}', rejected("bad_request")),
    "trailing data": (b'{"name":"a"} {}', rejected("bad_request")),
    "array": (b'[{"name":"a"}]', rejected("bad_request")),
    "empty": (b"", rejected("bad_field")),  # {}: a model needs a name
    "null": (b"null", rejected("bad_request")),
    "deep string brackets": (b'{"name":"a","description":"' + b"[" * 40 + b'"}', ACCEPTED),
}


@pytest.mark.parametrize("label", sorted(BODIES))
def test_hostile_request_bodies(world, label):
    body, content = BODIES[label]
    first, _ = run_case(world, body_case(world, body, content))
    assert first == content


@SETTINGS
@given(v=st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([2**62, 2**62 + 1, 2**63 - 1, 2**63, -(2**63),
                                                                    -(2**63) - 1, 2**64, -1, 0])))
def test_integers_at_and_over_64_bits_in_a_body(world, v):
    body = b'{"name":"a","parameters":' + str(v).encode() + b"}"
    first, _ = run_case(world, body_case(world, body, _int_verdict(v)))
    assert first == _int_verdict(v)


# ---- sizes and depths at and over every limit -------------------------------------------------

def json_nested(depth: int) -> bytes:
    """A model create whose body nests `depth` levels: the object, metadata, then lists."""
    return b'{"name":"a","metadata":{"k":' + b"[" * (depth - 2) + b"1" + b"]" * (depth - 2) + b"}}"


def sized_node_case(world: World, size: int) -> Case:
    """An own node record padded so that its wire is exactly `size` bytes."""
    top = max(world.hlc(h) for h in world.heads)
    pad = size - 200

    def case(p: int) -> Case:
        return Case(label=f"op of {size} bytes", kind="node", key=X_ADDR, deps=world.heads, prev=[], hlc=top + 1,
                    value={"address": X_ADDR, "x": "a" * p}, content=rejected("bad_field"),
                    decode=rejected("too_large") if size > MAX_OP_BYTES else None)

    for _ in range(5):
        got = len(case(pad).wire())
        if got == size:
            return case(pad)
        pad += size - got
    raise AssertionError(f"cannot make an op of {size} bytes")


def message_case(world: World, length: int) -> Case:
    tail = f" {TS} {sha256(b'').hex()}"
    head = "POST /v1/models/"
    message = head + "a" * (length - len(head) - len(tail)) + tail
    assert len(message) == length
    top = max(world.hlc(h) for h in world.heads)
    return Case(label=f"message of {length}", kind="model", key="x", deps=world.heads, prev=[], hlc=top + 1,
                request=(message, b"", MALLORY.sign(message)), content=rejected("bad_request"),
                decode=rejected("malformed") if length > MAX_MESSAGE_LEN else None)


LIMIT_CASES = {
    # what, its limit, (verdict at or under, verdict over)
    "op bytes": (MAX_OP_BYTES, rejected("bad_field"), rejected("too_large")),
    "message length": (MAX_MESSAGE_LEN, rejected("bad_request"), rejected("malformed")),
    "body bytes": (MAX_BODY, ACCEPTED, rejected("too_large")),
    "body nesting": (16, rejected("bad_field"), rejected("bad_request")),
    "value nesting": (codec.MAX_DEPTH, rejected("bad_field"), rejected("malformed")),
}


def limit_case(world: World, what: str, n: int) -> Case:
    if what == "op bytes":
        return sized_node_case(world, n)
    if what == "message length":
        return message_case(world, n)
    if what == "body bytes":
        body = b'{"name":"big"}'
        return body_case(world, body + b" " * (n - len(body)), ACCEPTED if n <= MAX_BODY else rejected("too_large"))
    if what == "body nesting":
        return body_case(world, json_nested(n), rejected("bad_field") if n <= 16 else rejected("bad_request"))
    if what == "value nesting":  # n = depth of the innermost value in the op body
        top = max(world.hlc(h) for h in world.heads)
        return Case(label=f"value at depth {n}", deps=world.heads, hlc=top + 1, **deep_value(n - 3))
    raise AssertionError(what)


@SETTINGS
@given(what=st.sampled_from(sorted(LIMIT_CASES)), delta=st.integers(-3, 3))
def test_sizes_and_nesting_at_and_over_the_limits(world, what, delta):
    limit, under, over = LIMIT_CASES[what]
    first, _ = run_case(world, limit_case(world, what, limit + delta))
    assert first == (under if delta <= 0 else over)


@pytest.mark.parametrize("what", sorted(LIMIT_CASES))
def test_exactly_at_and_one_over_each_limit(world, what):
    limit, under, over = LIMIT_CASES[what]
    assert under != over
    assert run_case(world, limit_case(world, what, limit))[0] == under
    assert run_case(world, limit_case(world, what, limit + 1))[0] == over


# ---- every clock and deps mode, once ----------------------------------------------------------

ENVELOPES = [
    # family, deps, clock, verdict on arrival, status once the foreign op came and the clock moved
    ("own_beat", "heads", "next", ACCEPTED, ACCEPTED),
    ("own_beat", "old", "next", ACCEPTED, ACCEPTED),
    ("own_sibling", "empty", "one", ACCEPTED, ACCEPTED),  # no deps: any clock from 1 will do
    ("own_beat", "empty", "one", rejected("bad_clock"), rejected("bad_clock")),  # its prev is a dep
    ("own_beat", "heads", "one", rejected("bad_clock"), rejected("bad_clock")),
    ("own_beat", "heads", "equal", rejected("bad_clock"), rejected("bad_clock")),
    ("own_beat", "heads", "zero", rejected("malformed"), ABSENT),
    ("own_sibling", "empty", "zero", rejected("malformed"), ABSENT),
    ("own_sibling", "empty", "max+1", rejected("malformed"), ABSENT),
    ("own_beat", "heads", "int64", rejected("malformed"), ABSENT),
    ("own_beat", "heads", "held", HELD, ACCEPTED),
    ("own_beat", "heads", "huge", DROPPED, ABSENT),
    ("own_sibling", "empty", "max", DROPPED, ABSENT),
    ("own_beat", "foreign", "next", PENDING, ACCEPTED),
    ("own_beat", "foreign", "equal", PENDING, rejected("bad_clock")),
    ("own_beat", "foreign", "held", PENDING, ACCEPTED),
    ("own_beat", "random", "next", PENDING, ABSENT),
    ("own_beat", "random", "max", DROPPED, ABSENT),
    ("other_node", "foreign", "next", PENDING, rejected("unauthorized")),
    ("other_node", "heads", "held", HELD, rejected("unauthorized")),
]


@pytest.mark.parametrize("name,deps_mode,hlc_mode,first,later", ENVELOPES)
def test_every_clock_and_deps_mode(world, name, deps_mode, hlc_mode, first, later):
    case = case_from(world, node_family(world, name, 5), name, deps_mode, hlc_mode, b"\x42" * 32)
    assert run_case(world, case) == (first, later)


def test_verdicts_tell_paths_apart(world):
    """The comparison is not vacuous: the oracle and the paths see different verdicts for
    different ops, and a verdict a path did not give is caught."""
    seen = {expected(case_from(world, node_family(world, f, 5), f, d, h, b"\x42" * 32), world)
            for f, d, h, *_ in ENVELOPES}
    assert {ACCEPTED, HELD, PENDING, DROPPED, rejected("malformed"), rejected("bad_clock")} <= seen
    case = case_from(world, node_family(world, "other_node", 0), "other_node", "heads", "next", b"\0" * 32)
    case.content = ACCEPTED  # a wrong prediction must fail the run
    with pytest.raises(AssertionError):
        run_case(world, case)


# ---- known bugs (formation/): strict xfails, and regression tests of fixed ones ---------------

def test_void_revocation_of_a_revoked_manager_changes_nothing():
    n = Node(Store(clock=clock), secret=N0_SECRET)
    a = n.relay(ALICE, "POST", "/models", {"name": "m"}, ts=TS).key
    n.relay(ALICE, "POST", f"/models/{a}/authorize", {"address": MALLORY.address, "level": "manager"}, ts=TS + 1)
    n.relay(ALICE, "POST", f"/models/{a}/authorize", {"address": CAROL.address, "level": "operator"}, ts=TS + 2)
    old = n.store.record_version("model", a)
    presigned = MALLORY.request("POST", f"/models/{a}/authorize", {"address": CAROL.address, "level": None},
                                ts=TS + 3, base=old)
    n.relay(ALICE, "POST", f"/models/{a}/authorize", {"address": CAROL.address, "level": "manager"}, ts=TS + 4)
    n.relay(CAROL, "PUT", f"/models/{a}", {"description": "carol's work"}, ts=TS + 5)
    n.relay(ALICE, "POST", f"/models/{a}/authorize", {"address": MALLORY.address, "level": None}, ts=TS + 6)
    before = n.store.get("model", a)
    # Mallory, revoked, has her old revocation of carol relayed: valid where she signed it, and
    # void (concurrent with her own revocation). It must change nothing.
    n.store.write_request(X, *presigned, now_ms=n.now + 1)
    assert n.store.get("model", a) == before


def test_make_op_refuses_too_deep_a_value_with_an_op_error():
    value = {"address": X_ADDR, "x": nest(codec.MAX_DEPTH)}
    with pytest.raises(OpError) as exc:
        make_op(X, "node", X_ADDR, deps=[], hlc=1, value=value)
    assert exc.value.code == "malformed"


def test_a_request_refused_as_too_early_never_takes_effect():
    store = Store(clock=clock)
    m, b, s = ALICE.request("POST", "/v1/models", {"name": "early"}, ts=NOW_MS // 1000 + 600)
    with pytest.raises(Invalid) as exc:
        store.write_request(PrivateKey(N0_SECRET), m, b, s, now_ms=NOW_MS)
    assert exc.value.code == "too_early"  # the API answers 425: the client may sign again
    store.tick(LATER_MS)
    assert store.list("model") == []


@pytest.mark.parametrize("version,tag", [(2.0, 0), (2, False), (2, 0.0)])
def test_op_fields_have_one_encoding(version, tag):
    body = msgpack.packb([version, "node", X_ADDR, X.address, [], [], 5, [tag, {"address": X_ADDR}]],
                         use_bin_type=True)
    wire = msgpack.packb([body, X.sign_digest(eip191_hash(sha256(body)))], use_bin_type=True)
    with pytest.raises(OpError) as exc:
        decode_op(wire)
    assert exc.value.code == "malformed"
