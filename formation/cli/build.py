"""Building an image on a node, for `form pack build` and `form pack ship`: the Formfile and its
context folder checked and packed here, the build submitted, followed (its steps and log on
stderr, a progress bar in a terminal) and, when it fails, reported with its Formfile line.

A node answers builds only once its VM side is up, a moment after it starts (the guest kernel
kit, the bridge): a build sent before is answered 503 vms_starting, and is sent again once the
node's /health says its VMs are on (waiting at most --vm-wait seconds, with a progress line).

A USER password in clear never leaves this machine: the text sent is the Formfile with each one
replaced by its crypt hash (formation/crypthash.py; the file on disk is not changed)."""

from __future__ import annotations

import argparse
import base64
import re
import time
from pathlib import Path
from typing import Any

from formation.cli import output
from formation.cli.output import EXIT_FAILURE, EXIT_USAGE, CliError
from formation.cli.session import Context, node_refused
from formation.crypthash import PasswordError, hash_passwords
from formation.pack import context as pack_context
from formation.pack.formfile import Formfile, FormfileError
from formation.pack.formfile import parse as parse_formfile

PACK_BASE = "/v1/pack"
CONTEXT_LIMIT = pack_context.DEFAULT_LIMIT  # bytes of packed context a node takes
POLL_SECONDS = 0.5  # between two looks at a running build
VM_WAIT_SECONDS = 600  # how long a build waits by default for the node's VM side to come up
VM_POLL_SECONDS = 1.0  # between two looks at a node whose VMs are starting
UPLOAD_TIMEOUT = 300.0  # seconds for POST /pack/build: the context may be tens of MiB
BUILD_DONE = ("done", "failed")
_STEP_RX = re.compile(r"--- step (\d+)/(\d+) \(line (\d+)\): (.*)")


class Source:
    """The Formfile (checked here, before anything is packed or sent) and its context folder."""

    def __init__(self, args: argparse.Namespace):
        self.folder = Path(args.dir)
        if not self.folder.is_dir():
            raise CliError(f"{self.folder}: no such folder (the build context, where the Formfile's "
                           "COPY sources are)", EXIT_USAGE)
        self.path = Path(args.formfile) if args.formfile else self.folder / "Formfile"
        try:
            self.text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CliError(f"no Formfile at {self.path}; write one there (`form pack validate` checks "
                           "it) or name it with --formfile", EXIT_USAGE) from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise CliError(f"cannot read {self.path}: {reason or exc}", EXIT_USAGE) from None
        try:
            self.formfile: Formfile = parse_formfile(self.text, source=str(self.path))
        except FormfileError as exc:
            output.log_lines(str(exc).splitlines())
            n = len(exc.errors)
            raise CliError(f"{self.path} has {n} error{'s' if n != 1 else ''} (above); nothing was sent",
                           EXIT_USAGE) from None
        self.lines = self.text.splitlines()
        self._sent: str | None = None

    def text_to_send(self, ctx: Context) -> str:
        """The Formfile as it is sent: each USER password in clear replaced by its crypt hash
        (salted from the wallet key: the same file sends the same text). Line numbers are kept."""
        if self._sent is None:
            self._sent = formfile_to_send(self.text, ctx, str(self.path))
        return self._sent

    def line(self, no: int) -> str:
        return self.lines[no - 1].strip() if 0 < no <= len(self.lines) else ""

    def packed_context(self) -> str:
        """The folder as a tar.gz in base64, within the node's limit."""
        try:
            tar = pack_context.pack_dir(self.folder, CONTEXT_LIMIT)
        except pack_context.ContextError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None  # it says what to do
        if len(tar) > CONTEXT_LIMIT:
            raise CliError(f"the build context {self.folder.resolve()} is {output.size(len(tar))} "
                           f"packed, over the limit of {output.size(CONTEXT_LIMIT)}", EXIT_USAGE)
        return base64.b64encode(tar).decode()


def formfile_to_send(text: str, ctx: Context, source: str) -> str:
    """A Formfile's text with its USER passwords hashed (crypthash.py); CliError, before anything
    is sent, when one in clear would be left."""
    try:
        return hash_passwords(text, ctx.key().secret)
    except PasswordError as exc:
        raise CliError(f"{source}: {exc}; nothing was sent (a password in clear would be kept in every "
                       "node's log)", EXIT_USAGE) from None


