"""Kinds of the economy's credits (docs/economy.md). Every credit is held by an account AT a node
(a purse: account x node), and only that node ever takes credits out of it; that is what keeps
two nodes from spending the same credits during a partition.

- `grant` (a user record, key: derived from the grant request's signature): the fog's treasury
  gives `amount` credits to `to`, held at node `at`. The request carries the fog's whole genesis
  record, so its validity reads only the op, as `expel` does: the record hashes to its fog id,
  names a treasury, and the treasury is the request's signer. A self-grant of anyone but the
  treasury, or a grant signed by any other key, is refused by every node. A grant is never
  changed or withdrawn. Which grants count (those of this node's own fog) is a view
  (crdt/credits.py).
- `charge` (a node record, key: "<consumer>:<agent_id>:<host>@<node>", written by that node
  alone): the calls of `consumer` to agent `agent_id` that `node` admitted and proxied to a
  replica on `host`, and the credits they cost, cumulative (one bounded record per consumer,
  agent, host and node; rewritten, never deleted). The credits leave the consumer's purse at
  `node`; `creator` (the agent's owner) gets them less the operator's share, which goes to
  `host`'s operator (a node's address is its operator's account), both in purses at `node`.
- `credit_move` (a user record, key: derived from the request's signature): the account that
  signed it asks node `from_node` to move `amount` of its credits held there to `to_node`.
- `credit_moved` (a node record, key: "<request id>@<node>", written by that node alone): the node
  took `amount` of `account`'s credits out of its purse there and put them in the purse at
  `to_node`, once per request (the key is the request's).
- `subscription` (a node record, key: "<consumer>:<agent_id>@<node>"): plans bought through the
  node and the calls used of them.
- `rent` (a node record, key: "<payer>:<instance_id>@<node>", written by that node alone): the
  hours of instance time the node charged `payer` (the instance's owner) for its replica of an
  instance bound to a priced model, paid in advance, cumulative.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..op import Op
from ..schema import TIMESTAMP, Record, address, field, integer, text
from .base import Intent, Invalid, Kind, Route, node_address, reject_fields
from .fog_kinds import FOG_ID, Fog, fog_id_of

MAX_GRANT = 10**12  # credits in one grant
MAX_CREDITS = 2**62  # any counter of a charge
CREDITS = integer(0, MAX_CREDITS)
AGENT_ID = text(64, min_len=1, pattern=r"[A-Za-z0-9._-]+", what="an agent id")


class SignedOnce(Kind):
    """A user's request kept as it was made: its key derives from the request's signature (nobody
    else can make it), and it is never changed or withdrawn."""

    user_records = True

    def key_of(self, intent: Intent) -> str:
        if intent.base:
            raise Invalid("bad_request", f"a {self.name} names no base version: it is never changed")
        return intent.derived_id()

    def user_write(self, intent: Intent, key: str, base: dict | None) -> dict | None:
        if base is not None:
            raise Invalid("conflict", f"{self.name} {key} already exists; it is never changed or withdrawn")
        return self.made(intent, key)

    def made(self, intent: Intent, key: str) -> dict:
        raise NotImplementedError


class NodeLedger(Kind):
    """A node's own cumulative record of credits it moved: key "<f1>:...:<fn>@<node>" (KEY_FIELDS
    then the writer), written by that node alone, rewritten and never deleted."""

    KEY_FIELDS: tuple[str, ...] = ()
    NODE_FIELD = "node"
    # the index (owner, type, text): who pays, who is paid, the third party; an account's
    # credits are found through them (node/charging.py)
    ROLES: tuple[str, str, str] = ("", "", "")

    def node_write(self, op: Op) -> dict | None:
        head, sep, node = op.key.rpartition("@")
        parts = tuple(head.split(":")) if self.KEY_FIELDS[1:] else (head,)
        shape = ":".join(f"<{f}>" for f in self.KEY_FIELDS) + "@<node>"
        if not sep or len(parts) != len(self.KEY_FIELDS) or not all(parts) or node != node_address(op):
            raise Invalid("unauthorized", f"a {self.name} key is '{shape}' and only that node writes it")
        if op.value is None:
            raise Invalid("bad_field", f"{self.name} records are cumulative: rewritten, never deleted")
        value = self.validate(op.value)
        fields = (*self.KEY_FIELDS, self.NODE_FIELD)
        if tuple(value[f] for f in fields) != (*parts, node):
            raise Invalid("bad_field", f"{self.name} fields {', '.join(repr(f) for f in fields)}: must match the key")
        self.check(value)
        return value

    def check(self, value: dict) -> None:
        """What else the record must hold (Invalid otherwise)."""

    def index(self, value: dict) -> dict:
        return dict(zip(("owner", "type", "text"), (value[r] for r in self.ROLES), strict=True))


@dataclass(frozen=True, slots=True)
class Grant(Record):
    grant_id: str = field(text(64, min_len=1))
    to: str = field(address)
    amount: int = field(integer(1, MAX_GRANT))
    at: str = field(address)  # the node that holds the credits (the only one that spends them)
    fog_id: str = field(FOG_ID)
    treasury: str = field(address)  # the signer: the fog's treasury
    memo: str = field(text(256), default="")
    created_at: int = field(TIMESTAMP, default=0)


class GrantKind(SignedOnce):
    """The treasury's signed grant: POST /credits/grant {to, amount, at, memo, fog}."""

    name = "grant"
    record = Grant
    routes = (Route("POST", "/credits/grant", "create"),)

    def made(self, intent: Intent, key: str) -> dict:
        body = intent.body
        reject_fields("grant", body, frozenset({"to", "amount", "at", "memo", "fog"}),
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
                              "at": body.get("at"), "memo": body.get("memo", ""), "fog_id": fog["fog_id"],
                              "treasury": intent.signer, "created_at": intent.ts})

    def index(self, value: dict) -> dict:
        return {"owner": value["to"], "type": value["fog_id"], "text": value["at"]}


