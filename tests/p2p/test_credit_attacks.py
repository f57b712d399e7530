"""Forged credits over real in-process libp2p (tests/p2p/attacker.py): an attacker member pushes,
by gossip and by sync, grant ops carrying users' signed requests that no treasury signed (a
self-grant, a grant by another key, a genesis altered to name the attacker treasury) and charge
ops it has no right to (another node's charge record, a user's key as a node, a key naming no
node, fields that contradict the key, counters out of bounds, a deletion). Every honest node
refuses each with the same code and its state is what it was; the treasury's own grant, relayed
by an honest node, is accepted everywhere."""

from __future__ import annotations

from formation.crdt.keys import PrivateKey, parse_signature, sha256
from formation.crdt.kinds.credit_kinds import charge_key
from formation.crdt.kinds.fog_kinds import fog_id_of
from formation.node import fog as fogmod
from tests.p2p.attacker import forge_wire, open_attacker
from tests.p2p.conftest import converged, open_fog
from tests.p2p.test_attacks import caught_up, keep_working, read, refused_everywhere, top_hlc
from tests.support import TS, User

AID = "a1" * 16
M1, M2, M3, M4 = (str(i) * 32 for i in range(1, 5))
MOVED = "credit_moved"
SUB = "subscription"
RENT = "rent"


def rent(payer: str, node: str, creator: str) -> dict:
    return dict(sorted({"payer": payer, "instance_id": "i1", "node": node, "creator": creator, "model_id": "m1",
                        "hours": 1, "credits": 4, "paid_until": 1_800_000_000_000,
                        "updated_at": 1_700_000_060_000}.items()))


def sub(consumer: str, node: str, creator: str, **more) -> dict:
    return dict(sorted({"consumer": consumer, "agent_id": AID, "node": node, "creator": creator, "plan": "basic",
                        "purchases": 1, "credits": 5, "calls_bought": 10, "calls_used": 0,
                        "expires_at": 1_800_000_000_000, "updated_at": 1_700_000_060_000, **more}.items()))


def moved(move_id: str, account: str, from_node: str, to_node: str, amount: int = 50) -> dict:
    return dict(sorted({"move_id": move_id, "account": account, "from_node": from_node, "to_node": to_node,
                        "amount": amount, "moved_at": 1_700_000_060_000}.items()))


def grant_key(request) -> str:
    return sha256(parse_signature(request[2])).hex()[:32]


def charge(consumer: str, node: str, creator: str, **more) -> dict:
    value = {"consumer": consumer, "agent_id": AID, "host": node, "node": node, "creator": creator, "calls": 3,
             "credits": 15,
             "tokens_in": 0, "tokens_out": 0, "updated_at": 1_700_000_060_000, **more}
    return dict(sorted(value.items()))


