"""The user side of `form`: a wallet, then accounts, models, agents, instances, DNS, node status.

    form kit init [--import-key]                 create (or import) the user's wallet
    form account create|get|update|delete        the wallet's account on the fog
    form model  register|get|list|search|update|delete|authorize|transfer
    form agent  (the same as model)
    form manage list|get|authorize|transfer|delete|start|stop|restart|get-ip|logs   instances
    form dns    add|update|remove|list
    form node status                             the node and the nodes of its fog
    form pack   build|status|logs|ship           images built on a node, deployed as instances
                                                 (`form pack validate` is in formation/cli.py)

Every request is signed with the wallet's key (formation.client). Settings live in
CONFIG_DIR/config.toml (CONFIG_DIR: --config-dir, else $FORM_CONFIG_DIR, else ~/.config/form):

    node = "http://127.0.0.1:3004"     # the node's HTTP API
    wallet = "/home/me/.config/form/wallet.json"

The wallet is a keystore file (formation.node.keystore: scrypt + AES-256-GCM); its password
comes from FORMATION_PASSWORD or a prompt.

Global options on every command: --node URL, --json (one JSON document on stdout instead of a
table), --config-dir DIR. Exit codes: 0 ok; 1 the node refused or failed (its error and detail are
printed); 2 usage or bad input (flags, files, config, wallet, password); 3 the node cannot be
reached. Failures are one line "form: error: ..." on stderr, never a traceback.

`register(subparsers)` adds the commands to the `form` parser of formation/cli.py, and
`register_pack(subparsers)` adds build, status, logs and ship below its `form pack`. Each command
function (`cmd_*`) returns an exit code or raises CliError; the parser's `func` for a command is
wrapped so that it prints a CliError in the house style and returns its code.
"""

from __future__ import annotations

import argparse
import base64
import functools
import getpass
import ipaddress
import json
import os
import re
import sys
import time
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from formation.argtypes import int_in
from formation.client import ApiError, Client, sign_headers
from formation.crdt.intents import MAX_BODY
from formation.crdt.keys import PrivateKey, format_address, parse_address, to_checksum
from formation.files import write_atomic
from formation.node.keystore import PASSWORD_ENV, KeystoreError, create_keystore, load_keystore
from formation.pack import context as pack_context
from formation.pack.formfile import Formfile, FormfileError
from formation.pack.formfile import parse as parse_formfile

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

CONFIG_ENV = "FORM_CONFIG_DIR"
DEFAULT_CONFIG_DIR = "~/.config/form"
DEFAULT_NODE = "http://127.0.0.1:3004"
CONFIG_FILE = "config.toml"
WALLET_FILE = "wallet.json"
CONFIG_KEYS = ("node", "wallet")
TIMEOUT_SECONDS = 30.0
LEVELS = ("manager", "operator", "read_only", "none")
# One path segment the node's routes accept (formation.crdt.intents._SEGMENT). Ids are put in the
# path unquoted: the node checks the signature against the decoded path, so an id that would need
# percent-encoding could never be signed correctly anyway; it is refused here instead.
_ID_RX = re.compile(r"[A-Za-z0-9._~@:-]{1,256}")


class CliError(Exception):
    """A failure to report as "form: error: <message>" with exit code `code`."""

    def __init__(self, message: str, code: int = EXIT_REFUSED):
        super().__init__(message)
        self.message = message
        self.code = code


# ---- context: config, wallet, the node ---------------------------------------------------------


def config_dir_of(args: argparse.Namespace) -> Path:
    raw = getattr(args, "config_dir", None) or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_DIR
    return Path(raw).expanduser().absolute()


def read_config(config_dir: Path) -> dict:
    path = config_dir / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise CliError(f"cannot read {path}: {reason or exc}", EXIT_USAGE) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"{path} is not valid TOML: {exc}", EXIT_USAGE) from None
    for name, value in doc.items():
        if name not in CONFIG_KEYS:
            raise CliError(f"{path}: unknown setting {name!r} (known: {', '.join(CONFIG_KEYS)})",
                           EXIT_USAGE)
        if not isinstance(value, str) or not value:
            raise CliError(f"{path}: {name} must be a non-empty string", EXIT_USAGE)
    return doc


class Context:
    """What a command needs: where the node is, the wallet, and one HTTP client."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.json = bool(getattr(args, "json", False))
        self.config_dir = config_dir_of(args)
        self.config_path = self.config_dir / CONFIG_FILE
        self.config = read_config(self.config_dir)
        self.node_url = check_url(getattr(args, "node", None) or self.config.get("node") or DEFAULT_NODE)
        wallet = Path(self.config.get("wallet") or WALLET_FILE).expanduser()
        self.wallet_path = wallet if wallet.is_absolute() else self.config_dir / wallet
        self._key: PrivateKey | None = None
        self._http: Client | None = None

    # -- the wallet

    def key(self) -> PrivateKey:
        if self._key is None:
            if not self.wallet_path.exists():
                raise CliError(f"no wallet at {self.wallet_path}; create one with `form kit init` "
                               f"(or name yours as wallet in {self.config_path})", EXIT_USAGE)
            password = wallet_password(self.wallet_path, confirm=False)
            try:
                self._key = load_keystore(self.wallet_path, password)
            except KeystoreError as exc:
                raise CliError(str(exc), EXIT_USAGE) from None
        return self._key

    def key_if_available(self) -> PrivateKey | None:
        """For reads that anyone may make but that show more to a signer (private records)."""
        if not self.wallet_path.exists():
            return None
        if not os.environ.get(PASSWORD_ENV) and not _stdin_is_tty():
            note(f"no password for the wallet ({PASSWORD_ENV} is not set): reading unsigned, "
                 "so private records are not shown")
            return None
        return self.key()

    @property
    def address(self) -> str:
        return format_address(self.key().address)

    # -- the node

    def call(self, method: str, path: str, body: Any = None, *, query: dict | None = None,
             key: PrivateKey | None = None, sign: bool = True, timeout: float | None = None) -> Any:
        """One request; `sign` with the wallet's key (or `key`); node errors become CliError."""
        if sign and key is None:
            key = self.key()
        if self._http is None:
            self._http = Client(self.node_url, None, timeout=TIMEOUT_SECONDS)
        self._http.key = key if sign else None
        self._http.http.timeout = httpx.Timeout(timeout or TIMEOUT_SECONDS)
        # formation.client signs "path?" when every query value is None, but httpx sends "path"
        # (path_mismatch at the node): pass only the values that are set, or no query at all.
        query = {k: v for k, v in (query or {}).items() if v is not None} or None
        try:
            result = self._http.request(method, path, body, query=query, sign=sign and key is not None)
        except ApiError as exc:
            raise node_refused(exc.status, exc.error, exc.detail, method, path) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise self._transport_error(exc, timeout or TIMEOUT_SECONDS) from None
        if not isinstance(result, dict):
            raise CliError(f"{self.node_url} answered {method} {path} without a JSON object; is it "
                           "a Formation node's API?", EXIT_REFUSED)
        return result

    def post_doc(self, path: str, body: dict, *, timeout: float) -> tuple[int, dict]:
        """A signed POST whose answer is wanted whole, error or not: (HTTP status, JSON object)."""
        raw = json.dumps(body, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", **sign_headers(self.key(), "POST", path, raw)}
        if self._http is None:
            self._http = Client(self.node_url, None, timeout=TIMEOUT_SECONDS)
        try:
            resp = self._http.http.post(path, content=raw, headers=headers, timeout=timeout)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise self._transport_error(exc, timeout) from None
        try:
            doc = resp.json()
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise CliError(f"{self.node_url} answered POST {path} with HTTP {resp.status_code} and no "
                           "JSON object; is it a Formation node's API?", EXIT_REFUSED)
        return resp.status_code, doc

    def _transport_error(self, exc: Exception, timeout: float) -> CliError:
        if isinstance(exc, httpx.TimeoutException):
            return CliError(f"the node at {self.node_url} did not answer within {timeout:g} s; "
                            "check that it is not overloaded or stuck (its log says more)",
                            EXIT_UNREACHABLE)
        if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
            return CliError(f"bad node URL {self.node_url!r}: {exc}", EXIT_USAGE)
        return CliError(
            f"cannot reach the node at {self.node_url} ({_reason(exc)}); check that `form node` "
            f"is running there and that its API listens on that address and port; the URL comes "
            f"from --node, else node in {self.config_path}, else {DEFAULT_NODE}",
            EXIT_UNREACHABLE)

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None


def node_refused(status: int, error: str, detail: str, method: str, path: str) -> CliError:
    detail = f": {detail}" if detail else ""
    verb = "failed" if status >= 500 else "refused"
    return CliError(f"the node {verb}: {error}{detail} (HTTP {status} from {method} {path})",
                    EXIT_REFUSED)


def context(args: argparse.Namespace) -> Context:
    """The command's Context, made once per invocation (closed by the parser's func)."""
    ctx = vars(args).get("_context")
    if ctx is None:
        ctx = Context(args)
        args._context = ctx
    return ctx


def check_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not re.match(r"https?://[^/\s]+", url):
        raise CliError(f"bad node URL {url!r}: expected http://HOST:PORT", EXIT_USAGE)
    return url


def _reason(exc: Exception) -> str:
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\] ([^)\]']+)", text)
    if m:
        return m.group(1).strip().lower()
    return text or type(exc).__name__


