"""The plan: what this run is to do, from the flags, the config file and what the data dir holds;
and its mode, once the invite is read (claim it, make a genesis, only sync, or resume)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from formation.cli import output
from formation.cli.output import EXIT_USAGE, CliError
from formation.node import fog
from formation.node.config import Config, load_config, with_tcp_port
from formation.node.fog import InviteToken, Standing
from formation.node.setup import open_store

from .files import CONFIG_NAME, UNIT_DIR, UNIT_DIR_ENV, UNIT_NAME
from .host import running_node
from .probe import usable_peers
from .steps import JoinError, Step

DEFAULT_TIMEOUT = 20
# the flags that name a setting, in the order the retry command gives them (--p2p-port edits
# [p2p] listen rather than replacing it: no override)
SETTING_FLAGS = (
    ("--data-dir", "data_dir", "node.data_dir"),
    ("--api-port", "api_port", "api.port"),
    ("--p2p-port", "p2p_port", None),
    ("--vms", "vms", "vm.enabled"),
    ("--mesh", "mesh", "mesh.enabled"),
    ("--password-file", "password_file", "node.password_file"),
    ("--name", "name", "fog.name"),
)


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


def with_values(config: Config, section: str, **values: Any) -> Config:
    """`config` with some settings of one section replaced."""
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section),
                                                                       **values)})


def _overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    overrides: dict[str, Any] = {}
    names: dict[str, str] = {}
    for flag, attr, dotted in (*SETTING_FLAGS, ("--bootstrap", "bootstrap", "p2p.bootstrap")):
        value = getattr(args, attr)
        if dotted is not None and value is not None:
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
    for flag, value in (("--config", args.config),
                        *((flag, getattr(args, attr)) for flag, attr, _ in SETTING_FLAGS),
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
        config = with_values(config, "p2p", listen=with_tcp_port(config.p2p.listen, args.p2p_port))
    # the invite is a secret, and used once: the membership it gives lives in the state
    config = with_values(config, "fog", invite="")
    if args.genesis:
        config = with_values(config, "p2p", bootstrap=())
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
