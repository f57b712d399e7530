"""What each part of the node needs of the others, declared as small Protocols: the scheduler, the
HTTP API and the control socket are handed the node (runtime.py, the composition root) typed by
these, so each one's dependencies read off its signature and a test can hand it a small fake.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from formation.crdt.async_store import AsyncStore
from formation.crdt.op import Op
from formation.vm.backend import VmBackend
from formation.vm.spec import VmSpec

from .config import Config
from .events import Changes
from .fog import InviteToken
from .vmside import VmSide

if TYPE_CHECKING:  # metering.py types its node by these ports
    from .charging import Charger
    from .metering import HireLedger


class Peers(Protocol):
    """The p2p side, as the scheduler uses it: who is connected, and blobs they hold."""

    def connected(self) -> list[str]: ...

    async def fetch_blob(self, peer: str, name: str, limit: int) -> bytes | None: ...


class PeerControl(Peers, Protocol):
    """What the control socket does with peers (tests and operators: sync now, cut a link)."""

    async def sync_with(self, peer: str) -> Any: ...

    async def block(self, peer: str) -> None: ...

    def unblock(self, peer: str) -> None: ...


class NodeState(Protocol):
    """The shared state as this node sees it, and the node's own signed writes."""

    address: str
    config: Config
    astore: AsyncStore
    changes: Changes
    fog_id: str | None  # the fog this node belongs to; None before it joined one

    async def write(self, kind: str, key: str, value: Any) -> Op: ...

    async def fog_nodes(self) -> list[dict]:
        """The node records of the fog's admitted members (what placement considers)."""


class SchedulerNode(NodeState, Protocol):
    p2p: Peers

    async def register(self) -> Op:
        """Write the node record now (e.g. when the scheduler's doubts changed)."""
        ...

    def routes_vms(self) -> bool:
        """Whether formnet is up here, routing the members' VM subnets."""
        ...

    async def vm_subnets(self) -> dict[str, str]:
        """Each member's VM subnet (where its replicas' addresses may be)."""
        ...


class RequestsNode(NodeState, Protocol):
    """A node that relays users' signed requests and reports on itself (API, control socket)."""

    async def submit_request(self, message: str, body: bytes, signature: bytes | str,
                             recovery_id: int | None = None) -> Op: ...

    async def status(self, *, full: bool = True) -> dict: ...


class ControlNode(RequestsNode, Protocol):
    p2p: PeerControl

    async def create_invite(self, *, expires_s: int) -> InviteToken: ...

    async def leave(self) -> str: ...


class ApiNode(RequestsNode, Protocol):
    """What the HTTP API handlers use of the node."""

    vms: VmSide
    hires: HireLedger  # the calls the hire proxy sent, for the meter (metering.py)
    charger: Charger  # priced calls: admission against credits, charge records (charging.py)

    def health_problems(self, connected: int, pending: int) -> list[str]: ...

    async def vm_subnets(self) -> dict[str, str]:
        """Each member's VM subnet (where its replicas' addresses may be)."""


class VmHostPort(Protocol):
    """The VM side of a host: its backend, its images, its bridge and addresses."""

    driver: VmBackend
    images_dir: Path
    bridge: str

    def describe(self) -> dict:
        """accel, machine, bridge, subnet, kernel: what the node says of its VM side."""

    def pick_ip(self, instance_id: str, taken: set[str]) -> str:
        """A free address of the node's VM subnet; VmUnavailable (saying so) when none is left."""

    def vm_addresses(self) -> int:
        """How many VMs the node's subnet holds."""

    def spec_for(self, instance_id: str, ip: str, *, vcpus: int, memory_mb: int, image: Path,
                 hostname: str, disk_gb: int | None = None, gpus: tuple[str, ...] = (),
                 secrets: Path | None = None) -> VmSpec: ...


class BuildsPort(Protocol):
    """The node's image builds, as the scheduler uses them."""

    def status(self, build_id: str) -> dict | None: ...

    def context_bytes(self, build_id: str) -> bytes | None: ...

    async def image_id_of(self, formfile_text: str, context_tar: bytes | None) -> str: ...

    async def submit(self, formfile_text: str, context_tar: bytes | None, owner: str) -> dict: ...