def wallet_password(path: Path, *, confirm: bool) -> str:
    env = os.environ.get(PASSWORD_ENV)
    if env is not None:
        if not env:
            raise CliError(f"{PASSWORD_ENV} is set but empty", EXIT_USAGE)
        return env
    if _stdin_is_tty():
        password = getpass.getpass(f"Password for the wallet {path}: ")
        if not password:
            raise CliError("empty password", EXIT_USAGE)
        if confirm and getpass.getpass("Repeat the password: ") != password:
            raise CliError("the two passwords do not match", EXIT_USAGE)
        return password
    raise CliError(f"no password for the wallet {path}: set {PASSWORD_ENV} or run form in a "
                   "terminal to be prompted", EXIT_USAGE)


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


# ---- input checks ------------------------------------------------------------------------------


def check_id(value: str, what: str = "id") -> str:
    if not _ID_RX.fullmatch(value):
        raise CliError(f"{what} {value!r} is not valid: letters, digits and . _ ~ @ : - only, "
                       "at most 256", EXIT_USAGE)
    return value


def check_address(value: str) -> str:
    try:
        return format_address(parse_address(value))
    except ValueError as exc:
        raise CliError(f"{value!r} is not an address ({exc})", EXIT_USAGE) from None


def read_record_file(path: str, kind: str) -> dict:
    """A record's fields from a .toml or .json file (optionally under a [<kind>] table)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise CliError(f"{path}: expected a .toml or .json file describing the {kind}", EXIT_USAGE)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise CliError(f"{path}: no such file", EXIT_USAGE) from None
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}", EXIT_USAGE) from None
    try:
        text = raw.decode("utf-8")
        doc = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except UnicodeDecodeError:
        raise CliError(f"{path}: not UTF-8 text", EXIT_USAGE) from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise CliError(f"{path} is not valid {suffix[1:].upper()}: {exc}", EXIT_USAGE) from None
    if not isinstance(doc, dict):
        raise CliError(f"{path}: expected an object with the {kind}'s fields", EXIT_USAGE)
    if set(doc) == {kind} and isinstance(doc[kind], dict):
        doc = doc[kind]
    if not doc:
        raise CliError(f"{path}: no fields; a {kind} needs at least a name", EXIT_USAGE)
    try:
        body = json.dumps(doc, separators=(",", ":"))
    except (TypeError, ValueError) as exc:  # TOML dates and times have no JSON form
        raise CliError(f"{path}: a value cannot be sent as JSON ({exc}); write dates as strings",
                       EXIT_USAGE) from None
    if len(body.encode()) > MAX_BODY:
        raise CliError(f"{path}: the {kind} is {len(body.encode())} bytes as JSON, the node takes at "
                       f"most {MAX_BODY}", EXIT_USAGE)
    return doc


def read_private_key() -> PrivateKey:
    if _stdin_is_tty():
        text = getpass.getpass("Private key (hex): ")
    else:
        text = sys.stdin.read() if sys.stdin is not None else ""
    text = text.strip()
    if not text:
        raise CliError("no private key on stdin (expected 64 hex digits, optionally 0x-prefixed)",
                       EXIT_USAGE)
    try:
        return PrivateKey.from_hex(text)
    except ValueError as exc:  # never echo the input: it may be a real key with a typo
        reason = "expected 64 hex digits" if "hex" in str(exc) or "32 bytes" in str(exc) else str(exc)
        raise CliError(f"stdin does not hold a private key ({reason})", EXIT_USAGE) from None


# ---- output ------------------------------------------------------------------------------------


def note(message: str) -> None:
    print(f"form: {message}", file=sys.stderr)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def print_table(rows: list[dict], columns: list[tuple[str, Callable[[dict], Any]]],
                empty: str) -> None:
    if not rows:
        print(empty)
        return
    cells = [[h for h, _ in columns]] + [[_cell(fn(r)) for _, fn in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_fields(pairs: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        print(f"{k:<{width}}  {_cell(v)}".rstrip())


def print_record(record: dict) -> None:
    pairs = []
    for k, v in record.items():
        if k.endswith("_at") and isinstance(v, int) and v > 0:
            v = f"{_iso(v)} ({v})"
        pairs.append((k, v))
    print_fields(pairs)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list):
        return ",".join(_cell(x) for x in v) if all(not isinstance(x, dict | list) for x in v) \
            else json.dumps(v, separators=(",", ":"))
    if isinstance(v, dict):
        return json.dumps(v, separators=(",", ":")) if v else "-"
    return str(v)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def short(addr: Any) -> str:
    return f"{addr[:6]}…{addr[-4:]}" if isinstance(addr, str) and len(addr) == 42 else _cell(addr)


def ago(ms: Any) -> str:
    if not isinstance(ms, int) or ms <= 0:
        return "never"
    s = max(0, int(time.time() - ms / 1000))
    if s < 120:
        return f"{s}s ago"
    if s < 7200:
        return f"{s // 60}m ago"
    return f"{s // 3600}h ago"


def report_write(ctx: Context, result: Any, text: str) -> int:
    if ctx.json:
        print_json(result)
    else:
        op = result.get("op_id", "") if isinstance(result, dict) else ""
        print(f"{text} (op {op[:16]})" if op else text)
    return EXIT_OK


# ---- kit ---------------------------------------------------------------------------------------


def cmd_kit_init(args: argparse.Namespace) -> int:
    config_dir = config_dir_of(args)
    config = read_config(config_dir)
    node = check_url(args.node or config.get("node") or DEFAULT_NODE)
    wallet = Path(config.get("wallet") or WALLET_FILE).expanduser()
    wallet = wallet if wallet.is_absolute() else config_dir / wallet
    if wallet.exists():
        raise CliError(f"a wallet already exists at {wallet}; refusing to overwrite it (move it "
                       "away first, or use another --config-dir)", EXIT_USAGE)
    secret = read_private_key().secret if args.import_key else None
    password = wallet_password(wallet, confirm=True)
    try:
        config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        wallet.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise CliError(f"cannot create {config_dir}: {exc.strerror or exc}", EXIT_REFUSED) from None
    try:
        key = create_keystore(wallet, password, secret)
    except KeystoreError as exc:
        raise CliError(str(exc), EXIT_REFUSED) from None
    config_path = config_dir / CONFIG_FILE
    write_config(config_path, {**config, "node": node, "wallet": str(wallet)})
    address = to_checksum(key.address)
    if args.json:
        print_json({"address": address, "wallet": str(wallet), "config": str(config_path), "node": node})
    else:
        print(address)
        note(f"{'imported the key into' if args.import_key else 'created a new wallet in'} {wallet}; "
             "keep its password safe, it cannot be recovered")
        note(f"settings in {config_path}; next: form account create --name NAME")
    return EXIT_OK


def write_config(path: Path, values: dict) -> None:
    lines = ["# form: the user side of Formation (see `form --help`)"]
    lines += [f"{k} = {json.dumps(str(v))}" for k, v in values.items()]  # JSON strings are TOML
    try:
        write_atomic(path, "\n".join(lines) + "\n")
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}", EXIT_REFUSED) from None


# ---- account -----------------------------------------------------------------------------------


def cmd_account_create(args: argparse.Namespace) -> int:
    ctx = context(args)
    body = {"name": args.name} if args.name is not None else {}
    res = ctx.call("POST", "/v1/account/create", body)
    return report_write(ctx, res, f"created account {to_checksum(ctx.key().address)}")


def cmd_account_get(args: argparse.Namespace) -> int:
    ctx = context(args)
    acct = ctx.call("GET", f"/v1/account/{ctx.address}/get")
    if ctx.json:
        print_json(acct)
    else:
        print_record(acct)
    return EXIT_OK


def cmd_account_update(args: argparse.Namespace) -> int:
    ctx = context(args)
    res = ctx.call("POST", "/v1/account/update", {"name": args.name})
    return report_write(ctx, res, f"updated account {to_checksum(ctx.key().address)}")


def cmd_account_delete(args: argparse.Namespace) -> int:
    ctx = context(args)
    res = ctx.call("POST", "/v1/account/delete")
    return report_write(ctx, res, f"deleted account {to_checksum(ctx.key().address)}")


# ---- models and agents -------------------------------------------------------------------------

CATALOG = {
    "model": {"base": "/v1/models", "plural": "models", "type": "model_type"},
    "agent": {"base": "/v1/agents", "plural": "agents", "type": "agent_type"},
}


def _catalog_columns(kind: str) -> list[tuple[str, Callable[[dict], Any]]]:
    t = CATALOG[kind]["type"]
    return [("ID", lambda r: r.get(f"{kind}_id")), ("NAME", lambda r: r.get("name")),
            ("TYPE", lambda r: r.get(t)), ("FRAMEWORK", lambda r: r.get("framework")),
            ("VERSION", lambda r: r.get("version") or "-"), ("OWNER", lambda r: short(r.get("owner"))),
            ("PRIVATE", lambda r: r.get("is_private")), ("TAGS", lambda r: r.get("tags") or "-")]


def cmd_catalog_register(args: argparse.Namespace) -> int:
    kind = args.kind
    body = read_record_file(args.file, kind)
    if getattr(args, "build_id", None):
        body["build_id"] = args.build_id  # known only after `form pack build` / `ship`
    ctx = context(args)
    res = ctx.call("POST", CATALOG[kind]["base"], body)
    return report_write(ctx, res, f"registered {kind} {res.get('id')}")


def cmd_agent_hire(args: argparse.Namespace) -> int:
    """POST the JSON to a running replica of the agent (through the node) and print its answer."""
    rid = check_id(args.id, "agent id")
    raw = args.data
    if raw.startswith("@"):
        try:
            raw = Path(raw[1:]).read_text()
        except OSError as exc:
            raise CliError(f"cannot read {raw[1:]}: {exc.strerror}", EXIT_USAGE) from None
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise CliError(f"--data is not JSON: {exc}", EXIT_USAGE) from None
    ctx = context(args)
    status, doc = ctx.post_doc(f"/v1/agents/{rid}/hire", body, timeout=args.timeout)
    if status >= 400 and set(doc) >= {"error", "detail"}:
        raise node_refused(status, doc["error"], doc["detail"], "POST", f"/v1/agents/{rid}/hire")
    print_json(doc)
    return EXIT_OK


def cmd_catalog_get(args: argparse.Namespace) -> int:
    kind = args.kind
    ctx = context(args)
    rid = check_id(args.id, f"{kind} id")
    key = ctx.key_if_available()
    rec = ctx.call("GET", f"{CATALOG[kind]['base']}/{rid}", key=key, sign=key is not None)
    if ctx.json:
        print_json(rec)
    else:
        print_record(rec)
    return EXIT_OK


def _owner_filter(ctx: Context, args: argparse.Namespace) -> str | None:
    if getattr(args, "mine", False):
        if args.owner:
            raise CliError("--owner and --mine exclude each other", EXIT_USAGE)
        return ctx.address
    if args.owner in (None, "me"):
        return ctx.address if args.owner == "me" else None
    return check_address(args.owner)


def _show_list(ctx: Context, res: dict, field: str, columns, empty: str) -> int:
    if ctx.json:
        print_json(res)
    else:
        print_table(res.get(field) or [], columns, empty)
    return EXIT_OK


def cmd_catalog_list(args: argparse.Namespace) -> int:
    kind, info = args.kind, CATALOG[args.kind]
    ctx = context(args)
    owner = _owner_filter(ctx, args)
    key = ctx.key_if_available()
    query = {"type": args.type, "tag": args.tag, "owner": owner, "limit": args.limit,
             "offset": args.offset}
    res = ctx.call("GET", info["base"], query=query, key=key, sign=key is not None)
    return _show_list(ctx, res, info["plural"], _catalog_columns(kind), f"no {info['plural']}")


def cmd_catalog_search(args: argparse.Namespace) -> int:
    kind, info = args.kind, CATALOG[args.kind]
    ctx = context(args)
    owner = _owner_filter(ctx, args)
    body = {"text": " ".join(args.text) if args.text else None, "type": args.type,
            "framework": args.framework, "tags": args.tag or None, "owner": owner,
            "limit": args.limit, "offset": args.offset}
    body = {k: v for k, v in body.items() if v is not None}
    key = ctx.key_if_available()
    try:
        res = ctx.call("POST", f"{info['base']}/search", body, key=key, sign=key is not None)
    except CliError as exc:
        # A signed search is a POST, so the node allows each signature once; the same search
        # repeated within the same second has the same signature. Sign again a second later.
        if key is None or "refused: replay" not in exc.message:
            raise
        time.sleep(1.05 - time.time() % 1)
        res = ctx.call("POST", f"{info['base']}/search", body, key=key)
    return _show_list(ctx, res, info["plural"], _catalog_columns(kind),
                      f"no {info['plural']} match")


def cmd_catalog_update(args: argparse.Namespace) -> int:
    kind = args.kind
    rid = check_id(args.id, f"{kind} id")
    body = read_record_file(args.file, kind)
    ctx = context(args)
    res = ctx.call("PUT", f"{CATALOG[kind]['base']}/{rid}", body)
    return report_write(ctx, res, f"updated {kind} {rid}")


def cmd_catalog_delete(args: argparse.Namespace) -> int:
    kind = args.kind
    rid = check_id(args.id, f"{kind} id")
    ctx = context(args)
    res = ctx.call("DELETE", f"{CATALOG[kind]['base']}/{rid}")
    return report_write(ctx, res, f"deleted {kind} {rid}")


def _authorize(args: argparse.Namespace, base: str, kind: str) -> int:
    rid = check_id(args.id, f"{kind} id")
    who = check_address(args.address)
    level = None if args.level == "none" else args.level
    ctx = context(args)
    res = ctx.call("POST", f"{base}/{rid}/authorize", {"address": who, "level": level})
    text = (f"revoked {who} on {kind} {rid}" if level is None
            else f"authorized {who} as {level} on {kind} {rid}")
    return report_write(ctx, res, text)


def _transfer(args: argparse.Namespace, base: str, kind: str) -> int:
    rid = check_id(args.id, f"{kind} id")
    to = check_address(args.address)
    ctx = context(args)
    res = ctx.call("POST", f"{base}/{rid}/transfer", {"to": to})
    return report_write(ctx, res, f"transferred {kind} {rid} to {to}")


def cmd_catalog_authorize(args: argparse.Namespace) -> int:
    return _authorize(args, CATALOG[args.kind]["base"], args.kind)


def cmd_catalog_transfer(args: argparse.Namespace) -> int:
    return _transfer(args, CATALOG[args.kind]["base"], args.kind)


# ---- instances (form manage) -------------------------------------------------------------------

INSTANCE_BASE = "/v1/instance"


def _replicas(r: dict) -> str:
    statuses = r.get("replicas_status")
    if statuses is None:
        return str(r.get("replicas", "-"))
    running = sum(1 for s in statuses if s.get("state") == "running")
    return f"{running}/{r.get('replicas', '-')}"


INSTANCE_COLUMNS = [
    ("ID", lambda r: r.get("instance_id")), ("NAME", lambda r: r.get("name")),
    ("DESIRED", lambda r: r.get("desired_state")), ("REPLICAS", lambda r: r.get("replicas")),
    ("BUILD", lambda r: (r.get("build_id") or "-")[:16]), ("OWNER", lambda r: short(r.get("owner"))),
    ("UPDATED", lambda r: _iso(r["updated_at"]) if r.get("updated_at") else "-"),
]


def cmd_manage_list(args: argparse.Namespace) -> int:
    ctx = context(args)
    res = ctx.call("GET", f"{INSTANCE_BASE}/list", query={"limit": args.limit, "offset": args.offset})
    return _show_list(ctx, res, "instances", INSTANCE_COLUMNS, "no instances")


def cmd_manage_get(args: argparse.Namespace) -> int:
    rid = check_id(args.id, "instance id")
    ctx = context(args)
    inst = ctx.call("GET", f"{INSTANCE_BASE}/{rid}/get")
    if ctx.json:
        print_json(inst)
        return EXIT_OK
    statuses = inst.get("replicas_status") or []
    print_record({k: v for k, v in inst.items() if k != "replicas_status"} | {"running": _replicas(inst)})
    if statuses:
        print()
        print_table(statuses, [("NODE", lambda s: s.get("node")), ("STATE", lambda s: s.get("state")),
                               ("IP", lambda s: s.get("ip")), ("GEN", lambda s: s.get("generation")),
                               ("REASON", lambda s: s.get("reason") or "-")], "")
    return EXIT_OK


def cmd_manage_authorize(args: argparse.Namespace) -> int:
    return _authorize(args, INSTANCE_BASE, "instance")


def cmd_manage_transfer(args: argparse.Namespace) -> int:
    return _transfer(args, INSTANCE_BASE, "instance")


def cmd_manage_action(args: argparse.Namespace) -> int:
    rid = check_id(args.id, "instance id")
    ctx = context(args)
    res = ctx.call("POST", f"{INSTANCE_BASE}/{rid}/{args.action}")
    verb = {"delete": "deletion", "start": "start", "stop": "stop", "restart": "restart"}[args.action]
    return report_write(ctx, res, f"{verb} of instance {rid} accepted; its nodes apply it shortly")


# ---- instances: addresses and consoles -----------------------------------------------------------


def cmd_manage_get_ip(args: argparse.Namespace) -> int:
    rid = check_id(args.id, "instance id")
    ctx = context(args)
    res = ctx.call("GET", f"{INSTANCE_BASE}/{rid}/ips")
    return _show_list(ctx, res, "replicas", [
        ("NODE", lambda s: s.get("node")), ("STATE", lambda s: s.get("state")),
        ("IP", lambda s: s.get("ip"))], f"no node reports a replica of instance {rid} yet")


def cmd_manage_logs(args: argparse.Namespace) -> int:
    rid = check_id(args.id, "instance id")
    ctx = context(args)
    res = ctx.call("GET", f"{INSTANCE_BASE}/{rid}/logs", query={"tail": args.tail})
    if ctx.json:
        print_json(res)
    else:
        _write_text(sys.stdout, res.get("log") or "")
    return EXIT_OK


def cmd_manage_metrics(args: argparse.Namespace) -> int:
    rid = check_id(args.id, "instance id")
    ctx = context(args)
    res = ctx.call("GET", f"{INSTANCE_BASE}/{rid}/metrics")
    if ctx.json:
        print_json(res)
        return EXIT_OK
    rss = res.get("rss_bytes")
    print_fields([("instance", res.get("instance_id")), ("node", res.get("node")),
                  ("vm", res.get("vm_state")), ("ip", res.get("ip")),
                  ("cpu", f"{res['cpu_seconds']} s" if res.get("cpu_seconds") is not None else "-"),
                  ("memory", f"{rss // (1 << 20)} MiB" if rss is not None else "-"),
                  ("uptime", f"{res['uptime_s']} s" if res.get("uptime_s") is not None else "-"),
                  ("restarts", res.get("restarts"))])
    return EXIT_OK


# ---- images (form pack build|status|logs|ship) -------------------------------------------------

PACK_BASE = "/v1/pack"
CONTEXT_LIMIT = pack_context.DEFAULT_LIMIT  # bytes of packed context a node takes
POLL_SECONDS = 0.5  # between two looks at a running build
SHIP_POLL_SECONDS = 1.0  # between two looks at a new instance's replicas
UPLOAD_TIMEOUT = 300.0  # seconds for POST /pack/build: the context may be tens of MiB
FORMFILE_RECORD_LIMIT = 32 * 1024  # the instance record keeps the Formfile up to this many characters
BUILD_DONE = ("done", "failed")
_STEP_RX = re.compile(r"--- step (\d+)/(\d+) \(line (\d+)\): (.*)")


class Source:
    """The Formfile (checked here, before anything is packed or sent) and its context folder."""

    def __init__(self, args: argparse.Namespace):
        self.folder = Path(args.dir)
        if not self.folder.is_dir():
            raise CliError(f"{self.folder}: no such folder (the build context, where the Formfile's "
                           "COPY sources are)", EXIT_USAGE)
        self.path = Path(args.formfile) if args.formfile else self.folder / "Formfile"
        try:
            self.text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CliError(f"no Formfile at {self.path}; write one there (`form pack validate` checks "
                           "it) or name it with --formfile", EXIT_USAGE) from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise CliError(f"cannot read {self.path}: {reason or exc}", EXIT_USAGE) from None
        try:
            self.formfile: Formfile = parse_formfile(self.text, source=str(self.path))
        except FormfileError as exc:
            for line in str(exc).splitlines():
                print(line, file=sys.stderr)
            n = len(exc.errors)
            raise CliError(f"{self.path} has {n} error{'s' if n != 1 else ''} (above); nothing was sent",
                           EXIT_USAGE) from None
        self.lines = self.text.splitlines()

    def line(self, no: int) -> str:
        return self.lines[no - 1].strip() if 0 < no <= len(self.lines) else ""

    def packed_context(self) -> str:
        """The folder as a tar.gz in base64, within the node's limit."""
        try:
            tar = pack_context.pack_dir(self.folder, CONTEXT_LIMIT)
        except pack_context.ContextError as exc:
            raise CliError(f"{exc}; leave big files out of the folder (build steps have no network: packages come from INSTALL)"
                           if "limit" in str(exc) else str(exc), EXIT_USAGE) from None
        if len(tar) > CONTEXT_LIMIT:
            raise CliError(f"the build context {self.folder.resolve()} is {_size(len(tar))} packed, "
                           f"over the limit of {_size(CONTEXT_LIMIT)}", EXIT_USAGE)
        return base64.b64encode(tar).decode()


