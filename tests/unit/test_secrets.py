"""Secrets in the state (instance `secrets`, node `public_key`, `secret_box`) and a hosting
node's keeper (node/secrets.py): who may set them, what a node can open, and that a box made by
a node that never held the value is refused."""

from __future__ import annotations

import io
import tarfile

import pytest
import trio

from formation import sealed
from formation.crdt.async_store import AsyncStore
from formation.crdt.keys import PrivateKey
from formation.crdt.kinds import Invalid
from formation.crdt.store import Store
from formation.node.config import load_config
from formation.node.secrets import Keeper, SecretsUnavailable
from tests.support import Node, User, records_dump


def _entry(iid: str, name: str, value: bytes, nodes: list[Node]) -> tuple[dict, sealed.Plain]:
    plain = sealed.Plain.new(value)
    return {"commit": sealed.commitment(iid, name, plain),
            "boxes": {n.address: sealed.seal(plain, n.key.public_key.format(compressed=True),
                                              instance_id=iid, name=name, target=n.address) for n in nodes}}, plain


def _instance(node: Node, owner: User) -> str:
    return node.relay(owner, "POST", "/instance/create", {"name": "web"}, ts=10).key


def test_a_manager_sets_and_unsets_secrets_and_each_change_restarts_the_replicas():
    node, alice, bob = Node(), User(), User()
    iid = _instance(node, alice)
    entry, _ = _entry(iid, "API_KEY", b"v1", [node])
    node.relay(alice, "POST", f"/instance/{iid}/secrets", {"set": {"API_KEY": entry}}, ts=11)
    inst = node.store.get("instance", iid)
    assert inst["generation"] == 1 and inst["secrets"]["API_KEY"]["commit"] == entry["commit"]
    assert inst["secrets"]["API_KEY"]["updated_at"] == 11
    before, ops = records_dump(node.store), len(node.store)
    for who, body, code in (
            (bob, {"set": {"B": entry}}, "unauthorized"),  # not a manager
            (alice, {"unset": ["NOPE"]}, "not_found"),
            (alice, {}, "bad_request"),
            (alice, {"set": {"A": entry}, "unset": ["A"]}, "bad_field"),
            (alice, {"set": {"1BAD": entry}}, "bad_field"),
            (alice, {"set": {"A": {**entry, "commit": "zz"}}}, "bad_field"),
            (alice, {"set": {"A": {**entry, "extra": 1}}}, "bad_field"),
            (alice, {"set": {"A": {**entry, "boxes": {f"0x{i:040x}": "QUFBQUFBQUFBQUFBQUFBQQ==" for i in range(17)}}}},
             "bad_field"),
            (alice, {"unset": [{"x": 1}]}, "bad_field"),
            (alice, {"set": ["A"]}, "bad_field"),
            (alice, {"whatever": 1}, "bad_field")):
        with pytest.raises(Invalid) as e:
            node.relay(who, "POST", f"/instance/{iid}/secrets", body, ts=12)
        assert e.value.code == code, (body, e.value)
    assert records_dump(node.store) == before and len(node.store) == ops  # no trace
    # a plain update cannot touch them
    with pytest.raises(Invalid):
        node.relay(alice, "POST", f"/instance/{iid}/update", {"secrets": {}}, ts=13)
    node.relay(alice, "POST", f"/instance/{iid}/secrets", {"unset": ["API_KEY"]}, ts=14)
    inst = node.store.get("instance", iid)
    assert inst["secrets"] == {} and inst["generation"] == 2


def test_a_node_record_may_carry_only_its_own_public_key():
    node, other = Node(), PrivateKey()
    mine = node.key.public_key.format(compressed=True).hex()
    node.put("node", node.address, {"address": node.address, "public_key": mine})
    assert node.store.get("node", node.address)["public_key"] == mine
    for bad in (other.public_key.format(compressed=True).hex(), "02" + "00" * 32, "04" + "11" * 32):
        with pytest.raises(Invalid):
            node.put("node", node.address, {"address": node.address, "public_key": bad})