@dataclass(frozen=True, slots=True)
class Charge(Record):
    consumer: str = field(address)
    agent_id: str = field(AGENT_ID)
    host: str = field(address)  # the node whose replica answered: its operator gets the share
    node: str = field(address)  # the node that admitted and proxied the calls (and wrote this)
    creator: str = field(address)  # who is paid (less the operator's share): the agent's owner
    calls: int = field(CREDITS, default=0)
    credits: int = field(CREDITS, default=0)  # what the calls cost the consumer, in total
    tokens_in: int = field(CREDITS, default=0)
    tokens_out: int = field(CREDITS, default=0)
    updated_at: int = field(TIMESTAMP, default=0)


def charge_key(consumer: str, agent_id: str, host: str, node: str) -> str:
    return f"{consumer}:{agent_id}:{host}@{node}"


class ChargeKind(NodeLedger):
    """Calls a node charged. Key: "<consumer>:<agent_id>:<host>@<node>", written by that node only."""

    name = "charge"
    record = Charge
    KEY_FIELDS = ("consumer", "agent_id", "host")
    ROLES = ("consumer", "creator", "host")

    def check(self, value: dict) -> None:
        if value["consumer"] == value["creator"]:
            raise Invalid("bad_field", "a creator's calls of its own agent are free: no charge names it both "
                                       "consumer and creator")



@dataclass(frozen=True, slots=True)
class CreditMove(Record):
    move_id: str = field(text(64, min_len=1))
    account: str = field(address)  # the signer: whose credits move
    from_node: str = field(address)
    to_node: str = field(address)
    amount: int = field(integer(1, MAX_GRANT))
    created_at: int = field(TIMESTAMP, default=0)


class CreditMoveKind(SignedOnce):
    """An account's signed request: POST /credits/move {from_node, to_node, amount}."""

    name = "credit_move"
    record = CreditMove
    routes = (Route("POST", "/credits/move", "create"),)

    def made(self, intent: Intent, key: str) -> dict:
        body = intent.body
        reject_fields("credit_move", body, frozenset({"from_node", "to_node", "amount"}),
                      frozenset({"move_id", "account", "created_at"}))
        value = self.validate({"move_id": key, "account": intent.signer, "from_node": body.get("from_node"),
                               "to_node": body.get("to_node"), "amount": body.get("amount"),
                               "created_at": intent.ts})
        if value["from_node"] == value["to_node"]:
            raise Invalid("bad_field", "credit move: 'from_node' and 'to_node' are the same node")
        return value

    def index(self, value: dict) -> dict:
        return {"owner": value["account"], "type": value["from_node"], "text": value["to_node"]}