def _size(n: int) -> str:
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} bytes"
    return f"{n / (1024 * 1024):.1f} MiB".replace(".0 MiB", " MiB")


def _write_text(stream, text: str) -> None:
    stream.write(text if not text or text.endswith("\n") else text + "\n")
    stream.flush()


def _build_failure(status: dict, src: Source | None, *, tail_shown: bool = False) -> CliError:
    """The error of a failed (or refused) build: where in the Formfile, why, the output's tail
    (unless the log, which ends with it, was just shown)."""
    err = status.get("error") or status.get("failure") or {}
    message = (err.get("message") or "no reason given").strip()
    first, *more = message.splitlines()
    for line in more:
        print(f"form:   {line}", file=sys.stderr)
    tail = err.get("output_tail") or []
    if tail and not tail_shown:
        print("form: the step's last output:", file=sys.stderr)
        for line in tail:
            print(f"  | {line}", file=sys.stderr)
    where = ""
    if err.get("line"):
        where = f" at {src.path if src else 'Formfile'}:{err['line']}"
        text = src.line(err["line"]) if src else ""
        where += f" ({text})" if text else f" ({err.get('instruction')})" if err.get("instruction") else ""
    bid = status.get("build_id")
    what = f"build {bid[:16]}" if bid else "the build"
    verb = "failed" if bid else "was refused"
    return CliError(f"{what} {verb}{where}: {first}", EXIT_REFUSED)


