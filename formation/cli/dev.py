"""`form dev fog`: a local fog of N nodes on 127.0.0.1 (formation/devfog.py), until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from formation.cli import output
from formation.cli.output import EXIT_FAILURE, EXIT_OK, CliError
from formation.cli.parsing import group, leaf, port, positive
from formation.devfog import DevFog, DevFogError
from formation.keystore import PASSWORD_ENV

FOG_COLUMNS: list[output.Column] = [
    ("node", lambda r: r["node"]), ("address", lambda r: r["address"]),
    ("peer id", lambda r: r["peer_id"]), ("p2p port", lambda r: r["p2p_port"]),
    ("api port", lambda r: r["api_port"]), ("dns port", lambda r: r["dns_port"]),
    ("proxy port", lambda r: r["proxy_port"]),
    ("data dir", lambda r: r["data_dir"]),
    ("log file", lambda r: r["log"]),
]


class _Stop(BaseException):
    """Raised by the SIGINT/SIGTERM handler of `form dev fog`."""


def cmd_dev_fog(args: argparse.Namespace) -> int:
    temporary = args.base_dir is None
    base = Path(tempfile.mkdtemp(prefix="formation-fog-")) if temporary else Path(args.base_dir)
    fog = DevFog(args.nodes, base, password=os.environ.get(PASSWORD_ENV) or "dev",
                 base_port=args.base_port)

    def on_signal(signum, frame):
        raise _Stop(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            output.note(f"starting {args.nodes} node(s) in {base} ...")
            with output.progress(f"starting {args.nodes} node(s)"):
                fog.start()
                fog.wait_ready(args.timeout)
        except DevFogError as exc:
            raise CliError(str(exc), EXIT_FAILURE) from None
        rows = fog.table()
        output.table(rows, FOG_COLUMNS, "no nodes")
        output.note(f"join this fog with: form node --bootstrap {rows[0]['multiaddr']}")
        output.note("running; Ctrl-C (SIGINT) or SIGTERM stops every node")
        reported: set[int] = set()
        while True:
            time.sleep(1)
            for node in fog.nodes:
                if node.index not in reported and not node.running:
                    reported.add(node.index)
                    output.note(f"node {node.index} exited with status {node.proc.returncode}; "
                                f"see {node.log_path}")
    except _Stop:
        pass
    finally:
        for s in old:  # a second Ctrl-C must not interrupt the shutdown half-way
            signal.signal(s, signal.SIG_IGN)
        output.note("stopping the fog ...")
        fog.close()
        for s, handler in old.items():
            signal.signal(s, handler)
        if temporary and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        elif fog.nodes:
            output.note(f"data and logs kept in {base}")
    return EXIT_OK


def register(commands, common: argparse.ArgumentParser) -> None:
    _, dev = group(commands, "dev", "development tools",
                   "Tools for developing Formation on one machine.")
    fog = leaf(dev, "fog", "run a local fog of several nodes on 127.0.0.1", cmd_dev_fog, None,
               description="Start N `form node` processes on 127.0.0.1, each with its own data "
                           "directory, ports and log (BASE_DIR/node-i, BASE_DIR/node-i.log); node "
                           "0 first, the others joining through it. Prints a table of the nodes, "
                           "then runs until Ctrl-C (SIGINT) or SIGTERM and stops every node "
                           "cleanly. The keystores' password is FORMATION_PASSWORD, or 'dev'.")
    fog.add_argument("--nodes", metavar="N", type=positive, default=3,
                     help="number of nodes (default 3)")
    fog.add_argument("--base-dir", metavar="DIR",
                     help="where the nodes' data and logs go; reused if it exists (default: a "
                          "new temporary directory, removed at exit unless --keep)")
    fog.add_argument("--base-port", metavar="P", type=port,
                     help="node i listens on P+2i (libp2p) and P+2i+1 (API) "
                          "(default: free ports)")
    fog.add_argument("--keep", action="store_true",
                     help="keep the temporary directory (data and logs) at exit")
    fog.add_argument("--timeout", metavar="SECONDS", type=float, default=120.0,
                     help="how long to wait for every node to be up and connected (default 120)")
