"""The proxy dialing real addresses: two in-process nodes in a fresh network namespace
(tests/proxy/netns_scenario.py), replicas on VM addresses of its lo, one made unreachable (its
connections time out) and brought back. No VMs, no formnet: the replicas' addresses are local
to the namespace, as a VM's is reached through formnet on a real fog."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vm_support import needs_root, netns

pytestmark = [pytest.mark.slow, needs_root]
SCENARIO = Path(__file__).with_name("netns_scenario.py")


def test_failover_and_recovery_over_real_connections():
    with netns("fmp") as ns:
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, str(SCENARIO)],
                              capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print(got)
    assert got["failover_seconds"] < 1.5