async def test_forged_grants_and_charges_are_refused_everywhere():
    treasury, user, creator = User(b"\x81" * 32), User(b"\x82" * 32), User(b"\x83" * 32)
    genesis, _ = fogmod.genesis(PrivateKey(b"\x84" * 32), name="f", now_ms=1_700_000_000_000,
                                treasury=treasury.address, operator_share_percent=20)
    async with open_fog(2) as fog, open_attacker(fog) as evil:
        host = fog[0]
        ckey = charge_key(user.address, AID, host.node.address, host.node.address)
        honest = await host.svc.astore.run(host.node.put, "charge", ckey,
                                           charge(user.address, host.node.address, creator.address))
        host.svc.publish(honest.wire)
        await converged(fog)
        heads = await caught_up(evil, host)
        before = [await m.svc.astore.state_hash() for m in fog]
        hlc = await top_hlc(evil) + 1
        mine = charge_key(user.address, AID, evil.address, evil.address)

        def grant(signer: User, body: dict, **kw):
            req = signer.request("POST", "/v1/credits/grant", body)
            return forge_wire(evil.key, "grant", kw.get("key", grant_key(req)), deps=heads, hlc=hlc, request=req)

        def forge(signer, k, value=None, kind="charge"):
            return forge_wire(signer, kind, k, deps=heads, hlc=hlc, value=value)

        forged = {
            # a self-grant, a grant by another key, a genesis altered to name the attacker's user treasury
            grant(user, {"to": user.address, "amount": 10**6, "at": host.node.address, "fog": genesis}): "unauthorized",
            grant(creator, {"to": user.address, "amount": 10**6, "at": host.node.address, "fog": genesis}): "unauthorized",
            grant(user, {"to": user.address, "amount": 10**6, "at": host.node.address, "fog": {**genesis, "treasury": user.address}}):
                "bad_field",
            # the treasury's own request with an amount out of bounds, or under a key it does not derive
            grant(treasury, {"to": user.address, "amount": 10**12 + 1, "at": host.node.address, "fog": genesis}): "bad_field",
            grant(treasury, {"to": user.address, "amount": 5, "at": host.node.address, "fog": genesis}, key="0" * 32): "bad_key",
            # another node's charge record; a user's key as a node; keys naming another node or none
            forge(evil.key, ckey, charge(user.address, host.node.address, evil.address, credits=0)): "unauthorized",
            forge(user.key, ckey, charge(user.address, host.node.address, creator.address)): "unauthorized",
            forge(evil.key, charge_key(user.address, AID, evil.address, "0x" + "11" * 20),
                  charge(user.address, "0x" + "11" * 20, evil.address)): "unauthorized",
            forge(evil.key, f"{user.address}:{AID}@{evil.address}", charge(user.address, evil.address,
                                                                          evil.address)): "unauthorized",
            # another node's move out of its purses; a move "carried out" by the node it goes to
            forge(evil.key, f"{M1}@{host.node.address}", moved(M1, user.address, host.node.address,
                                                            evil.address), MOVED): "unauthorized",
            forge(evil.key, f"{M2}@{evil.address}", moved(M2, user.address, evil.address, evil.address), MOVED):
                "bad_field",
            forge(evil.key, f"{M3}@{evil.address}", moved(M3, user.address, host.node.address, evil.address), MOVED):
                "bad_field",
            forge(evil.key, f"{M4}@{evil.address}", None, MOVED): "bad_field",
            # another node's subscription; more calls used than bought; a creator's own plan
            forge(evil.key, f"{user.address}:{AID}@{host.node.address}",
                  sub(user.address, host.node.address, creator.address), SUB): "unauthorized",
            forge(evil.key, f"{user.address}:{AID}@{evil.address}",
                  sub(user.address, evil.address, creator.address, calls_used=11), SUB): "bad_field",
            forge(evil.key, f"{user.address}:{AID}@{evil.address}",
                  sub(user.address, evil.address, user.address), SUB): "bad_field",
            # another node's rent; a model's owner charged rent for its own model
            forge(evil.key, f"{user.address}:i1@{host.node.address}",
                  rent(user.address, host.node.address, creator.address), RENT): "unauthorized",
            forge(evil.key, f"{user.address}:i1@{evil.address}", rent(user.address, evil.address, user.address),
                  RENT): "bad_field",
            # a creator that charges for calling its own agent
            forge(evil.key, mine, charge(user.address, evil.address, user.address)): "bad_field",
            # its own key: fields that contradict the key, counters out of bounds, a deletion
            forge(evil.key, mine, charge(creator.address, evil.address, evil.address)): "bad_field",
            forge(evil.key, mine, charge(user.address, evil.address, evil.address, credits=-5)): "bad_field",
            forge(evil.key, mine, charge(user.address, evil.address, evil.address, credits=2**62 + 1)): "bad_field",
            forge(evil.key, mine, charge(user.address, evil.address, evil.address, calls=1.5)): "bad_field",
            forge(evil.key, mine, None): "bad_field",
        }
        await refused_everywhere(evil, fog, forged, by_gossip=5)
        for m, state_hash in zip(fog, before, strict=True):
            assert await m.svc.astore.state_hash() == state_hash
            assert await read(m, lambda s: s.list("grant", limit=10)) == []
            assert (await m.svc.astore.get("charge", ckey))["credits"] == 15
            assert await m.svc.astore.get("charge", mine) is None
        await keep_working(fog, user, "forged credits")

        # the treasury's grant, relayed by an honest node, is taken everywhere
        body = {"to": user.address, "amount": 7, "memo": "ok", "at": fog[0].node.address, "fog": genesis}
        op = await fog[1].relay(treasury, "POST", "/v1/credits/grant", body, ts=TS + 91)
        await converged(fog)
        for m in fog:
            [g] = await read(m, lambda s: s.list("grant", limit=10))
            assert (g["grant_id"], g["to"], g["amount"], g["treasury"], g["fog_id"]) == (
                op.key, user.address, 7, treasury.address, genesis["fog_id"])
        assert fog_id_of(genesis) == genesis["fog_id"]