def build_failure(status: dict, src: Source | None, *, tail_shown: bool = False) -> CliError:
    """The error of a failed (or refused) build: where in the Formfile, why, the output's tail
    (unless the log, which ends with it, was just shown)."""
    err = status.get("error") or status.get("failure") or {}
    message = (err.get("message") or "no reason given").strip()
    first, *more = message.splitlines()
    output.log_lines(more, "form:   ")
    tail = err.get("output_tail") or []
    if tail and not tail_shown:
        output.log_lines(["form: the step's last output:", *(f"  | {line}" for line in tail)])
    where = ""
    if err.get("line"):
        where = f" at {src.path if src else 'Formfile'}:{err['line']}"
        text = src.line(err["line"]) if src else ""
        where += f" ({text})" if text else f" ({err.get('instruction')})" if err.get("instruction") else ""
    bid = status.get("build_id")
    what = f"build {bid[:16]}" if bid else "the build"
    verb = "failed" if bid else "was refused"
    return CliError(f"{what} {verb}{where}: {first}", EXIT_FAILURE)


def submit_build(ctx: Context, src: Source, *, quiet: bool, vm_wait: float = VM_WAIT_SECONDS) -> dict:
    ctx.key()  # a missing wallet or password is reported before the context is packed
    body = {"formfile": src.text_to_send(ctx), "context": src.packed_context()}
    if not quiet:
        output.note(f"sending {src.path} and the build context {src.folder.resolve()} "
                    f"({output.size(len(body['context']) * 3 // 4)}) to {ctx.node_url}")
    path = f"{PACK_BASE}/build"
    deadline = time.monotonic() + vm_wait
    while True:
        with output.progress("sending the build", enabled=not quiet):
            code, doc = ctx.post_doc(path, body, timeout=UPLOAD_TIMEOUT)
            if code == 401 and doc.get("error") == "replay":
                # the same build submitted twice in one second has the same signature (one use
                # each): sign again in the next second
                time.sleep(1.05 - time.time() % 1)
                code, doc = ctx.post_doc(path, body, timeout=UPLOAD_TIMEOUT)
        if not (code == 503 and doc.get("error") == "vms_starting"):
            break
        wait_for_vms(ctx, deadline, vm_wait, quiet=quiet)
    if code == 400 and doc.get("error") == "build_refused":
        raise build_failure({"failure": doc.get("failure") or {"message": doc.get("detail")}}, src)
    if code == 503 and doc.get("error") == "vm_disabled":
        raise vms_off(ctx, str(doc.get("detail", "")))
    if code >= 400:
        raise node_refused(code, str(doc.get("error", "http_error")), str(doc.get("detail", "")), "POST", path)
    if not quiet and doc.get("state") == "done":
        output.note(f"build {doc.get('build_id', '')[:16]}: built before, nothing to do (cache hit)")
    return doc


def vms_off(ctx: Context, why: str) -> CliError:
    """The node runs no VMs: why, and what to do."""
    return CliError(f"the node at {ctx.node_url} runs no VMs, so it builds nothing ({why}); on that host run "
                    "the node as root with QEMU installed (`sudo ./dev run` installs what it needs), or send the "
                    "build to a node that runs VMs with --node URL", EXIT_FAILURE)


def wait_for_vms(ctx: Context, deadline: float, vm_wait: float, *, quiet: bool) -> None:
    """Wait until the node's VM side is on (its /health: vms.enabled), a line on stderr saying so
    and a live one in a terminal; CliError when it turns off, or is not on by `deadline`."""
    health = ctx.call("GET", "/v1/health", sign=False)
    vms = health.get("vms") or {}
    if not quiet and not vms.get("enabled"):
        output.note(f"the node's VMs are starting ({vms.get('reason') or 'no reason given'}); waiting for "
                    f"them, at most {max(0, deadline - time.monotonic()):.0f} s (--vm-wait)")
    with output.progress("waiting for the node's VMs", enabled=not quiet) as bar:
        while not vms.get("enabled"):
            if not vms.get("starting"):
                raise vms_off(ctx, str(vms.get("reason") or "no reason given"))
            left = deadline - time.monotonic()
            if left <= 0:
                raise CliError(f"the node at {ctx.node_url} still has its VMs starting after {vm_wait:g} s "
                               f"({vms.get('reason') or 'no reason given'}); its log says what it waits for "
                               "(the terminal of `./dev run`, or `journalctl -u formation-node`); when `form "
                               "node status` shows VMs on, run this command again (or give it a longer "
                               "--vm-wait)", EXIT_FAILURE)
            bar.update(f"waiting for the node's VMs: {vms.get('reason') or 'starting'}")
            time.sleep(min(VM_POLL_SECONDS, left))
            vms = ctx.call("GET", "/v1/health", sign=False).get("vms") or {}
    if not quiet:
        output.note("the node's VMs are on; sending the build again")


