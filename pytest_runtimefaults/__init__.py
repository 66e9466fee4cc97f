"""pytest-runtimefaults: fault-injection fixtures for system tests of container runtimes.

The package is importable without pytest running; every fault and every real
component is a plain class usable as a context manager.  Heavy modules (the
D-Bus proxy, pyroute2, pystemd, grpc) are imported only when a name from them
is first used, so that ``pytest -p runtimefaults`` stays fast.

Example::

    from pytest_runtimefaults import PrivateBus, DBusFaultProxy

    with PrivateBus() as bus, DBusFaultProxy(upstream=bus.address) as proxy:
        print(proxy.address)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it; resolved lazily by __getattr__ (PEP 562).
_LAZY: dict[str, str] = {
    "Churn": "pytest_runtimefaults.subscribers",
    "CniDir": "pytest_runtimefaults.cni",
    "CniSandbox": "pytest_runtimefaults.netns",
    "ConnectBacklogFull": "pytest_runtimefaults.dbus.limits",
    "ConnectionCap": "pytest_runtimefaults.dbus.limits",
    "Containerd": "pytest_runtimefaults.containerd",
    "CriPods": "pytest_runtimefaults.cni",
    "DBusFaultProxy": "pytest_runtimefaults.dbus.proxy",
    "Daemon": "pytest_runtimefaults.daemon",
    "DaemonWatch": "pytest_runtimefaults.subscribers",
    "Delay": "pytest_runtimefaults.dbus.actions",
    "Disconnect": "pytest_runtimefaults.dbus.actions",
    "Drop": "pytest_runtimefaults.dbus.actions",
    "Duplicate": "pytest_runtimefaults.dbus.actions",
    "ErrorReply": "pytest_runtimefaults.dbus.actions",
    "Fault": "pytest_runtimefaults.core.fault",
    "FaultBase": "pytest_runtimefaults.core.fault",
    "FaultRegistry": "pytest_runtimefaults.faults",
    "FlipByteOrder": "pytest_runtimefaults.dbus.actions",
    "JobResult": "pytest_runtimefaults.dbus.actions",
    "Journal": "pytest_runtimefaults.journal",
    "Match": "pytest_runtimefaults.dbus.match",
    "NetworkChurn": "pytest_runtimefaults.cni",
    "PrivateBus": "pytest_runtimefaults.dbus.bus",
    "Reorder": "pytest_runtimefaults.dbus.actions",
    "Rule": "pytest_runtimefaults.dbus.actions",
    "Runtime": "pytest_runtimefaults.runtime",
    "RuntimeResult": "pytest_runtimefaults.runtime",
    "Serials": "pytest_runtimefaults.dbus.serials",
    "SignalBeforeReply": "pytest_runtimefaults.dbus.actions",
    "SignalFlood": "pytest_runtimefaults.dbus.flood",
    "SplitMessage": "pytest_runtimefaults.dbus.actions",
    "StaleSocket": "pytest_runtimefaults.sockets",
    "StrayReply": "pytest_runtimefaults.dbus.actions",
    "Swarm": "pytest_runtimefaults.subscribers",
    "SystemdInspector": "pytest_runtimefaults.systemd",
    "SystemdSandbox": "pytest_runtimefaults.systemd",
    "ThreadedFault": "pytest_runtimefaults.core.fault",
    "TornWriteWatcher": "pytest_runtimefaults.cni",
    "TraceEntry": "pytest_runtimefaults.dbus.trace",
    "parse_rule": "pytest_runtimefaults.dbus.grammar",
    "safe_bind": "pytest_runtimefaults.sockets",
}

__all__ = [
    "Churn",
    "CniDir",
    "CniSandbox",
    "ConnectBacklogFull",
    "ConnectionCap",
    "Containerd",
    "CriPods",
    "DBusFaultProxy",
    "Daemon",
    "DaemonWatch",
    "Delay",
    "Disconnect",
    "Drop",
    "Duplicate",
    "ErrorReply",
    "Fault",
    "FaultBase",
    "FaultRegistry",
    "FlipByteOrder",
    "JobResult",
    "Journal",
    "Match",
    "NetworkChurn",
    "PrivateBus",
    "Reorder",
    "Rule",
    "Runtime",
    "RuntimeResult",
    "Serials",
    "SignalBeforeReply",
    "SignalFlood",
    "SplitMessage",
    "StaleSocket",
    "StrayReply",
    "Swarm",
    "SystemdInspector",
    "SystemdSandbox",
    "ThreadedFault",
    "TornWriteWatcher",
    "TraceEntry",
    "__version__",
    "parse_rule",
    "safe_bind",
]

if TYPE_CHECKING:  # pragma: no cover
    from pytest_runtimefaults.cni import CniDir, CriPods, NetworkChurn, TornWriteWatcher
    from pytest_runtimefaults.containerd import Containerd
    from pytest_runtimefaults.core.fault import Fault, FaultBase, ThreadedFault
    from pytest_runtimefaults.daemon import Daemon
    from pytest_runtimefaults.dbus.actions import (
        Delay,
        Disconnect,
        Drop,
        Duplicate,
        ErrorReply,
        FlipByteOrder,
        JobResult,
        Reorder,
        Rule,
        SignalBeforeReply,
        SplitMessage,
        StrayReply,
    )
    from pytest_runtimefaults.dbus.bus import PrivateBus
    from pytest_runtimefaults.dbus.flood import SignalFlood
    from pytest_runtimefaults.dbus.grammar import parse_rule
    from pytest_runtimefaults.dbus.limits import ConnectBacklogFull, ConnectionCap
    from pytest_runtimefaults.dbus.match import Match
    from pytest_runtimefaults.dbus.proxy import DBusFaultProxy
    from pytest_runtimefaults.dbus.serials import Serials
    from pytest_runtimefaults.dbus.trace import TraceEntry
    from pytest_runtimefaults.faults import FaultRegistry
    from pytest_runtimefaults.journal import Journal
    from pytest_runtimefaults.netns import CniSandbox
    from pytest_runtimefaults.runtime import Runtime, RuntimeResult
    from pytest_runtimefaults.sockets import StaleSocket, safe_bind
    from pytest_runtimefaults.subscribers import Churn, DaemonWatch, Swarm
    from pytest_runtimefaults.systemd import SystemdInspector, SystemdSandbox


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_runtimefaults' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
