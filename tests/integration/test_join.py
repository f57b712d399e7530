"""`form join` across hosts (tests/multihost.py): a genesis host hands out invites; a wrong token,
an expired one, one another host already used and an unreachable bootstrap peer each fail with
one clear line and leave nothing on the joining host (no formation.toml, no unit, no WireGuard
interface, no new file); a good token joins step by step, with a systemd unit, up to formnet;
and a second run on that host resumes (no new claim, the steps already done say so)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from formation.cli.join import UNIT_DIR_ENV, UNIT_NAME
from formation.crdt.keys import PrivateKey
from formation.keystore import load_keystore
from formation.node import fog
from tests.integration.test_formnet import ROOT, logs, start, status, wait
from tests.multihost import cut, heal, hosts
from tests.unit.test_join_cli import invite
from tests.vm_support import needs_root

pytestmark = [pytest.mark.slow, needs_root,
              pytest.mark.skipif(shutil.which("wireguard-go") is None and not os.environ.get("CI"),
                                 reason="wireguard-go is not installed (./dev test installs it)")]
PASSWORD = "test"  # what tests/integration/test_formnet.py's `start` gives its nodes


def join(host, data: Path, units: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """`form join ... --no-start` on `host`, to its end."""
    env = [f"FORMATION_PASSWORD={PASSWORD}", f"PYTHONPATH={ROOT}", f"{UNIT_DIR_ENV}={units}",
           f"TMPDIR={_private_tmp(data)}"]  # its temporary files, apart from other runs' on this machine
    return host.run("env", *env, sys.executable, "-m", "formation.cli", "join", *args,
                    "--data-dir", str(data), "--vms", "false", timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("form: error: "), proc.stderr
    return lines[0].removeprefix("form: error: ")


def links(host) -> list[str]:
    """The host's interfaces other than lo and eth0 (a WireGuard one would be fm + 8 hex)."""
    out = host.run("ip", "-o", "link", "show", check=True).stdout
    names = [line.split(": ")[1].split("@")[0] for line in out.splitlines() if ": " in line]
    return [n for n in names if n not in ("lo", "eth0")]


def _private_tmp(data: Path) -> Path:
    tmp = data.parent / "tmp"
    tmp.mkdir(exist_ok=True)
    return tmp


def temp_leftovers(data: Path) -> set[str]:
    return {p.name for p in _private_tmp(data).glob("form-join-*")}


def assert_nothing_left(host, data: Path, units: Path, before_tmp: set[str]) -> None:
    assert not data.exists(), sorted(p.name for p in data.rglob("*"))  # no key, state or config
    assert list(units.iterdir()) == []  # no unit
    assert links(host) == []  # no WireGuard interface
    assert temp_leftovers(data) <= before_tmp  # not even the synced state of the try


def joined(data: Path):
    s = status(data)
    return s if s and s["fog"]["admitted"] and s["mesh"]["enabled"] and s["mesh"]["peers"] == 1 else None


