"""How the command modules declare their commands: groups, leaves, the options they share.

Each command module has `register(commands, common)`: `commands` is the subparsers of `form`,
`common` the parent parser of the user commands' global options (--node, --json, --config-dir).
A command's parser sets `func` (the function to run: args -> exit code) and `parser` (whose help
`form GROUP` prints when no command is given).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from formation.argtypes import int_in
from formation.cli.output import EXIT_USAGE, error
from formation.cli.session import CONFIG_ENV, DEFAULT_CONFIG_DIR, DEFAULT_NODE

Command = Callable[[argparse.Namespace], int]

port = int_in(1, 65535, "a port number")
positive = int_in(1, None, "a positive integer")
_count = int_in(0, None, "a number")

CONFIG_HELP = "settings file (default: built-in defaults, see formation.toml)"
DATA_DIR_HELP = "data directory (overrides [node] data_dir)"
LEVEL_HELP = "manager, operator, read_only, or none to revoke"
LEVELS = ("manager", "operator", "read_only", "none")


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # the same "form: error:" line as every other failure
        self.print_usage(sys.stderr)
        error(message)
        raise SystemExit(EXIT_USAGE)


def common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("global options")
    g.add_argument("--node", metavar="URL",
                   help=f"the node's HTTP API (overrides node in config.toml; default {DEFAULT_NODE})")
    g.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    g.add_argument("--config-dir", metavar="DIR",
                   help=f"where config.toml and wallet.json are (default ${CONFIG_ENV} or {DEFAULT_CONFIG_DIR})")
    return p


def group(commands, name: str, help_: str, description: str):
    """`form NAME`: a parser whose own commands are added to the subparsers returned."""
    parser = commands.add_parser(name, help=help_, description=description)
    parser.set_defaults(func=None, parser=parser)
    return parser, parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND")


def leaf(commands, name: str, help_: str, fn: Command, common: argparse.ArgumentParser | None,
         description: str | None = None, **defaults) -> argparse.ArgumentParser:
    """A command that runs `fn`; `common` adds the user commands' global options."""
    p = commands.add_parser(name, help=help_, parents=[common] if common else [],
                            description=description or help_[0].upper() + help_[1:] + ".")
    p.set_defaults(func=fn, parser=p, **defaults)
    return p


def paging(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=_count, metavar="N", help="at most N rows (node default 100, max 1000)")
    p.add_argument("--offset", type=_count, metavar="N", help="skip the first N rows")


def record_id(p: argparse.ArgumentParser, *more: str) -> None:
    """ID, then ADDRESS (authorize, transfer) and LEVEL (authorize)."""
    p.add_argument("id", metavar="ID")
    if "address" in more:
        p.add_argument("address", metavar="ADDRESS")
    if "level" in more:
        p.add_argument("level", metavar="LEVEL", choices=LEVELS, help=LEVEL_HELP)
