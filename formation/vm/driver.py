"""The QEMU driver: one VM = one daemonized QEMU process and one directory on disk.

Everything about a VM is in `state_dir/vm-<id>/`: spec.json (what to boot), overlay.qcow2 (its
writes, over the shared raw image), qemu.pid, qmp.sock, console.log (the serial console) and
qemu.log (QEMU's own messages). QEMU runs with -daemonize, so VMs outlive the node process; a
restarted node adopts them by listing the directories (`list`) and checking the pid (`is_alive`).
The driver keeps no state in memory that the disk does not have.

QMP: one short connection per command (connect, execute, close, inside a nursery that ends with the
call). A connection held per VM would need a task owned by the caller, reconnecting when QEMU
restarts, and a second driver on the same state_dir (adoption) could not talk to the VM while the
first one held the socket (QEMU's QMP serves one client at a time). The cost of reconnecting is
a millisecond or two, which no caller here notices. Commands to one VM are serialized per driver so
that they do not queue up behind each other at QEMU's listener.

Over 400 lines because it is one QEMU process's whole life (command line, launch, QMP, stop,
console); what a VM is (the spec, status, errors) is in spec.py, the Protocol in backend.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from formation.files import read_tail, write_atomic
from formation.vm import network
from formation.vm.accel import choose_accel, tsc_khz
from formation.vm.qmp import QmpClient, QmpError
from formation.vm.spec import PATHS, VmError, VmMetrics, VmSpec, VmStatus, check_vm_id

QEMU = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"
DIR_PREFIX = "vm-"
LAUNCH_TIMEOUT = 30.0  # QEMU's parent returns once the machine is built: well under a second
QMP_TIMEOUT = 10.0
POLL = 0.05
GIB = 1024**3


CONSOLE_KEEP = 256 * 1024  # bytes of console log kept across boots
USER_NET_GUEST, USER_NET_HOST, USER_NET_DNS = "10.0.2.15/24", "10.0.2.2", "10.0.2.3"
SECRETS_SERIAL = "fm-secrets"  # the secrets disk's virtio serial, as guest-init looks for it


@contextlib.contextmanager
def _short_path(path: Path) -> Iterator[str]:
    """A path to `path` that fits in a unix socket address (108 bytes), however deep the state
    dir: through an O_PATH descriptor of its directory (/proc/self/fd/N/name)."""
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _opt(path: Path) -> str:
    """A path as a value in a QEMU option list, where a comma is written as two."""
    return str(path).replace(",", ",,")


def _secrets_disk(path: Path, dev: str) -> list[str]:
    """The secrets tar as a read-only disk after the root one; the guest finds it by its serial
    (not by its name, which follows the order the kernel probes disks in)."""
    return ["-drive", f"id=d1,if=none,file={_opt(path.resolve())},format=raw,readonly=on",
            "-device", f"virtio-blk-{dev},drive=d1,serial={SECRETS_SERIAL}"]


def _read_proc(pid: int, name: str) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return None


def _proc_stat(pid: int) -> list[str] | None:
    raw = _read_proc(pid, "stat")
    if raw is None:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    return raw[raw.rindex(b")") + 2:].decode().split()  # [0] is field 3 (state)


class QemuDriver:
    def __init__(self, state_dir: Path, accel: str | None = None):
        # absolute: QEMU runs from the VM's dir, and is_alive matches this path in its cmdline
        self.state_dir = Path(state_dir).resolve()
        self.accel = choose_accel(accel)
        self._locks: dict[str, trio.Lock] = {}

    # ---- paths and on-disk state ----

    def vm_dir(self, vm_id: str) -> Path:
        check_vm_id(vm_id)
        # the prefix keeps ids like "." or ".." from naming special directories
        return self.state_dir / f"{DIR_PREFIX}{vm_id}"

    def spec_of(self, vm_id: str) -> VmSpec | None:
        try:
            return VmSpec.from_json((self.vm_dir(vm_id) / "spec.json").read_text())
        except FileNotFoundError:
            return None

    def spec(self, vm_id: str) -> VmSpec:
        spec = self.spec_of(vm_id)
        if spec is None:
            raise VmError(f"no VM {vm_id!r} (no {self.vm_dir(vm_id) / 'spec.json'})")
        return spec

    def list(self) -> list[str]:
        """The VMs on disk, running or not: what a restarted node adopts."""
        if not self.state_dir.is_dir():
            return []
        return sorted(d.name[len(DIR_PREFIX):] for d in self.state_dir.iterdir()
                      if d.name.startswith(DIR_PREFIX) and (d / "spec.json").is_file())

    def pid(self, vm_id: str) -> int | None:
        """The QEMU pid of a live VM, else None. The pid file alone could name a process that
        reused the number after QEMU died, so its command line must also name this VM's dir."""
        vm_dir = self.vm_dir(vm_id)
        try:
            pid = int((vm_dir / "qemu.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        cmdline = _read_proc(pid, "cmdline")  # empty for a zombie
        if not cmdline or (str(vm_dir) + "/").encode() not in cmdline:
            return None
        return pid

    def is_alive(self, vm_id: str) -> bool:
        return self.pid(vm_id) is not None

    def _launch_info(self, vm_id: str) -> dict:
        try:
            return json.loads((self.vm_dir(vm_id) / "boot.json").read_text())
        except (OSError, ValueError):
            return {}

    # ---- lifecycle ----

    async def create(self, spec: VmSpec) -> Path:
        """The VM's directory, spec.json and overlay. Idempotent; a changed spec replaces the old
        one (and the overlay, if the image changed) unless the VM is running."""
        for name in PATHS:
            path = getattr(spec, name)
            if path is not None and not path.is_file():
                raise VmError(f"VM {spec.vm_id}: {name} {path} does not exist")
        vm_dir = self.vm_dir(spec.vm_id)
        vm_dir.mkdir(parents=True, exist_ok=True)
        spec_path = vm_dir / "spec.json"
        old = spec_path.read_text() if spec_path.exists() else None
        if old is not None and old != spec.to_json():
            if self.is_alive(spec.vm_id):
                raise VmError(f"VM {spec.vm_id} is running with another spec; stop it first")
            was = VmSpec.from_json(old)
            if (was.image, was.disk_gb) != (spec.image, spec.disk_gb):
                (vm_dir / "overlay.qcow2").unlink(missing_ok=True)
        overlay = vm_dir / "overlay.qcow2"
        if spec.image is not None and not spec.writable_image and not overlay.exists():
            # the image is shared by every replica on the host: each VM writes only its overlay,
            # whose virtual size is the VM's disk: qcow2 allocates at most that (and its tables),
            # and nothing the guest does resizes it, so the host's disk holds what was booked
            size = []
            if spec.disk_gb is not None:
                image_bytes = spec.image.stat().st_size
                if image_bytes > spec.disk_gb * GIB:
                    raise VmError(
                        f"VM {spec.vm_id}: its image's filesystem is {-(-image_bytes // GIB)} GiB, more than "
                        f"its disk of {spec.disk_gb} GiB (the instance's resources.disk_gb): give the instance "
                        f"at least the Formfile's DISK")
                size = [str(spec.disk_gb * GIB)]
            tmp = vm_dir / "overlay.qcow2.tmp"
            await self._run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", "raw",
                             "-b", str(spec.image.resolve()), str(tmp), *size], what="qemu-img create")
            tmp.rename(overlay)
        write_atomic(spec_path, spec.to_json())
        return vm_dir

    def command(self, spec: VmSpec, *, daemonize: bool = True) -> list[str]:
        """QEMU's command line for `spec` (run from the VM's directory)."""
        vm_dir = self.vm_dir(spec.vm_id)
        microvm = spec.machine == "microvm"
        append = ["console=ttyS0", "reboot=t", "quiet", "panic=-1", f"fm.mode={spec.mode}"]
        if spec.user_net:  # QEMU's fixed user-mode addresses
            append += [f"fm.ip={USER_NET_GUEST}", f"fm.gw={USER_NET_HOST}", f"fm.dns={USER_NET_DNS}"]
        for key, value in (("ip", spec.ip_cidr), ("gw", spec.gateway),
                           ("hostname", spec.hostname)):
            if value:
                append.append(f"fm.{key}={value}")
        if self.accel == "tcg" and microvm:
            append.append(f"tsc_early_khz={tsc_khz()}")  # else the guest may find no clocksource
        if spec.secrets is not None:
            append.append(f"fm.secrets={SECRETS_SERIAL}")  # the guest waits for that disk
        if spec.extra_append:
            append.append(spec.extra_append)
        cmd = [QEMU]
        if daemonize:
            cmd += ["-daemonize"]
        cmd += [
            "-pidfile", str(vm_dir / "qemu.pid"),
            "-name", spec.vm_id,
            "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
            "-M", spec.machine,
            "-accel", self.accel, "-cpu", "max" if self.accel == "tcg" else "host",
            "-m", str(spec.memory_mb), "-smp", str(spec.vcpus),
            "-kernel", str(spec.kernel.resolve()), "-initrd", str(spec.initrd.resolve()),
            "-append", " ".join(append),
            # appended across boots: the output before a crash stays readable after the restart
            "-chardev", f"file,id=con0,path={_opt(vm_dir / 'console.log')},append=on",
            "-serial", "chardev:con0",
            "-D", str(vm_dir / "qemu.log"),
            # relative: QEMU starts in vm_dir, and an absolute path could exceed the 108 bytes
            # of a unix socket address
            "-qmp", "unix:qmp.sock,server=on,wait=off",
        ]
        dev = "device" if microvm else "pci"
        if spec.image is not None:
            if spec.writable_image:
                drive = f"file={_opt(spec.image.resolve())},format=raw"
            else:
                drive = f"file={_opt(vm_dir / 'overlay.qcow2')},format=qcow2"
            cmd += ["-drive", f"id=d0,if=none,{drive}", "-device", f"virtio-blk-{dev},drive=d0"]
        if spec.secrets is not None:
            cmd += _secrets_disk(spec.secrets, dev)
        if spec.tap:
            mac = spec.mac or network.mac_for(spec.vm_id)
            cmd += ["-netdev", f"tap,id=n0,ifname={spec.tap},script=no,downscript=no",
                    "-device", f"virtio-net-{dev},netdev=n0,mac={mac}"]
        elif spec.user_net:
            cmd += ["-netdev", "user,id=n0", "-device",
                    f"virtio-net-{dev},netdev=n0,mac={spec.mac or network.mac_for(spec.vm_id)}"]
        for addr in spec.gpus:  # bound to vfio-pci by the host's operator (gpus.py)
            cmd += ["-device", f"vfio-pci,host={addr}"]
        if spec.netns:
            cmd = ["ip", "netns", "exec", spec.netns, *cmd]
        return cmd

    def _prepare_launch(self, vm_dir: Path) -> None:
        # stale files of the last run would answer for the new one
        for name in ("qmp.sock", "qemu.pid", "qemu.log", "launch.err"):
            (vm_dir / name).unlink(missing_ok=True)
        console = vm_dir / "console.log"
        with contextlib.suppress(OSError):
            if console.stat().st_size > CONSOLE_KEEP * 4:  # bounded: keep the last boots' end
                with console.open("rb") as f:
                    f.seek(-CONSOLE_KEEP, os.SEEK_END)
                    tail = f.read()
                console.write_bytes(tail)

    async def _setup_tap(self, spec: VmSpec) -> None:
        if spec.tap and spec.bridge:
            try:
                await network.create_tap(spec.tap, spec.bridge, spec.netns)
            except network.NetworkError as exc:
                raise VmError(f"VM {spec.vm_id}: tap: {exc}") from None

    def _launch_error(self, vm_dir: Path, rc: int | None) -> str:
        # QEMU writes its errors to the -D log when there is one, else to stderr: read both
        parts = []
        for name in ("launch.err", "qemu.log"):
            with contextlib.suppress(OSError):
                text = (vm_dir / name).read_text(errors="replace").strip()
                if text:
                    parts.append(text)
        return "; ".join(parts) or f"QEMU exited with status {rc}"

    async def boot(self, vm_id: str) -> float:
        """Launch the VM and return when QMP answers (the guest is starting then); the seconds
        that took. A VM that is already running is left alone."""
        spec = self.spec(vm_id)
        vm_dir = self.vm_dir(vm_id)
        if self.is_alive(vm_id):
            return 0.0
        for name in PATHS:
            path = getattr(spec, name)
            if path is not None and not path.is_file():
                raise VmError(f"VM {vm_id}: {name} {path} does not exist")
        await self._setup_tap(spec)
        self._prepare_launch(vm_dir)
        cmd = self.command(spec)
        started = time.time()
        t0 = trio.current_time()
        with open(vm_dir / "launch.err", "wb") as err:
            # -daemonize: the parent exits once the machine is built (status 1 and a message
            # when it cannot be); the VM is the grandchild, adopted by init
            with trio.fail_after(LAUNCH_TIMEOUT):
                proc = await trio.run_process(cmd, cwd=vm_dir, stdin=subprocess.DEVNULL,
                                              stdout=subprocess.DEVNULL, stderr=err, check=False)
        if proc.returncode != 0 or not self.is_alive(vm_id):
            raise VmError(f"VM {vm_id} did not start: {self._launch_error(vm_dir, proc.returncode)}")
        (vm_dir / "boot.json").write_text(json.dumps({"launched_at": started, "accel": self.accel,
                                                      "command": cmd}))
        try:
            await self._qmp(vm_id, "query-status")
        except BaseException:
            # a QEMU we cannot control is of no use, and would hold the tap: do not leave it
            with trio.CancelScope(shield=True):
                await self.kill(vm_id)
            raise
        return trio.current_time() - t0

    async def pause(self, vm_id: str) -> None:
        await self._qmp(vm_id, "stop")

    async def resume(self, vm_id: str) -> None:
        await self._qmp(vm_id, "cont")

    async def stop(self, vm_id: str, timeout: float = 30.0) -> str:
        """Stop gracefully: the ACPI power button (the guest stops its entrypoint, syncs and
        reboots, which ends QEMU), then QMP quit after `timeout`, then SIGKILL. How it ended:
        "powerdown", "quit", "killed", or "stopped" if it was not running."""
        if not self.is_alive(vm_id):
            return "stopped"
        with contextlib.suppress(VmError):
            status = await self._qmp(vm_id, "query-status")
            if status.get("status") == "paused":
                await self._qmp(vm_id, "cont")  # a paused guest cannot see the button
            await self._qmp(vm_id, "system_powerdown")
            if await self._wait_gone(vm_id, timeout):
                return "powerdown"
        with contextlib.suppress(VmError):
            await self._qmp(vm_id, "quit")
        if await self._wait_gone(vm_id, 5.0):
            return "quit"
        await self.kill(vm_id)
        return "killed"

    async def kill(self, vm_id: str) -> None:
        """SIGKILL, and wait until the process is gone."""
        pid = self.pid(vm_id)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not await self._wait_gone(vm_id, 10.0):
            raise VmError(f"VM {vm_id}: QEMU (pid {pid}) survived SIGKILL")

    async def delete(self, vm_id: str) -> None:
        """Kill the VM if it runs; remove its tap and its directory. No error if missing."""
        vm_dir = self.vm_dir(vm_id)
        if not vm_dir.exists():
            return
        await self.kill(vm_id)
        with contextlib.suppress(VmError, ValueError):
            spec = self.spec(vm_id)
            if spec.tap:
                await network.delete_link(spec.tap, spec.netns)
        await trio.to_thread.run_sync(shutil.rmtree, vm_dir)
        self._locks.pop(vm_id, None)

    async def _wait_gone(self, vm_id: str, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while self.is_alive(vm_id):
                await trio.sleep(POLL)
            return True
        return False

    # ---- observation ----

    async def status(self, vm_id: str) -> VmStatus:
        if not (self.vm_dir(vm_id) / "spec.json").exists():
            return VmStatus("missing")
        pid = self.pid(vm_id)
        launched_at = self._launch_info(vm_id).get("launched_at")
        if pid is None:
            return VmStatus("stopped", launched_at=launched_at)
        try:
            qemu_status = (await self._qmp(vm_id, "query-status"))["status"]
        except VmError:
            if not self.is_alive(vm_id):  # it ended while we asked
                return VmStatus("stopped", launched_at=launched_at)
            # alive but QMP does not answer (busy with another client): alive is what we know
            return VmStatus("running", pid, "unknown", launched_at)
        # any other state with a live process (internal-error, guest-panicked, ...) has the
        # vCPUs stopped: reported as paused, with QEMU's word in qemu_status
        state = "running" if qemu_status == "running" else "paused"
        return VmStatus(state, pid, qemu_status, launched_at)

    async def metrics(self, vm_id: str) -> VmMetrics:
        """CPU time and memory of the QEMU process (what the VM costs the host), and its age."""
        pid = self.pid(vm_id)
        stat = _proc_stat(pid) if pid is not None else None
        status = _read_proc(pid, "status") if pid is not None else None
        if stat is None or status is None:
            raise VmError(f"VM {vm_id} is not running")
        tick = os.sysconf("SC_CLK_TCK")
        rss_kb = 0
        for line in status.decode().splitlines():
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
        host_uptime = float(Path("/proc/uptime").read_text().split()[0])
        # fields 14, 15 (utime, stime) and 22 (start time, in ticks after host boot)
        return VmMetrics(cpu_seconds=(int(stat[11]) + int(stat[12])) / tick,
                         rss_bytes=rss_kb * 1024,
                         uptime_s=max(0.0, host_uptime - int(stat[19]) / tick))

    def console_log(self, vm_id: str, tail_bytes: int | None = None) -> str:
        return read_tail(self.vm_dir(vm_id) / "console.log", tail_bytes)

    def console_size(self, vm_id: str) -> int:
        try:
            return (self.vm_dir(vm_id) / "console.log").stat().st_size
        except OSError:
            return -1

    async def wait_console(self, vm_id: str, marker: str, timeout: float) -> float:
        """Wait for `marker` on the console; the seconds from launch to when it was seen.
        Fails early if the VM dies first (with the end of the console in the message)."""
        path = self.vm_dir(vm_id) / "console.log"
        needle = marker.encode()
        launched_at = self._launch_info(vm_id).get("launched_at", time.time())
        offset, carry = 0, b""
        try:
            with trio.fail_after(timeout):
                while True:
                    chunk, offset = _read_from(path, offset)
                    if needle in carry + chunk:
                        return time.time() - launched_at
                    carry = (carry + chunk)[-len(needle):]
                    if not self.is_alive(vm_id):
                        chunk, offset = _read_from(path, offset)  # its last words
                        if needle in carry + chunk:
                            return time.time() - launched_at
                        raise VmError(f"VM {vm_id} ended before {marker!r} appeared: "
                                      f"{self.console_log(vm_id, 2000)}")
                    await trio.sleep(POLL)
        except trio.TooSlowError:
            raise VmError(f"VM {vm_id}: {marker!r} not on the console after {timeout} s") from None

    # ---- build VMs ----

    async def run_to_exit(self, spec: VmSpec, timeout: float,
                          on_line: Callable[[str], Any] | None = None) -> int:
        """Boot `spec` in the foreground and wait for QEMU to exit (the guest powers off when its
        work is done); console lines go to `on_line` as they come. QEMU's exit status. On timeout
        the VM is killed and VmError raised. The VM's directory stays (console.log); delete it."""
        vm_dir = await self.create(spec)
        if self.is_alive(spec.vm_id):
            raise VmError(f"VM {spec.vm_id} is already running")
        await self._setup_tap(spec)
        self._prepare_launch(vm_dir)
        (vm_dir / "console.log").unlink(missing_ok=True)
        cmd = self.command(spec, daemonize=False)
        (vm_dir / "boot.json").write_text(json.dumps({"launched_at": time.time(),
                                                      "accel": self.accel, "command": cmd}))
        tail = _LineTail(vm_dir / "console.log", on_line)
        with open(vm_dir / "launch.err", "wb") as err:
            proc = await trio.lowlevel.open_process(cmd, cwd=vm_dir, stdin=subprocess.DEVNULL,
                                                    stdout=subprocess.DEVNULL, stderr=err)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tail.follow)
                with trio.move_on_after(timeout) as waited:
                    await proc.wait()
                nursery.cancel_scope.cancel()
        finally:
            if proc.returncode is None:  # timed out, or we were cancelled
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
        tail.drain()
        if waited.cancelled_caught:
            raise VmError(f"VM {spec.vm_id} timed out after {timeout} s")
        if proc.returncode != 0:
            message = self._launch_error(vm_dir, proc.returncode)
            raise VmError(f"VM {spec.vm_id}: QEMU exited with status {proc.returncode}: {message}")
        return proc.returncode

    # ---- QMP ----

    def _lock(self, vm_id: str) -> trio.Lock:
        return self._locks.setdefault(vm_id, trio.Lock())

    async def _qmp(self, vm_id: str, command: str, arguments: dict | None = None,
                   timeout: float = QMP_TIMEOUT) -> Any:
        if not self.is_alive(vm_id):
            if not (self.vm_dir(vm_id) / "spec.json").exists():
                raise VmError(f"no VM {vm_id!r}")
            raise VmError(f"VM {vm_id} is not running")
        sock = self.vm_dir(vm_id) / "qmp.sock"
        try:
            async with self._lock(vm_id):
                with _short_path(sock) as short, trio.fail_after(timeout):
                    async with trio.open_nursery() as nursery:
                        client = await QmpClient.connect(short, nursery, timeout=timeout)
                        try:
                            return await client.execute(command, arguments, timeout=timeout)
                        finally:
                            await client.aclose()
                            nursery.cancel_scope.cancel()
        except QmpError as exc:
            # `quit` may close the socket before its answer arrives
            if command == "quit" and exc.error_class == "ConnectionClosed":
                return None
            raise VmError(f"VM {vm_id}: QMP {command}: {exc}") from None
        except (trio.TooSlowError, OSError) as exc:
            raise VmError(f"VM {vm_id}: QMP {command}: {exc!r}") from None

    # ---- helpers ----

    async def _run(self, cmd: list[str], *, what: str) -> None:
        try:
            proc = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True,
                                          check=False, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise VmError(f"{what}: {exc}") from None
        if proc.returncode != 0:
            raise VmError(f"{what}: {proc.stderr.decode(errors='replace').strip()}")


def _read_from(path: Path, offset: int) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return b"", offset
    return data, offset + len(data)


class _LineTail:
    """Console lines of a file that QEMU is writing, handed out whole as they complete."""

    def __init__(self, path: Path, on_line: Callable[[str], Any] | None):
        self.path = path
        self.on_line = on_line
        self.offset = 0
        self.partial = b""

    def drain(self, final: bool = True) -> None:
        chunk, self.offset = _read_from(self.path, self.offset)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        if final and self.partial:
            lines.append(self.partial)
            self.partial = b""
        if self.on_line is not None:
            for line in lines:
                self.on_line(line.rstrip(b"\r").decode(errors="replace"))

    async def follow(self) -> None:
        while True:
            self.drain(final=False)
            await trio.sleep(POLL)
