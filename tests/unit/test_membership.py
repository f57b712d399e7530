"""Fog membership as a view of the records (crdt/membership.py), and the rules of the records it
reads (kinds/fog_kinds.py) through the one validity function (Store.write)."""

from __future__ import annotations

import pytest

from formation.crdt.hlc import from_ms
from formation.crdt.keys import PrivateKey, format_address
from formation.crdt.kinds import Invalid
from formation.crdt.kinds.fog_kinds import invite_id
from formation.crdt.membership import members
from formation.crdt.op import make_op
from formation.crdt.store import Store
from formation.node import fog

NOW = 1_900_000_000_000


def key(i: int) -> PrivateKey:
    return PrivateKey(bytes([i]) * 32)


def addr(i: int) -> str:
    return format_address(key(i).address)


class Fog:
    """A fog made by key(1), and the claims of the keys it admits."""

    def __init__(self, **policy):
        self.genesis, self.me = fog.genesis(key(1), name="t", now_ms=NOW, policy=policy or None)
        self.id = self.genesis["fog_id"]
        self.claims = [self.me]
        self.expels: list[dict] = []
        self.seals: list[dict] = []
        self.leaves: list[dict] = []
        self.serials: dict[int, int] = {}

    def invite(self, inviter: int, *, serial: int | None = None) -> fog.InviteToken:
        serial = serial or self.serials.get(inviter, 0) + 1
        self.serials[inviter] = max(serial, self.serials.get(inviter, 0))
        return fog.make_invite(key(inviter), self.id, serial=serial, expires_ms=NOW + 3_600_000, bootstrap=[])

    def admit(self, who: int, inviter: int = 1, **kw) -> dict:
        claim = fog.claim(key(who), self.invite(inviter, **kw), now_ms=NOW)
        self.claims.append(claim)
        return claim

    def expel(self, who: int) -> None:
        self.expels.append({"fog": self.genesis, "address": addr(who), "reason": ""})

    def members(self) -> set[str]:
        return set(members(self.id, self.genesis, self.claims, self.expels, self.seals, self.leaves))


def test_the_genesis_alone_is_a_member():
    f = Fog()
    assert f.members() == {addr(1)}
    assert members(f.id, None, f.claims, []) == frozenset()  # no genesis record: no fog
    assert members("0" * 32, f.genesis, f.claims, []) == frozenset()  # another fog's id


def test_invites_chain_back_to_the_genesis():
    f = Fog()
    f.admit(2)
    f.admit(3, inviter=2)
    f.admit(4, inviter=3)
    assert f.members() == {addr(i) for i in (1, 2, 3, 4)}


def test_a_claim_whose_inviter_is_no_member_admits_nobody():
    f = Fog()
    outsider = fog.make_invite(key(9), f.id, serial=1, expires_ms=NOW + 1000, bootstrap=[])
    f.claims.append(fog.claim(key(5), outsider, now_ms=NOW))
    assert f.members() == {addr(1)}


def test_expelling_a_member_expels_everyone_it_admitted():
    f = Fog()
    f.admit(2)
    f.admit(3, inviter=2)
    f.admit(4)
    f.expel(2)
    assert f.members() == {addr(1), addr(4)}


def test_a_member_that_left_still_vouches_for_whom_it_admitted():
    f = Fog()
    f.admit(2)
    f.admit(3, inviter=2)
    f.leaves = [{"address": addr(2), "fog_id": f.id}]
    assert f.members() == {addr(1), addr(3)}


def test_an_invite_claimed_twice_admits_neither():
    f = Fog()
    token = f.invite(1)
    f.claims += [fog.claim(key(2), token, now_ms=NOW), fog.claim(key(3), token, now_ms=NOW)]
    assert f.members() == {addr(1)}


def test_a_sealed_invite_claimed_again_evicts_nobody():
    f = Fog()
    token = f.invite(1)
    f.claims.append(fog.claim(key(2), token, now_ms=NOW))
    f.seals.append({"invite": token.invite, "member": addr(2)})  # the inviter saw one claim
    f.claims.append(fog.claim(key(3), token, now_ms=NOW + 5))  # the token leaked after its use
    assert f.members() == {addr(1), addr(2)}