@dataclass(frozen=True, slots=True)
class CreditMoved(Record):
    move_id: str = field(text(64, min_len=1))
    account: str = field(address)
    from_node: str = field(address)  # the writer: the node the credits left
    to_node: str = field(address)
    amount: int = field(integer(1, MAX_GRANT))
    moved_at: int = field(TIMESTAMP, default=0)


class CreditMovedKind(NodeLedger):
    """A move a node carried out. Key: "<move_id>@<node>", written by that node (its from_node) only."""

    name = "credit_moved"
    record = CreditMoved
    KEY_FIELDS = ("move_id",)
    ROLES = ("account", "to_node", "from_node")
    NODE_FIELD = "from_node"

    def check(self, value: dict) -> None:
        if value["to_node"] == value["from_node"]:
            raise Invalid("bad_field", "credit_moved: 'to_node' is the writer itself")



@dataclass(frozen=True, slots=True)
class Subscription(Record):
    consumer: str = field(address)
    agent_id: str = field(AGENT_ID)
    node: str = field(address)  # the node that sold it (and wrote this): the only one that admits its calls
    creator: str = field(address)  # who was paid for it (less the node operator's share)
    plan: str = field(text(32, min_len=1))  # the plan last bought
    purchases: int = field(CREDITS, default=0)
    credits: int = field(CREDITS, default=0)  # what the purchases cost the consumer, in total
    calls_bought: int = field(CREDITS, default=0)  # calls usable in all, cumulative (forfeited ones included)
    calls_used: int = field(CREDITS, default=0)
    expires_at: int = field(TIMESTAMP, default=0)  # unix ms: the calls left are forfeited after it
    updated_at: int = field(TIMESTAMP, default=0)


def subscription_key(consumer: str, agent_id: str, node: str) -> str:
    return f"{consumer}:{agent_id}@{node}"


class SubscriptionKind(NodeLedger):
    """A consumer's plan of an agent, sold by one node. Key: "<consumer>:<agent_id>@<node>"."""

    name = "subscription"
    record = Subscription
    KEY_FIELDS = ("consumer", "agent_id")
    ROLES = ("consumer", "creator", "node")

    def check(self, value: dict) -> None:
        if value["consumer"] == value["creator"]:
            raise Invalid("bad_field", "a creator does not buy plans of its own agent")
        if value["calls_used"] > value["calls_bought"]:
            raise Invalid("bad_field", "subscription: 'calls_used' is more than 'calls_bought'")



@dataclass(frozen=True, slots=True)
class Rent(Record):
    payer: str = field(address)  # the instance's owner
    instance_id: str = field(text(64, min_len=1))
    node: str = field(address)  # the hosting node (and writer): its operator takes the share
    creator: str = field(address)  # the model's owner: who is paid
    model_id: str = field(text(128, min_len=1))
    hours: int = field(CREDITS, default=0)
    credits: int = field(CREDITS, default=0)
    paid_until: int = field(TIMESTAMP, default=0)  # unix ms: the hours paid run until then
    updated_at: int = field(TIMESTAMP, default=0)


def rent_key(payer: str, instance_id: str, node: str) -> str:
    return f"{payer}:{instance_id}@{node}"


class RentKind(NodeLedger):
    """Hours of a replica's time a hosting node charged. Key: "<payer>:<instance_id>@<node>"."""

    name = "rent"
    record = Rent
    KEY_FIELDS = ("payer", "instance_id")
    ROLES = ("payer", "creator", "node")

    def check(self, value: dict) -> None:
        if value["payer"] == value["creator"]:
            raise Invalid("bad_field", "a model's owner pays no rent for its own model")
