"""`form dns add|update|remove|list`: DNS records of the fog (A, AAAA, CNAME)."""

from __future__ import annotations

import argparse
import ipaddress

from formation.cli import output
from formation.cli.output import EXIT_FAILURE, EXIT_USAGE, CliError, Column
from formation.cli.parsing import group, leaf, paging
from formation.cli.session import Context, check_id, context, owner_filter

DNS_COLUMNS: list[Column] = [
    ("DOMAIN", lambda r: r.get("domain")), ("TYPE", lambda r: r.get("record_type")),
    ("TARGETS", lambda r: r.get("cname_target") if r.get("record_type") == "CNAME" else r.get("targets") or "-"),
    ("TTL", lambda r: r.get("ttl")), ("OWNER", lambda r: output.short(r.get("owner"))),
]


def _domain(value: str) -> str:
    return check_id(value.lower().rstrip("."), "domain")


def _fields(args: argparse.Namespace, *, creating: bool) -> dict:
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


def _my_record(ctx: Context, domain: str) -> str:
    """The id of the wallet's own record for `domain`: records belong to their creators, so
    several owners may hold one for the same name."""
    res = ctx.call("GET", "/v1/dns/list", query={"owner": ctx.address, "limit": 1000}, sign=False)
    ids = [r["record_id"] for r in res.get("records", []) if r.get("domain") == domain]
    if not ids:
        raise CliError(f"you have no DNS record for {domain} (see `form dns list --owner`)", EXIT_FAILURE)
    return ids[0]


def cmd_dns_add(args: argparse.Namespace) -> int:
    domain = _domain(args.domain)
    if not args.target and not args.cname:
        raise CliError("give at least one --target (an instance id or IP address) or --cname",
                       EXIT_USAGE)
    fields = _fields(args, creating=True)
    ctx = context(args)
    res = ctx.call("POST", "/v1/dns/create", {"domain": domain, **fields})
    return output.report_write(ctx.json, res, f"added {fields['record_type']} record {domain}")


def cmd_dns_update(args: argparse.Namespace) -> int:
    domain = _domain(args.domain)
    fields = _fields(args, creating=False)
    if not fields:
        raise CliError("nothing to change: give --target, --type, --cname or --ttl", EXIT_USAGE)
    ctx = context(args)
    res = ctx.call("POST", f"/v1/dns/{_my_record(ctx, domain)}/update", fields)
    return output.report_write(ctx.json, res, f"updated record {domain}")


def cmd_dns_remove(args: argparse.Namespace) -> int:
    domain = _domain(args.domain)
    ctx = context(args)
    res = ctx.call("POST", f"/v1/dns/{_my_record(ctx, domain)}/delete")
    return output.report_write(ctx.json, res, f"removed record {domain}")


def cmd_dns_list(args: argparse.Namespace) -> int:
    ctx = context(args)
    owner = owner_filter(ctx, args)
    res = ctx.call("GET", "/v1/dns/list", query={"owner": owner, "limit": args.limit,
                                                 "offset": args.offset}, sign=False)
    return output.listing(ctx.json, res, "records", DNS_COLUMNS, "no DNS records")


def register(commands, common: argparse.ArgumentParser) -> None:
    _, dns = group(commands, "dns", "DNS records of the fog",
                   "DNS records of the fog: first come, first served; the owner manages them.")
    for name, fn, help_ in (("add", cmd_dns_add, "add a record (A, AAAA or CNAME)"),
                            ("update", cmd_dns_update, "change a record's targets, type or TTL")):
        p = leaf(dns, name, help_, fn, common)
        p.add_argument("domain", metavar="DOMAIN")
        p.add_argument("--target", metavar="T", action="append",
                       help="an instance id or IP address (repeatable; on update, replaces the list)")
        p.add_argument("--type", choices=("A", "AAAA", "CNAME"), type=str.upper,
                       help="record type (add: CNAME with --cname, AAAA for IPv6 targets, else A)")
        p.add_argument("--cname", metavar="X", help="the name a CNAME record points to")
        p.add_argument("--ttl", metavar="N", type=int, help="seconds, 1 to 86400 (node default 60)")
    p = leaf(dns, "remove", "remove a record (owner only)", cmd_dns_remove, common)
    p.add_argument("domain", metavar="DOMAIN")
    p = leaf(dns, "list", "list records", cmd_dns_list, common)
    p.add_argument("--owner", metavar="ADDRESS", nargs="?", const="me",
                   help="only owned by ADDRESS (no value: yours)")
    paging(p)
