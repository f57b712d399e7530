"""Several `form node` processes on 127.0.0.1 (formation.devfog): users' writes reach every
node, a SIGKILLed node catches up, a new node joins a fog holding thousands of ops, and SIGTERM
shuts a node down cleanly.

Every process is started through DevFog inside a fixture that closes it (SIGTERM, then SIGKILL of
the process group) whatever happens; every wait has a deadline. Node logs stay in tmp_path.
"""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from formation.crdt.intents import version_of
from formation.crdt.keys import parse_signature, sha256
from formation.crdt.quotas import QUOTAS
from formation.crdt.store import Store
from formation.devfog import DevFog
from tests.support import Node, User

pytestmark = pytest.mark.slow

TS0 = 1_750_000_000  # users' request times: distinct per request, so no two are replays


@pytest.fixture
def fogs():
    """Make fogs with `fogs(n, base_dir, **kw)`; all of them are closed at the end."""
    made: list[DevFog] = []

    def make(n: int, base_dir: Path, **kw) -> DevFog:
        fog = DevFog(n, base_dir, **kw)
        made.append(fog)
        fog.start()
        return fog

    try:
        yield make
    finally:
        for fog in made:
            fog.close()


# ---- helpers ------------------------------------------------------------------------------------


def people(seed: int, n: int = 8) -> list[User]:
    rnd = random.Random(seed)
    return [User(rnd.randbytes(32)) for _ in range(n)]


def model_requests(n: int, *, users: int = 8, start: int = 0, seed: int = 0) -> list[tuple]:
    """n signed `POST /v1/models` requests (message, body, signature); request k is made by
    people(seed, users)[k % users], with enough users that none goes over an account's quota
    of models (crdt/quotas.py)."""
    users = max(users, -(-n // (QUOTAS.records["model"] - 1)))
    who = people(seed, users)
    return [who[k % users].request("POST", "/v1/models",
                                   {"name": f"model {start + k}", "tags": ["bench"]},
                                   ts=TS0 + start + k)
            for k in range(n)]


def _line(req: tuple) -> bytes:
    message, body, sig = req
    return json.dumps({"cmd": "submit", "message": message, "body": base64.b64encode(body).decode(),
                       "signature": sig.hex()}).encode() + b"\n"


def submit_all(fog: DevFog, i: int, reqs: list[tuple], batch: int = 100) -> list[dict]:
    """Submit requests to node i, `batch` at a time on one connection (pipelined)."""
    client = fog.client(i, timeout=60)
    out = []
    try:
        for k in range(0, len(reqs), batch):
            chunk = reqs[k:k + batch]
            client.sock.sendall(b"".join(_line(r) for r in chunk))
            for _ in chunk:
                line = client.file.readline()
                if not line:
                    raise ConnectionError(f"node {i} closed the control socket")
                out.append(json.loads(line))
    finally:
        client.close()
    bad = [r for r in out if not r.get("ok")]
    assert not bad, f"node {i} refused {len(bad)} submits, first: {bad[0]}"
    return out


def submit_spread(fog: DevFog, assignment: dict[int, list[tuple]]) -> list[tuple[tuple, dict]]:
    """Submit to several nodes at once, one thread per node; (request, answer) pairs."""
    results: dict[int, list[dict]] = {}
    errors: list[BaseException] = []

    def run(i: int, reqs: list[tuple]) -> None:
        try:
            results[i] = submit_all(fog, i, reqs, batch=25)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, reqs), daemon=True)
               for i, reqs in assignment.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a submitting thread hung"
    if errors:
        raise errors[0]
    return [pair for i in sorted(results) for pair in zip(assignment[i], results[i], strict=True)]


def get_all(fog: DevFog, i: int, kind: str, keys: list[str]) -> dict[str, object]:
    client = fog.client(i)
    try:
        out = {}
        for key in keys:
            answer = client.call(cmd="get", kind=kind, key=key)
            assert answer["ok"], answer
            out[key] = answer["value"]
        return out
    finally:
        client.close()


