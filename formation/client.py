"""Python client of a node's HTTP API, signing every request with the user's key.

    from formation.client import Client
    c = Client("http://127.0.0.1:3004", key)          # key: formation.crdt.keys.PrivateKey
    model = c.post("/v1/models", {"name": "llama"})    # -> {"op_id", "kind", "key", "id"}
    c.get(f"/v1/models/{model['id']}")

`AsyncClient` has the same methods as coroutines (httpx under trio or asyncio). Errors raise
`ApiError(status, error, detail)` with the node's JSON error.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlencode

import httpx

from formation.crdt.intents import canonical_message, intent_of, with_base
from formation.crdt.keys import PrivateKey, format_address
from formation.crdt.kinds import Invalid


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str):
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


def sign_headers(key: PrivateKey, method: str, path_query: str, body: bytes, ts: int | None = None) -> dict:
    """The three headers of a signed request (DESIGN.md §2)."""
    message = canonical_message(method, path_query, int(time.time()) if ts is None else ts, body)
    sig = key.personal_sign(message.encode())
    return {"X-Message": message, "X-Signature": "0x" + sig.hex(), "X-Address": "0x" + key.address.hex()}


# Calls that may spend the caller's credits (docs/economy.md, "Replays"): a node takes each
# signature once, and only if the signed path names it (`node=<its address>`), so a captured call
# can be replayed neither there nor at another node. Two identical calls signed in the same
# second would have the same signature: each carries a random `nonce` (signed, ignored).
_ONE_USE_CALL = re.compile(r"(/v1)?/agents/[^/?]+/(hire|run_task|subscribe)")


def is_one_use(method: str, path: str) -> bool:
    return method.upper() == "POST" and _ONE_USE_CALL.fullmatch(path.partition("?")[0]) is not None


def one_use_path(method: str, path: str, node: str | None) -> str:
    """`path` with a nonce and the node's address (`node`, when known) for a one-use call."""
    if not is_one_use(method, path):
        return path
    bare, _, qs = path.partition("?")
    query = {k: v for k, _, v in (part.partition("=") for part in qs.split("&") if part)}
    query.setdefault("nonce", secrets.token_hex(8))
    if node:
        query.setdefault("node", node.lower())
    return bare + "?" + urlencode(query)


def _prepare(key, method: str, path: str, body: Any, query: dict | None, sign: bool, node: str | None = None):
    query = {k: v for k, v in (query or {}).items() if v is not None}
    if query:  # httpx sends no '?' for an empty query, so none may be signed either
        path = path + "?" + urlencode(query)
    path = one_use_path(method, path, node)
    raw = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json"} if raw else {}
    if sign and key is not None:
        headers.update(sign_headers(key, method, path, raw))
    return path, raw, headers


def record_of_write(key: PrivateKey | None, method: str, path: str, body: Any) -> str | None:
    """The read path of the record a write changes, when the write must name its version
    (every user write but a create names the version it was made on: docs/api.md)."""
    if key is None or method == "GET" or "base=" in path:
        return None
    raw = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
    try:
        kind, intent = intent_of(method, path, raw, format_address(key.address))
        if intent.action == "create" and kind.name != "account":
            return None
        return f"/v1/records/{kind.name}/{kind.key_of(intent)}"
    except Invalid:
        return None  # not a write we know: the node will say what is wrong


def _version(record: Any) -> str:
    return record.get("record_version", "") if isinstance(record, dict) else ""


def _result(resp: httpx.Response) -> Any:
    try:
        data = resp.json()
    except ValueError:
        data = None
    if resp.status_code >= 400:
        if isinstance(data, dict) and "error" in data:
            raise ApiError(resp.status_code, data["error"], data.get("detail", ""))
        raise ApiError(resp.status_code, "http_error", resp.text[:200])
    return data


class Client:
    def __init__(self, base_url: str, key: PrivateKey | None = None, *, timeout: float = 30.0):
        self.key = key
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)
        self._node: str | None = None

    def request(self, method: str, path: str, body: Any = None, *, query: dict | None = None,
                sign: bool = True) -> Any:
        record = record_of_write(self.key if sign else None, method, path, body)
        if record is not None:
            path = with_base(path, self._version_of(record))
        node = self.node_address() if sign and is_one_use(method, path) else None
        path, raw, headers = _prepare(self.key, method, path, body, query, sign, node)
        return _result(self.http.request(method, path, content=raw, headers=headers))

    def node_address(self) -> str:
        """The address of the node this client talks to (asked once)."""
        if self._node is None:
            self._node = self.get("/v1/health", sign=False)["address"].lower()
        return self._node

    def _version_of(self, record: str) -> str:
        try:
            return _version(self.get(record))
        except ApiError as exc:
            if exc.status == 404:
                return ""  # no such record: the write itself will say so
            raise

    def get(self, path: str, **kw) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw) -> Any:
        return self.request("POST", path, body, **kw)

    def put(self, path: str, body: Any = None, **kw) -> Any:
        return self.request("PUT", path, body, **kw)

    def delete(self, path: str, **kw) -> Any:
        return self.request("DELETE", path, **kw)

    def events(self, since: str | int = 0) -> Iterator[dict]:
        """GET /v1/events, signed with the client's key (the node refuses an unsigned stream)."""
        path, _, headers = _prepare(self.key, "GET", "/v1/events", None, {"since": since}, True)
        with self.http.stream("GET", path, headers=headers, timeout=None) as resp:
            if resp.status_code >= 400:
                resp.read()
                _result(resp)
            for line in resp.iter_lines():
                if line:
                    yield json.loads(line)

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient:
    def __init__(self, base_url: str, key: PrivateKey | None = None, *, timeout: float = 30.0):
        self.key = key
        self.http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout)
        self._node: str | None = None

    async def request(self, method: str, path: str, body: Any = None, *, query: dict | None = None,
                      sign: bool = True) -> Any:
        record = record_of_write(self.key if sign else None, method, path, body)
        if record is not None:
            path = with_base(path, await self._version_of(record))
        node = await self.node_address() if sign and is_one_use(method, path) else None
        path, raw, headers = _prepare(self.key, method, path, body, query, sign, node)
        return _result(await self.http.request(method, path, content=raw, headers=headers))

    async def node_address(self) -> str:
        """The address of the node this client talks to (asked once)."""
        if self._node is None:
            self._node = (await self.get("/v1/health", sign=False))["address"].lower()
        return self._node

    async def _version_of(self, record: str) -> str:
        try:
            return _version(await self.get(record))
        except ApiError as exc:
            if exc.status == 404:
                return ""
            raise

    async def get(self, path: str, **kw) -> Any:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, body: Any = None, **kw) -> Any:
        return await self.request("POST", path, body, **kw)

    async def put(self, path: str, body: Any = None, **kw) -> Any:
        return await self.request("PUT", path, body, **kw)

    async def delete(self, path: str, **kw) -> Any:
        return await self.request("DELETE", path, **kw)

    async def events(self, since: str | int = 0) -> AsyncIterator[dict]:
        """GET /v1/events, signed with the client's key (the node refuses an unsigned stream)."""
        path, _, headers = _prepare(self.key, "GET", "/v1/events", None, {"since": since}, True)
        async with self.http.stream("GET", path, headers=headers, timeout=None) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                _result(resp)
            async for line in resp.aiter_lines():
                if line:
                    yield json.loads(line)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()
