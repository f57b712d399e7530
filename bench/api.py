"""Throughput and latency of a node's HTTP API under concurrent signed clients.

    python bench/api.py [--clients 20] [--seconds 10] [--json]

Starts one node (`form node` in a subprocess: FORMATION_PASSWORD, free ports, a temporary data
dir; stopped at the end), gives each client its own key, an account and a model, then runs two
phases of --seconds each, all clients at once (trio + formation.client.AsyncClient):

- get:   signed GET /v1/models/{id} and GET /v1/account/{addr}/get, alternating;
- write: signed POST /v1/models, every body distinct (a new model each time).

Per phase: requests per second, p50/p99 latency, errors, and the node's CPU time (utime + stime
of the node process from /proc/<pid>/stat, all its threads). The share of that CPU spent checking
signatures is estimated in the same run: the in-process cost of one
`formation.node.api.auth.verify` on a signed request of the phase's shape (timed over N calls),
times the requests the node answered, divided by the node's CPU time in the phase. The client's
own CPU time is shown too: clients and node share this machine's cores.

Prints a table and, last, one JSON line (with --json, the only line):
{"clients", "seconds", "get": {...}, "write": {...}, "verify_share_get", "verify_share_write", ...}
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import terminate  # noqa: E402
from formation.client import ApiError, AsyncClient, sign_headers  # noqa: E402
from formation.crdt.keys import PrivateKey, format_address  # noqa: E402
from formation.node.api.auth import ReplayGuard, verify  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "bench-password"
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the node --------------------------------------------------------------------------------


class NodeProcess:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.api_port, self.p2p_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        config = self.workdir / "formation.toml"
        config.write_text(
            f'[node]\ndata_dir = "{self.workdir / "data"}"\n'
            f'[api]\nhost = "127.0.0.1"\nport = {self.api_port}\n'
            f'[p2p]\nlisten = "/ip4/127.0.0.1/tcp/{self.p2p_port}"\n'
            '[vm]\nenabled = "false"\n')
        env = {**os.environ, "FORMATION_PASSWORD": PASSWORD}
        self.log = open(self.workdir / "node.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "formation.cli", "node", "--config", str(config)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the node exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the node did not answer on {self.url} within {timeout:g} s:\n{self.tail()}")

    def cpu_seconds(self) -> float:
        """utime + stime of the node process (all threads), in seconds."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; field 3 is fields[0]
        return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of proc(5)

    def tail(self) -> str:
        try:
            return (self.workdir / "node.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> float:
        """SIGTERM, then SIGKILL after 30 s; returns the seconds the node took to exit."""
        took = terminate(self.proc)
        self.log.close()
        return took


# ---- the clients -----------------------------------------------------------------------------


class Phase:
    def __init__(self, name: str):
        self.name = name
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.answered = 0  # responses from the node, errors included (each one was verified)
        self.elapsed = 0.0
        self.node_cpu = 0.0
        self.client_cpu = 0.0

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def summary(self, verify_s: float) -> dict:
        lat = sorted(self.latencies)
        ok = len(lat)
        return {
            "requests": ok,
            "requests_per_s": round(ok / self.elapsed, 1) if self.elapsed else 0.0,
            "p50_ms": round(_pct(lat, 0.50) * 1000, 2),
            "p99_ms": round(_pct(lat, 0.99) * 1000, 2),
            "errors": sum(self.errors.values()),
            "error_kinds": self.errors,
            "node_cpu_s": round(self.node_cpu, 2),
            "node_cpu_per_request_ms": round(self.node_cpu / self.answered * 1000, 3) if self.answered else None,
            "node_cores_busy": round(self.node_cpu / self.elapsed, 2) if self.elapsed else 0.0,
            "client_cores_busy": round(self.client_cpu / self.elapsed, 2) if self.elapsed else 0.0,
            "verify_share": round(verify_s * self.answered / self.node_cpu, 4) if self.node_cpu else None,
        }


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _client_cpu() -> float:
    t = os.times()
    return t.user + t.system


async def setup_clients(url: str, keys: list[PrivateKey]) -> list[str]:
    """An account and a model per client; returns the model ids."""
    mids: list[str] = [""] * len(keys)

    async def one(i: int, key: PrivateKey) -> None:
        async with AsyncClient(url, key) as c:
            await c.post("/v1/account/create", {"name": f"bench {i}"})
            mids[i] = (await c.post("/v1/models", {"name": f"bench model {i}", "model_type": "llm",
                                                   "tags": ["bench"]}))["id"]

    async with trio.open_nursery() as nursery:
        for i, key in enumerate(keys):
            nursery.start_soon(one, i, key)
    return mids


async def run_phase(node: NodeProcess, phase: Phase, keys: list[PrivateKey], seconds: float,
                    request_of) -> None:
    """All clients loop `request_of(i, n)` -> (method, path, body) for `seconds`."""
    clients = [AsyncClient(node.url, k, timeout=60) for k in keys]
    stop_at = trio.current_time() + seconds

    async def loop(i: int) -> None:
        c, n = clients[i], 0
        while trio.current_time() < stop_at:
            method, path, body = request_of(i, n)
            n += 1
            if method == "POST" and n % 100 == 0:
                # a new account every 100 creates: one account holds 128 models at most
                # (crdt/quotas.py), and the phase measures writes, not quota refusals
                await c.aclose()
                c = clients[i] = AsyncClient(node.url, PrivateKey(), timeout=60)
            t0 = time.perf_counter()
            try:
                await c.request(method, path, body)
            except ApiError as exc:
                phase.answered += 1
                phase.error(f"{exc.status} {exc.error}")
                continue
            except httpx.HTTPError as exc:
                phase.error(type(exc).__name__)
                continue
            phase.latencies.append(time.perf_counter() - t0)
            phase.answered += 1

    # warm the connections so the phase measures requests, not TCP handshakes
    async with trio.open_nursery() as nursery:
        for c in clients:
            nursery.start_soon(lambda c=c: c.get("/v1/health", sign=False))
    cpu0, ccpu0, t0 = node.cpu_seconds(), _client_cpu(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(len(clients)):
            nursery.start_soon(loop, i)
    phase.elapsed = time.perf_counter() - t0
    phase.node_cpu = node.cpu_seconds() - cpu0
    phase.client_cpu = _client_cpu() - ccpu0
    for c in clients:
        await c.aclose()


# ---- the cost of one verification --------------------------------------------------------------


def verify_cost(n: int = 2000) -> dict:
    """Seconds per `auth.verify` of a signed GET and of a signed POST /v1/models, in-process."""
    key = PrivateKey(b"\x07" * 32)
    addr = format_address(key.address)
    path = f"/v1/account/{addr}/get"
    headers = sign_headers(key, "GET", path, b"")
    guard = ReplayGuard()
    now = time.time()
    verify("GET", path, b"", headers, now, guard)
    t0 = time.perf_counter()
    for _ in range(n):
        verify("GET", path, b"", headers, now, guard)
    get_s = (time.perf_counter() - t0) / n

    # POSTs are one use per signature: sign n distinct bodies first, then time the checks alone
    reqs = []
    for i in range(n):
        body = json.dumps({"name": f"bench write {i}", "model_type": "llm"}, separators=(",", ":")).encode()
        reqs.append((body, sign_headers(key, "POST", "/v1/models", body)))
    guard = ReplayGuard()
    now = time.time()
    t0 = time.perf_counter()
    for body, h in reqs:
        verify("POST", "/v1/models", body, h, now, guard)
    post_s = (time.perf_counter() - t0) / n
    return {"get": get_s, "write": post_s, "n": n}


# ---- main --------------------------------------------------------------------------------------


async def bench(node: NodeProcess, clients: int, seconds: float) -> tuple[Phase, Phase]:
    keys = [PrivateKey() for _ in range(clients)]
    addrs = [format_address(k.address) for k in keys]
    mids = await setup_clients(node.url, keys)

    def get_request(i: int, n: int):
        return ("GET", f"/v1/models/{mids[i]}", None) if n % 2 == 0 else \
            ("GET", f"/v1/account/{addrs[i]}/get", None)

    def write_request(i: int, n: int):
        return ("POST", "/v1/models", {"name": f"bench {i} {n}", "model_type": "llm",
                                       "description": f"write {n} of client {i}", "tags": ["bench"]})

    get, write = Phase("get"), Phase("write")
    await run_phase(node, get, keys, seconds, get_request)
    await run_phase(node, write, keys, seconds, write_request)
    return get, write


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=20, help="concurrent clients (default 20)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each phase (default 10)")
    ap.add_argument("--json", action="store_true", help="print only the JSON result line")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0:
        ap.error("--clients and --seconds must be positive")

    load_before = [round(x, 2) for x in os.getloadavg()]  # other work on this machine skews it all
    with tempfile.TemporaryDirectory(prefix="formation-bench-api-") as tmp:
        node = NodeProcess(Path(tmp))
        try:
            node.start()
            get, write = trio.run(bench, node, args.clients, args.seconds)
        except RuntimeError as exc:
            print(f"bench/api.py: {exc}", file=sys.stderr)
            return 1
        finally:
            stop_s = node.stop()
    cost = verify_cost()
    g, w = get.summary(cost["get"]), write.summary(cost["write"])
    result = {
        "clients": args.clients, "seconds": args.seconds, "get": g, "write": w,
        "verify_us_get": round(cost["get"] * 1e6, 1), "verify_us_write": round(cost["write"] * 1e6, 1),
        "verify_share_get": g["verify_share"], "verify_share_write": w["verify_share"],
        "cpus": os.cpu_count(), "loadavg_before": load_before, "node_stop_s": round(stop_s, 2),
    }
    if not args.json:
        head = (f"{'phase':<6} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} "
                f"{'node cpu s':>10} {'node ms/req':>11} {'node cores':>10} {'client cores':>12} "
                f"{'verify share':>12}")
        print(head)
        for name, s in (("get", g), ("write", w)):
            share = "-" if s["verify_share"] is None else f"{s['verify_share']:.1%}"
            per_req = "-" if s["node_cpu_per_request_ms"] is None else f"{s['node_cpu_per_request_ms']:.2f}"
            print(f"{name:<6} {s['requests']:>8} {s['requests_per_s']:>8.1f} {s['p50_ms']:>8.2f} "
                  f"{s['p99_ms']:>8.2f} {s['errors']:>6} {s['node_cpu_s']:>10.2f} {per_req:>11} "
                  f"{s['node_cores_busy']:>10.2f} {s['client_cores_busy']:>12.2f} {share:>12}")
            if s["error_kinds"]:
                print(f"       errors: {s['error_kinds']}")
        print(f"auth.verify: {result['verify_us_get']} us (GET), {result['verify_us_write']} us (POST), "
              f"mean of {cost['n']}; {args.clients} clients, {args.seconds:g} s per phase, "
              f"{result['cpus']} CPUs, load average before {load_before[0]}; node stopped in "
              f"{result['node_stop_s']} s")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
