"""The soak (issue 13, "Budgets and bounds"): a real fog under honest load and three kinds of
abuse at once, for a bounded time, on 127.0.0.1 only. Shared by tests/integration/test_soak.py
(about a minute) and bench/soak.py (minutes); docs/soak.md says what it shows.

    result = trio.run(run_soak, SoakConfig(seconds=60), Path("/tmp/soak"))

What runs (every process started here is stopped when it ends, failing or not):
- a DevFog of `nodes` real `form node` processes (formation/devfog.py; VMs off);
- `clients` signed clients (a key each), each on one node's HTTP API, writing every
  `write_interval` seconds: model and DNS record creates (a few each, within the quotas) and
  updates of them. Each update writes the client's next sequence number into the record
  (a model's description, a DNS record's ttl), so "the latest acknowledged value, or a later
  one" is a comparison. Every 2xx is kept in the ledger;
- a hostile libp2p peer, in waves, each with a fresh identity (it is banned at the end of
  each): a stranger to the fog (no membership) connected to every node. It floods gossip with
  valid ops of fresh user keys (sybils) published under fresh peer ids, ops whose deps are
  invented (held in the nodes' pending buffers until their bound), pushes both over sync
  sessions, then sync sessions of forged ops, garbage gossip frames and ops with broken
  signatures: each node must ban it;
- a hostile tenant: POST /pack/build with archive bombs (tests/pack/test_archive_bounds.py's),
  to a node whose build service is real (a `form node` cannot build with VMs off: DevFog's
  nodes answer 503 vm_disabled before they look at the archive, so a separate process runs
  tests/api/conftest.py's vm_node: the real API, BuildService and context checks, with a
  builder that only pretends to build) and to the fog's nodes; optionally big uploads;
- a sampler process (its own interpreter, so the driver's load does not time it): every
  `sample_interval` GET /health on every node with its latency, and each node's VmRSS.

Afterwards: the load stops, the fog is waited for (same state hash and heads everywhere; the
attacker's forged ops may stay pending), and every acknowledged write is read back from every
node. `python -m tests.soak sample|build-node ...` are the helper processes.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgpack
import trio

from formation.client import ApiError, AsyncClient, sign_headers
from formation.crdt.hlc import from_ms
from formation.crdt.intents import canonical_message
from formation.crdt.keys import PrivateKey, parse_signature, sha256
from formation.devfog import DevFog, process_rss_kb

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SoakConfig:
    seconds: float = 60.0  # of load
    nodes: int = 3
    clients: int = 20
    write_interval: float = 1.0  # seconds between two writes of one client
    models_per_client: int = 8  # creates, then only updates (the quota is 128)
    dns_per_client: int = 2
    attack: bool = True
    wave_seconds: float = 8.0  # of flooding per attacker identity, before it gets itself banned
    sybils_per_tick: int = 20  # valid creates of fresh user keys, per 0.5 s
    forged_per_tick: int = 10  # ops with invented deps, per 0.5 s
    tenant: bool = True
    tenant_interval: float = 1.5  # seconds between two hostile uploads
    big_upload_mb: int = 0  # > 0: also upload a context this big (random) to a fog node...
    big_upload_every: float = 20.0  # ... this often
    sample_interval: float = 0.5
    health_timeout: float = 10.0
    baseline_seconds: float = 3.0  # samples before the load starts
    settle_seconds: float = 5.0  # after verification, before the "after" RSS
    converge_timeout: float = 180.0


@dataclass
class SoakResult:
    config: dict
    nodes: int
    load_seconds: float = 0.0
    writes_acked: int = 0
    writes_refused: dict = field(default_factory=dict)  # "status error" -> count (4xx)
    writes_failed: dict = field(default_factory=dict)  # exception/5xx -> count
    records: int = 0
    missing: int = 0  # (record, node) pairs without the acked value or a later one
    missing_examples: list = field(default_factory=list)
    converge_seconds: float | None = None
    pending_after: list = field(default_factory=list)  # per node, ops still pending
    ops_after: list = field(default_factory=list)
    rss_kb: dict = field(default_factory=dict)  # node -> {before, peak, after}
    health: dict = field(default_factory=dict)  # all fog nodes: n, p50_ms, p99_ms, max_ms, failed
    health_per_node: dict = field(default_factory=dict)
    attacker: dict = field(default_factory=dict)
    archives: list = field(default_factory=list)  # one row per hostile upload
    archives_refused: int = 0  # 4xx from the build node
    archives_accepted: int = 0  # 2xx from anyone: a bomb taken
    nodes_running: list = field(default_factory=list)
    honest_bans: list = field(default_factory=list)  # log lines of honest nodes banning each other
    build_node: dict = field(default_factory=dict)  # its rss and health, like a node's

    def as_dict(self) -> dict:
        return asdict(self)


# ---- honest clients ---------------------------------------------------------------------------


@dataclass
class Ledger:
    acked: dict = field(default_factory=dict)  # (kind, id) -> {"seq", "node", "client"}
    writes: int = 0
    refused: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)


def _model_path(rid: str) -> str:
    return f"/v1/models/{rid}"


def _dns_path(rid: str) -> str:
    return f"/v1/dns/{rid}/get"


def _seq_of(kind: str, value: dict) -> int:
    if kind == "model":
        m = re.fullmatch(r"seq (\d+)", value.get("description", ""))
        return int(m.group(1)) if m else -1
    return int(value.get("ttl", 0)) - 100


async def honest_client(i: int, url: str, node: int, cfg: SoakConfig, stop_at: float,
                        ledger: Ledger) -> None:
    rng = random.Random(i)
    key = PrivateKey(os.urandom(32))
    mine: list[tuple[str, str]] = []
    counts = Counter()
    seq = 0
    async with AsyncClient(url, key, timeout=30.0) as c:
        await trio.sleep(rng.uniform(0, cfg.write_interval))
        while trio.current_time() < stop_at:
            t0 = trio.current_time()
            seq += 1
            if counts["model"] < cfg.models_per_client and (not mine or rng.random() < 0.3):
                kind, action = "model", "create"
            elif counts["dns"] < cfg.dns_per_client and rng.random() < 0.3:
                kind, action = "dns", "create"
            else:
                kind, rid = rng.choice(mine)
                action = "update"
            try:
                if action == "create" and kind == "model":
                    res = await c.post("/v1/models", {"name": f"soak-{i}-{seq}", "description": f"seq {seq}"})
                    rid = res["id"]
                    mine.append((kind, rid))
                    counts[kind] += 1
                elif action == "create":
                    res = await c.post("/v1/dns/create", {"domain": f"c{i}-{seq}.soak.fog", "record_type": "A",
                                                          "targets": [f"10.0.{i}.{seq % 250 + 1}"], "ttl": 100 + seq})
                    rid = res["id"]
                    mine.append((kind, rid))
                    counts[kind] += 1
                elif kind == "model":
                    await c.put(f"/v1/models/{rid}", {"description": f"seq {seq}"})
                else:
                    await c.post(f"/v1/dns/{rid}/update", {"ttl": 100 + seq})
                ledger.acked[(kind, rid)] = {"seq": seq, "node": node, "client": i}
                ledger.writes += 1
            except ApiError as exc:
                bucket = ledger.refused if 400 <= exc.status < 500 else ledger.failed
                bucket[f"{exc.status} {exc.error}"] += 1
            except (httpx.HTTPError, OSError) as exc:
                ledger.failed[type(exc).__name__] += 1
            await trio.sleep(max(0.0, cfg.write_interval - (trio.current_time() - t0)))


async def verify(urls: list[str], ledger: Ledger) -> tuple[int, list]:
    """(missing count, examples): a (record, node) is missing unless the node shows the acked
    sequence number or a later one."""
    missing: list = []
    limiter = trio.CapacityLimiter(16)

    async def check(http: httpx.AsyncClient, j: int, kind: str, rid: str, want: int) -> None:
        path = _model_path(rid) if kind == "model" else _dns_path(rid)
        async with limiter:
            for attempt in range(3):
                try:
                    r = await http.get(path)
                    break
                except httpx.HTTPError:
                    if attempt == 2:
                        raise
                    await trio.sleep(1)
        got = _seq_of(kind, r.json()) if r.status_code == 200 else None
        if got is None or got < want:
            missing.append({"node": j, "kind": kind, "id": rid, "acked_seq": want, "seen_seq": got,
                            "status": r.status_code})

    clients = [httpx.AsyncClient(base_url=u, timeout=30.0) for u in urls]
    try:
        async with trio.open_nursery() as nursery:
            for (kind, rid), entry in ledger.acked.items():
                for j, http in enumerate(clients):
                    nursery.start_soon(check, http, j, kind, rid, entry["seq"])
    finally:
        for http in clients:
            await http.aclose()
    return len(missing), missing[:10]


# ---- the hostile peer --------------------------------------------------------------------------


@dataclass
class AttackStats:
    waves: int = 0
    attacker_ids: list = field(default_factory=list)
    sybil_ops: int = 0  # valid creates of fresh user keys, gossiped under fresh peer ids
    fresh_peer_ids: int = 0
    forged_dep_ops: int = 0  # ops with invented deps (gossip and sync)
    sync_sessions: int = 0  # pushed sessions that ran
    sync_refused: int = 0  # pushed sessions the node would not run (reset, budget, banned)
    junk_sync_sessions: int = 0
    garbage_frames: int = 0
    bad_signature_ops: int = 0
    dropped_within_s: list = field(default_factory=list)  # per wave: seconds until every node cut it off
    not_dropped: int = 0  # waves after which some node still talked to it
    errors: Counter = field(default_factory=Counter)


def _user_create(now_s: int) -> tuple[str, tuple[str, bytes, bytes]]:
    """A fresh user's signed model create: (record id, (message, body, signature))."""
    user = PrivateKey(os.urandom(32))
    body = json.dumps({"name": f"sybil-{os.urandom(4).hex()}"}).encode()
    message = canonical_message("POST", "/v1/models", now_s, body)
    sig = user.personal_sign(message.encode())
    return sha256(parse_signature(sig)).hex()[:32], (message, body, sig)


