"""`form join` and `form invite create` as a person sees them: a token that cannot be used is one
clear line on stderr and a non-zero exit, with nothing half-configured (no member record claimed);
wrong arguments are usage errors (exit 2); no node to ask is exit 3. Each runs the real command
(`python -m formation.cli`) in a process of its own.

Then the one-command join (formation/cli/join/): its steps and their lines, the rollback of what
a failing run wrote, formation.toml and the unit as written, what is taken from a token, the
checks of the synced state (fog.check_claimable), a new fog and its resume, and a join through a
real peer on this host (slow). Across hosts: tests/integration/test_join.py."""

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


# ==== the one-command join (cli/join/): steps, rollback, resume ==================================

from formation.cli import join as joining  # noqa: E402
from formation.cli.output import CliError  # noqa: E402
from formation.crdt.kinds.fog_kinds import invite_id  # noqa: E402
from formation.node.checks import ConfigError  # noqa: E402
from formation.node.config import load_config  # noqa: E402

PEER = "16Uiu2HAmTQeGqRzyMAMKKqtPHdoWMQABMjBYZcd94RZCUTDBdSRP"


def listing(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its content (None for a directory)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*"))}


# ---- the rollback ----------------------------------------------------------------------------


def test_rollback_undoes_newest_first_and_gives_back_what_was_there(tmp_path):
    rb = joining.Rollback()
    old = tmp_path / "old.toml"
    old.write_text("before\n")
    old.chmod(0o600)
    joining.make_dirs(tmp_path / "a" / "b", rb)
    joining.put_file(tmp_path / "a" / "b" / "new", "x", rb)
    joining.put_file(old, "after\n", rb)
    assert old.read_text() == "after\n" and len(rb) == 4
    note = rb.undo_note()
    assert "removed what this run made" in note
    assert old.read_text() == "before\n" and old.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.toml"]
    assert rb.undo_note() == "nothing was written"


def test_rollback_keeps_everything_once_committed_and_says_what_it_could_not_undo(tmp_path):
    rb = joining.Rollback()
    joining.make_dirs(tmp_path / "d", rb)
    rb.commit()
    assert rb.undo() == ([], []) and (tmp_path / "d").is_dir()
    joining.make_dirs(tmp_path / "e", rb)
    (tmp_path / "e" / "someone else's").write_text("x")  # not ours: the dir stays
    undone, failed = rb.undo()
    assert undone == [] and len(failed) == 1 and str(tmp_path / "e") in failed[0]
    assert (tmp_path / "e" / "someone else's").exists()


def test_make_dirs_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(joining.JoinError, match="not a directory"):
        joining.make_dirs(tmp_path / "f" / "data", joining.Rollback())


# ---- the steps as printed ----------------------------------------------------------------------


def test_steps_print_numbered_lines_or_json_objects():
    lines: list[str] = []
    steps = joining.Steps(["invite", "node"], emit=lines.append)
    with steps.step("invite") as st:
        st.ok("fine")
    with steps.step("node") as st:
        st.done("already")
    assert lines == ["[1/2] invite        ok     fine", "[2/2] node          done   already"]
    out: list[str] = []
    with joining.Steps(["invite"], json_mode=True, emit=out.append).step("invite") as st:
        st.skip("no invite")
    assert json.loads(out[0]) == {"step": 1, "of": 1, "name": "invite", "status": "none",
                                  "detail": "no invite"}


@pytest.mark.parametrize(("exc", "code", "words"), [
    (joining.JoinError("no peer answered", "check the address", 3), 3,
     "bootstrap: no peer answered; check the address (retry: form join TOKEN --timeout 60)"),
    (fog.InviteError("the invite expired"), 1, "(retry: form join NEW_TOKEN --timeout 60)"),
    (ConfigError("x.toml: bad"), 2, "bootstrap: x.toml: bad"),
])
def test_a_failing_step_is_one_error_naming_the_step_why_what_to_do_and_the_retry(exc, code, words):
    lines: list[str] = []
    steps = joining.Steps(["bootstrap"], retry="form join TOKEN --timeout 60", emit=lines.append)
    with pytest.raises(CliError) as got, steps.step("bootstrap"):
        raise exc
    assert got.value.code == code and words in got.value.message
    assert "\n" not in got.value.message
    assert lines[0].startswith("[1/1] bootstrap     FAILED ")


def test_a_bug_in_a_step_is_not_dressed_up_as_a_failure_of_the_join():
    lines: list[str] = []
    with pytest.raises(ZeroDivisionError), joining.Steps(["host"], emit=lines.append).step("host"):
        1 / 0  # noqa: B018
    assert "FAILED" in lines[0]


# ---- formation.toml and the unit -----------------------------------------------------------------


def test_the_config_written_reads_back_as_the_config_meant(tmp_path):
    data = tmp_path / 'dir with "quotes", spaces and é'
    peers = [f"/ip4/192.0.2.1/tcp/53333/p2p/{PEER}", f"/dns4/fog.example.org/tcp/1/p2p/{PEER}"]
    meant = load_config(None, {"node.data_dir": str(data), "p2p.bootstrap": peers, "api.port": 4000,
                               "mesh.enabled": "false", "node.password_file": str(tmp_path / "pw")})
    text = joining.render_config(meant)
    path = tmp_path / "formation.toml"
    path.write_text(text)
    assert load_config(path) == meant
    assert "invite" not in text and "heartbeat_seconds" not in text  # defaults are left out
    assert joining.config_unchanged(path, meant)
    assert not joining.config_unchanged(tmp_path / "missing.toml", meant)


def test_the_unit_runs_form_node_with_that_config_quoted_for_systemd(tmp_path):
    unit = joining.render_unit(Path("/etc/form ation/50%$x.toml"), Path("/var/lib/formation"))
    assert unit.startswith(joining.UNIT_MARK)
    exec_line = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_line.endswith('node --config "/etc/form ation/50%%$$x.toml"')
    assert "formation.cli" in exec_line and "[Install]" in unit


# ---- what is taken from a token or a peer --------------------------------------------------------


def test_bootstrap_peers_keeps_only_what_formation_toml_accepts():
    good = f"/ip4/192.0.2.1/tcp/53333/p2p/{PEER}"
    kept, dropped = fog.bootstrap_peers([good, good, 7, None, "/ip4/192.0.2.1/tcp/53333",
                                         "/ip4/1.2.3.4/udp/1/p2p/" + PEER, "x" * 10_000,
                                         "/ip4/not-an-ip/tcp/1/p2p/" + PEER])
    assert kept == [good] and dropped == 6
    many = [f"/ip4/192.0.2.{i}/tcp/53333/p2p/{PEER}" for i in range(1, 40)]
    assert len(fog.bootstrap_peers(many)[0]) == fog.MAX_BOOTSTRAP


class State:
    """A fog made by OWN_KEY in a store, as a joining node would have synced it."""

    def __init__(self, **policy):
        self.store = Store()
        self.now = now_ms()
        self.genesis, member = fog.genesis(OWN_KEY, name="ours", now_ms=self.now, policy=policy or None)
        self.id = self.genesis["fog_id"]
        self.store.write(OWN_KEY, "fog", self.id, self.genesis, now_ms=self.now)
        self.store.write(OWN_KEY, "member", format_address(OWN_KEY.address), member, now_ms=self.now)

    def invite(self, serial: int = 1, inviter: PrivateKey = OWN_KEY) -> fog.InviteToken:
        return fog.make_invite(inviter, self.id, serial=serial, expires_ms=self.now + 600_000, bootstrap=[])

    def claim(self, who: PrivateKey, token: fog.InviteToken) -> None:
        self.store.write(who, "member", format_address(who.address), fog.claim(who, token, now_ms=self.now),
                         now_ms=self.now)


ME = PrivateKey(b"\x41" * 32)
OTHER = PrivateKey(b"\x42" * 32)


def test_an_unused_invite_can_be_claimed_and_a_claim_of_ones_own_is_a_resume():
    s = State()
    token = s.invite()
    assert fog.check_claimable(s.store, token, format_address(ME.address)) is False
    s.claim(ME, token)
    assert fog.check_claimable(s.store, token, format_address(ME.address)) is True


@pytest.mark.parametrize(("setup", "words"), [
    (lambda s, t: s.claim(OTHER, t), "already claimed by"),
    (lambda s, t: s.store.write(OWN_KEY, "admit", invite_id(t.invite),
                                {"invite": t.invite, "member": format_address(OTHER.address)},
                                now_ms=s.now), "already used"),
    (lambda s, t: s.claim(OTHER, s.invite(serial=1)), "handed out admission 1 twice"),
    (lambda s, t: s.store.write(OWN_KEY, "expel", f"{s.id}:{format_address(ME.address)}",
                                {"fog": s.genesis, "address": format_address(ME.address)},
                                now_ms=s.now), "expelled"),
], ids=["claimed", "sealed", "serial-twice", "expelled"])
def test_an_invite_the_state_shows_used_or_void_cannot_be_claimed(setup, words):
    s = State()
    token = s.invite()
    setup(s, token)
    with pytest.raises(fog.InviteError, match=words):
        fog.check_claimable(s.store, token, format_address(ME.address))


def test_an_invite_of_an_unknown_fog_or_a_non_member_cannot_be_claimed():
    s = State()
    me = format_address(ME.address)
    with pytest.raises(fog.InviteError, match="know no fog"):
        fog.check_claimable(s.store, fog.make_invite(OTHER, "ab" * 16, serial=1, bootstrap=[],
                                                     expires_ms=s.now + 1000), me)
    with pytest.raises(fog.InviteError, match="not \\(or no longer\\) a member"):
        fog.check_claimable(s.store, s.invite(inviter=OTHER), me)
    with pytest.raises(fog.InviteError, match="over the 1"):
        one = State(max_admits=1)
        fog.check_claimable(one.store, one.invite(serial=2), me)
    g = State(inviters="genesis")
    g.claim(OTHER, g.invite())
    with pytest.raises(fog.InviteError, match="only nodes its genesis invites"):
        fog.check_claimable(g.store, g.invite(inviter=OTHER), me)


# ---- the command: a new fog, its resume, and what a failure leaves -------------------------------


_PORTS: dict[str, tuple[int, int]] = {}


def join_cmd(tmp_path: Path, *argv: str, env: dict | None = None, data: Path | None = None,
             timeout: float = 60) -> tuple[subprocess.CompletedProcess, Path]:
    data = data or tmp_path / "data"
    api, p2p = _PORTS.setdefault(str(data), (free_port(), free_port()))  # the same on a second run
    full = ["join", *argv, "--data-dir", str(data), "--api-port", str(api), "--p2p-port", str(p2p),
            "--vms", "false", "--mesh", "false"]
    envs = {**os.environ, "FORMATION_PASSWORD": PASSWORD, "HOME": str(tmp_path / "home"), **(env or {})}
    envs.pop("FORMATION_CONFIG", None)
    proc = subprocess.run([sys.executable, "-m", "formation.cli", *full], capture_output=True,
                          text=True, env=envs, timeout=timeout, cwd=tmp_path)
    return proc, data


def step_lines(proc: subprocess.CompletedProcess) -> dict[str, str]:
    """The step lines of stdout by step name: "<status> <detail>"."""
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("["):
            name, rest = line.split("] ", 1)[1][:13].strip(), line.split("] ", 1)[1][14:]
            out[name] = rest
    return out


def test_a_new_fog_in_one_command_and_a_second_run_resumes_it(tmp_path):
    proc, data = join_cmd(tmp_path, "--genesis", "--no-start", "--name", "mine")
    assert proc.returncode == 0, proc.stderr
    steps = step_lines(proc)
    assert list(steps) == ["invite", "host", "operator key", "bootstrap", "fog state", "config",
                           "membership", "node"]
    assert steps["membership"].startswith("ok") and "genesis" in steps["membership"]
    assert {p.name for p in data.iterdir()} == {"operator.key", "state.db", "formation.toml"}
    config = load_config(data / "formation.toml")
    assert config.data_dir == data and config.p2p.bootstrap == () and config.mesh.enabled == "false"

    again, _ = join_cmd(tmp_path, "--no-start")  # no invite, no --genesis: the data dir says
    assert again.returncode == 0, again.stderr
    steps = step_lines(again)
    assert "already a member of fog" in steps["invite"] and steps["invite"].startswith("done")
    for name in ("operator key", "config", "membership"):
        assert steps[name].startswith("done"), steps
    # a plain `form node` with the written config runs the node of that membership
    shown = form(tmp_path, "node", "--config", str(data / "formation.toml"), "--once", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["data_dir"] == str(data)


def test_form_manage_join_is_the_same_command(tmp_path):
    proc, data = join_cmd(tmp_path, "--genesis", "--no-start")
    proc2 = form(tmp_path, "manage", "join", "--data-dir", str(data), "--no-start", "--mesh", "false",
                 "--vms", "false")
    assert proc.returncode == 0 and proc2.returncode == 0, proc2.stderr
    assert "already a member" in step_lines(proc2)["invite"]


def test_a_token_naming_no_peer_is_refused_before_anything_is_written(tmp_path):
    proc, data = join_cmd(tmp_path, token())
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc)
    assert line.startswith("bootstrap: no peer to reach the fog") and "nothing was written" in line
    assert not data.exists()


def test_an_unreachable_peer_is_one_error_and_leaves_what_was_there_as_it_was(tmp_path):
    """A data dir with the operator's key and a config of its own: after the failed join both are
    as they were, and nothing else is there (no state, no unit)."""
    data = tmp_path / "data"
    data.mkdir()
    from formation.keystore import create_keystore

    create_keystore(data / "operator.key", PASSWORD)
    cfg = tmp_path / "mine.toml"
    cfg.write_text("# my own\n[api]\nport = 4321\n")
    units = tmp_path / "units"
    units.mkdir()
    (tmp_path / "pw").write_text(PASSWORD)
    before = listing(tmp_path)
    dead = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{PEER}"
    t0 = time.monotonic()
    proc, _ = join_cmd(tmp_path, dead, "--timeout", "2", "--config", str(cfg), "--systemd",
                       "--password-file", str(tmp_path / "pw"), env={joining.UNIT_DIR_ENV: str(units)})
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc)
    assert line.startswith("bootstrap: no peer answered within 2 s") and "retry: form join /ip4/" in line
    assert time.monotonic() - t0 < 20
    assert listing(tmp_path) == before


