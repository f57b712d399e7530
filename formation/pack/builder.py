"""Formfile + build context -> a bootable disk image, content-addressed and cached.

The host only does what runs no code of the user's: unpack the context, copy the base, resolve
and download the INSTALL packages (apt on the image's own tree), write files and make the ext4
image (mke2fs -d, nothing mounted). Every RUN and INSTALL, and USER's account commands, run
inside a build VM booted from that image with no network; its console carries a marker per
step, so progress and a failing step's line and output come back to the host. The VM itself is
not ours to start: the caller hands in a `BuildMachine` (the node gives it the QEMU driver).

Image id = sha256 over (builder version, canonical Formfile, context digest, base id); a second
build of the same inputs finds images/<id>/manifest.json and is a cache hit.

Over 400 lines because planning the steps and following the build VM share the step list; the
Formfile, the context and the base are their own modules.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shlex
import shutil
import tarfile
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from formation import guest
from formation.debian import AptError, AptTree
from formation.pack import context as ctx
from formation.pack.base import Base, BaseError, ensure_base, recipe_id
from formation.pack.formfile import Formfile, FormfileError, Step, canonical, parse

BUILDER_VERSION = 2  # 2: the entrypoint runs as the last USER, dropbear for USER keys, sudo installed
BUILD_DIR = ".formation-build"
OUTPUT_TAIL_LINES = 30
BUILD_MEMORY_MB = 1024  # apt and dpkg in 512 MB under TCG are slow to the point of timeouts


class BuildMachine(Protocol):
    """Boots `image` (writable) in build mode and returns when the VM has ended.

    Each line of the VM's console goes to `on_line` as it arrives. Raises on timeout. With
    `network`, the VM can open outbound connections (else it has no network at all).
    """

    def __call__(self, image: Path, *, vcpus: int, memory_mb: int, timeout: float,
                 on_line: Callable[[str], None], network: bool) -> Awaitable[None]: ...


@dataclass
class BuildFailure(Exception):
    """Why a build failed, in words for the user: the step and its Formfile line when a step
    failed, and the tail of its output."""

    message: str
    line: int | None = None
    instruction: str | None = None
    output_tail: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        tail = ("\n" + "\n".join(f"  | {x}" for x in self.output_tail)) if self.output_tail else ""
        return f"{where}{self.message}{tail}"

    def to_dict(self) -> dict:
        return {"message": self.message, "line": self.line, "instruction": self.instruction,
                "output_tail": self.output_tail}


@dataclass(frozen=True)
class Image:
    image_id: str
    path: Path  # raw ext4
    manifest: dict
    cached: bool


def image_id(formfile: Formfile, context_digest: str, base_id: str) -> str:
    h = hashlib.sha256()
    for part in (f"formation-image-v{BUILDER_VERSION}", canonical(formfile), context_digest, base_id):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def find_image(images_dir: Path, iid: str) -> Image | None:
    manifest = images_dir / iid / "manifest.json"
    if not manifest.exists():
        return None
    return Image(iid, images_dir / iid / "image.raw", json.loads(manifest.read_text()), cached=True)


def redacted(formfile: Formfile) -> str:
    """The canonical Formfile without USER passwords (kept in manifests and logs)."""
    return "\n".join(
        " ".join("passwd:<redacted>" if w.startswith(("passwd:", "'passwd:")) else w
                 for w in shlex.split(line)) if line.startswith("USER ") else line
        for line in canonical(formfile).splitlines()) + "\n"


class Progress(Protocol):
    def __call__(self, event: dict) -> None: ...


@dataclass(frozen=True)
class Plan:
    """A build ready to run: the parsed Formfile, its unpacked context, and the image id."""

    formfile: Formfile
    image_id: str
    context_digest: str
    context_dir: Path


class Builder:
    """Builds images into `images_dir`. `prepare` checks the inputs and names the image (quick,
    blocking); `build` makes it (slow: a VM). The Debian base is made on first use."""

    def __init__(self, images_dir: Path, cache_dir: Path, machine: BuildMachine, *,
                 context_limit: int = ctx.DEFAULT_LIMIT, timeout: float = 1800.0,
                 network: bool = False):
        self.images_dir = images_dir
        # whether RUN steps may reach the network; off, the build is sealed (and its image
        # depends on its inputs only), which is why the id does not cover it
        self.network = network
        self.cache_dir = cache_dir
        self.machine = machine
        self.context_limit = context_limit
        self.timeout = timeout

    def prepare(self, formfile_text: str, context_tar: bytes | None, work_dir: Path) -> Plan:
        """Parse and check everything that can be checked without building. Raises BuildFailure."""
        try:
            ff = parse(formfile_text)
        except FormfileError as exc:
            raise BuildFailure(f"the Formfile has errors:\n{exc}") from None
        context_dir = work_dir / "context"
        try:
            # checked whole first, as a stream within ctx.Limits, then written (pack/archive.py)
            ctx.unpack(context_tar or _empty_tar(), context_dir, self.context_limit)
        except ctx.ContextError as exc:
            raise BuildFailure(str(exc)) from exc  # the cause names the limit and the entry
        _check_copies(ff, context_dir)
        digest = ctx.digest(context_dir)
        return Plan(ff, image_id(ff, digest, recipe_id()), digest, context_dir)

    async def build(self, plan: Plan, work_dir: Path, *, log: Callable[[str], None] = lambda _l: None,
                    progress: Progress = lambda _e: None) -> Image:
        hit = find_image(self.images_dir, plan.image_id)
        if hit:
            progress({"phase": "cached", "image_id": plan.image_id})
            log(f"cache hit: image {plan.image_id} was built before")
            return hit
        try:
            base = await trio.to_thread.run_sync(ensure_base, self.cache_dir / "base", log)
        except BaseError as exc:
            raise BuildFailure(str(exc)) from None
        progress({"phase": "staging", "image_id": plan.image_id})
        with tempfile.TemporaryDirectory(dir=work_dir, prefix="build-") as tmp_name:
            return await self._build(plan.formfile, plan.image_id, plan.context_digest,
                                     plan.context_dir, Path(tmp_name), base, log, progress)

    async def _build(self, ff: Formfile, iid: str, digest: str, context_dir: Path, tmp: Path,
                     base: Base, log, progress) -> Image:
        started = time.monotonic()
        root = tmp / "root"
        log(f"copying the Debian base {base.base_id}")
        await _run(["cp", "-a", "--reflink=auto", str(base.rootfs), str(root)])
        packages = _packages(ff)
        if packages:
            progress({"phase": "downloading", "packages": packages})
            log(f"resolving and downloading packages: {' '.join(packages)}")
            try:
                debs = await trio.to_thread.run_sync(_fetch, AptTree(root), packages, log)
            except AptError as exc:
                step = next(s for s in ff.steps if s.kind == "INSTALL")
                raise BuildFailure(f"INSTALL: {exc}", step.line, "INSTALL") from None
            log(f"{len(debs)} packages ({sum(d.stat().st_size for d in debs) // 1024} KiB) ready "
                f"for the build VM")
        steps = _stage(ff, context_dir, root)
        image = tmp / "image.raw"
        progress({"phase": "image", "bytes": _tree_size(root)})
        await _run(["mke2fs", "-q", "-t", "ext4", "-L", "formation", "-d", str(root), "-F",
                    str(image), f"{ff.disk_gb}G"])
        shutil.rmtree(root)
        if steps:
            await self._run_steps(ff, steps, image, log, progress)
        out_dir = self.images_dir / iid
        self.images_dir.mkdir(parents=True, exist_ok=True)
        # finished in a private folder, then renamed: a reader (or another node sharing the
        # cache) sees a whole image or none
        staging = Path(tempfile.mkdtemp(dir=self.images_dir, prefix=f".{iid[:12]}-"))
        staging.chmod(0o755)
        image.rename(staging / "image.raw")
        manifest = {
            "image_id": iid, "name": ff.name, "description": ff.description,
            "formfile": redacted(ff), "context_digest": digest, "base_id": base.base_id,
            "builder_version": BUILDER_VERSION, "vcpus": ff.vcpu, "memory_mb": ff.memory_mb,
            "disk_gb": ff.disk_gb, "expose": list(ff.expose), "entrypoint": list(ff.entrypoint),
            "built_at": int(time.time()), "build_seconds": round(time.monotonic() - started, 1),
            "size_bytes": (staging / "image.raw").stat().st_blocks * 512,
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        try:
            staging.rename(out_dir)
        except OSError:  # built meanwhile by another node sharing the cache: same content
            shutil.rmtree(staging, ignore_errors=True)
        progress({"phase": "done", "image_id": iid, "seconds": manifest["build_seconds"]})
        log(f"image {iid} built in {manifest['build_seconds']} s")
        return Image(iid, out_dir / "image.raw", manifest, cached=False)

    async def _run_steps(self, ff: Formfile, steps: list[_Planned], image: Path, log, progress) -> None:
        """Boot the build VM and follow its console: one begin/end marker pair per step."""
        current: list[_Planned | None] = [None]
        output: list[str] = []
        ended: list[int | None] = [None]
        failed: list[tuple[_Planned, int, list[str]]] = []

        def on_line(line: str) -> None:
            line = line.rstrip("\r\n")
            marker = guest.read_build_line(line)
            if marker is not None:
                if marker.what == "build-end":
                    ended[0] = marker.rc
                elif marker.step < len(steps) and marker.what == "begin":
                    n = marker.step
                    current[0] = steps[n]
                    output.clear()
                    progress({"phase": "step", "step": n + 1, "steps": len(steps),
                              "line": steps[n].line, "instruction": steps[n].instruction})
                    log(f"--- step {n + 1}/{len(steps)} (line {steps[n].line}): {steps[n].title}")
                elif marker.step < len(steps):
                    if marker.rc != 0:
                        failed.append((steps[marker.step], marker.rc, output[-OUTPUT_TAIL_LINES:]))
                    current[0] = None
                return
            if current[0] is not None:
                output.append(line)
                log(line)

        try:
            await self.machine(image, vcpus=ff.vcpu, memory_mb=max(ff.memory_mb, BUILD_MEMORY_MB),
                               timeout=self.timeout, on_line=on_line, network=self.network)
        except Exception as exc:  # the driver's own error (timeout, QEMU refused)
            raise BuildFailure(f"the build VM failed: {exc}", current[0] and current[0].line,
                               current[0] and current[0].instruction, output[-OUTPUT_TAIL_LINES:]) from None
        if failed:
            step, rc, tail = failed[0]
            raise BuildFailure(f"{step.instruction} failed with exit status {rc}: {step.title}",
                               step.line, step.instruction, tail)
        if ended[0] != 0:
            raise BuildFailure("the build VM stopped before the last step finished",
                               current[0] and current[0].line, current[0] and current[0].instruction,
                               output[-OUTPUT_TAIL_LINES:])


@dataclass(frozen=True)
class _Planned:
    line: int
    instruction: str
    title: str
    script: str


def _empty_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w"):
        pass
    return buf.getvalue()


async def _run(cmd: list[str]) -> None:
    proc = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    if proc.returncode != 0:
        raise BuildFailure(f"{cmd[0]} failed: {proc.stderr.decode(errors='replace').strip()[-2000:]}")


def _fetch(tree: AptTree, packages: list[str], log: Callable[[str], None]) -> list[Path]:
    """The packages' closure; with package lists too old for the mirror (a superseded version is
    gone from it: 404), the lists are refreshed and the download tried again."""
    try:
        return tree.fetch_closure(packages)
    except AptError as exc:
        if "Failed to fetch" not in str(exc) and "404" not in str(exc):
            raise
        log("the base's package lists are out of date: fetching new ones")
        tree.update()
        return tree.fetch_closure(packages)


def _tree_size(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


# the SSH server an image gets when a USER has keys: dropbear (1.7 MB with its libraries, against
# over 10 MB for OpenSSH's with its client and Kerberos); guest-init starts it (docs/formfile.md)
SSH_SERVER = "dropbear-bin"


def _packages(ff: Formfile) -> list[str]:
    pkgs = [p for s in ff.steps if s.kind == "INSTALL" for p in s.args]
    return list(dict.fromkeys(pkgs + _user_packages(ff)))


def _user_packages(ff: Formfile) -> list[str]:
    """What the USER lines need installed: sudo for sudo:true, the SSH server for keys."""
    return ((["sudo"] if any(u.sudo for u in ff.users) else [])
            + ([SSH_SERVER] if _has_ssh(ff) else []))


def _has_ssh(ff: Formfile) -> bool:
    return any(u.ssh_authorized_keys for u in ff.users)


def _check_copies(ff: Formfile, context_dir: Path) -> None:
    for s in ff.steps:
        if s.kind != "COPY":
            continue
        src = s.args[0]
        path = (context_dir / src.lstrip("/")).resolve()
        if not path.is_relative_to(context_dir.resolve()):
            raise BuildFailure(f"COPY {src}: the source must be inside the build context", s.line, "COPY")
        if not path.exists():
            raise BuildFailure(f"COPY {src}: no such file or folder in the build context", s.line, "COPY")


def _stage(ff: Formfile, context_dir: Path, root: Path) -> list[_Planned]:
    """Write what the build VM needs into the image tree; return the steps it will run."""
    build = root / BUILD_DIR
    build.mkdir()
    planned: list[_Planned] = []
    q = shlex.quote
    if _user_packages(ff):
        names = " ".join(_user_packages(ff))
        planned.append(_Planned(0, "USER", f"install {names}",
                                f"apt-get install -y --no-download --no-install-recommends {names}"))
    for u in ff.users:
        planned.append(_Planned(0, "USER", f"user {u.username}", _user_script(u)))
    cwd, env = "/", Environments()
    for i, s in enumerate(ff.steps):
        if s.kind == "WORKDIR":
            cwd = s.args[0]
        elif s.kind == "ENV":
            s = Step("ENV", (s.args[0], s.args[1], env.set(*s.args)), s.line)
        planned.append(_step_plan(i, s, context_dir, build, cwd))
    etc = root / "etc/formation"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "workdir").write_text(ff.workdir + "\n")
    if ff.entrypoint:
        (etc / "entrypoint").write_text("exec " + " ".join(q(a) for a in ff.entrypoint) + "\n")
    if ff.users:  # the entrypoint runs as the last USER (as root without one)
        (root / guest.ENTRYPOINT_USER.lstrip("/")).write_text(ff.users[-1].username + "\n")
    if _has_ssh(ff):
        (root / guest.SSH_CONFIG.lstrip("/")).write_text(_ssh_config(ff))
    if any(p.instruction in ("INSTALL", "USER") for p in planned):
        planned.append(_Planned(0, "CLEAN", "clean the apt cache", "apt-get clean"))
    _write_steps(build / "steps.sh", planned)
    return planned


# What a variable holds before any ENV names it (Debian's login PATH), for ENV's $VAR expansion.
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
_VAR = re.compile(r"\\\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class Environments:
    """ENV's values as the Formfile's steps set them, per scope: `$VAR` and `${VAR}` in a value
    are expanded when the image is planned (as Docker's ENV does), against what the scope holds
    so far: the system scope's variables (BASE_ENV before any ENV), and for a user:<name> or
    service:<name> scope its own on top. A variable nothing set is empty; a backslash before a
    `$` makes it a plain `$`."""

    def __init__(self):
        self.scopes: dict[str, dict[str, str]] = {"system": dict(BASE_ENV)}

    def set(self, scope: str, key: str, value: str) -> str:
        seen = {**self.scopes["system"], **self.scopes.get(scope, {})}

        def sub(m: re.Match) -> str:
            if m.group(0) == "\\$":
                return "$"
            return seen.get(m.group(1) or m.group(2), "")

        expanded = _VAR.sub(sub, value)
        self.scopes.setdefault(scope, {})[key] = expanded
        return expanded


def _step_plan(i: int, s: Step, context_dir: Path, build: Path, cwd: str = "/") -> _Planned:
    q = shlex.quote
    if s.kind == "RUN":  # in the WORKDIR before it, as the README's examples expect
        return _Planned(s.line, "RUN", s.args[0],
                        f"cd {q(cwd)} && /bin/sh -c {q(s.args[0])}")
    if s.kind == "WORKDIR":
        return _Planned(s.line, "WORKDIR", f"workdir {s.args[0]}", f"mkdir -p {q(s.args[0])}")
    if s.kind == "INSTALL":
        return _Planned(s.line, "INSTALL", "install " + " ".join(s.args),
                        "apt-get install -y --no-download --no-install-recommends "
                        + " ".join(q(p) for p in s.args))
    if s.kind == "COPY":
        src, dest = s.args
        staged = build / "copy" / str(i)
        staged.mkdir(parents=True)
        source = context_dir / src.lstrip("/")
        if source.is_dir():
            shutil.copytree(source, staged / "d", symlinks=True)
            script = f"mkdir -p {q(dest)} && cp -a /{BUILD_DIR}/copy/{i}/d/. {q(dest)}"
        else:
            shutil.copy2(source, staged / "f", follow_symlinks=True)
            target = dest + source.name if dest.endswith("/") else dest
            script = (f"if [ -d {q(dest)} ]; then t={q(dest)}/{q(source.name)}; else t={q(target)}; fi; "
                      f"mkdir -p \"$(dirname \"$t\")\" && cp -a /{BUILD_DIR}/copy/{i}/f \"$t\"")
        return _Planned(s.line, "COPY", f"copy {src} -> {dest}", script)
    scope, key, value = s.args
    target = {"system": "/etc/formation/env"}.get(scope)
    if target is None:
        kind, _, name = scope.partition(":")
        target = f"/etc/formation/env.user.{name}" if kind == "user" else "/etc/formation/env.service"
    line = f"export {key}={q(value)}"
    script = f"mkdir -p /etc/formation && printf '%s\\n' {q(line)} >> {q(target)}"
    if scope.startswith("user:"):
        # for that user's login shells (SSH, su -); guest-init loads the entrypoint user's own
        script += f" && printf '%s\\n' {q(USER_ENV_HOOK)} > /etc/profile.d/formation-env.sh"
    return _Planned(s.line, "ENV", f"{key} ({scope})", script)


USER_ENV_HOOK = 'f=/etc/formation/env.user.$(id -un); [ -f "$f" ] && . "$f"'


def _user_script(u) -> str:
    q = shlex.quote
    parts = []
    for g in u.groups:
        parts.append(f"getent group {q(g)} >/dev/null || groupadd {q(g)}")
    groups = list(u.groups) + (["sudo"] if u.sudo else [])
    opts = f"-m -s {q(u.shell)}" + (f" -G {q(','.join(groups))}" if groups else "")
    parts.append(f"id -u {q(u.username)} >/dev/null 2>&1 || useradd {opts} {q(u.username)}")
    if u.passwd:
        # chpasswd hashes with the image's default (yescrypt on bookworm); a given crypt hash is kept
        flag = " -e" if u.passwd.startswith("$") else ""
        parts.append(f"printf '%s\\n' {q(u.username + ':' + u.passwd)} | chpasswd{flag}")
    if u.lock_passwd or not u.passwd:
        parts.append(f"passwd -l {q(u.username)} >/dev/null")
    elif u.chpasswd_expire:
        # a usable password only: a locked one, which nobody can change, would make sudo ask for
        # a new one forever (sudo and the SSH login of guest-init ask when it is expired)
        parts.append(f"chage -d 0 {q(u.username)}")
    if u.sudo:
        rule = f"{u.username} ALL=(ALL) NOPASSWD:ALL"
        parts.append(f"mkdir -p /etc/sudoers.d && printf '%s\\n' {q(rule)} > /etc/sudoers.d/90-{u.username}"
                     f" && chmod 0440 /etc/sudoers.d/90-{u.username}")
    if u.ssh_authorized_keys:
        keys = "\n".join(_authorized_key(k) for k in u.ssh_authorized_keys)
        home = f"$(getent passwd {q(u.username)} | cut -d: -f6)"
        parts.append(f"h={home} && mkdir -p \"$h/.ssh\" && printf '%s\\n' {q(keys)} > \"$h/.ssh/authorized_keys\""
                     f" && chmod 700 \"$h/.ssh\" && chmod 600 \"$h/.ssh/authorized_keys\""
                     f" && chown -R {q(u.username)}: \"$h/.ssh\"")
    if u.disable_root:  # usermod, not passwd: a second USER finds root locked, which passwd calls an error
        parts.append("usermod -L root")
    return " && ".join(parts)


def _password_logins(u) -> bool:
    """Whether the user may log in over SSH with a password."""
    return bool(u.ssh_pwauth and u.passwd and not u.lock_passwd)


def _ssh_config(ff: Formfile) -> str:
    """guest-init's SSH settings (shell assignments it sources). Root logs in over SSH only when
    every USER says disable_root:false; password logins are for the users that allow them, and
    with none of them dropbear takes keys only."""
    root = "yes" if all(not u.disable_root for u in ff.users) else "no"
    passwords = " ".join(u.username for u in ff.users if _password_logins(u))
    return ("# written by formation.pack.builder, read by guest-init: how it runs the SSH server\n"
            f"root_login={root}\npassword_users={shlex.quote(passwords)}\n")


_KEY_TYPE = re.compile(r"(ssh-|ecdsa-|sk-)\S+")
_KEY_COMMENT = re.compile(r"[A-Za-z0-9.,_+@-]+")


def _authorized_key(line: str) -> str:
    """The key line with a comment dropbear passes on (as SSH_PUBKEYINFO): guest-init's login
    script tells key logins from password logins by it. A comment whose first word dropbear would
    drop (none, or other characters than these) gets a word in front of it."""
    words = line.split(" ")
    at = next((i for i, w in enumerate(words) if _KEY_TYPE.fullmatch(w)), None)
    if at is None or at + 1 >= len(words):  # not a key line we understand: as given
        return line
    comment = at + 2
    if comment < len(words) and _KEY_COMMENT.fullmatch(words[comment]):
        return line
    return " ".join([*words[:comment], "formation-key", *words[comment:]])


def _write_steps(path: Path, planned: list[_Planned]) -> None:
    lines = [
        "# written by formation.pack.builder; run by the guest init in the build VM",
        "export DEBIAN_FRONTEND=noninteractive",
        # services must not start inside a build
        "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d",
    ]
    for n, p in enumerate(planned):
        lines += [
            guest.step_begin(n),
            f"( [ -f /etc/formation/env ] && . /etc/formation/env; {p.script} ) 2>&1",
            "rc=$?",
            guest.step_end(n),
            "[ $rc -eq 0 ] || { rm -f /usr/sbin/policy-rc.d; sync; exit $rc; }",
        ]
    lines += ["rm -f /usr/sbin/policy-rc.d", "sync", "exit 0"]
    path.write_text("\n".join(lines) + "\n")
