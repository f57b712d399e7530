"""Gossip throughput and latency across a local fog of N `form node` processes.

    python bench/gossip.py --nodes 10 [--rate 500] [--seconds 20] [--json]
    python bench/gossip.py --nodes 10 --find-max [--seconds 20]

Starts a fog of N processes on 127.0.0.1 (a DevFog whose members take turns inviting) and waits
until every node is up and connected. A thread per node follows that node's `watch` stream on
its control socket (one line per op the node commits, with the wall time of the commit). Outside
the timed part it signs RATE x SECONDS users' `POST /v1/models` requests. Timed: request k is
due at t0 + k / RATE and goes to node k mod N through that node's control socket (`submit`); a
thread per node sends what is due, several requests at once when it has fallen behind, and
records the wall time at which each submit returned. Then it waits (up to --drain seconds) until
every written op is on every node.

  written          submits the nodes accepted;   write_rate  what the writers achieved
  delivered_ratio  share of written ops that reached every node before the deadline
  ops_per_s        ops delivered to all nodes / (last such delivery - first write)
  p50_ms, p99_ms   per op: from its submit returning on one node to its commit on the last node
  cpu              node CPU seconds / wall seconds during the trial (the nodes' cores in use)
  machine          the same for the whole machine (from /proc/stat): this process and anything
                   else running count too, so a figure well above `cpu` means a shared machine
  rss              VmRSS of each node process at the end (mean and max)

  cpu_ms_per_op    per node: its CPU seconds during the trial (/proc/<pid>/stat) / the trial's ops
                   it committed (its own writes included); mean over nodes (and _max)
  cpu_per_op_ratio cpu_ms_per_op / the CPU per op of ingesting the same kind of ops in this
                   process (ingest_cpu_us_per_op: a Store writes --ingest-ops of the bench's
                   requests, another ingests their wires in batches of --ingest-batch, before the
                   fog starts; the best of three stores). 1.0 would mean the network path costs nothing
  ops_per_batch    ops written / gossip messages published (gossip_sent)
  copies_per_batch batches nodes read from their peers, pubsub messages and push frames (every
                   copy, before the seen check) / batches published; ideal nodes - 1 (_per_node: / nodes)
  bytes_in_per_op  bytes of those messages per op per node; rpcs_out_per_op, rpc_bytes_out_per_op:
                   RPCs and push frames (batches and control) written per op per node, and their bytes
  push_*           the push tree (formation/p2p/push.py): frames dropped at a full peer queue,
                   PRUNEs and GRAFTs sent, over all nodes
  since_ops_per_session  ops in the Bloom filter of a sync session's Hello, on average over the
                   run (both sides' sessions): what a session costs grows with it
  idle_cpu_ms_per_s_per_node  before the trials, each node's CPU per second with nothing
                   written (--idle-seconds): the fixed part, which CPU per op at low rates is
                   mostly made of

--find-max runs trials on the same fog at rates doubling from --start-rate until one loses an op
(not on every node by the deadline), the writers cannot reach 90 % of the rate, or (--max-p99) its
p99 is over the bound; if the first rate already fails, it halves instead until one passes. It
reports the highest rate that passed. The last line printed is one JSON object.
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


def sign_requests(n: int, trial: int, *, users: int | None = None, seed: int = 1) -> list[bytes]:
    """n distinct signed model creates, each as a ready control-socket `submit` line, from
    `users` users (default: enough that none goes past 100 models, under the account quota)."""
    users = users or max(16, -(-n // 100))
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


def _node_cpu(fog: DevFog) -> list[float | None]:
    """CPU seconds (user + system) each node process has used so far, from /proc/<pid>/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    out: list[float | None] = []
    for node in fog.nodes:
        try:
            fields = Path(f"/proc/{node.pid}/stat").read_text().rsplit(")", 1)[1].split()
            out.append((int(fields[11]) + int(fields[12])) / tick)
        except (OSError, IndexError, ValueError, TypeError):
            out.append(None)
    return out