def test_a_step_failing_after_files_were_written_takes_them_all_back(tmp_path):
    """The unit step fails (a unit of someone else's is in the way): the data dir, key and state
    this run wrote are removed, the operator's own config file (rewritten by the config step) has
    its old content back, and the foreign unit is untouched."""
    units = tmp_path / "units"
    units.mkdir()
    (units / joining.UNIT_NAME).write_text("[Service]\nExecStart=/bin/true\n")
    (tmp_path / "pw").write_text(PASSWORD)
    cfg = tmp_path / "etc" / "mine.toml"
    cfg.parent.mkdir()
    cfg.write_text("# mine, with a comment\n[node]\nheartbeat_seconds = 7\n")
    cfg.chmod(0o640)
    before = listing(tmp_path)
    proc, data = join_cmd(tmp_path, "--genesis", "--systemd", "--password-file", str(tmp_path / "pw"),
                          "--config", str(cfg), env={joining.UNIT_DIR_ENV: str(units)})
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc)
    assert line.startswith("systemd unit: ") and "not written by form join" in line
    assert "removed what this run made" in line
    steps = step_lines(proc)
    assert steps["config"].startswith("ok") and str(cfg) in steps["config"]
    assert steps["systemd unit"].startswith("FAILED")
    assert listing(tmp_path) == before and cfg.stat().st_mode & 0o777 == 0o640
    assert not data.exists()