def test_bad_invites_leave_nothing_and_a_good_one_joins_and_resumes(tmp_path, monkeypatch):
    with hosts(3) as hs:
        g, h2, h3 = hs
        gdata, data2, data3 = (tmp_path / f"node{h.index}" for h in hs)
        units2, units3 = tmp_path / "units2", tmp_path / "units3"
        units2.mkdir()
        units3.mkdir()
        pw = tmp_path / "password"
        pw.write_text(PASSWORD + "\n")
        pw.chmod(0o600)
        monkeypatch.setenv("TMPDIR", str(_private_tmp(data3)))  # the nodes started below too
        before_tmp = temp_leftovers(data3)

        start(g, gdata, "join", "--genesis")
        try:
            fog_id = wait("the genesis node", lambda: (status(gdata) or {}).get("fog", {}).get("id"), 60)
        except AssertionError:
            raise AssertionError(logs(tmp_path)) from None
        good = invite(gdata)
        peers = list(fog.InviteToken.decode(good).bootstrap)
        assert any(g.ip in p for p in peers), peers

        # a wrong token: not a token at all, and a real one of a fog the peers do not know
        proc = join(h3, data3, units3, "fmi1.garbage")
        assert proc.returncode == 1 and "damaged" in one_error_line(proc)
        assert_nothing_left(h3, data3, units3, before_tmp)
        stranger = fog.make_invite(PrivateKey(), "ab" * 16, serial=1, bootstrap=peers,
                                   expires_ms=time.time_ns() // 1_000_000 + 600_000).encode()
        t0 = time.monotonic()
        proc = join(h3, data3, units3, stranger, "--systemd", "--password-file", str(pw))
        assert proc.returncode == 1, proc.stderr
        line = one_error_line(proc)
        assert line.startswith("fog state: the peers know no fog") and "nothing was written" in line
        print(f"a token of an unknown fog refused after the sync in {time.monotonic() - t0:.1f} s")
        assert "[4/9] bootstrap     ok" in proc.stdout
        assert_nothing_left(h3, data3, units3, before_tmp)

        # an expired token, signed by the genesis itself
        gkey = load_keystore(gdata / "operator.key", PASSWORD)
        expired = fog.make_invite(gkey, fog_id, serial=9, bootstrap=peers,
                                  expires_ms=time.time_ns() // 1_000_000 - 60_000).encode()
        proc = join(h3, data3, units3, expired, "--systemd", "--password-file", str(pw))
        assert proc.returncode == 1 and "expired" in one_error_line(proc)
        assert "[1/9] invite        FAILED" in proc.stdout
        assert_nothing_left(h3, data3, units3, before_tmp)

        # an unreachable bootstrap peer: the genesis host's link is cut
        cut(g)
        try:
            t0 = time.monotonic()
            proc = join(h3, data3, units3, invite(gdata), "--timeout", "3", "--systemd",
                        "--password-file", str(pw))
            took = time.monotonic() - t0
        finally:
            heal(g)
        assert proc.returncode == 3, proc.stderr
        line = one_error_line(proc)
        assert line.startswith("bootstrap: no peer answered within 3 s") and "retry: form join TOKEN" in line
        assert took < 30, took
        assert_nothing_left(h3, data3, units3, before_tmp)

        # a good token: every step, a unit, formnet up
        monkeypatch.setenv(UNIT_DIR_ENV, str(units2))
        first = start(h2, data2, "join", good, "--systemd", "--password-file", str(pw))
        t0 = time.monotonic()
        try:
            wait("host 2 to join and mesh", lambda: joined(data2) and joined(gdata), 90)
        except AssertionError:
            raise AssertionError(logs(tmp_path)) from None
        print(f"form join TOKEN to a meshed member: {time.monotonic() - t0:.1f} s")
        assert h2.ping(status(gdata)["mesh"]["overlay_ip"], 5.0)
        out = (tmp_path / "node2.log").read_text()
        for i, name in enumerate(["invite", "host", "operator key", "bootstrap", "fog state", "config",
                                  "systemd unit", "membership"], 1):
            assert f"[{i}/9] {name:<13} ok" in out, out
        assert "[9/9] node          ok     running: member of fog " + fog_id in out
        assert (units2 / UNIT_NAME).read_text().count(str(data2 / "formation.toml")) == 1
        config = (data2 / "formation.toml").read_text()
        assert g.ip in config and "password_file" in config and "invite =" not in config

        # the same token on another host: used
        proc = join(h3, data3, units3, good, "--systemd", "--password-file", str(pw))
        assert proc.returncode == 1, proc.stderr
        line = one_error_line(proc)
        assert line.startswith("fog state: the invite was already") and "NEW_TOKEN" in line
        assert_nothing_left(h3, data3, units3, before_tmp)

        # host 2 again (stopped, then the same command): it resumes
        first.terminate()
        first.wait(30)
        assert links(h2) == []  # its formnet went with it
        again = start(h2, data2, "join", good, "--systemd", "--password-file", str(pw))
        try:
            wait("host 2 to come back", lambda: joined(data2), 90)
        except AssertionError:
            raise AssertionError(logs(tmp_path)) from None
        rerun = (tmp_path / "node2.log").read_text()[len(out):]
        assert "[1/9] invite        done   already a member of fog " + fog_id in rerun, rerun
        for i, name in [(3, "operator key"), (6, "config"), (7, "systemd unit"), (8, "membership")]:
            assert f"[{i}/9] {name:<13} done" in rerun, rerun
        assert "[9/9] node          ok     running" in rerun
        assert again.poll() is None
        assert temp_leftovers(data2) <= before_tmp
