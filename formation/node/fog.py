"""This node's fog: made (a genesis), joined (an invite), or found again (its own member record).

An invite token is what one member hands to the operator of a new host: the invite a member
signed (kinds/fog_kinds.py: fog, inviter, serial, expiry, the invite key's address), the invite
key's secret (the claimant signs its own address with it) and where to reach the fog (bootstrap
multiaddrs). `fmi1.` + base64url of its JSON. A token is single-use: two nodes claiming one
admit neither (crdt/membership.py).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass

from formation.crdt.keys import PrivateKey, format_address
from formation.crdt.kinds import Invalid
from formation.crdt.kinds.fog_kinds import (
    Fog,
    Invite,
    Member,
    Policy,
    check_invite,
    claim_message,
    fog_id_of,
    invite_message,
)
from formation.crdt.schema import RecordError

TOKEN_PREFIX = "fmi1."
MAX_TOKEN = 8192
INVITE_SERIAL_META = "fog.invite_serial"  # the store's meta key of this node's last invite serial


class InviteError(ValueError):
    """A token that is not an invite, or one this node cannot use: what is wrong and what to do."""


@dataclass(frozen=True)
class InviteToken:
    invite: dict
    secret: str  # hex of the invite key
    bootstrap: tuple[str, ...]

    def encode(self) -> str:
        doc = {"invite": self.invite, "secret": self.secret, "bootstrap": list(self.bootstrap)}
        raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> InviteToken:
        text = text.strip()
        if not text.startswith(TOKEN_PREFIX) or len(text) > MAX_TOKEN:
            raise InviteError(f"not an invite token (it starts with {TOKEN_PREFIX!r}; "
                              "ask a member of the fog for one: `form invite create`)")
        body = text[len(TOKEN_PREFIX):]
        try:
            doc = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            invite = Invite.normalize(doc["invite"])
            key = PrivateKey(bytes.fromhex(doc["secret"]))
            bootstrap = tuple(str(a) for a in doc.get("bootstrap", []))[:16]
        except (ValueError, KeyError, TypeError, binascii.Error, RecordError) as exc:
            raise InviteError(f"the invite token is damaged ({exc}); copy it again whole") from None
        if format_address(key.address) != invite["key"]:
            raise InviteError("the invite token's key does not match its invite; copy it again whole")
        return cls(invite, doc["secret"], bootstrap)


def genesis(key: PrivateKey, *, name: str, now_ms: int, policy: dict | None = None) -> tuple[dict, dict]:
    """A new fog's genesis record and the genesis node's own member record."""
    me = format_address(key.address)
    fog = Fog.normalize({"fog_id": "0" * 32, "genesis": me, "name": name, "created_at": now_ms,
                         "policy": Policy.normalize(policy or {})})
    fog["fog_id"] = fog_id_of(fog)
    member = Member.normalize({"address": me, "fog_id": fog["fog_id"], "joined_at": now_ms})
    return fog, member


def make_invite(key: PrivateKey, fog_id: str, *, serial: int, expires_ms: int,
                bootstrap: list[str]) -> InviteToken:
    """An invite signed by this member: the `serial`-th node it admits, claimable until expiry."""
    invite_key = PrivateKey()
    inviter = format_address(key.address)
    ikey = format_address(invite_key.address)
    sig = key.personal_sign(invite_message(fog_id, inviter, serial, expires_ms, ikey))
    invite = Invite.normalize({"fog_id": fog_id, "inviter": inviter, "serial": serial,
                               "expires": expires_ms, "key": ikey, "signature": sig.hex()})
    return InviteToken(invite, invite_key.secret.hex(), tuple(bootstrap))


def check_usable(token: InviteToken, now_ms: int | None = None) -> None:
    """Raises InviteError when the token can no longer be claimed, or was never a member's."""
    try:
        check_invite(token.invite, "the invite")
    except Invalid as exc:
        raise InviteError(f"{exc.detail}: the token was altered or forged; ask for a new one") from None
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    if now_ms > token.invite["expires"]:
        raise InviteError("the invite expired; ask its member for a new one (`form invite create`)")


def claim(key: PrivateKey, token: InviteToken, *, now_ms: int) -> dict:
    """This node's member record, proving it holds the token's invite key."""
    invite = token.invite
    check_usable(token, now_ms)
    me = format_address(key.address)
    proof = PrivateKey(bytes.fromhex(token.secret)).personal_sign(claim_message(invite["fog_id"], me))
    return Member.normalize({"address": me, "fog_id": invite["fog_id"], "invite": invite,
                             "proof": proof.hex(), "joined_at": now_ms})