def submit_build(ctx: Context, src: Source, *, quiet: bool) -> dict:
    ctx.key()  # a missing wallet or password is reported before the context is packed
    body = {"formfile": src.text, "context": src.packed_context()}
    if not quiet:
        note(f"sending {src.path} and the build context {src.folder.resolve()} "
             f"({_size(len(body['context']) * 3 // 4)}) to {ctx.node_url}")
    path = f"{PACK_BASE}/build"
    code, doc = ctx.post_doc(path, body, timeout=UPLOAD_TIMEOUT)
    if code == 401 and doc.get("error") == "replay":
        # the same build submitted twice in one second has the same signature (one use each):
        # sign again in the next second
        time.sleep(1.05 - time.time() % 1)
        code, doc = ctx.post_doc(path, body, timeout=UPLOAD_TIMEOUT)
    if code == 400 and doc.get("error") == "build_refused":
        raise _build_failure({"failure": doc.get("failure") or {"message": doc.get("detail")}}, src)
    if code >= 400:
        raise node_refused(code, str(doc.get("error", "http_error")), str(doc.get("detail", "")), "POST", path)
    if not quiet and doc.get("state") == "done":
        note(f"build {doc.get('build_id', '')[:16]}: built before, nothing to do (cache hit)")
    return doc


def _log_chunk(ctx: Context, bid: str, offset: int) -> tuple[str, int, str]:
    res = ctx.call("GET", f"{PACK_BASE}/builds/{bid}/logs", query={"offset": offset})
    return res.get("log") or "", int(res.get("offset", offset)), res.get("state", "")


