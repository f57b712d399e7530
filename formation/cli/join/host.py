"""The host: whether a node already runs on the data dir, and whether this one can (the places
it writes, its ports, formnet's and the VMs' requirements)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from formation.node.config import Config

from .steps import JoinError, Step

if TYPE_CHECKING:
    from .plan import Plan


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
