"""`form node`: run the node; `form node status`: ask a node how it and its fog are."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from formation.cli import output
from formation.cli.output import EXIT_OK
from formation.cli.parsing import CONFIG_HELP, DATA_DIR_HELP, leaf, port
from formation.cli.session import context
from formation.node.config import load_config, with_tcp_port
from formation.node.logs import configure_logging
from formation.node.setup import run_node


def cmd_node(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    names: dict[str, str] = {}
    for flag, dotted, value in (
        ("--data-dir", "node.data_dir", args.data_dir),
        ("--api-port", "api.port", args.api_port),
        ("--bootstrap", "p2p.bootstrap", args.bootstrap),
        ("--vms", "vm.enabled", args.vms),
        ("--mesh", "mesh.enabled", args.mesh),
        ("--invite", "fog.invite", getattr(args, "invite", None)),
        ("--treasury", "fog.treasury", getattr(args, "treasury", None)),
    ):
        if value is not None:
            overrides[dotted] = value
            names[dotted] = flag
    config = load_config(args.config, overrides, override_names=names)
    if config.fog.invite:  # a token that cannot be used fails here, before any key or state exists
        from formation.node.fog import InviteToken, check_usable

        check_usable(InviteToken.decode(config.fog.invite))
    if args.p2p_port is not None:
        listen = with_tcp_port(config.p2p.listen, args.p2p_port)
        config = dataclasses.replace(config, p2p=dataclasses.replace(config.p2p, listen=listen))

    configure_logging(json_lines=args.log_json or config.node.log_json)

    def ready(ident) -> None:
        if ident.created_key:
            output.note(f"created a new operator key in {config.keystore_path}; keep its password "
                        "safe, it cannot be recovered")
        if args.json:
            output.print_json(ident.as_json(), indent=None)
        else:
            output.fields([
                ("address", ident.address),
                ("data dir", ident.data_dir),
                ("ops", str(ident.ops)),
                ("heads", str(ident.heads)),
                ("state hash", ident.state_hash[:16]),
            ])
            if not args.once:
                output.note("running; Ctrl-C (SIGINT) or SIGTERM stops the node")

    run_node(config, once=args.once, on_ready=ready)
    return EXIT_OK


def control_call(args: argparse.Namespace, what: str, **request: Any) -> dict:
    """One request to the local node's control socket (only its operator can open it)."""
    from formation.node.control import ControlClient

    config = load_config(args.config, {"node.data_dir": args.data_dir} if args.data_dir else {})
    path = config.data_dir / "control.sock"
    try:
        client = ControlClient(path, timeout=30)
    except OSError as exc:
        raise output.CliError(f"cannot reach the node at {path} ({exc}); is `form node` running "
                              "with this data dir?", output.EXIT_UNREACHABLE) from None
    try:
        answer = client.call(**request)
    finally:
        client.close()
    if not answer.get("ok"):
        raise output.CliError(f"the node {what}: {answer.get('detail')}")
    return answer


def control_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--data-dir", metavar="DIR", help=DATA_DIR_HELP)


def cmd_leave(args: argparse.Namespace) -> int:
    answer = control_call(args, "did not leave", cmd="leave")
    output.note(f"this node left fog {answer['fog_id']}: its peers drop it, its replicas move "
                "to other members (it keeps running until they do); stop it with Ctrl-C")
    return EXIT_OK


def cmd_invite_create(args: argparse.Namespace) -> int:
    """An invite token from the local node (its control socket: only its operator may invite)."""
    answer = control_call(args, "made no invite", cmd="invite", expires=args.expires)
    if args.json:
        output.print_json({k: answer[k] for k in ("token", "fog_id", "serial", "expires")})
        return EXIT_OK
    print(answer["token"])
    output.note(f"invite {answer['serial']} into fog {answer['fog_id']}, valid until "
                f"{output.when(answer['expires'])}; on the new host run: form join TOKEN")
    return EXIT_OK


def _vms_line(vms: dict | None) -> str:
    if not vms:
        return "-"
    if not vms.get("enabled"):
        return f"off: {vms.get('reason') or 'disabled'}"
    return (f"on: {vms.get('accel')}, {vms.get('machine')}, bridge {vms.get('bridge')} "
            f"{vms.get('subnet')}, {vms.get('replicas')} replica(s)")


def cmd_node_status(args: argparse.Namespace) -> int:
    ctx = context(args)
    health = ctx.call("GET", "/v1/health", sign=False)
    nodes = ctx.call("GET", "/v1/node/list", query={"limit": 1000}, sign=False)
    if ctx.json:
        output.print_json({"node_url": ctx.node_url, "health": health, "nodes": nodes.get("nodes", [])})
        return EXIT_OK
    output.fields([("node", ctx.node_url), ("status", health.get("status")),
                   ("address", health.get("address")), ("peer id", health.get("peer_id")),
                   ("version", health.get("version")), ("ops", health.get("ops")),
                   ("peers", health.get("peers")), ("vms", _vms_line(health.get("vms"))),
                   *[("problem", p) for p in health.get("problems") or []]])
    output.blank()
    me = str(health.get("address", "")).lower()
    rows = sorted(nodes.get("nodes") or [], key=lambda n: (n.get("address") != me, n.get("address", "")))
    cap = lambda n, k: (n.get("capacity") or {}).get(k)  # noqa: E731
    output.table(rows, [
        ("", lambda n: "*" if n.get("address") == me else ""),
        ("ADDRESS", lambda n: n.get("address")), ("VERSION", lambda n: n.get("version") or "-"),
        ("VCPUS", lambda n: cap(n, "vcpus")),
        ("MEMORY", lambda n: f"{cap(n, 'memory_mb') // 1024} GiB" if cap(n, "memory_mb") else "-"),
        ("DISK", lambda n: f"{cap(n, 'disk_gb')} GB" if cap(n, "disk_gb") is not None else "-"),
        ("KVM", lambda n: cap(n, "kvm")), ("VMS", lambda n: cap(n, "vms")),
        ("SEEN", lambda n: output.ago(n.get("heartbeat"))),
        ("ADDRS", lambda n: len(n.get("multiaddrs") or [])),
    ], "no nodes known yet")
    return EXIT_OK


