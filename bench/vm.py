"""VM boot time (our QEMU driver against bare QEMU) and ship-to-HTTP time of an agent. Root only.

    python bench/vm.py [--runs 5] [--cache DIR] [--skip-ship] [--json]

boot: the guest boot kit (formation.vm.kit, kept in <cache>/kit) booted --runs times by each of
  - our driver: QemuDriver.create() (untimed: the overlay), then the clock runs from just before
    boot() (daemonized QEMU, QMP answering) until wait_console() sees FORMATION-GUEST-INIT, the
    first line the initramfs prints, in console.log (the driver polls that file every 50 ms);
  - bare QEMU: the same -M/-accel/-cpu/-m/-smp/-kernel/-initrd/-append (taken from the driver's own
    command line, fm.mode=probe) and the same disk, with -serial stdio instead of a console file
    and no -daemonize, -pidfile or QMP; the clock runs from just before the process is started
    until the marker comes on its stdout.
  The VM is a probe (fm.mode=probe: the guest reboots right after the marker, which ends QEMU)
  with a minimal disk (a 64 MB ext4 from mke2fs -d holding one file), never mounted. Runs are
  interleaved (driver, bare, driver, bare, ...) after one unrecorded warm-up of each, so that
  both see the same machine load. boot_ratio = boot_ms_p50 / bare_boot_ms_p50 (goal <= 1.5).

ship: the examples/hello-agent image is built into <cache>/images first if it is not there
  (on the host: INSTALL downloads packages; its seconds are image_build_s, null when cached).
  Then a `form node` runs in a fresh network namespace, reached over a veth pair (10.213.31.0/30;
  its VMs get 10.213.32.0/24 on a bridge inside the namespace), with [vm] cache_dir = <cache>
  so that the image is a cache hit. Once its VMs are on, the clock runs through
  POST /v1/pack/build (formfile + context: answers done), POST /v1/instance/create (that build
  id, replicas 1, the Formfile's resources), POST /v1/agents (build id, port 8000, path /) and
  POST /v1/agents/{id}/hire, repeated until it answers 200 with the greeting: ship_to_http_ms
  (goal < 20000). Everything (the instance, the node, its QEMU, the namespace, the veth) is
  removed at the end, also on failure.

Prints a table and, last, one JSON line (with --json, the only line).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import printer, terminate  # noqa: E402
from formation.client import ApiError, Client  # noqa: E402
from formation.crdt.keys import PrivateKey  # noqa: E402
from formation.node.control import ControlClient  # noqa: E402
from formation.pack import context as pack_context  # noqa: E402
from formation.pack.builder import Builder, BuildFailure, find_image  # noqa: E402
from formation.pack.formfile import parse as parse_formfile  # noqa: E402
from formation.vm.accel import choose_accel  # noqa: E402
from formation.vm.driver import QEMU, QemuDriver  # noqa: E402
from formation.vm.kit import BootKit, ensure_kit  # noqa: E402
from formation.vm.spec import VmError, VmSpec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "hello-agent"
MARKER = "FORMATION-GUEST-INIT"
UPTIME_RE = re.compile(r"FORMATION-GUEST-INIT uptime=([0-9.]+)")
BOOT_TIMEOUT = 120.0
EXIT_TIMEOUT = 15.0
BOOT_GOAL_RATIO = 1.5
SHIP_GOAL_MS = 20_000
# the ship phase's addresses: the veth pair, and the VMs' subnet inside the namespace
VETH_HOST, VETH_NS, VETH_PREFIX = "10.213.31.1", "10.213.31.2", 30
VM_SUBNET = "10.213.32.0/24"
API_PORT = 3004
NODE_START_TIMEOUT = 120.0
HIRE_TIMEOUT = 300.0
HIRE_POLL = 0.2
PASSWORD = "bench-password"


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def p50(values: list[float], digits: int = 1) -> float | None:
    return round(statistics.median(values), digits) if values else None


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


# ---- boot: our driver against bare QEMU -----------------------------------------------------------


def minimal_image(work: Path) -> Path:
    tree = work / "tree"
    tree.mkdir()
    (tree / "README").write_text("formation bench: a minimal disk, never mounted by a probe boot\n")
    image = work / "minimal.ext4"
    run("mke2fs", "-q", "-t", "ext4", "-d", str(tree), "-F", str(image), "64M")
    return image


def _option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def bare_command(driver: QemuDriver, spec: VmSpec) -> list[str]:
    """Bare QEMU with the machine, CPU, memory, kernel, initrd, kernel command line and disk of
    the driver's own command line for `spec`: no -daemonize, pid file, console file or QMP."""
    cmd = driver.command(spec, daemonize=False)
    bare = [QEMU, "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none"]
    for name in ("-M", "-accel", "-cpu", "-m", "-smp", "-kernel", "-initrd", "-append"):
        bare += [name, _option(cmd, name)]
    if spec.image is not None:
        bare += ["-drive", f"id=d0,if=none,file={spec.image.resolve()},format=raw,readonly=on",
                 "-device", "virtio-blk-device,drive=d0"]
    return bare + ["-serial", "stdio"]