def _show_build_log(text: str, src: Source | None) -> None:
    for line in text.splitlines():
        m = _STEP_RX.fullmatch(line)
        if m:
            n, total, no, title = m.groups()
            shown = (src.line(int(no)) if src else "") or title
            line = f"[{n}/{total}] line {no}: {shown}" if no != "0" else f"[{n}/{total}] {title}"
        print(line, file=sys.stderr)
    sys.stderr.flush()


def follow_build(ctx: Context, status: dict, src: Source | None, *, quiet: bool) -> dict:
    """Poll a build until it ends, its log (steps as "[3/7] line 12: RUN ...") on stderr."""
    bid = status["build_id"]
    offset, phase = 0, None
    while True:
        status = ctx.call("GET", f"{PACK_BASE}/builds/{bid}")
        if not quiet:
            if status.get("phase") != phase and status.get("phase") not in ("step", "done", "cached", None):
                phase = status["phase"]
                extra = f": {' '.join(status['packages'])}" if phase == "downloading" and status.get("packages") else ""
                note(f"build {bid[:16]}: {phase}{extra}")
            while True:  # everything logged so far (1 MiB per answer)
                text, offset, _ = _log_chunk(ctx, bid, offset)
                _show_build_log(text, src)
                if not text:
                    break
        if status.get("state") in BUILD_DONE:
            return status
        time.sleep(POLL_SECONDS)


def _build_fields(st: dict) -> list[tuple[str, Any]]:
    image = st.get("image") or {}
    step = f"{st.get('step')}/{st.get('steps')}" if st.get("steps") else "-"
    pairs = [("build", st.get("build_id")), ("name", st.get("name")), ("state", st.get("state")),
             ("phase", st.get("phase")), ("step", step)]
    if st.get("line") and st.get("state") != "done":
        pairs.append(("line", f"{st['line']} ({st.get('instruction')})"))
    for k in ("submitted_at", "started_at", "finished_at"):
        if st.get(k):
            pairs.append((k.replace("_at", ""), _iso(st[k])))
    if image:
        pairs.append(("resources", f"{image.get('vcpus')} vCPU, {image.get('memory_mb')} MB, "
                                   f"{image.get('disk_gb')} GB disk"))
        if image.get("expose"):
            pairs.append(("expose", image["expose"]))
        if image.get("size_bytes"):
            pairs.append(("image size", _size(int(image["size_bytes"]))))
    if st.get("error"):
        pairs.append(("error", (st["error"].get("message") or "").splitlines()[0] if st["error"].get("message") else "-"))
    return pairs


def cmd_pack_build(args: argparse.Namespace) -> int:
    src = Source(args)
    ctx = context(args)
    st = submit_build(ctx, src, quiet=args.quiet)
    if args.wait and st.get("state") not in BUILD_DONE:
        st = follow_build(ctx, st, src, quiet=args.quiet)
    if ctx.json:
        print_json(st)
    elif st.get("state") != "failed":
        print_fields(_build_fields(st))
    if st.get("state") == "failed":
        raise _build_failure(st, src, tail_shown=args.wait and not args.quiet)
    if not args.wait and not ctx.json:
        note(f"follow it with `form pack logs {st.get('build_id')} --follow`")
    return EXIT_OK


BUILD_COLUMNS = [
    ("BUILD", lambda s: (s.get("build_id") or "-")[:16]), ("NAME", lambda s: s.get("name")),
    ("STATE", lambda s: s.get("state")),
    ("STEP", lambda s: f"{s.get('step')}/{s.get('steps')}" if s.get("steps") else "-"),
    ("SUBMITTED", lambda s: _iso(s["submitted_at"]) if s.get("submitted_at") else "-"),
    ("ERROR", lambda s: ((s.get("error") or {}).get("message") or "-").splitlines()[0][:60]),
]


def cmd_pack_status(args: argparse.Namespace) -> int:
    ctx = context(args)
    if args.build_id_flag:
        if args.build_id and args.build_id != args.build_id_flag:
            raise CliError("give the build id once (BUILD_ID or --build-id)", EXIT_USAGE)
        args.build_id = args.build_id_flag
    if args.build_id is None:
        res = ctx.call("GET", f"{PACK_BASE}/builds")
        return _show_list(ctx, res, "builds", BUILD_COLUMNS, "no builds of yours on this node")
    bid = check_id(args.build_id, "build id")
    st = ctx.call("GET", f"{PACK_BASE}/builds/{bid}")
    if ctx.json:
        print_json(st)
    else:
        print_fields(_build_fields(st))
        tail = (st.get("error") or {}).get("output_tail") or []
        if tail:
            print()
            print("\n".join(f"  | {line}" for line in tail))
    return EXIT_OK


