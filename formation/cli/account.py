"""`form account create|get|update|delete`: the wallet's account on the fog."""

from __future__ import annotations

import argparse

from formation.cli import output
from formation.cli.parsing import group, leaf
from formation.cli.session import context
from formation.crdt.keys import to_checksum


def _write(args: argparse.Namespace, action: str, body: dict | None, done: str) -> int:
    ctx = context(args)
    res = ctx.call("POST", f"/v1/account/{action}", body)
    return output.report_write(ctx.json, res, f"{done} account {to_checksum(ctx.key().address)}")


def cmd_account_create(args: argparse.Namespace) -> int:
    return _write(args, "create", {"name": args.name} if args.name is not None else {}, "created")


def cmd_account_get(args: argparse.Namespace) -> int:
    ctx = context(args)
    return output.show_record(ctx.json, ctx.call("GET", f"/v1/account/{ctx.address}/get"))


def cmd_account_update(args: argparse.Namespace) -> int:
    return _write(args, "update", {"name": args.name}, "updated")


def cmd_account_delete(args: argparse.Namespace) -> int:
    return _write(args, "delete", None, "deleted")


def cmd_account_usage(args: argparse.Namespace) -> int:
    from formation.cli.usage import show_account

    ctx = context(args)
    return show_account(ctx.json, ctx.call("GET", "/v1/account/usage"))


def register(commands, common: argparse.ArgumentParser) -> None:
    _, acc = group(commands, "account", "your account on the fog",
                   "Your account: the record keyed by the wallet's address.")
    p = leaf(acc, "create", "create your account (100 credits to start)", cmd_account_create, common)
    p.add_argument("--name", metavar="N", help="a display name")
    leaf(acc, "get", "show your account", cmd_account_get, common)
    p = leaf(acc, "update", "change your account's name", cmd_account_update, common)
    p.add_argument("--name", metavar="N", required=True, help="the new display name")
    leaf(acc, "delete", "delete your account", cmd_account_delete, common)
    leaf(acc, "usage", "what your instances used: CPU, memory, disk, network, hires, tokens", cmd_account_usage,
         common)
