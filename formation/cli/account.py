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


def cmd_account_credits(args: argparse.Namespace) -> int:
    ctx = context(args)
    res = ctx.call("GET", "/v1/account/credits")
    if ctx.json:
        output.print_json(res)
        return 0
    output.fields([("address", res["address"]), ("balance", res["balance"]), ("start", res["start"]),
                   ("granted", res["granted"]), ("earned", res["earned"]),
                   ("spent", f"{res['spent']} ({res['calls']} calls)"),
                   ("treasury", res.get("treasury") or "none (this fog grants no credits)"),
                   ("operator share", f"{res['operator_share_percent']} %")])
    grants = res.get("grants") or []
    if grants:
        output.blank()
        output.table(grants, [("GRANT", lambda g: g["grant_id"]), ("AMOUNT", lambda g: g["amount"]),
                              ("MEMO", lambda g: g["memo"]), ("WHEN", lambda g: output.iso(g["created_at"]))],
                     "no grants")
    return 0


def cmd_account_grant(args: argparse.Namespace) -> int:
    ctx = context(args)
    try:
        amount = int(args.amount)
    except ValueError:
        amount = -1
    if not 1 <= amount <= 10**12:
        raise SystemExit(f"form: AMOUNT must be a whole number of credits from 1 to 10^12, not {args.amount!r}")
    fog = ctx.call("GET", "/v1/fog", sign=False)
    if not fog.get("treasury"):
        raise SystemExit(f"form: fog {fog.get('fog_id')} has no treasury: no one grants credits in it")
    if fog["treasury"] != ctx.address:
        raise SystemExit(f"form: grants are signed by the fog's treasury {fog['treasury']}; this wallet is "
                         f"{ctx.address} (use the treasury's wallet: --wallet or FORM_WALLET)")
    body = {"to": args.address.lower(), "amount": amount, "memo": args.memo or "", "fog": fog}
    res = ctx.call("POST", "/v1/credits/grant", body)
    return output.report_write(ctx.json, res, f"granted {amount} credits to {args.address}")


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
    leaf(acc, "usage", "what your instances used: CPU, memory, disk, network, hires, tokens", cmd_account_usage,
         common)
