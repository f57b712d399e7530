"""Ingest throughput of the op log: verify + validate + persist, against signature recovery alone.

    python bench/ingest.py [--ops N] [--authors A] [--batch B] [--seed S] [--json]

Outside the timed part it makes N signed ops from A author keys: each author heartbeats its own
`node` record and now and then updates its `peer` record. An op's deps are its author's previous
op, the previous op on the same record (its `prev`) and, for about one op in five, the latest op
of another author, so the graph is A chains woven together rather than one chain (which is what
Store.write would make: it names all current heads) or A independent ones. Ops are made in
creation order, so the list is topologically ordered and every dep precedes the op naming it.

Timed:
  verify_only_per_s  for each wire: unpack the envelope, recover the author's address from the
                     signature (EIP-191 over SHA-256 of the body, as decode_op does);
  ops_per_s          a fresh on-disk Store (WAL, synchronous=FULL) ingesting the wires in
                     batches of B: decode + verify + validate + persist, one commit per batch.

The last line printed is one JSON object with the figures (with --json, the only line).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import printer  # noqa: E402
from formation.crdt.hlc import from_ms
from formation.crdt.keys import PrivateKey, eip191_hash, recover_digest, sha256
from formation.crdt.op import make_op
from formation.crdt.store import Store

BASE_MS = 1_750_000_000_000
PEER_EVERY = 10  # about one op in ten is a peer update
CROSS_DEP = 0.2  # chance that an op also names another author's latest op


def _addr(key: PrivateKey) -> str:
    return "0x" + key.address.hex()


def make_wires(n: int, n_authors: int, seed: int) -> tuple[list[bytes], set[bytes]]:
    """N signed ops in a valid topological order, and the set of author addresses."""
    rng = random.Random(seed)
    keys = [PrivateKey(rng.randbytes(32)) for _ in range(n_authors)]
    last_op: list[bytes | None] = [None] * n_authors  # each author's latest op
    last_on: dict[tuple[str, str], bytes] = {}  # latest op on each (kind, key)
    wires: list[bytes] = []
    for i in range(n):
        a = rng.randrange(n_authors)
        key = keys[a]
        addr = _addr(key)
        now = BASE_MS + i
        if rng.randrange(PEER_EVERY) == 0:
            kind = "peer"
            value = {
                "address": addr,
                "public_key": base64.b64encode(rng.randbytes(32)).decode(),
                "overlay_ip": f"10.42.{a}.{1 + rng.randrange(250)}",
                "endpoints": [f"192.0.2.{1 + a}:51820"],
                "updated_at": now,
            }
        else:
            kind = "node"
            value = {
                "address": addr,
                "capacity": {"vcpus": 2, "memory_mb": 2048, "disk_gb": 20},
                "heartbeat": now,
            }
        prev = [last_on[(kind, addr)]] if (kind, addr) in last_on else []
        deps = set(prev)
        if last_op[a] is not None:
            deps.add(last_op[a])
        if n_authors > 1 and rng.random() < CROSS_DEP:
            other = rng.randrange(n_authors - 1)
            other += other >= a
            if last_op[other] is not None:
                deps.add(last_op[other])
        # hlc strictly increases in creation order, so it exceeds every dep's hlc.
        op = make_op(key, kind, addr, deps=deps, prev=prev, hlc=from_ms(now), value=value)
        wires.append(op.wire)
        last_op[a] = op.id
        last_on[(kind, addr)] = op.id
    return wires, {k.address for k in keys}


def verify_only(wires: list[bytes]) -> tuple[float, set[bytes]]:
    """Seconds to unpack each envelope and recover its signer; and the signers seen."""
    unpackb = msgpack.unpackb
    signers: set[bytes] = set()
    add = signers.add
    t0 = time.perf_counter()
    for wire in wires:
        body, sig = unpackb(wire, raw=False)
        add(recover_digest(eip191_hash(sha256(body)), sig))
    return time.perf_counter() - t0, signers


def ingest_all(wires: list[bytes], batch: int, db_path: str) -> tuple[float, Store]:
    store = Store(db_path, synchronous="FULL")
    t0 = time.perf_counter()
    rejected = dropped = 0
    for i in range(0, len(wires), batch):
        res = store.ingest(wires[i:i + batch], source="peer")
        rejected += len(res.rejected)
        dropped += res.dropped
        if res.rejected:
            r = res.rejected[0]
            sys.exit(f"FAIL: batch at {i}: {len(res.rejected)} rejected, first {r.code}: {r.detail}")
    seconds = time.perf_counter() - t0
    if rejected or dropped:
        sys.exit(f"FAIL: {rejected} rejected, {dropped} dropped")
    return seconds, store


def _db_bytes(db_path: str) -> int:
    return sum(os.path.getsize(p) for p in (db_path, db_path + "-wal", db_path + "-shm")
               if os.path.exists(p))


def add_workload_args(ap: argparse.ArgumentParser) -> None:
    """The op workload's options (make_wires), shared with bench/join.py."""
    ap.add_argument("--ops", type=int, default=100_000)
    ap.add_argument("--authors", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(ap)
    ap.add_argument("--json", action="store_true", help="print only the JSON result line")
    args = ap.parse_args(argv)
    if args.ops < 1 or args.authors < 1 or args.batch < 1:
        ap.error("--ops, --authors and --batch must be positive")

    say = printer(args.json)

    say(f"making {args.ops} signed ops from {args.authors} authors ...")
    t0 = time.perf_counter()
    wires, authors = make_wires(args.ops, args.authors, args.seed)
    say(f"  made in {time.perf_counter() - t0:.1f} s "
        f"({sum(map(len, wires)) / len(wires):.0f} bytes per op on average)")

    say("timing signature recovery alone ...")
    v_seconds, signers = verify_only(wires)
    if signers != authors:
        sys.exit("FAIL: signature recovery gave addresses other than the authors'")
    verify_per_s = len(wires) / v_seconds

    say(f"timing ingest into an on-disk store, batches of {args.batch} ...")
    with tempfile.TemporaryDirectory(prefix="formation-bench-") as tmp:
        db_path = str(Path(tmp) / "ops.db")
        seconds, store = ingest_all(wires, args.batch, db_path)
        n_ops, pending = len(store), store.pending_count
        store.close()
        if n_ops != args.ops or pending != 0:
            sys.exit(f"FAIL: store holds {n_ops} ops (expected {args.ops}), {pending} pending")
        # Reopen: the log must load back to the same number of ops.
        again = Store(db_path)
        if len(again) != args.ops:
            sys.exit(f"FAIL: reopened store holds {len(again)} ops, expected {args.ops}")
        again.close()
        db_bytes = _db_bytes(db_path)
    ops_per_s = args.ops / seconds

    result = {
        "ops": args.ops,
        "authors": args.authors,
        "batch": args.batch,
        "ops_per_s": round(ops_per_s, 1),
        "verify_only_per_s": round(verify_per_s, 1),
        "ratio": round(ops_per_s / verify_per_s, 4),
        "seconds": round(seconds, 3),
        "db_bytes": db_bytes,
    }
    header = ("ops", "authors", "batch", "seconds", "ops/s", "verify-only/s", "ratio")
    row = (str(args.ops), str(args.authors), str(args.batch), f"{seconds:.2f}", f"{ops_per_s:,.0f}",
           f"{verify_per_s:,.0f}", f"{result['ratio']:.3f}")
    widths = [max(len(h), len(c)) for h, c in zip(header, row, strict=True)]
    say("")
    say("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    say("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    say(f"db size: {db_bytes:,} bytes ({db_bytes / args.ops:.0f} per op)")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