def idle_cpu(fog: DevFog, seconds: float) -> float:
    """CPU a node spends per second with nothing written (mean over nodes, ms): the fixed
    cost that CPU per op at a low rate is mostly made of."""
    before = _node_cpu(fog)
    time.sleep(seconds)
    after = _node_cpu(fog)
    used = [b - a for a, b in zip(before, after, strict=True) if a is not None and b is not None]
    return round(1000 * sum(used) / len(used) / seconds, 1) if used else 0.0


def _p2p_stats(fog: DevFog) -> list[dict]:
    out = []
    for i in range(len(fog.nodes)):
        try:
            out.append(fog.status(i)["p2p"])
        except (OSError, ValueError, KeyError, DevFogError):
            out.append({})
    return out


def ingest_baseline(base: Path, n: int, batch: int) -> dict:
    """CPU per op of local ingest (decode, verify, validate, persist) of the very ops the trials
    write, in this process: one on-disk Store writes n of the bench's requests as a node does
    (the node signs each user's request into an op), a second ingests their wires in batches."""
    from formation.crdt.store import Store

    lines = sign_requests(n, 0, seed=2)
    key = PrivateKey(b"\x42" * 32)
    base.mkdir(parents=True, exist_ok=True)
    author = Store(str(base / "baseline-author.db"), synchronous="FULL")
    wires = []
    for line in lines:
        req = json.loads(line)
        wires.append(author.write_request(key, req["message"], base64.b64decode(req["body"]),
                                          req["signature"]).wire)
    author.close()
    # the best of three fresh stores: one run moved by a third from run to run (310-440 us per
    # op), and it is the denominator of every ratio the bench reports
    runs = []
    for r in range(3):
        reader = Store(str(base / f"baseline-ingest-{r}.db"), synchronous="FULL")
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for i in range(0, len(wires), batch):
            res = reader.ingest(wires[i:i + batch], source="peer")
            if res.rejected:
                raise SystemExit(f"FAIL: baseline ingest rejected {res.rejected[0]}")
        runs.append((time.process_time() - cpu0, time.perf_counter() - wall0))
        reader.close()
    cpu, wall = min(runs)
    return {"ingest_ops": n, "ingest_batch": batch, "ingest_cpu_us_per_op": round(1e6 * cpu / n, 1),
            "ingest_ops_per_s": round(n / wall, 1)}


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
              trial_no: int, say, ingest_us: float | None = None) -> dict:
    n = len(fog.nodes)
    total = max(1, int(rate * seconds))
    say(f"trial {trial_no}: {total} ops at {rate:g} ops/s over {n} nodes: signing ...")
    lines = sign_requests(total, trial_no)
    per_node: dict[int, list[tuple[int, bytes]]] = {i: [] for i in range(n)}
    for k, line in enumerate(lines):
        per_node[k % n].append((k, line))

    outs: dict[int, list[Written]] = {i: [] for i in range(n)}
    errors: list[str] = []
    node_cpu0, stats0, busy0 = _node_cpu(fog), _p2p_stats(fog), machine_busy()[0]
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

    stats_mid = _p2p_stats(fog)  # as the writing ends: the nodes' gossip pacing under this load
    say(f"  {len(ok)} written in {write_secs:.1f} s; waiting up to {drain:g} s for delivery ...")
    ids = {w.id for w in ok}
    deadline = time.monotonic() + drain
    while True:
        missing = sum(1 for i_ in ids if not all(i_ in wt.seen for wt in watchers))
        if missing == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    t_end = time.time()
    node_cpu1, stats1 = _node_cpu(fog), _p2p_stats(fog)
    holds = [st.get("gossip_hold_ms", 0.0) for st in stats_mid if st]
    node_cpu = [b - a if a is not None and b is not None else None for a, b in zip(node_cpu0, node_cpu1, strict=True)]
    cpu = sum(c for c in node_cpu if c is not None) / max(1e-9, t_end - t0)
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

    # Per node: CPU seconds per op it applied (committed) in this trial, its own writes included.
    per_op = []
    for i, wt in enumerate(watchers):
        applied = sum(1 for i_ in ids if i_ in wt.seen)
        if node_cpu[i] is not None and applied:
            per_op.append(node_cpu[i] / applied)

    def delta(key: str) -> int:
        return sum(b.get(key, 0) - a.get(key, 0) for a, b in zip(stats0, stats1, strict=True))

    batches, copies = delta("gossip_sent"), delta("gossip_copies_in")
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
        # node CPU per op applied, mean and worst node (ms)
        "cpu_ms_per_op": round(1000 * sum(per_op) / len(per_op), 3) if per_op else None,
        "cpu_ms_per_op_max": round(1000 * max(per_op), 3) if per_op else None,
        "batches": batches,  # gossip messages published
        "ops_per_batch": round(len(ok) / batches, 2) if batches else None,
        # copies of each published message a node read from its peers (ideal: nodes - 1)
        "copies_per_batch": round(copies / batches, 2) if batches else None,
        "copies_per_batch_per_node": round(copies / batches / n, 2) if batches else None,
        "bytes_in_per_op": round(delta("gossip_bytes_in") / len(ok) / n, 1) if ok else None,
        "rpcs_out_per_op": round(delta("rpcs_out") / len(ok) / n, 2) if ok else None,
        "rpc_bytes_out_per_op": round(delta("rpc_bytes_out") / len(ok) / n, 1) if ok else None,
        "gossip_dropped": delta("gossip_dropped"),
        "push_dropped": delta("push_dropped"),
        "push_prunes": delta("push_prunes"),
        "push_grafts": delta("push_grafts"),
        # how long a node's first op waited for company as the writing ended (mean over nodes)
        "gossip_hold_ms": round(sum(holds) / len(holds), 1) if holds else None,
        "ops_from_sync": delta("ops_from_sync"),
    }
    if ingest_us and res["cpu_ms_per_op"] is not None:
        # what a node spends per op against what ingesting it alone costs (1.0: the network is free)
        res["cpu_per_op_ratio"] = round(1000 * res["cpu_ms_per_op"] / ingest_us, 2)
    if errors:
        res["errors"] = errors[:5]
    refused = [w.error for w in written if w.error]
    if refused:
        res["refused_first"] = refused[0]
    return res


