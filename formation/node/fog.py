"""This node's fog: made (a genesis), joined (an invite), or found again (its own member record).

An invite token is what one member hands to the operator of a new host: the invite a member
signed (kinds/fog_kinds.py: fog, inviter, serial, expiry, the invite key's address), the invite
key's secret (the claimant signs its own address with it) and where to reach the fog (bootstrap
multiaddrs). `fmi1.` + base64url of its JSON. A token is single-use: two nodes claiming one
admit neither (crdt/membership.py).

Before a new host claims a token (`form join`, cli/join/) it syncs the fog's state and asks
`check_claimable` whether the claim could admit it; `standing` is what a data dir's state says of
its own node. Everything in a token and in the state came from others: it is checked, never
trusted (a token's bootstrap peers are only addresses to try, `bootstrap_peers`).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass
from pathlib import Path

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
    invite_id,
    invite_message,
)
from formation.crdt.schema import RecordError
from formation.crdt.store import Store

from .checks import Bad, Origin
from .checks import bootstrap as check_bootstrap

TOKEN_PREFIX = "fmi1."
MAX_TOKEN = 8192
MAX_BOOTSTRAP = 16  # peers taken from a token or from the state
MAX_MULTIADDR = 512
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


def genesis(key: PrivateKey, *, name: str, now_ms: int, policy: dict | None = None,
            treasury: str | None = None, operator_share_percent: int | None = None) -> tuple[dict, dict]:
    """A new fog's genesis record and the genesis node's own member record; `treasury` and
    `operator_share_percent` are its economy (docs/economy.md), left out when None."""
    me = format_address(key.address)
    fog = Fog.normalize({"fog_id": "0" * 32, "genesis": me, "name": name, "created_at": now_ms,
                         "policy": Policy.normalize(policy or {}), "treasury": treasury or None,
                         "operator_share_percent": operator_share_percent})
    fog["fog_id"] = fog_id_of(fog)
    member = Member.normalize({"address": me, "fog_id": fog["fog_id"], "joined_at": now_ms})
    return fog, member


def economy_of(config) -> dict:
    """The economy a genesis made with this node's settings names ([fog] treasury, split)."""
    return {"treasury": config.fog.treasury or None,
            "operator_share_percent": config.fog.operator_share_percent}


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


# ---- before a claim: what the fog's state says ---------------------------------------------------


def bootstrap_peers(addrs, limit: int = MAX_BOOTSTRAP) -> tuple[list[str], int]:
    """The usable peers among `addrs` (a token's or a record's: hostile strings) as formation.toml
    accepts them, without duplicates: (kept, how many were dropped)."""
    origin = Origin("an invite", None, Path("/"))
    kept: list[str] = []
    dropped = 0
    for addr in addrs:
        try:
            if not isinstance(addr, str) or len(addr) > MAX_MULTIADDR:
                raise Bad("not a multiaddr")
            check_bootstrap([addr], origin)
        except Bad:
            dropped += 1
            continue
        if addr not in kept and len(kept) < limit:
            kept.append(addr)
    return kept, dropped


@dataclass(frozen=True)
class Standing:
    """What a state says of one node: its own member record (a claim, or a genesis's record),
    the fog it names, and whether the fog's records admit the node now."""

    fog_id: str | None = None
    admitted: bool = False
    record: dict | None = None

    @property
    def genesis(self) -> bool:
        return self.record is not None and self.record.get("invite") is None


def standing(store: Store, me: str) -> Standing:
    record = store.get("member", me)
    if not isinstance(record, dict):
        return Standing()
    fog_id = record["fog_id"]
    return Standing(fog_id, me in store.fog_members(fog_id), record)


def same_invite(a: dict | None, b: dict) -> bool:
    return a is not None and a["signature"].lower() == b["signature"].lower()


def check_claimable(store: Store, token: InviteToken, me: str) -> bool:
    """Whether a claim of `token` by `me` could admit it, by the fog's records in `store` (synced
    from the fog's peers). Raises InviteError saying why not: the fog or the inviter unknown, the
    inviter no longer a member or out of admissions, the invite used by another node (or its
    serial handed out twice: either burns it), `me` expelled. True when the state already holds
    `me`'s claim of this very invite (a join that resumes), False when the invite is unused."""
    invite = token.invite
    fog_id, inviter = invite["fog_id"], invite["inviter"]
    fog = store.get("fog", fog_id)
    if fog is None:
        raise InviteError(f"the peers know no fog {fog_id} (its genesis record is not in their "
                          "state): the invite is not of their fog; ask a member of the fog for a "
                          "new invite, or give its peers with --bootstrap")
    if store.get("expel", f"{fog_id}:{me}") is not None:
        raise InviteError(f"this operator key ({me}) was expelled from fog {fog_id}")
    policy = fog["policy"]
    if policy["inviters"] == "genesis" and inviter != fog["genesis"]:
        raise InviteError(f"fog {fog_id} admits only nodes its genesis invites, and {inviter} "
                          "is not its genesis; ask the genesis for an invite")
    if invite["serial"] > policy["max_admits"]:
        raise InviteError(f"the invite is its inviter's admission {invite['serial']}, over the "
                          f"{policy['max_admits']} fog {fog_id} allows each member; ask another "
                          "member for an invite")
    if inviter not in store.fog_members(fog_id):
        raise InviteError(f"its inviter {inviter} is not (or no longer) a member of fog {fog_id}; "
                          "ask a member for a new invite")
    seal = store.get("admit", invite_id(invite))
    if seal is not None and seal["member"] != me:
        raise InviteError(f"the invite was already used: it admitted {seal['member']}; an invite "
                          "admits one node, ask for a new one (`form invite create`)")
    mine = False
    for claim in store.invited_by("member", fog_id, inviter):
        other = claim.get("invite")
        if other is None:
            continue
        if same_invite(other, invite):
            if claim["address"] != me:
                raise InviteError(f"the invite was already claimed by {claim['address']}; an invite "
                                  "admits one node (a second claim would void both), ask for a "
                                  "new one (`form invite create`)")
            mine = True
        elif other["inviter"] == inviter and other["serial"] == invite["serial"]:
            raise InviteError(f"its inviter handed out admission {invite['serial']} twice (another "
                              f"invite with it was claimed by {claim['address']}), so it admits "
                              "no one; ask for a new invite")
    return mine
