"""Kinds that nodes write about themselves: node, peer, instance_status."""

from __future__ import annotations

from dataclasses import dataclass

import coincurve

from ..keys import address_of, format_address
from ..op import Op
from ..schema import (
    SEALED_BOX,
    SECRET_NAME,
    SHA256_HEX,
    TAGS,
    TIMESTAMP,
    Record,
    address,
    boolean,
    endpoint,
    field,
    integer,
    ip_address,
    ip_network,
    list_of,
    nested,
    one_of,
    optional,
    text,
)
from .base import Invalid, Kind, node_address, require_author_is_key


@dataclass(frozen=True, slots=True)
class Capacity(Record):
    vcpus: int = field(integer(0, 4096))
    memory_mb: int = field(integer(0, 2**40))
    disk_gb: int = field(integer(0, 2**30))
    gpus: int = field(integer(0, 64), default=0)  # GPUs a VM can be given (VFIO passthrough)
    gpu_models: list = field(list_of(text(64, min_len=1), 64), factory=list)  # one per GPU: "H100", ...
    kvm: bool = field(boolean, default=False)
    vms: bool = field(boolean, default=True)  # false: the node runs no VMs (placement skips it)
    # how many VMs its subnet holds (placement books one address per replica); None: not said
    vm_addresses: int | None = field(optional(integer(0, 2**24)), default=None)


ADDRESS = address  # the check, under a name no record field shadows
_INSTANCE_ID = text(64, min_len=1)


def doubt(v):
    """"<instance_id>@<node address>": a replica the writer saw not running where it is placed."""
    if not isinstance(v, str) or "@" not in v:
        raise ValueError("must be '<instance_id>@<node address>'")
    iid, _, node = v.rpartition("@")
    return f"{_INSTANCE_ID(iid)}@{address(node)}"


PUBLIC_KEY = text(66, min_len=66, pattern=r"0[23][0-9a-f]{64}", what="a compressed secp256k1 public key in hex")
MULTIADDR = text(512, min_len=2, pattern=r"/[A-Za-z0-9/._:%-]+", what="a multiaddr like /ip4/1.2.3.4/tcp/53333")


@dataclass(frozen=True, slots=True)
class Node(Record):
    address: str = field(address)
    multiaddrs: list = field(list_of(MULTIADDR, 16, unique=True), factory=list)
    capacity: dict = field(nested(Capacity), factory=lambda: Capacity(0, 0, 0).to_dict())
    region: str = field(text(64), default="")
    version: str = field(text(32), default="")
    tags: list = field(TAGS, factory=list)
    api_url: str | None = field(optional(text(512)), default=None)
    started_at: int = field(TIMESTAMP, default=0)
    heartbeat: int = field(TIMESTAMP, default=0)  # unix ms of the node's last heartbeat
    # the nodes it is connected to now (addresses): other members' evidence that it is up
    seen: list = field(list_of(ADDRESS, 256, unique=True), factory=list)
    # replicas this node saw placed on another node and not running there in time (placement.py):
    # other members' evidence that moves a placement, never the placed node's own word
    doubts: list = field(list_of(doubt, 256, unique=True), factory=list)
    # its secp256k1 key, compressed (the address is its hash): what users seal secrets to
    public_key: str | None = field(optional(PUBLIC_KEY), default=None)


class SelfRecordKind(Kind):
    """A record a node keeps about itself: keyed by, written by and naming its own address."""

    def node_write(self, op: Op) -> dict | None:
        require_author_is_key(self.name, op)
        if op.value is None:
            return None
        value = self.validate(op.value)
        if value["address"] != op.key:
            raise Invalid("bad_field", f"{self.name} field 'address': must equal the node's own address")
        return value


class NodeKind(SelfRecordKind):
    name = "node"
    record = Node

    def node_write(self, op: Op) -> dict | None:
        value = super().node_write(op)
        if value is not None and value["public_key"] is not None:
            try:
                of = address_of(coincurve.PublicKey(bytes.fromhex(value["public_key"])))
            except ValueError:
                raise Invalid("bad_field", "node field 'public_key': not a point of the curve") from None
            if format_address(of) != op.key:
                raise Invalid("bad_field", "node field 'public_key': is not the key of the node's address")
        return value

    def index(self, value: dict) -> dict:
        return {"owner": value["address"], "type": value["region"] or None, "text": None}


