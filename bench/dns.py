"""The node's DNS server (formation/dns) under load from a second process on loopback.

    python bench/dns.py [--seconds 3] [--instances 10000] [--json]

Three server processes are started: the fog's DNS server (formation.dns.server.DnsServer, the
zone of `--instances` instances with 2 replicas each, per-client limits off), its upstream (a
dnspython authority for *.example.bench) and, as the ceiling, a bare dnspython echo server on
the same trio UDP loop (parse the query, make the response, render it: no lookup, no cache).
The fog's server and the echo server are pinned to one core, the load generator (this process)
to another when the machine has two; the upstream is left to the scheduler. The load keeps
`--window` queries in flight and measures each one's time.

  state              names in the state, a working set of 1,000 (the response cache warm)
  state_uncached     every name of the zone in turn (40,000: twice what the response cache
                     holds, so every query misses it)
  forwarded          1,000 names outside the fog, answered upstream once then from the cache
  forwarded_uncached a new outside name every query: each one goes upstream
  echo               the bare dnspython echo server

Each row: qps, p50_ms, p99_ms, lost (no answer within 1 s). The last line printed is one JSON
object; `qps` and `p99_ms` at its top level are the state names' (warm cache).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "dns":
    # A script run from bench/ has bench/ first on sys.path, so its `import dns` (dnspython, e.g.
    # through formation.dns or multiaddr) finds this file: hand over to dnspython, which then
    # stands in sys.modules for the rest of that process.
    import importlib

    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    del sys.modules["dns"]
    sys.modules["dns"] = importlib.import_module("dns")  # what the importer gets; the rest of
    # this file still runs, as an orphan module: definitions only

import argparse
import json
import os
import socket
import subprocess
import time

# run as a script, this file's directory comes first on sys.path, and this file would shadow
# dnspython's `dns` package: take it off
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench.common import printer, terminate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# ---- the server processes ---------------------------------------------------------------------

def _pin(core: int | None) -> None:
    if core is not None and hasattr(os, "sched_setaffinity") and core < os.cpu_count():
        os.sched_setaffinity(0, {core})


def bench_zone(instances: int):
    from formation.dns.names import Limits, build_zone

    owners = [f"0x{i:040x}" for i in range(1, 101)]
    nodes = [f"0x{0xfeed0000 + i:040x}" for i in range(50)]
    serving = {n: f"10.{200 + i // 256}.{i % 256}.0/24" for i, n in enumerate(nodes)}
    insts, statuses, ports = [], [], {}
    for i in range(instances):
        iid = f"{i:032x}"
        insts.append({"instance_id": iid, "owner": owners[i % len(owners)], "name": f"app{i}", "created_at": i})
        for k in (0, 1):
            n = (i + k * 7) % len(nodes)
            statuses.append({"instance_id": iid, "node": nodes[n], "state": "running",
                             "ip": f"10.{200 + n // 256}.{n % 256}.{2 + i % 250}"})
        ports[iid] = [8080]
    return build_zone(instances=insts, statuses=statuses, serving=serving, ports=ports,
                      limits=Limits(max_names=10_000_000, max_names_per_owner=10_000_000))


def serve_fog(port: int, upstream: str, instances: int, core: int | None) -> None:
    import trio

    from formation.dns.forward import Forwarder, parse_upstream
    from formation.dns.server import DnsServer, ServerLimits

    _pin(core)
    zone = bench_zone(instances)

    async def main():
        server = DnsServer(zone, forwarder=Forwarder([parse_upstream(upstream)], timeout=2.0, cache_entries=200_000),
                           limits=ServerLimits(client_qps=0, forwards=4096, forwards_per_source=4096))
        await server.open("127.0.0.1", port)
        print("ready", len(zone.names), flush=True)
        await server.serve()

    trio.run(main)


def serve_echo(port: int, core: int | None) -> None:
    import dns.message
    import trio

    _pin(core)

    async def main():
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        await sock.bind(("127.0.0.1", port))
        print("ready", flush=True)
        while True:
            data, addr = await sock.recvfrom(65535)
            q = dns.message.from_wire(data)
            await sock.sendto(dns.message.make_response(q).to_wire(), addr)

    trio.run(main)


def serve_upstream(port: int, core: int | None) -> None:
    """An authority for *.example.bench: one A record (TTL 1 h) for every name."""
    import dns.flags
    import dns.message
    import dns.rrset

    _pin(core)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    print("ready", flush=True)
    while True:
        data, addr = sock.recvfrom(65535)
        q = dns.message.from_wire(data)
        r = dns.message.make_response(q)
        r.flags |= dns.flags.AA
        r.answer.append(dns.rrset.from_text(q.question[0].name, 3600, "IN", "A", "192.0.2.1"))
        sock.sendto(r.to_wire(), addr)


# ---- the load ---------------------------------------------------------------------------------

def queries(names, rdtype: str = "A") -> list[bytes]:
    import dns.message

    return [dns.message.make_query(n, rdtype).to_wire() for n in names]


def load(port: int, packets: list[bytes], seconds: float, window: int) -> dict:
    """Queries in turn from `packets`, `window` in flight, for `seconds`: qps and latencies."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.settimeout(1.0)
    sent_at = [0.0] * 65536
    lat: list[float] = []
    nid, i, inflight, lost = 0, 0, 0, 0
    n = len(packets)
    clock = time.perf_counter
    start = clock()
    end = start + seconds
    while True:
        now = clock()
        while inflight < window and now < end:
            p = packets[i % n]
            i += 1
            nid = (nid + 1) & 0xFFFF
            sent_at[nid] = now
            sock.send(nid.to_bytes(2, "big") + p[2:])
            inflight += 1
        if inflight == 0:
            break
        try:
            data = sock.recv(65535)
        except TimeoutError:
            lost += inflight
            inflight = 0
            continue
        t = clock()
        lat.append(t - sent_at[int.from_bytes(data[:2], "big")])
        inflight -= 1
    elapsed = clock() - start
    sock.close()
    return {"latencies": lat, "elapsed": elapsed, "lost": lost}


