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

The modules: steps (the printed lines, JoinError), plan (flags, config and data dir read; the
mode), host, key (the operator key), probe (libp2p: reach and sync), files (formation.toml, the
systemd unit), rollback, serve (the node step), flow (the run in order, the command).
"""

from __future__ import annotations

from .files import UNIT_DIR_ENV, UNIT_MARK, UNIT_NAME, config_unchanged, render_config, render_unit
from .flow import cmd_join, join_flags
from .probe import usable_peers
from .rollback import Rollback, make_dirs, put_file
from .steps import JoinError, Steps

__all__ = [
    "UNIT_DIR_ENV", "UNIT_MARK", "UNIT_NAME", "JoinError", "Rollback", "Steps", "cmd_join",
    "config_unchanged", "join_flags", "make_dirs", "put_file", "render_config", "render_unit",
    "usable_peers",
]
