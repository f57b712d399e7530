"""What VM tests share: the guest boot kit (made once, cached across runs) and throwaway network
namespaces that are deleted even when a test fails. Traffic from VM tests stays inside them."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from formation.vm.kit import BootKit, ensure_kit

# kept between runs so that only the first run downloads the kernel (and debootstraps the base)
CACHE = Path(os.environ.get("FORMATION_TEST_CACHE", "/var/cache/formation-test"))
QEMU = shutil.which("qemu-system-x86_64")

needs_qemu = pytest.mark.skipif(QEMU is None and not os.environ.get("CI"),
                                reason="qemu-system-x86_64 is not installed (./dev test installs it)")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="VM networking needs root")

_kit: BootKit | None = None


def boot_kit() -> BootKit:
    global _kit
    if _kit is None:
        _kit = ensure_kit(CACHE / "kit")
    return _kit


def debian_base() -> None:
    """The Debian base every image build starts from, made (or found) in the shared cache: a node
    in a network namespace has no route to the mirror, so its builds need it made beforehand."""
    from formation.pack.base import ensure_base

    ensure_base(CACHE / "base")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@contextlib.contextmanager
def netns(prefix: str = "fmt"):
    """A fresh network namespace with lo up; deleted (with everything in it) on exit."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        # QEMU processes holding taps in the namespace keep it alive; kill them first
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        ip("netns", "del", name, check=False)


def in_netns(ns: str, *cmd: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          timeout=timeout)


def http_get(ns: str, url: str, timeout: float = 3.0) -> str | None:
    """GET url from inside the namespace; the body, or None if nothing answered."""
    code = (f"import urllib.request,sys\n"
            f"sys.stdout.write(urllib.request.urlopen({url!r}, timeout={timeout}).read().decode())")
    try:
        proc = in_netns(ns, "python3", "-c", code, timeout=timeout + 5)
    except subprocess.TimeoutExpired:
        return None
    return proc.stdout if proc.returncode == 0 else None


def build_machine(driver, kit: BootKit):
    """A BuildMachine over the real driver, as the node makes it (formation/node/vmhost.py)."""
    from formation.vm.spec import VmSpec

    async def machine(image, *, vcpus, memory_mb, timeout, on_line, network=False):
        vm_id = f"build-{secrets.token_hex(4)}"
        spec = VmSpec(vm_id=vm_id, kernel=kit.kernel, initrd=kit.initrd, image=image, vcpus=vcpus,
                      memory_mb=memory_mb, mode="build", writable_image=True, user_net=network)
        try:
            await driver.run_to_exit(spec, timeout, on_line)
        finally:
            await driver.delete(vm_id)

    return machine
