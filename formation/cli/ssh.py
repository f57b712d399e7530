"""`form manage ssh ID`: an SSH session on a replica of an instance, as one of its Formfile's USERs.

The address is the replica's, as `form manage get-ip` reads it (reachable over formnet); the
account is the Formfile's last USER (the one the entrypoint runs as), or `--user`. The image has an
SSH server only when a USER has ssh_authorized_keys (docs/formfile.md), so without one there is
nothing to connect to. `ssh` itself does the rest: this command only finds what to give it.
"""

from __future__ import annotations

import argparse
import os
import shlex

from formation.cli import instance, output
from formation.cli.output import EXIT_OK, EXIT_USAGE, CliError
from formation.cli.parsing import leaf
from formation.pack.formfile import Formfile, FormfileError, parse


def cmd_manage_ssh(args: argparse.Namespace) -> int:
    ctx, inst = instance._read(args, "get")
    _, ips = instance._read(args, "ips")  # get-ip's own request
    rest = _ssh_args(args.rest)
    argv = ["ssh", f"{_user(args, inst)}@{_address(args.id, ips.get('replicas') or [])}", *rest]
    if args.print:
        output.print_json({"argv": argv}) if ctx.json else output.result(shlex.join(argv))
        return EXIT_OK
    os.execvp("ssh", argv)
    return EXIT_OK  # not reached: ssh has taken the process


OWN_OPTIONS = ("--print", "--user", "--json", "--node", "--config-dir")


def _ssh_args(rest: list[str]) -> list[str]:
    """What follows ID, for ssh. One of this command's options there is a mistake, not a remote
    command to run (`form manage ssh ID --print` must not connect)."""
    if rest[:1] == ["--"]:
        return rest[1:]
    if rest and rest[0].split("=")[0] in OWN_OPTIONS:
        raise CliError(f"{rest[0]} after the instance id would go to ssh: put it before the id "
                       "(everything after the id is ssh's; `--` first passes it on anyway)", EXIT_USAGE)
    return rest


def _address(iid: str, replicas: list[dict]) -> str:
    """A running replica's address, else any replica's that has one."""
    ranked = sorted((r for r in replicas if r.get("ip")), key=lambda r: r.get("state") != "running")
    if not ranked:
        raise CliError(f"instance {iid} has no address yet (`form manage get {iid}` shows its replicas' states)")
    return ranked[0]["ip"]


def _user(args: argparse.Namespace, inst: dict) -> str:
    ff = _formfile(args.id, inst.get("formfile"))
    if ff is not None and not any(u.ssh_authorized_keys for u in ff.users):
        raise CliError(f"instance {args.id}: no USER of its Formfile has ssh_authorized_keys, so its image "
                       "has no SSH server")
    if args.user:
        return args.user
    if ff is None:
        raise CliError(f"instance {args.id} has no Formfile in its record: give the account with --user")
    return ff.users[-1].username


def _formfile(iid: str, text: str | None) -> Formfile | None:
    if not text:
        return None
    try:
        return parse(text)
    except FormfileError as exc:
        raise CliError(f"instance {iid}: its Formfile does not parse ({exc}): give the account with --user") from None


def register(manage_commands, common: argparse.ArgumentParser) -> None:
    """`form manage ssh`, added to `form manage`'s commands (instance.py)."""
    p = leaf(manage_commands, "ssh", "an SSH session on a replica of an instance", cmd_manage_ssh, common,
             description="Runs `ssh USER@ADDRESS [ARG ...]`: the address of a replica of the instance "
                         "(a running one first, as `form manage get-ip` lists them, reachable over "
                         "formnet) and, unless --user, the Formfile's last USER. The image has an SSH "
                         "server when a USER has ssh_authorized_keys. This command's own options go "
                         "before ID: everything after it is ssh's (its options, a command).")
    p.add_argument("id", metavar="ID", help="the instance id")
    p.add_argument("rest", metavar="ARG", nargs=argparse.REMAINDER,
                   help="given to ssh after USER@ADDRESS: ssh's options, a command to run")
    p.add_argument("--user", metavar="NAME", help="the account to log in as (default: the Formfile's last USER)")
    p.add_argument("--print", action="store_true", help="print the ssh command instead of running it")
