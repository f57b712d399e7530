"""Which QEMU accelerator a VM can use on this host, and the host TSC rate for TCG guests.

A /dev/kvm is not enough: on a host that is itself a PVM guest (kvm_pvm, Ant Group's software
virtualisation) /dev/kvm opens and KVM_CREATE_VM works, but only PVM-aware guest kernels run, and
ours is Debian's stock kernel. Hardware KVM shows as vmx/svm in the CPU flags. The paths are
parameters so that tests can feed fake files.
"""

from __future__ import annotations

from pathlib import Path

KVM_DEV = Path("/dev/kvm")
CPUINFO = Path("/proc/cpuinfo")
PVM_MODULE = Path("/sys/module/kvm_pvm")
TSC_FREQ = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz")

ACCELS = ("kvm", "tcg")


class AccelError(Exception):
    pass


def _cpu_flags(cpuinfo: Path) -> set[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())  # the first CPU is enough: flags are the same on all
    return set()


def kvm_problem(*, kvm_dev: Path = KVM_DEV, cpuinfo: Path = CPUINFO,
                pvm_module: Path = PVM_MODULE) -> str | None:
    """Why hardware KVM cannot run our kernel here, or None if it can."""
    if not kvm_dev.exists():
        return f"{kvm_dev} does not exist"
    if not _cpu_flags(cpuinfo) & {"vmx", "svm"}:
        return f"the CPU has no vmx/svm flag in {cpuinfo} (no hardware virtualisation)"
    if pvm_module.exists():
        return (f"{kvm_dev} is PVM ({pvm_module} is loaded), which runs only PVM-aware "
                "guest kernels")
    return None


def choose_accel(override: str | None = None, *, kvm_dev: Path = KVM_DEV, cpuinfo: Path = CPUINFO,
                 pvm_module: Path = PVM_MODULE) -> str:
    """"kvm" or "tcg". `override` (from config) may be "kvm", "tcg" or "auto"/None."""
    choice = (override or "auto").strip().lower()
    if choice == "tcg":
        return "tcg"
    if choice not in ("auto", "kvm"):
        raise AccelError(f"unknown accelerator {override!r}: use kvm, tcg or auto")
    problem = kvm_problem(kvm_dev=kvm_dev, cpuinfo=cpuinfo, pvm_module=pvm_module)
    if problem is None:
        return "kvm"
    if choice == "kvm":
        raise AccelError(f"accelerator kvm was asked for but cannot be used: {problem}")
    return "tcg"


def tsc_khz(*, tsc_freq: Path = TSC_FREQ, cpuinfo: Path = CPUINFO) -> int:
    """The host TSC rate in kHz, for the guest's `tsc_early_khz=`: under TCG a microvm guest has
    no HPET or PM timer to calibrate against, and without the hint it sometimes hangs at boot.
    The guest TSC runs at the host's rate, so the host's nominal rate is the right answer."""
    try:
        return int(tsc_freq.read_text().strip())
    except (OSError, ValueError):
        pass
    try:
        text = cpuinfo.read_text()
    except OSError as exc:
        raise AccelError(f"cannot read {cpuinfo}: {exc}") from None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            try:
                return round(float(value) * 1000)
            except ValueError:
                break
    raise AccelError(f"no TSC rate: neither {tsc_freq} nor a 'cpu MHz' line in {cpuinfo}")
