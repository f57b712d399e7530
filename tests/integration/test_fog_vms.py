"""The fog end to end, in network namespaces (tests/multihost.py): three hosts — the first started
with `form join --genesis`, the others with `form join <invite>` — form a formnet mesh, and every
host pings every other host's overlay address. Host 1 runs VMs, hosts 2 and 3 run none
(`--vms false`), so the agent's one replica lands on host 1. Then:

- hiring the agent (POST /v1/agents/ID/hire) through host 2's and host 3's own node API reaches
  its VM on host 1 over formnet and brings its answer back (the VM sees the hiring node's overlay
  address: nothing NATs what crosses formnet);
- the VM answers HTTP on its address (in host 1's VM subnet) from hosts 2 and 3;
- the VM reaches a server outside its host (the internet stand-in, which has no route back to
  the VM subnet) with host 1's underlay address (NAT), and a server on host 2's overlay address
  with its own (no NAT over formnet);
- the economy (docs/economy.md): the fog's genesis names a treasury, which grants a consumer 50
  credits held at host 2; the creator prices the agent at 10 a call; the consumer's calls through
  host 2 are answered five times (the answer streams back from the VM on host 1) and then refused
  with 402; every node's state shows the same figures: the consumer spent 50, the creator earned
  40, host 1's operator (its replica answered) 10, and host 2's usage record of the calls.

One VM for the whole test (TCG: a boot takes minutes on a busy machine). Its image is the Debian
base plus a Formfile with no build step (so no build VM); the base is made beforehand outside the
namespaces, which have no route to the mirror. The agent is busybox httpd with a CGI script.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from formation.crdt.keys import PrivateKey, format_address
from formation.keystore import load_keystore
from formation.node.control import ControlClient
from tests.integration.test_formnet import status, wait
from tests.multihost import Host, hosts
from tests.vm_support import CACHE, boot_kit, debian_base, needs_qemu, needs_root

pytestmark = [pytest.mark.slow, needs_qemu, needs_root,
              pytest.mark.skipif(shutil.which("wireguard-go") is None and not os.environ.get("CI"),
                                 reason="wireguard-go is not installed (./dev test installs it)")]
ROOT = Path(__file__).resolve().parents[2]
AGENT_PORT = 8000
HIRE_PATH = "/cgi-bin/hire"
BIG = 200_000  # bytes of /big.txt: a transfer of many full-size packets through the tunnel

# A signed API client that lives in a host's namespace (its node's API listens on 127.0.0.1
# there): one JSON request per stdin line, one JSON answer per stdout line, with its duration.
_CLIENT = r"""
import json, sys, time
import httpx
from formation.client import ApiError, Client, one_use_path, sign_headers
from formation.crdt.keys import PrivateKey
base, key = sys.argv[1], PrivateKey(bytes.fromhex(sys.argv[2]))
client = Client(base, key, timeout=120)
raw = httpx.Client(base_url=base, timeout=120)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    t0 = time.monotonic()
    try:
        if req["op"] == "hire":
            body = json.dumps(req["body"]).encode()
            path = one_use_path("POST", req["path"], client.node_address())
            headers = {**sign_headers(key, "POST", path, body), "Content-Type": "application/json"}
            r = raw.post(path, content=body, headers=headers)
            out = {"status": r.status_code, "text": r.text, "replica": r.headers.get("x-formation-replica")}
        else:
            out = {"ok": client.request(req["method"], req["path"], req.get("body"))}
    except ApiError as e:
        out = {"error": [e.status, e.error, e.detail]}
    except Exception as e:
        out = {"exc": f"{type(e).__name__}: {e}"}
    out["seconds"] = time.monotonic() - t0
    print(json.dumps(out), flush=True)
