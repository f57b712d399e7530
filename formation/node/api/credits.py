"""Credits (docs/economy.md).

    GET /account/credits   signed: the signer's balance in this node's view (start, granted,
                           moved, earned, spent, balance), its purses (what each node holds of
                           it), the grants that count and the fog's split
    GET /fog               unsigned: this node's fog's genesis record (what a grant carries)
    POST /agents/{id}/subscribe  signed, one use: buy a plan of an agent through this node
    POST /credits/grant, POST /credits/move: record writes (crdt/kinds/credit_kinds.py), with the
                           nodes they name checked here to be the fog's members (422)

A balance is a view of the records (crdt/credits.py), the same on every node that holds the same
records; `account.credits` in the account record is only what it started with (the account
answers show the view's balance in its place).
"""

from __future__ import annotations

from formation.crdt.kinds.owned import LEVELS, level_of
from formation.crdt.strict import StrictError, parse_json

from ..charging import InsufficientCredits, NoSuchPlan, NotNamed, Replayed, calls_left
from . import views
from .http import ApiError, Call, Endpoint, json_body
from .schemas import ADDRESS, COUNT, INTEGER, STRING, array, nullable, obj

NODE_FIELDS = {"grant": ("at",), "credit_move": ("from_node", "to_node")}  # fields naming a node

CREDITS_ANSWER = obj({
    "address": ADDRESS, "start": COUNT, "granted": COUNT, "moved_in": COUNT, "earned": COUNT, "spent": COUNT,
    "moved_out": COUNT, "calls": COUNT, "balance": INTEGER,
    "purses": array(obj({"node": ADDRESS, "granted": COUNT, "moved_in": COUNT, "earned": COUNT, "spent": COUNT,
                         "moved_out": COUNT, "calls": COUNT, "held": INTEGER})), "fog_id": nullable(STRING), "treasury": nullable(ADDRESS),
    "operator_share_percent": COUNT,
    "subscriptions": array(obj({"agent_id": STRING, "node": ADDRESS, "plan": STRING, "calls_left": COUNT,
                                "calls_used": COUNT, "expires_at": COUNT})),
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


SUBSCRIBE_BODY = obj({"plan": STRING})
SUBSCRIPTION_ANSWER = obj({"agent_id": STRING, "node": ADDRESS, "plan": STRING, "calls_left": COUNT,
                           "calls_used": COUNT, "expires_at": COUNT, "credits": COUNT, "purchases": COUNT})


async def agent_subscribe(call: Call):
    """Buy a plan of an agent through this node: its price leaves the caller's purse here, and
    its calls are admitted through this node (docs/economy.md, "Plans")."""
    body = json_body(call.body)
    plan = body.get("plan")
    if not isinstance(plan, str) or set(body) != {"plan"}:
        raise ApiError(400, "bad_request", "body must be {\"plan\": NAME} (a plan of the agent: `form agent get ID`)")
    agent = await views.visible_or_404(call, "agent", call.params["id"])
    if agent.get("is_private") and level_of(agent, call.who) < LEVELS[views.HIRE_LEVEL]:
        raise ApiError(403, "forbidden", f"agent {agent['agent_id']} is private: its plans are sold to those "
                                         f"who may hire it (level {views.HIRE_LEVEL})")
    if call.who == agent["owner"]:
        raise ApiError(409, "conflict", "an agent's owner calls it free: it buys no plan of it")
    if not await call.runtime.charger.economy():
        raise ApiError(409, "no_economy", "this fog has no treasury, so nothing is sold or charged in it "
                                          "(docs/economy.md): call the agent directly")
    try:
        call.runtime.charger.take_signature(call.signed.signature, call.query.get("node"))
    except (Replayed, NotNamed) as exc:
        raise views.one_use_refusal(exc, call.runtime.address) from None
    try:
        sub = await call.runtime.charger.subscribe(call.who, agent, plan)
    except NoSuchPlan:
        offered = ", ".join(sorted(agent.get("plans") or {})) or "none"
        raise ApiError(404, "no_such_plan", f"agent {agent['agent_id']} sells no plan {plan!r} (its plans: "
                                            f"{offered})") from None
    except InsufficientCredits as exc:
        raise ApiError(402, "insufficient_credits",
                       f"plan {plan!r} of agent {agent['agent_id']} costs {exc.price} credits and {call.who} has "
                       f"{exc.available} available at this node ({call.runtime.address}); see `form account "
                       "credits`; move credits here with `form account move`",
                       extra={"balance": exc.balance, "available": exc.available, "price": exc.price,
                              "elsewhere": exc.elsewhere}) from None
    now = sub["updated_at"]
    return {"agent_id": sub["agent_id"], "node": sub["node"], "plan": sub["plan"], "calls_left": calls_left(sub, now),
            "calls_used": sub["calls_used"], "expires_at": sub["expires_at"], "credits": sub["credits"],
            "purchases": sub["purchases"]}, 200


def endpoints() -> list[Endpoint]:
    return [
        Endpoint("GET", "/account/credits", "Your credits: balance, grants, earned, spent (a view of the "
                 "records, the same on every node)", "required", account_credits, tags=["credits"],
                 query={"address": {"type": "string"}}, answer=CREDITS_ANSWER),
        Endpoint("POST", "/agents/{id}/subscribe", "Buy a plan of an agent through this node (its calls are "
                 "admitted through this node)", "required", agent_subscribe, body=SUBSCRIBE_BODY, tags=["credits"],
                 answer=SUBSCRIPTION_ANSWER),
        Endpoint("GET", "/fog", "This node's fog: its genesis record (treasury, split, policy)", "none", fog_get,
                 tags=["node"], answer={"type": "object"}),
    ]