def _sybil_wires(signer: PrivateKey, n: int, forged_deps: bool) -> list[bytes]:
    from tests.p2p.attacker import forge_wire

    now_ms = int(time.time() * 1000)
    wires = []
    for _ in range(n):
        rid, req = _user_create(now_ms // 1000)
        deps = [os.urandom(32)] if forged_deps else []
        wires.append(forge_wire(signer, "model", rid, deps=deps, hlc=from_ms(now_ms), request=req))
    return wires


def _broken_signature(wire: bytes) -> bytes:
    body, sig = msgpack.unpackb(wire)
    return msgpack.packb([body, sig[:10] + bytes([sig[10] ^ 0x55]) + sig[11:]], use_bin_type=True)


@contextlib.asynccontextmanager
async def open_fog_attacker(multiaddrs: list[str], peer_ids: list[str], timeout: float = 30.0):
    """tests/p2p/attacker.py's Attacker, joined to a fog of other processes: it dials the nodes'
    multiaddrs and waits until it is connected to each and has them in its gossip mesh (what
    open_attacker checks from both sides, it can check from its own only)."""
    from formation.crdt.async_store import AsyncStore
    from formation.crdt.store import Store
    from formation.p2p.gossip import TOPIC
    from formation.p2p.service import P2PService, P2PSettings
    from tests.p2p.attacker import Attacker
    from tests.support import Node

    node = Node(Store(), secret=os.urandom(32))
    svc = P2PService(node.key, AsyncStore(node.store), P2PSettings(
        listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=list(multiaddrs), sync_interval=600))
    ids = set(peer_ids)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.run)
            try:
                with trio.fail_after(timeout):
                    while not (ids <= set(svc.connected())
                               and ids <= set(map(str, svc.pubsub.peer_topics.get(TOPIC, ())))
                               and ids <= set(map(str, svc.router.mesh.get(TOPIC, ())))):
                        await trio.sleep(0.05)
                yield Attacker(svc, node)
            finally:
                nursery.cancel_scope.cancel()
    finally:
        node.store.close()


