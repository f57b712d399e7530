"""The `form` command: the node's entry points and the user's client of a node's HTTP API.

    form node [--once] ...                        run the node (node.py)
    form node status                              the node and the nodes of its fog (node.py)
    form key show|import                          the operator key (key.py)
    form kit init [--import-key]                  the user's wallet and config.toml (key.py)
    form account create|get|update|delete         the wallet's account (account.py)
    form model|agent register|get|list|search|update|delete|authorize|transfer (catalog.py)
    form agent hire                               a request to a running agent (catalog.py)
    form manage list|get|...|get-ip|logs|metrics|ssh  instances (instance.py, ssh.py)
    form secrets set|list|unset                   an instance's secrets, sealed to its hosts (secrets.py)
    form dns add|update|remove|list               DNS records (dns.py)
    form pack validate|build|status|logs|ship     Formfiles, builds, deploying them (pack.py, build.py)
    form dev fog                                  a local multi-node fog (dev.py)

The seams every command uses: output.py prints (tables, fields, progress, notes, errors, --json),
keyfile.py finds, reads, decrypts and creates keys (the operator's and the wallet), session.py
holds what the user commands share (config.toml, the wallet, the node's API, input checks),
parsing.py how commands are declared.

Exit codes: 0 success; 1 the command ran but failed (the node refused, wrong password for the
operator key, unreadable store, ...); 2 usage or bad input (flags, files, config, the wallet and
its password); 3 the node cannot be reached; 130 interrupted. Every failure is one line
"form: error: ..." on stderr; a traceback would only hide the message the user needs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from formation.cli import account, catalog, dev, dns, instance, key, node, pack, secrets
from formation.cli.output import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CliError,
    error,
)
from formation.cli.parsing import Parser, common_options
from formation.cli.session import close_context
from formation.keystore import KeystoreError
from formation.node.config import ConfigError
from formation.node.fog import InviteError
from formation.node.setup import NodeError

__all__ = ["build_parser", "main"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("formation")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="form", description="Formation: a peer-to-peer fog for AI agents and models.")
    parser.add_argument("--version", action="version", version=f"form {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = common_options()
    for register in (node.register, key.register, pack.register, dev.register, key.register_kit,
                     account.register, catalog.register, instance.register, secrets.register, dns.register):
        register(commands, common)
    parser.set_defaults(func=None, parser=parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.func is None:  # `form` or `form GROUP` without a command
        args.parser.print_help(sys.stderr)
        return EXIT_USAGE

    try:
        return args.func(args)
    except CliError as exc:
        error(exc.message)
        return exc.code
    except ConfigError as exc:
        error(str(exc))
        return EXIT_USAGE
    except (KeystoreError, NodeError, InviteError) as exc:
        error(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        error("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: still one line, but say what it was
        if logging.getLogger().handlers:  # `form node`, whose log an operator sends with a report
            logging.getLogger("formation").error("the node hit a bug", exc_info=exc)
        error(f"unexpected {type(exc).__name__}: {exc}")
        return EXIT_FAILURE
    finally:
        close_context(args)