WG_KEY = text(44, min_len=44, pattern=r"[A-Za-z0-9+/]{43}=", what="a base64 WireGuard public key")
MAX_REACHES = 256  # as many as a node record's `seen` (formation/mesh/relay.py lists no more)


def sorted_list(inner):
    def check(v):
        out = inner(v)
        if out != sorted(out):
            raise ValueError("must be sorted")
        return out

    return check


@dataclass(frozen=True, slots=True)
class Peer(Record):
    address: str = field(address)
    public_key: str = field(WG_KEY)
    overlay_ip: str = field(ip_address)
    endpoints: list = field(list_of(endpoint, 8, unique=True), factory=list)
    vm_subnet: str | None = field(optional(ip_network), default=None)
    updated_at: int = field(TIMESTAMP, default=0)
    # the members it has a live WireGuard handshake with, sorted (one list, one value: no churn
    # from order): its claim, deciding only its own pairs (formation/mesh/relay.py)
    reaches: list = field(sorted_list(list_of(ADDRESS, MAX_REACHES, unique=True)), factory=list)


class PeerKind(SelfRecordKind):
    """formnet membership of a node: WireGuard key, endpoints, overlay address, VM subnet."""

    name = "peer"
    record = Peer

    def index(self, value: dict) -> dict:
        return {"owner": value["address"], "type": None, "text": value["overlay_ip"]}


STATES = ("pending", "building", "booting", "running", "paused", "stopped", "failed")
# what the hosting node's own probe of a running replica says (docs/dns.md, "Health"); "unknown":
# not probed (no EXPOSEd port, not running, or a record from before probes): it counts
HEALTH = ("healthy", "unhealthy", "unknown")


@dataclass(frozen=True, slots=True)
class InstanceStatus(Record):
    instance_id: str = field(text(64, min_len=1))
    node: str = field(address)
    state: str = field(one_of(*STATES))
    reason: str = field(text(2048), default="")
    ip: str | None = field(optional(ip_address), default=None)
    generation: int = field(integer(0, 2**62), default=0)
    updated_at: int = field(TIMESTAMP, default=0)
    health: str = field(one_of(*HEALTH), default="unknown")
    checked_at: int = field(TIMESTAMP, default=0)  # when the probe saw the health change


class InstanceStatusKind(Kind):
    """What a node reports about its replica of an instance. Key: "<instance_id>@<node address>".

    Kept apart from the user's `instance` record so that a node's status report and the
    owner's edit never overwrite each other, and so that only the hosting node can write it.
    """

    name = "instance_status"
    record = InstanceStatus

    def node_write(self, op: Op) -> dict | None:
        instance_id, sep, node = op.key.rpartition("@")
        if not sep or node != node_address(op):
            raise Invalid("unauthorized", "an instance_status key is '<instance_id>@<node>' and only that node writes it")
        if op.value is None:
            return None
        value = self.validate(op.value)
        if value["instance_id"] != instance_id or value["node"] != node:
            raise Invalid("bad_field", "instance_status fields 'instance_id'/'node': must match the key")
        return value

    def index(self, value: dict) -> dict:
        return {"owner": value["node"], "type": value["state"], "text": value["instance_id"]}



@dataclass(frozen=True, slots=True)
class SecretBox(Record):
    instance_id: str = field(_INSTANCE_ID)
    name: str = field(SECRET_NAME)
    target: str = field(address)  # the node that can open it
    commit: str = field(SHA256_HEX)
    box: str = field(SEALED_BOX)


class SecretBoxKind(Kind):
    """A secret re-sealed by a node that hosts its instance, for a node placed for it since
    (formation/sealed.py). Key: "<instance_id>:<name>:<target>@<writer>", written by the writer
    only, so no node can overwrite another's box; the target believes a box only if its content
    matches the owner's commitment in the instance record, so a box from a node that never held
    the value is useless."""

    name = "secret_box"
    record = SecretBox

    def node_write(self, op: Op) -> dict | None:
        head, sep, writer = op.key.rpartition("@")
        if not sep or writer != node_address(op):
            raise Invalid("unauthorized", "a secret_box key is '<instance_id>:<name>:<target>@<writer>' "
                          "and only the writer writes it")
        if op.value is None:
            return None
        value = self.validate(op.value)
        if head != f"{value['instance_id']}:{value['name']}:{value['target']}":
            raise Invalid("bad_field", "secret_box fields 'instance_id'/'name'/'target': must match the key")
        return value

    def index(self, value: dict) -> dict:
        return {"owner": value["target"], "type": value["name"], "text": value["instance_id"]}
