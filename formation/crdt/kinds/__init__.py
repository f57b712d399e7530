"""The kinds of records in the replicated state. Importing this package registers them all."""

from .base import Intent, Invalid, Kind, Route, get_kind, register, registry
from .credit_kinds import (
    ChargeKind,
    CreditMovedKind,
    CreditMoveKind,
    GrantKind,
    RentKind,
    SubscriptionKind,
)
from .fog_kinds import AdmitKind, ExpelKind, FogKind, LeaveKind, MemberKind
from .node_kinds import InstanceStatusKind, NodeKind, PeerKind, SecretBoxKind
from .usage_kinds import UsageKind
from .user_kinds import AccountKind, AgentKind, DnsKind, InstanceKind, ModelKind

for _k in (AccountKind, NodeKind, PeerKind, InstanceKind, InstanceStatusKind, ModelKind, AgentKind, DnsKind,
           FogKind, MemberKind, AdmitKind, LeaveKind, ExpelKind, SecretBoxKind, UsageKind,
           GrantKind, ChargeKind, CreditMoveKind, CreditMovedKind, SubscriptionKind, RentKind):
    register(_k())

__all__ = ["Intent", "Invalid", "Kind", "Route", "get_kind", "register", "registry"]