"""


class NsClient:
    def __init__(self, host: Host, key_hex: str):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.host = host
        self.proc = host.popen(sys.executable, "-c", _CLIENT, "http://127.0.0.1:3004", key_hex,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, env=env)
        assert self._read(60).get("ready"), f"the API client in {host.name} did not start"

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"the API client in {self.host.name} gave no answer in {timeout:g} s")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the API client in {self.host.name} exited ({self.proc.poll()})")
        return json.loads(line)

    def _ask(self, req: dict, timeout: float = 180) -> dict:
        self.proc.stdin.write(json.dumps(req).encode() + b"\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def call(self, method: str, path: str, body=None) -> dict:
        """The answer of a signed call, or {"error": [status, error, detail]} / {"exc": ...}."""
        return self._ask({"op": "call", "method": method, "path": path, "body": body})

    def ok(self, method: str, path: str, body=None):
        got = self.call(method, path, body)
        assert "ok" in got, f"{method} {path} on {self.host.name}: {got}"
        return got["ok"]

    def hire(self, agent_id: str, body) -> dict:
        """{"status", "text", "replica", "seconds"} of POST /v1/agents/ID/hire."""
        return self._ask({"op": "hire", "path": f"/v1/agents/{agent_id}/hire", "body": body})


def address_of(secret: bytes) -> str:
    return format_address(PrivateKey(secret).address)


def start(host: Host, data: Path, *args: str) -> subprocess.Popen:
    log = open(data.parent / f"{data.name}.log", "ab")  # noqa: SIM115 - closed with the process
    env = {**os.environ, "FORMATION_PASSWORD": "test", "PYTHONPATH": str(ROOT)}
    return host.popen(sys.executable, "-m", "formation.cli", *args, "--data-dir", str(data), cwd=ROOT,
                      env=env, stdout=log, stderr=subprocess.STDOUT)


def running_status(procs: list[subprocess.Popen], data: list[Path]) -> list[dict | None]:
    """Each node's status; a node that exited fails the test at once (its log says why)."""
    for i, p in enumerate(procs):
        if p.poll() is not None:
            raise AssertionError(f"node {i + 1} exited with status {p.returncode}")
    return [status(d) for d in data[:len(procs)]]


def invite(data: Path) -> str:
    c = ControlClient(data / "control.sock", timeout=10)
    try:
        return c.call(cmd="invite", expires=600)["token"]
    finally:
        c.close()


def agent_formfile(token: str, internet_url: str, mesh_url: str) -> str:
    """An agent whose ENTRYPOINT (no build step, so no build VM) writes a page, a BIG-byte file
    and a CGI script for busybox httpd, fetches the two URLs every 2 s (their answers are served as
    /internet.txt and /mesh.txt), and serves HTTP on AGENT_PORT. The CGI answers a hire with
    JSON: the token, the caller's address as the VM saw it, and the body it got."""
    cgi = ("#!/bin/sh\n"
           'body=$(head -c "${CONTENT_LENGTH:-0}")\n'
           # httpd listens on IPv6 too: an IPv4 caller is [::ffff:a.b.c.d]
           'remote=${REMOTE_ADDR#[}; remote=${remote%]}; remote=${remote#::ffff:}\n'
           "printf 'Content-Type: application/json\\r\\n\\r\\n'\n"
           f"printf '{{\"agent\": \"{token}\", \"remote\": \"%s\", \"got\": %s}}\\n' "
           '"$remote" "${body:-null}"\n')
    b64 = lambda text: base64.b64encode(text.encode()).decode()  # noqa: E731
    fetch = " ; ".join(f"wget -q -O /www/{name}.new {url}from-vm && mv /www/{name}.new /www/{name}.txt"
                       for name, url in (("internet", internet_url), ("mesh", mesh_url)))
    script = (f"mkdir -p /www/cgi-bin && echo {b64(f'fog-agent {token}' + chr(10))} | base64 -d > /www/index.html"
              f" && head -c {BIG} /dev/zero | tr '\\0' x > /www/big.txt"
              f" && echo {b64(cgi)} | base64 -d > /www/cgi-bin/hire && chmod 755 /www/cgi-bin/hire;"
              f" ( while :; do {fetch} ; sleep 2; done ) &"
              f" exec httpd -f -v -p {AGENT_PORT} -h /www")
    return (f"NAME fog-agent\nEXPOSE {AGENT_PORT}\n"
            f"ENTRYPOINT {json.dumps(['sh', '-c', script])}\n")


# ---- what a failure prints ----------------------------------------------------------------------


def _sh(host: Host, *cmd: str) -> str:
    try:
        proc = host.run(*cmd, timeout=15)
    except subprocess.TimeoutExpired:
        return f"({' '.join(cmd)}: timed out)"
    return (proc.stdout + proc.stderr).strip()


