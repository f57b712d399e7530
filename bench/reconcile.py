"""Round trips of anti-entropy between two replicas that diverged by n ops each.

    python bench/reconcile.py [--cases C] [--sizes 0,1,100,10000] [--json]

Each case: a shared history, one reconciliation (so both sides hold watermarks, the steady
state), then each side writes n ops from its own authors (sometimes also receiving some of
the other side's ops through a third party), then a second reconciliation using the
watermarks. Prints a table and, last, one JSON line with the share of one-round-trip cases.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from formation.crdt.keys import PrivateKey, format_address  # noqa: E402
from formation.crdt.reconcile import reconcile_in_memory  # noqa: E402
from formation.crdt.store import Store  # noqa: E402

KEYS = [PrivateKey(bytes([i + 1]) * 32) for i in range(6)]


class Writer:
    def __init__(self):
        self.now = 1_000_000

    def beat(self, store: Store, key: PrivateKey) -> None:
        self.now += 1
        addr = format_address(key.address)
        store.write(key, "node", addr, {"address": addr, "heartbeat": self.now}, now_ms=self.now)


def diverge(n: int, rnd: random.Random, writer: Writer | None = None) -> tuple[Store, Store, int, int]:
    """Two stores that agree up to a reconciliation, then each gained n ops. Returns watermarks."""
    writer = writer or Writer()
    a, b = Store(), Store()
    for _ in range(rnd.randint(1, 20)):
        writer.beat(a, rnd.choice(KEYS))
    ra, rb, _ = reconcile_in_memory(a, b)
    wa, wb = ra.new_watermark, rb.new_watermark
    side_keys = (KEYS[0:2], KEYS[2:4])
    for _ in range(n):
        for store, keys, other in ((a, side_keys[0], b), (b, side_keys[1], a)):
            writer.beat(store, rnd.choice(keys))
            if rnd.random() < 0.05:  # a third party hands some of our ops to the other side too
                head = store.ops[max(store.heads(), key=lambda h: store.ops[h].seq)]
                if all(other.has(d) for d in head.deps):
                    other.ingest(store.wires([head.id]))
    return a, b, wa, wb


def run_case(n: int, rnd: random.Random) -> tuple[int, float, bool]:
    a, b, wa, wb = diverge(n, rnd)
    t0 = time.perf_counter()
    ra, rb, trips = reconcile_in_memory(a, b, wa=wa, wb=wb)
    took = time.perf_counter() - t0
    ok = a.state_hash() == b.state_hash() and ra.new_watermark is not None and rb.new_watermark is not None
    return trips, took, ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--sizes", default="0,1,100,10000")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rnd = random.Random(args.seed)
    rows, total, one, all_ok = [], 0, 0, True
    for n in (int(x) for x in args.sizes.split(",")):
        cases = max(1, args.cases if n <= 100 else args.cases // 100)
        trips_hist: dict[int, int] = {}
        secs = 0.0
        for _ in range(cases):
            trips, took, ok = run_case(n, rnd)
            all_ok &= ok
            trips_hist[trips] = trips_hist.get(trips, 0) + 1
            secs += took
        total += cases
        one += trips_hist.get(1, 0)
        rows.append({"n": n, "cases": cases, "round_trips": trips_hist,
                     "one_rt_share": trips_hist.get(1, 0) / cases, "mean_s": secs / cases})
    result = {"cases": total, "one_round_trip_share": one / total, "converged": all_ok, "sizes": rows}
    if not args.json:
        print(f"{'n':>7} {'cases':>6} {'1 RT':>7} {'round trips':<24} {'mean s':>8}")
        for r in rows:
            hist = ", ".join(f"{k}: {v}" for k, v in sorted(r["round_trips"].items()))
            print(f"{r['n']:>7} {r['cases']:>6} {r['one_rt_share']:>7.1%} {hist:<24} {r['mean_s']:>8.3f}")
    print(json.dumps(result))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
