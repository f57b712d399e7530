"""The node's image builds: accepted at once, run one at a time, their state and log on disk.

A build's id is the id of the image it makes (content address), so submitting the same inputs
twice gives the same id: a finished one is a cache hit, a running one is joined. State lives in
builds/<id>/status.json and the log in builds/<id>/build.log, so both survive a node restart; a
build that was running when the node stopped is marked failed ("interrupted") at the next start.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import trio

from formation.files import write_atomic
from formation.pack.builder import Builder, BuildFailure, Plan, find_image
from formation.pack.context import ContextError

log = logging.getLogger("formation.builds")
CONTEXT_FILE = "context.tar.gz"
QUEUE = 64  # builds waiting; more is refused (busy) rather than held in memory without bound


class BuildRefused(Exception):
    """The inputs are wrong (bad Formfile, context, COPY source); nothing was queued.
    `context_error`: the build context's own refusal (a limit or an unsafe entry), if that was it."""

    def __init__(self, failure: BuildFailure):
        super().__init__(str(failure))
        self.failure = failure
        cause = failure.__cause__
        self.context_error: ContextError | None = cause if isinstance(cause, ContextError) else None


class BuildService:
    def __init__(self, data_dir: Path, builder: Builder):
        self.builds_dir = data_dir / "builds"
        self.work_dir = data_dir / "work"
        self.builder = builder
        self._send, self._receive = trio.open_memory_channel[tuple[Plan, Path]](QUEUE)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.builds_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.work_dir, ignore_errors=True)  # leftovers of builds cut short
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for status_file in self.builds_dir.glob("*/status.json"):
            st = _read(status_file)
            if st and st.get("state") in ("queued", "building"):
                st.update(state="failed", finished_at=int(time.time()),
                          error={"message": "interrupted: the node stopped during the build; "
                                            "submit it again"})
                _write(status_file, st)
        task_status.started()
        async for plan, work in self._receive:
            try:
                await self._build(plan, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)

    # ---- requests ----------------------------------------------------------------------------

    async def submit(self, formfile_text: str, context_tar: bytes | None, owner: str) -> dict:
        """Check the inputs and queue the build; its status (a cache hit is already done)."""
        plan, work = await self._prepare(formfile_text, context_tar)
        bid = plan.image_id
        image = find_image(self.builder.images_dir, bid)
        status = self.status(bid)
        if status and (status["state"] in ("queued", "building") or (status["state"] == "done" and image)):
            shutil.rmtree(work, ignore_errors=True)
            if owner not in status["owners"]:
                status["owners"].append(owner)
                _write(self._status_path(bid), status)
            return status
        status = {"build_id": bid, "name": plan.formfile.name, "state": "queued",
                  "owners": [owner], "submitted_at": int(time.time()), "phase": "queued",
                  "step": 0, "steps": 0, "error": None, "image": None}
        if image:
            status.update(state="done", phase="cached", image=image.manifest)
        (self.builds_dir / bid).mkdir(parents=True, exist_ok=True)
        if context_tar:
            # kept so that other nodes placed for an instance of it can build it too (p2p blobs)
            write_atomic(self.builds_dir / bid / CONTEXT_FILE, context_tar)
        _write(self._status_path(bid), status)
        if status["state"] == "done":
            shutil.rmtree(work, ignore_errors=True)
            return status
        try:
            self._send.send_nowait((plan, work))
        except trio.WouldBlock:
            shutil.rmtree(work, ignore_errors=True)
            status.update(state="failed", error={"message": "the node's build queue is full; try later"})
            _write(self._status_path(bid), status)
        return status

    async def image_id_of(self, formfile_text: str, context_tar: bytes | None) -> str:
        """The image id a build of these inputs would make, without building (BuildRefused)."""
        plan, work = await self._prepare(formfile_text, context_tar)
        shutil.rmtree(work, ignore_errors=True)
        return plan.image_id

    async def _prepare(self, formfile_text: str, context_tar: bytes | None) -> tuple[Plan, Path]:
        """The builder's checks and plan, in a work folder of its own (the caller removes it)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=self.work_dir, prefix="plan-"))
        try:
            return await trio.to_thread.run_sync(self.builder.prepare, formfile_text, context_tar, work), work
        except BaseException as exc:
            shutil.rmtree(work, ignore_errors=True)
            if isinstance(exc, BuildFailure):
                raise BuildRefused(exc) from None
            raise

    def context_bytes(self, build_id: str) -> bytes | None:
        """The build context uploaded for `build_id` on this node, if any."""
        path = self.context_path(build_id)
        try:
            return None if path is None else path.read_bytes()
        except OSError:
            return None

    def context_path(self, build_id: str) -> Path | None:
        """The file of the build context kept for `build_id` (uploaded here, or fetched and
        checked against the id), if any: what this node serves to the members placed for it."""
        if not _safe_id(build_id):
            return None
        path = self.builds_dir / build_id / CONTEXT_FILE
        return path if path.is_file() else None

    def status(self, build_id: str) -> dict | None:
        if not _safe_id(build_id):
            return None
        return _read(self._status_path(build_id))

    def log_path(self, build_id: str) -> Path | None:
        if not _safe_id(build_id):
            return None
        path = self.builds_dir / build_id / "build.log"
        return path if path.exists() else None

    def list(self) -> list[dict]:
        out = [_read(p) for p in self.builds_dir.glob("*/status.json")]
        return sorted((s for s in out if s), key=lambda s: s.get("submitted_at", 0), reverse=True)

    # ---- the work ----------------------------------------------------------------------------

    def _status_path(self, build_id: str) -> Path:
        return self.builds_dir / build_id / "status.json"

    async def _build(self, plan: Plan, work: Path) -> None:
        bid = plan.image_id
        path = self._status_path(bid)
        status = _read(path) or {}
        status.update(state="building", started_at=int(time.time()), phase="starting")
        _write(path, status)
        log_file = (self.builds_dir / bid / "build.log").open("a", encoding="utf-8", errors="replace")
        last_write = [0.0]

        def log_line(line: str) -> None:
            log_file.write(line + "\n")
            log_file.flush()

        def progress(event: dict) -> None:
            status.update({k: v for k, v in event.items() if k in ("phase", "step", "steps", "line",
                                                                   "instruction", "packages")})
            now = time.monotonic()
            if event.get("phase") != "step" or now - last_write[0] > 0.2:
                last_write[0] = now
                _write(path, status)

        log.info("build %s (%s) started", bid[:12], plan.formfile.name)
        try:
            image = await self.builder.build(plan, work, log=log_line, progress=progress)
        except BuildFailure as exc:
            log_line(f"BUILD FAILED: {exc}")
            status.update(state="failed", error=exc.to_dict(), finished_at=int(time.time()))
            log.warning("build %s failed: %s", bid[:12], exc.message)
        except Exception as exc:  # noqa: BLE001 - a broken build must not take the node down
            log.exception("build %s crashed", bid[:12])
            log_line(f"BUILD FAILED: internal error: {exc!r}")
            status.update(state="failed", error={"message": f"internal error: {exc!r}"},
                          finished_at=int(time.time()))
        else:
            status.update(state="done", phase="done", image=image.manifest, finished_at=int(time.time()))
            log.info("build %s done in %s s", bid[:12], image.manifest.get("build_seconds"))
        finally:
            log_file.close()
            _write(path, status)


def _safe_id(build_id: str) -> bool:
    return isinstance(build_id, str) and 0 < len(build_id) <= 128 and \
        all(c.isalnum() or c in "._:-" for c in build_id) and build_id.isascii() and ".." not in build_id


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, value: dict) -> None:
    write_atomic(path, json.dumps(value, indent=1))
