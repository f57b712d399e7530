"""`form pack`: validate a Formfile here; build it on a node, follow builds (status, logs) and ship
a build as an instance (build.py does the building)."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

from formation.argtypes import int_in
from formation.cli import build, output
from formation.cli.build import BUILD_DONE, PACK_BASE, Source, build_failure, build_fields
from formation.cli.instance import INSTANCE_BASE
from formation.cli.output import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CliError, Column
from formation.cli.parsing import group, leaf
from formation.cli.session import Context, check_id, context
from formation.crdt.keys import format_address
from formation.crdt.kinds.user_kinds import MODEL_REF
from formation.dns.names import instance_names
from formation.pack.formfile import FormfileError, parse

SHIP_POLL_SECONDS = 1.0  # between two looks at a new instance's replicas
FORMFILE_RECORD_LIMIT = 32 * 1024  # the instance record keeps the Formfile up to this many characters

BUILD_COLUMNS: list[Column] = [
    ("BUILD", lambda s: (s.get("build_id") or "-")[:16]), ("NAME", lambda s: s.get("name")),
    ("STATE", lambda s: s.get("state")),
    ("STEP", lambda s: f"{s.get('step')}/{s.get('steps')}" if s.get("steps") else "-"),
    ("SUBMITTED", lambda s: output.iso(s["submitted_at"]) if s.get("submitted_at") else "-"),
    ("ERROR", lambda s: ((s.get("error") or {}).get("message") or "-").splitlines()[0][:60]),
]


def cmd_pack_validate(args: argparse.Namespace) -> int:
    path = Path(args.formfile)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}", EXIT_USAGE) from None
    try:
        ff = parse(text, source=str(path))
    except FormfileError as exc:
        if args.json:
            output.print_json({"ok": False, "errors": [{"line": ln, "error": m} for ln, m in exc.errors]},
                              indent=None)
        else:
            output.log_lines(str(exc).splitlines())
        return EXIT_FAILURE
    if args.json:
        output.print_json({"ok": True, "name": ff.name, "canonical": ff.canonical()}, indent=None)
    elif args.canonical:
        output.write_text(ff.canonical())
    else:
        output.fields([("formfile", str(path)), ("name", ff.name),
                       ("resources", f"{ff.vcpu} vCPU, {ff.memory_mb} MB, {ff.disk_gb} GB disk"),
                       ("build steps", str(len(ff.steps))), ("users", str(len(ff.users))),
                       ("expose", ", ".join(map(str, ff.expose)) or "-"),
                       ("entrypoint", " ".join(ff.entrypoint) or "-")])
    return EXIT_OK


def cmd_pack_build(args: argparse.Namespace) -> int:
    src = Source(args)
    ctx = context(args)
    st = build.submit_build(ctx, src, quiet=args.quiet, vm_wait=args.vm_wait)
    if args.wait and st.get("state") not in BUILD_DONE:
        st = build.follow_build(ctx, st, src, quiet=args.quiet)
    if ctx.json:
        output.print_json(st)
    elif st.get("state") != "failed":
        output.fields(build_fields(st))
    if st.get("state") == "failed":
        raise build_failure(st, src, tail_shown=args.wait and not args.quiet)
    if not args.wait and not ctx.json:
        output.note(f"follow it with `form pack logs {st.get('build_id')} --follow`")
    return EXIT_OK


def cmd_pack_status(args: argparse.Namespace) -> int:
    ctx = context(args)
    if args.build_id_flag:
        if args.build_id and args.build_id != args.build_id_flag:
            raise CliError("give the build id once (BUILD_ID or --build-id)", EXIT_USAGE)
        args.build_id = args.build_id_flag
    if args.build_id is None:
        res = ctx.call("GET", f"{PACK_BASE}/builds")
        return output.listing(ctx.json, res, "builds", BUILD_COLUMNS, "no builds of yours on this node")
    bid = check_id(args.build_id, "build id")
    st = ctx.call("GET", f"{PACK_BASE}/builds/{bid}")
    if ctx.json:
        output.print_json(st)
    else:
        output.fields(build_fields(st))
        tail = (st.get("error") or {}).get("output_tail") or []
        if tail:
            output.blank()
            output.write_text("\n".join(f"  | {line}" for line in tail))
    return EXIT_OK


def cmd_pack_logs(args: argparse.Namespace) -> int:
    bid = check_id(args.build_id, "build id")
    ctx = context(args)
    offset, parts, state = 0, [], ""
    while True:
        text, offset, state = build.log_chunk(ctx, bid, offset)
        if ctx.json:
            parts.append(text)
        elif text:
            output.write_text(text)
        if not text:
            if not args.follow or state in BUILD_DONE:
                break
            time.sleep(build.POLL_SECONDS)
    if ctx.json:
        output.print_json({"build_id": bid, "log": "".join(parts), "offset": offset, "state": state})
    return EXIT_OK


def _wait_running(ctx: Context, iid: str, timeout: float, *, quiet: bool) -> tuple[dict, str | None]:
    """Poll the instance until a replica runs: (instance, None), or (instance, why it failed)."""
    seen: dict[str, tuple] = {}
    deadline = time.monotonic() + timeout
    with output.progress(f"waiting for a replica of {iid} to run", enabled=not quiet):
        while True:
            inst = ctx.call("GET", f"{INSTANCE_BASE}/{iid}/get")
            statuses = inst.get("replicas_status") or []
            for s in statuses:
                now = (s.get("state"), s.get("reason"), s.get("ip"))
                if seen.get(s.get("node")) != now:
                    seen[s.get("node")] = now
                    if not quiet:
                        reason = f": {s['reason']}" if s.get("reason") else ""
                        ip = f" at {s['ip']}" if s.get("ip") and s.get("state") == "running" else ""
                        output.note(f"replica on {output.short(s.get('node'))}: {s.get('state')}{ip}{reason}")
            if any(s.get("state") == "running" for s in statuses):
                return inst, None
            failed = [s for s in statuses if s.get("state") == "failed"]
            if failed:
                s = failed[0]
                return inst, (f"the replica of instance {iid} on {s.get('node')} failed: "
                              f"{s.get('reason') or 'no reason given'}; its console: `form manage logs {iid}` "
                              f"(on that node: --node its API URL); fix the cause, then `form manage "
                              f"restart {iid}`")
            if time.monotonic() > deadline:
                states = ", ".join(f"{output.short(s.get('node'))} {s.get('state')}" for s in statuses) or "no replica reported"
                return inst, (f"no replica of instance {iid} runs after {timeout:g} s ({states}); it stays "
                              f"deployed: follow it with `form manage get {iid}`")
            time.sleep(SHIP_POLL_SECONDS)


def _check_required_model(ctx: Context, model_id: str, src: Source) -> None:
    """A Formfile's `MODEL required:<id>` names a model the node knows (it refuses the instance
    otherwise: node/api/records.py); said here, before anything is built."""
    if check_model_id(model_id):
        try:
            ctx.call("GET", f"/v1/models/{model_id}")
            return
        except CliError as exc:
            if not re.search(r"\(HTTP 40[34] ", exc.message):
                raise
    raise CliError(f"{src.path}: MODEL required:{model_id} names no model the node at {ctx.node_url} "
                   "knows; publish it first (`form model register`), or pick one from `form model list`, "
                   f"or make it `MODEL preferred:{model_id}`; nothing was built", EXIT_USAGE)


def check_model_id(model_id: str) -> bool:
    try:
        MODEL_REF(model_id)
    except ValueError:
        return False
    return True


def cmd_pack_ship(args: argparse.Namespace) -> int:
    src = Source(args)
    ff = src.formfile
    name = args.name or ff.name
    if len(src.text) > FORMFILE_RECORD_LIMIT:
        raise CliError(f"{src.path} is {len(src.text)} characters; an instance keeps at most "
                       f"{FORMFILE_RECORD_LIMIT}", EXIT_USAGE)
    ctx = context(args)
    sent = src.text_to_send(ctx)  # USER passwords hashed: the record keeps this text
    if len(sent) > FORMFILE_RECORD_LIMIT:
        raise CliError(f"{src.path} is {len(sent)} characters with its USER passwords hashed; an instance "
                       f"keeps at most {FORMFILE_RECORD_LIMIT}", EXIT_USAGE)
    if ff.model and ff.model[0] == "required":
        _check_required_model(ctx, ff.model[1], src)  # before a build that could not be deployed
    built = None
    if args.build_id:
        bid = check_id(args.build_id, "build id")
    else:
        built = build.submit_build(ctx, src, quiet=args.quiet, vm_wait=args.vm_wait)
        if built.get("state") not in BUILD_DONE:
            built = build.follow_build(ctx, built, src, quiet=args.quiet)
        if built.get("state") == "failed":
            if ctx.json:
                output.print_json({"build_id": built.get("build_id"), "build": built, "instance_id": None})
            raise build_failure(built, src, tail_shown=not args.quiet)
        bid = built["build_id"]
        if not args.quiet:
            output.note(f"built {bid}")
    resources: dict[str, Any] = {"vcpus": ff.vcpu, "memory_mb": ff.memory_mb, "disk_gb": ff.disk_gb}
    if ff.gpus:
        model, count = ff.gpus[0]
        resources["gpu"] = {"count": count, "model": model}
    res = ctx.call("POST", f"{INSTANCE_BASE}/create", {
        "name": name, "build_id": bid, "formfile": sent, "replicas": args.replicas,
        "resources": resources})
    iid = res.get("id")
    # the fog's DNS (docs/dns.md) answers these on every node once a replica runs
    names = instance_names({"instance_id": iid, "name": name, "owner": format_address(ctx.key().address)})
    doc: dict[str, Any] = {"instance_id": iid, "build_id": bid, "op_id": res.get("op_id"),
                           "names": names, "build": built, "instance": None}
    if not ctx.json:
        output.result(iid)
        if not args.quiet and names:
            output.note(f"its names (every node's DNS): {', '.join(names)}")
    if not args.wait:
        if ctx.json:
            output.print_json(doc)
        elif not args.quiet:
            output.note(f"instance {iid} created; follow it with `form manage get {iid}`")
        return EXIT_OK
    if not args.quiet:
        output.note(f"instance {iid} created; waiting for a replica to run (Ctrl-C stops the "
                    "waiting, not the instance)")
    inst, failure = _wait_running(ctx, iid, args.timeout, quiet=args.quiet)
    doc["instance"] = inst
    if ctx.json:
        output.print_json(doc)
    if failure:
        raise CliError(failure, EXIT_FAILURE)
    if not args.quiet and not ctx.json:
        ips = [s.get("ip") for s in inst.get("replicas_status") or [] if s.get("state") == "running" and s.get("ip")]
        output.note(f"instance {iid} is running" + (f" at {', '.join(ips)}" if ips else "")
                    + f"; its console: form manage logs {iid}")
    return EXIT_OK


def register(commands, common: argparse.ArgumentParser) -> None:
    _, pack = group(commands, "pack", "Formfiles, image builds and deploying them",
                    "Check Formfiles, build images on a node, follow builds and ship them as "
                    "instances.")
    p = leaf(pack, "validate", "parse and check a Formfile; exit 1 with every error and its line",
             cmd_pack_validate, None,
             description="Parse and check a Formfile without building it. Every error is printed "
                         "as FILE:LINE: message; exit status 1 if there is any.")
    p.add_argument("formfile", nargs="?", default="Formfile", help="default: ./Formfile")
    p.add_argument("--canonical", action="store_true", help="print the canonical form")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    def source(p: argparse.ArgumentParser, wait_help: str) -> None:
        p.add_argument("dir", metavar="DIR", nargs="?", default=".",
                       help="the build context: the folder COPY reads from, sent packed (default .)")
        p.add_argument("--formfile", metavar="PATH", help="the Formfile (default DIR/Formfile)")
        p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True, help=wait_help)
        p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
        p.add_argument("--vm-wait", metavar="SECONDS", type=int_in(0, 86400, "a number of seconds"),
                       default=build.VM_WAIT_SECONDS,
                       help="right after the node starts, its VMs are not up yet: how long to wait "
                            f"for them before giving up (default {build.VM_WAIT_SECONDS})")

    p = leaf(pack, "build", "build an image from a Formfile on the node", cmd_pack_build, common,
             description="Check DIR/Formfile, pack DIR (the build context, at most "
                         f"{build.CONTEXT_LIMIT // (1024 * 1024)} MiB) and build an image on the "
                         "node (POST /pack/build). By default follows the build: its steps and log "
                         "on stderr, then the build id and state. Exit 1 if the build fails, with "
                         "the Formfile line and the step's last output.")
    source(p, "follow the build to its end (default; --no-wait returns once it is queued)")
    p = leaf(pack, "status", "your builds on the node, or one build", cmd_pack_status, common)
    p.add_argument("build_id", metavar="BUILD_ID", nargs="?", help="one build (default: a table of all)")
    p.add_argument("--build-id", dest="build_id_flag", metavar="ID", help="the same, as the original's flag")
    p = leaf(pack, "logs", "a build's log", cmd_pack_logs, common)
    p.add_argument("build_id", metavar="BUILD_ID")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the build ends")
    p = leaf(pack, "ship", "build (unless --build-id) and deploy an instance of it", cmd_pack_ship,
             common,
             description="Build DIR as `form pack build` does (or take --build-id), then create an "
                         "instance of it with the Formfile's name and resources (POST "
                         "/instance/create) and print its id. By default waits until a replica "
                         "runs, printing each replica's state changes; exit 1 if one fails.")
    source(p, "wait for the build and then for a running replica (default; --no-wait returns "
              "once the instance is created)")
    p.add_argument("--replicas", metavar="N", type=int_in(1, 64, "a number of replicas"), default=1,
                   help="how many nodes run it (default 1)")
    p.add_argument("--name", metavar="NAME", help="the instance's name (default: the Formfile's NAME)")
    p.add_argument("--build-id", metavar="ID", help="deploy this build instead of building DIR")
    p.add_argument("--timeout", metavar="SECONDS", type=int_in(1, None, "a number of seconds"), default=1800,
                   help="how long --wait waits for a running replica (default 1800)")