# ---- reporting ----------------------------------------------------------------------------------


COLUMNS = [("rate", "rate"), ("written", "written"), ("write_rate", "write/s"),
           ("delivered_ratio", "delivered"), ("ops_per_s", "ops/s"), ("p50_ms", "p50 ms"),
           ("p99_ms", "p99 ms"), ("max_ms", "max ms"), ("cpu_cores", "cpu"), ("machine_cores", "machine"),
           ("cpu_ms_per_op", "ms/op/node"), ("cpu_per_op_ratio", "vs ingest"), ("ops_per_batch", "ops/msg"),
           ("copies_per_batch_per_node", "copies/node"), ("bytes_in_per_op", "B in/op/node")]


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
              "ops_from_gossip", "gossip_copies_in", "gossip_dropped", "push_dropped", "push_prunes",
              "push_grafts", "push_hostile", "sync_since_ops"):
        out[k] = sum(s.get(k, 0) for s in stats)
    sessions = out["syncs_ok"] + out["syncs_failed"]
    out["since_ops_per_session"] = round(out["sync_since_ops"] / sessions) if sessions else 0
    return out


def _sustained(res: dict, max_p99_ms: float | None = None) -> bool:
    """Every written op reached every node, the writers kept (90 % of) the rate, and (with
    --max-p99) the 99th percentile latency stayed within the bound."""
    return (res["delivered_ratio"] == 1.0 and res["write_rate"] >= 0.9 * res["rate"]
            and (max_p99_ms is None or (res["p99_ms"] is not None and res["p99_ms"] <= max_p99_ms)))


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


