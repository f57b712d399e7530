"""The node step: the node run in the foreground until a signal stops it, or by systemd, or
found running already; and its status in a few words."""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path

import trio

from formation.cli.output import EXIT_OK
from formation.crdt.keys import PrivateKey
from formation.crdt.store import Store
from formation.keystore import KeystoreError
from formation.node.fog import InviteError
from formation.node.setup import NodeError, open_store, run_trio, serve_until_signal

from .files import UNIT_NAME, systemctl, systemd_running
from .host import running_node
from .key import Operator
from .plan import Plan
from .steps import JoinError, Step, Steps

log = logging.getLogger("formation.join")


def node_step(plan: Plan, op: Operator | None, steps: Steps, st: Step) -> int:
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
    async def started(runtime) -> None:
        with trio.move_on_after(plan.timeout):  # formnet follows the membership
            while runtime.formnet is not None and runtime.admitted and not runtime.formnet.status.enabled:
                await trio.sleep(0.1)
        status = await runtime.status()
        api = runtime.api_urls[0] if runtime.api_urls else f"port {plan.config.api.port}"
        st.ok(f"running: {_describe_status(status)}; API {api}; Ctrl-C or SIGTERM stops it")
        steps.finish("node", st)

    await serve_until_signal(plan.config, key, store, on_started=started)
