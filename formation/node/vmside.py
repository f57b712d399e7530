"""The node's VM side as one value: off (and why), starting (kit, bridge), or on (with its build
service and scheduler). The API, `form node status` and the node record read it; only the
runtime changes it, by replacing the value, so no reader ever sees half of a side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the ports (ports.py) name this module's types; these modules import the ports
    from .builds import BuildService
    from .scheduler import Scheduler
    from .vmhost import VmHost


@dataclass(frozen=True)
class VmsOff:
    reason: str  # in words, for the API and `form node status`


@dataclass(frozen=True)
class VmsStarting:
    host: VmHost
    reason: str = "VMs are starting (guest kernel kit, bridge)"


@dataclass(frozen=True)
class VmsOn:
    host: VmHost
    builds: BuildService
    scheduler: Scheduler
    reason: str = ""


VmSide = VmsOff | VmsStarting | VmsOn


def runs_vms(side: VmSide) -> bool:
    """What the node record advertises: placement puts replicas only on nodes that run VMs (or
    are about to: a starting side takes its replicas once it is on)."""
    return not isinstance(side, VmsOff)


def vm_status(side: VmSide) -> dict:
    if isinstance(side, VmsStarting):  # a client may wait for it (`form pack ship` does)
        return {"enabled": False, "starting": True, "reason": side.reason}
    if not isinstance(side, VmsOn):
        return {"enabled": False, "reason": side.reason}
    return {"enabled": True, "reason": "", **side.host.describe(), "replicas": len(side.scheduler.replicas)}
