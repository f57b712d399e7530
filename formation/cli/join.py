"""`form join`: from a fresh host to a running member of a fog in one command, step by step.

    form join TOKEN | MULTIADDR | --genesis  [--systemd] [--no-start] [--timeout S] [node flags]

The steps, each printed as it ends ("[3/9] operator key  ok    new key 0x..."):
  invite        the token parses, is signed by its inviter, has not expired
  host          no node runs on this data dir yet, the ports are free, formnet's and the VMs'
                requirements (when they are required), where the files go is writable
  operator key  unlocked, or made in memory (written only once the checks below pass)
  bootstrap     one of the token's peers (or --bootstrap) answers over libp2p within --timeout
  fog state     the fog's state synced from it (every op verified), and from it: the fog is the
                invite's, its inviter a member, the invite claimed by no other node
  config        data dir, operator.key, state.db and formation.toml written
  systemd unit  (--systemd) formation-node.service, running `form node --config FILE`
  membership    the claim (the node's member record, proving it holds the invite's key), synced
                to a peer at once; or the genesis of a new fog. From here on the membership is a
                fact: what it needs is kept
  node          the node runs (registers, brings formnet up) in the foreground, or under systemd

Nothing is written before the checks pass. What a failing step made is undone (a Rollback: the
files this run created are removed, the files it replaced get their old content back, the
directories it made are removed when empty), so a wrong, expired or used invite or an
unreachable peer leave nothing behind; keys and files that were there before stay. A failure is
one line on stderr: the step, why, what to do, the command to retry. Exit codes as for every
`form` command: 1 the join failed (a token that cannot be used, a wrong password, ...), 2 bad
flags (or no peer named anywhere), 3 no peer could be reached (or the sync stalled), 130
interrupted. The node's own logs go to stderr once it runs.

A second run resumes: a data dir whose state holds this node's membership needs no invite (and
says "already a member of fog X"), the steps already done say "done", and the node is started
(or found running).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from formation.argtypes import int_in
from formation.cli import output
from formation.cli.output import EXIT_FAILURE, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, CliError
from formation.cli.parsing import DATA_DIR_HELP, port
from formation.crdt.keys import PrivateKey, format_address, to_checksum
from formation.crdt.op import OpError
from formation.crdt.store import Store
from formation.files import write_atomic
from formation.keystore import KeystoreError, create_keystore, load_keystore, resolve_password
from formation.node import fog
from formation.node.checks import ConfigError
from formation.node.config import KEYSTORE_FILE, STATE_FILE, Config, load_config, with_tcp_port
from formation.node.fog import InviteError, InviteToken, Standing
from formation.node.settings import SETTINGS
from formation.node.setup import NodeError, open_store

UNIT_NAME = "formation-node.service"
UNIT_DIR = Path("/etc/systemd/system")
UNIT_DIR_ENV = "FORMATION_SYSTEMD_DIR"  # tests: write the unit there, never call systemctl
UNIT_MARK = "# Written by `form join`"
CONFIG_NAME = "formation.toml"
DEFAULT_TIMEOUT = 20
ALWAYS_WRITTEN = ("node.data_dir", "p2p.bootstrap", "mesh.enabled")
STEPS = ("invite", "host", "operator key", "bootstrap", "fog state", "config", "systemd unit",
         "membership", "node")

log = logging.getLogger("formation.join")


class JoinError(Exception):
    """A step that cannot go on: why, what to do about it, and the exit code."""

    def __init__(self, why: str, fix: str = "", code: int = EXIT_FAILURE):
        super().__init__(why)
        self.why, self.fix, self.code = why, fix, code


# ---- the steps as printed ----------------------------------------------------------------------


class Step:
    def __init__(self):
        self.status = "ok"
        self.detail = ""
        self.printed = False

    def ok(self, detail: str) -> None:
        self.status, self.detail = "ok", detail

    def done(self, detail: str) -> None:
        """Done by an earlier run (or not needed): nothing changed."""
        self.status, self.detail = "done", detail

    def skip(self, detail: str) -> None:
        self.status, self.detail = "none", detail


class Steps:
    """Numbered step lines on stdout (the command's report; --json: one object per line). A step
    that raises prints FAILED and becomes one CliError: the step, why, what to do, and the
    command to retry (`retry`, the token shown as TOKEN)."""

    def __init__(self, names: list[str], *, json_mode: bool = False, retry: str = "",
                 emit: Callable[[str], None] | None = None):
        self.names = names
        self.json = json_mode
        self.retry = retry
        self.emit = emit or (lambda line: print(line, flush=True))
        self.printed: list[tuple[str, str, str]] = []  # (name, status, detail)

    def _line(self, name: str, status: str, detail: str) -> None:
        self.printed.append((name, status, detail))
        i = self.names.index(name) + 1
        if self.json:
            self.emit(json.dumps({"step": i, "of": len(self.names), "name": name, "status": status,
                                  "detail": detail}))
        else:
            self.emit(f"[{i}/{len(self.names)}] {name:<13} {status:<6} {detail}".rstrip())

    def finish(self, name: str, st: Step) -> None:
        """Print the step's line now (a step that goes on after it has succeeded: the node)."""
        if not st.printed:
            st.printed = True
            self._line(name, st.status, st.detail)

    def failure(self, name: str, exc: BaseException) -> CliError | None:
        """Print the step as FAILED; the one-line error for `exc` (None: not ours, a bug)."""
        retry = self.retry
        if isinstance(exc, JoinError):
            why, fix, code = exc.why, exc.fix, exc.code
        elif isinstance(exc, InviteError):  # the token cannot be used again: a new one can
            why, fix, code = str(exc), "", EXIT_FAILURE
            retry = retry.replace("TOKEN", "NEW_TOKEN", 1)
        elif isinstance(exc, KeystoreError | NodeError):
            why, fix, code = str(exc), "", EXIT_FAILURE
        elif isinstance(exc, ConfigError):
            why, fix, code = str(exc), "", EXIT_USAGE
        elif isinstance(exc, CliError):
            why, fix, code = exc.message, "", exc.code
        else:
            self._line(name, "FAILED", f"{type(exc).__name__}: {exc}")
            return None
        self._line(name, "FAILED", why)
        text = f"{name}: {why}" + (f"; {fix}" if fix else "")
        return CliError(text + (f" (retry: {retry})" if retry else ""), code)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Step]:
        st = Step()
        try:
            yield st
        except Exception as exc:
            err = self.failure(name, exc)
            if err is None:
                raise
            raise err from None
        self.finish(name, st)


