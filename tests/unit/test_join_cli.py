"""`form join` and `form invite create` as a person sees them: a token that cannot be used is one
clear line on stderr and a non-zero exit, with nothing half-configured (no member record claimed);
wrong arguments are usage errors (exit 2); no node to ask is exit 3. Each runs the real command
(`python -m formation.cli`) in a process of its own."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from formation.crdt.keys import PrivateKey, format_address
from formation.crdt.store import Store
from formation.keystore import load_keystore
from formation.node import fog

PASSWORD = "s3cret"
OWN_KEY = PrivateKey(b"\x37" * 32)  # a fog of our own to make invites of


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def form(tmp_path: Path, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {**os.environ, "FORMATION_PASSWORD": PASSWORD, "HOME": str(tmp_path / "home")}
    env.pop("FORMATION_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "formation.cli", *argv], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=tmp_path)


def join(tmp_path: Path, *argv: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`form join ...` on a fresh data dir, on free ports, without VMs."""
    data = tmp_path / "data"
    proc = form(tmp_path, "join", *argv, "--data-dir", str(data), "--api-port", str(free_port()),
                "--p2p-port", str(free_port()), "--vms", "false")
    return proc, data


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """stderr is exactly one line "form: error: ..." (no traceback): the text after the prefix."""
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("form: error: "), lines
    return lines[0].removeprefix("form: error: ")


def assert_nothing_claimed(data: Path) -> None:
    """No member record in the data dir's state (if there is a state at all)."""
    db = data / "state.db"
    if not db.exists():
        return
    store = Store(str(db))
    try:
        assert store.list("member", limit=1000) == []
        if (data / "operator.key").exists():
            me = format_address(load_keystore(data / "operator.key", PASSWORD).address)
            assert store.get("member", me) is None
    finally:
        store.close()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def token(*, expires_ms: int | None = None) -> str:
    genesis, _ = fog.genesis(OWN_KEY, name="ours", now_ms=now_ms())
    expires = now_ms() + 600_000 if expires_ms is None else expires_ms
    return fog.make_invite(OWN_KEY, genesis["fog_id"], serial=1, expires_ms=expires, bootstrap=[]).encode()


def edited(text: str, edit) -> str:
    """The token with its JSON document changed by `edit(doc)` and encoded again."""
    body = text.removeprefix(fog.TOKEN_PREFIX)
    doc = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    edit(doc)
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return fog.TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _other_secret(doc: dict) -> None:
    doc["secret"] = PrivateKey(b"\x38" * 32).secret.hex()


def _later_serial(doc: dict) -> None:
    doc["invite"]["serial"] += 1  # what the inviter signed no longer matches


# ---- tokens that cannot be used ---------------------------------------------------------------


@pytest.mark.parametrize(("make", "words"), [
    (lambda: "garbage", "not an invite token"),
    (lambda: fog.TOKEN_PREFIX + "bm90IGpzb24", "damaged"),  # base64 of "not json"
    (lambda: token()[:-40], "damaged"),  # cut short
    (lambda: edited(token(), _other_secret), "does not match"),  # the secret of another key
    (lambda: token(expires_ms=now_ms() - 60_000), "expired"),
], ids=["garbage", "not-json", "truncated", "wrong-secret", "expired"])
def test_join_with_a_token_that_cannot_be_used_is_one_line_and_claims_nothing(tmp_path, make, words):
    proc, data = join(tmp_path, make())
    assert proc.returncode == 1, proc.stderr
    assert words in one_error_line(proc)
    assert_nothing_claimed(data)
    assert not data.exists()  # refused before any key or state was made


def test_node_with_an_unusable_invite_flag_is_refused_the_same_way(tmp_path):
    data = tmp_path / "data"
    proc = form(tmp_path, "node", "--invite", token(expires_ms=now_ms() - 1), "--data-dir", str(data),
                "--api-port", str(free_port()), "--p2p-port", str(free_port()), "--vms", "false")
    assert proc.returncode == 1, proc.stderr
    assert "expired" in one_error_line(proc)
    assert not data.exists()


def test_join_with_a_token_whose_invite_signature_is_wrong_is_refused_before_anything_is_made(tmp_path):
    """A token edited so that it still parses (the serial changed): the inviter's signature over
    the invite no longer holds, and the CLI says so before it makes a key or a state."""
    proc, data = join(tmp_path, edited(token(), _later_serial))
    assert proc.returncode == 1, proc.stderr
    assert "not the inviter's" in one_error_line(proc)
    assert not data.exists()


# ---- usage ------------------------------------------------------------------------------------


def test_join_needs_a_token_or_genesis(tmp_path):
    proc, data = join(tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "--genesis" in one_error_line(proc)
    assert not data.exists()


def test_join_with_a_token_and_genesis_is_a_usage_error(tmp_path):
    proc, data = join(tmp_path, token(), "--genesis")
    assert proc.returncode == 2, proc.stderr
    assert "not both" in one_error_line(proc)
    assert not data.exists()


# ---- form invite create -----------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--json"], ["--expires", "600"]])
def test_invite_create_without_a_running_node_cannot_reach_it(tmp_path, extra):
    data = tmp_path / "data"
    proc = form(tmp_path, "invite", "create", "--data-dir", str(data), *extra)
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc)
    assert "cannot reach the node" in line and str(data / "control.sock") in line
    assert proc.stdout == ""
    assert not data.exists()
