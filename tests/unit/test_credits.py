"""Credits as a view (crdt/credits.py) and the genesis fields they read (kinds/fog_kinds.py)."""

from __future__ import annotations

import hashlib
import json

from formation.crdt.credits import Price, balance_of, split, start_credits
from formation.crdt.keys import PrivateKey, format_address
from formation.crdt.kinds.credit_kinds import charge_key
from formation.crdt.kinds.fog_kinds import Fog, FogKind, fog_id_of
from formation.crdt.store import Store
from formation.node import charging
from formation.node import fog as fogmod
from tests.support import User

A, B, C, N, T, D = ("0x" + c * 40 for c in "abcde1")


def old_fog_id(fog: dict) -> str:
    """fog_id_of as it was before the economy's fields existed."""
    body = {k: v for k, v in fog.items() if k != "fog_id"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def test_an_old_genesis_keeps_its_id_and_is_still_valid():
    key = PrivateKey(b"\x05" * 32)
    old = {"fog_id": "0" * 32, "genesis": format_address(key.address), "name": "old", "created_at": 1_700_000_000_000,
           "policy": {"inviters": "members", "max_admits": 16}}
    old["fog_id"] = old_fog_id(old)
    normalized = Fog.normalize(old)  # as a node reads it now: the new fields are None
    assert normalized["treasury"] is None and normalized["operator_share_percent"] is None
    assert fog_id_of(normalized) == fog_id_of(old) == old["fog_id"]
    store = Store()
    store.write(key, "fog", old["fog_id"], old, now_ms=1_700_000_000_001)  # validity takes it
    assert store.get("fog", old["fog_id"])["fog_id"] == old["fog_id"]
    # a genesis made with no economy hashes as before too
    made, _ = fogmod.genesis(key, name="x", now_ms=1_700_000_000_000)
    assert made["fog_id"] == old_fog_id({k: v for k, v in made.items() if v is not None})


def test_the_treasury_and_split_are_in_the_hash_when_set():
    key = PrivateKey(b"\x06" * 32)
    plain, _ = fogmod.genesis(key, name="x", now_ms=1)
    rich, _ = fogmod.genesis(key, name="x", now_ms=1, treasury=T, operator_share_percent=20)
    assert rich["treasury"] == T and rich["fog_id"] != plain["fog_id"] == fog_id_of(plain)
    assert fog_id_of({**rich, "treasury": A}) != rich["fog_id"]
    assert fog_id_of({**rich, "operator_share_percent": 0}) != rich["fog_id"]
    FogKind().validate(rich)


def charge(consumer, creator, node, credits, calls=1, agent="x", host=None):
    return {"consumer": consumer, "agent_id": agent, "host": host or node, "node": node, "creator": creator,
            "calls": calls, "credits": credits}


FOG = {"fog_id": "f" * 32, "treasury": T, "operator_share_percent": 25}


def grant(to, amount, at, fog_id=FOG["fog_id"], treasury=T):
    return {"to": to, "amount": amount, "at": at, "fog_id": fog_id, "treasury": treasury}


def test_balances_count_own_fog_grants_and_members_charges_only():
    grants = [grant(A, 50, N), grant(A, 10**6, N, fog_id="e" * 32, treasury=A),  # another fog's
              grant(B, 5, N)]
    charges = [charge(A, B, N, 10, calls=2), charge(A, B, C, 999)]  # C is no member: counts for no one
    members = {N}
    figures = {w: balance_of(w, account={"credits": 100}, grants=grants, charges=charges, members=members, fog=FOG)
               for w in (A, B, N, C)}
    assert figures[A]["start"] == 0  # a fog with a treasury: no free credits
    assert (figures[A]["granted"], figures[A]["spent"], figures[A]["calls"], figures[A]["balance"]) == (50, 10, 2, 40)
    assert (figures[B]["earned"], figures[B]["balance"]) == (8, 13)  # 10 - 25 % (2, floored) + a grant of 5
    assert (figures[N]["earned"], figures[N]["balance"]) == (2, 2)
    assert figures[C]["balance"] == 0
    # nothing is made or lost: what A spent is what B and N earned
    assert figures[A]["spent"] == figures[B]["earned"] + figures[N]["earned"]
    # every figure is held at the node that charged
    assert [(p["node"], p["held"]) for p in figures[A]["purses"]] == [(N, 40)]


def test_purses_grants_moves_and_the_hosts_share():
    """Credits are held where granted, leave a purse only by its node's charges and moves, and
    the operator's share goes to the host whose replica answered, held at the charging node."""
    members = {N, C}
    grants = [grant(A, 30, N), grant(A, 20, C)]
    moves = [{"account": A, "from_node": N, "to_node": C, "amount": 10},
             {"account": A, "from_node": D, "to_node": N, "amount": 99}]  # D is no member: not counted
    charges = [charge(A, B, C, 8, host=N)]  # C admitted the call, a replica on N answered it
    fig = balance_of(A, account=None, grants=grants, charges=charges, moves=moves, members=members, fog=FOG)
    purses = {p["node"]: p for p in fig["purses"]}
    assert (purses[N]["held"], purses[C]["held"]) == (20, 22)  # 30 - 10 out; 20 + 10 in - 8
    assert (fig["moved_in"], fig["moved_out"], fig["balance"]) == (10, 10, 42)
    host = balance_of(N, account=None, grants=[], charges=charges, members=members, fog=FOG)
    assert [(p["node"], p["held"]) for p in host["purses"]] == [(C, 2)]  # 25 % of 8, held at C
    creator = balance_of(B, account=None, grants=[], charges=charges, members=members, fog=FOG)
    assert creator["balance"] == 6


def test_a_price_holds_its_most_and_costs_at_most_that():
    flat = Price({"price_credits_per_call": 5})
    assert (bool(flat), flat.hold(), flat.cost(10**6, 10**6)) == (True, 5, 5)
    assert not Price({}) and not Price({"price_credits_per_call": 0, "price_credits_per_1k_tokens": None})
    tok = Price({"price_credits_per_call": 1, "price_credits_per_1k_tokens": 3, "max_billed_tokens": 2000})
    assert tok.hold() == 1 + 6
    assert tok.cost(0, 0) == 1 and tok.cost(1, 0) == 2  # a started thousand is rounded up
    assert tok.cost(500, 500) == 4 and tok.cost(10**9, 10**9) == tok.hold()
    assert Price({"price_credits_per_1k_tokens": 1}).hold() == 5  # 4096 tokens by default, rounded up
    # hostile record values (validity bounds them; the view must not trust that)
    assert not Price({"price_credits_per_call": -5, "price_credits_per_1k_tokens": True})


def test_start_credits_and_split():
    assert start_credits({"credits": 100}, None) == 100
    assert start_credits({"credits": 100}, {"fog_id": "f" * 32, "treasury": None}) == 100
    assert start_credits({"credits": 100}, FOG) == 0
    assert start_credits(None, None) == 0
    assert split(10, None) == (8, 2)  # the default split: 20 %
    assert split(7, {"operator_share_percent": 0}) == (7, 0)
    assert split(7, {"operator_share_percent": 100}) == (0, 7)
    assert split(3, {"operator_share_percent": 50}) == (2, 1)
    # no grant counts in a fog without a treasury, whatever it says
    nofog = {"fog_id": "f" * 32, "treasury": None}
    assert balance_of(A, account=None, grants=[grant(A, 5, N, treasury=None)], charges=[], members=set(),
                      fog=nofog)["balance"] == 0


def test_a_purse_here_counts_this_nodes_own_debits_however_many_records_name_the_account(monkeypatch):
    """The view's lists are bounded (MAX_CHARGES, key order): another key's charge records
    naming the consumer, sorting first, push this node's own charge out of them, and the view
    alone would show the consumer's 50 credits here unspent. The purse the node admits against
    reads its own debits exactly (charging.debits_at): 50 - 30 = 20."""
    monkeypatch.setattr(charging, "MAX_CHARGES", 3)
    node_key, other, treasury = PrivateKey(b"\x21" * 32), PrivateKey(b"\x22" * 32), User(b"\x23" * 32)
    me, them = format_address(node_key.address), format_address(other.address)
    genesis, member = fogmod.genesis(node_key, name="f", now_ms=1_700_000_000_000, treasury=treasury.address)
    fog_id = genesis["fog_id"]
    store = Store()
    store.write(node_key, "fog", fog_id, genesis, now_ms=1_700_000_000_000)
    store.write(node_key, "member", me, member, now_ms=1_700_000_000_001)
    m, b, s = treasury.request("POST", "/v1/credits/grant", {"to": A, "amount": 50, "at": me, "fog": genesis})
    store.write_request(node_key, m, b, s, now_ms=1_700_000_000_002)
    store.write(node_key, "charge", charge_key(A, "zz", me, me), charge(A, B, me, 30, agent="zz"),
                now_ms=1_700_000_000_003)
    for n in range(5):  # another key's records naming A, sorting before this node's
        store.write(other, "charge", charge_key(A, f"a{n}", them, them), charge(A, B, them, 1, agent=f"a{n}"),
                    now_ms=1_700_000_000_004 + n)
    view = charging.ledger(store, fog_id, A)
    assert next(p["held"] for p in view["purses"] if p["node"] == me) == 50  # the bounded view misses it
    assert charging.purse_here(store, fog_id, A, me)[1] == 20
