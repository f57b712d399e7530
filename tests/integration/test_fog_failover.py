"""Failover in the fog, with real VMs, in network namespaces (tests/multihost.py): cut one host's
link, the others keep working; its replica moves only once the evidence says so; bring it back,
and tunnels and state recover with no manual step.

Three hosts — host 1 `form join --genesis`, hosts 2 and 3 by invite — with a 2 s heartbeat (a
node is stale after 3 heartbeats, 6 s). Hosts 1 and 2 run VMs, host 3 none. One instance with one
replica (busybox httpd, EXPOSEd; no build step, so each host builds its image in seconds)
lands, by rendezvous, on one of the VM hosts: X; the other is Y.

- cut(X): for the first 2 s (less than the staleness window) Y does nothing — the evidence (X's
  heartbeat gone stale on Y) is not there yet; then Y builds and boots the replica and reports it
  running; host 3 reaches it over formnet (HTTP on its address, and a hire through its node).
  X, alone, sees itself as the only live node and keeps its own replica: its VM never stops.
- heal(X): the overlay tunnels come back (pings), X learns what was written meanwhile,
  placement returns to X; Y stops its replica only once it sees X's reported running AND
  answering over formnet, says so ("placed on X now"), and keeps its disk. Then exactly one
  replica runs, on X, and it stays so.

Two variants: a cut shorter than TCP's retransmissions (the libp2p connections survive it), and
one that outlasts them (`cut-past-tcp-timeout`: the connections are aborted at both ends during
the cut, as TCP would after ~15 min): every node's `seen` drops the other side, the nodes must
redial after the heal, and X, back, is listed by nobody for a heartbeat or so (placement counts it
out meanwhile: it must not hand its replica over on that, placement.unvouched).
"""

from __future__ import annotations

import ipaddress
import os
import threading
import time
from pathlib import Path

import pytest

from formation.vm.driver import QemuDriver
from tests.integration.test_fog_vms import (
    AGENT_PORT,
    HIRE_PATH,
    NsClient,
    agent_formfile,
    explain,
    invite,
    pytestmark,  # noqa: F401 - the same marks: slow, qemu, root, wireguard-go
    running_status,
    start,
)
from tests.integration.test_formnet import status, wait
from tests.multihost import Host, cut, heal, hosts
from tests.vm_support import CACHE, boot_kit, debian_base

HEARTBEAT = 2  # seconds; a node is stale after 3 of them
STALE = 3 * HEARTBEAT
QUIET = 2.0  # seconds after the cut in which Y must not have moved (< STALE)


def own_cache(tmp_path: Path, index: int) -> Path:
    """A host's own image cache (its builds land there, as on separate machines: Y builds the
    image itself) with the test cache's boot kit and Debian base, made beforehand."""
    cache = tmp_path / f"cache{index}"
    cache.mkdir()
    for name in ("kit", "base"):
        (cache / name).symlink_to(CACHE / name)
    return cache


def lose_connections(x: Host, others: list[Host]) -> None:
    """What a cut that outlasts TCP's retransmissions (~15 min on Linux) does to the nodes'
    libp2p connections across it: each one is aborted, at both ends (formnet is UDP: no state)."""
    for o in others:
        for me, peer in ((x, o), (o, x)):
            done = me.run("ss", "-K", "-tn", "dst", peer.ip)
            assert done.returncode == 0, f"ss -K on {me.name}: {done.stderr}"


@pytest.fixture
def images():
    boot_kit()  # made (or found) outside the namespaces, which have no route to the mirror
    debian_base()


class VmWatch:
    """Samples, every 0.25 s, whether the instance's QEMU runs on each VM host (its pid file and
    /proc, as the node's driver reads them) and keeps the transitions: a VM that stops for a
    moment between two API looks is seen here."""

    def __init__(self, data: dict[int, Path], iid: str):
        self.drivers = {i: QemuDriver(d / "vms", "tcg") for i, d in data.items()}
        self.iid = iid
        self.t0 = time.monotonic()
        self.alive: dict[int, bool] = {}  # as of the last sample (the first one is no change)
        self.changes: list[tuple[float, int, bool]] = []  # (seconds since start, host index, alive)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for i, driver in self.drivers.items():
                now = driver.is_alive(self.iid)
                if i in self.alive and self.alive[i] != now:
                    self.changes.append((time.monotonic() - self.t0, i, now))
                self.alive[i] = now
            self._stop.wait(0.25)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def __str__(self) -> str:
        return f"VM alive now: {self.alive}; transitions (s, host, alive): " + ", ".join(
            f"({t:.1f}, {i + 1}, {a})" for t, i, a in self.changes)