def _uptime(text: str) -> float | None:
    m = UPTIME_RE.search(text)
    return float(m.group(1)) if m else None


async def driver_boot(driver: QemuDriver, spec: VmSpec) -> dict:
    """One boot by the driver: create (untimed), boot -> marker in console.log, then delete."""
    vm_id = spec.vm_id
    await driver.create(spec)
    try:
        t0 = trio.current_time()
        qmp_s = await driver.boot(vm_id)
        since_launch = await driver.wait_console(vm_id, MARKER, BOOT_TIMEOUT)
        total = trio.current_time() - t0
        with trio.move_on_after(EXIT_TIMEOUT):  # a probe ends by itself: let it, like the bare one
            while driver.is_alive(vm_id):
                await trio.sleep(0.05)
        return {"ms": ms(total), "launch_to_marker_ms": ms(since_launch), "boot_call_ms": ms(qmp_s),
                "guest_uptime_s": _uptime(driver.console_log(vm_id))}
    finally:
        with trio.CancelScope(shield=True):
            await driver.delete(vm_id)


async def bare_boot(cmd: list[str], err_path: Path) -> dict:
    """One boot of bare QEMU: start -> marker on its stdout, then wait for it to end."""
    needle = MARKER.encode()
    buf = b""
    with open(err_path, "wb") as err:
        t0 = trio.current_time()
        proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                stderr=err)
    try:
        with trio.fail_after(BOOT_TIMEOUT):
            while needle not in buf:
                chunk = await proc.stdout.receive_some(65536)
                if not chunk:
                    await proc.wait()
                    raise VmError(f"bare QEMU exited ({proc.returncode}) before {MARKER!r}: "
                                  f"{err_path.read_text(errors='replace')[-1000:]} "
                                  f"{buf.decode(errors='replace')[-1000:]}")
                buf += chunk
            total = trio.current_time() - t0
        with trio.move_on_after(EXIT_TIMEOUT):
            while chunk := await proc.stdout.receive_some(65536):  # the rest, until QEMU ends
                buf += chunk
            await proc.wait()
        return {"ms": ms(total), "guest_uptime_s": _uptime(buf.decode(errors="replace"))}
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
        await proc.stdout.aclose()


async def boot_bench(kit: BootKit, work: Path, runs: int, say) -> dict:
    image = minimal_image(work)
    driver = QemuDriver(work / "vms")

    def spec(n: int) -> VmSpec:
        return VmSpec(vm_id=f"bench-boot-{n}", kernel=kit.kernel, initrd=kit.initrd, image=image,
                      mode="probe")

    bare = bare_command(driver, spec(0))
    drv_runs, bare_runs = [], []
    say(f"boot: {runs} runs each after a warm-up, interleaved; accel {driver.accel}, "
        f"{spec(0).machine}, {spec(0).memory_mb} MB, {spec(0).vcpus} vCPU, kernel {kit.kernel_version}")
    for n in range(runs + 1):
        d = await driver_boot(driver, spec(n))
        b = await bare_boot(bare, work / f"bare-{n}.err")
        if n == 0:
            say(f"  warm-up: driver {d['ms']:.0f} ms, bare {b['ms']:.0f} ms (not counted)")
            continue
        drv_runs.append(d)
        bare_runs.append(b)
        say(f"  run {n}: driver {d['ms']:7.1f} ms (boot() {d['boot_call_ms']:6.1f}, launch->marker "
            f"{d['launch_to_marker_ms']:7.1f}, guest uptime {d['guest_uptime_s']} s) | "
            f"bare {b['ms']:7.1f} ms (guest uptime {b['guest_uptime_s']} s)")
    return {"driver": drv_runs, "bare": bare_runs, "bare_command": bare,
            "driver_command": driver.command(spec(0))}


