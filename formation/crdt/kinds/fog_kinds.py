"""Kinds of fog membership: the fog's genesis, a node's membership claim, an expulsion.

Every op here is self-certifying, so its validity reads only the op (the one validity function):
- `fog` (key: the fog id) is written by its genesis node; the fog id is a hash of the genesis
  record itself, so nobody can make another genesis with the same id.
- `member` (key: the node's address, written by that node) carries the invite a member signed
  (fog, inviter, serial, expiry, the invite key's address) and the proof that the claimant holds
  the invite key (its signature over the claimant's address). The genesis node's own record has
  no invite.
- `leave` (key: the node's address, written by that node): it left the fog.
- `admit` (key: the invite's id) is the inviter's seal: the one claimant its invite admits.
- `expel` (key: "<fog id>:<address>") is written by the fog's genesis node and carries the fog's
  genesis record, so the op shows that its author is that fog's genesis.

Whether a claim admits its node depends on other records (is the inviter a member? was the
invite used twice?): that is not validity but a view, computed the same way by every node from
the same records (crdt/membership.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from .. import hlc
from ..keys import SignatureError, format_address, recover_personal
from ..op import Op
from ..schema import (
    TIMESTAMP,
    Record,
    address,
    field,
    integer,
    nested,
    one_of,
    optional,
    text,
)
from .base import Invalid, Kind, node_address
from .node_kinds import SelfRecordKind

FOG_ID = text(32, min_len=32, pattern=r"[0-9a-f]{32}", what="32 lowercase hex digits")
SIGNATURE = text(132, min_len=130, pattern=r"(0x)?[0-9a-fA-F]{130}", what="a 65-byte signature in hex")
MAX_ADMITS = 1024


@dataclass(frozen=True, slots=True)
class Policy(Record):
    inviters: str = field(one_of("members", "genesis"), default="members")  # who may invite
    max_admits: int = field(integer(0, MAX_ADMITS), default=16)  # nodes each inviter may admit


@dataclass(frozen=True, slots=True)
class Fog(Record):
    fog_id: str = field(FOG_ID)
    genesis: str = field(address)
    name: str = field(text(64), default="")
    created_at: int = field(TIMESTAMP, default=0)
    policy: dict = field(nested(Policy), factory=lambda: Policy().to_dict())
    # the economy (docs/economy.md), added after the first fogs were made: left out of the hash
    # when None (LATER_FIELDS), so an older genesis keeps its id
    treasury: str | None = field(optional(address), default=None)  # the only key whose grants count
    operator_share_percent: int | None = field(optional(integer(0, 100)), default=None)  # None: 20


LATER_FIELDS = ("treasury", "operator_share_percent")  # hashed only when set
DEFAULT_OPERATOR_SHARE_PERCENT = 20


def operator_share_percent(fog: dict | None) -> int:
    v = fog.get("operator_share_percent") if fog else None
    return DEFAULT_OPERATOR_SHARE_PERCENT if v is None else v


def fog_id_of(fog: dict) -> str:
    """The id a genesis record names itself by: a hash of everything else in it (the fields of
    LATER_FIELDS only when set, so that a genesis made before they existed keeps its id)."""
    body = {k: v for k, v in fog.items() if k != "fog_id" and not (k in LATER_FIELDS and v is None)}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Invite(Record):
    fog_id: str = field(FOG_ID)
    inviter: str = field(address)
    serial: int = field(integer(1, MAX_ADMITS))  # the inviter's n-th admission
    expires: int = field(TIMESTAMP)  # unix ms after which a claim dated later is refused
    key: str = field(address)  # the invite key's address; its secret travels in the invite token
    signature: str = field(SIGNATURE)  # the inviter's, over invite_message(...)


def invite_message(fog_id: str, inviter: str, serial: int, expires: int, key: str) -> bytes:
    return f"formation invite {fog_id} {inviter} {serial} {expires} {key}".encode()


def claim_message(fog_id: str, member: str) -> bytes:
    return f"formation join {fog_id} {member}".encode()


@dataclass(frozen=True, slots=True)
class Member(Record):
    address: str = field(address)
    fog_id: str = field(FOG_ID)
    invite: dict | None = field(optional(nested(Invite)), default=None)  # None: the genesis node
    proof: str | None = field(optional(SIGNATURE), default=None)  # the invite key's, over claim_message
    joined_at: int = field(TIMESTAMP, default=0)


def _signer(message: bytes, signature: str, what: str) -> str:
    try:
        return format_address(recover_personal(message, signature))
    except (SignatureError, ValueError) as exc:
        raise Invalid("bad_field", f"{what}: {exc}") from None


class FogKind(Kind):
    name = "fog"
    record = Fog

    def node_write(self, op: Op) -> dict | None:
        if op.value is None:
            raise Invalid("unauthorized", "a fog's genesis record is never deleted")
        value = self.validate(op.value)
        if value["genesis"] != node_address(op):
            raise Invalid("unauthorized", "a fog's genesis record is written by its genesis node")
        if value["fog_id"] != fog_id_of(value) or op.key != value["fog_id"]:
            raise Invalid("bad_field", "fog field 'fog_id': must be the hash of the genesis record, and the key")
        return value

    def index(self, value: dict) -> dict:
        return {"owner": value["genesis"], "type": None, "text": value["name"] or None}


class MemberKind(SelfRecordKind):
    name = "member"
    record = Member

    def node_write(self, op: Op) -> dict | None:
        value = super().node_write(op)
        if value is None:
            return None
        invite = value["invite"]
        if invite is None:
            if value["proof"] is not None:
                raise Invalid("bad_field", "member field 'proof': only with an invite")
            return value  # a genesis node's own record: a member iff it is the fog's genesis
        if invite["fog_id"] != value["fog_id"]:
            raise Invalid("bad_field", "member field 'invite': for another fog")
        check_invite(invite, "member field 'invite'")
        if value["proof"] is None or _signer(claim_message(value["fog_id"], value["address"]),
                                             value["proof"], "member field 'proof'") != invite["key"]:
            raise Invalid("bad_field", "member field 'proof': not signed with the invite's key")
        if hlc.to_ms(op.hlc) > invite["expires"]:
            raise Invalid("bad_field", "member field 'invite': expired before this claim")
        return value

    def index(self, value: dict) -> dict:
        return {"owner": value["address"], "type": value["fog_id"], "text": None}


def invite_id(invite: dict) -> str:
    """An invite's id: a hash of its signature (what its seal is keyed by)."""
    sig = invite["signature"].lower().removeprefix("0x")
    return hashlib.sha256(bytes.fromhex(sig)).hexdigest()[:32]


