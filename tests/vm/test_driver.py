"""The QEMU driver and the accelerator choice. The fast tests need no guest; the slow ones boot real
TCG guests (about 3 s of both cores each), so there are few of them and each checks a lot."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import trio

from formation.vm import network
from formation.vm.accel import AccelError, choose_accel, tsc_khz
from formation.vm.driver import QemuDriver
from formation.vm.spec import VmError, VmSpec
from tests.vm_support import boot_kit, http_get, needs_qemu, needs_root, netns

ENTRYPOINT = "mkdir -p /www; echo hello-from-vm > /www/index.html; exec httpd -f -p 8000 -h /www\n"


# ---- accelerator ----

def fake_host(tmp_path: Path, *, kvm: bool = True, flags: str = "fpu vmx sse2",
              pvm: bool = False) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\ncpu MHz\t\t: 2445.428\nflags\t\t: {flags}\n\n"
                       f"processor\t: 1\ncpu MHz\t\t: 1200.000\nflags\t\t: {flags}\n")
    kvm_dev = tmp_path / "kvm"
    if kvm:
        kvm_dev.touch()
    pvm_module = tmp_path / "kvm_pvm"
    if pvm:
        pvm_module.mkdir()
    return {"kvm_dev": kvm_dev, "cpuinfo": cpuinfo, "pvm_module": pvm_module}


def test_kvm_only_with_hardware_virtualisation_and_no_pvm(tmp_path):
    assert choose_accel(**fake_host(tmp_path / "a")) == "kvm"
    assert choose_accel(**fake_host(tmp_path / "b", flags="fpu svm")) == "kvm"
    assert choose_accel(**fake_host(tmp_path / "c", flags="fpu sse2")) == "tcg"
    assert choose_accel(**fake_host(tmp_path / "d", kvm=False)) == "tcg"
    assert choose_accel(**fake_host(tmp_path / "e", pvm=True)) == "tcg"


def test_accel_override(tmp_path):
    usable = fake_host(tmp_path / "a")
    assert choose_accel("tcg", **usable) == "tcg"
    assert choose_accel("auto", **usable) == "kvm"
    assert choose_accel("KVM", **usable) == "kvm"
    with pytest.raises(AccelError, match="PVM"):
        choose_accel("kvm", **fake_host(tmp_path / "b", pvm=True))
    with pytest.raises(AccelError, match="unknown accelerator"):
        choose_accel("hvf", **usable)


def test_tsc_khz(tmp_path):
    host = fake_host(tmp_path / "h")
    tsc_freq = tmp_path / "tsc_freq_khz"
    assert tsc_khz(tsc_freq=tsc_freq, cpuinfo=host["cpuinfo"]) == 2445428  # the first CPU's
    tsc_freq.write_text("2300000\n")
    assert tsc_khz(tsc_freq=tsc_freq, cpuinfo=host["cpuinfo"]) == 2300000
    with pytest.raises(AccelError):
        tsc_khz(tsc_freq=tmp_path / "none", cpuinfo=tmp_path / "none")


def test_this_host_gets_an_answer():
    assert choose_accel() in ("kvm", "tcg")
    assert 100_000 < tsc_khz() < 10_000_000


# ---- specs and bad input (no QEMU started) ----

def kit_files(tmp_path: Path) -> tuple[Path, Path]:
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd.gz"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    return kernel, initrd


def test_bad_vm_ids_are_refused(tmp_path):
    kernel, initrd = kit_files(tmp_path)
    for bad in ("", "a/b", "../x", "a b", "x" * 129, "é"):
        with pytest.raises(ValueError):
            VmSpec(bad, kernel, initrd, None, mode="probe")
        with pytest.raises(ValueError):
            QemuDriver(tmp_path, accel="tcg").vm_dir(bad)
    # "." and ".." are valid ids; the directory prefix keeps them harmless
    assert QemuDriver(tmp_path, accel="tcg").vm_dir("..") == tmp_path / "vm-.."


def test_spec_validation_and_json(tmp_path):
    kernel, initrd = kit_files(tmp_path)
    with pytest.raises(ValueError, match="without an image"):
        VmSpec("a", kernel, initrd, None)
    with pytest.raises(ValueError, match="mode"):
        VmSpec("a", kernel, initrd, tmp_path / "img", mode="fly")
    with pytest.raises(ValueError, match="hostname"):
        VmSpec("a", kernel, initrd, tmp_path / "img", hostname="two words")
    spec = VmSpec("a", kernel, initrd, tmp_path / "img", tap="fmt0", ip_cidr="10.0.0.2/24")
    assert VmSpec.from_json(spec.to_json()) == spec


async def test_missing_files_and_unknown_vms(tmp_path):
    kernel, initrd = kit_files(tmp_path)
    driver = QemuDriver(tmp_path / "state", accel="tcg")
    missing = tmp_path / "nope" / "vmlinux"
    with pytest.raises(VmError, match=str(missing)):
        await driver.create(VmSpec("a", missing, initrd, None, mode="probe"))
    with pytest.raises(VmError, match=str(tmp_path / "img.ext4")):
        await driver.create(VmSpec("a", kernel, initrd, tmp_path / "img.ext4"))
    with pytest.raises(VmError, match="no VM 'ghost'"):
        await driver.boot("ghost")
    with pytest.raises(VmError, match="ghost"):
        await driver.pause("ghost")
    assert (await driver.status("ghost")).state == "missing"
    assert driver.list() == [] and not driver.is_alive("ghost")
    await driver.delete("ghost")  # nothing to delete: fine
    assert await driver.stop("ghost") == "stopped"


def test_command_line(tmp_path):
    kernel, initrd = kit_files(tmp_path)
    image = tmp_path / "img.ext4"
    driver = QemuDriver(tmp_path, accel="tcg")
    spec = VmSpec("web", kernel, initrd, image, tap="fmt0", ip_cidr="10.0.0.2/24",
                  gateway="10.0.0.1", hostname="web", netns="ns1", extra_append="fm.dns=1.1.1.1")
    cmd = driver.command(spec)
    assert cmd[:4] == ["ip", "netns", "exec", "ns1"] and "-daemonize" in cmd
    append = cmd[cmd.index("-append") + 1].split()
    assert {"console=ttyS0", "reboot=t", "panic=-1", "fm.mode=run", "fm.ip=10.0.0.2/24",
            "fm.gw=10.0.0.1", "fm.hostname=web", "fm.dns=1.1.1.1"} <= set(append)
    assert any(a.startswith("tsc_early_khz=") for a in append)
    assert "virtio-blk-device,drive=d0" in cmd
    assert f"virtio-net-device,netdev=n0,mac={network.mac_for('web')}" in cmd
    assert any("overlay.qcow2,format=qcow2" in a for a in cmd)

    q35 = driver.command(VmSpec("web", kernel, initrd, image, machine="q35",
                                writable_image=True), daemonize=False)
    assert "-daemonize" not in q35 and "virtio-blk-pci,drive=d0" in q35
    assert not any("tsc_early_khz" in a for a in q35)  # q35 has timers to calibrate against
    assert any(a.endswith(f"file={image},format=raw") for a in q35)

    # QEMU option lists separate with commas: a comma in a path is doubled
    odd = QemuDriver(tmp_path / "a,b", accel="tcg").command(spec)
    assert f"file,id=con0,path={tmp_path}/a,,b/vm-web/console.log,append=on" in odd


@needs_qemu
async def test_create_is_idempotent_and_overlays_the_image(tmp_path):
    kernel, initrd = kit_files(tmp_path)
    image = tmp_path / "img.ext4"
    image.write_bytes(b"\0" * 1024 * 1024)
    driver = QemuDriver(tmp_path / "state", accel="tcg")
    spec = VmSpec("a", kernel, initrd, image)
    vm_dir = await driver.create(spec)
    overlay = vm_dir / "overlay.qcow2"
    made = overlay.stat().st_mtime_ns
    assert await driver.create(spec) == vm_dir and overlay.stat().st_mtime_ns == made
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(overlay)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["backing-filename"] == str(image) and info["backing-filename-format"] == "raw"
    assert driver.list() == ["a"] and driver.spec("a") == spec
    assert (await driver.status("a")).state == "stopped"
    await driver.delete("a")
    assert not vm_dir.exists()


@needs_qemu
async def test_qemu_launch_errors_carry_qemus_message(tmp_path):
    _, initrd = kit_files(tmp_path)
    junk = tmp_path / "junk-kernel"
    junk.write_bytes(os.urandom(4096))
    driver = QemuDriver(tmp_path / "state", accel="tcg")
    await driver.create(VmSpec("bad", junk, initrd, None, mode="probe"))
    with pytest.raises(VmError, match="did not start: qemu: .*kernel"):
        await driver.boot("bad")
    assert not driver.is_alive("bad")
    await driver.delete("bad")


# ---- real guests (TCG) ----

def make_image(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc/formation").mkdir(parents=True)
    (root / "etc/formation/entrypoint").write_text(ENTRYPOINT)
    image = tmp_path / "img.ext4"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(root), "-F", str(image), "64M"],
                   check=True, capture_output=True)
    return image


def qemu_pids_for(path: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(path).encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


async def get(ns: str, url: str, timeout: float = 1.0) -> str | None:
    return await trio.to_thread.run_sync(http_get, ns, url, timeout)


async def wait_http(ns: str, url: str, timeout: float) -> str:
    with trio.fail_after(timeout):
        while (body := await get(ns, url)) is None:
            await trio.sleep(0.2)
    return body


@pytest.mark.slow
@needs_qemu
@needs_root
async def test_web_vm_lifecycle(tmp_path):
    kit = boot_kit()
    image = make_image(tmp_path)
    driver = QemuDriver(tmp_path / "state")
    url = "http://10.213.7.2:8000/"
    with netns() as ns:
        await network.ensure_bridge("fmbr7", "10.213.7.1/24", ns)
        tap = network.tap_name("web-1")
        spec = VmSpec("web-1", kit.kernel, kit.initrd, image, tap=tap, bridge="fmbr7",
                      ip_cidr="10.213.7.2/24", gateway="10.213.7.1", hostname="web-1", netns=ns)
        vm_dir = await driver.create(spec)
        try:
            t0 = time.monotonic()
            await driver.boot("web-1")
            assert await wait_http(ns, url, 30) == "hello-from-vm\n"
            print(f"boot -> HTTP answer: {time.monotonic() - t0:.2f} s")
            assert (await driver.status("web-1")).state == "running"
            assert "FORMATION-GUEST-INIT" in driver.console_log("web-1")

            await driver.pause("web-1")
            assert (await driver.status("web-1")).state == "paused"
            assert await get(ns, url) is None
            await driver.resume("web-1")
            assert await wait_http(ns, url, 10) == "hello-from-vm\n"

            m = await driver.metrics("web-1")
            assert m.cpu_seconds > 0 and m.rss_bytes > 50 * 2**20 and 0 < m.uptime_s < 120

            t1 = time.monotonic()
            assert await driver.stop("web-1", timeout=20) == "powerdown"
            print(f"stop (powerdown): {time.monotonic() - t1:.2f} s")
            assert "FORMATION-GUEST stopped" in driver.console_log("web-1")
            assert (await driver.status("web-1")).state == "stopped"
        finally:
            await driver.delete("web-1")
        assert not vm_dir.exists() and qemu_pids_for(vm_dir) == []
        assert not await network.link_exists(tap, ns)


@pytest.mark.slow
@needs_qemu
async def test_a_restarted_node_adopts_running_vms(tmp_path):
    kit = boot_kit()
    image = make_image(tmp_path)
    first = QemuDriver(tmp_path / "state")
    vm_dir = await first.create(VmSpec("svc@1", kit.kernel, kit.initrd, image))
    try:
        await first.boot("svc@1")
        await first.wait_console("svc@1", "FORMATION-GUEST entrypoint-start", 30)
        second = QemuDriver(tmp_path / "state")  # a new node process, same disk
        assert second.list() == ["svc@1"]
        status = await second.status("svc@1")
        assert status.state == "running" and status.pid == first.pid("svc@1")
        await second.kill("svc@1")
        assert (await second.status("svc@1")).state == "stopped"
        assert (await first.status("svc@1")).state == "stopped"
        # a stopped VM boots again; a guest that cannot see the power button yet (it has not
        # loaded the ACPI button module) is ended by QMP quit
        assert await second.boot("svc@1") > 0
        assert await second.stop("svc@1", timeout=0) == "quit"
    finally:
        await first.delete("svc@1")
    assert not vm_dir.exists() and qemu_pids_for(vm_dir) == []


@pytest.mark.slow
@needs_qemu
async def test_probe_boot_runs_to_exit(tmp_path):
    kit = boot_kit()
    driver = QemuDriver(tmp_path / "state")
    spec = VmSpec("probe", kit.kernel, kit.initrd, None, mode="probe")
    lines: list[str] = []
    t0 = time.monotonic()
    assert await driver.run_to_exit(spec, timeout=60, on_line=lines.append) == 0
    print(f"probe boot, launch -> exit: {time.monotonic() - t0:.2f} s")
    assert any(line.startswith("FORMATION-GUEST-INIT uptime=") for line in lines)
    assert not driver.is_alive("probe")

    # too short a timeout: killed, and said so
    with pytest.raises(VmError, match="timed out after 0.3 s"):
        await driver.run_to_exit(spec, timeout=0.3)
    vm_dir = driver.vm_dir("probe")
    assert qemu_pids_for(vm_dir) == []
    await driver.delete("probe")
    assert not vm_dir.exists()


def test_console_log_is_kept_across_boots_but_bounded(tmp_path):
    from formation.vm.driver import CONSOLE_KEEP

    driver = QemuDriver(tmp_path)
    vm_dir = driver.vm_dir("web")
    vm_dir.mkdir(parents=True)
    (vm_dir / "console.log").write_bytes(b"old boot\n")
    driver._prepare_launch(vm_dir)
    assert (vm_dir / "console.log").read_bytes() == b"old boot\n"  # small: kept whole
    (vm_dir / "console.log").write_bytes(b"x" * (CONSOLE_KEEP * 4) + b"the end\n")
    driver._prepare_launch(vm_dir)
    kept = (vm_dir / "console.log").read_bytes()
    assert len(kept) == CONSOLE_KEEP and kept.endswith(b"the end\n")


# ---- the secrets disk ----

def test_secrets_disk_on_the_command_line_and_in_the_spec(tmp_path):
    kernel, initrd = kit_files(tmp_path)
    image, secrets = tmp_path / "img.ext4", tmp_path / "secrets.tar"
    driver = QemuDriver(tmp_path, accel="tcg")
    plain = driver.command(VmSpec("web", kernel, initrd, image))
    assert not any("fm-secrets" in a for a in plain) and "id=d1" not in " ".join(plain)
    for machine, dev in (("microvm", "virtio-blk-device"), ("q35", "virtio-blk-pci")):
        spec = VmSpec("web", kernel, initrd, image, machine=machine, secrets=str(secrets))
        assert spec.secrets == secrets and VmSpec.from_json(spec.to_json()) == spec
        cmd = driver.command(spec)
        assert f"id=d1,if=none,file={secrets},format=raw,readonly=on" in cmd
        assert f"{dev},drive=d1,serial=fm-secrets" in cmd
        # after the root disk: the guest's stage 1 mounts the first one
        assert cmd.index(f"{dev},drive=d0") < cmd.index(f"{dev},drive=d1,serial=fm-secrets")
        assert "fm.secrets=fm-secrets" in cmd[cmd.index("-append") + 1].split()


async def test_a_missing_secrets_file_is_refused(tmp_path):
    kernel, initrd = kit_files(tmp_path)
    image = tmp_path / "img.ext4"
    image.write_bytes(b"\0" * 4096)
    driver = QemuDriver(tmp_path / "state", accel="tcg")
    with pytest.raises(VmError, match="secrets .*nope.tar does not exist"):
        await driver.create(VmSpec("a", kernel, initrd, image, secrets=tmp_path / "nope.tar"))


def busybox_image(tmp_path: Path, entrypoint: str) -> Path:
    """An image with nothing but an entrypoint, run by the guest's busybox."""
    root = tmp_path / "bb-root"
    (root / "etc/formation").mkdir(parents=True)
    (root / "etc/formation/entrypoint").write_text(entrypoint)
    image = tmp_path / "bb.ext4"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(root), "-F", str(image), "64M"],
                   check=True, capture_output=True)
    return image


