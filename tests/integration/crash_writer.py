"""Child process of test_crash.py: append ops to an op log until it holds TARGET ops.

    python crash_writer.py DB_PATH [--target N] [--seed S] [--pause-ms P]

Opens (or re-opens) the Store at DB_PATH and keeps appending ops from a few fixed node keys:
`node` heartbeats, `peer` updates and deletes, `instance_status` reports. Each round is either
one Store.write or one Store.ingest of a batch of 1..200 ops signed here beforehand (sometimes
shuffled, so part of the batch waits in the pending buffer until its deps arrive in the same
call; sometimes forking a record so it has concurrent heads; sometimes with a duplicate).

After every durable return it prints the ids of the ops just acknowledged, hex, one per line,
and flushes. Anything else goes to stderr. Exit status 0 once the log holds TARGET ops; 1 if the
store refuses or holds back an op it should have accepted.
"""

from __future__ import annotations

import argparse
import base64
import random
import sys
import time

from formation.crdt.keys import PrivateKey, sha256
from formation.crdt.op import MAX_DEPS, make_op
from formation.crdt.store import Store

N_KEYS = 4
STATES = ("pending", "building", "booting", "running", "stopped", "failed")


def node_keys() -> list[PrivateKey]:
    # Fixed keys: a restarted writer must keep writing the same records.
    return [PrivateKey(sha256(b"formation crash writer key %d" % i)) for i in range(N_KEYS)]


def die(msg: str) -> None:
    print(f"crash_writer: FAIL: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def ack(ids) -> None:
    sys.stdout.write("".join(i.hex() + "\n" for i in ids))
    sys.stdout.flush()


class Writer:
    def __init__(self, store: Store, rng: random.Random):
        self.store = store
        self.rng = rng
        self.keys = node_keys()

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def pick(self) -> tuple[PrivateKey, str, str, dict | None]:
        """A random (signer, kind, key, value) that the rules accept."""
        rng = self.rng
        signer = rng.choice(self.keys)
        addr = "0x" + signer.address.hex()
        now = self.now_ms()
        r = rng.random()
        if r < 0.6:
            return signer, "node", addr, {
                "address": addr,
                "capacity": {"vcpus": 2, "memory_mb": 2048, "disk_gb": 20},
                "heartbeat": now,
            }
        if r < 0.8:
            if rng.random() < 0.1:
                return signer, "peer", addr, None  # tombstone
            return signer, "peer", addr, {
                "address": addr,
                "public_key": base64.b64encode(rng.randbytes(32)).decode(),
                "overlay_ip": f"10.42.0.{1 + rng.randrange(250)}",
                "endpoints": [f"192.0.2.{1 + rng.randrange(250)}:51820"],
                "updated_at": now,
            }
        inst = f"inst{rng.randrange(5)}"
        return signer, "instance_status", f"{inst}@{addr}", {
            "instance_id": inst,
            "node": addr,
            "state": rng.choice(STATES),
            "generation": rng.randrange(1000),
            "updated_at": now,
        }

    def write_one(self) -> None:
        signer, kind, key, value = self.pick()
        op = self.store.write(signer, kind, key, value, now_ms=self.now_ms())
        ack([op.id])

    def write_batch(self, size: int) -> None:
        """Sign `size` ops against the current state, then ingest them in one call."""
        rng, store = self.rng, self.store
        graph_heads = set(store.heads())
        reg_heads: dict[tuple[str, str], set[bytes]] = {}
        made: dict[bytes, tuple[int, tuple[bytes, ...]]] = {}  # id -> (hlc, prev), this batch

        def hlc_of(i: bytes) -> int:
            return made[i][0] if i in made else store.ops[i].hlc

        def prev_of(i: bytes) -> tuple[bytes, ...]:
            return made[i][1] if i in made else store.ops[i].prev

        wires = []
        for _ in range(size):
            signer, kind, key, value = self.pick()
            rk = (kind, key)
            if rk not in reg_heads:
                reg = store.registers.get(rk)
                reg_heads[rk] = set(reg.heads) if reg else set()
            cur = reg_heads[rk]
            if cur and rng.random() < 0.05:
                # Fork: supersede what one current head superseded, so the new op is that
                # head's sibling and the record has concurrent values.
                prev = set(prev_of(rng.choice(sorted(cur))))
            else:
                prev = set(cur)
            room = MAX_DEPS - len(prev)
            heads = sorted(graph_heads, key=hlc_of, reverse=True)
            if rng.random() < 0.2 and len(heads) > 1:
                heads = rng.sample(heads, rng.randrange(1, len(heads)))
            deps = prev | set(heads[:room])
            after = max((hlc_of(d) for d in deps), default=0)
            hlc = store.replica.hlc.next(self.now_ms(), after=after)
            op = make_op(signer, kind, key, deps=deps, prev=prev, hlc=hlc, value=value)
            made[op.id] = (hlc, op.prev)
            wires.append(op.wire)
            reg_heads[rk] = (cur - prev) | {op.id}
            graph_heads = (graph_heads - deps) | {op.id}
        expect = len(wires)
        if rng.random() < 0.3:
            rng.shuffle(wires)
        if rng.random() < 0.1:
            wires.insert(rng.randrange(len(wires) + 1), rng.choice(wires))
        res = store.ingest(wires, source="crash-writer")
        if res.rejected:
            r = res.rejected[0]
            die(f"{len(res.rejected)} ops rejected, first {r.code}: {r.detail}")
        if res.pending or res.dropped or len(res.accepted) != expect:
            die(f"batch of {expect}: {len(res.accepted)} accepted, {res.pending} pending, "
                f"{res.dropped} dropped")
        ack(res.accepted)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("db_path")
    ap.add_argument("--target", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pause-ms", type=float, default=0.0,
                    help="sleep up to this long (uniformly) between rounds")
    args = ap.parse_args(argv)
    store = Store(args.db_path)
    start = len(store)
    print(f"crash_writer: opened {args.db_path} with {start} ops", file=sys.stderr, flush=True)
    rng = random.Random(args.seed * 1_000_003 + start)
    w = Writer(store, rng)
    while (have := len(store)) < args.target:
        if rng.random() < 0.3:
            w.write_one()
        else:
            w.write_batch(min(rng.randint(1, 200), args.target - have))
        if args.pause_ms:
            time.sleep(rng.uniform(0, args.pause_ms) / 1000)
    store.close()
    print(f"crash_writer: done, {have} ops", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