def check_invite(invite: dict, what: str = "invite") -> None:
    """Raises Invalid unless the invite is signed by the inviter it names."""
    signer = _signer(invite_message(invite["fog_id"], invite["inviter"], invite["serial"],
                                    invite["expires"], invite["key"]), invite["signature"], f"{what}.signature")
    if signer != invite["inviter"]:
        raise Invalid("bad_field", f"{what}.signature: not the inviter's")


@dataclass(frozen=True, slots=True)
class Admit(Record):
    invite: dict = field(nested(Invite))
    member: str = field(address)  # the one claimant this invite admits


class AdmitKind(Kind):
    """The inviter seals its invite to the first node that claimed it (key: the invite's id):
    from then on another claim of the same invite admits no one and voids nothing, so a token
    that leaks after use cannot evict the node that used it."""

    name = "admit"
    record = Admit

    def node_write(self, op: Op) -> dict | None:
        if op.value is None:
            raise Invalid("unauthorized", "a seal is never withdrawn")
        value = self.validate(op.value)
        invite = value["invite"]
        if invite["inviter"] != node_address(op):
            raise Invalid("unauthorized", "an invite is sealed by its inviter")
        check_invite(invite, "admit field 'invite'")
        if op.key != invite_id(invite):
            raise Invalid("bad_field", "an admit key is the id of its invite")
        return value

    def index(self, value: dict) -> dict:
        return {"owner": value["member"], "type": value["invite"]["fog_id"], "text": None}


@dataclass(frozen=True, slots=True)
class Leave(Record):
    address: str = field(address)
    fog_id: str = field(FOG_ID)


class LeaveKind(SelfRecordKind):
    """A node leaves its fog (key: its address, written by it). Its claim stays: it still vouches
    for the nodes it admitted."""

    name = "leave"
    record = Leave

    def index(self, value: dict) -> dict:
        return {"owner": value["address"], "type": value["fog_id"], "text": None}


@dataclass(frozen=True, slots=True)
class Expel(Record):
    fog: dict = field(nested(Fog))
    address: str = field(address)
    reason: str = field(text(512), default="")


class ExpelKind(Kind):
    """The fog's genesis expels a member, and with it every node admitted through it."""

    name = "expel"
    record = Expel

    def node_write(self, op: Op) -> dict | None:
        fog_id, sep, who = op.key.partition(":")
        if op.value is None:
            raise Invalid("unauthorized", "an expulsion is never withdrawn (admit the node again)")
        value = self.validate(op.value)
        fog = value["fog"]
        if fog["genesis"] != node_address(op) or fog["fog_id"] != fog_id_of(fog):
            raise Invalid("unauthorized", "only the fog's genesis node expels members")
        if not sep or fog_id != fog["fog_id"] or who != value["address"]:
            raise Invalid("bad_field", "an expel key is '<fog id>:<address>' of its fields")
        return value

    def index(self, value: dict) -> dict:
        return {"owner": value["address"], "type": value["fog"]["fog_id"], "text": None}
