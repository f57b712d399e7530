"""What a kind is, and the registry the core looks kinds up in.

The core (store.py) knows nothing about accounts or instances: it resolves the base value of a
(kind, key) from the op's `prev`, then asks the kind what the op makes of it. A kind answers
with the new value (None = deleted) or raises Invalid. That decision may read only the op and
the base value, both functions of the op's causal past, so every honest node decides the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from ..keys import format_address
from ..op import Op, OpError
from ..schema import Record, RecordError
from ..strict import StrictError, parse_json


class Invalid(OpError):
    """The op is well formed but breaks a rule of its kind (`code`, `detail` as for OpError)."""


@dataclass(frozen=True, slots=True)
class Intent:
    """A user's signed request, parsed: what they asked for, from which route."""

    kind: str
    action: str
    params: dict  # path parameters, e.g. {"id": ...}
    body: dict
    signer: str  # 0x-address of the user who signed the request
    ts: int  # unix seconds from the signed message
    write_id: bytes
    base: str = ""  # the record_version the request was made on ("" = none: a create)

    def derived_id(self) -> str:
        """An object id nobody but this request can produce (used when the body names none)."""
        return self.write_id.hex()[:32]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: str  # e.g. "/models/{id}"; params match one path segment
    action: str


class Kind:
    """Base of every kind. Override what the kind accepts; the defaults refuse."""

    name: ClassVar[str]
    record: ClassVar[type[Record]]
    routes: ClassVar[tuple[Route, ...]] = ()
    # index fields, see `index()`
    # True: the records are written by users' signed requests (a write DAG over the requests,
    # docs/state.md); False: by nodes about themselves (last writer by hlc wins).
    user_records: ClassVar[bool] = False

    def node_write(self, op: Op) -> dict | None:
        """The value a node's own op sets (None = deleted). Reads only the op: nodes write only
        records that are theirs alone, so no base is needed."""
        raise Invalid("unauthorized", f"{self.name} records are written by users, not by nodes")

    def user_write(self, intent: Intent, key: str, base: dict | None) -> dict | None:
        raise Invalid("unauthorized", f"{self.name} records are written by nodes, not by users")

    def demoted(self, before: dict | None, after: dict | None) -> frozenset[str]:
        """Principals whose rights a write lowered (before -> after). Their writes concurrent
        with it lose (docs/state.md, "access changes win")."""
        return frozenset()

    def key_of(self, intent: Intent) -> str:
        """The (kind, key) a user's request writes to; derived, never taken from the op."""
        raise Invalid("bad_request", f"{self.name} takes no user writes")

    def validate(self, value: Any, *, prefix: str = "") -> dict:
        try:
            return self.record.normalize(value, prefix=prefix)
        except RecordError as exc:
            raise Invalid("bad_field", f"{self.name} {exc}") from None

    def index(self, value: dict) -> dict:
        """Columns the op log indexes for queries: owner, type, and text for search."""
        return {"owner": value.get("owner"), "type": None, "text": None}


_REGISTRY: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    if not re.fullmatch(r"[a-z][a-z_]{0,31}", kind.name):
        raise ValueError(f"bad kind name {kind.name!r}")
    if kind.name in _REGISTRY:
        raise ValueError(f"kind {kind.name!r} registered twice")
    _REGISTRY[kind.name] = kind
    return kind


def registry() -> dict[str, Kind]:
    return dict(_REGISTRY)


def get_kind(name: str) -> Kind | None:
    return _REGISTRY.get(name)


# ---- helpers shared by kinds ----------------------------------------------------------------

def node_address(op: Op) -> str:
    return format_address(op.author)


def require_author_is_key(kind: str, op: Op) -> None:
    if op.key != node_address(op):
        raise Invalid("unauthorized", f"a {kind} record can only be written by its own key ({op.key})")


def json_object(body: bytes) -> dict:
    if not body:
        return {}
    try:
        value = parse_json(body)
    except StrictError as exc:
        raise Invalid("bad_request", f"request body: {exc}") from None
    if not isinstance(value, dict):
        raise Invalid("bad_request", "request body must be a JSON object")
    return value


def reject_fields(kind: str, body: dict, allowed: frozenset[str], privileged: frozenset[str]) -> None:
    for k in body:
        if k in privileged:
            raise Invalid("unauthorized", f"field {k!r} of a {kind} cannot be set by this request")
        if k not in allowed:
            raise Invalid("bad_field", f"field {k!r}: unknown or read-only field for a {kind}")
