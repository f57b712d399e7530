"""`form model` and `form agent`: register|get|list|search|update|delete|authorize|transfer, the
same commands for both kinds of catalog record; and `form agent hire`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from formation.cli import output
from formation.cli.build import formfile_to_send
from formation.cli.output import EXIT_OK, EXIT_USAGE, CliError, Column
from formation.cli.parsing import group, leaf, paging, record_id
from formation.cli.session import (
    authorize,
    check_id,
    context,
    node_refused,
    owner_filter,
    read_record_file,
    transfer,
)

CATALOG = {
    "model": {"base": "/v1/models", "plural": "models", "type": "model_type"},
    "agent": {"base": "/v1/agents", "plural": "agents", "type": "agent_type"},
}


def model_binding(r: dict) -> str:
    """An agent's (or instance's) Formfile MODEL: "<id> (required)", "<id> (preferred)" or "-"."""
    if not r.get("model_id"):
        return "-"
    return f"{r['model_id']} ({'required' if r.get('model_required') else 'preferred'})"


def _columns(kind: str) -> list[Column]:
    t = CATALOG[kind]["type"]
    cols: list[Column] = [
        ("ID", lambda r: r.get(f"{kind}_id")), ("NAME", lambda r: r.get("name")),
        ("TYPE", lambda r: r.get(t)), ("FRAMEWORK", lambda r: r.get("framework")),
        ("VERSION", lambda r: r.get("version") or "-"),
        ("OWNER", lambda r: output.short(r.get("owner"))),
        ("PRIVATE", lambda r: r.get("is_private")), ("TAGS", lambda r: r.get("tags") or "-")]
    if kind == "agent":
        cols.insert(3, ("MODEL", model_binding))
    return cols


FORMFILE_FIELDS = ("formfile", "formfile_template")


def record_body(args: argparse.Namespace, kind: str, ctx) -> dict:
    """The fields of FILE (and --formfile's text), with every Formfile's USER passwords in clear
    replaced by crypt hashes before they are sent (formation/crypthash.py)."""
    body = read_record_file(args.file, kind)
    path = getattr(args, "formfile", None)
    if path:
        try:
            body["formfile"] = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise CliError(f"cannot read {path}: {reason or exc}", EXIT_USAGE) from None
    for name in FORMFILE_FIELDS:
        if isinstance(body.get(name), str):
            where = path if name == "formfile" and path else f"{args.file} ({name})"
            body[name] = formfile_to_send(body[name], ctx, where)
    return body


def cmd_catalog_register(args: argparse.Namespace) -> int:
    kind = args.kind
    ctx = context(args)
    body = record_body(args, kind, ctx)
    if getattr(args, "build_id", None):
        body["build_id"] = args.build_id  # known only after `form pack build` / `ship`
    res = ctx.call("POST", CATALOG[kind]["base"], body)
    return output.report_write(ctx.json, res, f"registered {kind} {res.get('id')}")


def cmd_agent_hire(args: argparse.Namespace) -> int:
    """POST the JSON to a running replica of the agent (through the node) and print its answer."""
    rid = check_id(args.id, "agent id")
    raw = args.data
    if raw.startswith("@"):
        try:
            raw = Path(raw[1:]).read_text()
        except OSError as exc:
            raise CliError(f"cannot read {raw[1:]}: {exc.strerror}", EXIT_USAGE) from None
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise CliError(f"--data is not JSON: {exc}", EXIT_USAGE) from None
    ctx = context(args)
    status, doc = ctx.post_doc(f"/v1/agents/{rid}/hire", body, timeout=args.timeout)
    if status >= 400 and set(doc) >= {"error", "detail"}:
        raise node_refused(status, doc["error"], doc["detail"], "POST", f"/v1/agents/{rid}/hire")
    output.print_json(doc)
    return EXIT_OK


def cmd_catalog_get(args: argparse.Namespace) -> int:
    kind = args.kind
    ctx = context(args)
    rid = check_id(args.id, f"{kind} id")
    key = ctx.key_if_available()
    rec = ctx.call("GET", f"{CATALOG[kind]['base']}/{rid}", key=key, sign=key is not None)
    return output.show_record(ctx.json, rec)


def cmd_catalog_list(args: argparse.Namespace) -> int:
    kind, info = args.kind, CATALOG[args.kind]
    ctx = context(args)
    owner = owner_filter(ctx, args)
    key = ctx.key_if_available()
    query = {"type": args.type, "tag": args.tag, "owner": owner, "limit": args.limit,
             "offset": args.offset}
    res = ctx.call("GET", info["base"], query=query, key=key, sign=key is not None)
    return output.listing(ctx.json, res, info["plural"], _columns(kind), f"no {info['plural']}")


def cmd_catalog_search(args: argparse.Namespace) -> int:
    kind, info = args.kind, CATALOG[args.kind]
    ctx = context(args)
    owner = owner_filter(ctx, args)
    body = {"text": " ".join(args.text) if args.text else None, "type": args.type,
            "framework": args.framework, "tags": args.tag or None, "owner": owner,
            "limit": args.limit, "offset": args.offset}
    body = {k: v for k, v in body.items() if v is not None}
    key = ctx.key_if_available()
    try:
        res = ctx.call("POST", f"{info['base']}/search", body, key=key, sign=key is not None)
    except CliError as exc:
        # A signed search is a POST, so the node allows each signature once; the same search
        # repeated within the same second has the same signature. Sign again a second later.
        if key is None or "refused: replay" not in exc.message:
            raise
        time.sleep(1.05 - time.time() % 1)
        res = ctx.call("POST", f"{info['base']}/search", body, key=key)
    return output.listing(ctx.json, res, info["plural"], _columns(kind), f"no {info['plural']} match")


def cmd_catalog_update(args: argparse.Namespace) -> int:
    kind = args.kind
    rid = check_id(args.id, f"{kind} id")
    ctx = context(args)
    body = record_body(args, kind, ctx)
    res = ctx.call("PUT", f"{CATALOG[kind]['base']}/{rid}", body)
    return output.report_write(ctx.json, res, f"updated {kind} {rid}")


def cmd_catalog_delete(args: argparse.Namespace) -> int:
    kind = args.kind
    rid = check_id(args.id, f"{kind} id")
    ctx = context(args)
    res = ctx.call("DELETE", f"{CATALOG[kind]['base']}/{rid}")
    return output.report_write(ctx.json, res, f"deleted {kind} {rid}")


def cmd_catalog_authorize(args: argparse.Namespace) -> int:
    return authorize(args, CATALOG[args.kind]["base"], args.kind)


def cmd_catalog_transfer(args: argparse.Namespace) -> int:
    return transfer(args, CATALOG[args.kind]["base"], args.kind)


def _credits_arg(value: str | None, what: str, low: int = 0) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        n = -1
    if not low <= n <= 10**12:
        raise CliError(f"{what} must be a whole number from {low} to 10^12, not {value!r}", EXIT_USAGE)
    return n


def cmd_agent_usage(args: argparse.Namespace) -> int:
    from formation.cli.usage import show_agent

    rid = check_id(args.id, "agent id")
    ctx = context(args)
    return show_agent(ctx.json, ctx.call("GET", f"{CATALOG['agent']['base']}/{rid}/usage"))


def cmd_agent_plan(args: argparse.Namespace) -> int:
    rid = check_id(args.id, "agent id")
    ctx = context(args)
    plans = dict(ctx.call("GET", f"{CATALOG['agent']['base']}/{rid}").get("plans") or {})
    if args.remove:
        if args.name not in plans:
            raise CliError(f"agent {rid} has no plan {args.name!r} (its plans: {', '.join(plans) or 'none'})")
        del plans[args.name]
        done = f"agent {rid} no longer sells plan {args.name} (calls already bought stay usable)"
    else:
        if args.price is None or args.calls is None or args.days is None:
            raise CliError("a plan needs --price CREDITS, --calls N and --days D (or --remove)", EXIT_USAGE)
        plans[args.name] = {"price_credits": _credits_arg(args.price, "--price"),
                            "calls": _credits_arg(args.calls, "--calls", low=1),
                            "days": _credits_arg(args.days, "--days", low=1)}
        done = (f"agent {rid} sells plan {args.name}: {plans[args.name]['calls']} calls in "
                f"{plans[args.name]['days']} days for {plans[args.name]['price_credits']} credits")
    res = ctx.call("PUT", f"{CATALOG['agent']['base']}/{rid}", {"plans": plans})
    return output.report_write(ctx.json, res, done)


def cmd_agent_subscribe(args: argparse.Namespace) -> int:
    rid = check_id(args.id, "agent id")
    ctx = context(args)
    res = ctx.call("POST", f"{CATALOG['agent']['base']}/{rid}/subscribe", {"plan": args.plan})
    if ctx.json:
        output.print_json(res)
        return 0
    output.fields([("agent", res["agent_id"]), ("plan", res["plan"]), ("through node", res["node"]),
                   ("calls left", res["calls_left"]), ("until", output.when(res["expires_at"])),
                   ("paid in all", f"{res['credits']} credits ({res['purchases']} purchase(s))")])
    return 0


def cmd_model_price(args: argparse.Namespace) -> int:
    rid = check_id(args.id, "model id")
    price = _credits_arg(args.credits, "CREDITS")
    ctx = context(args)
    res = ctx.call("PUT", f"{CATALOG['model']['base']}/{rid}", {"price_credits_per_hour": price})
    return output.report_write(ctx.json, res, f"an hour of an instance of model {rid} costs {price} credits")


def cmd_agent_price(args: argparse.Namespace) -> int:
    rid = check_id(args.id, "agent id")
    body = {"price_credits_per_call": _credits_arg(args.credits, "CREDITS")}
    if args.per_1k_tokens is not None:
        body["price_credits_per_1k_tokens"] = _credits_arg(args.per_1k_tokens, "--per-1k-tokens")
    if args.max_tokens is not None:
        body["max_billed_tokens"] = _credits_arg(args.max_tokens, "--max-tokens", low=1)
    ctx = context(args)
    res = ctx.call("PUT", f"{CATALOG['agent']['base']}/{rid}", body)
    tokens = (f" + {body['price_credits_per_1k_tokens']} per 1,000 tokens"
              if body.get("price_credits_per_1k_tokens") else "")
    return output.report_write(ctx.json, res, f"agent {rid} costs {body['price_credits_per_call']} credits a call"
                               + tokens)


def register(commands, common: argparse.ArgumentParser) -> None:
    for kind in ("model", "agent"):
        _register_kind(commands, common, kind)


def formfile_option(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("--formfile", metavar="PATH",
                   help=f"a Formfile: its text becomes the {kind}'s formfile" + (
                       " and its MODEL line the model the agent names (model_id, model_required)"
                       if kind == "agent" else "") + "; USER passwords are hashed before it is sent")


def _register_kind(commands, common: argparse.ArgumentParser, kind: str) -> None:
    plural = CATALOG[kind]["plural"]
    _, cat = group(commands, kind, f"publish and find {plural}",
                   f"Publish, find and share {plural} of the fog's catalog.")
    p = leaf(cat, "register", f"publish a {kind} described in a TOML or JSON file",
             cmd_catalog_register, common, kind=kind,
             description=f"Publish a {kind}: FILE (.toml or .json) holds its fields (name, "
                         f"description, {CATALOG[kind]['type']}, framework, tags, ...), at the "
                         f"top level or under a [{kind}] table. Prints the new id.")
    p.add_argument("file", metavar="FILE", help=f"the {kind}'s fields, .toml or .json")
    formfile_option(p, kind)
    if kind == "model":
        p = leaf(cat, "price", "set what an hour of an instance bound to the model costs its owner",
                 cmd_model_price, common,
                 description="The model's price_credits_per_hour: the node hosting a replica of an instance "
                             "whose Formfile binds the model (MODEL) charges its owner an hour in advance, "
                             "and stops the replica when the owner's credits there cannot pay the next one "
                             "(docs/economy.md, \"Rent\"); your own instances run free; 0 makes it free.")
        record_id(p)
        p.add_argument("credits", metavar="CREDITS", help="whole credits per hour (0: free)")
    if kind == "agent":
        p.add_argument("--build-id", metavar="ID",
                       help="the image its instances run (from `form pack ship`); /hire goes there")
        p = leaf(cat, "hire", "send a JSON request to a running instance of the agent",
                 cmd_agent_hire, common,
                 description="POST the JSON to the agent (port and path from its record) through "
                             "the node, which picks a running replica; prints the agent's answer.")
        record_id(p)
        p.add_argument("--data", metavar="JSON", default="{}", help="the request: JSON, or @FILE")
        p.add_argument("--timeout", metavar="S", type=float, default=300.0,
                       help="seconds to wait for the answer (default 300)")
        p = leaf(cat, "price", "set what a call of the agent costs its callers, in credits", cmd_agent_price,
                 common, description="The agent's prices: each call through the hire proxy moves them from "
                                     "the caller to you, less the hosting operator's share (docs/economy.md); "
                                     "0 makes it free. Tokens are what the agent reports in its answer's "
                                     "X-Formation-Tokens header, billed up to --max-tokens a call (a call holds "
                                     "its highest price when it is admitted).")
        record_id(p)
        p.add_argument("credits", metavar="CREDITS", help="whole credits per call (0: free)")
        p.add_argument("--per-1k-tokens", metavar="CREDITS", help="credits per 1,000 tokens in and out")
        p.add_argument("--max-tokens", metavar="N", help="tokens billed at most per call (default 4096)")
        record_id(leaf(cat, "usage", "your agent's usage: its instances' counters and its calls as charged",
                       cmd_agent_usage, common))
        p = leaf(cat, "plan", "add, change or remove a plan of your agent (a number of calls for a price)",
                 cmd_agent_plan, common,
                 description="A plan sells CALLS calls of the agent, usable for DAYS days, for PRICE credits; "
                             "a consumer buys it through a node (`form agent subscribe`) and calls through that "
                             "node without paying per call. Up to 8 plans; an agent with plans and no per-call "
                             "price is sold by plan only (docs/economy.md).")
        record_id(p)
        p.add_argument("name", metavar="NAME", help="the plan's name (a-z, 0-9, '-')")
        p.add_argument("--price", metavar="CREDITS", help="what it costs (0: a free tier)")
        p.add_argument("--calls", metavar="N", help="calls it includes")
        p.add_argument("--days", metavar="D", help="days they are usable for, from the purchase")
        p.add_argument("--remove", action="store_true", help="stop selling it")
        p = leaf(cat, "subscribe", "buy a plan of an agent through the node you talk to", cmd_agent_subscribe,
                 common, description="Pays the plan's price from your credits held at this node; its calls are "
                                     "then admitted through this node until they run out or the plan ends.")
        record_id(p)
        p.add_argument("plan", metavar="PLAN", help="the plan's name (`form agent get ID` lists them)")
    record_id(leaf(cat, "get", f"show one {kind}", cmd_catalog_get, common, kind=kind))
    for name, fn, help_ in (("list", cmd_catalog_list, f"list {plural}, with filters"),
                            ("search", cmd_catalog_search, f"search {plural} by words and filters")):
        p = leaf(cat, name, help_, fn, common, kind=kind)
        if name == "search":
            p.add_argument("text", metavar="TEXT", nargs="*", help="words to find in name, description, tags")
            p.add_argument("--framework", metavar="F", help="only this framework")
            p.add_argument("--tag", metavar="TAG", action="append", help="must have this tag (repeatable)")
        else:
            p.add_argument("--tag", metavar="TAG", help="only with this tag")
        p.add_argument("--type", metavar="T", help=f"only this {CATALOG[kind]['type']}")
        p.add_argument("--owner", metavar="ADDRESS", help="only owned by ADDRESS ('me' for yours)")
        p.add_argument("--mine", action="store_true", help="only yours")
        paging(p)
    p = leaf(cat, "update", f"change a {kind}'s fields from a TOML or JSON file",
             cmd_catalog_update, common, kind=kind)
    record_id(p)
    p.add_argument("file", metavar="FILE", help="the fields to change, .toml or .json")
    formfile_option(p, kind)
    record_id(leaf(cat, "delete", f"delete a {kind} (owner only)", cmd_catalog_delete, common,
                   kind=kind))
    record_id(leaf(cat, "authorize", f"grant or revoke a user's level on a {kind}",
                   cmd_catalog_authorize, common, kind=kind), "address", "level")
    record_id(leaf(cat, "transfer", f"give a {kind} to another address (owner only)",
                   cmd_catalog_transfer, common, kind=kind), "address")
