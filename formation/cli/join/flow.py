"""The run: the steps in order (those not in a module of their own: the network, the checks of
the synced state, the files, the unit, the membership), and the command with its flags."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from formation.argtypes import int_in
from formation.cli.output import EXIT_USAGE, CliError
from formation.cli.parsing import DATA_DIR_HELP, port
from formation.crdt.keys import PrivateKey
from formation.crdt.op import OpError
from formation.crdt.store import Store
from formation.keystore import create_keystore
from formation.node import fog
from formation.node.config import KEYSTORE_FILE, STATE_FILE, Config, load_config
from formation.node.fog import InviteError, Standing
from formation.node.setup import open_store

from .files import (
    CONFIG_NAME,
    UNIT_DIR,
    UNIT_DIR_ENV,
    UNIT_MARK,
    UNIT_NAME,
    config_unchanged,
    reload_quietly,
    render_config,
    render_unit,
    systemctl,
    systemd_running,
)
from .host import check_host
from .key import Operator, operator_key
from .plan import DEFAULT_TIMEOUT, Mode, Plan, choose_mode, make_plan, with_values
from .probe import NAME_A_PEER, Synced, sync_from, usable_peers
from .rollback import Rollback, make_dirs, put_file
from .serve import node_step
from .steps import JoinError, Step, Steps

STEPS = ("invite", "host", "operator key", "bootstrap", "fog state", "config", "systemd unit",
         "membership", "node")


def execute(plan: Plan, steps: Steps, rollback: Rollback) -> int:
    with steps.step("invite") as st:
        mode = choose_mode(plan, st)
    if mode.peers and not plan.standing.genesis:  # what formation.toml will name
        plan.config = with_values(plan.config, "p2p", bootstrap=tuple(mode.peers))
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
                store = open_store(with_values(config, "node", data_dir=str(tmp)))
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
                config = plan.config = with_values(config, "p2p", bootstrap=_bootstrap_from_state(config, me))
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
        return node_step(plan, op, steps, st)


def _bootstrap_from_state(config: Config, me: str | None) -> tuple[str, ...]:
    """Peers to write when resuming without any: the other members' announced addresses."""
    store = open_store(config)
    try:
        own = fog.standing(store, me) if me else Standing()
        if own.fog_id is None:
            return ()
        members = store.fog_members(own.fog_id) - {me}
        addrs = [a for n in store.list("node", limit=10_000) if n["address"] in members
                 for a in n.get("multiaddrs", [])]
    finally:
        store.close()
    return tuple(usable_peers(addrs)[0])


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
                            NAME_A_PEER, EXIT_USAGE)
        return sync_from(key, store, mode.peers, plan.timeout, on_reached)
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
        rollback.made_state(config.state_path)
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
    running = systemd_running()
    if running:  # undone after the file (undo runs newest first): systemd then forgets the unit
        rollback.add("systemd's view of the unit", reload_quietly)
    put_file(path, text, rollback)
    if running:
        systemctl("daemon-reload")
        st.ok(f"wrote {path}; enabled and started at the node step")
    else:
        st.ok(f"wrote {path}" + ("" if plan.unit_dir_overridden else
                                 " (systemd is not running here: enable it with "
                                 f"`systemctl enable --now {UNIT_NAME}` where it is)"))


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
        rollback.made_state(config.state_path)
    try:
        if mode.kind == "genesis":
            genesis, member = fog.genesis(op.key, name=config.fog.name, now_ms=now, **fog.economy_of(config))
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
        synced = sync_from(key, store, peers, plan.timeout)
    except JoinError as exc:
        return f"not sent to the fog yet ({exc.why}): the node sends it when it runs"
    return f"sent to {len(synced.peers)} peer(s)"


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
