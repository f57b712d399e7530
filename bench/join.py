"""A new node joining a node that holds N ops: how fast it catches up, against local ingest.

    python bench/join.py [--ops 100000] [--authors 8] [--batch 1000] [--json]

Outside the timed part it makes N signed ops with bench/ingest.py's generator (`node` heartbeats
and `peer` updates of A synthetic author keys, a woven graph).

  ingest_ops_per_s  the wires ingested in batches of B into a fresh on-disk Store in this
                    process (as bench/ingest.py does); that store is node A's state.db
  rss_idle_mb       VmRSS of a `form node` with an empty store, 3 s after it is up
  seconds           node A (one `form node` process) serves the log; a fresh node B is started
                    bootstrapped to A, and timed from its launch until its status reports at
                    least N ops and the same state_hash as A (status polled every 0.2 s)
  ops_per_s         N / seconds;  ratio = ops_per_s / ingest_ops_per_s
  rss_100k_mb       VmRSS of node A holding the N ops, after B joined
  machine_cores     CPU busy on the whole machine during the join (/proc/stat; 2 = both cores of
                    a 2-vCPU machine): A, B, this process, and anything else running

The last line printed is one JSON object with the figures (with --json, the only line).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import printer, workdir  # noqa: E402
from bench.gossip import machine_busy  # noqa: E402
from bench.ingest import add_workload_args, ingest_all, make_wires  # noqa: E402
from formation.devfog import DevFog, DevFogError  # noqa: E402


def _mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


def idle_rss(base: Path, say) -> float | None:
    """RSS of a node with an empty store, alone, 3 s after its control socket answered."""
    with DevFog(1, base) as fog:
        fog.wait_ready(120)
        time.sleep(3)
        rss = _mb(fog.rss_kb(0))
    say(f"  idle node: {rss} MB")
    return rss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(ap)
    ap.add_argument("--timeout", type=float, default=1800.0,
                    help="give up if B has not caught up after this many seconds")
    ap.add_argument("--base-dir", help="keep the nodes' data and logs here (default: temporary)")
    ap.add_argument("--json", action="store_true", help="print only the JSON result line")
    args = ap.parse_args(argv)
    if args.ops < 1 or args.authors < 1 or args.batch < 1:
        ap.error("--ops, --authors and --batch must be positive")

    say = printer(args.json)
    base, tmp = workdir(args.base_dir, "formation-join-")
    try:
        say(f"making {args.ops} signed ops from {args.authors} authors ...")
        t0 = time.perf_counter()
        wires, _ = make_wires(args.ops, args.authors, args.seed)
        say(f"  made in {time.perf_counter() - t0:.1f} s")

        say("measuring an idle node ...")
        rss_idle = idle_rss(base / "idle", say)

        say(f"ingesting into node A's state.db, batches of {args.batch} ...")
        fog_dir = base / "fog"
        a_dir = fog_dir / "node-0"
        a_dir.mkdir(parents=True, mode=0o700)
        ingest_s, store = ingest_all(wires, args.batch, str(a_dir / "state.db"))
        n_ops = len(store)
        store.close()
        ingest_rate = args.ops / ingest_s
        say(f"  {n_ops} ops in {ingest_s:.1f} s ({ingest_rate:,.0f} ops/s)")
        del wires

        say("starting node A ...")
        t0 = time.monotonic()
        with DevFog(1, fog_dir, start_timeout=600) as fog:
            fog.wait_ready(300)
            a_up = time.monotonic() - t0
            a = fog.status(0)
            say(f"  A up in {a_up:.1f} s (control socket answered; holds {a['ops']} ops)")

            say("starting node B bootstrapped to A ...")
            busy0 = machine_busy()[0]
            t0 = time.monotonic()
            j = fog.add_node()
            b_ready = None
            deadline = t0 + args.timeout
            last = ""
            while True:
                now = time.monotonic()
                if now > deadline:
                    raise DevFogError(f"B did not catch up within {args.timeout:g} s ({last})"
                                      + fog.log_tail(j))
                if not fog.nodes[j].running:
                    raise DevFogError("B exited" + fog.log_tail(j))
                try:
                    b = fog.status(j, timeout=30)
                except (OSError, ValueError, DevFogError):
                    time.sleep(0.2)
                    continue
                if b_ready is None:
                    b_ready = now - t0
                a = fog.status(0, timeout=30)
                last = f"B has {b['ops']} ops, {b['pending']} pending"
                if b["ops"] >= args.ops and b["state_hash"] == a["state_hash"]:
                    seconds = time.monotonic() - t0
                    machine = (machine_busy()[0] - busy0) / seconds
                    break
                time.sleep(0.2)
            rss_a = _mb(fog.rss_kb(0))
            rss_b = _mb(fog.rss_kb(j))
            # A session is counted once it has closed; give it a moment to.
            end = time.monotonic() + 10
            while True:
                p2p_b = fog.status(j)["p2p"]
                if p2p_b["syncs_ok"] + p2p_b["syncs_failed"] > 0 or time.monotonic() > end:
                    break
                time.sleep(0.5)
    finally:
        if tmp is not None:
            tmp.cleanup()

    ops_per_s = args.ops / seconds
    result = {
        "ops": args.ops,
        "seconds": round(seconds, 2),
        "ops_per_s": round(ops_per_s, 1),
        "ingest_ops_per_s": round(ingest_rate, 1),
        "ratio": round(ops_per_s / ingest_rate, 3),
        "rss_idle_mb": rss_idle,
        "rss_100k_mb": rss_a,
        "rss_joined_mb": rss_b,
        "b_ready_s": round(b_ready, 2) if b_ready is not None else None,
        "a_start_s": round(a_up, 2),
        "b_syncs_ok": p2p_b.get("syncs_ok"),
        "b_ops_from_sync": p2p_b.get("ops_from_sync"),
        "machine_cores": round(machine, 2),  # whole machine busy during the join (others too)
    }
    header = ("ops", "seconds", "ops/s", "ingest ops/s", "ratio", "rss idle MB", "rss A MB",
              "rss B MB")
    row = (str(args.ops), f"{seconds:.1f}", f"{ops_per_s:,.0f}", f"{ingest_rate:,.0f}",
           f"{result['ratio']:.3f}", str(rss_idle), str(rss_a), str(rss_b))
    widths = [max(len(h), len(c)) for h, c in zip(header, row, strict=True)]
    say("")
    say("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    say("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    say(f"B answered its control socket {result['b_ready_s']} s after launch; A took "
        f"{a_up:.1f} s to open its {args.ops}-op store and come up")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
