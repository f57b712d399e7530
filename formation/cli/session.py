"""What the user commands share: their settings (config.toml), the wallet, the node's API, and
checks of what the user typed.

Settings live in CONFIG_DIR/config.toml (CONFIG_DIR: --config-dir, else $FORM_CONFIG_DIR, else
~/.config/form):

    node = "http://127.0.0.1:3004"     # the node's HTTP API
    wallet = "/home/me/.config/form/wallet.json"

Every request is signed with the wallet's key (formation.client); the wallet's password comes
from FORM_WALLET_PASSWORD or a prompt (never from the node's FORMATION_PASSWORD). A command gets its Context
with `context(args)`; `main` closes it when the command ends.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import httpx

from formation.cli.keyfile import WALLET_PASSWORD_ENV, KeyFile, read_key, read_key_if_unlockable
from formation.cli.output import EXIT_FAILURE, EXIT_UNREACHABLE, EXIT_USAGE, CliError, report_write
from formation.client import ApiError, Client, is_one_use, one_use_path, sign_headers
from formation.crdt.intents import MAX_BODY
from formation.crdt.keys import PrivateKey, format_address, parse_address
from formation.files import write_atomic

CONFIG_ENV = "FORM_CONFIG_DIR"
DEFAULT_CONFIG_DIR = "~/.config/form"
DEFAULT_NODE = "http://127.0.0.1:3004"
CONFIG_FILE = "config.toml"
WALLET_FILE = "wallet.json"
CONFIG_KEYS = ("node", "wallet")
TIMEOUT_SECONDS = 30.0
# One path segment the node's routes accept (formation.crdt.intents._SEGMENT). Ids are put in the
# path unquoted: the node checks the signature against the decoded path, so an id that would need
# percent-encoding could never be signed correctly anyway; it is refused here instead.
_ID_RX = re.compile(r"[A-Za-z0-9._~@:-]{1,256}")


# ---- settings ----------------------------------------------------------------------------------


class Settings:
    """CONFIG_DIR and its config.toml: the node's URL and the wallet's file."""

    def __init__(self, args: argparse.Namespace):
        raw = getattr(args, "config_dir", None) or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_DIR
        self.dir = Path(raw).expanduser().absolute()
        self.path = self.dir / CONFIG_FILE
        self.values = _read_config(self.path)
        self.node_url = check_url(getattr(args, "node", None) or self.values.get("node")
                                  or DEFAULT_NODE)
        wallet = Path(self.values.get("wallet") or WALLET_FILE).expanduser()
        wallet = wallet if wallet.is_absolute() else self.dir / wallet
        self.wallet = KeyFile(
            wallet, f"the wallet {wallet}",
            missing=f"no wallet at {wallet}; create one with `form kit init` (or name yours as "
                    f"wallet in {self.path})",
            exists=f"a wallet already exists at {wallet}; refusing to overwrite it (move it away "
                   "first, or use another --config-dir)",
            code=EXIT_USAGE, password_env=WALLET_PASSWORD_ENV)

    def write(self, values: dict) -> None:
        lines = ["# form: the user side of Formation (see `form --help`)"]
        lines += [f"{k} = {json.dumps(str(v))}" for k, v in values.items()]  # JSON strings are TOML
        try:
            write_atomic(self.path, "\n".join(lines) + "\n")
        except OSError as exc:
            raise CliError(f"cannot write {self.path}: {exc.strerror or exc}", EXIT_FAILURE) from None


def _read_config(path: Path) -> dict:
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


# ---- the context of a user command -------------------------------------------------------------


class Context:
    """What a command needs: where the node is, the wallet, and one HTTP client."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.json = bool(getattr(args, "json", False))
        self.settings = Settings(args)
        self.node_url = self.settings.node_url
        self._key: PrivateKey | None = None
        self._http: Client | None = None

    def key(self) -> PrivateKey:
        if self._key is None:
            self._key = read_key(self.settings.wallet)
        return self._key

    def key_if_available(self) -> PrivateKey | None:
        """For reads that anyone may make but that show more to a signer (private records)."""
        if self._key is None:
            self._key = read_key_if_unlockable(self.settings.wallet)
        return self._key

    @property
    def address(self) -> str:
        return format_address(self.key().address)

    def call(self, method: str, path: str, body: Any = None, *, query: dict | None = None,
             key: PrivateKey | None = None, sign: bool = True, timeout: float | None = None) -> Any:
        """One request; `sign` with the wallet's key (or `key`); node errors become CliError."""
        if sign and key is None:
            key = self.key()
        http = self._client()
        http.key = key if sign else None
        http.http.timeout = httpx.Timeout(timeout or TIMEOUT_SECONDS)
        # formation.client signs "path?" when every query value is None, but httpx sends "path"
        # (path_mismatch at the node): pass only the values that are set, or no query at all.
        query = {k: v for k, v in (query or {}).items() if v is not None} or None
        try:
            result = http.request(method, path, body, query=query, sign=sign and key is not None)
        except ApiError as exc:
            raise node_refused(exc.status, exc.error, exc.detail, method, path) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise self._transport_error(exc, timeout or TIMEOUT_SECONDS) from None
        if not isinstance(result, dict):
            raise CliError(f"{self.node_url} answered {method} {path} without a JSON object; is it "
                           "a Formation node's API?", EXIT_FAILURE)
        return result

    def post_doc(self, path: str, body: dict, *, timeout: float) -> tuple[int, dict]:
        """A signed POST whose answer is wanted whole, error or not: (HTTP status, JSON object)."""
        raw = json.dumps(body, separators=(",", ":")).encode()
        try:
            if is_one_use("POST", path):
                path = one_use_path("POST", path, self._client().node_address())
            headers = {"Content-Type": "application/json", **sign_headers(self.key(), "POST", path, raw)}
            resp = self._client().http.post(path, content=raw, headers=headers, timeout=timeout)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise self._transport_error(exc, timeout) from None
        except ApiError as exc:  # its /health: a call that spends credits names the node it is for
            raise CliError(f"{self.node_url} did not say which node it is (GET /v1/health: {exc}); is it a "
                           "Formation node's API?", EXIT_FAILURE) from None
        try:
            doc = resp.json()
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise CliError(f"{self.node_url} answered POST {path} with HTTP {resp.status_code} and no "
                           "JSON object; is it a Formation node's API?", EXIT_FAILURE)
        return resp.status_code, doc

    def _client(self) -> Client:
        if self._http is None:
            self._http = Client(self.node_url, None, timeout=TIMEOUT_SECONDS)
        return self._http

    def _transport_error(self, exc: Exception, timeout: float) -> CliError:
        if isinstance(exc, httpx.TimeoutException):
            return CliError(f"the node at {self.node_url} did not answer within {timeout:g} s; "
                            "check that it is not overloaded or stuck (its log says more)",
                            EXIT_UNREACHABLE)
        if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
            return CliError(f"bad node URL {self.node_url!r}: {exc}", EXIT_USAGE)
        return CliError(
            f"cannot reach the node at {self.node_url} ({_reason(exc)}); check that `form node` "
            f"is running there (`./dev run` starts one on this machine) and that its API listens "
            f"on that address and port; the URL comes from --node, else node in "
            f"{self.settings.path}, else {DEFAULT_NODE}",
            EXIT_UNREACHABLE)

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None


