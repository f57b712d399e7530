"""The scheduler with real VMs: a `form node` process in its own network namespace builds an
instance's image in a build VM, boots it, restarts it when its QEMU is killed, adopts it after
a node restart, pauses/resumes it, stops/starts it, reports a failing build, and deletes it
without leftovers.

The node's API is reached over a veth pair into the namespace; the VMs' bridge and taps live in
the namespace only, so nothing here touches the host's own network.
"""

from __future__ import annotations

import os
import secrets
import signal
import time

import pytest

from formation.client import Client
from formation.crdt.keys import PrivateKey
from formation.node.control import ControlClient
from tests.vm_support import http_get, ip, needs_qemu, needs_root

pytestmark = [pytest.mark.slow, needs_qemu, needs_root]

TINY = """\
NAME tiny
RUN mkdir -p /srv/www && echo hello-instance > /srv/www/index.html
EXPOSE 8000
ENTRYPOINT httpd -f -p 8000 -h /srv/www
"""


def wait_replica(client: Client, iid: str, want, timeout: float = 180.0, log=lambda: "") -> dict:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        reps = client.get(f"/v1/instance/{iid}/get")["replicas_status"]
        if reps:
            if not seen or seen[-1] != (reps[0]["state"], reps[0]["reason"]):
                seen.append((reps[0]["state"], reps[0]["reason"]))
            if want(reps[0]):
                return reps[0]
        time.sleep(0.5)
    raise AssertionError(f"replica never matched; states seen: {seen}\n{log()}")


def test_instance_lifecycle_with_real_vms(node):
    user = Client(f"http://{node.api_ip}:3004", PrivateKey(secrets.token_bytes(32)))
    iid = user.post("/v1/instance/create", {"name": "tiny", "formfile": TINY, "replicas": 1})["id"]

    # built in a build VM from the Formfile alone, then booted, then answering
    rep = wait_replica(user, iid, lambda r: r["state"] == "running", log=node.log_text)
    assert rep["ip"].startswith("10.213.12.")
    assert http_get(node.ns, f"http://{rep['ip']}:8000/") == "hello-instance\n"
    m = user.get(f"/v1/instance/{iid}/metrics")
    assert m["vm_state"] == "running" and m["cpu_seconds"] > 0 and m["rss_bytes"] > 50 << 20, m

    # QEMU killed -> restarted, and the status says so
    pid = node.qemu_pid(iid)
    os.kill(pid, signal.SIGKILL)
    rep = wait_replica(user, iid, lambda r: r["state"] == "running" and "restarted 1 time" in r["reason"],
                       timeout=90, log=node.log_text)
    new_pid = node.qemu_pid(iid)
    assert new_pid and new_pid != pid
    # the console keeps the boot before the crash
    assert user.get(f"/v1/instance/{iid}/logs")["log"].count("FORMATION-GUEST-INIT") == 2
    assert http_get(node.ns, f"http://{rep['ip']}:8000/") == "hello-instance\n"

    # node restart -> the running VM is adopted: same QEMU, no second one; a tap on the bridge
    # that no VM owns (a node killed while deleting one) is removed
    node.stop()
    assert node.qemu_pid(iid) == new_pid
    ip("-n", node.ns, "tuntap", "add", "fmtdeadbeef000", "mode", "tap")
    ip("-n", node.ns, "link", "set", "fmtdeadbeef000", "master", "fmtbr1")
    node.start()
    time.sleep(6)  # a few reconcile passes
    assert node.qemu_pid(iid) == new_pid
    assert "fmtdeadbeef000" not in ip("-n", node.ns, "link").stdout
    assert len(list((node.data / "vms").iterdir())) == 1
    assert http_get(node.ns, f"http://{rep['ip']}:8000/") == "hello-instance\n"

    # pause (QMP stop: the same QEMU, its memory kept) and resume (QMP cont): it answers again
    user.post(f"/v1/instance/{iid}/pause")
    wait_replica(user, iid, lambda r: r["state"] == "paused", timeout=30, log=node.log_text)
    assert user.get(f"/v1/instance/{iid}/metrics")["vm_state"] == "paused"
    user.post(f"/v1/instance/{iid}/resume")
    wait_replica(user, iid, lambda r: r["state"] == "running", timeout=30, log=node.log_text)
    assert node.qemu_pid(iid) == new_pid
    assert http_get(node.ns, f"http://{rep['ip']}:8000/") == "hello-instance\n"

    # stop (graceful) and start again
    user.post(f"/v1/instance/{iid}/stop")
    wait_replica(user, iid, lambda r: r["state"] == "stopped", timeout=60, log=node.log_text)
    assert node.qemu_pid(iid) is None
    user.post(f"/v1/instance/{iid}/start")
    rep = wait_replica(user, iid, lambda r: r["state"] == "running", timeout=90, log=node.log_text)
    assert http_get(node.ns, f"http://{rep['ip']}:8000/") == "hello-instance\n"

    # a Formfile whose RUN fails: the instance says which line, the node keeps running
    bad = user.post("/v1/instance/create", {"name": "bad", "replicas": 1,
                                            "formfile": "NAME bad\nRUN echo oops && false\n"})["id"]
    rep = wait_replica(user, bad, lambda r: r["state"] == "failed", timeout=120, log=node.log_text)
    assert "line 2" in rep["reason"] and "RUN" in rep["reason"], rep
    assert node.proc.poll() is None

    # an entrypoint that keeps exiting: failed, with its exit status and last output
    looping = user.post("/v1/instance/create", {"name": "looping", "replicas": 1, "formfile":
                        'NAME looping\nENTRYPOINT sh -c "echo boom-from-entrypoint; exit 3"\n'})["id"]
    rep = wait_replica(user, looping, lambda r: r["state"] == "failed", timeout=120, log=node.log_text)
    assert "keeps exiting (status 3" in rep["reason"] and "boom-from-entrypoint" in rep["reason"], rep

    # delete -> no QEMU, tap, overlay or bookkeeping left; the status records are withdrawn
    for i in (iid, bad, looping):
        user.post(f"/v1/instance/{i}/delete")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (node.qemu_pid(iid) or list((node.data / "vms").iterdir())):
        time.sleep(0.5)
    assert node.qemu_pid(iid) is None
    assert list((node.data / "vms").iterdir()) == []
    assert list((node.data / "instances").glob("*.json")) == []
    assert "fmt" not in ip("-n", node.ns, "-o", "link", "show", "type", "tun").stdout
    control = ControlClient(node.data / "control.sock", timeout=10)
    me = control.call(cmd="status")["address"].lower()
    assert control.call(cmd="get", kind="instance_status", key=f"{iid}@{me}")["value"] is None
    assert node.proc.poll() is None
