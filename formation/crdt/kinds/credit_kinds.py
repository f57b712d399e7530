"""Kinds of the economy's credits (docs/economy.md): grants from the treasury, charges of calls.

- `grant` (a user record, key: derived from the grant request's signature): the fog's treasury
  gives `amount` credits to `to`. The request carries the fog's whole genesis record, so its
  validity reads only the op, as `expel` does: the record hashes to its fog id, names a
  treasury, and the treasury is the request's signer. A self-grant of anyone but the treasury,
  or a grant signed by any other key, is refused by every node. A grant is never changed or
  withdrawn. Which grants count (those of this node's own fog) is a view (crdt/credits.py).
- `charge` (a node record, key: "<consumer>:<agent_id>@<node>", written by that node alone):
  the calls of `consumer` to agent `agent_id` that the node admitted and proxied, and the
  credits they cost, cumulative (one bounded record per consumer, agent and node; the node
  rewrites it and never deletes it). `creator` is who the credits go to (the agent's owner
  when the node charged the call), less the hosting operator's share (the genesis's split).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..op import Op
from ..schema import TIMESTAMP, Record, address, field, integer, nested, text
from .base import Intent, Invalid, Kind, Route, node_address, reject_fields
from .fog_kinds import FOG_ID, Fog, fog_id_of

MAX_GRANT = 10**12  # credits in one grant
MAX_CREDITS = 2**62  # any counter of a charge
CREDITS = integer(0, MAX_CREDITS)
AGENT_ID = text(64, min_len=1, pattern=r"[A-Za-z0-9._-]+", what="an agent id")


@dataclass(frozen=True, slots=True)
class Grant(Record):
    grant_id: str = field(text(64, min_len=1))
    to: str = field(address)
    amount: int = field(integer(1, MAX_GRANT))
    fog_id: str = field(FOG_ID)
    treasury: str = field(address)  # the signer: the fog's treasury
    memo: str = field(text(256), default="")
    created_at: int = field(TIMESTAMP, default=0)


class GrantKind(Kind):
    """The treasury's signed grant: POST /credits/grant {to, amount, memo, fog}."""

    name = "grant"
    record = Grant
    user_records = True
    routes = (Route("POST", "/credits/grant", "create"),)

    def key_of(self, intent: Intent) -> str:
        if intent.base:
            raise Invalid("bad_request", "a grant names no base version: it is never changed")
        return intent.derived_id()  # nobody but this request's signer can make it

    def user_write(self, intent: Intent, key: str, base: dict | None) -> dict | None:
        if base is not None:
            raise Invalid("conflict", f"grant {key} already exists; a grant is never changed or withdrawn")
        body = intent.body
        reject_fields("grant", body, frozenset({"to", "amount", "memo", "fog"}),
                      frozenset({"grant_id", "treasury", "fog_id", "created_at"}))
        if not isinstance(body.get("fog"), dict):
            raise Invalid("bad_field", "grant field 'fog': the fog's genesis record (GET /fog) is required")
        try:
            fog = Fog.normalize(body["fog"])
        except ValueError as exc:
            raise Invalid("bad_field", f"grant field 'fog': {exc}") from None
        if fog["fog_id"] != fog_id_of(fog):
            raise Invalid("bad_field", "grant field 'fog': not a fog's genesis record (it does not hash to its id)")
        if fog["treasury"] is None:
            raise Invalid("unauthorized", f"fog {fog['fog_id']} has no treasury: no one grants credits in it")
        if intent.signer != fog["treasury"]:
            raise Invalid("unauthorized", f"credits are granted only by the fog's treasury {fog['treasury']}; "
                          f"{intent.signer} is not it")
        return self.validate({"grant_id": key, "to": body.get("to"), "amount": body.get("amount"),
                              "memo": body.get("memo", ""), "fog_id": fog["fog_id"],
                              "treasury": intent.signer, "created_at": intent.ts})

    def index(self, value: dict) -> dict:
        return {"owner": value["to"], "type": value["fog_id"], "text": value["treasury"]}


@dataclass(frozen=True, slots=True)
class Charge(Record):
    consumer: str = field(address)
    agent_id: str = field(AGENT_ID)
    node: str = field(address)  # the node that admitted and proxied the calls (and wrote this)
    creator: str = field(address)  # who is paid (less the operator's share): the agent's owner
    calls: int = field(CREDITS, default=0)
    credits: int = field(CREDITS, default=0)  # what the calls cost the consumer, in total
    tokens_in: int = field(CREDITS, default=0)
    tokens_out: int = field(CREDITS, default=0)
    updated_at: int = field(TIMESTAMP, default=0)


def charge_key(consumer: str, agent_id: str, node: str) -> str:
    return f"{consumer}:{agent_id}@{node}"


class ChargeKind(Kind):
    """Calls a node charged. Key: "<consumer>:<agent_id>@<node>", written by that node only."""

    name = "charge"
    record = Charge

    def node_write(self, op: Op) -> dict | None:
        head, sep, node = op.key.rpartition("@")
        consumer, sep2, agent_id = head.partition(":")
        if not sep or not sep2 or node != node_address(op):
            raise Invalid("unauthorized", "a charge key is '<consumer>:<agent_id>@<node>' and only that node writes it")
        if op.value is None:
            raise Invalid("bad_field", "charges are cumulative: they are rewritten, never deleted")
        value = self.validate(op.value)
        if (value["consumer"], value["agent_id"], value["node"]) != (consumer, agent_id, node):
            raise Invalid("bad_field", "charge fields 'consumer'/'agent_id'/'node': must match the key")
        return value

    def index(self, value: dict) -> dict:
        return {"owner": value["consumer"], "type": value["creator"], "text": value["node"]}