def context(args: argparse.Namespace) -> Context:
    """The command's Context, made once per invocation (closed by `close_context`)."""
    ctx = vars(args).get("_context")
    if ctx is None:
        ctx = Context(args)
        args._context = ctx
    return ctx


def close_context(args: argparse.Namespace) -> None:
    ctx = vars(args).pop("_context", None)
    if ctx is not None:
        ctx.close()


# what to do next, for the refusals whose detail cannot know it (it is the node's, not the CLI's)
NEXT_STEP = {
    "stale": "this machine's clock is off from the node's by more than 2 minutes: set it (e.g. "
             "`sudo timedatectl set-ntp true`) and run the command again",
    "too_early": "this machine's clock is ahead of the node's: set it (e.g. `sudo timedatectl "
                 "set-ntp true`) and run the command again",
    "internal": "the node's log has the details; please report it with the command you ran",
}


def node_refused(status: int, error: str, detail: str, method: str, path: str) -> CliError:
    detail = f": {detail}" if detail else ""
    verb = "failed" if status >= 500 else "refused"
    step = f"; {NEXT_STEP[error]}" if error in NEXT_STEP else ""
    return CliError(f"the node {verb}: {error}{detail} (HTTP {status} from {method} {path}){step}",
                    EXIT_FAILURE)


def _reason(exc: Exception) -> str:
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\] ([^)\]']+)", text)
    if m:
        return m.group(1).strip().lower()
    return text or type(exc).__name__


# ---- input checks ------------------------------------------------------------------------------


def check_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not re.match(r"https?://[^/\s]+", url):
        raise CliError(f"bad node URL {url!r}: expected http://HOST:PORT", EXIT_USAGE)
    return url


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


def owner_filter(ctx: Context, args: argparse.Namespace) -> str | None:
    """--owner ADDRESS|me and --mine as the address to filter a list by (None: everyone's)."""
    if getattr(args, "mine", False):
        if args.owner:
            raise CliError("--owner and --mine exclude each other", EXIT_USAGE)
        return ctx.address
    if args.owner in (None, "me"):
        return ctx.address if args.owner == "me" else None
    return check_address(args.owner)


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


# ---- sharing a record (models, agents, instances) ----------------------------------------------


def authorize(args: argparse.Namespace, base: str, kind: str) -> int:
    """POST BASE/ID/authorize: grant ADDRESS a LEVEL on the record, or revoke it (none)."""
    rid = check_id(args.id, f"{kind} id")
    who = check_address(args.address)
    level = None if args.level == "none" else args.level
    ctx = context(args)
    res = ctx.call("POST", f"{base}/{rid}/authorize", {"address": who, "level": level})
    text = (f"revoked {who} on {kind} {rid}" if level is None
            else f"authorized {who} as {level} on {kind} {rid}")
    return report_write(ctx.json, res, text)


def transfer(args: argparse.Namespace, base: str, kind: str) -> int:
    """POST BASE/ID/transfer: give the record to ADDRESS."""
    rid = check_id(args.id, f"{kind} id")
    to = check_address(args.address)
    ctx = context(args)
    res = ctx.call("POST", f"{base}/{rid}/transfer", {"to": to})
    return report_write(ctx.json, res, f"transferred {kind} {rid} to {to}")