def register(commands, common: argparse.ArgumentParser) -> None:
    node = commands.add_parser(
        "node", help="start the node",
        description="Start the node: create (first run) or unlock the operator key in "
                    "DATA_DIR/operator.key, open the state in DATA_DIR/state.db, and print the "
                    "node's identity. The keystore password comes from FORMATION_PASSWORD, "
                    "[node] password_file, or a prompt.",
    )
    _node_flags(node)
    node.set_defaults(func=cmd_node)

    join = commands.add_parser(
        "join", help="join a fog in one command (or start a new one: --genesis), and run the node",
        description="Join a fog step by step, each step printed: check the invite (a token from "
                    "`form invite create` on a member), create or unlock the operator key, reach "
                    "the fog's peers and sync its state, check the invite is unused, write the "
                    "data dir and formation.toml (and with --systemd a unit), claim the invite, "
                    "and run the node (formnet comes up with it). A step that fails says why and "
                    "undoes what this run wrote; run again, it resumes. With --genesis, start a "
                    "new fog; with a MULTIADDR instead of a token, sync from that peer without "
                    "being a member.")
    join_flags(join)

    invite = commands.add_parser("invite", help="invite a new host into this node's fog")
    invite_commands = invite.add_subparsers(dest="invite_command", metavar="COMMAND")
    create = invite_commands.add_parser(
        "create", help="make a single-use invite token",
        description="Ask the local node (its control socket) for an invite: the next of its "
                    "admissions, claimable once, until it expires.")
    control_flags(create)
    create.add_argument("--expires", type=int, default=3600, metavar="SECONDS",
                        help="how long the invite can be claimed (default 3600)")
    create.add_argument("--json", action="store_true", help="print one JSON object")
    create.set_defaults(func=cmd_invite_create, parser=create)
    invite.set_defaults(func=None, parser=invite)

    # `form node` itself runs the node; its one command asks a (maybe remote) node's API
    leaf(node.add_subparsers(dest="node_command", metavar="COMMAND"), "status",
         "the node's health and the nodes of its fog", cmd_node_status, common,
         description="Ask the node (GET /health, /node/list) how it is and which nodes its fog has.")


def join_flags(join: argparse.ArgumentParser) -> None:
    """`form join`'s arguments (cli/join/); `form manage join` is the same command."""
    from formation.cli.join import join_flags as flags

    flags(join)


def cmd_formnet_status(args: argparse.Namespace) -> int:
    mesh = control_call(args, "did not answer", cmd="status")["mesh"]
    if args.json:
        output.print_json(mesh)
        return EXIT_OK
    if not mesh.get("enabled"):
        output.fields([("formnet", f"off: {mesh.get('reason') or 'not up yet'}")])
        return EXIT_OK
    output.fields([("formnet", "up"), ("interface", mesh.get("iface")),
                   ("overlay ip", mesh.get("overlay_ip")), ("peers", str(mesh.get("peers")))])
    return EXIT_OK


def _node_flags(node: argparse.ArgumentParser) -> None:
    node.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    node.add_argument("--data-dir", metavar="DIR", help=DATA_DIR_HELP)
    node.add_argument("--api-port", metavar="N", type=port,
                      help="HTTP API port (overrides [api] port)")
    node.add_argument("--vms", choices=("auto", "true", "false"),
                      help="run VMs: auto (if root and QEMU), true (required), false (overrides [vm] enabled)")
    node.add_argument("--mesh", choices=("auto", "true", "false"),
                      help="run formnet (WireGuard): auto (if root and wireguard-go), true, false "
                           "(overrides [mesh] enabled)")
    node.add_argument("--p2p-port", metavar="N", type=port,
                      help="libp2p TCP port (replaces the port in [p2p] listen)")
    node.add_argument("--bootstrap", metavar="MULTIADDR", nargs="+", action="extend",
                      help="peer(s) to join through, /ip4/HOST/tcp/PORT/p2p/PEER_ID; "
                           "repeatable; replaces [p2p] bootstrap")
    node.add_argument("--invite", metavar="TOKEN",
                      help="an invite to claim at the first start (overrides [fog] invite)")
    node.add_argument("--treasury", metavar="ADDRESS",
                      help="the treasury a new fog names at its genesis: the only key whose grants "
                           "add credits (overrides [fog] treasury; used at genesis only)")
    node.add_argument("--json", action="store_true",
                      help="print the identity as one JSON object instead of a table")
    node.add_argument("--once", action="store_true",
                      help="open the key and state, print the identity and exit (no network)")
    node.add_argument("--log-json", action="store_true",
                      help="log JSON lines on stderr (overrides [node] log_json)")