def summary(runs: list[dict]) -> dict:
    lat = sorted(x for r in runs for x in r["latencies"])
    elapsed = sum(r["elapsed"] for r in runs)

    def pct(p):
        return round(lat[min(len(lat) - 1, int(len(lat) * p))] * 1000, 3) if lat else None

    return {"qps": round(len(lat) / elapsed), "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "lost": sum(r["lost"] for r in runs), "answered": len(lat)}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind(("127.0.0.1", 0))
        return u.getsockname()[1]


def _spawn(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        terminate(proc, 5)
        raise RuntimeError(f"{args[0]} did not start")
    return proc, line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="of load per row")
    ap.add_argument("--instances", type=int, default=10_000)
    ap.add_argument("--window", type=int, default=32, help="queries in flight")
    ap.add_argument("--rounds", type=int, default=3, help="turns the rows take (each seconds/rounds long)")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--serve", choices=("fog", "echo", "upstream"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--upstream", help=argparse.SUPPRESS)
    ap.add_argument("--core", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve == "fog":
        return serve_fog(args.port, args.upstream, args.instances, args.core)
    if args.serve == "echo":
        return serve_echo(args.port, args.core)
    if args.serve == "upstream":
        return serve_upstream(args.port, args.core)

    say = printer(args.json)
    cores = os.cpu_count() or 1
    server_core = "0" if cores >= 2 else None
    if cores >= 2:
        _pin(1)
    core_args = ["--core", server_core] if server_core is not None else []
    procs = []
    try:
        up_port, fog_port, echo_port = _free_port(), _free_port(), _free_port()
        procs.append(_spawn("--serve", "upstream", "--port", str(up_port))[0])  # not on the server's core
        say(f"building a zone of {args.instances} instances ...")
        fog, ready = _spawn("--serve", "fog", "--port", str(fog_port), "--upstream", f"127.0.0.1:{up_port}",
                            "--instances", str(args.instances), *core_args)
        procs.append(fog)
        zone_names = int(ready.split()[1])
        procs.append(_spawn("--serve", "echo", "--port", str(echo_port), *core_args)[0])

        from formation.dns.names import owner_label
        from formation.dns.server import ServerLimits

        n = args.instances
        working = [f"{i:032x}.fog" if i % 2 else f"app{i}.{owner_label(f'0x{1 + i % 100:040x}')}.fog"
                   for i in range(0, min(n, 1000))]
        everything = [f"{i:032x}.fog" for i in range(n)] + [f"app{i}.{owner_label(f'0x{1 + i % 100:040x}')}.fog"
                                                           for i in range(n)]
        if len(everything) <= ServerLimits().cache_entries * 1.5:  # the replicas' names too
            everything += [f"{owner_label(f'0x{0xfeed0000 + (i + k * 7) % 50:040x}')}.{i:032x}.fog"
                           for i in range(n) for k in (0, 1)]
        outside = [f"w{i}.example.bench" for i in range(1000)]
        fresh = [f"f{i}.example.bench" for i in range(int(args.seconds * 20_000))]
        rows = {"state": (fog_port, queries(working)), "state_uncached": (fog_port, queries(everything)),
                "forwarded": (fog_port, queries(outside)),
                "forwarded_uncached": (fog_port, queries(fresh)),
                "echo": (echo_port, queries(working))}
        for row, (port, packets) in rows.items():  # warm up (and fill the caches)
            load(port, packets[:200], 0.3, args.window)
            if row == "forwarded":
                load(port, packets, 1.0, args.window)  # every name once upstream
        # the rows take turns, so that a machine busy with something else weighs on all alike
        runs: dict[str, list] = {row: [] for row in rows}
        offsets = dict.fromkeys(rows, 200)  # past the warm-up's names
        for _ in range(args.rounds):
            for row, (port, packets) in rows.items():
                if row in ("state_uncached", "forwarded_uncached"):  # on from where the last turn ended
                    k = offsets[row] % len(packets)
                    packets = packets[k:] + packets[:k]
                run = load(port, packets, args.seconds / args.rounds, args.window)
                offsets[row] += len(run["latencies"]) + run["lost"]
                runs[row].append(run)
        results = {row: summary(r) for row, r in runs.items()}
        for row, r in results.items():
            say(f"  {row:<20} {r['qps']:>8} qps  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  lost {r['lost']}")
    finally:
        for p in procs:
            terminate(p, 5)
    say(f"\n{'row':<20} {'qps':>8} {'p50 ms':>8} {'p99 ms':>8} {'lost':>6}")
    for row, r in results.items():
        say(f"{row:<20} {r['qps']:>8} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['lost']:>6}")
    print(json.dumps({"bench": "dns", "qps": results["state"]["qps"], "p99_ms": results["state"]["p99_ms"],
                      "forwarded_qps": results["forwarded"]["qps"], "forwarded_p99_ms": results["forwarded"]["p99_ms"],
                      "echo_qps": results["echo"]["qps"], "zone_names": zone_names, "cores": cores,
                      "window": args.window, "seconds": args.seconds, "rounds": args.rounds, "results": results}))


if __name__ == "__main__":
    main()