def test_systemd_writes_the_unit_and_a_second_run_finds_it_done(tmp_path):
    units = tmp_path / "units"
    units.mkdir()
    (tmp_path / "pw").write_text(PASSWORD)
    args = ("--genesis", "--systemd", "--password-file", str(tmp_path / "pw"), "--no-start")
    proc, data = join_cmd(tmp_path, *args, env={joining.UNIT_DIR_ENV: str(units)})
    assert proc.returncode == 0, proc.stderr
    unit = (units / joining.UNIT_NAME).read_text()
    assert f"node --config {data / 'formation.toml'}" in unit
    assert load_config(data / "formation.toml").node.password_file == str(tmp_path / "pw")
    again, _ = join_cmd(tmp_path, "--systemd", "--password-file", str(tmp_path / "pw"), "--no-start",
                        env={joining.UNIT_DIR_ENV: str(units)})
    assert again.returncode == 0, again.stderr
    assert step_lines(again)["systemd unit"].startswith("done")


def test_systemd_needs_a_password_file(tmp_path):
    proc, data = join_cmd(tmp_path, "--genesis", "--systemd", env={joining.UNIT_DIR_ENV: str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    assert "--password-file" in one_error_line(proc)
    assert not data.exists()


def test_a_bad_multiaddr_is_a_usage_error(tmp_path):
    proc, data = join_cmd(tmp_path, "/ip4/1.2.3.4/tcp/1")
    assert proc.returncode == 2, proc.stderr
    assert "MULTIADDR" in one_error_line(proc)
    assert not data.exists()


# ---- a join through a real peer, on this host ---------------------------------------------------


def invite(data: Path, expires: int = 600) -> str:
    """A token from the member running on `data` (its control socket)."""
    from formation.node.control import ControlClient

    c = ControlClient(data / "control.sock", timeout=10)
    try:
        return c.call(cmd="invite", expires=expires)["token"]
    finally:
        c.close()


@pytest.fixture
def genesis_node(tmp_path):
    """A genesis node (`form join --genesis`, run in the foreground) on free ports, without formnet."""
    data = tmp_path / "genesis"
    log = open(tmp_path / "genesis.log", "wb")  # noqa: SIM115 - closed below
    env = {**os.environ, "FORMATION_PASSWORD": PASSWORD, "HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "formation.cli", "join", "--genesis",
                             "--data-dir", str(data), "--api-port", str(free_port()),
                             "--p2p-port", str(free_port()), "--vms", "false", "--mesh", "false"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)

    try:
        deadline = time.monotonic() + 60
        while not (data / "control.sock").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "genesis.log").read_text()
            time.sleep(0.1)
        yield data
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow  # five processes, libp2p on loopback: ~10 s (tests/integration/test_join.py: across hosts)
def test_a_join_through_a_peer_claims_once_and_the_token_cannot_be_used_again(tmp_path, genesis_node):
    token_ = invite(genesis_node)
    proc, data = join_cmd(tmp_path, token_, "--no-start", data=tmp_path / "one")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    steps = step_lines(proc)
    assert steps["bootstrap"].startswith("ok reached") or steps["bootstrap"].startswith("ok")
    assert "the invite is unused" in steps["fog state"]
    assert "claimed the invite: a member" in steps["membership"] and "sent to 1 peer" in steps["membership"]
    assert load_config(data / "formation.toml").p2p.bootstrap  # the fog's peers, for `form node`

    # the same token on another host: the fog already has the claim
    other = tmp_path / "two"
    used, _ = join_cmd(tmp_path, token_, "--no-start", data=other)
    assert used.returncode == 1, used.stderr
    assert "already" in one_error_line(used) and "NEW_TOKEN" in one_error_line(used)
    assert not other.exists()

    # a token into a fog the peers do not know (signed by a stranger, naming the same peers)
    doc_token = fog.InviteToken.decode(token_)
    stranger = fog.make_invite(PrivateKey(b"\x55" * 32), "cd" * 16, serial=1, expires_ms=now_ms() + 60_000,
                               bootstrap=list(doc_token.bootstrap)).encode()
    wrong, _ = join_cmd(tmp_path, stranger, "--no-start", data=other)
    assert wrong.returncode == 1 and "know no fog" in one_error_line(wrong)
    assert not other.exists()

    # the first host again, with the token or without: already a member
    again, _ = join_cmd(tmp_path, token_, "--no-start", data=data)
    assert again.returncode == 0, again.stderr
    assert "already a member" in step_lines(again)["invite"]


def test_a_peer_id_libp2p_cannot_read_is_not_taken_from_a_token():
    """formation.toml's check takes any base58 as a peer id; a node given one fails at every
    start, so the join keeps only what libp2p reads."""
    good = f"/ip4/192.0.2.1/tcp/53333/p2p/{PEER}"
    kept, dropped = joining.usable_peers([good, "/ip4/192.0.2.1/tcp/53333/p2p/11111111111111111111111"])
    assert kept == [good] and dropped == 1
