"""`form secrets` across a fog (three in-process nodes, real libp2p, fake VM hosts): a secret
sealed to the node that hosts an instance reaches that node's VM and no other node; when the
instance gets a replica on another node, a host re-seals the secret for it, and no node's
SQLite file ever holds the value in clear."""

from __future__ import annotations

import io
import tarfile

import pytest

from formation import sealed
from formation.node.secrets import SecretsUnavailable
from tests.p2p.test_scheduler_fog import FogNode, create_instance, open_fog, wait_for
from tests.support import User

VALUE = b"tok-3f9a1c77e2b04d5e"


def disk_value(node: FogNode, iid: str, name: str) -> bytes | None:
    """The value of secret `name` in the secrets disk the node gave its VM of `iid`, if any."""
    spec = node.driver.spec_of(iid) if node.driver.is_alive(iid) else None
    path = getattr(spec, "secrets", None)
    if path is None or not path.exists():
        return None
    with tarfile.open(fileobj=io.BytesIO(path.read_bytes())) as tar:
        for member in tar.getmembers():
            if member.name.rstrip("/").endswith(f"files/{name}"):
                return tar.extractfile(member).read()
    return None


def state_bytes(node: FogNode) -> bytes:
    data = node.runtime.config.data_dir
    return b"".join(p.read_bytes() for p in data.glob("state.db*"))


async def test_a_secret_reaches_only_its_hosts_and_follows_a_new_replica(tmp_path, no_taps):
    alice = User(b"\x5b" * 32)
    async with open_fog(tmp_path) as fog:
        iid = await create_instance(fog[0], alice, replicas=1)

        async def host():
            for n in fog:
                st = await n.statuses(iid)
                if any(r["state"] == "running" for r in st.values()):
                    return next(m for m in fog if m.driver.is_alive(iid))
            return None

        first = await wait_for("the replica running", host)
        # sealed as `form secrets set` does: to the public key the host's node record publishes
        rec = await fog[0].call("get", "node", first.address)
        plain = sealed.Plain.new(VALUE)
        entry = {"commit": sealed.commitment(iid, "TOKEN", plain),
                 "boxes": {first.address: sealed.seal(plain, bytes.fromhex(rec["public_key"]), instance_id=iid,
                                                      name="TOKEN", target=first.address)}}
        await fog[0].request(alice, "POST", f"/v1/instance/{iid}/secrets", {"set": {"TOKEN": entry}})

        async def first_has_it():  # booted again (generation 1) with its secrets disk
            st = (await first.statuses(iid)).get(first.address) or {}
            return (disk_value(first, iid, "TOKEN") == VALUE and st.get("generation") == 1
                    and st.get("state") == "running")

        await wait_for("the host's VM rebooted with the secret", first_has_it)
        others = [n for n in fog if n is not first]
        for n in others:  # the others have no box they can open
            inst = await n.call("get", "instance", iid)
            with pytest.raises(SecretsUnavailable):
                await n.scheduler.secrets.open_all(inst)

        # a second replica: placed on one of the others, which gets a box re-sealed by the host
        await fog[0].request(alice, "POST", f"/v1/instance/{iid}/update", {"replicas": 2})

        async def second():
            return next((n for n in others if disk_value(n, iid, "TOKEN") == VALUE), None)

        new = await wait_for("the new replica booted with the secret", second)
        boxes = await new.call("list", "secret_box", owner=new.address, limit=100)
        assert [(b["name"], b["target"]) for b in boxes] == [("TOKEN", new.address)]
        (third,) = [n for n in others if n is not new]
        with pytest.raises(SecretsUnavailable):
            await third.scheduler.secrets.open_all(await third.call("get", "instance", iid))
        assert disk_value(third, iid, "TOKEN") is None
        for n in fog:
            assert VALUE not in state_bytes(n), f"node {n.i}'s state holds the value in clear"