# ---- ship: hello-agent from POST /pack/build to an answer ------------------------------------------


def ensure_example_image(cache: Path, kit: BootKit, work: Path, say) -> tuple[str, float | None]:
    """The hello-agent image in <cache>/images, built here first if missing: (image id, seconds
    the build took or None when it was cached)."""
    driver = QemuDriver(work / "build-vms")

    async def machine(image, *, vcpus, memory_mb, timeout, on_line):  # as formation/node/vmhost.py
        vm_id = f"build-{secrets.token_hex(6)}"
        spec = VmSpec(vm_id=vm_id, kernel=kit.kernel, initrd=kit.initrd, image=image, vcpus=vcpus,
                      memory_mb=memory_mb, mode="build", writable_image=True)
        try:
            await driver.run_to_exit(spec, timeout, on_line)
        finally:
            with trio.CancelScope(shield=True):
                await driver.delete(vm_id)

    builder = Builder(cache / "images", cache, machine)
    plan_dir = work / "prebuild"
    plan_dir.mkdir()
    plan = builder.prepare((EXAMPLE / "Formfile").read_text(), pack_context.pack_dir(EXAMPLE), plan_dir)
    if find_image(cache / "images", plan.image_id):
        say(f"ship: image {plan.image_id[:12]} of {EXAMPLE.name} is cached")
        return plan.image_id, None
    say(f"ship: building image {plan.image_id[:12]} of {EXAMPLE.name} on the host (not timed)")
    t0 = time.monotonic()
    tail: list[str] = []
    try:
        trio.run(lambda: builder.build(plan, plan_dir, log=lambda line: tail.append(line)))
    except BuildFailure as exc:
        raise RuntimeError(f"building {EXAMPLE.name} failed: {exc}\n" + "\n".join(tail[-30:])) from None
    return plan.image_id, round(time.monotonic() - t0, 1)


class NodeInNetns:
    """`form node` in its own network namespace, its API on a veth pair from the host."""

    def __init__(self, base: Path, cache: Path):
        tag = secrets.token_hex(3)
        self.ns, self.host_if = f"fmbench-{tag}", f"fmb{tag}"
        self.base, self.data = base, base / "data"
        self.url = f"http://{VETH_NS}:{API_PORT}"
        self.config = base / "formation.toml"
        self.config.write_text(
            f'[node]\nheartbeat_seconds = 5\n'
            f'[api]\nhost = "{VETH_NS}"\nport = {API_PORT}\n'
            f'[p2p]\nlisten = "/ip4/{VETH_NS}/tcp/4001"\n'
            f'[vm]\nenabled = "true"\nsubnet = "{VM_SUBNET}"\nbridge = "fmbbr0"\n'
            f'cache_dir = "{cache}"\nbuild_timeout_seconds = 1800\n')
        self.log_path = base / "node.log"
        self.proc: subprocess.Popen | None = None
        self.log = None
        self.made_ns = self.made_veth = False

    def start(self) -> None:
        run("ip", "netns", "add", self.ns)
        self.made_ns = True
        run("ip", "-n", self.ns, "link", "set", "lo", "up")
        run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        self.made_veth = True
        run("ip", "addr", "add", f"{VETH_HOST}/{VETH_PREFIX}", "dev", self.host_if)
        run("ip", "link", "set", self.host_if, "up")
        run("ip", "-n", self.ns, "addr", "add", f"{VETH_NS}/{VETH_PREFIX}", "dev", "eth0")
        run("ip", "-n", self.ns, "link", "set", "eth0", "up")
        env = {**os.environ, "FORMATION_PASSWORD": PASSWORD}
        self.log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "formation.cli", "node",
             "--config", str(self.config), "--data-dir", str(self.data)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + NODE_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the node exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError, ValueError):
                control = ControlClient(self.data / "control.sock", timeout=5)
                try:
                    st = control.call(cmd="status")
                finally:
                    control.close()
                if st.get("vms", {}).get("enabled"):
                    return
            time.sleep(0.25)
        raise RuntimeError(f"the node did not start with VMs on within {NODE_START_TIMEOUT:g} s:\n"
                           f"{self.tail()}")

    def tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def qemu_pids(self) -> list[int]:
        """Live QEMU processes of this node's VMs (pid file and a command line naming the dir)."""
        pids = []
        for pid_file in (self.data / "vms").glob("*/qemu.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text())
                if str(pid_file.parent).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(pid)
        return pids

    def stop(self) -> None:
        """The node (SIGTERM, then SIGKILL), its QEMU processes, the namespace and the veth."""
        terminate(self.proc)
        if self.log is not None:
            self.log.close()
            self.log = None
        for pid in self.qemu_pids():  # daemonized: they outlive the node
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.made_ns:
            pids = run("ip", "netns", "pids", self.ns, check=False).stdout.split()
            for pid in pids:  # anything else still in the namespace keeps it alive
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "del", self.ns, check=False)
            self.made_ns = False
        if self.made_veth:  # normally gone with its peer in the namespace
            run("ip", "link", "del", self.host_if, check=False)
            self.made_veth = False