def cmd_pack_logs(args: argparse.Namespace) -> int:
    bid = check_id(args.build_id, "build id")
    ctx = context(args)
    offset, parts, state = 0, [], ""
    while True:
        text, offset, state = _log_chunk(ctx, bid, offset)
        if ctx.json:
            parts.append(text)
        elif text:
            _write_text(sys.stdout, text)
        if not text:
            if not args.follow or state in BUILD_DONE:
                break
            time.sleep(POLL_SECONDS)
    if ctx.json:
        print_json({"build_id": bid, "log": "".join(parts), "offset": offset, "state": state})
    return EXIT_OK


def _wait_running(ctx: Context, iid: str, timeout: float, *, quiet: bool) -> tuple[dict, str | None]:
    """Poll the instance until a replica runs: (instance, None), or (instance, why it failed)."""
    seen: dict[str, tuple] = {}
    deadline = time.monotonic() + timeout
    while True:
        inst = ctx.call("GET", f"{INSTANCE_BASE}/{iid}/get")
        statuses = inst.get("replicas_status") or []
        for s in statuses:
            now = (s.get("state"), s.get("reason"), s.get("ip"))
            if seen.get(s.get("node")) != now:
                seen[s.get("node")] = now
                if not quiet:
                    reason = f": {s['reason']}" if s.get("reason") else ""
                    ip = f" at {s['ip']}" if s.get("ip") and s.get("state") == "running" else ""
                    note(f"replica on {short(s.get('node'))}: {s.get('state')}{ip}{reason}")
        if any(s.get("state") == "running" for s in statuses):
            return inst, None
        failed = [s for s in statuses if s.get("state") == "failed"]
        if failed:
            s = failed[0]
            return inst, f"the replica of instance {iid} on {s.get('node')} failed: {s.get('reason') or 'no reason given'}"
        if time.monotonic() > deadline:
            states = ", ".join(f"{short(s.get('node'))} {s.get('state')}" for s in statuses) or "no replica reported"
            return inst, (f"no replica of instance {iid} runs after {timeout:g} s ({states}); it stays "
                          f"deployed: follow it with `form manage get {iid}`")
        time.sleep(SHIP_POLL_SECONDS)


def cmd_pack_ship(args: argparse.Namespace) -> int:
    src = Source(args)
    ff = src.formfile
    name = args.name or ff.name
    if len(src.text) > FORMFILE_RECORD_LIMIT:
        raise CliError(f"{src.path} is {len(src.text)} characters; an instance keeps at most "
                       f"{FORMFILE_RECORD_LIMIT}", EXIT_USAGE)
    ctx = context(args)
    build = None
    if args.build_id:
        bid = check_id(args.build_id, "build id")
    else:
        build = submit_build(ctx, src, quiet=args.quiet)
        if build.get("state") not in BUILD_DONE:
            build = follow_build(ctx, build, src, quiet=args.quiet)
        if build.get("state") == "failed":
            if ctx.json:
                print_json({"build_id": build.get("build_id"), "build": build, "instance_id": None})
            raise _build_failure(build, src, tail_shown=not args.quiet)
        bid = build["build_id"]
        if not args.quiet:
            note(f"built {bid}")
    resources: dict[str, Any] = {"vcpus": ff.vcpu, "memory_mb": ff.memory_mb, "disk_gb": ff.disk_gb}
    if ff.gpus:
        model, count = ff.gpus[0]
        resources["gpu"] = {"count": count, "model": model}
    res = ctx.call("POST", f"{INSTANCE_BASE}/create", {
        "name": name, "build_id": bid, "formfile": src.text, "replicas": args.replicas,
        "resources": resources})
    iid = res.get("id")
    doc: dict[str, Any] = {"instance_id": iid, "build_id": bid, "op_id": res.get("op_id"),
                           "build": build, "instance": None}
    if not ctx.json:
        print(iid, flush=True)
    if not args.wait:
        if ctx.json:
            print_json(doc)
        elif not args.quiet:
            note(f"instance {iid} created; follow it with `form manage get {iid}`")
        return EXIT_OK
    if not args.quiet:
        note(f"instance {iid} created; waiting for a replica to run (Ctrl-C stops the waiting, "
             "not the instance)")
    inst, failure = _wait_running(ctx, iid, args.timeout, quiet=args.quiet)
    doc["instance"] = inst
    if ctx.json:
        print_json(doc)
    if failure:
        raise CliError(failure, EXIT_REFUSED)
    if not args.quiet and not ctx.json:
        ips = [s.get("ip") for s in inst.get("replicas_status") or [] if s.get("state") == "running" and s.get("ip")]
        note(f"instance {iid} is running" + (f" at {', '.join(ips)}" if ips else "")
             + f"; its console: form manage logs {iid}")
    return EXIT_OK


# ---- dns ---------------------------------------------------------------------------------------

DNS_COLUMNS = [
    ("DOMAIN", lambda r: r.get("domain")), ("TYPE", lambda r: r.get("record_type")),
    ("TARGETS", lambda r: r.get("cname_target") if r.get("record_type") == "CNAME" else r.get("targets") or "-"),
    ("TTL", lambda r: r.get("ttl")), ("OWNER", lambda r: short(r.get("owner"))),
]


def _domain(value: str) -> str:
    return check_id(value.lower().rstrip("."), "domain")


def _dns_fields(args: argparse.Namespace, *, creating: bool) -> dict:
    targets = args.target
    rtype = args.type
    if rtype is None and creating:
        if args.cname:
            rtype = "CNAME"
        elif targets and all(_is_ipv6(t) for t in targets):
            rtype = "AAAA"
        else:
            rtype = "A"
    if args.ttl is not None and not 1 <= args.ttl <= 86400:
        raise CliError(f"--ttl must be from 1 to 86400 seconds, got {args.ttl}", EXIT_USAGE)
    fields = {"record_type": rtype, "targets": targets, "cname_target": args.cname, "ttl": args.ttl}
    return {k: v for k, v in fields.items() if v is not None}


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def cmd_dns_add(args: argparse.Namespace) -> int:
    domain = _domain(args.domain)
    if not args.target and not args.cname:
        raise CliError("give at least one --target (an instance id or IP address) or --cname",
                       EXIT_USAGE)
    fields = _dns_fields(args, creating=True)
    ctx = context(args)
    res = ctx.call("POST", "/v1/dns/create", {"domain": domain, **fields})
    return report_write(ctx, res, f"added {fields['record_type']} record {domain}")


def _my_dns_record(ctx, domain: str) -> str:
    """The id of the wallet's own record for `domain`: records belong to their creators, so
    several owners may hold one for the same name."""
    res = ctx.call("GET", "/v1/dns/list", query={"owner": ctx.address, "limit": 1000}, sign=False)
    ids = [r["record_id"] for r in res.get("records", []) if r.get("domain") == domain]
    if not ids:
        raise CliError(f"you have no DNS record for {domain} (see `form dns list --owner`)", EXIT_REFUSED)
    return ids[0]


def cmd_dns_update(args: argparse.Namespace) -> int:
    domain = _domain(args.domain)
    fields = _dns_fields(args, creating=False)
    if not fields:
        raise CliError("nothing to change: give --target, --type, --cname or --ttl", EXIT_USAGE)
    ctx = context(args)
    res = ctx.call("POST", f"/v1/dns/{_my_dns_record(ctx, domain)}/update", fields)
    return report_write(ctx, res, f"updated record {domain}")


def cmd_dns_remove(args: argparse.Namespace) -> int:
    domain = _domain(args.domain)
    ctx = context(args)
    res = ctx.call("POST", f"/v1/dns/{_my_dns_record(ctx, domain)}/delete")
    return report_write(ctx, res, f"removed record {domain}")