def test_a_seal_by_another_than_the_inviter_is_refused():
    f = Fog()
    token = f.invite(1)
    store = Store()
    seal = {"invite": token.invite, "member": addr(3)}
    with pytest.raises(Invalid):
        write(store, 3, "admit", invite_id(token.invite), seal)
    with pytest.raises(Invalid):  # keyed by another invite's id
        write(store, 1, "admit", "0" * 32, seal)
    write(store, 1, "admit", invite_id(token.invite), seal)


def test_two_invites_with_one_serial_admit_neither():
    f = Fog()
    f.admit(2, serial=1)
    f.admit(3, serial=1)
    assert f.members() == {addr(1)}


def test_the_policy_bounds_admissions_and_inviters():
    f = Fog(max_admits=2)
    for who in (2, 3, 4):
        f.admit(who)
    assert f.members() == {addr(1), addr(2), addr(3)}  # serial 3 is past max_admits
    g = Fog(inviters="genesis")
    g.admit(2)
    g.admit(3, inviter=2)
    assert g.members() == {addr(1), addr(2)}


# ---- the records' rules, through the one validity function -------------------------------------


def write(store: Store, signer: int, kind: str, k: str, value) -> None:
    store.write(key(signer), kind, k, value, now_ms=NOW)


def test_honest_membership_records_are_accepted():
    f = Fog()
    store = Store()
    write(store, 1, "fog", f.id, f.genesis)
    write(store, 1, "member", addr(1), f.me)
    write(store, 2, "member", addr(2), fog.claim(key(2), f.invite(1), now_ms=NOW))
    write(store, 1, "expel", f"{f.id}:{addr(2)}", {"fog": f.genesis, "address": addr(2)})
    assert store.fog_members(f.id) == {addr(1)}


@pytest.mark.parametrize("case", ["fog id not its hash", "fog by another", "forged invite",
                                  "proof by another key", "claim for another", "expel by a member",
                                  "expel key mismatch", "member under another key"])
def test_forged_membership_records_are_refused(case):
    f = Fog()
    store = Store()
    token = f.invite(1)
    claim = fog.claim(key(2), token, now_ms=NOW)
    signer, kind, k, value = {
        "fog id not its hash": (1, "fog", f.id, {**f.genesis, "name": "changed"}),
        "fog by another": (2, "fog", f.id, f.genesis),
        "forged invite": (2, "member", addr(2), {**claim, "invite": {**claim["invite"], "serial": 7}}),
        "proof by another key": (2, "member", addr(2), {**claim, "proof": key(5).personal_sign(
            f"formation join {f.id} {addr(2)}".encode()).hex()}),
        "claim for another": (3, "member", addr(3), {**claim, "address": addr(3)}),
        "expel by a member": (2, "expel", f"{f.id}:{addr(3)}", {"fog": f.genesis, "address": addr(3)}),
        "expel key mismatch": (1, "expel", f"{f.id}:{addr(4)}", {"fog": f.genesis, "address": addr(3)}),
        "member under another key": (2, "member", addr(3), {**claim, "address": addr(3)}),
    }[case]
    with pytest.raises(Invalid):
        write(store, signer, kind, k, value)
    assert store.fog_members(f.id) == frozenset()  # nothing was written


def test_a_claim_dated_after_its_invite_expired_is_refused():
    f = Fog()
    token = fog.make_invite(key(1), f.id, serial=1, expires_ms=NOW + 1000, bootstrap=[])
    claim = fog.claim(key(2), token, now_ms=NOW)
    store = Store()
    late = make_op(key(2), "member", addr(2), deps=[], hlc=from_ms(NOW + 2000), value=claim)
    result = store.ingest_ops([late], source="peer", now_ms=NOW + 2000)
    assert late.id in store.replica.rejected and not store.has(late.id), result
    with pytest.raises(fog.InviteError, match="expired"):
        fog.claim(key(2), token, now_ms=NOW + 2000)


def test_an_invite_token_round_trips_and_damage_is_named():
    token = Fog().invite(1)
    again = fog.InviteToken.decode(token.encode())
    assert again == token
    for bad in ("hello", token.encode()[:-10], "fmi1." + "A" * 40):
        with pytest.raises(fog.InviteError):
            fog.InviteToken.decode(bad)
