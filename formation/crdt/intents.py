"""From a user's signed request to the write it asks for: a pure, versioned function.

The signed message (DESIGN.md §2) is `"<METHOD> <PATH?QUERY> <unix-seconds> <sha256-hex(body)>"`.
Every node runs `parse_request` on the request carried in an op and gets the same Intent, so a
relaying node cannot alter what the user asked for. Routes come from the registered kinds; the
API serves the same table, so there is one definition of what each write path means.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from .hlc import MAX_TS
from .kinds.base import Intent, Invalid, Kind, Route, json_object, registry
from .op import UserRequest

DERIVE_VERSION = 2
API_PREFIX = "/v1"
MAX_BODY = 48 * 1024

_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
_SEGMENT = r"([A-Za-z0-9._~@:-]{1,256})"


def canonical_message(method: str, path_query: str, ts: int, body: bytes) -> str:
    """The exact string a client signs for a request."""
    return f"{method.upper()} {path_query} {int(ts)} {hashlib.sha256(body).hexdigest()}"


def version_of(write_ids: Iterable[bytes]) -> str:
    """The version of a user record: names the set of writes (heads) a request was made on.

    32 hex digits of SHA-256 over the sorted write ids; "" for a record with no writes yet.
    A client reads it from the record (`record_version`) and signs it as `?base=...`.
    """
    ids = sorted(set(write_ids))
    return hashlib.sha256(b"".join(ids)).hexdigest()[:32] if ids else ""


def with_base(path_query: str, base: str) -> str:
    """`path_query` with the version it is written on (what a client signs)."""
    if not base:
        return path_query
    return f"{path_query}{'&' if '?' in path_query else '?'}base={base}"


def split_message(message: str) -> tuple[str, str, int, str]:
    parts = message.split(" ")
    if len(parts) != 4:
        raise Invalid("bad_request", "signed message must be '<METHOD> <PATH?QUERY> <unix-seconds> <sha256-hex>'")
    method, path_query, ts_text, digest = parts
    if method not in _METHODS:
        raise Invalid("bad_request", f"unknown method {method!r} in the signed message")
    if not path_query.startswith("/"):
        raise Invalid("bad_request", "the path in the signed message must start with '/'")
    if not re.fullmatch(r"[0-9]{1,10}", ts_text) or int(ts_text) > MAX_TS:  # isdigit() accepts "²"
        raise Invalid("bad_request", f"the timestamp in the signed message must be unix seconds up to {MAX_TS}")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise Invalid("bad_request", "the body hash in the signed message must be 64 lowercase hex digits")
    return method, path_query, int(ts_text), digest


def _base_of(path_query: str) -> str:
    """The `base` query parameter of a write: the version it applies on; the only one allowed."""
    query = urlsplit(path_query).query
    if not query:
        return ""
    name, sep, value = query.partition("=")
    if name != "base" or not sep or not re.fullmatch(r"[0-9a-f]{32}", value):
        raise Invalid("bad_request", "a write's only query parameter is base=<32 hex digits: the record_version "
                      "it was made on>")
    return value


def route_path(path_query: str) -> str:
    """Path without query, without the optional /v1 prefix and trailing slash."""
    path = urlsplit(path_query).path
    if path == API_PREFIX or path.startswith(API_PREFIX + "/"):
        path = path[len(API_PREFIX):]
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    return path or "/"


class _Table:
    def __init__(self, kinds: dict[str, Kind]):
        self.entries: list[tuple[str, re.Pattern, list[str], Kind, Route]] = []
        for kind in kinds.values():
            for r in kind.routes:
                names = re.findall(r"\{(\w+)\}", r.pattern)
                rx = re.compile("^" + re.sub(r"\\\{\w+\\\}", _SEGMENT, re.escape(r.pattern)) + "$")
                self.entries.append((r.method, rx, names, kind, r))

    def match(self, method: str, path: str) -> tuple[Kind, Route, dict] | None:
        for m, rx, names, kind, route in self.entries:
            if m != method:
                continue
            hit = rx.match(path)
            if hit:
                return kind, route, dict(zip(names, hit.groups(), strict=True))
        return None


_table_cache: tuple[int, _Table] | None = None


def _table() -> _Table:
    global _table_cache
    kinds = registry()
    if _table_cache is None or _table_cache[0] != len(kinds):
        _table_cache = (len(kinds), _Table(kinds))
    return _table_cache[1]


def write_routes() -> list[tuple[str, str, str, str]]:
    """(method, pattern, kind, action) of every user write, for the API and its docs."""
    return [(m, r.pattern, k.name, r.action) for m, _, _, k, r in _table().entries]


def parse_request(req: UserRequest) -> tuple[Kind, Intent]:
    """What a user's signed request asks for (derive v2): the one reading every node uses."""
    method, path_query, ts, digest = split_message(req.message)
    if hashlib.sha256(req.body).hexdigest() != digest:
        raise Invalid("bad_request", "the request body does not match the hash in the signed message")
    return intent_of(method, path_query, req.body, "0x" + req.signer.hex(), ts, req.write_id)


def intent_of(method: str, path_query: str, body: bytes, signer: str, ts: int = 0,
              write_id: bytes = b"") -> tuple[Kind, Intent]:
    """The intent of a write request, signed or not yet (a client uses it to find the record
    a write is about, and so the version to name)."""
    if len(body) > MAX_BODY:
        raise Invalid("too_large", f"request body is {len(body)} bytes, the limit is {MAX_BODY}")
    path = route_path(path_query)
    found = _table().match(method, path)
    if found is None:
        raise Invalid("bad_request", f"{method} {path} is not a write this node knows (derive v{DERIVE_VERSION})")
    kind, route, params = found
    base = _base_of(path_query)
    return kind, Intent(kind.name, route.action, params, json_object(body), signer, ts, write_id, base)