def log_chunk(ctx: Context, bid: str, offset: int) -> tuple[str, int, str]:
    """The build's log from `offset` (at most 1 MiB): (text, the next offset, the build's state)."""
    res = ctx.call("GET", f"{PACK_BASE}/builds/{bid}/logs", query={"offset": offset})
    return res.get("log") or "", int(res.get("offset", offset)), res.get("state", "")


def _show_build_log(text: str, src: Source | None) -> None:
    lines = []
    for line in text.splitlines():
        m = _STEP_RX.fullmatch(line)
        if m:
            n, total, no, title = m.groups()
            shown = (src.line(int(no)) if src else "") or title
            line = f"[{n}/{total}] line {no}: {shown}" if no != "0" else f"[{n}/{total}] {title}"
        lines.append(line)
    output.log_lines(lines)


def follow_build(ctx: Context, status: dict, src: Source | None, *, quiet: bool) -> dict:
    """Poll a build until it ends, its log (steps as "[3/7] line 12: RUN ...") on stderr."""
    bid = status["build_id"]
    offset, phase = 0, None
    with output.progress(f"build {bid[:16]}", enabled=not quiet) as bar:
        while True:
            status = ctx.call("GET", f"{PACK_BASE}/builds/{bid}")
            if not quiet:
                steps = status.get("steps") or None
                done = steps if status.get("state") == "done" else max(0, (status.get("step") or 0) - 1)
                now = status.get("phase") or status.get("state")
                if now == "step" and status.get("line"):
                    now = f"line {status['line']} ({status.get('instruction')})"
                bar.update(f"build {bid[:16]}: {now}", completed=done if steps else None, total=steps)
                if status.get("phase") != phase and status.get("phase") not in ("step", "done", "cached", None):
                    phase = status["phase"]
                    extra = f": {' '.join(status['packages'])}" if phase == "downloading" and status.get("packages") else ""
                    output.note(f"build {bid[:16]}: {phase}{extra}")
                while True:  # everything logged so far (1 MiB per answer)
                    text, offset, _ = log_chunk(ctx, bid, offset)
                    _show_build_log(text, src)
                    if not text:
                        break
            if status.get("state") in BUILD_DONE:
                return status
            time.sleep(POLL_SECONDS)


def build_fields(st: dict) -> list[tuple[str, Any]]:
    """A build's status as name and value pairs."""
    image = st.get("image") or {}
    step = f"{st.get('step')}/{st.get('steps')}" if st.get("steps") else "-"
    pairs = [("build", st.get("build_id")), ("name", st.get("name")), ("state", st.get("state")),
             ("phase", st.get("phase")), ("step", step)]
    if st.get("line") and st.get("state") != "done":
        pairs.append(("line", f"{st['line']} ({st.get('instruction')})"))
    for k in ("submitted_at", "started_at", "finished_at"):
        if st.get(k):
            pairs.append((k.replace("_at", ""), output.iso(st[k])))
    if image:
        pairs.append(("resources", f"{image.get('vcpus')} vCPU, {image.get('memory_mb')} MB, "
                                   f"{image.get('disk_gb')} GB disk"))
        if image.get("expose"):
            pairs.append(("expose", image["expose"]))
        if image.get("size_bytes"):
            pairs.append(("image size", output.size(int(image["size_bytes"]))))
    if st.get("error"):
        pairs.append(("error", (st["error"].get("message") or "").splitlines()[0] if st["error"].get("message") else "-"))
    return pairs
