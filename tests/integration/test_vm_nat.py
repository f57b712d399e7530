"""A VM reaches beyond its host: a `form node` in a network namespace (tests/netns_node.py) runs
an instance whose entrypoint fetches a URL on the test's own end of the veth, which has no route
back to the VM subnet, so the request arrives only when the node NATs it (nftables masquerade),
with the node's address as its source."""

from __future__ import annotations

import http.server
import secrets
import subprocess
import threading
import time

import pytest

from formation.client import Client
from formation.crdt.keys import PrivateKey
from tests.integration.test_scheduler import wait_replica
from tests.vm_support import needs_qemu, needs_root

pytestmark = [pytest.mark.slow, needs_qemu, needs_root]
OUTSIDE = "10.213.11.1"  # the root namespace's end of the node's veth (tests/netns_node.py)


def test_a_vm_reaches_beyond_its_host_through_nat(node):
    seen: list[tuple[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append((self.client_address[0], self.path))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok\n")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((OUTSIDE, 0), Handler)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        loop = f"while true; do wget -q -O /dev/null http://{OUTSIDE}:{port}/from-vm; sleep 1; done"
        formfile = f'NAME outbound\nENTRYPOINT ["sh", "-c", "{loop}"]\n'
        user = Client(f"http://{node.api_ip}:3004", PrivateKey(secrets.token_bytes(32)))
        iid = user.post("/v1/instance/create", {"name": "outbound", "formfile": formfile})["id"]
        rep = wait_replica(user, iid, lambda r: r["state"] == "running", log=node.log_text)
        assert rep["ip"].startswith("10.213.12.")
        deadline = time.monotonic() + 60
        while not seen and time.monotonic() < deadline:
            time.sleep(0.5)
        if not seen:  # say what the node set up and what the guest printed
            rules = subprocess.run(["ip", "netns", "exec", node.ns, "nft", "list", "ruleset"],
                                   capture_output=True, text=True).stdout
            fwd = subprocess.run(["ip", "netns", "exec", node.ns, "cat", "/proc/sys/net/ipv4/ip_forward"],
                                 capture_output=True, text=True).stdout
            console = user.get(f"/v1/instance/{iid}/logs")["log"][-2000:]
            raise AssertionError(f"the VM's request never arrived\nnft: {rules}\nforward: {fwd}\n"
                                 f"console: {console}\n{node.log_text()}")
        source, path = seen[0]
        assert path == "/from-vm" and source == node.api_ip  # the node's address, not the VM's
        status = user.get("/v1/health")["vms"]
        assert status["nat"] is True
    finally:
        server.shutdown()
        server.server_close()
