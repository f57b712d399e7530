"""The image builder: inputs checked before anything runs, and real builds in a build VM.

The slow tests build a real image (Debian base + COPY, RUN, ENV, USER, ENTRYPOINT of a tiny HTTP
server), boot it with the QEMU driver on a bridge inside a throwaway network namespace, and talk
to it from there; then they check what a user sees when a step fails.
"""

from __future__ import annotations

import io
import os
import tarfile

import pytest
import trio

from formation.pack import context as ctx
from formation.pack.builder import Builder, BuildFailure, image_id
from formation.pack.formfile import parse
from formation.vm import network
from formation.vm.driver import QemuDriver
from formation.vm.spec import VmSpec
from tests.vm_support import (
    CACHE,
    boot_kit,
    build_machine,
    http_get,
    ip,
    needs_qemu,
    needs_root,
    netns,
)

TINY_WEB = """\
NAME tiny-web
USER username:alice passwd:s3cret groups:web
COPY www /srv/www
ENV --scope=system GREETING=hello-from-env
ENV --scope=system PATH=/opt/tools:$PATH
RUN echo "$GREETING" > /srv/www/greeting.txt && id alice > /srv/www/alice.txt
RUN mkdir -p /opt/tools && printf '#!/bin/sh\\necho tool-ran\\n' > /opt/tools/mytool && chmod +x /opt/tools/mytool
WORKDIR /srv/www
RUN mytool > tool.txt && pwd > where.txt
RUN chown -R alice /srv/www
EXPOSE 8000
ENTRYPOINT ["httpd", "-f", "-p", "8000", "-h", "/srv/www"]
"""


def make_context(tmp_path, files: dict[str, str]) -> bytes:
    root = tmp_path / "ctx"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.mkdir(exist_ok=True)
    return ctx.pack_dir(root)


def builder(tmp_path, machine=None, **kw) -> Builder:
    async def no_vm(*_a, **_k):
        raise AssertionError("this build must not need a VM")

    return Builder(tmp_path / "images", CACHE, machine or no_vm, **kw)


# ---- inputs, checked before any VM ------------------------------------------------------------

