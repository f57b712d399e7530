"""The declared seams hold: each VM backend has every method of `VmBackend` with the same
signature, and the runtime has every member of the ports it is handed as (ports.py)."""

from __future__ import annotations

import inspect
import typing

import pytest

from formation.node import ports
from formation.node.runtime import NodeRuntime
from formation.p2p.service import P2PService
from formation.vm.backend import VmBackend
from formation.vm.driver import QemuDriver
from formation.vm.fake import FakeBackend


def _members(protocol: type) -> dict[str, object]:
    out: dict[str, object] = {}
    for klass in reversed(protocol.__mro__):
        if klass in (object, typing.Protocol, typing.Generic):
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_"):
                out[name] = value
        for name in getattr(klass, "__annotations__", {}):
            if not name.startswith("_"):
                out.setdefault(name, None)
    return out


def _params(fn) -> list[tuple[str, object, object]]:
    sig = inspect.signature(fn)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize("backend", [QemuDriver, FakeBackend])
def test_every_backend_implements_the_protocol(backend):
    for name, declared in _members(VmBackend).items():
        if declared is None:  # an attribute: the driver sets it in its constructor
            assert name in inspect.signature(backend).parameters or name in inspect.getsource(backend), name
            continue
        impl = getattr(backend, name, None)
        assert impl is not None, f"{backend.__name__} lacks {name}"
        assert inspect.iscoroutinefunction(impl) == inspect.iscoroutinefunction(declared), name
        assert _params(impl) == _params(declared), f"{backend.__name__}.{name}"


@pytest.mark.parametrize("port", [ports.SchedulerNode, ports.ControlNode, ports.ApiNode])
def test_the_runtime_is_what_it_is_handed_as(port):
    source = inspect.getsource(NodeRuntime)
    for name, declared in _members(port).items():
        if declared is None:
            assert f"self.{name} = " in source, f"NodeRuntime lacks {name}"
        else:
            impl = getattr(NodeRuntime, name)
            assert inspect.iscoroutinefunction(impl) == inspect.iscoroutinefunction(declared), name
            assert _params(impl) == _params(declared), name


@pytest.mark.parametrize("port", [ports.Peers, ports.PeerControl])
def test_the_p2p_service_is_what_the_node_hands_on(port):
    for name, declared in _members(port).items():
        impl = getattr(P2PService, name)
        assert inspect.iscoroutinefunction(impl) == inspect.iscoroutinefunction(declared), name
        assert [p[0] for p in _params(impl)] == [p[0] for p in _params(declared)], name
