# Over 400 lines: one class whose methods share the processes' state (ports, keys, logs, pids).
"""A local multi-node fog for development and tests: N `form node` processes on 127.0.0.1.

    with DevFog(3, "/tmp/fog") as fog:
        fog.wait_ready(60)
        fog.client(1).call(cmd="submit", ...)
        fog.wait_converged(30)

Each node is a separate OS process (`python -m formation.cli node`) in its own process group,
with its own data directory BASE/node-i, settings file BASE/node-i.toml (listening on 127.0.0.1
only), log BASE/node-i.log (stdout and stderr, appended across restarts) and control socket
BASE/node-i/control.sock. Operator keys are made here before a node first starts, so every peer
id is known up front: node 0 starts first, then nodes 1..N-1 join through node 0's 127.0.0.1
multiaddr (read from its control socket) and, from node 2 on, also through the node before them,
so the bootstrap graph is not a pure star (nodes then learn every other peer from the state).

Every wait has a deadline; `close()` (or leaving the `with` block) stops every process started
here: SIGTERM, then SIGKILL of the process group after a grace period.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from formation.files import read_tail
from formation.keystore import PASSWORD_ENV, create_keystore, load_keystore
from formation.node.config import KEYSTORE_FILE
from formation.node.control import ControlClient

HOST = "127.0.0.1"
_PROJECT_ROOT = Path(__file__).resolve().parents[1]


class DevFogError(Exception):
    """A node did not start, answer or converge in time; the message carries its log tail."""


@dataclass
class FogNode:
    index: int
    data_dir: Path
    p2p_port: int
    api_port: int
    config_path: Path
    log_path: Path
    dns_port: int = 0  # each node its own (one host): free ports
    proxy_port: int = 0
    address: str = ""  # the operator key's EIP-55 address
    peer_id: str = ""
    proc: subprocess.Popen | None = None
    starts: int = 0
    log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def control_path(self) -> Path:
        return self.data_dir / "control.sock"

    @property
    def multiaddr(self) -> str:
        return f"/ip4/{HOST}/tcp/{self.p2p_port}/p2p/{self.peer_id}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid


class DevFog:
    def __init__(self, n: int, base_dir: str | os.PathLike, *, password: str = "dev",
                 base_port: int | None = None, extra_args: Sequence[str] = (),
                 settings: Mapping[str, Any] | None = None, second_bootstrap: bool = True,
                 start_timeout: float = 60.0, stop_timeout: float = 15.0):
        """`settings`: extra formation.toml values by dotted key, e.g. {"node.heartbeat_seconds": 5}.

        Ports: node i gets p2p `base_port + 2i` and API `base_port + 2i + 1`; without
        `base_port`, free ports picked by binding port 0 on 127.0.0.1 briefly.
        """
        if n < 1:
            raise ValueError("a fog needs at least one node")
        self.n = n
        self.base_dir = Path(base_dir).resolve()
        self.password = password
        self.base_port = base_port
        self.extra_args = list(extra_args)
        self.settings = dict(settings or {})
        self.second_bootstrap = second_bootstrap
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.nodes: list[FogNode] = []
        self._used_ports: set[int] = set()
        self._started = False
        self.last_converged: dict[int, dict] = {}  # node -> its status when wait_converged succeeded

    # ---- context manager ----------------------------------------------------------------

    def __enter__(self) -> DevFog:
        if not self._started:
            try:
                self.start()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- starting -----------------------------------------------------------------------

    def start(self) -> DevFog:
        """Launch node 0, wait until its control socket answers, then launch the others."""
        if self._started:
            raise DevFogError("the fog is already started")
        self._started = True
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(self.n):
            self._prepare()
        self._launch(0, [])
        first = self._wait_control(0, self.start_timeout)
        boot0 = _local_addr(first)
        for node in self.nodes[1:]:
            self._launch(node.index, self._bootstrap_for(node.index, boot0), self._invite())
        return self

    def add_node(self) -> int:
        """Start one more node joining through node 0; returns its index (not waited for)."""
        if not self._started:
            raise DevFogError("start the fog first")
        node = self._prepare()
        self._launch(node.index, [self._node0_addr()], self._invite())
        return node.index

    def _inviter(self) -> int:
        """Which member invites the next node: node 0, the fog's genesis."""
        return 0

    def _invite(self) -> str:
        """An invite of a member's (`_inviter`) for one more node."""
        inviter = self._inviter()
        c = self.client(inviter)
        try:
            answer = c.call(cmd="invite", expires=3600)
        finally:
            c.close()
        if not answer.get("ok"):
            raise DevFogError(f"node {inviter} made no invite: {answer.get('detail')}")
        return answer["token"]

    def restart(self, i: int, *, wait: bool = True, timeout: float | None = None) -> None:
        """Stop node i if it runs (SIGTERM), start it again on the same ports and data dir."""
        if self.nodes[i].running:
            self.stop(i)
        if i == 0:
            others = [n for n in self.nodes[1:] if n.running]
            boot = [others[0].multiaddr] if others else []
        else:
            boot = self._bootstrap_for(i, self._node0_addr())
        self._launch(i, boot)
        if wait:
            self._wait_control(i, timeout or self.start_timeout)

    def _bootstrap_for(self, i: int, boot0: str) -> list[str]:
        boot = [boot0]
        if self.second_bootstrap and i >= 2:
            boot.append(self.nodes[i - 1].multiaddr)
        return boot

    def _node0_addr(self) -> str:
        if self.nodes[0].running:
            try:
                return _local_addr(self.status(0))
            except (OSError, ValueError, DevFogError):
                pass
        return self.nodes[0].multiaddr  # known from the key we made; node 0 may be restarting

    def _prepare(self) -> FogNode:
        i = len(self.nodes)
        if self.base_port is not None:
            p2p_port, api_port = self.base_port + 2 * i, self.base_port + 2 * i + 1
            if api_port > 65535:
                raise DevFogError(f"--base-port {self.base_port} leaves no room for node {i}")
        else:
            p2p_port, api_port = self._free_port(), self._free_port()
        node = FogNode(
            index=i, data_dir=self.base_dir / f"node-{i}", p2p_port=p2p_port, api_port=api_port,
            config_path=self.base_dir / f"node-{i}.toml", log_path=self.base_dir / f"node-{i}.log",
            dns_port=self._free_port(), proxy_port=self._free_port(),
        )
        if len(str(node.control_path).encode()) > 100:
            raise DevFogError(f"{node.control_path} is too long for a unix socket path; "
                              "use a shorter base directory")
        node.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        keystore = node.data_dir / KEYSTORE_FILE
        # The key is made here (or read back) so the peer id is known before the node runs.
        key = (load_keystore(keystore, self.password) if keystore.exists()
               else create_keystore(keystore, self.password))
        from formation.crdt.keys import to_checksum
        from formation.p2p.service import peer_id_of

        node.address = to_checksum(key.address)
        node.peer_id = peer_id_of(key)
        node.config_path.write_text(self._config_text(node))
        self.nodes.append(node)
        return node

    def _config_text(self, node: FogNode) -> str:
        values: dict[str, Any] = {
            "p2p.listen": f"/ip4/{HOST}/tcp/{node.p2p_port}",
            "api.host": HOST,
            "api.port": node.api_port,
            "dns.port": node.dns_port,
            "proxy.port": node.proxy_port,
            "vm.enabled": "false",  # a dev fog of many nodes on one host runs no VMs unless asked
            "mesh.enabled": "false",  # nor WireGuard interfaces (one UDP port, the host's network)
        }
        values.update(self.settings)
        sections: dict[str, list[str]] = {}
        for dotted, value in values.items():
            section, key = dotted.split(".", 1)
            sections.setdefault(section, []).append(f"{key} = {_toml(value)}")
        return "".join(f"[{s}]\n" + "\n".join(lines) + "\n\n" for s, lines in sections.items())

    def _free_port(self) -> int:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((HOST, 0))
                port = s.getsockname()[1]
            if port not in self._used_ports:
                self._used_ports.add(port)
                return port
        raise DevFogError("could not find a free port")

    def _launch(self, i: int, bootstrap: list[str], invite: str | None = None) -> None:
        node = self.nodes[i]
        if node.running:
            raise DevFogError(f"node {i} is already running")
        node.control_path.unlink(missing_ok=True)  # so "the socket answers" means this run
        argv = [sys.executable, "-m", "formation.cli", "node", "--config", str(node.config_path),
                "--data-dir", str(node.data_dir), "--p2p-port", str(node.p2p_port),
                "--api-port", str(node.api_port), *self.extra_args]
        if bootstrap:
            argv += ["--bootstrap", *bootstrap]
        if invite:  # claimed at the node's first start; later starts find their membership
            argv += ["--invite", invite]
        env = dict(os.environ)
        env[PASSWORD_ENV] = self.password
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            [str(_PROJECT_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        if node.log_file is not None:
            node.log_file.close()
        node.log_file = open(node.log_path, "ab")  # noqa: SIM115 - closed in stop/close
        shown = ["fmi1.…" if a == invite else a for a in argv[1:]]  # a token is a secret
        node.log_file.write(f"---- devfog: start {node.starts + 1} of node {i}: "
                            f"{' '.join(shown)}\n".encode())
        node.log_file.flush()
        node.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=node.log_file,
                                     stderr=subprocess.STDOUT, env=env, cwd=str(self.base_dir),
                                     start_new_session=True)  # own process group: killpg
        node.starts += 1

    # ---- control ------------------------------------------------------------------------

    def client(self, i: int, timeout: float = 30.0) -> ControlClient:
        """A new blocking client on node i's control socket (close it when done)."""
        return ControlClient(self.nodes[i].control_path, timeout=timeout)

    def status(self, i: int, timeout: float = 30.0) -> dict:
        c = self.client(i, timeout)
        try:
            st = c.call(cmd="status")
        finally:
            c.close()
        if not st.get("ok"):
            raise DevFogError(f"node {i}: status failed: {st}")
        return st

    def running(self) -> list[int]:
        return [n.index for n in self.nodes if n.running]

    def rss_kb(self, i: int) -> int | None:
        """Resident set size of node i's process (VmRSS), None if it is not running."""
        pid = self.nodes[i].pid
        if pid is None or not self.nodes[i].running:
            return None
        return process_rss_kb(pid)

    # ---- waiting ------------------------------------------------------------------------

    def _wait_control(self, i: int, timeout: float) -> dict:
        node = self.nodes[i]
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not node.running:
                raise DevFogError(f"node {i} exited with {node.proc.returncode if node.proc else None}"
                                  f" before its control socket answered{self.log_tail(i)}")
            if node.control_path.exists():
                try:
                    return self.status(i, timeout=max(1.0, deadline - time.monotonic()))
                except (OSError, ValueError, DevFogError) as exc:
                    last = exc
            time.sleep(0.1)
        raise DevFogError(f"node {i}: control socket did not answer within {timeout:.0f} s "
                          f"({last}){self.log_tail(i)}")

    def wait_ready(self, timeout: float = 60.0, nodes: Iterable[int] | None = None,
                   min_peers: int = 1) -> float:
        """Every running node (or those in `nodes`) answers status and has `min_peers` peers."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        todo = list(self.running() if nodes is None else nodes)
        need = min(min_peers, len(self.running()) - 1)
        for i in todo:
            self._wait_control(i, max(0.1, deadline - time.monotonic()))
        waiting = set(todo)
        last: dict[int, Any] = {}
        while waiting:
            for i in sorted(waiting):
                if not self.nodes[i].running:
                    raise DevFogError(f"node {i} exited{self.log_tail(i)}")
                try:
                    st = self.status(i, timeout=5)
                except (OSError, ValueError, DevFogError) as exc:
                    last[i] = exc
                    continue
                last[i] = f"{len(st['connected'])} peer(s)"
                if len(st["connected"]) >= need:
                    waiting.discard(i)
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise DevFogError(f"not ready within {timeout:.0f} s: " + ", ".join(
                    f"node {i}: {last.get(i)}" for i in sorted(waiting)))
            time.sleep(0.2)
        return time.monotonic() - t0

    def wait_converged(self, timeout: float = 60.0, nodes: Iterable[int] | None = None,
                       poll: float = 0.2) -> float:
        """Wait until all running nodes (or `nodes`) report the same state_hash and heads, with
        nothing pending; returns the seconds waited. The statuses that agreed are kept in
        `last_converged` (later ones may differ again: nodes heartbeat)."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        last: dict[int, Any] = {}
        while True:
            idx = list(self.running() if nodes is None else nodes)
            views, statuses = {}, {}
            for i in idx:
                try:
                    st = self.status(i, timeout=max(1.0, min(10.0, deadline - time.monotonic())))
                    statuses[i] = st
                    views[i] = (st["state_hash"], tuple(st["heads"]), st["pending"])
                    last[i] = (st["ops"], st["state_hash"][:12], len(st["heads"]), st["pending"])
                except (OSError, ValueError, DevFogError) as exc:
                    last[i] = repr(exc)
            if len(views) == len(idx) and len({v[:2] for v in views.values()}) <= 1 \
                    and all(v[2] == 0 for v in views.values()):
                self.last_converged = statuses
                return time.monotonic() - t0
            if time.monotonic() > deadline:
                raise DevFogError(f"not converged within {timeout:.0f} s; (ops, state, heads, "
                                  "pending): " + ", ".join(f"node {i}: {last.get(i)}" for i in idx))
            time.sleep(poll)

    # ---- stopping -----------------------------------------------------------------------

    def kill(self, i: int) -> int | None:
        """SIGKILL node i (its whole process group); returns the exit status."""
        node = self.nodes[i]
        if node.proc is None:
            return None
        _signal_group(node.proc, signal.SIGKILL)
        rc = _wait(node.proc, 10)
        self._close_log(node)
        return rc

    def stop(self, i: int, timeout: float | None = None) -> int | None:
        """SIGTERM node i, wait up to `timeout`, then SIGKILL; returns the exit status."""
        node = self.nodes[i]
        if node.proc is None:
            return None
        if node.proc.poll() is None:
            _signal_group(node.proc, signal.SIGTERM)
        rc = _wait(node.proc, self.stop_timeout if timeout is None else timeout)
        if rc is None:
            _signal_group(node.proc, signal.SIGKILL)
            rc = _wait(node.proc, 10)
        self._close_log(node)
        return rc

    def close(self) -> None:
        """Stop every node: SIGTERM to all at once, then wait, then SIGKILL what is left."""
        live = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        for n in live:
            _signal_group(n.proc, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for n in live:
            if _wait(n.proc, max(0.0, deadline - time.monotonic())) is None:
                _signal_group(n.proc, signal.SIGKILL)
                _wait(n.proc, 10)
        for n in self.nodes:
            self._close_log(n)

    @staticmethod
    def _close_log(node: FogNode) -> None:
        if node.log_file is not None:
            node.log_file.close()
            node.log_file = None

    def log_tail(self, i: int, chars: int = 3000) -> str:
        try:
            text = read_tail(self.nodes[i].log_path, chars)
        except OSError:
            return ""
        return f"\n---- {self.nodes[i].log_path} (tail) ----\n{text}"

    def table(self) -> list[dict[str, Any]]:
        return [{"node": n.index, "address": n.address, "peer_id": n.peer_id,
                 "multiaddr": n.multiaddr, "p2p_port": n.p2p_port, "api_port": n.api_port,
                 "dns_port": n.dns_port, "proxy_port": n.proxy_port,
                 "data_dir": str(n.data_dir), "log": str(n.log_path), "pid": n.pid,
                 "running": n.running} for n in self.nodes]


def process_rss_kb(pid: int) -> int | None:
    """A process's resident set size in kB (VmRSS), None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _local_addr(status: Mapping[str, Any]) -> str:
    for addr in status.get("addrs", []):
        if addr.startswith(f"/ip4/{HOST}/") and "/p2p/" in addr:
            return addr
    raise DevFogError(f"no {HOST} multiaddr in the node's status: {status.get('addrs')}")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for the characters paths and addrs use
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to formation.toml")


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is not None:
        return  # exited and reaped: its pid (the group id) may belong to someone else now
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the child's pid
    except (ProcessLookupError, PermissionError):
        pass


def _wait(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