def test_context_round_trip_and_digest_is_independent_of_tar_order(tmp_path):
    tar = make_context(tmp_path, {"a.txt": "A", "sub/b.txt": "B"})
    ctx.unpack(tar, tmp_path / "out")
    assert (tmp_path / "out/sub/b.txt").read_text() == "B"
    assert ctx.digest(tmp_path / "out") == ctx.digest(tmp_path / "ctx")
    # the same files in another order, with times and owners: same digest
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name in ("sub/b.txt", "a.txt"):
            data = (tmp_path / "ctx" / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.uid, info.mode = len(data), 12345, 1000, 0o644
            t.addfile(info, io.BytesIO(data))
    ctx.unpack(buf.getvalue(), tmp_path / "out2")
    assert ctx.digest(tmp_path / "out2") == ctx.digest(tmp_path / "ctx")


@pytest.mark.parametrize("name,kind,problem", [
    ("/etc/passwd", "file", "outside"), ("../escape", "file", "outside"),
    ("link", "abs-link", "absolute"), ("link", "up-link", "outside"), ("dev", "device", "only files"),
])
def test_context_entries_that_could_escape_are_refused(tmp_path, name, kind, problem):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo(name)
        if kind == "abs-link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
        elif kind == "up-link":
            info.type, info.linkname = tarfile.SYMTYPE, "../../etc/shadow"
        elif kind == "device":
            info.type = tarfile.CHRTYPE
        t.addfile(info, io.BytesIO(b""))
    with pytest.raises(ctx.ContextError, match=problem):
        ctx.unpack(buf.getvalue(), tmp_path / "out")
    assert not (tmp_path / "escape").exists()


def test_context_over_the_limit_is_refused_when_packed_and_when_unpacked(tmp_path):
    (tmp_path / "big").mkdir()
    (tmp_path / "big/blob").write_bytes(os.urandom(4096))
    with pytest.raises(ctx.ContextError, match="over the limit"):
        ctx.pack_dir(tmp_path / "big", limit=1024)
    tar = ctx.pack_dir(tmp_path / "big")
    with pytest.raises(ctx.ContextError, match="over the limit"):
        ctx.unpack(tar, tmp_path / "out", limit=2048)
    with pytest.raises(ctx.ContextError, match="not a tar"):
        ctx.unpack(b"garbage" * 10, tmp_path / "out3")


def test_prepare_reports_formfile_errors_and_missing_copy_sources_with_their_line(tmp_path):
    b = builder(tmp_path)
    with pytest.raises(BuildFailure, match="Formfile:2: unknown instruction .BOGUS."):
        b.prepare("NAME x\nBOGUS 1\n", None, tmp_path / "w1")
    with pytest.raises(BuildFailure) as exc:
        b.prepare("NAME x\nRUN true\nCOPY nothere /app\n", make_context(tmp_path, {"a": "1"}), tmp_path / "w2")
    assert exc.value.line == 3 and "no such file" in exc.value.message
    with pytest.raises(BuildFailure, match="over the limit"):
        builder(tmp_path, context_limit=10).prepare("NAME x\n", make_context(tmp_path, {"a": "x" * 100}),
                                                    tmp_path / "w3")


def test_image_id_names_formfile_context_and_base():
    ff, other = parse("NAME a\nRUN true\n"), parse("NAME a\nRUN false\n")
    assert image_id(ff, "c1", "b1") == image_id(parse("NAME  a\nRUN true\n"), "c1", "b1")
    assert len({image_id(ff, "c1", "b1"), image_id(other, "c1", "b1"), image_id(ff, "c2", "b1"),
                image_id(ff, "c1", "b2")}) == 4


# ---- real builds ------------------------------------------------------------------------------



@pytest.mark.slow
@needs_qemu
@needs_root
async def test_unknown_package_fails_at_its_install_line_before_any_vm(tmp_path):
    b = builder(tmp_path)
    plan = b.prepare("NAME x\nRUN true\nINSTALL no-such-package-formation\n", None, tmp_path / "w")
    with pytest.raises(BuildFailure) as exc:
        await b.build(plan, tmp_path)
    assert exc.value.line == 3 and exc.value.instruction == "INSTALL"
    assert "no-such-package-formation" in exc.value.message


@pytest.mark.slow
@needs_qemu
@needs_root
async def test_failing_run_reports_its_line_and_output(tmp_path):
    kit = boot_kit()
    driver = QemuDriver(tmp_path / "vms")
    b = builder(tmp_path, build_machine(driver, kit))
    plan = b.prepare("NAME x\nRUN echo fine\nRUN echo about-to-fail && ls /nonexistent-dir\nRUN echo never\n",
                     None, tmp_path / "w")
    lines = []
    with pytest.raises(BuildFailure) as exc:
        await b.build(plan, tmp_path, log=lines.append)
    assert exc.value.line == 3 and exc.value.instruction == "RUN"
    assert any("about-to-fail" in x for x in exc.value.output_tail)
    assert any("nonexistent-dir" in x for x in exc.value.output_tail)
    assert not any(x == "never" for x in lines)
    assert not (tmp_path / "images" / plan.image_id).exists()
    assert driver.list() == []  # the build VM is gone


@pytest.mark.slow
@needs_qemu
@needs_root
async def test_build_boot_serve_pause_resume_stop_and_cache_hit(tmp_path):
    kit = boot_kit()
    driver = QemuDriver(tmp_path / "vms")
    b = builder(tmp_path, build_machine(driver, kit))
    context = make_context(tmp_path, {"www/index.html": "hello from a formation image\n"})
    plan = b.prepare(TINY_WEB, context, tmp_path / "w1")
    log, events = [], []
    image = await b.build(plan, tmp_path, log=log.append, progress=events.append)
    assert not image.cached and image.path.is_file()
    steps = [e for e in events if e.get("phase") == "step"]
    assert [e["instruction"] for e in steps][:8] == ["USER", "COPY", "ENV", "ENV", "RUN", "RUN", "WORKDIR", "RUN"]
    assert steps[4]["line"] == 6  # steps carry their Formfile line
    assert "passwd:<redacted>" in image.manifest["formfile"] and "s3cret" not in image.manifest["formfile"]

    # a second build of the same inputs is a cache hit, without a VM
    b2 = builder(tmp_path)
    again = await b2.build(b2.prepare(TINY_WEB, context, tmp_path / "w2"), tmp_path)
    assert again.cached and again.image_id == image.image_id

    with netns() as ns:
        await network.ensure_bridge("fmtbr0", "10.213.8.1/24", ns)
        spec = VmSpec(vm_id="web", kernel=kit.kernel, initrd=kit.initrd, image=image.path,
                      tap="fmtweb0", bridge="fmtbr0", ip_cidr="10.213.8.2/24", gateway="10.213.8.1",
                      netns=ns)
        await driver.create(spec)
        await driver.boot("web")
        try:
            body = None
            with trio.move_on_after(60):
                while body is None:
                    body = await trio.to_thread.run_sync(http_get, ns, "http://10.213.8.2:8000/index.html")
                    if body is None:
                        await trio.sleep(0.5)
            assert body == "hello from a formation image\n", driver.console_log("web")
            # RUN saw the system ENV, USER made alice with her group, ENTRYPOINT serves it all
            assert await trio.to_thread.run_sync(http_get, ns, "http://10.213.8.2:8000/greeting.txt") == "hello-from-env\n"
            alice = await trio.to_thread.run_sync(http_get, ns, "http://10.213.8.2:8000/alice.txt")
            assert "(alice)" in alice and "(web)" in alice
            # ENV extended PATH ($PATH expanded), and RUN ran in the WORKDIR before it
            assert await trio.to_thread.run_sync(http_get, ns, "http://10.213.8.2:8000/tool.txt") == "tool-ran\n"
            assert await trio.to_thread.run_sync(http_get, ns, "http://10.213.8.2:8000/where.txt") == "/srv/www\n"

            await driver.pause("web")
            assert (await driver.status("web")).state == "paused"
            assert await trio.to_thread.run_sync(http_get, ns, "http://10.213.8.2:8000/index.html", 1.0) is None
            await driver.resume("web")
            assert await trio.to_thread.run_sync(http_get, ns, "http://10.213.8.2:8000/index.html") is not None

            assert await driver.stop("web", timeout=30) == "powerdown"
            assert "FORMATION-GUEST stopped" in driver.console_log("web")
        finally:
            await driver.delete("web")
        assert driver.list() == []
        assert "fmtweb0" not in ip("-n", ns, "link").stdout


async def _serve_once_text(text: bytes, task_status=trio.TASK_STATUS_IGNORED):
    async def handle(stream):
        with trio.move_on_after(10):
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            await stream.send_all(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text))
        await stream.aclose()

    await trio.serve_tcp(handle, 0, host="127.0.0.1", task_status=task_status)


