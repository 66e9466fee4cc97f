"""Transports: small adapters between the subscriber swarm and one event stream.

Each module holds one adapter implementing
:class:`pytest_runtimefaults.subscribers.Transport`; heavy clients (grpc,
jeepney) are imported only when a transport is built.

=======================  ==================================================
module                   stream
=======================  ==================================================
``command``              any command printing one event a line
                         (``ctr events``, ``podman events``)
``containerd``           containerd's gRPC ``Events.Subscribe``
``cri``                  CRI ``RuntimeService/GetContainerEvents`` (containerd
                         1.7+), and a CRI producer of pod and container events
``dbus``                 D-Bus signals matched with ``AddMatch``
``unixline``             a line protocol over a Unix socket
``broadcaster``          a test-only broadcaster server, correct or with
                         CRI-O's double-``Done`` bug
=======================  ==================================================

The transports and the CRI producer are importable from here too; names
resolve lazily (PEP 562), so importing the package loads none of its modules
(nor grpc, protobuf or jeepney).

Example::

    from pytest_runtimefaults.transports import CommandTransport

    transport = CommandTransport(["ctr", "-a", sock, "events"])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_runtimefaults._lazy import lazy_exports

_MODULES: dict[str, tuple[str, ...]] = {
    "broadcaster": ("Broadcaster",),
    "command": ("CommandTransport",),
    "containerd": ("ContainerdEvents",),
    "cri": (
        "CriEvents",
        "CriLifecycles",
        "containerd_with_cri_events",
        "cri_events_unsupported",
        "run_fan_out",
        "run_restart",
    ),
    "dbus": ("DBusSignals",),
    "unixline": ("UnixLineTransport",),
}

# name -> the module that defines it, resolved by __getattr__.
_LAZY, __getattr__, __dir__ = lazy_exports(__name__, _MODULES)

__all__ = [
    "Broadcaster",
    "CommandTransport",
    "ContainerdEvents",
    "CriEvents",
    "CriLifecycles",
    "DBusSignals",
    "UnixLineTransport",
    "containerd_with_cri_events",
    "cri_events_unsupported",
    "run_fan_out",
    "run_restart",
]

if TYPE_CHECKING:  # pragma: no cover
    from pytest_runtimefaults.transports.broadcaster import Broadcaster
    from pytest_runtimefaults.transports.command import CommandTransport
    from pytest_runtimefaults.transports.containerd import ContainerdEvents
    from pytest_runtimefaults.transports.cri import (
        CriEvents,
        CriLifecycles,
        containerd_with_cri_events,
        cri_events_unsupported,
        run_fan_out,
        run_restart,
    )
    from pytest_runtimefaults.transports.dbus import DBusSignals
    from pytest_runtimefaults.transports.unixline import UnixLineTransport