def cmd_dns_list(args: argparse.Namespace) -> int:
    ctx = context(args)
    owner = _owner_filter(ctx, args)
    res = ctx.call("GET", "/v1/dns/list", query={"owner": owner, "limit": args.limit,
                                                 "offset": args.offset}, sign=False)
    return _show_list(ctx, res, "records", DNS_COLUMNS, "no DNS records")


# ---- node status -------------------------------------------------------------------------------


def _vms_line(vms: dict | None) -> str:
    if not vms:
        return "-"
    if not vms.get("enabled"):
        return f"off: {vms.get('reason') or 'disabled'}"
    return (f"on: {vms.get('accel')}, {vms.get('machine')}, bridge {vms.get('bridge')} "
            f"{vms.get('subnet')}, {vms.get('replicas')} replica(s)")


def cmd_node_status(args: argparse.Namespace) -> int:
    ctx = context(args)
    health = ctx.call("GET", "/v1/health", sign=False)
    nodes = ctx.call("GET", "/v1/node/list", query={"limit": 1000}, sign=False)
    if ctx.json:
        print_json({"node_url": ctx.node_url, "health": health, "nodes": nodes.get("nodes", [])})
        return EXIT_OK
    print_fields([("node", ctx.node_url), ("status", health.get("status")),
                  ("address", health.get("address")), ("peer id", health.get("peer_id")),
                  ("version", health.get("version")), ("ops", health.get("ops")),
                  ("peers", health.get("peers")), ("vms", _vms_line(health.get("vms")))])
    print()
    me = str(health.get("address", "")).lower()
    rows = sorted(nodes.get("nodes") or [], key=lambda n: (n.get("address") != me, n.get("address", "")))
    cap = lambda n, k: (n.get("capacity") or {}).get(k)  # noqa: E731
    print_table(rows, [
        ("", lambda n: "*" if n.get("address") == me else ""),
        ("ADDRESS", lambda n: n.get("address")), ("VERSION", lambda n: n.get("version") or "-"),
        ("VCPUS", lambda n: cap(n, "vcpus")),
        ("MEMORY", lambda n: f"{cap(n, 'memory_mb') // 1024} GiB" if cap(n, "memory_mb") else "-"),
        ("DISK", lambda n: f"{cap(n, 'disk_gb')} GB" if cap(n, "disk_gb") is not None else "-"),
        ("KVM", lambda n: cap(n, "kvm")), ("VMS", lambda n: cap(n, "vms")),
        ("SEEN", lambda n: ago(n.get("heartbeat"))),
        ("ADDRS", lambda n: len(n.get("multiaddrs") or [])),
    ], "no nodes known yet")
    return EXIT_OK


# ---- argument parsing --------------------------------------------------------------------------


