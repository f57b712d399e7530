"""`form dns add|update|remove|list|verify`: DNS records of the fog (A, AAAA, CNAME), and
whether a vanity domain is proven (docs/dns.md)."""

from __future__ import annotations

import argparse
import ipaddress
import urllib.parse

from formation.cli import output
from formation.cli.output import EXIT_FAILURE, EXIT_USAGE, CliError, Column
from formation.cli.parsing import group, leaf, paging
from formation.cli.session import Context, check_address, check_id, context, owner_filter

DEFAULT_DNS_PORT = 5453  # formation.toml [dns] port

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
    _served_note(domain, ctx.address)
    return output.report_write(ctx.json, res, f"added {fields['record_type']} record {domain}")


def _served_note(domain: str, owner: str) -> None:
    """Say when a record will not be served as it stands (the nodes' rules, formation/dns/names.py)."""
    from formation.dns.names import canonical_name, in_fog, owner_label
    from formation.dns.verify import PREFIX

    name = canonical_name(domain) or domain
    if in_fog(name):
        space = f"{owner_label(owner)}.fog"
        if name != space and not name.endswith("." + space):
            output.note(f"{domain} is not served: under .fog the nodes serve only names in your own "
                        f"space, NAME.{space}")
    else:
        output.note(f"{domain} is served once its own DNS proves it is yours: a TXT record "
                    f'{PREFIX}.{name}. "{owner}" (check with `form dns verify {name}`)')


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


def _dns_server(text: str | None, node_url: str) -> tuple[str, int]:
    """--server HOST[:PORT], by default the node's host on the DNS port."""
    if not text:
        host = urllib.parse.urlsplit(node_url).hostname or "127.0.0.1"
        return host, DEFAULT_DNS_PORT
    host, port = text, DEFAULT_DNS_PORT
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else DEFAULT_DNS_PORT
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        if not p.isdigit():
            raise CliError(f"--server {text!r}: expected HOST[:PORT]", EXIT_USAGE)
        port = int(p)
    return host, port


def _ask(server: tuple[str, int], name: str, rdtype: str, timeout: float = 3.0):
    """One question to a DNS server (TCP when the UDP answer is truncated); None if no answer."""
    import socket

    import dns.exception
    import dns.flags
    import dns.message
    import dns.query

    try:
        host = socket.getaddrinfo(server[0], server[1], proto=socket.IPPROTO_UDP)[0][4][0]
        q = dns.message.make_query(name, rdtype, use_edns=0, payload=1232)
        r = dns.query.udp(q, host, port=server[1], timeout=timeout)
        if r.flags & dns.flags.TC:
            r = dns.query.tcp(q, host, port=server[1], timeout=timeout)
        return r
    except (OSError, dns.exception.DNSException, ValueError):
        return None


def verify_report(domain: str, owner: str, records: list[dict], server: tuple[str, int],
                  txt, served) -> tuple[bool, dict]:
    """(proven and served, the report) from what the lookups found."""
    import dns.flags
    import dns.rcode
    import dns.rdatatype

    from formation.dns.verify import PREFIX, owners_in

    txt_name = f"{PREFIX}.{domain}"
    named = sorted(owners_in(txt)) if txt is not None else []
    if txt is None:
        txt_state = "no answer (is the node's DNS server reachable? see --server)"
    elif txt.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        txt_state = f"the lookup failed: {dns.rcode.to_text(txt.rcode())}"
    elif not named:
        txt_state = f"no TXT record at {txt_name} names an address"
    else:
        txt_state = "names " + ", ".join(named)
    proven = owner in named
    addresses: list[str] = []
    authoritative = False
    if served is not None and served.rcode() == dns.rcode.NOERROR:
        authoritative = bool(served.flags & dns.flags.AA)
        addresses = [r.to_text() for rrset in served.answer for r in rrset
                     if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.CNAME)]
    serving = authoritative and bool(records)
    hint = None
    if not records:
        hint = f"{owner} has no DNS record for {domain}: `form dns add {domain} --target ...`"
    elif not proven:
        hint = f'add to the DNS of {domain}: {txt_name}. TXT "{owner}"'
    elif not serving:
        hint = ("proven, but the node does not serve it yet: each node checks again when the TXT "
                "record's TTL runs out (at least dns.verify_min_seconds)")
    report = {
        "domain": domain, "owner": owner, "txt_name": txt_name, "txt": txt_state,
        "txt_owners": named, "proven": proven, "records": [r.get("record_id") for r in records],
        "dns_server": f"{server[0]}:{server[1]}", "served": serving, "answer": addresses, "hint": hint,
    }
    return proven and serving, report


def cmd_dns_verify(args: argparse.Namespace) -> int:
    domain = _domain(args.domain)
    ctx = context(args)
    owner = check_address(args.owner) if args.owner else ctx.address
    server = _dns_server(args.server, ctx.node_url)
    res = ctx.call("GET", "/v1/dns/list", query={"owner": owner, "limit": 1000}, sign=False)
    records = [r for r in res.get("records", []) if r.get("domain") == domain]
    txt = _ask(server, f"_formation.{domain}", "TXT")
    served = _ask(server, domain, "A")
    ok, report = verify_report(domain, owner, records, server, txt, served)
    if ctx.json:
        output.print_json(report)
    else:
        output.fields([
            ("domain", domain), ("owner", owner),
            ("records", ", ".join(report["records"]) or "none"),
            (report["txt_name"], report["txt"]),
            ("proven", "yes" if report["proven"] else "no"),
            (f"served by {report['dns_server']}",
             ("yes: " + " ".join(report["answer"])) if report["served"] else "no"),
        ])
        if report["hint"]:
            output.note(report["hint"])
    return output.EXIT_OK if ok else EXIT_FAILURE


def register(commands, common: argparse.ArgumentParser) -> None:
    _, dns = group(commands, "dns", "DNS records of the fog",
                   "DNS records of the fog: names in your own space (NAME.<you>.fog) and vanity "
                   "domains your domain's DNS proves (docs/dns.md); the owner manages them.")
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
    p = leaf(dns, "verify", "is a vanity domain proven, and served by the node?", cmd_dns_verify, common,
             description="Look up TXT _formation.DOMAIN (through the node's DNS server, so as its "
                         "upstream sees it) and ask the node's DNS server for DOMAIN: the domain is "
                         "served once the TXT record names the owner's address. Exit status 0 when "
                         "it is proven and served.")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--owner", metavar="ADDRESS", help="whose records (default: your wallet's address)")
    p.add_argument("--server", metavar="HOST[:PORT]",
                   help=f"the node's DNS server (default: the node's host, port {DEFAULT_DNS_PORT})")
    p = leaf(dns, "list", "list records", cmd_dns_list, common)
    p.add_argument("--owner", metavar="ADDRESS", nargs="?", const="me",
                   help="only owned by ADDRESS (no value: yours)")
    paging(p)