class BenchFog(DevFog):
    """A DevFog whose invites come from several members: a fog's default policy lets each member
    admit 16 nodes, so node 0 invites the first 16, node 1 the next 16, and so on (each
    inviter is waited for until it is an admitted member)."""

    INVITES_EACH = 16

    def _inviter(self) -> int:
        self._invites = getattr(self, "_invites", 0) + 1
        inviter = (self._invites - 1) // self.INVITES_EACH
        deadline = time.monotonic() + 180
        while inviter:
            try:
                if self.status(inviter).get("fog", {}).get("admitted"):
                    break
            except (OSError, ValueError, DevFogError):
                pass
            if time.monotonic() > deadline:
                raise DevFogError(f"node {inviter} was not admitted within 180 s: it cannot invite")
            time.sleep(0.5)
        return inviter


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
    ap.add_argument("--max-p99", type=float, default=None,
                    help="--find-max: a trial passes only if its p99 latency is at most this (ms)")
    ap.add_argument("--min-rate", type=float, default=1.0)
    ap.add_argument("--max-rate", type=float, default=3200.0)
    ap.add_argument("--settle", type=float, default=180.0,
                    help="--find-max: how long to wait for convergence between trials")
    ap.add_argument("--ingest-ops", type=int, default=1000,
                    help="ops for the in-process ingest baseline (0: skip it)")
    ap.add_argument("--ingest-batch", type=int, default=100, help="its batch size")
    ap.add_argument("--idle-seconds", type=float, default=10.0,
                    help="measure the fog's CPU with nothing written for this long first (0: not)")
    ap.add_argument("--base-dir", help="keep the fog's data and logs here (default: temporary)")
    ap.add_argument("--json", action="store_true", help="print only the JSON result line")
    args = ap.parse_args(argv)
    if args.nodes < 1 or args.rate <= 0 or args.seconds <= 0:
        ap.error("--nodes, --rate and --seconds must be positive")

    say = printer(args.json)
    base, tmp = workdir(args.base_dir, "formation-gossip-")
    rows: list[dict] = []
    try:
        baseline: dict = {}
        if args.ingest_ops > 0:
            say(f"ingest baseline: {args.ingest_ops} ops in batches of {args.ingest_batch}, in process ...")
            baseline = ingest_baseline(base / "baseline", args.ingest_ops, args.ingest_batch)
            say(f"  {baseline['ingest_cpu_us_per_op']} us of CPU per op")
        ingest_us = baseline.get("ingest_cpu_us_per_op")
        say(f"starting {args.nodes} nodes in {base} ...")
        with BenchFog(args.nodes, base) as fog:
            ready = fog.wait_ready(180)
            fewest = wait_mesh(fog, 60, say)
            fog.wait_converged(120)
            say(f"  ready in {ready:.1f} s; every node has >= {fewest} peers")
            watchers = [Watcher(fog, i) for i in range(args.nodes)]
            if args.idle_seconds > 0:
                idle = idle_cpu(fog, args.idle_seconds)
                baseline["idle_cpu_ms_per_s_per_node"] = idle
                say(f"  idle: {idle} ms of CPU per second per node (heartbeats, sync rounds, "
                    f"the tree's ticks, DNS), measured over {args.idle_seconds:g} s")
            try:
                if not args.find_max:
                    rows.append(run_trial(fog, watchers, args.rate, args.seconds, args.drain, 0, say,
                                          ingest_us))
                else:
                    # Double from --start-rate while every op arrives; if the first rate already
                    # loses ops, halve instead until one does not (or below --min-rate).
                    rate, trial, step = args.start_rate, 0, 0.0
                    while args.min_rate <= rate <= args.max_rate:
                        res = run_trial(fog, watchers, rate, args.seconds, args.drain, trial, say, ingest_us)
                        rows.append(res)
                        trial += 1
                        say(table([res]).splitlines()[1])
                        good = _sustained(res, args.max_p99)
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
        ok = [r for r in rows if _sustained(r, args.max_p99)]
        result = {"nodes": args.nodes, "find_max": True, "seconds": args.seconds, "max_p99": args.max_p99,
                  "max_rate": max((r["rate"] for r in ok), default=0.0),
                  "max_ops_per_s": max((r["ops_per_s"] for r in ok), default=0.0),
                  "trials": rows, **baseline, **figures}
        say(f"highest rate with every op delivered to every node: {result['max_rate']:g} ops/s")
    else:
        r = rows[0]
        result = {"nodes": args.nodes, "rate": r["rate"], "ops_per_s": r["ops_per_s"],
                  "delivered_ratio": r["delivered_ratio"], "p50_ms": r["p50_ms"],
                  "p99_ms": r["p99_ms"], **{k: v for k, v in r.items() if k not in (
                      "rate", "ops_per_s", "delivered_ratio", "p50_ms", "p99_ms")}, **baseline, **figures}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