def _uapi(iface: str | None) -> str:
    """What the wireguard-go interface says of itself (UAPI get=1), without its private key."""
    if not iface:
        return "(no formnet interface)"
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(f"/var/run/wireguard/{iface}.sock")
            s.sendall(b"get=1\n\n")
            data = b""
            while not data.endswith(b"\n\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        return f"(UAPI {iface}: {exc})"
    return "\n".join(line for line in data.decode().splitlines() if not line.startswith("private_key"))


def explain(hs, data: list[Path], tmp_path: Path, iid: str | None = None, extra=()) -> str:
    out = []
    for h, d in zip(hs, data, strict=True):
        st = status(d) or {}
        out.append(f"===== host {h.index} {h.name} {h.ip} (node {st.get('address')})\n"
                   f"mesh: {st.get('mesh')}\nvms: {st.get('vms')}\np2p: {st.get('p2p')}\n"
                   f"--- ip addr\n{_sh(h, 'ip', '-br', 'addr')}\n--- ip route\n{_sh(h, 'ip', 'route')}\n"
                   f"--- TCP connections\n{_sh(h, 'ss', '-tn')}\n"
                   f"--- wireguard (UAPI)\n{_uapi((st.get('mesh') or {}).get('iface'))}")
    out.append(f"--- nft ruleset on host 1\n{_sh(hs[0], 'nft', 'list', 'ruleset')}\n"
               f"--- ip_forward on host 1: {_sh(hs[0], 'cat', '/proc/sys/net/ipv4/ip_forward')}\n"
               f"--- bridge on host 1\n{_sh(hs[0], 'ip', '-br', 'link')}")
    if iid:
        console = data[0] / "vms" / f"vm-{iid}" / "console.log"
        text = console.read_text(errors="replace")[-4000:] if console.exists() else "(no console.log)"
        out.append(f"--- VM console ({console})\n{text}")
    if hs.internet is not None:
        out.append(f"--- the internet stand-in was asked: {hs.internet.requests()}")
    out += [str(e) for e in extra]
    for p in sorted(tmp_path.glob("*.log")):
        out.append(f"--- {p.name}\n{p.read_text(errors='replace')[-5000:]}")
    return "\n".join(out)


# ---- the test ----------------------------------------------------------------------------------


@pytest.fixture
def images():
    boot_kit()  # made (or found) outside the namespaces, which have no route to the mirror
    debian_base()


def test_three_hosts_mesh_hire_an_agent_and_reach_its_vm(images, tmp_path):
    timings: dict[str, float] = {}
    notes: list[str] = []
    with hosts(3, internet=True) as hs:
        data = [tmp_path / f"node{h.index}" for h in hs]
        iid = None
        mesh_server = None
        try:
            # -- the fog: host 1 (VMs) is the genesis, hosts 2 and 3 (no VMs) join by invite
            treasury, consumer = os.urandom(32), os.urandom(32)
            cfg = tmp_path / "host1.toml"
            cfg.write_text(f'[vm]\ncache_dir = "{CACHE}"\nbuild_timeout_seconds = 900\n'
                           f'[fog]\ntreasury = "{address_of(treasury)}"\n')
            other_cfg = tmp_path / "hosts23.toml"
            other_cfg.write_text("[node]\nusage_interval_seconds = 2\n")
            t0 = time.monotonic()
            procs = [start(hs[0], data[0], "join", "--genesis", "--vms", "true", "--config", str(cfg))]
            wait("the genesis node",
                 lambda: (running_status(procs, data)[0] or {}).get("fog", {}).get("admitted"), 120)
            for i in (1, 2):
                procs.append(start(hs[i], data[i], "join", invite(data[0]), "--vms", "false",
                                   "--config", str(other_cfg)))

            def meshed():
                sts = running_status(procs, data)
                if not all(s and s["mesh"]["enabled"] and s["mesh"]["peers"] == 2 for s in sts):
                    return None
                return sts

            sts = wait("3 nodes meshed", meshed, 180)
            timings["join --genesis to a 3-node mesh"] = time.monotonic() - t0
            overlay = [s["mesh"]["overlay_ip"] for s in sts]
            address = [s["address"] for s in sts]
            assert sts[0]["vms"]["enabled"], sts[0]["vms"]
            assert not sts[1]["vms"]["enabled"] and not sts[2]["vms"]["enabled"]
            vm_subnet = sts[0]["vms"]["subnet"]
            # the harness takes its underlay from the fog's VM space too: one run in ~12800 collides
            assert not ipaddress.ip_network(vm_subnet).overlaps(hs.subnet), \
                f"host 1's auto VM subnet {vm_subnet} is the underlay's {hs.subnet}: run again"

            # -- every host pings every other host's overlay address
            t0 = time.monotonic()
            for h in hs:
                for j, addr in enumerate(overlay):
                    if j != h.index - 1:
                        wait(f"host {h.index} -> host {j + 1}'s overlay {addr}",
                             lambda h=h, addr=addr: h.ping(addr, 1.0), 30)
            timings["6 overlay pings"] = time.monotonic() - t0

            # a server on host 2's overlay address: the VM's requests over formnet keep its address
            mesh_server = hs[1].serve_http(overlay[1])

            # -- the agent: built and deployed on host 1 (the only node with VMs)
            user = os.urandom(32).hex()
            c1, c2, c3 = (NsClient(h, user) for h in hs)
            token = os.urandom(6).hex()
            formfile = agent_formfile(token, hs.internet.url, mesh_server.url)
            t0 = time.monotonic()
            build = c1.ok("POST", "/v1/pack/build", {"formfile": formfile})
            bid = build["build_id"]

            def built():
                b = c1.ok("GET", f"/v1/pack/builds/{bid}")
                assert b["state"] != "failed", b
                return b["state"] == "done"

            wait("the image build", built, 900)
            timings["image build (no build VM)"] = time.monotonic() - t0
            iid = c1.ok("POST", "/v1/instance/create", {
                "name": "fog-agent", "build_id": bid, "formfile": formfile, "replicas": 1,
                "resources": {"vcpus": 1, "memory_mb": 512, "disk_gb": 5}})["id"]
            aid = c1.ok("POST", "/v1/agents", {"name": "fog-agent", "build_id": bid,
                                               "port": AGENT_PORT, "path": HIRE_PATH})["id"]
            t0 = time.monotonic()
            seen_states: list = []

            def running():
                reps = c1.ok("GET", f"/v1/instance/{iid}/get")["replicas_status"]
                if reps and (not seen_states or seen_states[-1] != (reps[0]["state"], reps[0].get("reason"))):
                    seen_states.append((reps[0]["state"], reps[0].get("reason")))
                return next((r for r in reps if r["state"] == "running"), None)

            try:
                rep = wait("the agent's replica to run", running, 900)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; states seen: {seen_states}") from None
            timings["instance create -> replica running (VM boot, TCG)"] = time.monotonic() - t0
            notes.append(f"replica states seen on host 1: {seen_states}")
            assert rep["node"].lower() == address[0].lower(), (rep, address)
            vm_ip = rep["ip"]
            assert ipaddress.ip_address(vm_ip) in ipaddress.ip_network(vm_subnet), (vm_ip, vm_subnet)

            # -- the VM answers HTTP on its address from the other hosts (routed over formnet)
            for h in hs[1:]:
                got = wait(f"GET http://{vm_ip}:{AGENT_PORT}/ from host {h.index}",
                           lambda h=h: h.http_get(f"http://{vm_ip}:{AGENT_PORT}/", 5.0), 120)
                assert got == f"fog-agent {token}\n", got
                big = h.http_get(f"http://{vm_ip}:{AGENT_PORT}/big.txt", 30.0)
                assert big == "x" * BIG, f"big.txt from host {h.index}: {None if big is None else len(big)} bytes"

            # -- hiring the agent through each other host's own node
            for i, c in ((1, c2), (2, c3)):
                body = {"task": "hello", "from": f"host {i + 1}"}
                t0 = time.monotonic()

                last: list[dict] = []

                def hired(c=c, body=body, last=last):
                    r = c.hire(aid, body)
                    if r.get("status") != 200:
                        last.append(r)
                    return r if r.get("status") == 200 else None

                try:
                    first = wait(f"a hire through host {i + 1}'s node", hired, 180)
                except AssertionError as exc:
                    raise AssertionError(f"{exc}; its last answer: {last[-1:]}") from None
                timings[f"first hire through host {i + 1} answered after"] = time.monotonic() - t0
                if last:  # what the node said before it knew (its view of the state lags a little)
                    notes.append(f"host {i + 1}: {len(last)} hire(s) refused first; the first: {last[0]}")
                answer = json.loads(first["text"])
                assert answer == {"agent": token, "remote": overlay[i], "got": body}, first
                assert first["replica"].lower() == address[0].lower(), first
                lat = [c.hire(aid, {"n": n}) for n in range(5)]
                assert all(r["status"] == 200 for r in lat), lat
                blob = {"blob": "y" * 40_000}  # many full-size packets each way
                r = c.hire(aid, blob)
                assert r["status"] == 200 and json.loads(r["text"])["got"] == blob, str(r)[:500]
                timings[f"hire latency through host {i + 1} (median of 5)"] = statistics.median(
                    r["seconds"] for r in lat)
            local = [c1.hire(aid, {"n": n}) for n in range(5)]
            assert all(r["status"] == 200 for r in local), local
            timings["hire latency on host 1 itself (median of 5)"] = statistics.median(
                r["seconds"] for r in local)

            # -- the VM reaches beyond its host: the internet sees host 1's underlay address (NAT)
            wait("the VM's request at the internet stand-in",
                 lambda: any(p == "/from-vm" for _, p in hs.internet.requests() or []), 120)
            sources = {a for a, p in hs.internet.requests() if p == "/from-vm"}
            assert sources == {hs[0].ip}, sources
            got = hs[1].http_get(f"http://{vm_ip}:{AGENT_PORT}/internet.txt", 5.0)
            assert got == f"{hs.internet.token} {hs[0].ip}\n", got
            # ... and over formnet it keeps its own address (no NAT on the formnet interface)
            wait("the VM's request at host 2's overlay address",
                 lambda: any(p == "/from-vm" for _, p in mesh_server.requests() or []), 60)
            sources = {a for a, p in mesh_server.requests() if p == "/from-vm"}
            assert sources == {vm_ip}, sources
            # -- the economy: a treasury's grant held at host 2, a price, calls until 402
            t0 = time.monotonic()
            fog = c1.ok("GET", "/v1/fog")
            assert fog["treasury"] == address_of(treasury), fog
            NsClient(hs[0], treasury.hex()).ok("POST", "/v1/credits/grant", {
                "to": address_of(consumer), "amount": 50, "at": address[1], "memo": "e2e", "fog": fog})
            c1.ok("PUT", f"/v1/agents/{aid}", {"price_credits_per_call": 10})
            k2 = NsClient(hs[1], consumer.hex())

            def priced_and_granted():
                agent = k2.ok("GET", f"/v1/agents/{aid}")
                return agent.get("price_credits_per_call") == 10 and k2.ok("GET", "/v1/account/credits")["balance"]

            assert wait("host 2 to know the price and the grant", priced_and_granted, 60) == 50
            paid = [k2.hire(aid, {"paid": n}) for n in range(6)]
            assert [r["status"] for r in paid] == [200] * 5 + [402], paid
            assert json.loads(paid[0]["text"]) == {"agent": token, "remote": overlay[1], "got": {"paid": 0}}
            refusal = json.loads(paid[5]["text"])
            assert refusal["error"] == "insufficient_credits" and refusal["price"] == 10, refusal
            consumer_clients = [NsClient(h, consumer.hex()) for h in hs]
            creator_clients = (c1, c2, c3)

            def agreed():
                got = [(k.ok("GET", "/v1/account/credits"), c.ok("GET", "/v1/account/credits"))
                       for k, c in zip(consumer_clients, creator_clients, strict=True)]
                figures = [((k["granted"], k["spent"], k["calls"], k["balance"]), (c["earned"], c["balance"]))
                           for k, c in got]
                return figures if all(f == ((50, 50, 5, 0), (40, 40)) for f in figures) else None

            wait("every node to show the credits moved as priced", agreed, 60)
            # host 1's operator (its node key: a node's address is its operator's account) got the
            # 20 % share of the calls its replica answered, held at host 2, the node that charged
            operator = load_keystore(data[0] / "operator.key", "test").secret.hex()
            for h in hs:
                mine = NsClient(h, operator).ok("GET", "/v1/account/credits")
                assert (mine["earned"], mine["balance"]) == (10, 10), mine
                assert [(p["node"].lower(), p["held"]) for p in mine["purses"]] == [(address[1].lower(), 10)], mine

            def usage_everywhere():
                rows = [c.ok("GET", f"/v1/instance/{iid}/usage") for c in creator_clients]
                hires = [{n["node"].lower(): n["hires"] for n in r["nodes"]}.get(address[1].lower(), 0) for r in rows]
                return hires if all(h >= 5 for h in hires) else None

            wait("every node to hold host 2's usage record of the calls", usage_everywhere, 60)
            timings["economy: grant, price, 6 calls, every node agrees"] = time.monotonic() - t0

            for i, d in enumerate(data):  # how the state travelled: gossip, sync (and failures)
                notes.append(f"node {i + 1} p2p: {(status(d) or {}).get('p2p')}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{explain(hs, data, tmp_path, iid, [f'timings: {timings}', *notes])}") from None
        # the namespaces' teardown kills what runs in them, the daemonized QEMU included
    for what, seconds in timings.items():
        print(f"{what}: {seconds:.2f} s")
    for note in notes:
        print(note)

