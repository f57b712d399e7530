"""A real node (p2p, control socket, HTTP API) in the test's trio run, and one whose VM side is
faked: a real BuildService runs builds through a Builder whose `build` only pretends (no
debootstrap, no VM), and `runtime.scheduler` is a fake that knows the consoles it is given."""

from __future__ import annotations

import contextlib
import errno
import json
import socket
from pathlib import Path

import pytest
import trio

from formation.crdt.keys import PrivateKey, format_address
from formation.crdt.store import Store
from formation.node.builds import BuildService
from formation.node.config import load_config
from formation.node.placement import Doubts
from formation.node.runtime import open_node
from formation.node.vmside import VmsOn
from formation.pack.builder import Builder, BuildFailure, Image
from tests.fake_vms import FakeVmHost


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _address_in_use(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_address_in_use(e) for e in exc.exceptions)
    return isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE


@contextlib.asynccontextmanager
async def running_node(tmp_path, *, secret: bytes = b"\x0a" * 32, bootstrap=(), settings: dict | None = None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    # A port found free can be taken before the node binds it (another process's ephemeral
    # port): try again with new ports rather than fail the test on a race with the machine.
    for attempt in range(5):
        port = free_port()
        cfg = load_config(None, {"node.data_dir": str(tmp_path), "vm.enabled": "false", "mesh.enabled": "false", "dns.enabled": False, "proxy.enabled": False, "api.port": port,
                                 "p2p.listen": f"/ip4/127.0.0.1/tcp/{free_port()}",
                                 "p2p.bootstrap": list(bootstrap), **(settings or {})})
        rt = open_node(cfg, PrivateKey(secret), Store(str(tmp_path / "state.db")))
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await nursery.start(rt.run)
                except Exception as exc:
                    if attempt < 4 and _address_in_use(exc):
                        continue
                    raise
                rt.base_url = f"http://127.0.0.1:{port}"
                try:
                    yield rt
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            rt.store.close()
        return


@pytest.fixture
async def node(tmp_path):
    async with running_node(tmp_path / "n1") as rt:
        yield rt


class FakeBuilder(Builder):
    """Runs the real `prepare` (Formfile, context, COPY checks, image id); `build` pretends: one
    step marker and one line of output per step; `RUN false` fails. `gate` holds builds."""

    def __init__(self, root: Path, **kw):
        super().__init__(root / "images", root / "cache", machine=None, **kw)
        self.gate: trio.Event | None = None

    async def build(self, plan, work_dir, *, log=lambda _l: None, progress=lambda _e: None):
        ff = plan.formfile
        progress({"phase": "staging", "image_id": plan.image_id})
        log("copying the Debian base")
        if self.gate is not None:
            await self.gate.wait()
        for n, step in enumerate(ff.steps, 1):
            title = " ".join(step.args)
            progress({"phase": "step", "step": n, "steps": len(ff.steps), "line": step.line,
                      "instruction": step.kind})
            log(f"--- step {n}/{len(ff.steps)} (line {step.line}): {title}")
            log(f"output of {title}")
            await trio.sleep(0)
            if step.kind == "RUN" and step.args[0] == "false":
                raise BuildFailure("RUN failed with exit status 1: false", step.line, "RUN",
                                   [f"output of {title}", "boom"])
        out = self.images_dir / plan.image_id
        out.mkdir(parents=True)
        (out / "image.raw").write_bytes(b"")
        manifest = {"image_id": plan.image_id, "name": ff.name, "vcpus": ff.vcpu,
                    "memory_mb": ff.memory_mb, "disk_gb": ff.disk_gb, "expose": list(ff.expose)}
        (out / "manifest.json").write_text(json.dumps(manifest))
        progress({"phase": "done", "image_id": plan.image_id})
        log(f"image {plan.image_id} built")
        return Image(plan.image_id, out / "image.raw", manifest, cached=False)


VM_SUBNET = "127.77.0.0/24"
VM_IP = "127.77.0.5"  # a replica's address in it


class FakeScheduler:
    def __init__(self):
        self.consoles: dict[str, str] = {}
        self.ips: dict[str, str] = {}
        self.replicas: dict[str, object] = {}  # what /health counts
        self.doubts = Doubts(deadline=900.0)  # what the node record publishes

    def console_log(self, instance_id: str, tail_bytes: int | None) -> str | None:
        text = self.consoles.get(instance_id)
        if text is None or tail_bytes is None:
            return text
        return text.encode()[-tail_bytes:].decode(errors="replace")

    def local_ip(self, instance_id: str) -> str | None:
        return self.ips.get(instance_id)

    async def metrics(self, instance_id: str) -> dict | None:
        if instance_id not in self.consoles:
            return None
        return {"vm_state": "running", "ip": self.ips.get(instance_id), "restarts": 0,
                "cpu_seconds": 1.5, "rss_bytes": 200 << 20, "uptime_s": 12.0}


@contextlib.asynccontextmanager
async def vm_node(tmp_path: Path, *, settings: dict | None = None, secret: bytes = b"\x0a" * 32, bootstrap=(),
                  **builder_kw):
    """A running node whose runtime has a BuildService (on FakeBuilder) and a FakeScheduler."""
    async with running_node(tmp_path / "node", settings=settings, secret=secret, bootstrap=bootstrap) as rt, \
            trio.open_nursery() as nursery:
        builder = FakeBuilder(tmp_path / "vm", **builder_kw)
        service = BuildService(tmp_path / "vm", builder)
        await nursery.start(service.run)
        # its VM subnet is on loopback, so that a test's "replica" (a server on 127.77.0.x) is in it
        rt.vms = VmsOn(FakeVmHost(tmp_path / "vmhost", subnet=VM_SUBNET), service, FakeScheduler())
        try:
            yield rt
        finally:
            nursery.cancel_scope.cancel()


@pytest.fixture
async def vnode(tmp_path):
    async with vm_node(tmp_path) as rt:
        yield rt


async def status_of(rt, node_key: PrivateKey, iid: str, state: str, ip: str | None = None, reason: str = "",
                    health: str | None = None):
    """An instance_status record, written by `node_key` (the node that hosts the replica)."""
    node = format_address(node_key.address)
    value = {"instance_id": iid, "node": node, "state": state, "ip": ip, "reason": reason}
    if health is not None:
        value["health"] = health
    if node == rt.address:
        await rt.write("instance_status", f"{iid}@{node}", value)
    else:
        await rt.astore.run(rt.store.write, node_key, "instance_status", f"{iid}@{node}", value,
                            now_ms=1_700_000_000_000)
