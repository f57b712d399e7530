"""formnet: how fast a joining host can ping the fog over WireGuard, and how fast a new peer record
becomes a usable tunnel elsewhere. Hosts are network namespaces (tests/multihost.py); every node is
a `form join` process with VMs off. Needs root and wireguard-go.

    python bench/mesh.py [--hosts 3 10] [--json]

  join_to_ping_ms   per joining host: `form join INVITE` launched -> its first ICMP echo answered
                    by the genesis host's overlay address (median and max over the joiners)
  peer_update_ms    the last joiner's `peer` record committed on the genesis node -> the genesis
                    host's first answered ping to the joiner's overlay address
  mesh_ms           the genesis node's start -> every node reports all others as peers

The last line printed is one JSON object with the figures (with --json, the only line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import printer, workdir  # noqa: E402
from formation.node.control import ControlClient  # noqa: E402
from tests.multihost import hosts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _call(data: Path, **req) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        c = ControlClient(data / "control.sock", timeout=10)
        try:
            return c.call(**req)
        finally:
            c.close()
    return None


def _start(host, data: Path, *args: str):
    log = open(data.parent / f"{data.name}.log", "ab")  # noqa: SIM115 - lives with the process
    env = {**os.environ, "FORMATION_PASSWORD": "bench", "PYTHONPATH": str(ROOT)}
    return host.popen(sys.executable, "-m", "formation.cli", *args, "--data-dir", str(data), "--vms",
                      "false", cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _until(check, timeout: float, poll: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(poll)
    raise TimeoutError


def run(n: int, base: Path, say) -> dict:
    with hosts(n) as hs:
        data = [base / f"n{n}-{h.index}" for h in hs]
        t0 = time.monotonic()
        _start(hs[0], data[0], "join", "--genesis")
        genesis = _until(lambda: (_call(data[0], cmd="status") or {}).get("mesh", {}).get("overlay_ip"), 60)
        joins: list[float] = []
        peer_update = None
        for i in range(1, n):
            token = _call(data[0], cmd="invite", expires=600)["token"]
            t_join = time.monotonic()
            _start(hs[i], data[i], "join", token)
            _until(lambda i=i: hs[i].ping(genesis, 0.2), 120, poll=0)
            joins.append((time.monotonic() - t_join) * 1000)
            if i == n - 1:  # the last joiner's peer record, as the genesis node sees it
                me = _until(lambda i=i: (_call(data[i], cmd="status") or {}).get("address"), 30)
                _until(lambda me=me: (_call(data[0], cmd="get", kind="peer", key=me.lower()) or {}).get("value"), 60)
                t_record = time.monotonic()
                overlay = _call(data[0], cmd="get", kind="peer", key=me.lower())["value"]["overlay_ip"]
                _until(lambda overlay=overlay: hs[0].ping(overlay, 0.2), 60, poll=0)
                peer_update = (time.monotonic() - t_record) * 1000
            say(f"  host {i + 1}/{n} joined: first ping after {joins[-1]:.0f} ms")
        _until(lambda: all((_call(d, cmd="status") or {}).get("mesh", {}).get("peers") == n - 1 for d in data), 180, 0.2)
        mesh_ms = (time.monotonic() - t0) * 1000
    return {"hosts": n, "join_to_ping_ms": round(statistics.median(joins)),
            "join_to_ping_max_ms": round(max(joins)), "peer_update_ms": round(peer_update or 0),
            "mesh_ms": round(mesh_ms)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--dir", help="keep the nodes' data and logs here")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args()
    say = printer(args.json)
    base, tmp = workdir(args.dir, "formation-mesh-")
    results = []
    try:
        for n in args.hosts:
            say(f"{n} hosts:")
            results.append(run(n, base, say))
    finally:
        if tmp is not None:
            tmp.cleanup()
    say(f"\n{'hosts':>5} {'join->ping ms':>14} {'(max)':>7} {'peer update ms':>15} {'full mesh ms':>13}")
    for r in results:
        say(f"{r['hosts']:>5} {r['join_to_ping_ms']:>14} {r['join_to_ping_max_ms']:>7} "
            f"{r['peer_update_ms']:>15} {r['mesh_ms']:>13}")
    print(json.dumps({"bench": "mesh", "results": results}))


if __name__ == "__main__":
    main()
