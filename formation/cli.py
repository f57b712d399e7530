"""The `form` command.

Exit codes: 0 success, 1 the command ran but failed (wrong password, unreadable store, ...),
2 usage (bad flags, bad config file), 130 interrupted. Every failure is one line
"form: error: ..." on stderr; a traceback would only hide the message an operator needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from formation import client_cli
from formation.argtypes import int_in
from formation.crdt.keys import PrivateKey, to_checksum
from formation.node.config import Config, ConfigError, load_config, with_tcp_port
from formation.node.keystore import (
    KeystoreError,
    create_keystore,
    load_keystore,
    resolve_password,
)
from formation.node.logs import configure_logging
from formation.node.setup import NodeError, ensure_data_dir, run_node

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# ---- commands ---------------------------------------------------------------------------------


def cmd_node(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    names: dict[str, str] = {}
    for flag, dotted, value in (
        ("--data-dir", "node.data_dir", args.data_dir),
        ("--api-port", "api.port", args.api_port),
        ("--bootstrap", "p2p.bootstrap", args.bootstrap),
        ("--vms", "vm.enabled", args.vms),
    ):
        if value is not None:
            overrides[dotted] = value
            names[dotted] = flag
    config = load_config(args.config, overrides, override_names=names)
    if args.p2p_port is not None:
        listen = with_tcp_port(config.p2p.listen, args.p2p_port)
        config = dataclasses.replace(config, p2p=dataclasses.replace(config.p2p, listen=listen))

    configure_logging(json_lines=args.log_json or config.node.log_json)

    def ready(ident) -> None:
        if ident.created_key:
            _note(f"created a new operator key in {config.keystore_path}; keep its password "
                  "safe, it cannot be recovered")
        if args.json:
            print(json.dumps(ident.as_json()), flush=True)
        else:
            _table([
                ("address", ident.address),
                ("data dir", ident.data_dir),
                ("ops", str(ident.ops)),
                ("heads", str(ident.heads)),
                ("state hash", ident.state_hash[:16]),
            ])
            if not args.once:
                _note("running; Ctrl-C (SIGINT) or SIGTERM stops the node")

    run_node(config, once=args.once, on_ready=ready)
    return EXIT_OK


def cmd_key_show(args: argparse.Namespace) -> int:
    config = _key_config(args)
    path = config.keystore_path
    if not path.exists():
        raise NodeError(f"no keystore at {path}; create one with `form node` or `form key import`")
    password = resolve_password(config.node.password_file, prompt=True, confirm=False)
    key = load_keystore(path, password)
    _print_key(args, key, path)
    return EXIT_OK


def cmd_key_import(args: argparse.Namespace) -> int:
    config = _key_config(args)
    path = config.keystore_path
    # Check before reading the key or asking a password: the operator should not type a
    # secret only to learn that it cannot be stored.
    if path.exists():
        raise KeystoreError(f"keystore {path} already exists; refusing to overwrite it")
    key = _read_private_key()
    ensure_data_dir(config)
    password = resolve_password(config.node.password_file, prompt=True, confirm=True)
    create_keystore(path, password, key.secret)
    _note(f"imported the key into {path}")
    _print_key(args, key, path)
    return EXIT_OK


class _Stop(BaseException):
    """Raised by the SIGINT/SIGTERM handler of `form dev fog`."""


def cmd_pack_validate(args: argparse.Namespace) -> int:
    from formation.pack.formfile import FormfileError, parse

    path = Path(args.formfile)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        _error(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}")
        return EXIT_USAGE
    try:
        ff = parse(text, source=str(path))
    except FormfileError as exc:
        if args.json:
            print(json.dumps({"ok": False, "errors": [{"line": ln, "error": m} for ln, m in exc.errors]}))
        else:
            for line in str(exc).splitlines():
                print(line, file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps({"ok": True, "name": ff.name, "canonical": ff.canonical()}))
    elif args.canonical:
        print(ff.canonical(), end="")
    else:
        _table([("formfile", str(path)), ("name", ff.name),
                ("resources", f"{ff.vcpu} vCPU, {ff.memory_mb} MB, {ff.disk_gb} GB disk"),
                ("build steps", str(len(ff.steps))), ("users", str(len(ff.users))),
                ("expose", ", ".join(map(str, ff.expose)) or "-"),
                ("entrypoint", " ".join(ff.entrypoint) or "-")])
    return EXIT_OK


def cmd_dev_fog(args: argparse.Namespace) -> int:
    import os
    import shutil
    import signal
    import tempfile
    import time

    from formation.node.devfog import DevFog, DevFogError
    from formation.node.keystore import PASSWORD_ENV

    temporary = args.base_dir is None
    base = Path(tempfile.mkdtemp(prefix="formation-fog-")) if temporary else Path(args.base_dir)
    fog = DevFog(args.nodes, base, password=os.environ.get(PASSWORD_ENV) or "dev",
                 base_port=args.base_port)

    def on_signal(signum, frame):
        raise _Stop(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            _note(f"starting {args.nodes} node(s) in {base} ...")
            fog.start()
            fog.wait_ready(args.timeout)
        except DevFogError as exc:
            raise NodeError(str(exc)) from None
        rows = fog.table()
        header = ("node", "address", "peer id", "p2p port", "api port", "data dir", "log file")
        cells = [(str(r["node"]), r["address"], r["peer_id"], str(r["p2p_port"]),
                  str(r["api_port"]), r["data_dir"], r["log"]) for r in rows]
        widths = [max(len(h), *(len(c[k]) for c in cells)) for k, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
        for c in cells:
            print("  ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)).rstrip())
        sys.stdout.flush()
        _note(f"join this fog with: form node --bootstrap {rows[0]['multiaddr']}")
        _note("running; Ctrl-C (SIGINT) or SIGTERM stops every node")
        reported: set[int] = set()
        while True:
            time.sleep(1)
            for node in fog.nodes:
                if node.index not in reported and not node.running:
                    reported.add(node.index)
                    _note(f"node {node.index} exited with status {node.proc.returncode}; "
                          f"see {node.log_path}")
    except _Stop:
        pass
    finally:
        for s in old:  # a second Ctrl-C must not interrupt the shutdown half-way
            signal.signal(s, signal.SIG_IGN)
        _note("stopping the fog ...")
        fog.close()
        for s, handler in old.items():
            signal.signal(s, handler)
        if temporary and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        elif fog.nodes:
            _note(f"data and logs kept in {base}")
    return EXIT_OK


def _key_config(args: argparse.Namespace) -> Config:
    if args.data_dir is None:
        return load_config(args.config, {})
    return load_config(args.config, {"node.data_dir": args.data_dir},
                       override_names={"node.data_dir": "--data-dir"})


def _read_private_key() -> PrivateKey:
    if sys.stdin is not None and sys.stdin.isatty():
        text = getpass.getpass("Private key (hex): ")  # not echoed: it is the whole identity
    else:
        text = sys.stdin.read() if sys.stdin is not None else ""
    text = text.strip()
    if not text:
        raise KeystoreError(
            "no private key on stdin (expected 64 hex digits, optionally 0x-prefixed)"
        )
    try:
        return PrivateKey.from_hex(text)
    except ValueError as exc:
        # The message must never echo the input: it may be a real key with a typo.
        raise KeystoreError(f"stdin does not hold a private key ({_reason(exc)})") from None


def _reason(exc: ValueError) -> str:
    text = str(exc)
    return "expected 64 hex digits" if "fromhex" in text or "hexadecimal" in text else text


def _print_key(args: argparse.Namespace, key: PrivateKey, path: Path) -> None:
    address = to_checksum(key.address)
    if args.json:
        print(json.dumps({"address": address, "keystore": str(path)}))
    else:
        print(address)


def _table(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    sys.stdout.flush()


def _note(message: str) -> None:
    # Notes go to stderr so that stdout stays exactly the requested output (e.g. --json).
    print(f"form: {message}", file=sys.stderr)


def _error(message: str) -> None:
    print(f"form: error: {message}", file=sys.stderr)


# ---- argument parsing -------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # same "form: error:" prefix as every other failure
        self.print_usage(sys.stderr)
        _error(message)
        raise SystemExit(EXIT_USAGE)


_port = int_in(1, 65535, "a port number")
_positive = int_in(1, None, "a positive integer")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("formation")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="form", description="Formation: a peer-to-peer fog for AI agents and models."
    )
    parser.add_argument("--version", action="version", version=f"form {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    config_help = "settings file (default: built-in defaults, see formation.toml)"
    data_dir_help = "data directory (overrides [node] data_dir)"

    node = commands.add_parser(
        "node", help="start the node",
        description="Start the node: create (first run) or unlock the operator key in "
                    "DATA_DIR/operator.key, open the state in DATA_DIR/state.db, and print the "
                    "node's identity. The keystore password comes from FORMATION_PASSWORD, "
                    "[node] password_file, or a prompt.",
    )
    node.add_argument("--config", metavar="FILE", help=config_help)
    node.add_argument("--data-dir", metavar="DIR", help=data_dir_help)
    node.add_argument("--api-port", metavar="N", type=_port,
                      help="HTTP API port (overrides [api] port)")
    node.add_argument("--vms", choices=("auto", "true", "false"),
                      help="run VMs: auto (if root and QEMU), true (required), false (overrides [vm] enabled)")
    node.add_argument("--p2p-port", metavar="N", type=_port,
                      help="libp2p TCP port (replaces the port in [p2p] listen)")
    node.add_argument("--bootstrap", metavar="MULTIADDR", nargs="+", action="extend",
                      help="peer(s) to join through, /ip4/HOST/tcp/PORT/p2p/PEER_ID; "
                           "repeatable; replaces [p2p] bootstrap")
    node.add_argument("--json", action="store_true",
                      help="print the identity as one JSON object instead of a table")
    node.add_argument("--once", action="store_true",
                      help="open the key and state, print the identity and exit (no network)")
    node.add_argument("--log-json", action="store_true",
                      help="log JSON lines on stderr (overrides [node] log_json)")
    node.set_defaults(func=cmd_node)

    key = commands.add_parser("key", help="manage the operator key",
                              description="Manage the operator key (DATA_DIR/operator.key).")
    key_commands = key.add_subparsers(dest="key_command", metavar="COMMAND")
    key.set_defaults(func=None, parser=key)

    show = key_commands.add_parser(
        "show", help="unlock the keystore and print its address",
        description="Unlock the operator keystore and print its address.",
    )
    show.add_argument("--config", metavar="FILE", help=config_help)
    show.add_argument("--data-dir", metavar="DIR", help=data_dir_help)
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=cmd_key_show)

    imp = key_commands.add_parser(
        "import", help="create the keystore from a hex private key read on stdin",
        description="Read a secp256k1 private key (64 hex digits, optionally 0x-prefixed) from "
                    "stdin and encrypt it into DATA_DIR/operator.key. Refuses to overwrite an "
                    "existing keystore.",
    )
    imp.add_argument("--config", metavar="FILE", help=config_help)
    imp.add_argument("--data-dir", metavar="DIR", required=True, help="data directory")
    imp.add_argument("--json", action="store_true", help="print one JSON object")
    imp.set_defaults(func=cmd_key_import)

    pack = commands.add_parser("pack", help="Formfiles, image builds and deploying them",
                               description="Check Formfiles, build images on a node, follow builds "
                                           "and ship them as instances.")
    pack_commands = pack.add_subparsers(dest="pack_command", metavar="COMMAND")
    pack.set_defaults(func=None, parser=pack)
    validate = pack_commands.add_parser(
        "validate", help="parse and check a Formfile; exit 1 with every error and its line",
        description="Parse and check a Formfile without building it. Every error is printed as "
                    "FILE:LINE: message; exit status 1 if there is any.")
    validate.add_argument("formfile", nargs="?", default="Formfile", help="default: ./Formfile")
    validate.add_argument("--canonical", action="store_true", help="print the canonical form")
    validate.add_argument("--json", action="store_true", help="print one JSON object")
    validate.set_defaults(func=cmd_pack_validate)
    client_cli.register_pack(pack_commands)  # build, status, logs, ship: requests to a node

    dev = commands.add_parser("dev", help="development tools",
                              description="Tools for developing Formation on one machine.")
    dev_commands = dev.add_subparsers(dest="dev_command", metavar="COMMAND")
    dev.set_defaults(func=None, parser=dev)
    fog = dev_commands.add_parser(
        "fog", help="run a local fog of several nodes on 127.0.0.1",
        description="Start N `form node` processes on 127.0.0.1, each with its own data "
                    "directory, ports and log (BASE_DIR/node-i, BASE_DIR/node-i.log); node 0 "
                    "first, the others joining through it. Prints a table of the nodes, then "
                    "runs until Ctrl-C (SIGINT) or SIGTERM and stops every node cleanly. The "
                    "keystores' password is FORMATION_PASSWORD, or 'dev'.",
    )
    fog.add_argument("--nodes", metavar="N", type=_positive, default=3,
                     help="number of nodes (default 3)")
    fog.add_argument("--base-dir", metavar="DIR",
                     help="where the nodes' data and logs go; reused if it exists (default: a "
                          "new temporary directory, removed at exit unless --keep)")
    fog.add_argument("--base-port", metavar="P", type=_port,
                     help="node i listens on P+2i (libp2p) and P+2i+1 (API) "
                          "(default: free ports)")
    fog.add_argument("--keep", action="store_true",
                     help="keep the temporary directory (data and logs) at exit")
    fog.add_argument("--timeout", metavar="SECONDS", type=float, default=120.0,
                     help="how long to wait for every node to be up and connected (default 120)")
    fog.set_defaults(func=cmd_dev_fog)

    # the user-side commands (kit, account, model, agent, manage, dns, node status)
    client_cli.register(commands)

    parser.set_defaults(func=None, parser=parser)
    return parser


# ---- entry point ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.func is None:  # `form` or `form key` without a subcommand
        args.parser.print_help(sys.stderr)
        return EXIT_USAGE

    try:
        return args.func(args)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except (KeystoreError, NodeError) as exc:
        _error(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        _error("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: still one line, but say what it was
        _error(f"unexpected {type(exc).__name__}: {exc}")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
