"""Debian packages fetched with the host's apt into a folder of our own, never installed on the host.

Both the guest boot kit (kernel, busybox) and the image builder (a Formfile's INSTALL lines) need
Debian packages while the host may be any Debian or Ubuntu. apt can work on a private tree
(`-o Dir=...`): its own sources, lists, dpkg status and archive cache. Nothing is unpacked or run
here; that happens with dpkg -x (trusted Debian files) or inside a build VM.

This module imports nothing of formation, so any layer may use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
SUITE = "bookworm"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


class AptError(Exception):
    """apt could not do what was asked; the message is apt's own E: lines."""


def sources_list(suite: str = SUITE, mirror: str = MIRROR, security: str = SECURITY_MIRROR) -> str:
    signed = f"[signed-by={KEYRING}]"
    return (f"deb {signed} {mirror} {suite} main\n"
            f"deb {signed} {mirror} {suite}-updates main\n"
            f"deb {signed} {security} {suite}-security main\n")


@dataclass(frozen=True)
class AptTree:
    """A folder laid out like a Debian root as far as apt is concerned.

    `root` may be a real root filesystem (debootstrap output: its dpkg status says what is
    installed, so a download of a package's closure fetches only what is missing) or a bare tree
    made by `init` (empty status: a download fetches exactly the packages named).
    """

    root: Path

    @classmethod
    def init(cls, root: Path, sources: str | None = None) -> AptTree:
        for sub in ("etc/apt/sources.list.d", "etc/apt/preferences.d", "etc/apt/apt.conf.d",
                    "etc/apt/trusted.gpg.d", "var/lib/apt/lists/partial",
                    "var/cache/apt/archives/partial", "var/lib/dpkg"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        status = root / "var/lib/dpkg/status"
        if not status.exists():
            status.touch()
        (root / "etc/apt/sources.list").write_text(sources or sources_list())
        return cls(root)

    def options(self) -> list[str]:
        r = str(self.root)
        return ["-o", f"Dir={r}", "-o", f"Dir::State::status={r}/var/lib/dpkg/status",
                "-o", "Dir::Etc::trustedparts=/etc/apt/trusted.gpg.d",
                "-o", "APT::Architecture=amd64", "-o", "Debug::NoLocking=1",
                # the private tree belongs to root; apt's _apt sandbox user could not write it
                "-o", "APT::Sandbox::User=root", "-o", "APT::Install-Recommends=false",
                "-o", "Acquire::Retries=3"]

    def _apt(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
        proc = subprocess.run([tool, "-q", *self.options(), *args], cwd=cwd, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            errors = [line for line in (proc.stderr + proc.stdout).splitlines()
                      if line.startswith(("E:", "W:"))] or proc.stderr.strip().splitlines()[-5:]
            raise AptError("\n".join(errors) or f"{tool} exited with {proc.returncode}")
        return proc.stdout

    def update(self) -> None:
        self._apt("apt-get", "update")

    def depends(self, package: str) -> list[str]:
        """The packages `package` depends on directly (first alternative of each)."""
        out = self._apt("apt-cache", "depends", "--no-recommends", "--no-suggests", package)
        return [line.split(":", 1)[1].strip().strip("<>") for line in out.splitlines()
                if line.strip().startswith("Depends:")]

    def download(self, packages: list[str], dest: Path) -> list[Path]:
        """Exactly these packages' .debs into `dest` (no dependencies)."""
        dest.mkdir(parents=True, exist_ok=True)
        before = set(dest.glob("*.deb"))
        self._apt("apt-get", "download", *packages, cwd=dest)
        got = sorted(set(dest.glob("*.deb")) - before)
        return got or sorted(p for p in dest.glob("*.deb") if p.name.split("_")[0] in packages)

    def fetch_closure(self, packages: list[str]) -> list[Path]:
        """Download `packages` and whatever they need that the tree lacks into its apt archive
        cache, as `apt-get install --download-only` would; returns the .debs it holds after."""
        self._apt("apt-get", "install", "-y", "--download-only", *packages)
        return sorted((self.root / "var/cache/apt/archives").glob("*.deb"))


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive flock on `path` (blocking): nodes sharing a cache folder make each thing once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def unpack(deb: Path, dest: Path) -> None:
    """dpkg -x: unpack a package's files (no maintainer scripts run)."""
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AptError(f"dpkg-deb -x {deb.name}: {proc.stderr.strip()}")
