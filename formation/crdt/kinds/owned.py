"""Records that users own: create, update, delete, authorize others at a level, transfer.

Levels: owner > manager > operator > read_only.
- read_only: may read a private record (enforced by the API, reads are not ops).
- operator:  + lifecycle actions (instance start/stop/restart).
- manager:   + change the record's settable fields; grant or revoke operator/read_only.
- owner:     + delete, transfer, grant or revoke managers.
"""

from __future__ import annotations

from typing import ClassVar

from ..schema import OBJECT_ID, address
from .base import Intent, Invalid, Kind, Route, reject_fields

LEVELS = {"read_only": 1, "operator": 2, "manager": 3, "owner": 4}
GRANTABLE = ("manager", "operator", "read_only")
PRIVILEGED = frozenset({"owner", "authorized", "created_at", "updated_at"})


def level_of(record: dict, who: str) -> int:
    if record.get("owner") == who:
        return LEVELS["owner"]
    return LEVELS.get(record.get("authorized", {}).get(who, ""), 0)


def _need(kind: str, record: dict, who: str, level: str, what: str) -> None:
    if level_of(record, who) < LEVELS[level]:
        raise Invalid("unauthorized", f"{what} a {kind} needs level {level}; {who} does not have it")


class OwnedKind(Kind):
    id_field: ClassVar[str]
    settable: ClassVar[frozenset[str]]  # fields a manager may set (and the creator on create)
    user_records = True

    def key_of(self, intent: Intent) -> str:
        if intent.action == "create":
            # The id derives from the create request's signature: no one but its signer can
            # make a create for it, so a create can never land on someone else's record.
            derived = intent.derived_id()
            given = intent.body.get(self.id_field)
            if given is not None and given != derived:
                raise Invalid("bad_field", f"field {self.id_field!r}: ids are assigned by the fog (the first 32 hex "
                              "digits of SHA-256 of the create's signature); omit it")
            if intent.base:
                raise Invalid("bad_request", "a create names no base version")
            return derived
        if "id" in intent.params:
            return self._check_id(intent.params["id"])
        given = intent.body.get(self.id_field)  # the original's POST /instance/update form
        if isinstance(given, str) and given:
            return self._check_id(given)
        raise Invalid("bad_field", f"field {self.id_field!r}: is required")

    def _check_id(self, value) -> str:
        try:
            return OBJECT_ID(value)
        except ValueError as exc:
            raise Invalid("bad_field", f"{self.name} id: {exc}") from None

    def demoted(self, before: dict | None, after: dict | None) -> frozenset[str]:
        if before is None:
            return frozenset()
        who = {before["owner"], *before.get("authorized", {})}
        return frozenset(p for p in who if after is None or level_of(after, p) < level_of(before, p))

    def user_write(self, intent: Intent, key: str, base: dict | None) -> dict | None:
        action = intent.action
        if action == "create":
            if base is not None:
                raise Invalid("conflict", f"{self.name} {key} already exists")
            fields = dict(intent.body)
            fields.pop(self.id_field, None)
            reject_fields(self.name, fields, self.settable, PRIVILEGED)
            value = {**fields, self.id_field: key, "owner": intent.signer, "authorized": {},
                     "created_at": intent.ts, "updated_at": intent.ts}
            return self.validate(value)
        if base is None:
            raise Invalid("not_found", f"{self.name} {key} does not exist")
        handler = getattr(self, "_" + action, None)
        if handler is None:
            raise Invalid("bad_request", f"{self.name} has no action {action!r}")
        return handler(intent, key, base)

    def _update(self, intent: Intent, key: str, base: dict) -> dict:
        _need(self.name, base, intent.signer, "manager", "changing")
        fields = {k: v for k, v in intent.body.items() if not (k == self.id_field and v == key)}
        reject_fields(self.name, fields, self.settable, PRIVILEGED | {self.id_field})
        return self.validate({**base, **fields, "updated_at": max(intent.ts, base["updated_at"])})

    def _delete(self, intent: Intent, key: str, base: dict) -> None:
        _need(self.name, base, intent.signer, "owner", "deleting")
        return None

    def _authorize(self, intent: Intent, key: str, base: dict) -> dict:
        body = intent.body
        reject_fields(self.name, body, frozenset({"address", "level"}), frozenset())
        try:
            who = address(body.get("address"))
        except ValueError as exc:
            raise Invalid("bad_field", f"field 'address': {exc}") from None
        level = body.get("level")
        if level is not None and level not in GRANTABLE:
            raise Invalid("bad_field", f"field 'level': must be one of {', '.join(GRANTABLE)} or null")
        if who == base["owner"]:
            raise Invalid("unprocessable", "the owner already has every right")
        mine = level_of(base, intent.signer)
        current = base["authorized"].get(who)
        # You may grant or revoke only levels strictly below your own.
        for lv in (level, current):
            if lv is not None and mine <= LEVELS[lv]:
                raise Invalid("unauthorized", f"granting or revoking {lv} needs a higher level than yours")
        if mine < LEVELS["manager"]:
            raise Invalid("unauthorized", f"authorizing users on a {self.name} needs level manager")
        authorized = dict(base["authorized"])
        if level is None:
            authorized.pop(who, None)
        else:
            authorized[who] = level
        return self.validate({**base, "authorized": authorized, "updated_at": max(intent.ts, base["updated_at"])})

    def _transfer(self, intent: Intent, key: str, base: dict) -> dict:
        _need(self.name, base, intent.signer, "owner", "transferring")
        reject_fields(self.name, intent.body, frozenset({"to"}), frozenset())
        try:
            to = address(intent.body.get("to"))
        except ValueError as exc:
            raise Invalid("bad_field", f"field 'to': {exc}") from None
        authorized = {a: lv for a, lv in base["authorized"].items() if a != to}
        return self.validate({**base, "owner": to, "authorized": authorized,
                              "updated_at": max(intent.ts, base["updated_at"])})

    def index(self, value: dict) -> dict:
        return {"owner": value.get("owner"), "type": None, "text": None}


def owned_routes(base: str, *, create: tuple[str, str], update: tuple[str, str],
                 delete: tuple[str, str], extra: tuple[str, ...] = ()) -> tuple[Route, ...]:
    routes = [Route(create[0], create[1], "create"), Route(update[0], update[1], "update"),
              Route(delete[0], delete[1], "delete"),
              Route("POST", f"{base}/{{id}}/authorize", "authorize"),
              Route("POST", f"{base}/{{id}}/transfer", "transfer")]
    routes += [Route("POST", f"{base}/{{id}}/{a}", a) for a in extra]
    return tuple(routes)
