"""Credits (docs/economy.md).

    GET /account/credits   signed: the signer's balance in this node's view (start, granted,
                           moved, earned, spent, balance), its purses (what each node holds of
                           it), the grants that count and the fog's split
    GET /fog               unsigned: this node's fog's genesis record (what a grant carries)
    POST /credits/grant, POST /credits/move: record writes (crdt/kinds/credit_kinds.py), with the
                           nodes they name checked here to be the fog's members (422)

A balance is a view of the records (crdt/credits.py), the same on every node that holds the same
records; `account.credits` in the account record is only what it started with (the account
answers show the view's balance in its place).
"""

from __future__ import annotations

from formation.crdt.strict import StrictError, parse_json

from .http import ApiError, Call, Endpoint
from .schemas import ADDRESS, COUNT, INTEGER, STRING, array, nullable, obj

NODE_FIELDS = {"grant": ("at",), "credit_move": ("from_node", "to_node")}  # fields naming a node

CREDITS_ANSWER = obj({
    "address": ADDRESS, "start": COUNT, "granted": COUNT, "moved_in": COUNT, "earned": COUNT, "spent": COUNT,
    "moved_out": COUNT, "calls": COUNT, "balance": INTEGER,
    "purses": array(obj({"node": ADDRESS, "granted": COUNT, "moved_in": COUNT, "earned": COUNT, "spent": COUNT,
                         "moved_out": COUNT, "calls": COUNT, "held": INTEGER})), "fog_id": nullable(STRING), "treasury": nullable(ADDRESS),
    "operator_share_percent": COUNT,
    "grants": array(obj({"grant_id": STRING, "amount": COUNT, "at": ADDRESS, "memo": STRING,
                         "created_at": COUNT}))})


async def account_credits(call: Call):
    asked = call.query.get("address")
    if asked is not None and asked.lower() != call.who:
        raise ApiError(403, "forbidden", "credits are shown to their own account only: sign the request "
                                         "with that account's key")
    return await call.runtime.charger.balance(call.who), 200


async def fog_get(call: Call):
    fog_id = call.runtime.fog_id
    genesis = await call.runtime.astore.get("fog", fog_id) if fog_id else None
    if genesis is None:
        raise ApiError(404, "not_found", "this node is not a member of a fog (or has not synced its genesis yet)")
    return genesis, 200


async def refuse_nonmember_nodes(call: Call, kind: str) -> None:
    """Credits held at (or moved to or from) a node that is not a member of this node's fog
    could never be spent or moved: refused here (422 not_a_member). Not validity (membership is
    the state's, not the op's): a peer's op naming one is accepted, and its credits stay put."""
    try:
        body = parse_json(call.body) if call.body else {}
    except StrictError:
        return  # the kind refuses it, saying why
    if not isinstance(body, dict):
        return
    fog_id = call.runtime.fog_id
    members = await call.runtime.astore.fog_members(fog_id) if fog_id else frozenset()
    for name in NODE_FIELDS[kind]:
        node = body.get(name)
        if isinstance(node, str) and node.lower() not in members:
            raise ApiError(422, "not_a_member", f"field {name!r}: {node} is not a node of this fog, so it "
                           "could never spend or move these credits; name one from `form node list` "
                           "(GET /node/list)")


async def shown_balance(call: Call, account: dict) -> dict:
    """An account answer with the view's balance as its `credits` (never below 0 there; the
    exact figures are GET /account/credits)."""
    figures = await call.runtime.charger.balance(account["address"])
    return {**account, "credits": max(0, figures["balance"])}


def endpoints() -> list[Endpoint]:
    return [
        Endpoint("GET", "/account/credits", "Your credits: balance, grants, earned, spent (a view of the "
                 "records, the same on every node)", "required", account_credits, tags=["credits"],
                 query={"address": {"type": "string"}}, answer=CREDITS_ANSWER),
        Endpoint("GET", "/fog", "This node's fog: its genesis record (treasury, split, policy)", "none", fog_get,
                 tags=["node"], answer={"type": "object"}),
    ]
