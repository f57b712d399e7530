"""`form secrets set|list|unset`: an instance's secrets, sealed here to the nodes that host it.

The value never leaves this machine in clear: it is sealed (formation/sealed.py) to the public
key of each node the fog places the instance on now, and only those boxes and a commitment go
into the signed request. A node placed for it later gets a box re-sealed by a node that hosts
it. Setting or unsetting restarts the instance's replicas, which read the values at boot
(environment variables of the entrypoint, and files in /run/secrets/NAME).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from formation import sealed
from formation.cli import output
from formation.cli.output import EXIT_USAGE, CliError
from formation.cli.parsing import group, leaf, record_id
from formation.cli.session import Context, check_id, context

INSTANCE_BASE = "/v1/instance"
MAX_BOXES = 16  # as the instance record allows (crdt/kinds/user_kinds.py)


def _values(pairs: list[str]) -> dict[str, bytes]:
    """NAME=VALUE, NAME=@FILE (the file's bytes) or NAME=- (standard input), each name once."""
    out: dict[str, bytes] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise CliError(f"{pair!r}: give NAME=VALUE, NAME=@FILE or NAME=- (standard input)", EXIT_USAGE)
        try:
            sealed.check_name(name)
        except ValueError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        if name in out:
            raise CliError(f"secret {name} given twice", EXIT_USAGE)
        if value == "-":
            data = sys.stdin.buffer.read(sealed.MAX_VALUE + 1)
        elif value.startswith("@"):
            try:
                data = Path(value[1:]).read_bytes()
            except OSError as exc:
                raise CliError(f"secret {name}: cannot read {value[1:]}: {exc.strerror}", EXIT_USAGE) from None
        else:
            data = value.encode()
        if len(data) > sealed.MAX_VALUE:
            raise CliError(f"secret {name}: a value is at most {sealed.MAX_VALUE} bytes", EXIT_USAGE)
        out[name] = data
    return out


def _hosts(ctx: Context, iid: str) -> dict[str, bytes]:
    """The public keys of the nodes the instance is placed on now (what the values are sealed to)."""
    inst = ctx.call("GET", f"{INSTANCE_BASE}/{iid}/get")
    placement = inst.get("placement") or {}
    nodes = list(placement.get("nodes") or [])[:MAX_BOXES]
    if not nodes:
        why = placement.get("problem") or "no node is placed for it yet"
        raise CliError(f"instance {iid} is not placed on any node ({why}), so there is no node to seal "
                       f"its secrets to; run this again once `form manage get {iid}` shows its placement")
    keys = {}
    for addr in nodes:
        rec = ctx.call("GET", f"/v1/node/{addr}/get", sign=False)
        if not rec.get("public_key"):
            raise CliError(f"node {addr} (placed for instance {iid}) has published no public key yet "
                           "(a node older than secrets, or one that has not beaten since it started): "
                           "upgrade it or try again shortly")
        keys[addr] = bytes.fromhex(rec["public_key"])
    return keys


def cmd_secrets_set(args: argparse.Namespace) -> int:
    iid = check_id(args.id, "instance id")
    values = _values(args.pairs)
    ctx = context(args)
    keys = _hosts(ctx, iid)
    entries = {}
    for name, value in values.items():
        plain = sealed.Plain.new(value)
        entries[name] = {
            "commit": sealed.commitment(iid, name, plain),
            "boxes": {addr: sealed.seal(plain, pub, instance_id=iid, name=name, target=addr)
                      for addr, pub in keys.items()},
        }
    res = ctx.call("POST", f"{INSTANCE_BASE}/{iid}/secrets", {"set": entries})
    return output.report_write(ctx.json, res, f"secret{'s' * (len(values) > 1)} {', '.join(values)} of instance "
                               f"{iid} sealed to {len(keys)} node(s); its replicas restart to read them")


def cmd_secrets_unset(args: argparse.Namespace) -> int:
    iid = check_id(args.id, "instance id")
    ctx = context(args)
    res = ctx.call("POST", f"{INSTANCE_BASE}/{iid}/secrets", {"unset": list(dict.fromkeys(args.names))})
    return output.report_write(ctx.json, res, f"secret(s) {', '.join(args.names)} of instance {iid} "
                               "removed; its replicas restart without them")


def cmd_secrets_list(args: argparse.Namespace) -> int:
    iid = check_id(args.id, "instance id")
    ctx = context(args)
    inst = ctx.call("GET", f"{INSTANCE_BASE}/{iid}/get")
    rows = [{"name": n, "commit": s.get("commit"), "sealed_to": sorted(s.get("boxes") or {}),
             "updated_at": s.get("updated_at")} for n, s in sorted((inst.get("secrets") or {}).items())]
    return output.listing(ctx.json, {"instance_id": iid, "secrets": rows}, "secrets", [
        ("NAME", lambda r: r["name"]), ("COMMIT", lambda r: (r["commit"] or "")[:12]),
        ("SEALED TO", lambda r: ", ".join(output.short(a) for a in r["sealed_to"]) or "-"),
        ("UPDATED", lambda r: output.iso(r["updated_at"]) if r.get("updated_at") else "-"),
    ], f"instance {iid} has no secrets")


def register(commands, common: argparse.ArgumentParser) -> None:
    _, sec = group(commands, "secrets", "an instance's secrets, readable only by the nodes that host it",
                   "Secrets of an instance: sealed on this machine to the nodes that host it, given "
                   "to its VM as environment variables and files in /run/secrets.")
    p = leaf(sec, "set", "set secrets (NAME=VALUE, NAME=@FILE or NAME=- for standard input)",
             cmd_secrets_set, common)
    record_id(p)
    p.add_argument("pairs", metavar="NAME=VALUE", nargs="+")
    p = leaf(sec, "unset", "remove secrets", cmd_secrets_unset, common)
    record_id(p)
    p.add_argument("names", metavar="NAME", nargs="+")
    record_id(leaf(sec, "list", "the secrets' names, commitments and the nodes they are sealed to",
                   cmd_secrets_list, common))
