"""Credits (docs/economy.md).

    GET /account/credits   signed: the signer's balance in this node's view (start, granted,
                           earned, spent, balance), the grants that count and the fog's split
    GET /fog               unsigned: this node's fog's genesis record (what a grant carries)

A balance is a view of the records (crdt/credits.py), the same on every node that holds the same
records; `account.credits` in the account record is only what it started with (the account
answers show the view's balance in its place).
"""

from __future__ import annotations

from .http import ApiError, Call, Endpoint
from .schemas import ADDRESS, COUNT, INTEGER, STRING, array, nullable, obj

CREDITS_ANSWER = obj({
    "address": ADDRESS, "start": COUNT, "granted": COUNT, "earned": COUNT, "spent": COUNT, "calls": COUNT,
    "balance": INTEGER, "fog_id": nullable(STRING), "treasury": nullable(ADDRESS),
    "operator_share_percent": COUNT,
    "grants": array(obj({"grant_id": STRING, "amount": COUNT, "memo": STRING, "created_at": COUNT}))})


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
