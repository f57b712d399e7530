"""Gossip throughput and latency across a local fog of N `form node` processes.

    python bench/gossip.py --nodes 10 [--rate 500] [--seconds 20] [--json]
    python bench/gossip.py --nodes 10 --find-max [--seconds 20]

Starts a DevFog of N processes on 127.0.0.1 and waits until every node is up and connected. A
thread per node follows that node's `watch` stream on its control socket (one line per op the
node commits, with the wall time of the commit). Outside the timed part it signs RATE x SECONDS
users' `POST /v1/models` requests. Timed: request k is due at t0 + k / RATE and goes to node
k mod N through that node's control socket (`submit`); a thread per node sends what is due,
several requests at once when it has fallen behind, and records the wall time at which each
submit returned. Then it waits (up to --drain seconds) until every written op is on every node.

  written          submits the nodes accepted;   write_rate  what the writers achieved
  delivered_ratio  share of written ops that reached every node before the deadline
  ops_per_s        ops delivered to all nodes / (last such delivery - first write)
  p50_ms, p99_ms   per op: from its submit returning on one node to its commit on the last node
  cpu              node CPU seconds / wall seconds during the trial (the nodes' cores in use)
  machine          the same for the whole machine (from /proc/stat): this process and anything
                   else running count too, so a figure well above `cpu` means a shared machine
  rss              VmRSS of each node process at the end (mean and max)

--find-max runs trials on the same fog at rates doubling from --start-rate until one loses an op
(not on every node by the deadline) or the writers cannot reach 90 % of the rate; if the first
rate already fails, it halves instead until one passes. It reports the highest rate at which every
op reached every node (delivered_ratio 1.0). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import printer, workdir  # noqa: E402
from formation.crdt.intents import canonical_message  # noqa: E402
from formation.crdt.keys import PrivateKey  # noqa: E402
from formation.devfog import DevFog, DevFogError  # noqa: E402
from formation.node.control import ControlClient  # noqa: E402

TS0 = 1_760_000_000


# ---- requests -----------------------------------------------------------------------------------


def sign_requests(n: int, trial: int, *, users: int = 16, seed: int = 1) -> list[bytes]:
    """n distinct signed model creates, each as a ready control-socket `submit` line."""
    rnd = random.Random(seed * 1000 + trial)
    keys = [PrivateKey(rnd.randbytes(32)) for _ in range(users)]
    lines = []
    for k in range(n):
        body = json.dumps({"name": f"bench {trial}-{k}", "tags": ["bench"]}).encode()
        message = canonical_message("POST", "/v1/models", TS0 + trial * 10_000_000 + k, body)
        sig = keys[k % users].personal_sign(message.encode())
        lines.append(json.dumps({"cmd": "submit", "message": message,
                                 "body": base64.b64encode(body).decode(),
                                 "signature": sig.hex()}).encode() + b"\n")
    return lines


# ---- watching -----------------------------------------------------------------------------------


class Watcher:
    """Follows one node's watch stream: op id -> wall time the node committed it."""

    def __init__(self, fog: DevFog, i: int):
        self.i = i
        self.seen: dict[str, float] = {}
        self.error: str | None = None
        since = fog.status(i)["seq"]
        self.client = ControlClient(fog.nodes[i].control_path, timeout=30)
        answer = self.client.call(cmd="watch", since=since)
        if not answer.get("ok"):
            raise DevFogError(f"node {i}: watch refused: {answer}")
        self.client.sock.settimeout(None)
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"watch-{i}")
        self.thread.start()

    def _run(self) -> None:
        try:
            for line in self.client.file:
                ev = json.loads(line)
                self.seen.setdefault(ev["id"], ev["t"])
        except (OSError, ValueError) as exc:
            self.error = repr(exc)

    def close(self) -> None:
        try:
            self.client.sock.shutdown(2)
        except OSError:
            pass
        self.client.close()
        self.thread.join(timeout=5)


# ---- one trial ----------------------------------------------------------------------------------


@dataclass
class Written:
    k: int
    node: int
    id: str | None
    t_due: float
    t_done: float
    error: str | None = None


@dataclass
class Trial:
    rate: float
    seconds: float
    written: list[Written] = field(default_factory=list)
    t_first: float = 0.0
    t_last_write: float = 0.0
    result: dict = field(default_factory=dict)


def _writer(fog: DevFog, i: int, items: list[tuple[int, bytes]], t0: float, rate: float,
            out: list[Written], errors: list[str]) -> None:
    try:
        client = ControlClient(fog.nodes[i].control_path, timeout=120)
    except OSError as exc:
        errors.append(f"node {i}: {exc!r}")
        return
    try:
        pos = 0
        while pos < len(items):
            now = time.time()
            due = t0 + items[pos][0] / rate
            if due > now:
                time.sleep(min(due - now, 0.5))
                continue
            end = pos
            while end < len(items) and end - pos < 256 and t0 + items[end][0] / rate <= now:
                end += 1
            client.sock.sendall(b"".join(line for _, line in items[pos:end]))
            for k, _ in items[pos:end]:
                raw = client.file.readline()
                if not raw:
                    raise ConnectionError("control socket closed")
                answer = json.loads(raw)
                done = time.time()
                out.append(Written(k, i, answer.get("id") if answer.get("ok") else None,
                                   t0 + k / rate, done,
                                   None if answer.get("ok") else answer.get("error")))
            pos = end
    except (OSError, ValueError) as exc:
        errors.append(f"node {i}: {exc!r}")
    finally:
        client.close()