@pytest.mark.slow
@needs_qemu
@needs_root
async def test_build_network_is_off_unless_enabled(tmp_path):
    """RUN steps reach the network only with [vm] build_network; the host's loopback (10.0.2.2 in
    QEMU's user-mode network) stands in for the outside world."""
    kit = boot_kit()
    driver = QemuDriver(tmp_path / "vms")
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(_serve_once_text, b"fetched-over-the-network\n")
        port = listeners[0].socket.getsockname()[1]
        # bash's /dev/tcp (busybox-static's wget cannot resolve through the image's glibc)
        fetch = (f"RUN bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port} && printf \"GET / HTTP/1.0\\r\\n\\r\\n\" >&3"
                 f" && cat <&3' > /fetched.txt && cat /fetched.txt\n")

        sealed = builder(tmp_path, build_machine(driver, kit))
        with pytest.raises(BuildFailure) as exc:
            await sealed.build(sealed.prepare("NAME sealed\n" + fetch, None, tmp_path / "w1"), tmp_path)
        assert exc.value.line == 2 and exc.value.instruction == "RUN"
        assert "unreachable" in " ".join(exc.value.output_tail), exc.value.output_tail

        open_ = builder(tmp_path, build_machine(driver, kit), network=True)
        log: list[str] = []
        image = await open_.build(open_.prepare("NAME open\n" + fetch, None, tmp_path / "w2"), tmp_path,
                                  log=log.append)
        assert "fetched-over-the-network" in log and image.path.is_file()
        nursery.cancel_scope.cancel()


def test_run_steps_run_in_the_workdir_before_them_and_env_values_expand(tmp_path):
    """The README's own Formfile lines: `ENV --scope=system PATH=/usr/local/bin:$PATH` must
    extend PATH (it was kept literally, and later steps found no mkdir), and RUN runs in the
    WORKDIR set before it."""
    from formation.pack.builder import BASE_ENV, _stage
    from formation.pack.formfile import parse
    ff = parse("NAME t\nRUN pwd\nENV --scope=system PATH=/usr/local/bin:$PATH\nWORKDIR /app\nRUN pwd\n"
               "ENV --scope=user:bob 'P=${PATH}:/home/bob/bin \\$HOME'\nWORKDIR /srv\nRUN ls\n")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    planned = _stage(ff, ctx, root)
    scripts = [(p.instruction, p.script) for p in planned]
    runs = [s for i, s in scripts if i == "RUN"]
    assert runs == ["cd / && /bin/sh -c pwd", "cd /app && /bin/sh -c pwd", "cd /srv && /bin/sh -c ls"]
    envs = [s for i, s in scripts if i == "ENV"]
    assert f"export PATH=/usr/local/bin:{BASE_ENV['PATH']}" in envs[0]
    assert f"/usr/local/bin:{BASE_ENV['PATH']}:/home/bob/bin $HOME" in envs[1] and "${PATH}" not in envs[1]
    assert [s for i, s in scripts if i == "WORKDIR"] == ["mkdir -p /app", "mkdir -p /srv"]
    assert (root / "etc/formation/workdir").read_text() == "/srv\n"  # where the ENTRYPOINT starts