async def attack(multiaddrs: list[str], peer_ids: list[str], cfg: SoakConfig, stop_at: float,
                 stats: AttackStats) -> None:
    while trio.current_time() < stop_at - 5:
        try:
            await attack_wave(multiaddrs, peer_ids, cfg, stop_at, stats)
        except Exception as exc:  # noqa: BLE001 - a wave that could not join: counted, next one
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            stats.errors[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
            await trio.sleep(1)


async def attack_wave(multiaddrs, peer_ids, cfg: SoakConfig, stop_at: float, stats: AttackStats) -> None:
    async with open_fog_attacker(multiaddrs, peer_ids) as att:
        stats.waves += 1
        stats.attacker_ids.append(att.peer_id)
        flood_until = min(stop_at - 3, trio.current_time() + cfg.wave_seconds)
        tick = 0
        while trio.current_time() < flood_until:
            tick += 1
            sybils = await trio.to_thread.run_sync(_sybil_wires, att.key, cfg.sybils_per_tick, False)
            await att.gossip_as_fresh_peer(sybils)
            stats.sybil_ops += len(sybils)
            stats.fresh_peer_ids += 1
            forged = await trio.to_thread.run_sync(_sybil_wires, att.key, cfg.forged_per_tick, True)
            await att.gossip(forged)
            stats.forged_dep_ops += len(forged)
            if tick % 4 == 0:  # every 2 s: a sync session pushing more of both to one node
                more = await trio.to_thread.run_sync(_sybil_wires, att.key, cfg.forged_per_tick, True)
                await _push(att, random.choice(peer_ids), more + sybils, stats)
                stats.forged_dep_ops += len(more)
            await trio.sleep(0.5)
        # junk over sync (strikes), then garbage and broken signatures over gossip (a ban at once)
        junk = [_broken_signature(w) for w in _sybil_wires(att.key, 3, False)]
        for victim in peer_ids:
            if await _push(att, victim, junk, stats, count=False):
                stats.junk_sync_sessions += 1
        await att.gossip_raw(os.urandom(300))
        stats.garbage_frames += 1
        await att.gossip(junk)
        stats.bad_signature_ops += len(junk)
        t0 = trio.current_time()
        with trio.move_on_after(15):
            while set(peer_ids) & set(att.svc.connected()):
                await trio.sleep(0.1)
            stats.dropped_within_s.append(round(trio.current_time() - t0, 2))
        if set(peer_ids) & set(att.svc.connected()):
            stats.not_dropped += 1


async def _push(att, victim: str, wires: list[bytes], stats: AttackStats, *, count: bool = True) -> bool:
    try:
        with trio.fail_after(25):
            await att.push_sync(victim, wires, tries=5)
    except (AssertionError, trio.TooSlowError):
        stats.sync_refused += 1
        return False
    if count:
        stats.sync_sessions += 1
    return True


def bans_in_logs(fog: DevFog) -> tuple[dict, list]:
    """({attacker peer id: [nodes that logged banning it]}, lines where a node banned an honest
    peer), from the nodes' logs."""
    honest = {n.peer_id for n in fog.nodes}
    banned: dict[str, list[int]] = {}
    honest_bans = []
    for n in fog.nodes:
        try:
            text = n.log_path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            m = re.search(r"banning peer (\S+?):", line)
            if m:
                peer = m.group(1)
                if peer in honest:
                    honest_bans.append(f"node {n.index}: {line.strip()}")
                banned.setdefault(peer, []).append(n.index)
    return banned, honest_bans


# ---- the hostile tenant ------------------------------------------------------------------------

FORMFILE = "NAME web\nVCPU 2\nMEMORY 1024\nCOPY app.txt /srv/app.txt\nRUN echo hello\n"


def hostile_archives() -> dict[str, bytes]:
    """Archive bombs from tests/pack/test_archive_bounds.py, each refused by a limit or a rule."""
    from tests.pack.test_archive_bounds import END, gz, header, member, pad, pax

    return {
        "pax_header_100mb": gz(header("././@PaxHeader", 100 * MiB, b"x"), (b"\0", 100 * MiB), END),
        "folders_100k": gz(b"".join(header(f"d{i:06d}/", 0, b"5") for i in range(100_000)), END),
        "entries_100k": gz(b"".join(header(f"f{i:06d}") for i in range(100_000)), END),
        "depth_40": gz(pax({"path": "a/" * 40 + "f"}), member("placeholder", b"x"), END),
        "ratio_60mb_zeros": gz(header("zeros", 60 * MiB), (b"\0", 60 * MiB), pad(60 * MiB), END),
        "declared_1tb": gz(header("big", 1 << 40), (b"\0", MiB)),
        "symlink_out": gz(member("l", kind=b"2", link="../../etc"), END),
        "symlink_chain_out": gz(member("s", kind=b"2", link="."), member("l", kind=b"2", link="s/../etc"), END),
        "hardlink": gz(member("h", kind=b"1", link="../../etc/passwd"), END),
        "absolute_path": gz(member("/etc/passwd", b"x"), END),
        "device": gz(member("dev", kind=b"3"), END),
        "not_a_tar": b"garbage" * 100,
    }


def _build_request(archive: bytes | None, raw_context: str | None = None) -> tuple[bytes, dict]:
    key = PrivateKey(os.urandom(32))  # a fresh tenant each time: a write signature is one use
    context = raw_context if raw_context is not None else base64.b64encode(archive).decode()
    body = json.dumps({"formfile": FORMFILE, "context": context}, separators=(",", ":")).encode()
    return body, {"Content-Type": "application/json", **sign_headers(key, "POST", "/v1/pack/build", body)}


async def upload(url: str, name: str, target: str, archive: bytes | None, rows: list,
                 raw_context: str | None = None) -> None:
    body, headers = await trio.to_thread.run_sync(_build_request, archive, raw_context)
    t0 = time.monotonic()
    row: dict[str, Any] = {"archive": name, "target": target, "bytes": len(body)}
    try:
        async with httpx.AsyncClient(base_url=url, timeout=120.0) as http:
            r = await http.post("/v1/pack/build", content=body, headers=headers)
        doc = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        row.update(status=r.status_code, error=doc.get("error"), limit=doc.get("limit"),
                   detail=(doc.get("detail") or "")[:160])
    except (httpx.HTTPError, OSError) as exc:
        row.update(status=None, error=type(exc).__name__)
    row["ms"] = round((time.monotonic() - t0) * 1000, 1)
    rows.append(row)


async def tenant(build_url: str | None, fog_urls: list[str], cfg: SoakConfig, stop_at: float,
                 rows: list, archives: dict[str, bytes]) -> None:
    names = list(archives)
    big_next = trio.current_time() + cfg.big_upload_every / 2
    k = 0
    while trio.current_time() < stop_at:
        name = names[k % len(names)]
        if build_url is not None:
            await upload(build_url, name, "build-node", archives[name], rows)
        if k % 3 == 0:  # the fog's nodes too (VMs off): refused before the archive is looked at
            j = (k // 3) % len(fog_urls)
            await upload(fog_urls[j], name, f"node-{j}", archives[name], rows)
        if cfg.big_upload_mb and trio.current_time() >= big_next:
            big_next += cfg.big_upload_every
            j = k % len(fog_urls)
            raw = base64.b64encode(os.urandom(cfg.big_upload_mb * MiB)).decode()
            await upload(fog_urls[j], f"random_{cfg.big_upload_mb}mb", f"node-{j}", None, rows, raw)
        k += 1
        await trio.sleep(cfg.tenant_interval)


# ---- helper processes --------------------------------------------------------------------------


async def _start_helper(args: list[str], log: Path):
    """A `python -m tests.soak ...` process; its first stdout line (JSON) says it is ready."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = await trio.lowlevel.open_process([sys.executable, "-m", "tests.soak", *args], cwd=str(ROOT), env=env,
                                            stdout=subprocess.PIPE, stderr=log.open("ab"),
                                            start_new_session=True)
    buf = b""
    with trio.fail_after(60):
        while b"\n" not in buf:
            chunk = await proc.stdout.receive_some(4096)
            if not chunk:
                raise RuntimeError(f"helper {args[0]} exited: {log.read_text()[-2000:]}")
            buf += chunk
    return proc, json.loads(buf.split(b"\n", 1)[0])


async def _stop_helper(proc) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with trio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    await proc.stdout.aclose()


_rss_kb = process_rss_kb


async def _sample_main(out: Path, interval: float, timeout: float, targets: list[str]) -> None:
    """Every `interval`: GET /health on every target (name=url=pid) and its VmRSS; one JSON line
    per probe. A probe still running at the next tick is not doubled."""
    parsed = [t.split("=", 2) for t in targets]
    busy: set[str] = set()
    with out.open("a") as f:
        async def probe(http: httpx.AsyncClient, name: str, pid: int) -> None:
            busy.add(name)
            t0, status = time.monotonic(), None
            try:
                status = (await http.get("/health")).status_code
            except (httpx.HTTPError, OSError) as exc:
                status = type(exc).__name__
            ms = (time.monotonic() - t0) * 1000
            f.write(json.dumps({"t": time.time(), "target": name, "ms": round(ms, 2), "status": status,
                                "rss_kb": _rss_kb(pid)}) + "\n")
            f.flush()
            busy.discard(name)

        clients = [httpx.AsyncClient(base_url=url, timeout=timeout) for _, url, _ in parsed]
        print(json.dumps({"ready": True}), flush=True)
        async with trio.open_nursery() as nursery:
            while True:
                for http, (name, _, pid) in zip(clients, parsed, strict=True):
                    if name not in busy:
                        nursery.start_soon(probe, http, name, int(pid))
                await trio.sleep(interval)


async def _build_node_main(base: Path) -> None:
    from tests.api.conftest import vm_node

    async with vm_node(base) as rt:
        print(json.dumps({"url": rt.base_url, "pid": os.getpid()}), flush=True)
        await trio.sleep_forever()


# ---- the soak ---------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))], 1)


def _latency(samples: list[dict]) -> dict:
    ms = [s["ms"] for s in samples]
    return {"n": len(ms), "p50_ms": _pct(ms, 0.5), "p99_ms": _pct(ms, 0.99),
            "max_ms": round(max(ms), 1) if ms else None, "failed": sum(1 for s in samples if s["status"] != 200)}


async def _converged(fog: DevFog, timeout: float) -> tuple[float, list[dict]]:
    """Seconds until the running nodes agree on state hash and heads (pending ops allowed: the
    attacker's forged ones wait for deps that never come, up to the buffer's time bound)."""
    t0 = trio.current_time()
    last: Any = None
    with trio.fail_after(timeout):
        while True:
            try:
                sts = [await trio.to_thread.run_sync(fog.status, i, 10.0) for i in fog.running()]
                views = {(s["state_hash"], tuple(s["heads"])) for s in sts}
                last = [(s["ops"], s["state_hash"][:12], s["pending"]) for s in sts]
                if len(views) == 1:
                    return trio.current_time() - t0, sts
            except Exception as exc:  # noqa: BLE001 - a status that timed out: ask again
                last = repr(exc)
            await trio.sleep(0.5)
    raise AssertionError(f"not converged: {last}")  # unreachable (fail_after raises)


async def run_soak(cfg: SoakConfig, base: Path, say=lambda *a: None) -> SoakResult:
    base.mkdir(parents=True, exist_ok=True)
    result = SoakResult(config=asdict(cfg), nodes=cfg.nodes)
    fog = DevFog(cfg.nodes, base / "fog")
    helpers = []
    try:
        say(f"starting {cfg.nodes} nodes in {base / 'fog'} ...")
        await trio.to_thread.run_sync(fog.start)
        await trio.to_thread.run_sync(lambda: fog.wait_ready(120, None, cfg.nodes - 1))
        urls = [f"http://127.0.0.1:{n.api_port}" for n in fog.nodes]
        targets = [f"node-{n.index}={u}={n.pid}" for n, u in zip(fog.nodes, urls, strict=True)]
        build_url = None
        if cfg.tenant:
            proc, ready = await _start_helper(["build-node", str(base / "build-node")], base / "build-node.log")
            helpers.append(proc)
            build_url = ready["url"]
            targets.append(f"build-node={build_url}={ready['pid']}")
        samples_path = base / "samples.jsonl"
        samples_path.unlink(missing_ok=True)
        proc, _ = await _start_helper(["sample", str(samples_path), str(cfg.sample_interval),
                                       str(cfg.health_timeout), *targets], base / "sampler.log")
        helpers.append(proc)
        archives = await trio.to_thread.run_sync(hostile_archives) if cfg.tenant else {}
        await trio.sleep(cfg.baseline_seconds)
        load_start = time.time()

        ledger, attack_stats, rows = Ledger(), AttackStats(), []
        say(f"load for {cfg.seconds:.0f} s: {cfg.clients} clients"
            + (", a hostile peer" if cfg.attack else "") + (", a hostile tenant" if cfg.tenant else ""))
        t0 = trio.current_time()
        stop_at = t0 + cfg.seconds
        async with trio.open_nursery() as nursery:
            for i in range(cfg.clients):
                j = i % cfg.nodes
                nursery.start_soon(honest_client, i, urls[j], j, cfg, stop_at, ledger)
            if cfg.attack:
                nursery.start_soon(attack, [n.multiaddr for n in fog.nodes], [n.peer_id for n in fog.nodes],
                                   cfg, stop_at, attack_stats)
            if cfg.tenant:
                nursery.start_soon(tenant, build_url, urls, cfg, stop_at, rows, archives)
        result.load_seconds = round(trio.current_time() - t0, 1)
        load_end = time.time()
        say(f"load done in {result.load_seconds} s: {ledger.writes} writes acknowledged; waiting for the fog ...")

        result.converge_seconds, sts = await _converged(fog, cfg.converge_timeout)
        result.converge_seconds = round(result.converge_seconds, 1)
        result.pending_after = [s["pending"] for s in sts]
        result.ops_after = [s["ops"] for s in sts]
        result.missing, result.missing_examples = await verify(urls, ledger)
        await trio.sleep(cfg.settle_seconds)
        result.nodes_running = fog.running()
        after = {n.index: fog.rss_kb(n.index) for n in fog.nodes}

        result.writes_acked = ledger.writes
        result.writes_refused = dict(ledger.refused)
        result.writes_failed = dict(ledger.failed)
        result.records = len(ledger.acked)
        banned, result.honest_bans = await trio.to_thread.run_sync(bans_in_logs, fog)
        a = asdict(attack_stats)
        a["errors"] = dict(attack_stats.errors)
        a["banned_by"] = {pid[-8:]: sorted(set(banned.get(pid, []))) for pid in attack_stats.attacker_ids}
        a["bans"] = sum(len(set(banned.get(pid, []))) for pid in attack_stats.attacker_ids)
        a["attacker_ids"] = len(attack_stats.attacker_ids)
        result.attacker = a
        result.archives = rows
        result.archives_refused = sum(1 for r in rows if r["target"] == "build-node"
                                      and isinstance(r["status"], int) and 400 <= r["status"] < 500)
        result.archives_accepted = sum(1 for r in rows if isinstance(r["status"], int) and r["status"] < 300)
    finally:
        for proc in helpers:
            with trio.CancelScope(shield=True):
                await _stop_helper(proc)
        await trio.to_thread.run_sync(fog.close)

    samples = [json.loads(line) for line in samples_path.read_text().splitlines() if line.strip()]
    for name in [f"node-{n.index}" for n in fog.nodes] + (["build-node"] if cfg.tenant else []):
        mine = [s for s in samples if s["target"] == name]
        rss = [s["rss_kb"] for s in mine if s["rss_kb"]]
        before = [s["rss_kb"] for s in mine if s["t"] < load_start and s["rss_kb"]]
        during = [s for s in mine if load_start <= s["t"] <= load_end]
        entry = {"rss_kb": {"before": before[-1] if before else None, "peak": max(rss) if rss else None,
                            "after": None}, "health": _latency(during)}
        if name == "build-node":
            entry["rss_kb"]["after"] = rss[-1] if rss else None
            result.build_node = entry
        else:
            i = int(name.split("-")[1])
            entry["rss_kb"]["after"] = after.get(i)
            result.rss_kb[name] = entry["rss_kb"]
            result.health_per_node[name] = entry["health"]
    fog_during = [s for s in samples if s["target"].startswith("node-") and load_start <= s["t"] <= load_end]
    result.health = _latency(fog_during)
    return result


def table(r: SoakResult) -> str:
    """The result for people."""
    lines = [f"load {r.load_seconds} s on {r.nodes} nodes; converged {r.converge_seconds} s after",
             f"writes acknowledged {r.writes_acked} on {r.records} records; refused {r.writes_refused}; "
             f"failed {r.writes_failed}; missing afterwards {r.missing}",
             "", f"{'node':<11} {'rss before':>11} {'peak':>8} {'after':>8}   {'health p50':>10} {'p99':>8} "
             f"{'max':>8} {'failed':>6}"]
    rows = [(k, r.rss_kb[k], r.health_per_node[k]) for k in r.rss_kb]
    if r.build_node:
        rows.append(("build-node", r.build_node["rss_kb"], r.build_node["health"]))
    for name, rss, h in rows:
        mb = [f"{v / 1024:.0f} MB" if v else "-" for v in (rss["before"], rss["peak"], rss["after"])]
        lines.append(f"{name:<11} {mb[0]:>11} {mb[1]:>8} {mb[2]:>8}   {h['p50_ms']!s:>7} ms {h['p99_ms']!s:>5} ms "
                     f"{h['max_ms']!s:>5} ms {h['failed']:>6}")
    h = r.health
    lines.append(f"{'all nodes':<11} {'':>11} {'':>8} {'':>8}   {h['p50_ms']!s:>7} ms {h['p99_ms']!s:>5} ms "
                 f"{h['max_ms']!s:>5} ms {h['failed']:>6}")
    a = r.attacker
    if a:
        lines += ["", f"hostile peer: {a['waves']} identities, {a['sybil_ops']} sybil ops under {a['fresh_peer_ids']} "
                      f"fresh peer ids, {a['forged_dep_ops']} ops with forged deps, {a['sync_sessions']} sync pushes "
                      f"({a['sync_refused']} refused), {a['junk_sync_sessions']} junk sync sessions, "
                      f"{a['garbage_frames']} garbage frames, {a['bad_signature_ops']} bad signatures",
                  f"  banned {a['bans']} times (of {a['waves'] * r.nodes} identity x node); cut off within "
                  f"{a['dropped_within_s']} s; errors {a['errors']}"]
    if r.archives:
        by = Counter((x["target"] == "build-node", x["status"], x["error"]) for x in r.archives)
        lines += ["", f"hostile archives: {len(r.archives)} uploads, {r.archives_refused} refused 4xx by the "
                      f"build node, {r.archives_accepted} accepted"]
        lines += [f"  {'build node' if b else 'fog nodes':<10} {s} {e}: {n}" for (b, s, e), n in sorted(by.items(), key=str)]
    lines.append(f"pending afterwards {r.pending_after}, ops {r.ops_after}; honest bans {len(r.honest_bans)}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description="soak helper processes")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("out")
    s.add_argument("interval", type=float)
    s.add_argument("timeout", type=float)
    s.add_argument("targets", nargs="+", help="name=url=pid")
    b = sub.add_parser("build-node")
    b.add_argument("dir")
    args = ap.parse_args()
    with contextlib.suppress(KeyboardInterrupt):  # SIGTERM (the driver's stop) just ends it
        if args.cmd == "sample":
            trio.run(_sample_main, Path(args.out), args.interval, args.timeout, args.targets)
        else:
            trio.run(_build_node_main, Path(args.dir))


if __name__ == "__main__":
    main()

