"""`form manage`: the instances you own or are authorized on; list, get, authorize, transfer,
delete|start|stop|restart|pause|resume, and each replica's address (get-ip), console (logs) and
metrics."""

from __future__ import annotations

import argparse

from formation.argtypes import int_in
from formation.cli import output
from formation.cli.node import cmd_formnet_status, cmd_leave, control_flags, join_flags
from formation.cli.output import EXIT_OK, EXIT_USAGE, CliError, Column
from formation.cli.parsing import group, leaf, paging, record_id
from formation.cli.session import Context, authorize, check_id, context, transfer
from formation.dns.names import replica_name

INSTANCE_BASE = "/v1/instance"


def _running(r: dict) -> str:
    """The replicas running of those wanted, as "1/2"."""
    statuses = r.get("replicas_status")
    if statuses is None:
        return str(r.get("replicas", "-"))
    running = sum(1 for s in statuses if s.get("state") == "running")
    return f"{running}/{r.get('replicas', '-')}"


INSTANCE_COLUMNS: list[Column] = [
    ("ID", lambda r: r.get("instance_id")), ("NAME", lambda r: r.get("name")),
    ("DESIRED", lambda r: r.get("desired_state")), ("REPLICAS", lambda r: r.get("replicas")),
    ("BUILD", lambda r: (r.get("build_id") or "-")[:16]),
    ("OWNER", lambda r: output.short(r.get("owner"))),
    ("UPDATED", lambda r: output.iso(r["updated_at"]) if r.get("updated_at") else "-"),
]
REPLICA_COLUMNS: list[Column] = [
    ("NODE", lambda s: s.get("node")), ("STATE", lambda s: s.get("state")), ("IP", lambda s: s.get("ip")),
    ("NAME", lambda s: s.get("name") or "-"),
]


def _named(instance_id: str, replicas: list[dict]) -> list[dict]:
    """Each replica with the DNS name every node answers for it (docs/dns.md)."""
    return [{**r, "name": replica_name(r["node"], instance_id)} if r.get("node") else r for r in replicas]


def cmd_manage_list(args: argparse.Namespace) -> int:
    ctx = context(args)
    res = ctx.call("GET", f"{INSTANCE_BASE}/list", query={"limit": args.limit, "offset": args.offset})
    return output.listing(ctx.json, res, "instances", INSTANCE_COLUMNS, "no instances")


def _read(args: argparse.Namespace, what: str, query: dict | None = None) -> tuple[Context, dict]:
    """GET INSTANCE_BASE/ID/what: the context and the answer."""
    rid = check_id(args.id, "instance id")
    ctx = context(args)
    return ctx, ctx.call("GET", f"{INSTANCE_BASE}/{rid}/{what}", query=query)


def cmd_manage_get(args: argparse.Namespace) -> int:
    ctx, inst = _read(args, "get")
    if ctx.json:
        output.print_json(inst)
        return EXIT_OK
    statuses = inst.get("replicas_status") or []
    output.record({k: v for k, v in inst.items() if k != "replicas_status"}
                  | {"running": _running(inst)})
    if statuses:
        output.blank()
        output.table(statuses, [*REPLICA_COLUMNS, ("GEN", lambda s: s.get("generation")),
                                ("REASON", lambda s: s.get("reason") or "-")], "")
    return EXIT_OK


def cmd_manage_authorize(args: argparse.Namespace) -> int:
    return authorize(args, INSTANCE_BASE, "instance")


def cmd_manage_transfer(args: argparse.Namespace) -> int:
    return transfer(args, INSTANCE_BASE, "instance")


def cmd_manage_action(args: argparse.Namespace) -> int:
    rid = check_id(args.id, "instance id")
    ctx = context(args)
    res = ctx.call("POST", f"{INSTANCE_BASE}/{rid}/{args.action}")
    verb = {"delete": "deletion", "start": "start", "stop": "stop", "restart": "restart", "pause": "pause",
            "resume": "resume"}[args.action]
    return output.report_write(ctx.json, res, f"{verb} of instance {rid} accepted; its nodes apply it shortly "
                                              f"(`form manage get {rid}` shows its replicas' states)")


def cmd_manage_get_ip(args: argparse.Namespace) -> int:
    """The replicas of one instance, or (--build-id, as in the original's workflow) of every
    instance of a build that you may see. Their addresses are reachable over formnet."""
    if (args.id is None) == (args.build_id is None):
        raise CliError("give an instance ID or --build-id BUILD_ID (one of them)", EXIT_USAGE)
    if args.id is not None:
        ctx, res = _read(args, "ips")
        res = {**res, "replicas": _named(res.get("instance_id") or args.id, res.get("replicas") or [])}
        return output.listing(ctx.json, res, "replicas", REPLICA_COLUMNS,
                              f"no node reports a replica of instance {args.id} yet")
    build = check_id(args.build_id, "build id")
    ctx = context(args)
    instances = ctx.call("GET", f"{INSTANCE_BASE}/{build}/get_by_build_id").get("instances") or []
    rows = [{"instance_id": inst["instance_id"], **r} for inst in instances
            for r in _named(inst["instance_id"],
                            ctx.call("GET", f"{INSTANCE_BASE}/{inst['instance_id']}/ips").get("replicas") or [])]
    empty = (f"no instance of build {build} that you may see" if not instances
             else f"no node reports a replica of build {build}'s {len(instances)} instance(s) yet")
    return output.listing(ctx.json, {"build_id": build, "replicas": rows}, "replicas",
                          [("INSTANCE", lambda r: r.get("instance_id")), *REPLICA_COLUMNS], empty)


