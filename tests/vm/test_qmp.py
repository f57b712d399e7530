"""The QMP client against a real QEMU (no guest: `-machine none`), and its error paths."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import trio

from formation.vm.qmp import QmpClient, QmpError

QEMU = shutil.which("qemu-system-x86_64")
# ./dev test installs QEMU; in CI a missing QEMU is a failure, not a skip
pytestmark = pytest.mark.skipif(QEMU is None and not os.environ.get("CI"),
                                reason="qemu-system-x86_64 is not installed (./dev test installs it)")


async def start_qemu(tmp_path):
    sock = tmp_path / "qmp.sock"
    proc = await trio.lowlevel.open_process(
        [QEMU, "-machine", "none", "-nodefaults", "-display", "none", "-S",
         "-qmp", f"unix:{sock},server=on,wait=off"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, sock


async def test_status_stop_cont_and_quit(tmp_path):
    proc, sock = await start_qemu(tmp_path)
    try:
        async with trio.open_nursery() as nursery:
            qmp = await QmpClient.connect(sock, nursery)
            assert "qemu" in qmp.greeting["QMP"]["version"]
            assert (await qmp.execute("query-status"))["status"] == "prelaunch"
            await qmp.execute("cont")
            assert (await qmp.execute("query-status"))["running"] is True
            await qmp.execute("stop")
            assert (await qmp.execute("query-status"))["status"] == "paused"
            # several tasks may share the connection
            results = []

            async def ask():
                results.append(await qmp.execute("query-kvm"))

            async with trio.open_nursery() as inner:
                for _ in range(5):
                    inner.start_soon(ask)
            assert len(results) == 5 and all("enabled" in r for r in results)
            with pytest.raises(QmpError) as exc:
                await qmp.execute("no-such-command")
            assert exc.value.error_class == "CommandNotFound"
            await qmp.execute("quit")
            with trio.fail_after(10):
                await proc.wait()
            with pytest.raises(QmpError, match="closed"):
                await qmp.execute("query-status")
            nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0


async def test_connect_times_out_when_nobody_listens(tmp_path):
    async with trio.open_nursery() as nursery:
        with pytest.raises(trio.TooSlowError):
            await QmpClient.connect(tmp_path / "absent.sock", nursery, timeout=0.3)
