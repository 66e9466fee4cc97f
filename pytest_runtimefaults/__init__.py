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
    "PrivateBus": "pytest_runtimefaults.dbus.bus",
    "DBusFaultProxy": "pytest_runtimefaults.dbus.proxy",
    "TraceEntry": "pytest_runtimefaults.dbus.trace",
    "FaultRegistry": "pytest_runtimefaults.faults",
    "Journal": "pytest_runtimefaults.journal",
}

__all__ = [
    "DBusFaultProxy",
    "FaultRegistry",
    "Journal",
    "PrivateBus",
    "TraceEntry",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover
    from pytest_runtimefaults.dbus.bus import PrivateBus
    from pytest_runtimefaults.dbus.proxy import DBusFaultProxy
    from pytest_runtimefaults.dbus.trace import TraceEntry
    from pytest_runtimefaults.faults import FaultRegistry
    from pytest_runtimefaults.journal import Journal


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_runtimefaults' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