SECRETS_ENTRYPOINT = """\
sum() { md5sum | cut -d' ' -f1; }
echo "env-sum=$(printf %s "$API_KEY" | sum) file-sum=$(sum < /run/secrets/API_KEY)"
echo "perms=$(stat -c %a /run/secrets)/$(stat -c %a /run/secrets/API_KEY)/$(stat -c %a /run/formation/secrets)"
echo "binary-in-env=${BLOB:-none} binary-file=$(sum < /run/secrets/BLOB)"
exec sleep 3600
"""


@pytest.mark.slow
@needs_qemu
async def test_secrets_reach_the_entrypoint_on_both_machines(tmp_path):
    """The secrets tar as the second disk: its values in the entrypoint's environment and in
    /run/secrets, on microvm (virtio-mmio) and q35 (PCI), whatever order the kernel names the
    disks in; and the console never shows a value."""
    import hashlib

    from formation.guest import secrets_tar

    kit = boot_kit()
    image = busybox_image(tmp_path, SECRETS_ENTRYPOINT)
    value, blob = b"s3cr3t 'quoted' $HOME\nline2", b"\0\1binary"
    secrets = tmp_path / "secrets.tar"
    secrets.write_bytes(secrets_tar({"API_KEY": value, "BLOB": blob}))
    sums = f"env-sum={hashlib.md5(value).hexdigest()} file-sum={hashlib.md5(value).hexdigest()}"
    driver = QemuDriver(tmp_path / "state")
    for machine in ("microvm", "q35"):
        vm_id = f"sec-{machine}"
        await driver.create(VmSpec(vm_id, kit.kernel, kit.initrd, image, machine=machine, secrets=secrets))
        try:
            await driver.boot(vm_id)
            await driver.wait_console(vm_id, "binary-file=", 60)
            log = driver.console_log(vm_id)
            assert sums in log, log
            assert "perms=500/400/700" in log
            assert f"binary-in-env=none binary-file={hashlib.md5(blob).hexdigest()}" in log
            assert "FORMATION-GUEST secrets: 2 in /run/secrets" in log
            assert "s3cr3t" not in log
        finally:
            await driver.delete(vm_id)
    # a guest told of a secrets disk that is not there does not start its entrypoint without it
    await driver.create(VmSpec("sec-none", kit.kernel, kit.initrd, image, extra_append="fm.secrets=fm-secrets"))
    try:
        await driver.boot("sec-none")
        await driver.wait_console("sec-none", "FORMATION-GUEST entrypoint-exit rc=1", 60)
        log = driver.console_log("sec-none")
        assert "the entrypoint cannot start: no secrets disk (serial fm-secrets)" in log
        assert "env-sum=" not in log
    finally:
        await driver.delete("sec-none")