def _cpu_seconds(fog: DevFog) -> float:
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for node in fog.nodes:
        try:
            fields = Path(f"/proc/{node.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError, TypeError):
            pass
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields) - idle) / tick, sum(fields) / tick


def run_trial(fog: DevFog, watchers: list[Watcher], rate: float, seconds: float, drain: float,
              trial_no: int, say) -> dict:
    n = len(fog.nodes)
    total = max(1, int(rate * seconds))
    say(f"trial {trial_no}: {total} ops at {rate:g} ops/s over {n} nodes: signing ...")
    lines = sign_requests(total, trial_no)
    per_node: dict[int, list[tuple[int, bytes]]] = {i: [] for i in range(n)}
    for k, line in enumerate(lines):
        per_node[k % n].append((k, line))

    outs: dict[int, list[Written]] = {i: [] for i in range(n)}
    errors: list[str] = []
    cpu0, busy0 = _cpu_seconds(fog), machine_busy()[0]
    t0 = time.time() + 0.2
    threads = [threading.Thread(target=_writer, args=(fog, i, per_node[i], t0, rate, outs[i], errors),
                                daemon=True) for i in range(n)]
    say("  writing ...")
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds * 20 + 300)
    if any(t.is_alive() for t in threads):
        errors.append("a writer thread did not finish")
    written = [w for i in range(n) for w in outs[i]]
    ok = [w for w in written if w.id is not None]
    t_last_write = max((w.t_done for w in written), default=t0)
    write_secs = max(1e-9, t_last_write - t0)

    say(f"  {len(ok)} written in {write_secs:.1f} s; waiting up to {drain:g} s for delivery ...")
    ids = {w.id for w in ok}
    deadline = time.monotonic() + drain
    while True:
        missing = sum(1 for i_ in ids if not all(i_ in wt.seen for wt in watchers))
        if missing == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    t_end = time.time()
    cpu = (_cpu_seconds(fog) - cpu0) / max(1e-9, t_end - t0)
    machine = (machine_busy()[0] - busy0) / max(1e-9, t_end - t0)

    latencies, last_times = [], []
    for w in ok:
        times = [wt.seen.get(w.id) for wt in watchers]
        if any(t is None for t in times):
            continue
        last = max(times)
        last_times.append(last)
        latencies.append(max(0.0, last - w.t_done))
    latencies.sort()
    delivered = len(latencies)
    span = (max(last_times) - t0) if last_times else float("nan")

    def pct(p: float) -> float | None:
        if not latencies:
            return None
        return round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 1)

    lag = max((w.t_done - w.t_due for w in written), default=0.0)
    res = {
        "rate": rate,
        "seconds": seconds,
        "written": len(ok),
        "refused": len(written) - len(ok),
        "write_rate": round(len(ok) / write_secs, 1),
        "writer_lag_s": round(lag, 2),
        "delivered": delivered,
        "delivered_ratio": round(delivered / len(ok), 4) if ok else 0.0,
        "ops_per_s": round(delivered / span, 1) if delivered and span > 0 else 0.0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(1000 * latencies[-1], 1) if latencies else None,
        "cpu_cores": round(cpu, 2),
        "machine_cores": round(machine, 2),  # the whole machine, others' processes included
    }
    if errors:
        res["errors"] = errors[:5]
    refused = [w.error for w in written if w.error]
    if refused:
        res["refused_first"] = refused[0]
    return res


# ---- reporting ----------------------------------------------------------------------------------


COLUMNS = [("rate", "rate"), ("written", "written"), ("write_rate", "write/s"),
           ("delivered_ratio", "delivered"), ("ops_per_s", "ops/s"), ("p50_ms", "p50 ms"),
           ("p99_ms", "p99 ms"), ("max_ms", "max ms"), ("cpu_cores", "cpu"), ("machine_cores", "machine")]


def table(rows: list[dict]) -> str:
    cells = [[h for _, h in COLUMNS]] + [
        [("-" if r.get(k) is None else f"{r[k]:g}" if isinstance(r[k], float) else str(r[k]))
         for k, _ in COLUMNS] for r in rows]
    widths = [max(len(c[j]) for c in cells) for j in range(len(COLUMNS))]
    return "\n".join("  ".join(c[j].rjust(widths[j]) for j in range(len(COLUMNS))) for c in cells)


def node_figures(fog: DevFog) -> dict:
    rss = [fog.rss_kb(i) for i in range(len(fog.nodes))]
    rss_mb = [r / 1024 for r in rss if r is not None]
    stats = []
    for i in range(len(fog.nodes)):
        try:
            stats.append(fog.status(i)["p2p"])
        except (OSError, ValueError, DevFogError):
            pass
    out = {
        "rss_mean_mb": round(sum(rss_mb) / len(rss_mb), 1) if rss_mb else None,
        "rss_max_mb": round(max(rss_mb), 1) if rss_mb else None,
    }
    for k in ("gossip_sent", "gossip_received", "syncs_ok", "syncs_failed", "ops_from_sync",
              "ops_from_gossip"):
        out[k] = sum(s.get(k, 0) for s in stats)
    return out