def test_a_secret_box_is_written_only_under_its_writers_address_and_its_own_fields():
    node, other = Node(), Node()
    iid = "c" * 32
    value = {"instance_id": iid, "name": "A", "target": other.address, "commit": "0" * 64,
             "box": "QUFBQUFBQUFBQUFBQUFBQQ=="}
    node.put("secret_box", f"{iid}:A:{other.address}@{node.address}", value)
    with pytest.raises(Invalid, match="only the writer"):
        node.put("secret_box", f"{iid}:A:{other.address}@{other.address}", value)
    with pytest.raises(Invalid, match="must match the key"):
        node.put("secret_box", f"{iid}:B:{other.address}@{node.address}", value)


class _KeeperNode:
    """What the keeper needs of a node: its address, config, the store, writes and members."""

    def __init__(self, node: Node, store: Store, tmp_path):
        self.address, self._node, self.astore = node.address, node, AsyncStore(store)
        self.config = load_config(None, {"node.data_dir": str(tmp_path / node.address[:10])})

    async def write(self, kind, key, value):
        return await self.astore.run(self._node.put, kind, key, value)

    async def fog_nodes(self):
        return await self.astore.list("node", limit=100)


async def test_a_host_opens_its_box_reseals_for_a_new_host_and_a_forged_box_is_refused(tmp_path):
    store = Store()
    alice = User()
    a, b, c = Node(store), Node(store, secret=b"\x22" * 32), Node(store, secret=b"\x23" * 32)
    for n in (a, b, c):
        n.put("node", n.address, {"address": n.address, "public_key": n.key.public_key.format(compressed=True).hex()})
    iid = _instance(a, alice)
    entry, plain = _entry(iid, "TOKEN", b"the value", [a])
    a.relay(alice, "POST", f"/instance/{iid}/secrets", {"set": {"TOKEN": entry}}, ts=11)
    keepers = {n.address: Keeper(_KeeperNode(n, store, tmp_path), n.key.secret) for n in (a, b, c)}
    inst = store.get("instance", iid)
    assert (await keepers[a.address].open_all(inst))["TOKEN"].value == b"the value"
    with pytest.raises(SecretsUnavailable, match="TOKEN"):
        await keepers[b.address].open_all(inst)
    # c, a member that never held the value, seals something else for b with the owner's commit
    forged = sealed.seal(sealed.Plain.new(b"evil"), b.key.public_key.format(compressed=True),
                         instance_id=iid, name="TOKEN", target=b.address)
    c.put("secret_box", f"{iid}:TOKEN:{b.address}@{c.address}",
          {"instance_id": iid, "name": "TOKEN", "target": b.address, "commit": entry["commit"], "box": forged})
    with pytest.raises(SecretsUnavailable):
        await keepers[b.address].open_all(inst)
    # b is placed for it now: a, which holds the value, seals it for b (once)
    assert await keepers[a.address].reseal(inst, [a.address, b.address]) == 1
    assert await keepers[a.address].reseal(inst, [a.address, b.address]) == 0
    assert (await keepers[b.address].open_all(inst))["TOKEN"].value == b"the value"
    # a node that cannot open them seals nothing
    assert await keepers[c.address].reseal(inst, [c.address, b.address]) == 0
    # the disk b gives its VM: a tar with the value; 0600
    disk = await keepers[b.address].disk_for(inst)
    assert disk.stat().st_mode & 0o777 == 0o600
    with tarfile.open(fileobj=io.BytesIO(disk.read_bytes())) as tar:
        names = tar.getnames()
        assert any(n.endswith("TOKEN") for n in names)
    keepers[b.address].forget(iid)
    assert not disk.exists()
    # no value in clear in the state
    assert b"the value" not in b"".join(str(r).encode() for r in records_dump(store))
    await trio.sleep(0)