# ---- undoing what a failed run made ------------------------------------------------------------


class Rollback:
    """What this run changed, undone in reverse order when it fails; `commit` keeps it all."""

    def __init__(self):
        self._undo: list[tuple[str, Callable[[], None]]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def add(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    def created(self, path: Path) -> None:
        self.add(path.name, lambda: path.unlink(missing_ok=True))

    def replaced(self, path: Path, old: bytes, mode: int) -> None:
        def restore() -> None:
            write_atomic(path, old)
            os.chmod(path, mode)

        self.add(f"{path.name} (its old content)", restore)

    def made_dir(self, path: Path) -> None:
        self.add(f"{path}/", lambda: path.rmdir())

    def commit(self) -> None:
        self._undo.clear()

    def undo(self) -> tuple[list[str], list[str]]:
        """Undo everything, newest first: (what was undone, what could not be and why)."""
        undone, failed = [], []
        while self._undo:
            what, fn = self._undo.pop()
            try:
                fn()
                undone.append(what)
            except OSError as exc:
                failed.append(f"{what} ({exc.strerror or exc})")
        return undone, failed

    def undo_note(self) -> str:
        """Undo, and say so in a few words for the error line."""
        if not self._undo:
            return "nothing was written"
        undone, failed = self.undo()
        note = f"removed what this run made ({', '.join(reversed(undone))})" if undone else ""
        if failed:
            note += ("; " if note else "") + f"could not undo {', '.join(failed)}"
        return note


def make_dirs(path: Path, rollback: Rollback, mode: int = 0o700) -> None:
    """`path` and its missing parents, each one undone (if still empty) on failure."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise JoinError(f"{p} is not a directory", f"choose another place than {path}")
    for d in reversed(missing):
        d.mkdir(mode=mode if d == path else 0o755)
        rollback.made_dir(d)


def put_file(path: Path, data: str | bytes, rollback: Rollback, mode: int = 0o644) -> None:
    """Write `path` whole (atomically); on rollback remove it, or put back what it held."""
    old = path.read_bytes() if path.exists() else None
    old_mode = path.stat().st_mode & 0o7777 if old is not None else 0
    write_atomic(path, data, fsync=True)
    if old is None:
        rollback.created(path)
    else:
        rollback.replaced(path, old, old_mode)
    os.chmod(path, old_mode if old is not None else mode)  # a replaced file keeps its mode


# ---- the plan: what this run is to do, from the flags, the config and the data dir ---------------


@dataclass
class Plan:
    config: Config  # what formation.toml will say (the invite is never written)
    config_path: Path
    target: str | None  # the positional argument: a token or a multiaddr
    genesis: bool
    systemd: bool
    unit_path: Path
    start: bool
    timeout: int
    json: bool
    log_json: bool
    retry: str
    running: dict | None = None  # the status of a node already running on the data dir
    standing: Standing = field(default_factory=Standing)
    address: str | None = None  # the operator key's (from its file; checked when unlocked)
    state_ops: int = 0
    committed: bool = False  # the membership is written: what this run made is kept

    @property
    def unit_dir_overridden(self) -> bool:
        return bool(os.environ.get(UNIT_DIR_ENV))


def _overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    overrides: dict[str, Any] = {}
    names: dict[str, str] = {}
    for flag, dotted, value in (
        ("--data-dir", "node.data_dir", args.data_dir),
        ("--api-port", "api.port", args.api_port),
        ("--vms", "vm.enabled", args.vms),
        ("--mesh", "mesh.enabled", args.mesh),
        ("--password-file", "node.password_file", args.password_file),
        ("--name", "fog.name", args.name),
        ("--bootstrap", "p2p.bootstrap", args.bootstrap),
    ):
        if value is not None:
            overrides[dotted] = value
            names[dotted] = flag
    return overrides, names


def retry_command(args: argparse.Namespace) -> str:
    """The command to run again (the token as TOKEN: it is long, and a secret)."""
    words = ["form", "join"]
    if args.genesis:
        words.append("--genesis")
    elif args.target:
        words.append("TOKEN" if not args.target.startswith("/") else args.target)
    for flag, value in (("--config", args.config), ("--data-dir", args.data_dir),
                        ("--api-port", args.api_port), ("--p2p-port", args.p2p_port),
                        ("--vms", args.vms), ("--mesh", args.mesh),
                        ("--password-file", args.password_file), ("--name", args.name),
                        ("--timeout", args.timeout if args.timeout != DEFAULT_TIMEOUT else None)):
        if value is not None:
            words += [flag, str(value)]
    for addr in args.bootstrap or []:
        words += ["--bootstrap", addr]
    words += [flag for flag, on in (("--systemd", args.systemd), ("--no-start", args.no_start)) if on]
    return " ".join(shlex.quote(w) if w != "TOKEN" else w for w in words)


def make_plan(args: argparse.Namespace) -> Plan:
    """Read the flags, the config file (if there is one), and what the data dir holds. Writes
    nothing. Raises CliError (usage) or ConfigError."""
    target = (args.target or "").strip() or None
    if args.genesis and target:
        raise CliError("give an invite token, or --genesis to start a new fog (not both)", EXIT_USAGE)
    if args.genesis and args.bootstrap:
        raise CliError("--genesis starts a new fog: it takes no --bootstrap", EXIT_USAGE)
    overrides, names = _overrides(args)
    if target and target.startswith("/"):  # a peer to join through (no invite)
        overrides["p2p.bootstrap"] = [*(args.bootstrap or []), target]
        names["p2p.bootstrap"] = "MULTIADDR"
    if args.config:
        config_path = Path(args.config).expanduser().absolute()
    else:
        config_path = load_config(None, {k: v for k, v in overrides.items() if k == "node.data_dir"},
                                  override_names=names).data_dir / CONFIG_NAME
    if config_path.is_dir():
        raise CliError(f"{config_path}: is a directory, not a config file", EXIT_USAGE)
    base = config_path if config_path.exists() else None
    config = load_config(base, overrides, override_names=names)
    if args.p2p_port is not None:
        listen = with_tcp_port(config.p2p.listen, args.p2p_port)
        config = dataclasses.replace(config, p2p=dataclasses.replace(config.p2p, listen=listen))
    # the invite is a secret, and used once: the membership it gives lives in the state
    config = dataclasses.replace(config, fog=dataclasses.replace(config.fog, invite=""))
    if args.genesis:
        config = dataclasses.replace(config, p2p=dataclasses.replace(config.p2p, bootstrap=()))
    unit_dir = Path(os.environ.get(UNIT_DIR_ENV) or UNIT_DIR)
    if args.systemd:
        if config.node.password_file is None:
            raise CliError("--systemd: the unit starts the node with nobody to type the keystore's "
                           "password; give a file holding it: --password-file FILE (chmod 600), or "
                           "[node] password_file in the config", EXIT_USAGE)
        if not unit_dir.is_dir() or not os.access(unit_dir, os.W_OK):
            raise CliError(f"--systemd: cannot write a unit into {unit_dir} (not a writable "
                           "directory; run as root, or leave out --systemd)", EXIT_USAGE)
    plan = Plan(config=config, config_path=config_path, target=target, genesis=args.genesis,
                systemd=args.systemd, unit_path=unit_dir / UNIT_NAME,
                start=not args.no_start, timeout=args.timeout, json=args.json,
                log_json=args.log_json or config.node.log_json, retry=retry_command(args))
    plan.running = running_node(config.data_dir)
    if plan.running is not None:
        plan.address = str(plan.running.get("address", "")).lower() or None
        fog_state = plan.running.get("fog") or {}
        if isinstance(fog_state, dict) and isinstance(fog_state.get("id"), str):
            plan.standing = Standing(fog_state["id"], bool(fog_state.get("admitted")), {"fog_id": fog_state["id"]})
    else:
        plan.address = keystore_address(config.keystore_path)
        if plan.address and config.state_path.is_file():
            store = open_store(config)
            try:
                plan.standing = fog.standing(store, plan.address)
                plan.state_ops = len(store)
            finally:
                store.close()
    if not target and not args.genesis and not args.bootstrap and plan.standing.record is None:
        raise CliError("give an invite token (from `form invite create` on a member), or --genesis "
                       "to start a new fog, or a peer's MULTIADDR to sync from", EXIT_USAGE)
    return plan


def keystore_address(path: Path) -> str | None:
    """The address a keystore file names in clear (checked against the key when it is unlocked)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    addr = doc.get("address") if isinstance(doc, dict) else None
    return addr.lower() if isinstance(addr, str) and re.fullmatch(r"0x[0-9a-fA-F]{40}", addr) else None


def running_node(data_dir: Path) -> dict | None:
    """The status of the node that runs on this data dir (its control socket answers), or None."""
    from formation.node.control import ControlClient

    path = data_dir / "control.sock"
    if not path.exists():
        return None
    try:
        client = ControlClient(path, timeout=5)
    except OSError:
        return None
    try:
        answer = client.call(cmd="status")
    except (OSError, ValueError):
        return None
    finally:
        client.close()
    return answer if isinstance(answer, dict) and answer.get("ok") else None


# ---- the host ------------------------------------------------------------------------------------


def _bind_problem(what: str, host: str, port_: int, kind: int) -> str:
    try:
        infos = socket.getaddrinfo(host, port_, type=kind, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return f"{what} address {host} does not resolve ({exc.strerror or exc})"
    family, socktype, proto, _, addr = infos[0]
    with socket.socket(family, socktype, proto) as s:
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            return f"{what} port {port_} on {host} is taken ({exc.strerror or exc})"
    return ""


def port_problems(config: Config, mesh: bool) -> list[str]:
    parts = config.p2p.listen.strip("/").split("/")
    checks = [("the API", config.api.host, config.api.port, socket.SOCK_STREAM),
              ("libp2p", parts[1], int(parts[3]), socket.SOCK_STREAM)]
    if mesh:
        checks.append(("WireGuard", "0.0.0.0", config.mesh.wireguard_port, socket.SOCK_DGRAM))
    return [p for p in (_bind_problem(*c) for c in checks) if p]


def writable_place(path: Path) -> str:
    """Why `path` (a directory or a file to be) cannot be made here; "" when it can."""
    p = path
    while not p.exists():
        p = p.parent
    if path.exists() and path.is_dir():
        return "" if os.access(path, os.W_OK) else f"{path} is not writable"
    if p != path and not p.is_dir():
        return f"{p} is not a directory"
    target = p if p != path else path.parent
    return "" if os.access(target, os.W_OK) else f"{target} is not writable"


def check_host(plan: Plan, st: Step) -> None:
    from formation.mesh.wggo import MeshError
    from formation.node.runtime import mesh_problem
    from formation.node.vmhost import requirements_problem as vm_problem

    config = plan.config
    if plan.running is not None:
        st.done(f"a node already runs on {config.data_dir} (its control socket answers)")
        return
    if config.data_dir.exists() and not config.data_dir.is_dir():
        raise JoinError(f"the data dir {config.data_dir} is not a directory", "give another --data-dir")
    for place in (config.data_dir, plan.config_path):
        problem = writable_place(place)
        if problem:
            raise JoinError(problem, "run as a user who may write there, or choose other paths "
                                     "(--data-dir, --config)")
    try:
        mesh = mesh_problem(config)
    except MeshError as exc:
        raise JoinError(str(exc), "install wireguard-go and run as root, or pass --mesh auto "
                                  "(or false)") from None
    vms = "off: vm.enabled = false" if config.vm.enabled == "false" else ""
    if not vms:
        problem = vm_problem()
        if problem and config.vm.enabled == "true":
            raise JoinError(f"vm.enabled = true but {problem}", "install QEMU and run as root, "
                                                                "or pass --vms auto (or false)")
        vms = f"off: {problem}" if problem else "on"
    if plan.start:
        taken = port_problems(config, not mesh)
        if taken:
            raise JoinError("; ".join(taken), "stop what holds it, or choose other ports "
                                              "(--api-port, --p2p-port, [mesh] wireguard_port)")
    st.ok(f"formnet {'will come up' if not mesh else f'off: {mesh}'}; VMs {vms}"
          + ("; ports free" if plan.start else ""))


# ---- the operator key ----------------------------------------------------------------------------


@dataclass
class Operator:
    key: PrivateKey
    created: bool
    password: str | None  # only for a key still to be written

    @property
    def address(self) -> str:
        return format_address(self.key.address)


def operator_key(plan: Plan, st: Step) -> Operator | None:
    config = plan.config
    if plan.running is not None:
        st.done(f"held by the running node ({plan.address})")
        return None
    path = config.keystore_path
    if path.exists():
        password = resolve_password(config.node.password_file, prompt=True, confirm=False)
        key = load_keystore(path, password)
        st.done(f"unlocked {to_checksum(key.address)} ({path})")
        return Operator(key, False, None)
    password = resolve_password(config.node.password_file, prompt=True, confirm=True)
    key = PrivateKey()
    st.ok(f"new key {to_checksum(key.address)} (written to {path} once the checks pass)")
    return Operator(key, True, password)


# ---- reaching the fog and syncing its state ----------------------------------------------------


@dataclass
class Synced:
    peers: list[str]  # peer ids answered
    ops: int  # ops received
    seconds: float


def _short_addrs(addrs: list[str]) -> str:
    shown = ", ".join(addrs[:2])
    return shown + (f" and {len(addrs) - 2} more" if len(addrs) > 2 else "")


async def probe_fog(key: PrivateKey, store: Store, peers: list[str], timeout: float,
                    on_reached: Callable[[list[str], float], None]) -> Synced:
    """Dial `peers` (only them) with the node's own libp2p identity, and sync the state from the
    first that answers: the path every node syncs by (p2p/service.py, p2p/sync.py), every op
    verified. Raises JoinError when none answers within `timeout` seconds, or when the sync
    stops bringing ops for `timeout` seconds before a session completes."""
    from formation.crdt.async_store import AsyncStore
    from formation.p2p.service import P2PService, P2PSettings

    astore = AsyncStore(store)
    p2p = P2PService(key, astore, P2PSettings(
        listen=["/ip4/127.0.0.1/tcp/0"],  # it dials out only; nobody needs to reach it
        sync_interval=3600.0, dial_timeout=min(10.0, float(timeout)), redial_max=2.0))

    async def nobody() -> list[dict]:  # dial the peers given, not the node records of the state
        return []

    p2p.peer_source = nobody
    ids: set[str] = set()
    for addr in peers:
        with contextlib.suppress(Exception):  # a peer id libp2p cannot read: that peer is skipped
            ids.add(p2p.add_peer(addr))
    ids.discard(p2p.peer_id)
    if not ids:
        raise JoinError(f"no usable peer to reach the fog through ({_short_addrs(peers)})",
                        "give a member's address: --bootstrap /ip4/HOST/tcp/PORT/p2p/PEER_ID",
                        EXIT_USAGE)
    result: Synced | None = None
    error: JoinError | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(p2p.run)
        try:
            result = await _reach_and_sync(p2p, store, ids, peers, timeout, on_reached)
        except JoinError as exc:
            error = exc
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    assert result is not None
    return result


async def _reach_and_sync(p2p, store: Store, ids: set[str], peers: list[str], timeout: float,
                          on_reached: Callable[[list[str], float], None]) -> Synced:
    t0 = trio.current_time()
    with trio.move_on_after(timeout):
        while not ids & set(p2p.connected()):
            await trio.sleep(0.05)
    reached = sorted(ids & set(p2p.connected()))
    if not reached:
        raise JoinError(f"no peer answered within {timeout:g} s (tried {_short_addrs(peers)})",
                        "check that the fog's node runs and that this host reaches it (address, "
                        "firewall), or give another member with --bootstrap, or wait longer with "
                        "--timeout", EXIT_UNREACHABLE)
    on_reached(reached, trio.current_time() - t0)

    t1 = trio.current_time()
    before = len(store)
    synced = trio.Event()

    def seen(res) -> None:
        if res.ok and res.peer in ids:
            synced.set()

    p2p.on_sync.append(seen)
    try:
        async with trio.open_nursery() as nursery:
            async def attempts() -> None:
                while not synced.is_set():
                    for peer in sorted(ids & set(p2p.connected())):
                        await p2p.sync_with(peer)  # its result reaches `seen` (either direction)
                        if synced.is_set():
                            return
                    await trio.sleep(0.5)

            nursery.start_soon(attempts)
            count, since = len(store), trio.current_time()
            # bounded by progress (a big state may take a while), and in all
            with trio.move_on_after(max(600.0, 30.0 * timeout)):
                while not synced.is_set():
                    with trio.move_on_after(0.2):
                        await synced.wait()
                    if len(store) != count:
                        count, since = len(store), trio.current_time()
                    elif trio.current_time() - since > timeout:
                        break
            nursery.cancel_scope.cancel()
    finally:
        p2p.on_sync.remove(seen)
    if not synced.is_set():
        raise JoinError(f"reached {len(reached)} peer(s) but no sync of the state completed "
                        f"({len(store) - before} ops came, then nothing for {timeout:g} s, or "
                        "it took too long)",
                        "try again, or give another member with --bootstrap", EXIT_UNREACHABLE)
    return Synced(reached, len(store) - before, trio.current_time() - t1)


def run_trio(fn, *args):
    """trio.run, with the one error out of its nurseries raised as itself."""
    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if leaf is group:
            raise
        raise leaf from None


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """The node's loggers say nothing while the steps print (logging is set up when it runs)."""
    null = logging.NullHandler()
    lg = logging.getLogger("formation")
    lg.addHandler(null)
    try:
        yield
    finally:
        lg.removeHandler(null)


# ---- formation.toml and the unit -----------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(json.dumps(str(v)) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def render_config(config: Config) -> str:
    """formation.toml for `config`: the settings that differ from the defaults (and the data dir,
    the bootstrap peers and formnet, always)."""
    default = load_config(None)
    out = [f"{UNIT_MARK}: the settings of the node in {config.data_dir}.",
           "# Run it with `form node --config THIS_FILE`. Settings not here are at their defaults",
           "# (all of them, with what they do: `python -m formation.node.settings`)."]
    section = None
    for s in SETTINGS:
        value = getattr(getattr(config, s.section), s.key)
        if value is None or (s.dotted not in ALWAYS_WRITTEN
                             and value == getattr(getattr(default, s.section), s.key)):
            continue
        if s.section != section:
            section = s.section
            out += ["", f"[{section}]"]
        out.append(f"{s.key} = {_toml_value(value)}")
    return "\n".join(out) + "\n"


def config_unchanged(path: Path, config: Config) -> bool:
    if not path.is_file():
        return False
    try:
        return load_config(path) == config
    except ConfigError:
        return False


def _systemd_word(word: str) -> str:
    word = word.replace("%", "%%").replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9_./:@+=,-]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_unit(config_path: Path, data_dir: Path) -> str:
    cmd = [sys.executable, "-m", "formation.cli", "node", "--config", str(config_path)]
    return "\n".join([
        f"{UNIT_MARK}: the Formation node of {_systemd_word(str(data_dir))}.",
        "[Unit]",
        "Description=Formation node (a member of a fog)",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(_systemd_word(w) for w in cmd),
        "Restart=on-failure",
        "RestartSec=5",
        "TimeoutStopSec=30",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def systemd_running() -> bool:
    return bool(shutil.which("systemctl")) and Path("/run/systemd/system").is_dir() \
        and not os.environ.get(UNIT_DIR_ENV)


def systemctl(*args: str) -> None:
    try:
        proc = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise JoinError(f"systemctl {' '.join(args)} failed: {exc}") from None
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise JoinError(f"systemctl {' '.join(args)} failed: {why}",
                        f"see `systemctl status {UNIT_NAME}`")


# ---- the run -------------------------------------------------------------------------------------


@dataclass
class Mode:
    """What this run does: claim an invite, make a genesis, only sync (a peer, no invite), or
    resume a membership the data dir holds."""

    kind: str  # "invite" | "genesis" | "peer" | "resume"
    token: InviteToken | None = None
    peers: list[str] = field(default_factory=list)


def choose_mode(plan: Plan, st: Step) -> Mode:
    """The invite step: what the token is, against what the data dir already holds."""
    own = plan.standing
    token: InviteToken | None = None
    if plan.target and not plan.target.startswith("/"):
        token = InviteToken.decode(plan.target)
    if own.record is not None:
        fog_id = own.fog_id
        if token is not None and token.invite["fog_id"] != fog_id and own.admitted:
            raise JoinError(f"this node is already a member of fog {fog_id}, and the invite is "
                            f"into fog {token.invite['fog_id']}",
                            "use another --data-dir (a node is a member of one fog), or leave fog "
                            f"{fog_id} first (form manage leave)")
        if token is None or own.admitted or fog.same_invite(own.record.get("invite"), token.invite):
            what = ("its node runs" if plan.running is not None else "its genesis" if own.genesis
                    else "admitted" if own.admitted else "claimed, not admitted in its state yet")
            st.done(f"already a member of fog {fog_id} ({what})"
                    + ("; the invite is not needed" if token is not None else ""))
            peers = [*plan.config.p2p.bootstrap, *(token.bootstrap if token is not None else ())]
            return Mode("resume", token, usable_peers(peers)[0])
        # its claim did not admit it (a burned invite, say): a new invite replaces the claim
    if plan.running is not None:
        raise JoinError(f"a node already runs on {plan.config.data_dir} and is not a member of a fog",
                        "stop it (Ctrl-C, or systemctl stop formation-node), then run form join again")
    if plan.genesis:
        st.skip("--genesis: this node makes a new fog")
        return Mode("genesis")
    if token is None:
        st.skip("no invite: the node syncs the fog's state and runs no workloads until a member "
                "invites it")
        return Mode("peer", peers=list(plan.config.p2p.bootstrap))
    fog.check_usable(token)
    # the peers given (--bootstrap, or the config file's), then the token's
    peers, dropped = usable_peers([*plan.config.p2p.bootstrap, *token.bootstrap])
    inv = token.invite
    st.ok(f"fog {inv['fog_id']}, admission {inv['serial']} of {inv['inviter']}, valid until "
          f"{output.when(inv['expires'])}; {len(peers)} address(es) to try"
          + (f" ({dropped} unusable address(es) left out)" if dropped else ""))
    return Mode("invite", token, peers)


def execute(plan: Plan, steps: Steps, rollback: Rollback) -> int:
    with steps.step("invite") as st:
        mode = choose_mode(plan, st)
    if mode.peers and not plan.standing.genesis:  # what formation.toml will name
        plan.config = _with_bootstrap(plan.config, mode.peers)
    config = plan.config
    with steps.step("host") as st:
        check_host(plan, st)
    with steps.step("operator key") as st:
        op = operator_key(plan, st)
    me = op.address if op is not None else plan.address

    tmp: Path | None = None
    store: Store | None = None
    try:
        if mode.kind in ("invite", "peer"):
            assert op is not None
            if config.state_path.is_file():
                store = open_store(config)  # the operator's own state: the sync adds the fog's ops
            else:
                tmp = Path(tempfile.mkdtemp(prefix="form-join-"))
                store = open_store(_with_data_dir(config, tmp))
            synced = _network_steps(plan, steps, mode, op.key, store)
            with steps.step("fog state") as st:
                _check_state(plan, mode, op, store, synced, st)
        else:
            with steps.step("bootstrap") as st:
                if mode.kind == "genesis":
                    st.skip("a new fog has no peers yet")
                else:
                    st.done("the node syncs with its peers itself")
            with steps.step("fog state") as st:
                if mode.kind == "genesis":
                    st.skip("made at the membership step")
                else:
                    st.done(f"{plan.state_ops or 'the'} ops in {config.state_path}"
                            if plan.running is None else "kept by the running node")

        with steps.step("config") as st:
            if mode.kind == "resume" and not config.p2p.bootstrap and plan.standing.fog_id \
                    and not plan.standing.genesis and plan.running is None:
                config = plan.config = _with_bootstrap(config, _bootstrap_from_state(config, me))
            wrote = save_files(plan, op, store, tmp, rollback)
            store = None  # closed (and moved into the data dir when it was new)
            changed = [w for w in wrote if w]
            if changed:
                st.ok("wrote " + ", ".join(changed))
            else:
                st.done(f"{plan.config_path} unchanged")
        if plan.systemd:
            with steps.step("systemd unit") as st:
                _unit_step(plan, rollback, st)

        with steps.step("membership") as st:
            _membership_step(plan, mode, op, rollback, st)
        rollback.commit()  # the membership is a fact now: everything it needs is kept
        plan.committed = True
    finally:
        if store is not None:
            store.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    with steps.step("node") as st:
        return _node_step(plan, op, steps, st)


def _with_data_dir(config: Config, data_dir: Path) -> Config:
    return dataclasses.replace(config, node=dataclasses.replace(config.node, data_dir=str(data_dir)))


def _with_bootstrap(config: Config, peers: list[str]) -> Config:
    return dataclasses.replace(config, p2p=dataclasses.replace(config.p2p, bootstrap=tuple(peers)))


def _bootstrap_from_state(config: Config, me: str | None) -> list[str]:
    """Peers to write when resuming without any: the other members' announced addresses."""
    store = open_store(config)
    try:
        own = fog.standing(store, me) if me else Standing()
        if own.fog_id is None:
            return []
        members = store.fog_members(own.fog_id) - {me}
        addrs = [a for n in store.list("node", limit=10_000) if n["address"] in members
                 for a in n.get("multiaddrs", [])]
    finally:
        store.close()
    return usable_peers(addrs)[0]


def usable_peers(addrs) -> tuple[list[str], int]:
    """fog.bootstrap_peers, and only those whose peer id libp2p reads (formation.toml's check
    takes any base58 there, and the node would fail at every start on one it cannot read)."""
    import multiaddr
    from libp2p.peer.peerinfo import info_from_p2p_addr

    kept, dropped = fog.bootstrap_peers(addrs)
    readable = []
    for addr in kept:
        try:
            info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception:  # noqa: BLE001 - whatever libp2p raises for it: not a peer to dial
            dropped += 1
            continue
        readable.append(addr)
    return readable, dropped


def _network_steps(plan: Plan, steps: Steps, mode: Mode, key: PrivateKey, store: Store) -> Synced:
    """The bootstrap step (printed as soon as a peer answers), then the sync, whose failure is
    the fog state step's."""
    st = Step()

    def on_reached(ids: list[str], seconds: float) -> None:
        st.ok(f"reached peer {', '.join('…' + p[-8:] for p in ids)} in {seconds:.1f} s")
        steps.finish("bootstrap", st)

    try:
        if not mode.peers:
            raise JoinError("no peer to reach the fog through: the invite names none",
                            "give a member's address: --bootstrap /ip4/HOST/tcp/PORT/p2p/PEER_ID",
                            EXIT_USAGE)
        with quiet_logs():
            return run_trio(probe_fog, key, store, mode.peers, plan.timeout, on_reached)
    except Exception as exc:
        err = steps.failure("fog state" if st.printed else "bootstrap", exc)
        if err is None:
            raise
        raise err from None


def _check_state(plan: Plan, mode: Mode, op: Operator, store: Store, synced: Synced, st: Step) -> None:
    me = op.address
    own = fog.standing(store, me)
    got = f"{synced.ops} ops synced in {synced.seconds:.1f} s"
    if own.record is not None and own.admitted and (mode.token is None
                                                    or own.fog_id == mode.token.invite["fog_id"]):
        plan.standing = own
        mode.kind = "resume"  # the fog already counts this key as a member (a data dir lost?)
        st.done(f"{got}; the fog already counts this node as a member of fog {own.fog_id}")
        return
    if mode.token is None:
        st.ok(f"{got}; not a member: the node will sync and run no workloads")
        return
    if own.record is not None and own.admitted:
        raise JoinError(f"this operator key is already a member of fog {own.fog_id}, not of the "
                        f"invite's fog {mode.token.invite['fog_id']}",
                        "use another --data-dir with a new key")
    mine = fog.check_claimable(store, mode.token, me)
    fog_id = mode.token.invite["fog_id"]
    members = len(store.fog_members(fog_id))
    if mine:
        plan.standing = fog.standing(store, me)
        mode.kind = "resume"
        st.done(f"{got}; fog {fog_id} ({members} members) already holds this node's claim")
        return
    st.ok(f"{got}; fog {fog_id} has {members} member(s); the invite is unused")


def save_files(plan: Plan, op: Operator | None, store: Store | None, tmp: Path | None,
               rollback: Rollback) -> list[str]:
    """The data dir, the operator key, the state (a new one moved in) and formation.toml."""
    config = plan.config
    wrote: list[str] = []
    if plan.running is None:
        make_dirs(config.data_dir, rollback)
        if op is not None and op.created:
            create_keystore(config.keystore_path, op.password or "", op.key.secret)
            rollback.created(config.keystore_path)
            wrote.append(KEYSTORE_FILE)
    if store is not None:
        store.close()
    if tmp is not None:  # the state synced into a temporary dir: moved in whole
        if config.state_path.exists():
            raise JoinError(f"{config.state_path} appeared while this run synced", "run it again")
        rollback.add(STATE_FILE, lambda: _remove_state(config.state_path))
        for part in sorted(tmp.iterdir()):
            shutil.move(str(part), config.data_dir / part.name)
        wrote.append(STATE_FILE)
    make_dirs(plan.config_path.parent, rollback, mode=0o755)
    if not config_unchanged(plan.config_path, config):
        put_file(plan.config_path, render_config(config), rollback)
        if load_config(plan.config_path) != config:  # what the node will read is what we meant
            raise JoinError(f"{plan.config_path} does not read back as written", "report this")
        wrote.append(str(plan.config_path))
    return wrote


def _unit_step(plan: Plan, rollback: Rollback, st: Step) -> None:
    path = plan.unit_path
    text = render_unit(plan.config_path, plan.config.data_dir)
    if path.exists():
        old = path.read_text(errors="replace")
        if old == text:
            st.done(f"{path} unchanged")
            return
        if not old.startswith(UNIT_MARK):
            raise JoinError(f"{path} exists and was not written by form join",
                            "move it away, or leave out --systemd")
    put_file(path, text, rollback)
    if systemd_running():
        rollback.add("systemd's view of the unit", lambda: _quiet_systemctl("daemon-reload"))
        systemctl("daemon-reload")
        st.ok(f"wrote {path}; enabled and started at the node step")
    else:
        st.ok(f"wrote {path}" + ("" if plan.unit_dir_overridden else
                                 " (systemd is not running here: enable it with "
                                 f"`systemctl enable --now {UNIT_NAME}` where it is)"))


def _quiet_systemctl(*args: str) -> None:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(["systemctl", *args], capture_output=True, timeout=60)


def _membership_step(plan: Plan, mode: Mode, op: Operator | None, rollback: Rollback, st: Step) -> None:
    config = plan.config
    if mode.kind == "resume":
        own = plan.standing
        st.done(f"member of fog {own.fog_id}" + ("" if own.admitted or plan.running is not None
                                                 else " (not admitted in this node's state yet)"))
        return
    if mode.kind == "peer":
        st.skip("no invite: not a member (ask a member for one: form invite create, then form join TOKEN)")
        return
    assert op is not None
    now = time.time_ns() // 1_000_000
    new_state = not config.state_path.exists()
    store = open_store(config)
    if new_state:
        rollback.add(STATE_FILE, lambda: _remove_state(config.state_path))
    try:
        if mode.kind == "genesis":
            genesis, member = fog.genesis(op.key, name=config.fog.name, now_ms=now)
            store.write(op.key, "fog", genesis["fog_id"], genesis, now_ms=now)
            store.write(op.key, "member", op.address, member, now_ms=now)
            plan.standing = fog.standing(store, op.address)
            st.ok(f"made fog {genesis['fog_id']}: this node is its genesis")
            return
        assert mode.token is not None
        record = fog.claim(op.key, mode.token, now_ms=now)
        try:
            store.write(op.key, "member", op.address, record, now_ms=now)
        except OpError as exc:
            raise InviteError(f"the claim was refused: {exc.detail}") from None
        plan.standing = own = fog.standing(store, op.address)
        rollback.commit()  # the claim is made: the key and the files it needs are kept
        plan.committed = True
        told = _tell_the_fog(plan, op.key, store, mode.peers)
        st.ok(f"claimed the invite: {'a member' if own.admitted else 'claimed, not yet admitted'} "
              f"of fog {own.fog_id}; {told}")
    finally:
        store.close()


def _tell_the_fog(plan: Plan, key: PrivateKey, store: Store, peers: list[str]) -> str:
    """Sync the claim to a peer now, so that the fog knows the invite is used (even if the node
    starts later): best effort, the node syncs it anyway when it runs."""
    try:
        with quiet_logs():
            synced = run_trio(probe_fog, key, store, peers, plan.timeout, lambda *_: None)
    except JoinError as exc:
        return f"not sent to the fog yet ({exc.why}): the node sends it when it runs"
    return f"sent to {len(synced.peers)} peer(s)"


def _remove_state(path: Path) -> None:
    """The state store and SQLite's files beside it."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


def _node_step(plan: Plan, op: Operator | None, steps: Steps, st: Step) -> int:
    config = plan.config
    if plan.running is not None:
        st.done(f"already running on {config.data_dir}; restart it for a changed config to apply")
        return EXIT_OK
    run = f"form node --config {shlex.quote(str(plan.config_path))}"
    if not plan.start:
        st.skip(f"not started (--no-start): {run}")
        return EXIT_OK
    if plan.systemd and systemd_running():
        systemctl("enable", "--now", UNIT_NAME)
        status = _wait_running(config.data_dir, plan.timeout)
        if status is None:
            raise JoinError(f"{UNIT_NAME} is enabled but the node did not answer within "
                            f"{plan.timeout} s", f"see `systemctl status {UNIT_NAME}` and "
                            f"`journalctl -u {UNIT_NAME}`")
        st.ok(f"started by systemd ({UNIT_NAME}); {_describe_status(status)}")
        return EXIT_OK
    assert op is not None
    from formation.iproute import NetworkError
    from formation.mesh.uapi import UapiError
    from formation.mesh.wggo import MeshError
    from formation.node.logs import configure_logging
    from formation.node.vmhost import VmUnavailable

    configure_logging(json_lines=plan.log_json)
    store = open_store(config)
    try:
        run_trio(_serve, plan, op.key, store, steps, st)
    except (OSError, NodeError, InviteError, KeystoreError, MeshError, UapiError, NetworkError,
            VmUnavailable) as exc:
        raise JoinError(f"the node stopped: {exc}", "the membership is kept: fix what failed, then "
                        f"start it with {run} (or run form join again: it resumes)") from None
    finally:
        store.close()
    return EXIT_OK


def _wait_running(data_dir: Path, timeout: float) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = running_node(data_dir)
        if status is not None:
            return status
        time.sleep(0.5)
    return None


def _describe_status(status: dict) -> str:
    fog_state = status.get("fog") or {}
    mesh = status.get("mesh") or {}
    parts = [f"member of fog {fog_state.get('id')}" if fog_state.get("admitted")
             else f"not admitted to fog {fog_state.get('id')} yet" if fog_state.get("id")
             else "not a member"]
    if mesh.get("enabled"):
        parts.append(f"formnet {mesh.get('iface')} {mesh.get('overlay_ip')}")
    else:
        parts.append(f"formnet off ({mesh.get('reason') or 'not up'})")
    return "; ".join(parts)


async def _serve(plan: Plan, key: PrivateKey, store: Store, steps: Steps, st: Step) -> None:
    from formation.node.runtime import open_node

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            runtime = open_node(plan.config, key, store)
            await nursery.start(runtime.run)
            with trio.move_on_after(plan.timeout):  # formnet follows the membership
                while runtime.formnet is not None and runtime.admitted \
                        and not runtime.formnet.status.enabled:
                    await trio.sleep(0.1)
            status = await runtime.status()
            api = runtime.api_urls[0] if runtime.api_urls else f"port {plan.config.api.port}"
            st.ok(f"running: {_describe_status(status)}; API {api}; Ctrl-C or SIGTERM stops it")
            steps.finish("node", st)
            async for signum in signals:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


# ---- the command ---------------------------------------------------------------------------------


def cmd_join(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    steps = Steps([s for s in STEPS if s != "systemd unit" or plan.systemd], json_mode=plan.json,
                  retry=plan.retry)
    rollback = Rollback()
    try:
        return execute(plan, steps, rollback)
    except CliError as exc:
        if not plan.committed:
            exc.message += f"; {rollback.undo_note()}"
        raise
    except BaseException:
        rollback.undo()
        raise


def join_flags(join: argparse.ArgumentParser) -> None:
    join.add_argument("target", nargs="?", metavar="INVITE|MULTIADDR",
                      help="an invite token (fmi1..., from `form invite create` on a member), or a "
                           "peer's /ip4/HOST/tcp/PORT/p2p/PEER_ID to sync from without an invite")
    join.add_argument("--genesis", action="store_true", help="start a new fog instead")
    join.add_argument("--name", metavar="NAME", help="the new fog's name (with --genesis)")
    join.add_argument("--config", metavar="FILE",
                      help=f"the node's formation.toml, written by the join (read first when it "
                           f"exists; default DATA_DIR/{CONFIG_NAME})")
    join.add_argument("--data-dir", metavar="DIR", help=DATA_DIR_HELP)
    join.add_argument("--api-port", metavar="N", type=port, help="HTTP API port ([api] port)")
    join.add_argument("--p2p-port", metavar="N", type=port, help="libp2p TCP port ([p2p] listen)")
    join.add_argument("--vms", choices=("auto", "true", "false"),
                      help="run VMs: auto (if root and QEMU), true (required), false ([vm] enabled)")
    join.add_argument("--mesh", choices=("auto", "true", "false"),
                      help="run formnet (WireGuard): auto (if root and wireguard-go), true "
                           "(required), false ([mesh] enabled)")
    join.add_argument("--bootstrap", metavar="MULTIADDR", nargs="+", action="extend",
                      help="more peers to reach the fog through (besides the invite's), "
                           "/ip4/HOST/tcp/PORT/p2p/PEER_ID; written to [p2p] bootstrap")
    join.add_argument("--password-file", metavar="FILE",
                      help="a file holding the keystore password ([node] password_file; needed "
                           "by --systemd)")
    join.add_argument("--timeout", metavar="SECONDS", type=int_in(1, 3600, "seconds"),
                      default=DEFAULT_TIMEOUT,
                      help=f"how long to wait for a peer to answer, and for the sync to make "
                           f"progress (default {DEFAULT_TIMEOUT})")
    join.add_argument("--systemd", action="store_true",
                      help=f"install {UNIT_NAME} running `form node --config FILE` (and enable it "
                           f"where systemd runs); the directory is {UNIT_DIR}, or ${UNIT_DIR_ENV}")
    join.add_argument("--no-start", "--once", dest="no_start", action="store_true",
                      help="do every step but run no node (start it later with form node --config FILE)")
    join.add_argument("--json", action="store_true", help="print each step as one JSON object")
    join.add_argument("--log-json", action="store_true",
                      help="the node logs JSON lines on stderr ([node] log_json)")
    join.set_defaults(func=cmd_join, parser=join)