def _sustained(res: dict) -> bool:
    """Every written op reached every node, and the writers kept (90 % of) the rate."""
    return res["delivered_ratio"] == 1.0 and res["write_rate"] >= 0.9 * res["rate"]


def wait_mesh(fog: DevFog, timeout: float, say) -> int:
    """Wait until every node is connected to every other one; returns the fewest peers seen."""
    n = len(fog.nodes)
    deadline = time.monotonic() + timeout
    while True:
        fewest = min(len(fog.status(i)["connected"]) for i in range(n))
        if fewest >= n - 1 or time.monotonic() > deadline:
            if fewest < n - 1:
                say(f"  (not a full mesh after {timeout:g} s: a node has {fewest} peers)")
            return fewest
        time.sleep(0.5)


# ---- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--rate", type=float, default=500.0, help="target ops/s over the whole fog")
    ap.add_argument("--seconds", type=float, default=20.0, help="how long to write (per trial)")
    ap.add_argument("--drain", type=float, default=60.0,
                    help="after writing, how long to wait for delivery (default 60 s)")
    ap.add_argument("--find-max", action="store_true",
                    help="double the rate from --start-rate until an op is lost")
    ap.add_argument("--start-rate", type=float, default=25.0)
    ap.add_argument("--min-rate", type=float, default=1.0)
    ap.add_argument("--max-rate", type=float, default=3200.0)
    ap.add_argument("--settle", type=float, default=180.0,
                    help="--find-max: how long to wait for convergence between trials")
    ap.add_argument("--base-dir", help="keep the fog's data and logs here (default: temporary)")
    ap.add_argument("--json", action="store_true", help="print only the JSON result line")
    args = ap.parse_args(argv)
    if args.nodes < 1 or args.rate <= 0 or args.seconds <= 0:
        ap.error("--nodes, --rate and --seconds must be positive")

    say = printer(args.json)
    base, tmp = workdir(args.base_dir, "formation-gossip-")
    rows: list[dict] = []
    try:
        say(f"starting {args.nodes} nodes in {base} ...")
        with DevFog(args.nodes, base) as fog:
            ready = fog.wait_ready(180)
            fewest = wait_mesh(fog, 60, say)
            fog.wait_converged(120)
            say(f"  ready in {ready:.1f} s; every node has >= {fewest} peers")
            watchers = [Watcher(fog, i) for i in range(args.nodes)]
            try:
                if not args.find_max:
                    rows.append(run_trial(fog, watchers, args.rate, args.seconds, args.drain, 0, say))
                else:
                    # Double from --start-rate while every op arrives; if the first rate already
                    # loses ops, halve instead until one does not (or below --min-rate).
                    rate, trial, step = args.start_rate, 0, 0.0
                    while args.min_rate <= rate <= args.max_rate:
                        res = run_trial(fog, watchers, rate, args.seconds, args.drain, trial, say)
                        rows.append(res)
                        trial += 1
                        say(table([res]).splitlines()[1])
                        good = _sustained(res)
                        step = step or (2.0 if good else 0.5)
                        if good != (step > 1):
                            break
                        try:  # start the next trial from a quiet fog
                            fog.wait_converged(args.settle)
                        except DevFogError as exc:
                            say(f"  (not converged between trials: {str(exc)[:300]})")
                        rate *= step
                figures = node_figures(fog)
            finally:
                for w in watchers:
                    w.close()
    finally:
        if tmp is not None:
            tmp.cleanup()

    say("")
    say(table(rows))
    say(f"node RSS: mean {figures['rss_mean_mb']} MB, max {figures['rss_max_mb']} MB; p2p over all "
        f"nodes: {figures['syncs_ok']} syncs ok, {figures['syncs_failed']} failed, "
        f"{figures['ops_from_sync']} ops received by sync, {figures['ops_from_gossip']} by gossip")
    if args.find_max:
        ok = [r for r in rows if _sustained(r)]
        result = {"nodes": args.nodes, "find_max": True, "seconds": args.seconds,
                  "max_rate": max((r["rate"] for r in ok), default=0.0),
                  "max_ops_per_s": max((r["ops_per_s"] for r in ok), default=0.0),
                  "trials": rows, **figures}
        say(f"highest rate with every op delivered to every node: {result['max_rate']:g} ops/s")
    else:
        r = rows[0]
        result = {"nodes": args.nodes, "rate": r["rate"], "ops_per_s": r["ops_per_s"],
                  "delivered_ratio": r["delivered_ratio"], "p50_ms": r["p50_ms"],
                  "p99_ms": r["p99_ms"], **{k: v for k, v in r.items() if k not in (
                      "rate", "ops_per_s", "delivered_ratio", "p50_ms", "p99_ms")}, **figures}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
