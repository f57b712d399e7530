"""What a node's loops pay to read the records they work from (node/mirror.py).

    python bench/mirror.py [--records 5000] [--json]

A store holds --records instances (users' creates through the same request path as the API);
then, per read: the whole read the scheduler and the DNS view used to make at every pass
(`Store.list` of every instance and the running and paused statuses), against the mirror's
read after one new record, and after no change at all. Each row: milliseconds per read (the
best of --repeat). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import printer  # noqa: E402
from formation.crdt.intents import canonical_message  # noqa: E402
from formation.crdt.keys import PrivateKey  # noqa: E402
from formation.crdt.quotas import Quotas  # noqa: E402
from formation.crdt.store import Store  # noqa: E402
from formation.node.mirror import RecordMirror  # noqa: E402

KINDS = ("instance", "instance_status")
BIG = 10**9


def create(store: Store, node: PrivateKey, user: PrivateKey, i: int) -> None:
    body = json.dumps({"name": f"i{i}", "formfile": "NAME app\nEXPOSE 8080\n"}).encode()
    message = canonical_message("POST", "/v1/instance/create", 1_700_000_000 + i, body)
    store.write_request(node, message, body, user.personal_sign(message.encode()),
                        now_ms=(1_700_000_000 + i) * 1000)


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(min(times) * 1000, 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print only the JSON result line")
    args = ap.parse_args()
    say = printer(args.json)
    store = Store(quotas=Quotas(records={"instance": BIG, "agent": BIG, "model": BIG, "dns": BIG},
                                replicas=BIG, vcpus=BIG, memory_mb=BIG, disk_gb=BIG))
    node = PrivateKey(b"\x01" * 32)
    users = [PrivateKey(bytes([2 + i]) * 32) for i in range(50)]
    say(f"writing {args.records} instances ...")
    for i in range(args.records):
        create(store, node, users[i % len(users)], i)

    def whole():
        store.list("instance", limit=BIG)
        store.list("instance_status", type="running", limit=BIG)
        store.list("instance_status", type="paused", limit=BIG)

    mirror = RecordMirror(KINDS, BIG)
    mirror.read(store)
    n = [args.records]

    def after_one():
        create(store, node, users[0], n[0])
        n[0] += 1
        t = time.perf_counter()
        mirror.read(store)
        return time.perf_counter() - t

    one = round(min(after_one() for _ in range(args.repeat)) * 1000, 3)
    result = {"records": args.records, "whole_read_ms": best(whole, args.repeat),
              "mirror_after_one_change_ms": one,
              "mirror_unchanged_ms": best(lambda: mirror.read(store), args.repeat)}
    say("| records | whole read | mirror, one change | mirror, no change |")
    say("|---|---|---|---|")
    say(f"| {result['records']:,} | {result['whole_read_ms']} ms | {result['mirror_after_one_change_ms']} ms "
        f"| {result['mirror_unchanged_ms']} ms |")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
