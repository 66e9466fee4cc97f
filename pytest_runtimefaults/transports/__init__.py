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

Example::

    from pytest_runtimefaults.transports.command import CommandTransport

    transport = CommandTransport(["ctr", "-a", sock, "events"])
"""