def cmd_manage_logs(args: argparse.Namespace) -> int:
    ctx, res = _read(args, "logs", {"tail": args.tail})
    if ctx.json:
        output.print_json(res)
    else:
        output.write_text(res.get("log") or "")
    return EXIT_OK


def cmd_manage_metrics(args: argparse.Namespace) -> int:
    ctx, res = _read(args, "metrics")
    if ctx.json:
        output.print_json(res)
        return EXIT_OK
    rss = res.get("rss_bytes")
    output.fields([("instance", res.get("instance_id")), ("node", res.get("node")),
                   ("vm", res.get("vm_state")), ("ip", res.get("ip")),
                   ("cpu", f"{res['cpu_seconds']} s" if res.get("cpu_seconds") is not None else "-"),
                   ("memory", f"{rss // (1 << 20)} MiB" if rss is not None else "-"),
                   ("uptime", f"{res['uptime_s']} s" if res.get("uptime_s") is not None else "-"),
                   ("restarts", res.get("restarts"))])
    return EXIT_OK


def cmd_manage_usage(args: argparse.Namespace) -> int:
    from formation.cli.usage import show_instance

    ctx, res = _read(args, "usage")
    return show_instance(ctx.json, res)


def register(commands, common: argparse.ArgumentParser) -> None:
    _, man = group(commands, "manage", "manage your instances",
                   "Manage instances you own or are authorized on.")
    paging(leaf(man, "list", "list your instances", cmd_manage_list, common))
    record_id(leaf(man, "get", "show one instance and its replicas", cmd_manage_get, common))
    record_id(leaf(man, "authorize", "grant or revoke a user's level on an instance",
                   cmd_manage_authorize, common), "address", "level")
    record_id(leaf(man, "transfer", "give an instance to another address (owner only)",
                   cmd_manage_transfer, common), "address")
    p = leaf(man, "get-ip", "the IP address of each replica of an instance (or of a build's instances)",
             cmd_manage_get_ip, common,
             description="Each replica of an instance: the node that hosts it, its state and its IP "
                         "address (GET /instance/ID/ips), reachable from every member over formnet. "
                         "With --build-id: the replicas of every instance of that build you may see.")
    p.add_argument("id", metavar="ID", nargs="?", help="the instance id")
    p.add_argument("--build-id", metavar="BUILD_ID", help="every instance of this build instead")
    record_id(leaf(man, "metrics", "VM state, CPU time and memory of an instance's replica on the "
                   "node you ask", cmd_manage_metrics, common))
    record_id(leaf(man, "usage", "an instance's usage as each node measured it, and the total",
                   cmd_manage_usage, common))
    p = leaf(man, "logs", "the console of an instance's replica on the node you ask", cmd_manage_logs,
             common, description="The console output (boot, entrypoint) of the replica of an "
                                 "instance that runs on the node you ask; if it runs elsewhere, the "
                                 "error names the nodes that host it (ask one of them with --node).")
    record_id(p)
    p.add_argument("--tail", metavar="BYTES", type=int_in(1, 8 * 1024 * 1024, "a number of bytes"),
                   help="the last BYTES of the console (node default 65536, at most 8 MiB)")
    # the original's names: `form manage join` is `form join`; formnet comes up with the node
    join = man.add_parser("join", help="join a fog with an invite (the same as `form join`)",
                          description="The same as `form join`: claim INVITE (or --genesis) and run "
                                      "the node; formnet comes up with it (`form manage formnet-up` "
                                      "says how it is).")
    join_flags(join)
    up = man.add_parser("formnet-up", help="how this node's formnet is (it comes up with the node)",
                        description="formnet starts with `form node`/`form join` when the node runs "
                                    "as root with wireguard-go: this shows its interface, overlay "
                                    "address and peers, or why it is off.")
    control_flags(up)
    up.add_argument("--json", action="store_true", help="print one JSON object")
    up.set_defaults(func=cmd_formnet_status, parser=up)
    leave = man.add_parser("leave", help="this node leaves its fog (its operator, on its host)",
                           description="The local node leaves its fog: its member record says so, "
                                       "every member drops it from formnet by diff, and its replicas "
                                       "move to other members (make before break).")
    control_flags(leave)
    leave.set_defaults(func=cmd_leave, parser=leave)
    for action, help_ in (("delete", "delete an instance (owner only)"),
                          ("start", "start an instance's replicas (operator or above)"),
                          ("stop", "stop an instance's replicas (operator or above)"),
                          ("restart", "restart an instance's replicas (operator or above)"),
                          ("pause", "pause an instance's VMs: they keep their memory, their vCPUs stop "
                                    "(operator or above)"),
                          ("resume", "run a paused instance's VMs on (operator or above)")):
        record_id(leaf(man, action, help_, cmd_manage_action, common, action=action))
    from formation.cli import ssh  # here: ssh.py reads instances through this module

    ssh.register(man, common)
