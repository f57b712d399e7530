"""`form account create|get|update|delete`: the wallet's account on the fog."""

from __future__ import annotations

import argparse

from formation.cli import output
from formation.cli.output import EXIT_USAGE, CliError
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


def cmd_account_credits(args: argparse.Namespace) -> int:
    ctx = context(args)
    res = ctx.call("GET", "/v1/account/credits")
    if ctx.json:
        output.print_json(res)
        return 0
    output.fields([("address", res["address"]), ("balance", res["balance"]), ("start", res["start"]),
                   ("granted", res["granted"]), ("earned", res["earned"]),
                   ("spent", f"{res['spent']} ({res['calls']} calls)"),
                   ("moved", f"{res['moved_in']} in, {res['moved_out']} out"),
                   ("treasury", res.get("treasury") or "none (this fog grants no credits)"),
                   ("operator share", f"{res['operator_share_percent']} %")])
    if res.get("purses"):
        output.blank()
        output.table(res["purses"], [("HELD AT NODE", lambda p: p["node"]), ("HELD", lambda p: p["held"]),
                                     ("GRANTED", lambda p: p["granted"]), ("EARNED", lambda p: p["earned"]),
                                     ("SPENT", lambda p: p["spent"]), ("IN", lambda p: p["moved_in"]),
                                     ("OUT", lambda p: p["moved_out"])], "no credits held anywhere")
    grants = res.get("grants") or []
    if grants:
        output.blank()
        output.table(grants, [("GRANT", lambda g: g["grant_id"]), ("AMOUNT", lambda g: g["amount"]),
                              ("AT", lambda g: g["at"]), ("MEMO", lambda g: g["memo"]),
                              ("WHEN", lambda g: output.iso(g["created_at"]))], "no grants")
    return 0


def _amount(value: str) -> int:
    try:
        amount = int(value)
    except ValueError:
        amount = -1
    if not 1 <= amount <= 10**12:
        raise CliError(f"AMOUNT must be a whole number of credits from 1 to 10^12, not {value!r}", EXIT_USAGE)
    return amount


def _node_address(ctx, given: str | None) -> str:
    """The node named, or the one this command talks to."""
    if given:
        return given.lower()
    return ctx.call("GET", "/v1/health", sign=False)["address"].lower()


def cmd_account_move(args: argparse.Namespace) -> int:
    ctx = context(args)
    amount = _amount(args.amount)
    to = _node_address(ctx, args.to)
    body = {"from_node": args.from_node.lower(), "to_node": to, "amount": amount}
    res = ctx.call("POST", "/v1/credits/move", body)
    return output.report_write(ctx.json, res, f"asked node {body['from_node']} to move {amount} credits to {to} "
                               "(it does so as soon as it hears of it; `form account credits` shows them arrive)")


def cmd_account_grant(args: argparse.Namespace) -> int:
    ctx = context(args)
    amount = _amount(args.amount)
    fog = ctx.call("GET", "/v1/fog", sign=False)
    if not fog.get("treasury"):
        raise CliError(f"fog {fog.get('fog_id')} has no treasury: no one grants credits in it")
    if fog["treasury"] != ctx.address:
        raise CliError(f"grants are signed by the fog's treasury {fog['treasury']}; this wallet is "
                         f"{ctx.address} (use the treasury's wallet: --wallet or FORM_WALLET)")
    at = _node_address(ctx, args.at)
    body = {"to": args.address.lower(), "amount": amount, "at": at, "memo": args.memo or "", "fog": fog}
    res = ctx.call("POST", "/v1/credits/grant", body)
    return output.report_write(ctx.json, res, f"granted {amount} credits to {args.address}, held at node {at}")


def register(commands, common: argparse.ArgumentParser) -> None:
    _, acc = group(commands, "account", "your account on the fog",
                   "Your account: the record keyed by the wallet's address.")
    p = leaf(acc, "create", "create your account (`form account credits` shows its balance)", cmd_account_create, common)
    p.add_argument("--name", metavar="N", help="a display name")
    leaf(acc, "get", "show your account", cmd_account_get, common)
    p = leaf(acc, "update", "change your account's name", cmd_account_update, common)
    p.add_argument("--name", metavar="N", required=True, help="the new display name")
    leaf(acc, "delete", "delete your account", cmd_account_delete, common)
    leaf(acc, "credits", "your credits: balance, grants, earned, spent", cmd_account_credits, common)
    p = leaf(acc, "grant", "give credits to an account (signed with the fog's treasury key)", cmd_account_grant,
             common)
    p.add_argument("address", metavar="ADDRESS", help="the account that receives them")
    p.add_argument("amount", metavar="AMOUNT", help="whole credits, 1 to 10^12")
    p.add_argument("--memo", metavar="TEXT", help="a note kept with the grant (up to 256 characters)")
    p.add_argument("--at", metavar="NODE", help="the node that holds the credits, the only one that spends them "
                                                "(default: the node this command talks to)")
    p = leaf(acc, "move", "move your credits from the node that holds them to another", cmd_account_move, common,
             description="A node spends only the credits it holds of you (docs/economy.md): move some to the "
                         "node you call agents through. The holding node carries it out when it hears of it, "
                         "as much as it holds.")
    p.add_argument("amount", metavar="AMOUNT", help="whole credits, 1 to 10^12")
    p.add_argument("--from", dest="from_node", metavar="NODE", required=True, help="the node that holds them")
    p.add_argument("--to", metavar="NODE", help="the node to hold them (default: the node this command talks to)")
    leaf(acc, "usage", "what your instances used: CPU, memory, disk, network, hires, tokens", cmd_account_usage,
         common)