def _hire_state(exc: Exception) -> str:
    """A short name of why a hire did not answer yet (for the phases: first time seen)."""
    if isinstance(exc, ApiError):
        m = re.search(r": (pending|building|booting|failed|stopped|running)\b", exc.detail)
        what = f"{exc.status} {exc.error}" + (f" ({m.group(1)})" if m else "")
        if "no replica reported" in exc.detail:
            what += " (no replica reported)"
        return what
    return type(exc).__name__


def stamp_console(path: Path, seen: set[str], mark) -> None:
    """Mark the first sighting of each guest marker line on the VM's console (the guest's own
    progress, at the resolution of the hire polling)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("FORMATION-GUEST"):
            key = "FORMATION-GUEST-INIT" if line.startswith("FORMATION-GUEST-INIT") else line
            if key not in seen:
                seen.add(key)
                mark(f"console: {line}")


def ship(node: NodeInNetns) -> dict:
    formfile = (EXAMPLE / "Formfile").read_text()
    ff = parse_formfile(formfile)
    context_b64 = base64.b64encode(pack_context.pack_dir(EXAMPLE)).decode()
    resources = {"vcpus": ff.vcpu, "memory_mb": ff.memory_mb, "disk_gb": ff.disk_gb}
    user = Client(node.url, PrivateKey(secrets.token_bytes(32)), timeout=60)
    phases: list[tuple[str, float]] = []
    t0_wall = time.time()
    t0 = time.monotonic()

    def mark(what: str) -> None:
        phases.append((what, time.monotonic() - t0))

    try:
        build = user.post("/v1/pack/build", {"formfile": formfile, "context": context_b64})
        bid = build["build_id"]
        build_cached = build.get("state") == "done"
        mark(f"POST /pack/build answered ({build.get('state')})")
        while build.get("state") not in ("done", "failed"):  # not a cache hit after all
            time.sleep(0.5)
            build = user.get(f"/v1/pack/builds/{bid}")
        if build["state"] != "done":
            raise RuntimeError(f"the build failed on the node: {build.get('error')}")
        if not build_cached:
            mark("build done on the node")
        iid = user.post("/v1/instance/create", {"name": ff.name, "build_id": bid, "formfile": formfile,
                                                "replicas": 1, "resources": resources})["id"]
        mark("POST /instance/create answered")
        aid = user.post("/v1/agents", {"name": ff.name, "build_id": bid, "port": 8000, "path": "/"})["id"]
        mark("POST /agents answered")
        deadline = time.monotonic() + HIRE_TIMEOUT
        last, n, answer = None, 0, None
        console = node.data / "vms" / f"vm-{iid}" / "console.log"
        seen: set[str] = set()
        while True:
            n += 1
            stamp_console(console, seen, mark)
            try:
                answer = user.post(f"/v1/agents/{aid}/hire", {"bench": n})
            except (ApiError, httpx.HTTPError) as exc:
                state = _hire_state(exc)
                if state != last:
                    mark(f"hire: {state}")
                    last = state
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no answer from the agent after {HIRE_TIMEOUT:g} s: {exc}") from None
                time.sleep(HIRE_POLL)
                continue
            if not isinstance(answer, dict) or "greeting" not in answer or answer.get("echo") != {"bench": n}:
                raise RuntimeError(f"the agent answered something else: {answer!r}")
            break
        total = time.monotonic() - t0
        mark("hire: 200 with the greeting")
        stamp_console(console, seen, mark)
        # when the scheduler launched the VM (the driver's boot.json), on the same clock
        with contextlib.suppress(OSError, ValueError, KeyError):
            launched = json.loads((node.data / "vms" / f"vm-{iid}" / "boot.json").read_text())["launched_at"]
            phases.append(("VM launched (boot.json)", launched - t0_wall))
        phases.sort(key=lambda p: p[1])
        console_text = console.read_text(errors="replace") if console.exists() else ""
        # withdraw the instance so that the node stops its VM before it is stopped itself
        with contextlib.suppress(ApiError, httpx.HTTPError):
            user.post(f"/v1/instance/{iid}/delete")
            gone_by = time.monotonic() + 30
            while node.qemu_pids() and time.monotonic() < gone_by:
                time.sleep(0.25)
        return {"ms": ms(total), "build_id": bid, "build_cached_on_node": build_cached,
                "instance_id": iid, "agent_id": aid, "hire_calls": n, "answer": answer,
                "guest_uptime_s": _uptime(console_text),
                "phases_ms": [{"what": w, "ms": ms(s)} for w, s in phases]}
    finally:
        user.close()


# ---- main ---------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="boots of each kind (default 5)")
    ap.add_argument("--cache", default=os.environ.get("FORMATION_TEST_CACHE", "/var/cache/formation-test"),
                    help="kit, base and image cache (default /var/cache/formation-test)")
    ap.add_argument("--skip-ship", action="store_true", help="only the boot measurement")
    ap.add_argument("--json", action="store_true", help="print only the JSON result line")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if os.geteuid() != 0:
        print("bench/vm.py: run as root (VM networking and the image build need it)", file=sys.stderr)
        return 2
    if not shutil.which(QEMU):
        print(f"bench/vm.py: {QEMU} is not installed", file=sys.stderr)
        return 2
    say = printer(args.json)
    cache = Path(args.cache).resolve()
    load_before = [round(x, 2) for x in os.getloadavg()]
    result: dict = {"accel": choose_accel(), "runs": args.runs, "cpus": os.cpu_count(),
                    "loadavg_before": load_before,
                    "qemu": run(QEMU, "--version").stdout.splitlines()[0]}
    rc = 0
    with tempfile.TemporaryDirectory(prefix="formation-bench-vm-") as tmp_name:
        tmp = Path(tmp_name)
        kit = ensure_kit(cache / "kit", say)  # on the host: the namespace has no route out
        result["kernel_version"] = kit.kernel_version
        (tmp / "boot").mkdir()
        boot = trio.run(boot_bench, kit, tmp / "boot", args.runs, say)
        drv = [r["ms"] for r in boot["driver"]]
        bare = [r["ms"] for r in boot["bare"]]
        result.update({
            "boot_ms_p50": p50(drv), "boot_ms_runs": drv,
            "bare_boot_ms_p50": p50(bare), "bare_boot_ms_runs": bare,
            "boot_ratio": round(p50(drv) / p50(bare), 3),
            "boot_launch_to_marker_ms_runs": [r["launch_to_marker_ms"] for r in boot["driver"]],
            "boot_call_ms_runs": [r["boot_call_ms"] for r in boot["driver"]],
            "guest_uptime_s_p50": {"driver": p50([r["guest_uptime_s"] for r in boot["driver"]
                                                  if r["guest_uptime_s"] is not None], 2),
                                   "bare": p50([r["guest_uptime_s"] for r in boot["bare"]
                                                if r["guest_uptime_s"] is not None], 2)},
            # launch -> marker minus the guest's own uptime at the marker: QEMU's start, loading
            # the kernel, the early boot before the guest clock runs, seeing the marker
            "boot_outside_guest_ms_p50": {
                k: p50([r["ms"] - r["guest_uptime_s"] * 1000 for r in boot[k]
                        if r["guest_uptime_s"] is not None]) for k in ("driver", "bare")},
            "bare_command": " ".join(boot["bare_command"]),
        })
        result.update({"image_build_s": None, "ship_to_http_ms": None, "ship": None})
        if not args.skip_ship:
            (tmp / "ship").mkdir()
            node = NodeInNetns(tmp / "ship", cache)
            try:
                _, result["image_build_s"] = ensure_example_image(cache, kit, tmp / "ship", say)
                say(f"ship: starting a node in namespace {node.ns} (API {node.url})")
                node.start()
                say("ship: node up with VMs on; clock starts")
                s = ship(node)
                result["ship_to_http_ms"] = s["ms"]
                result["ship"] = s
            except (RuntimeError, ApiError, httpx.HTTPError, VmError, BuildFailure,
                    subprocess.CalledProcessError) as exc:
                detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else ""
                result["ship_error"] = f"{type(exc).__name__}: {exc} {detail}".strip()
                print(f"bench/vm.py: ship failed: {result['ship_error']}\n--- node log ---\n{node.tail()}",
                      file=sys.stderr)
                rc = 1
            finally:
                node.stop()
    ratio = result["boot_ratio"]
    ship_ms = result["ship_to_http_ms"]
    result["goals_met"] = {
        "boot_ratio_le_1_5": ratio <= BOOT_GOAL_RATIO,
        "ship_to_http_lt_20s": None if ship_ms is None else ship_ms < SHIP_GOAL_MS,
    }
    if not args.json:
        print()
        print(f"{'boot (launch -> ' + MARKER + ')':<44} {'p50 ms':>9}  runs ms")
        print(f"{'our driver (create untimed; boot + console)':<44} {result['boot_ms_p50']:>9.1f}  "
              f"{', '.join(f'{x:.0f}' for x in drv)}")
        print(f"{'  of which boot() (QEMU up, QMP answering)':<44} {p50(result['boot_call_ms_runs']):>9.1f}  "
              f"{', '.join(f'{x:.0f}' for x in result['boot_call_ms_runs'])}")
        print(f"{'bare qemu-system-x86_64 -serial stdio':<44} {result['bare_boot_ms_p50']:>9.1f}  "
              f"{', '.join(f'{x:.0f}' for x in bare)}")
        gu, out = result["guest_uptime_s_p50"], result["boot_outside_guest_ms_p50"]
        print(f"boot_ratio {ratio:.3f} (goal <= {BOOT_GOAL_RATIO}): "
              f"{'met' if result['goals_met']['boot_ratio_le_1_5'] else 'NOT met'}; accel {result['accel']}, "
              f"{result['cpus']} CPUs, load average before {load_before[0]}")
        print(f"p50 guest uptime at the marker: driver {gu['driver']} s, bare {gu['bare']} s; "
              f"time outside the guest clock: driver {out['driver']} ms, bare {out['bare']} ms")
        if not args.skip_ship:
            print()
            built = "cached" if result["image_build_s"] is None else f"built in {result['image_build_s']} s"
            print(f"ship {EXAMPLE.name} (image {built}, not timed)")
            if result["ship"]:
                for p in result["ship"]["phases_ms"]:
                    print(f"  {p['ms']:>9.1f} ms  {p['what']}")
                print(f"ship_to_http_ms {ship_ms:.0f} (goal < {SHIP_GOAL_MS}): "
                      f"{'met' if result['goals_met']['ship_to_http_lt_20s'] else 'NOT met'}; "
                      f"{result['ship']['hire_calls']} hire calls; answer {result['ship']['answer']}")
            else:
                print(f"  failed: {result.get('ship_error')}")
    print(json.dumps(result), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
