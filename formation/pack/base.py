"""The Debian base every image starts from: debootstrap once, then kept by the hash of its recipe.

minbase is enough: the guest's init, network set-up and power handling come from the boot kit's
busybox, so the image needs no systemd. Package lists are fetched into the base (host apt on the
base's tree) so that INSTALL lines can be resolved on the host and installed offline in the
build VM, which has no network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from formation.debian import MIRROR, SUITE, AptError, AptTree, file_lock, sources_list

BASE_VERSION = 1
VARIANT = "minbase"
# ca-certificates so that agents can speak HTTPS; everything else comes from INSTALL
INCLUDE = ("ca-certificates",)


class BaseError(Exception):
    pass


@dataclass(frozen=True)
class Base:
    base_id: str
    rootfs: Path


def recipe_id(suite: str = SUITE, mirror: str = MIRROR) -> str:
    recipe = {"v": BASE_VERSION, "suite": suite, "mirror": mirror, "variant": VARIANT,
              "include": list(INCLUDE)}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def ensure_base(cache_dir: Path, progress: Callable[[str], None] = lambda _m: None,
                suite: str = SUITE, mirror: str = MIRROR) -> Base:
    """The base rootfs, made first if missing (~30-40 s and ~100 MB download). Blocking; root only."""
    base_id = recipe_id(suite, mirror)
    home = cache_dir / f"base-{base_id}"
    if (home / "base.json").exists():
        return Base(base_id, home / "rootfs")
    with file_lock(cache_dir / ".lock"):
        return _make_base(cache_dir, home, base_id, progress, suite, mirror)


def _make_base(cache_dir: Path, home: Path, base_id: str, progress: Callable[[str], None],
               suite: str, mirror: str) -> Base:
    if (home / "base.json").exists():  # made by another node while we waited for the lock
        return Base(base_id, home / "rootfs")
    if os.geteuid() != 0:
        raise BaseError("making the Debian base image needs root (debootstrap)")
    if not shutil.which("debootstrap"):
        raise BaseError("debootstrap is not installed (apt-get install debootstrap)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        progress(f"debootstrap {suite} ({VARIANT}) from {mirror}: about half a minute")
        cmd = ["debootstrap", f"--variant={VARIANT}", "--include=" + ",".join(INCLUDE),
               suite, str(rootfs), mirror]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        retrieved = 0
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-20:]
            if line.startswith("I: Retrieving"):
                retrieved += 1
                if retrieved % 25 == 0:
                    progress(f"debootstrap: {retrieved} packages retrieved")
            elif line.startswith(("I: Installing core", "I: Installing base", "I: Base system installed")):
                progress("debootstrap: " + line.strip()[3:])
        if proc.wait() != 0:
            raise BaseError("debootstrap failed:\n" + "\n".join(tail))
        (rootfs / "etc/apt/sources.list").write_text(sources_list(suite, mirror))
        progress("fetching package lists into the base")
        try:
            AptTree(rootfs).update()
        except AptError as exc:
            raise BaseError(f"apt-get update in the base failed: {exc}") from None
        for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        (rootfs / "etc/hostname").write_text("formation\n")
        (rootfs / "etc/formation").mkdir(exist_ok=True)
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir()
        rootfs.rename(home / "rootfs")
    meta = {"base_id": base_id, "suite": suite, "mirror": mirror, "variant": VARIANT,
            "include": list(INCLUDE), "made_at": int(time.time()),
            "seconds": round(time.monotonic() - started, 1)}
    (home / "base.json").write_text(json.dumps(meta, indent=1))
    progress(f"base {base_id} ready in {meta['seconds']} s")
    return Base(base_id, home / "rootfs")