def _placed_on(client, iid: str, node: str) -> bool:
    """Whether the node behind `client` knows the instance and places it on `node`."""
    try:
        return client.ok("GET", f"/v1/instance/{iid}/get")["placement"]["nodes"] == [node]
    except AssertionError:  # not there yet (404)
        return False


@pytest.mark.parametrize("long_cut", [False, True], ids=["cut", "cut-past-tcp-timeout"])
def test_a_cut_host_s_replica_moves_on_evidence_and_comes_back_without_a_manual_step(images, tmp_path, long_cut):
    """`long_cut`: the libp2p connections across the cut are lost meanwhile (lose_connections),
    so each node's `seen` drops the other side and the nodes redial after the heal."""
    timings: dict[str, float] = {}
    notes: list[str] = []
    with hosts(3, internet=True) as hs:
        data = [tmp_path / f"node{h.index}" for h in hs]
        iid = None
        watch: VmWatch | None = None
        looks: dict[str, object] = {}  # the last answer of each kind of look, for a failure

        def extra() -> list[str]:
            out = [f"timings: {timings}", *notes, str(watch or "no VM watch yet")]
            out += [f"last {what}: {got}" for what, got in looks.items()]
            for d in data[:2]:
                if iid:
                    console = d / "vms" / f"vm-{iid}" / "console.log"
                    text = console.read_text(errors="replace")[-3000:] if console.exists() else "(none)"
                    out.append(f"--- VM console on {d.name} ({console})\n{text}")
            return out

        try:
            # -- the fog: hosts 1 and 2 run VMs, host 3 none; a 2 s heartbeat everywhere
            procs = []
            t0 = time.monotonic()
            for h in hs:
                cfg = tmp_path / f"host{h.index}.toml"
                cfg.write_text(f"[node]\nheartbeat_seconds = {HEARTBEAT}\n"
                               f'[vm]\ncache_dir = "{own_cache(tmp_path, h.index)}"\nbuild_timeout_seconds = 900\n')
                vms = "true" if h.index < 3 else "false"
                target = ["--genesis"] if h.index == 1 else [invite(data[0])]
                procs.append(start(h, data[h.index - 1], "join", *target, "--vms", vms, "--config", str(cfg)))
                if h.index == 1:
                    wait("the genesis node",
                         lambda: (running_status(procs, data)[0] or {}).get("fog", {}).get("admitted"), 120)

            def meshed():
                sts = running_status(procs, data)
                if not all(s and s["mesh"]["enabled"] and s["mesh"]["peers"] == 2 for s in sts):
                    return None
                return sts if sts[0]["vms"]["enabled"] and sts[1]["vms"]["enabled"] else None

            sts = wait("3 nodes meshed, VMs up on hosts 1 and 2", meshed, 180)
            timings["join --genesis to a 3-node mesh"] = time.monotonic() - t0
            overlay = [s["mesh"]["overlay_ip"] for s in sts]
            address = [s["address"].lower() for s in sts]
            assert not sts[2]["vms"]["enabled"], sts[2]["vms"]
            subnets = [sts[i]["vms"]["subnet"] for i in (0, 1)]
            for s in subnets:  # the harness takes its underlay from the fog's VM space too
                assert not ipaddress.ip_network(s).overlaps(hs.subnet), f"VM subnet {s} is the underlay's: run again"

            def pinged_all(within: float) -> None:
                for h in hs:
                    for j, addr in enumerate(overlay):
                        if j != h.index - 1:
                            wait(f"host {h.index} -> host {j + 1}'s overlay {addr}",
                                 lambda h=h, addr=addr: h.ping(addr, 1.0), within)

            pinged_all(30)

            # -- the instance: one replica, an EXPOSEd port, no build step
            user = os.urandom(32).hex()
            clients = [NsClient(h, user) for h in hs]
            token = os.urandom(6).hex()
            formfile = agent_formfile(token, hs.internet.url, hs.internet.url)
            t0 = time.monotonic()
            bid = clients[0].ok("POST", "/v1/pack/build", {"formfile": formfile})["build_id"]

            def built():
                b = clients[0].ok("GET", f"/v1/pack/builds/{bid}")
                assert b["state"] != "failed", b
                return b["state"] == "done"

            wait("the image build on host 1", built, 900)
            timings["image build on host 1"] = time.monotonic() - t0
            iid = clients[0].ok("POST", "/v1/instance/create", {
                "name": "fog-failover", "build_id": bid, "formfile": formfile, "replicas": 1,
                "resources": {"vcpus": 1, "memory_mb": 512, "disk_gb": 5}})["id"]
            aid = clients[0].ok("POST", "/v1/agents", {"name": "fog-failover", "build_id": bid,
                                                       "port": AGENT_PORT, "path": HIRE_PATH})["id"]
            vm_data = {0: data[0], 1: data[1]}

            def get(i: int) -> dict:
                """The instance as host i's node sees it: its replicas' reports and placement."""
                got = clients[i].ok("GET", f"/v1/instance/{iid}/get")
                looks[f"instance on host {i + 1}"] = {"at": time.strftime("%T"), "placement": got["placement"], "replicas": [
                    {k: r.get(k) for k in ("node", "state", "reason", "ip", "node_alive")}
                    for r in got["replicas_status"]]}
                return got

            def report(i: int, node: int) -> dict | None:
                """Host `node`'s report as host i sees it."""
                return next((r for r in get(i)["replicas_status"] if r["node"].lower() == address[node]), None)

            def running_on(i: int, node: int) -> dict | None:
                r = report(i, node)
                return r if r and r["state"] == "running" else None

            t0 = time.monotonic()

            def placed_and_running():
                for node in (0, 1):
                    if running_on(0, node):
                        return node, report(0, node)
                return None

            xi, rep_x = wait("the replica to run on a VM host", placed_and_running, 900)
            yi = 1 - xi
            timings["instance create -> replica running"] = time.monotonic() - t0
            X, Y, Z = hs[xi], hs[yi], hs[2]
            notes.append(f"X = host {xi + 1} ({address[xi]}), Y = host {yi + 1} ({address[yi]})")
            watch = VmWatch(vm_data, iid)
            peer = [s["peer_id"] for s in sts]
            x_ip = rep_x["ip"]
            assert ipaddress.ip_address(x_ip) in ipaddress.ip_network(subnets[xi]), (x_ip, subnets)
            page = f"fog-agent {token}\n"

            # (1) X runs it, Y has none; every node places it on X (host 3 may hear of the
            # instance a moment after X runs it: a gossip message lost is brought by sync)
            for i in range(3):
                wait(f"host {i + 1} to place it on X", lambda i=i: _placed_on(clients[i], iid, address[xi]), 30)
                assert get(i)["placement"]["nodes"] == [address[xi]], looks
            assert wait("X's replica over formnet from host 3",
                        lambda: Z.http_get(f"http://{x_ip}:{AGENT_PORT}/", 5.0), 120) == page
            assert watch.drivers[xi].is_alive(iid)
            assert not (data[yi] / "vms" / f"vm-{iid}").exists(), "Y has a VM for it before any cut"
            assert report(yi, yi) is None

            # (2) cut X
            cut(X)
            t_cut = time.monotonic()
            while time.monotonic() - t_cut < QUIET:  # no evidence yet: nothing moves
                assert get(yi)["placement"]["nodes"] == [address[xi]], \
                    f"Y moved {time.monotonic() - t_cut:.1f} s after the cut: {looks}"
                assert report(yi, yi) is None and not (data[yi] / "vms" / f"vm-{iid}").exists(), looks
                time.sleep(0.2)
            assert time.monotonic() - t_cut < STALE, "the quiet-window checks took too long"

            def placed_on_y():
                return get(yi)["placement"]["nodes"] == [address[yi]]

            wait("Y to place it on itself (X's heartbeat stale)", placed_on_y, 60)
            timings["cut -> Y places it on itself"] = time.monotonic() - t_cut
            rep_y = wait("Y's replica to run", lambda: running_on(yi, yi), 900)
            timings["cut -> Y's replica running"] = time.monotonic() - t_cut
            y_ip = rep_y["ip"]
            assert ipaddress.ip_address(y_ip) in ipaddress.ip_network(subnets[yi]), (y_ip, subnets)
            got = wait("Y's replica over formnet from host 3",
                       lambda: Z.http_get(f"http://{y_ip}:{AGENT_PORT}/", 5.0), 120)
            assert got == page, got
            timings["cut -> host 3 reaches Y's replica"] = time.monotonic() - t_cut
            last: list[dict] = []

            def hired_on_y():
                r = clients[2].hire(aid, {"during": "cut"})
                last[:] = [r]
                return r if r.get("status") == 200 and (r.get("replica") or "").lower() == address[yi] else None

            try:
                wait("a hire through host 3 answered by Y's replica", hired_on_y, 60)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; last answer: {last}") from None
            assert not Z.http_get(f"http://{x_ip}:{AGENT_PORT}/", 2.0), "host 3 reaches X's VM through a cut link"
            if long_cut:
                lose_connections(X, [Y, Z])

                def forgotten():
                    now = [status(d) or {} for d in data]
                    return (not set(now[xi].get("connected", [1])) & {peer[yi], peer[2]}
                            and peer[xi] not in now[yi].get("connected", [peer[xi]])
                            and peer[xi] not in now[2].get("connected", [peer[xi]]))

                wait("the libp2p connections across the cut to be gone", forgotten, 30)
                time.sleep(2 * HEARTBEAT)  # every node's record says so (`seen`)
            # X, alone, keeps its own: it is the only live node it sees (the others' heartbeats
            # went stale there too), and its VM never stopped
            assert time.monotonic() - t_cut > STALE + HEARTBEAT
            assert get(xi)["placement"]["nodes"] == [address[xi]], looks
            assert running_on(xi, xi), looks
            assert X.http_get(f"http://{x_ip}:{AGENT_PORT}/", 5.0) == page, "X's replica does not answer on X"
            assert watch.alive.get(xi) and not [c for c in watch.changes if c[1] == xi], str(watch)
            assert watch.alive.get(yi), str(watch)

            # (3) heal X
            heal(X)
            t_heal = time.monotonic()
            pinged_all(60)
            timings["heal -> the 6 overlay pings"] = time.monotonic() - t_heal

            def reconnected():
                now = [status(d) or {} for d in data]
                return (set(now[xi].get("connected", [])) >= {peer[yi], peer[2]}
                        and peer[xi] in now[yi].get("connected", []) and peer[xi] in now[2].get("connected", []))

            # the p2p dialer backs off up to 30 s between tries
            wait("libp2p connections across the healed link", reconnected, 90)
            timings["heal -> libp2p connected across it"] = time.monotonic() - t_heal
            wait("X to learn Y's replica (the state it missed)", lambda: report(xi, yi), 120)
            timings["heal -> X has Y's report"] = time.monotonic() - t_heal
            wait("Y to place it on X again", lambda: get(yi)["placement"]["nodes"] == [address[xi]], 120)
            timings["heal -> Y places it on X"] = time.monotonic() - t_heal

            def y_stopped():
                r = report(yi, yi)
                return r if r and r["state"] == "stopped" else None

            rep_y = wait("Y to hand its replica back and stop it", y_stopped, 300)
            timings["heal -> Y's replica stopped"] = time.monotonic() - t_heal
            assert address[xi] in (rep_y.get("reason") or "").lower() and "placed on" in rep_y["reason"], rep_y
            # Y stopped it only once X's answered over formnet, and X's never stopped
            assert Y.http_get(f"http://{x_ip}:{AGENT_PORT}/", 5.0) == page, "X's replica does not answer Y"
            wait("Y's VM down", lambda: not watch.drivers[yi].is_alive(iid), 60)
            y_dir = data[yi] / "vms" / f"vm-{iid}"
            assert (y_dir / "spec.json").is_file() and (y_dir / "overlay.qcow2").is_file(), \
                f"Y did not keep its disk: {sorted(p.name for p in y_dir.iterdir()) if y_dir.exists() else 'no dir'}"
            assert not [c for c in watch.changes if c[1] == xi], f"X's VM stopped: {watch}"

            # exactly one replica runs, on X, and it stays so (several staleness windows)
            settle = time.monotonic()
            while time.monotonic() - settle < 3 * STALE:
                for i in range(3):
                    st = get(i)
                    running = sorted(r["node"].lower() for r in st["replicas_status"] if r["state"] == "running")
                    assert st["placement"]["nodes"] == [address[xi]], f"host {i + 1}: {looks}"
                    # a host may still hear of Y's stop a moment later; never of a new one
                    assert address[xi] in running and set(running) <= {address[xi], address[yi]}, looks
                time.sleep(1.0)
            for i in range(3):
                running = [r["node"].lower() for r in get(i)["replicas_status"] if r["state"] == "running"]
                assert running == [address[xi]], f"host {i + 1} sees {running} running: {looks}"
            assert watch.alive.get(xi) and not watch.alive.get(yi), str(watch)
            assert not [c for c in watch.changes if c[1] == xi], f"X's VM stopped: {watch}"
            r = clients[2].hire(aid, {"after": "heal"})
            assert r.get("status") == 200 and (r.get("replica") or "").lower() == address[xi], r
            notes.append(str(watch))
            for i, d in enumerate(data):
                notes.append(f"node {i + 1} p2p: {(status(d) or {}).get('p2p')}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{explain(hs, data, tmp_path, None, extra())}") from None
        finally:
            if watch is not None:
                watch.stop()
    for what, seconds in timings.items():
        print(f"{what}: {seconds:.2f} s")
    for note in notes:
        print(note)