def _entry(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """The parser's func: run the command, print a CliError in the house style, return its code."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except CliError as exc:
            print(f"form: error: {exc.message}", file=sys.stderr)
            return exc.code
        finally:
            ctx = vars(args).pop("_context", None)
            if ctx is not None:
                ctx.close()

    run.command = fn  # type: ignore[attr-defined]
    return run


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("global options")
    g.add_argument("--node", metavar="URL",
                   help=f"the node's HTTP API (overrides node in config.toml; default {DEFAULT_NODE})")
    g.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    g.add_argument("--config-dir", metavar="DIR",
                   help=f"where config.toml and wallet.json are (default ${CONFIG_ENV} or {DEFAULT_CONFIG_DIR})")
    return p


_pos_int = int_in(0, None, "a number")


def _paging(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=_pos_int, metavar="N", help="at most N rows (node default 100, max 1000)")
    p.add_argument("--offset", type=_pos_int, metavar="N", help="skip the first N rows")


def _group(subparsers, name: str, help_: str, description: str):
    parser = subparsers.add_parser(name, help=help_, description=description)
    parser.set_defaults(func=None, parser=parser)
    return parser, parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND")


def _leaf(subparsers, name: str, help_: str, fn, common, description: str | None = None, **defaults):
    p = subparsers.add_parser(name, help=help_, description=description or help_[0].upper() + help_[1:] + ".",
                              parents=[common])
    p.set_defaults(func=_entry(fn), parser=p, **defaults)
    return p


def register(subparsers) -> None:
    """Add the user-side commands to the subparsers of the `form` parser (formation/cli.py)."""
    common = _common()
    level_help = "manager, operator, read_only, or none to revoke"

    # kit
    _, kit = _group(subparsers, "kit", "your wallet and settings",
                    "Your wallet (the key that signs every request) and settings (config.toml).")
    p = _leaf(kit, "init", "create a wallet (or import a key) and write config.toml", cmd_kit_init, common,
              description="Create a new wallet, or with --import-key encrypt a hex private key read "
                          "from stdin, at CONFIG_DIR/wallet.json, and write CONFIG_DIR/config.toml "
                          "(node, wallet). The password comes from FORMATION_PASSWORD or a prompt. "
                          "Prints the wallet's address.")
    p.add_argument("--import-key", action="store_true",
                   help="read a secp256k1 private key (64 hex digits) from stdin instead of making one")

    # account
    _, acc = _group(subparsers, "account", "your account on the fog",
                    "Your account: the record keyed by the wallet's address.")
    p = _leaf(acc, "create", "create your account (100 credits to start)", cmd_account_create, common)
    p.add_argument("--name", metavar="N", help="a display name")
    _leaf(acc, "get", "show your account", cmd_account_get, common)
    p = _leaf(acc, "update", "change your account's name", cmd_account_update, common)
    p.add_argument("--name", metavar="N", required=True, help="the new display name")
    _leaf(acc, "delete", "delete your account", cmd_account_delete, common)

    # model, agent
    for kind in ("model", "agent"):
        plural = CATALOG[kind]["plural"]
        _, cat = _group(subparsers, kind, f"publish and find {plural}",
                        f"Publish, find and share {plural} of the fog's catalog.")
        p = _leaf(cat, "register", f"publish a {kind} described in a TOML or JSON file",
                  cmd_catalog_register, common, kind=kind,
                  description=f"Publish a {kind}: FILE (.toml or .json) holds its fields (name, "
                              f"description, {CATALOG[kind]['type']}, framework, tags, ...), at the "
                              f"top level or under a [{kind}] table. Prints the new id.")
        p.add_argument("file", metavar="FILE", help=f"the {kind}'s fields, .toml or .json")
        if kind == "agent":
            p.add_argument("--build-id", metavar="ID",
                           help="the image its instances run (from `form pack ship`); /hire goes there")
            p = _leaf(cat, "hire", "send a JSON request to a running instance of the agent",
                      cmd_agent_hire, common,
                      description="POST the JSON to the agent (port and path from its record) through "
                                  "the node, which picks a running replica; prints the agent's answer.")
            p.add_argument("id", metavar="ID")
            p.add_argument("--data", metavar="JSON", default="{}", help="the request: JSON, or @FILE")
            p.add_argument("--timeout", metavar="S", type=float, default=300.0,
                           help="seconds to wait for the answer (default 300)")
        p = _leaf(cat, "get", f"show one {kind}", cmd_catalog_get, common, kind=kind)
        p.add_argument("id", metavar="ID")
        for name, fn, help_ in (("list", cmd_catalog_list, f"list {plural}, with filters"),
                                ("search", cmd_catalog_search, f"search {plural} by words and filters")):
            p = _leaf(cat, name, help_, fn, common, kind=kind)
            if name == "search":
                p.add_argument("text", metavar="TEXT", nargs="*", help="words to find in name, description, tags")
                p.add_argument("--framework", metavar="F", help="only this framework")
                p.add_argument("--tag", metavar="TAG", action="append", help="must have this tag (repeatable)")
            else:
                p.add_argument("--tag", metavar="TAG", help="only with this tag")
            p.add_argument("--type", metavar="T", help=f"only this {CATALOG[kind]['type']}")
            p.add_argument("--owner", metavar="ADDRESS", help="only owned by ADDRESS ('me' for yours)")
            p.add_argument("--mine", action="store_true", help="only yours")
            _paging(p)
        p = _leaf(cat, "update", f"change a {kind}'s fields from a TOML or JSON file",
                  cmd_catalog_update, common, kind=kind)
        p.add_argument("id", metavar="ID")
        p.add_argument("file", metavar="FILE", help="the fields to change, .toml or .json")
        p = _leaf(cat, "delete", f"delete a {kind} (owner only)", cmd_catalog_delete, common, kind=kind)
        p.add_argument("id", metavar="ID")
        p = _leaf(cat, "authorize", f"grant or revoke a user's level on a {kind}",
                  cmd_catalog_authorize, common, kind=kind)
        p.add_argument("id", metavar="ID")
        p.add_argument("address", metavar="ADDRESS")
        p.add_argument("level", metavar="LEVEL", choices=LEVELS, help=level_help)
        p = _leaf(cat, "transfer", f"give a {kind} to another address (owner only)",
                  cmd_catalog_transfer, common, kind=kind)
        p.add_argument("id", metavar="ID")
        p.add_argument("address", metavar="ADDRESS")

    # manage (instances)
    _, man = _group(subparsers, "manage", "manage your instances",
                    "Manage instances you own or are authorized on.")
    p = _leaf(man, "list", "list your instances", cmd_manage_list, common)
    _paging(p)
    p = _leaf(man, "get", "show one instance and its replicas", cmd_manage_get, common)
    p.add_argument("id", metavar="ID")
    p = _leaf(man, "authorize", "grant or revoke a user's level on an instance", cmd_manage_authorize, common)
    p.add_argument("id", metavar="ID")
    p.add_argument("address", metavar="ADDRESS")
    p.add_argument("level", metavar="LEVEL", choices=LEVELS, help=level_help)
    p = _leaf(man, "transfer", "give an instance to another address (owner only)", cmd_manage_transfer, common)
    p.add_argument("id", metavar="ID")
    p.add_argument("address", metavar="ADDRESS")
    p = _leaf(man, "get-ip", "the IP address of each replica of an instance", cmd_manage_get_ip, common,
              description="Each replica of an instance: the node that hosts it, its state and its IP "
                          "address (GET /instance/ID/ips).")
    p.add_argument("id", metavar="ID")
    p = _leaf(man, "metrics", "VM state, CPU time and memory of an instance's replica on the node you ask",
              cmd_manage_metrics, common)
    p.add_argument("id", metavar="ID")
    p = _leaf(man, "logs", "the console of an instance's replica on the node you ask", cmd_manage_logs,
              common, description="The console output (boot, entrypoint) of the replica of an instance "
                                  "that runs on the node you ask; if it runs elsewhere, the error names "
                                  "the nodes that host it (ask one of them with --node).")
    p.add_argument("id", metavar="ID")
    p.add_argument("--tail", metavar="BYTES", type=int_in(1, 8 * 1024 * 1024, "a number of bytes"),
                   help="the last BYTES of the console (node default 65536, at most 8 MiB)")
    for action, help_ in (("delete", "delete an instance (owner only)"),
                          ("start", "start an instance's replicas (operator or above)"),
                          ("stop", "stop an instance's replicas (operator or above)"),
                          ("restart", "restart an instance's replicas (operator or above)")):
        p = _leaf(man, action, help_, cmd_manage_action, common, action=action)
        p.add_argument("id", metavar="ID")

    # dns
    _, dns = _group(subparsers, "dns", "DNS records of the fog",
                    "DNS records of the fog: first come, first served; the owner manages them.")
    for name, fn, help_ in (("add", cmd_dns_add, "add a record (A, AAAA or CNAME)"),
                            ("update", cmd_dns_update, "change a record's targets, type or TTL")):
        p = _leaf(dns, name, help_, fn, common)
        p.add_argument("domain", metavar="DOMAIN")
        p.add_argument("--target", metavar="T", action="append",
                       help="an instance id or IP address (repeatable; on update, replaces the list)")
        p.add_argument("--type", choices=("A", "AAAA", "CNAME"), type=str.upper,
                       help="record type (add: CNAME with --cname, AAAA for IPv6 targets, else A)")
        p.add_argument("--cname", metavar="X", help="the name a CNAME record points to")
        p.add_argument("--ttl", metavar="N", type=int, help="seconds, 1 to 86400 (node default 60)")
    p = _leaf(dns, "remove", "remove a record (owner only)", cmd_dns_remove, common)
    p.add_argument("domain", metavar="DOMAIN")
    p = _leaf(dns, "list", "list records", cmd_dns_list, common)
    p.add_argument("--owner", metavar="ADDRESS", nargs="?", const="me",
                   help="only owned by ADDRESS (no value: yours)")
    _paging(p)

    # node status: `form node` already starts the node (formation/cli.py); status hangs below it.
    node = subparsers.choices.get("node")
    if node is None:
        node, node_sub = _group(subparsers, "node", "the node", "The node.")
    else:
        node_sub = node.add_subparsers(dest="node_command", metavar="COMMAND")
    _leaf(node_sub, "status", "the node's health and the nodes of its fog", cmd_node_status, common,
          description="Ask the node (GET /health, /node/list) how it is and which nodes its fog has.")


def register_pack(pack_subparsers) -> None:
    """Add build, status, logs and ship to `form pack` (its parser is made in formation/cli.py)."""
    common = _common()

    def source(p: argparse.ArgumentParser, wait_help: str) -> None:
        p.add_argument("dir", metavar="DIR", nargs="?", default=".",
                       help="the build context: the folder COPY reads from, sent packed (default .)")
        p.add_argument("--formfile", metavar="PATH", help="the Formfile (default DIR/Formfile)")
        p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True, help=wait_help)
        p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")

    p = _leaf(pack_subparsers, "build", "build an image from a Formfile on the node", cmd_pack_build,
              common, description="Check DIR/Formfile, pack DIR (the build context, at most "
                                  f"{CONTEXT_LIMIT // (1024 * 1024)} MiB) and build an image on the node "
                                  "(POST /pack/build). By default follows the build: its steps and log "
                                  "on stderr, then the build id and state. Exit 1 if the build fails, "
                                  "with the Formfile line and the step's last output.")
    source(p, "follow the build to its end (default; --no-wait returns once it is queued)")
    p = _leaf(pack_subparsers, "status", "your builds on the node, or one build", cmd_pack_status, common)
    p.add_argument("build_id", metavar="BUILD_ID", nargs="?", help="one build (default: a table of all)")
    p.add_argument("--build-id", dest="build_id_flag", metavar="ID", help="the same, as the original's flag")
    p = _leaf(pack_subparsers, "logs", "a build's log", cmd_pack_logs, common)
    p.add_argument("build_id", metavar="BUILD_ID")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the build ends")
    p = _leaf(pack_subparsers, "ship", "build (unless --build-id) and deploy an instance of it",
              cmd_pack_ship, common,
              description="Build DIR as `form pack build` does (or take --build-id), then create an "
                          "instance of it with the Formfile's name and resources (POST "
                          "/instance/create) and print its id. By default waits until a replica "
                          "runs, printing each replica's state changes; exit 1 if one fails.")
    source(p, "wait for the build and then for a running replica (default; --no-wait returns "
              "once the instance is created)")
    p.add_argument("--replicas", metavar="N", type=int_in(1, 64, "a number of replicas"), default=1,
                   help="how many nodes run it (default 1)")
    p.add_argument("--name", metavar="NAME", help="the instance's name (default: the Formfile's NAME)")
    p.add_argument("--build-id", metavar="ID", help="deploy this build instead of building DIR")
    p.add_argument("--timeout", metavar="SECONDS", type=int_in(1, None, "a number of seconds"), default=1800,
                   help="how long --wait waits for a running replica (default 1800)")