def prebuild_log(data_dir: Path, n: int, *, seed: int = 7) -> int:
    """Write n users' model creates, relayed by a scratch node key, into data_dir/state.db."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = Store(str(data_dir / "state.db"), synchronous="OFF")  # a scratch build: no fsyncs
    try:
        relay = Node(store, secret=random.Random(seed).randbytes(32))
        relay.now = time.time_ns() // 1_000_000 - 3_600_000  # an hour ago
        for m, b, s in model_requests(n, seed=seed, start=1_000_000):
            relay.now += 1
            store.write_request(relay.key, m, b, s, now_ms=relay.now)
        return len(store)
    finally:
        store.close()


def _ops(fog: DevFog, i: int) -> int:
    return fog.status(i)["ops"]


# ---- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 10])
def test_users_writes_reach_every_node(fogs, tmp_path: Path, n: int):
    per_node = 40 if n <= 3 else 25
    rnd = random.Random(n)
    fog = fogs(n, tmp_path / "fog")
    ready = fog.wait_ready(120)
    fog.wait_converged(60)

    # Creates, each submitted to a random node, all nodes written to at once.
    reqs = model_requests(per_node * n, seed=n)
    who = people(n)
    owner = {r: who[k % len(who)] for k, r in enumerate(reqs)}
    assignment: dict[int, list[tuple]] = {}
    for r in reqs:
        assignment.setdefault(rnd.randrange(n), []).append(r)
    t0 = time.monotonic()
    created = submit_spread(fog, assignment)
    wrote = time.monotonic() - t0
    converged = fog.wait_converged(240)
    owner_of = {answer["key"]: owner[req] for req, answer in created}
    keys = sorted(owner_of)
    assert len(keys) == len(reqs)

    # Then concurrent updates of the same models through different nodes (siblings resolve
    # the same way everywhere).
    updates: dict[int, list[tuple]] = {}
    # each update names the version it is made on: the model as created (one write, the create)
    base_of = {answer["key"]: version_of([sha256(parse_signature(req[2]))]) for req, answer in created}
    for k, key in enumerate(keys[: 5 * n]):
        user = owner_of[key]
        for j in range(2):  # two concurrent updates of one model, on two nodes
            updates.setdefault((k + j) % n, []).append(
                user.request("PUT", f"/v1/models/{key}", {"description": f"update {j}"},
                             ts=TS0 + 500_000 + 2 * k + j, base=base_of[key]))
    submit_spread(fog, updates)
    converged2 = fog.wait_converged(240)

    values = [get_all(fog, i, "model", keys) for i in range(n)]
    assert all(v is not None for v in values[0].values())
    for i in range(1, n):
        assert values[i] == values[0], f"node {i} resolves some model differently from node 0"
    # Both updates were made at about the same time on different nodes: when they were truly
    # concurrent the later signed time wins ("update 1"); when one node had already received
    # the other update, its write supersedes it whatever its time. Either way: one of the two,
    # the same everywhere (checked above).
    for key in keys[: 5 * n]:
        assert values[0][key]["description"] in ("update 0", "update 1")
    stats = list(fog.last_converged.values())
    assert len(stats) == n
    assert len({s["state_hash"] for s in stats}) == 1 and len({tuple(s["heads"]) for s in stats}) == 1
    print(f"\n{n} nodes: ready in {ready:.1f} s; {len(reqs)} creates through random nodes in "
          f"{wrote:.1f} s ({len(reqs) / wrote:.0f}/s), converged {converged:.2f} s after the last; "
          f"{sum(len(u) for u in updates.values())} concurrent updates converged in "
          f"{converged2:.2f} s; {stats[0]['ops']} ops on every node")


def test_sigkill_then_catch_up(fogs, tmp_path: Path):
    fog = fogs(3, tmp_path / "fog")
    fog.wait_ready(90)
    submit_all(fog, 1, model_requests(60, seed=1))
    fog.wait_converged(60)

    rc = fog.kill(2)
    assert rc == -9
    # "An hour of ops" by volume: thousands of writes on the two nodes still up.
    reqs = model_requests(3000, seed=2, start=10_000)
    t0 = time.monotonic()
    submit_spread(fog, {0: reqs[0::2], 1: reqs[1::2]})
    wrote = time.monotonic() - t0
    fog.wait_converged(120, nodes=[0, 1])
    target = fog.status(0)

    t0 = time.monotonic()
    fog.restart(2)
    fog.wait_ready(60, nodes=[2])
    caught_up = fog.wait_converged(180)
    total = time.monotonic() - t0
    st = fog.last_converged[2]
    assert st["ops"] >= target["ops"] >= 3060
    assert {s["state_hash"] for s in fog.last_converged.values()} == {st["state_hash"]}
    p2p = st["p2p"]
    end = time.monotonic() + 5  # a sync session is counted once its stream has closed
    while p2p["syncs_ok"] + p2p["syncs_failed"] == 0 and time.monotonic() < end:
        time.sleep(0.25)
        p2p = fog.status(2)["p2p"]
    print(f"\nkill -9 then catch-up: {len(reqs)} ops written in {wrote:.1f} s while node 2 was "
          f"down; restarted node converged {total:.1f} s after relaunch ({caught_up:.1f} s after its "
          f"control socket answered and it had a peer); its p2p stats {p2p}")


def test_new_node_joins_a_fog_with_many_ops(fogs, tmp_path: Path):
    base = tmp_path / "fog"
    t0 = time.monotonic()
    n_ops = prebuild_log(base / "node-0", 5000)
    built = time.monotonic() - t0
    fog = fogs(2, base)
    fog.wait_ready(90)
    first = fog.wait_converged(180)  # node 1 syncs the whole log from node 0

    t0 = time.monotonic()
    j = fog.add_node()
    fog.wait_ready(60, nodes=[j])
    joined = fog.wait_converged(180)
    total = time.monotonic() - t0
    st = fog.last_converged[j]
    assert st["ops"] >= n_ops + 3  # the log, plus the three nodes' registrations
    assert {s["state_hash"] for s in fog.last_converged.values()} == {st["state_hash"]}
    print(f"\njoin: log of {n_ops} ops built in {built:.1f} s; node 1 converged {first:.1f} s "
          f"after the fog was ready; new node converged {total:.1f} s after launch "
          f"({joined:.1f} s after it was ready); {st['ops']} ops")


def test_sigterm_is_clean_and_restart_opens_same_state(fogs, tmp_path: Path):
    fog = fogs(2, tmp_path / "fog", settings={"node.heartbeat_seconds": 3600})  # a still state
    fog.wait_ready(90)
    created = submit_all(fog, 0, model_requests(30, seed=3))
    fog.wait_converged(60)
    before = fog.status(1)
    node = fog.nodes[1]

    rc = fog.stop(1, timeout=20)
    assert rc == 0, f"node 1 exited with {rc}{fog.log_tail(1)}"
    log = node.log_path.read_text(errors="replace")
    assert "Traceback" not in log, fog.log_tail(1)
    assert "received SIGTERM: shutting down" in log
    assert not node.control_path.exists(), "the control socket was left behind"

    # The state on disk is the state the node reported before it stopped.
    env = {**os.environ, "FORMATION_PASSWORD": fog.password}
    once = subprocess.run(
        [sys.executable, "-m", "formation.cli", "node", "--once", "--json", "--config",
         str(node.config_path), "--data-dir", str(node.data_dir)],
        capture_output=True, text=True, env=env, timeout=60)
    assert once.returncode == 0, once.stderr
    ident = json.loads(once.stdout)
    assert (ident["ops"], ident["heads"], ident["state_hash"]) == (
        before["ops"], len(before["heads"]), before["state_hash"])

    fog.restart(1)
    fog.wait_ready(60, nodes=[1])
    after = fog.status(1)
    assert after["ops"] >= before["ops"]  # plus its new registration
    keys = [r["key"] for r in created]
    assert get_all(fog, 1, "model", keys) == get_all(fog, 0, "model", keys)
    fog.wait_converged(60)

    # Closing the whole fog is a SIGTERM to every node: all exit 0.
    fog.close()
    codes = [n.proc.returncode for n in fog.nodes]
    assert codes == [0, 0], codes
    for n in fog.nodes:
        assert "Traceback" not in n.log_path.read_text(errors="replace"), n.log_path
        assert not n.control_path.exists()
