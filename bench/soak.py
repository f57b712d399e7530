"""The soak for minutes: a fog under honest load, a hostile peer and a hostile tenant at once.

    python bench/soak.py [--seconds 300] [--nodes 3] [--clients 20] [--big-upload-mb 0] [--json]

Runs tests/soak.py's driver (docs/soak.md): a DevFog of N `form node` processes on 127.0.0.1,
C signed clients writing models and DNS records (one write a second each), a hostile libp2p peer
in waves (sybil ops, ops with forged deps, sync pushes, then junk until it is banned; a fresh
identity each wave), a tenant uploading archive bombs to a build node, and a sampler (GET /health
and VmRSS of each node every 0.5 s). Then it waits for the fog and reads every acknowledged write
back from every node.

  writes_acked / missing   acknowledged writes; (record, node) pairs without the acked value
  rss_*_mb                 VmRSS per node: before the load, peak, after (max over nodes at top level)
  health_p50_ms / p99 / max  GET /health latency over all nodes during the load
  bans                     attacker identities banned, counted per node (of waves x nodes)
  archives_refused         hostile uploads refused 4xx by the build node (archives_accepted: 2xx)
  machine_cores            CPU busy on the whole machine during the run (/proc/stat)

Prints a table, then (last, or alone with --json) one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402

from bench.common import printer, workdir  # noqa: E402
from bench.gossip import machine_busy  # noqa: E402
from tests.soak import SoakConfig, run_soak, table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300.0, help="of load")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--write-interval", type=float, default=1.0, help="seconds between a client's writes")
    ap.add_argument("--no-attack", action="store_true", help="no hostile peer")
    ap.add_argument("--no-tenant", action="store_true", help="no hostile uploads")
    ap.add_argument("--big-upload-mb", type=int, default=0,
                    help="also upload a random context this big to a fog node every 20 s")
    ap.add_argument("--dir", help="work here and keep it (logs, samples.jsonl); default: a temporary one")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args()
    say = printer(args.json)

    cfg = SoakConfig(seconds=args.seconds, nodes=args.nodes, clients=args.clients,
                     write_interval=args.write_interval, attack=not args.no_attack,
                     tenant=not args.no_tenant, big_upload_mb=args.big_upload_mb)
    base, tmp = workdir(args.dir, "soak-")
    t0, busy0 = time.monotonic(), machine_busy()
    try:
        r = trio.run(run_soak, cfg, base, say)
    finally:
        if tmp is not None:
            tmp.cleanup()
    wall = time.monotonic() - t0
    busy1 = machine_busy()
    say("")
    say(table(r))
    say(f"\n{wall:.0f} s in all")

    def mb(v):
        return None if v is None else round(v / 1024, 1)

    peaks = [v["peak"] for v in r.rss_kb.values() if v["peak"]]
    out = {
        "bench": "soak", "seconds": args.seconds, "nodes": args.nodes, "clients": args.clients,
        "writes_acked": r.writes_acked, "writes_refused": r.writes_refused, "writes_failed": r.writes_failed,
        "records": r.records, "missing": r.missing, "converge_s": r.converge_seconds,
        "rss_before_mb": max((mb(v["before"]) or 0) for v in r.rss_kb.values()),
        "rss_peak_mb": mb(max(peaks)) if peaks else None,
        "rss_after_mb": max((mb(v["after"]) or 0) for v in r.rss_kb.values()),
        "rss_mb": {k: {kk: mb(vv) for kk, vv in v.items()} for k, v in r.rss_kb.items()},
        "health_p50_ms": r.health["p50_ms"], "health_p99_ms": r.health["p99_ms"],
        "health_max_ms": r.health["max_ms"], "health_failed": r.health["failed"],
        "health_per_node": r.health_per_node,
        "bans": r.attacker.get("bans"), "attacker": {k: v for k, v in r.attacker.items() if k != "banned_by"},
        "archives": len(r.archives), "archives_refused": r.archives_refused,
        "archives_accepted": r.archives_accepted, "build_node": r.build_node,
        "pending_after": r.pending_after, "ops_after": r.ops_after, "honest_bans": len(r.honest_bans),
        "nodes_running": r.nodes_running, "wall_s": round(wall, 1),
        "machine_cores": round((busy1[0] - busy0[0]) / max(1e-9, wall), 2),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
