"""The CRI messages this project sends and reads, declared once as data.

containerd's Python client ships no CRI stubs and the project has no code
generation step, so the messages the CRI clients use are declared here as
data: exactly the fields they use, with their numbers from CRI's
``api.proto`` (``runtime.v1``), built into classes by the protobuf runtime
when this module is imported.  Calls go through grpcio's generic
multi-callables (:func:`runtime_method`).  Fields a runtime sends that are
not declared are kept as unknown fields, ignored.

Two clients share it: :mod:`pytest_runtimefaults.cni.cri` (a kubelet giving
pods their network: ``Status``, ``RunPodSandbox``, ``PodSandboxStatus``...)
and :mod:`pytest_runtimefaults.transports.cri` (containers and
``GetContainerEvents``).  ``cri_message`` and ``cri_message_classes`` are
importable from the first as before.

Needs the ``containerd`` extra (``grpcio``, ``protobuf<4``).

Example::

    request = cri_message("StatusRequest", verbose=True)
    status = runtime_method(channel, "Status")(request, timeout=5)
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["CLASSES", "MESSAGES", "PACKAGE", "cri_message", "cri_message_classes", "runtime_method"]

PACKAGE = "runtime.v1"

#: message -> its fields: (name, number, type); a type is a scalar ("string",
#: "bool", "int64", "int32", "uint32"; an enum is an int32 on the wire),
#: another message of this table, "repeated MESSAGE", "repeated SCALAR", or
#: "map" (string to string).  Only what the clients read or write.
MESSAGES: dict[str, tuple[tuple[str, int, str], ...]] = {
    # RuntimeService/Status: what CRI loaded of the CNI configuration
    "StatusRequest": (("verbose", 1, "bool"),),
    "RuntimeCondition": (
        ("type", 1, "string"),
        ("status", 2, "bool"),
        ("reason", 3, "string"),
        ("message", 4, "string"),
    ),
    "RuntimeStatus": (("conditions", 1, "repeated RuntimeCondition"),),
    "StatusResponse": (("status", 1, "RuntimeStatus"), ("info", 2, "map")),
    # pod sandboxes
    "PodSandboxMetadata": (("name", 1, "string"), ("uid", 2, "string"), ("namespace", 3, "string")),
    "NamespaceOption": (("network", 1, "int32"), ("pid", 2, "int32"), ("ipc", 3, "int32")),
    "LinuxSandboxSecurityContext": (("namespace_options", 1, "NamespaceOption"),),
    "LinuxPodSandboxConfig": (
        ("cgroup_parent", 1, "string"),
        ("security_context", 2, "LinuxSandboxSecurityContext"),
    ),
    "PodSandboxConfig": (
        ("metadata", 1, "PodSandboxMetadata"),
        ("hostname", 2, "string"),
        ("log_directory", 3, "string"),
        ("linux", 8, "LinuxPodSandboxConfig"),
    ),
    "RunPodSandboxRequest": (("config", 1, "PodSandboxConfig"),),
    "RunPodSandboxResponse": (("pod_sandbox_id", 1, "string"),),
    "PodSandboxStatusRequest": (("pod_sandbox_id", 1, "string"), ("verbose", 2, "bool")),
    "PodSandboxNetworkStatus": (("ip", 1, "string"),),
    "PodSandboxStatus": (("id", 1, "string"), ("network", 5, "PodSandboxNetworkStatus")),
    "PodSandboxStatusResponse": (("status", 1, "PodSandboxStatus"), ("info", 2, "map")),
    "StopPodSandboxRequest": (("pod_sandbox_id", 1, "string"),),
    "StopPodSandboxResponse": (),
    "RemovePodSandboxRequest": (("pod_sandbox_id", 1, "string"),),
    "RemovePodSandboxResponse": (),
    "ListPodSandboxRequest": (),
    "PodSandbox": (("id", 1, "string"),),
    "ListPodSandboxResponse": (("items", 1, "repeated PodSandbox"),),
    # containers
    "ContainerMetadata": (("name", 1, "string"), ("attempt", 2, "uint32")),
    "ImageSpec": (("image", 1, "string"),),
    "ContainerConfig": (
        ("metadata", 1, "ContainerMetadata"),
        ("image", 2, "ImageSpec"),
        ("command", 3, "repeated string"),
        ("log_path", 11, "string"),
    ),
    "CreateContainerRequest": (
        ("pod_sandbox_id", 1, "string"),
        ("config", 2, "ContainerConfig"),
        ("sandbox_config", 3, "PodSandboxConfig"),
    ),
    "CreateContainerResponse": (("container_id", 1, "string"),),
    "StartContainerRequest": (("container_id", 1, "string"),),
    "StartContainerResponse": (),
    "StopContainerRequest": (("container_id", 1, "string"), ("timeout", 2, "int64")),
    "StopContainerResponse": (),
    "RemoveContainerRequest": (("container_id", 1, "string"),),
    "RemoveContainerResponse": (),
    # the event stream
    "GetEventsRequest": (),
    "ContainerEventResponse": (
        ("container_id", 1, "string"),
        ("container_event_type", 2, "int32"),
        ("created_at", 3, "int64"),
        ("pod_sandbox_status", 4, "PodSandboxStatus"),
    ),
}

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "string": _F.TYPE_STRING,
    "bool": _F.TYPE_BOOL,
    "int64": _F.TYPE_INT64,
    "int32": _F.TYPE_INT32,
    "uint32": _F.TYPE_UINT32,
}


def _file_descriptor(
    messages: dict[str, tuple[tuple[str, int, str], ...]],
    filename: str = "pytest_runtimefaults/cri_subset.proto",
) -> Any:
    """The ``FileDescriptorProto`` of *messages* (proto3, package runtime.v1)."""
    proto = descriptor_pb2.FileDescriptorProto(name=filename, package=PACKAGE, syntax="proto3")
    for message, fields in messages.items():
        desc = proto.message_type.add(name=message)
        for name, number, kind in fields:
            field = desc.field.add(name=name, number=number, label=_F.LABEL_OPTIONAL)
            repeated, _, target = kind.rpartition(" ")
            if target in _SCALARS:
                field.type = _SCALARS[target]
                if repeated:
                    field.label = _F.LABEL_REPEATED
            elif kind == "map":
                # A proto map is a repeated nested KEY/VALUE entry marked map_entry.
                entry = desc.nested_type.add(name=f"{name.capitalize()}Entry")
                entry.options.map_entry = True
                entry.field.add(name="key", number=1, label=_F.LABEL_OPTIONAL, type=_F.TYPE_STRING)
                entry.field.add(
                    name="value", number=2, label=_F.LABEL_OPTIONAL, type=_F.TYPE_STRING
                )
                field.label = _F.LABEL_REPEATED
                field.type = _F.TYPE_MESSAGE
                field.type_name = f".{PACKAGE}.{message}.{entry.name}"
            else:
                if target not in messages:
                    raise ValueError(f"{message}.{name}: unknown message type {target!r}")
                field.type = _F.TYPE_MESSAGE
                field.type_name = f".{PACKAGE}.{target}"
                if repeated:
                    field.label = _F.LABEL_REPEATED
    return proto


def cri_message_classes(
    messages: dict[str, tuple[tuple[str, int, str], ...]], filename: str
) -> dict[str, Any]:
    """Message classes for a CRI subset declared as data (the format of :data:`MESSAGES`).

    Built by the protobuf runtime in a pool of their own, so another module
    can declare a subset of its own (under another *filename*) without
    clashing with :data:`CLASSES` or with a full CRI definition that some other
    package registers in protobuf's default pool.
    """
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_file_descriptor(messages, filename))
    get_class = getattr(message_factory, "GetMessageClass", None)  # protobuf >= 4.21
    if get_class is None:  # protobuf 3 (the containerd extra pins <4)
        get_class = getattr(message_factory.MessageFactory(pool), "GetPrototype")  # noqa: B009
    return {name: get_class(pool.FindMessageTypeByName(f"{PACKAGE}.{name}")) for name in messages}


CLASSES: dict[str, Any] = cri_message_classes(MESSAGES, "pytest_runtimefaults/cri_subset.proto")
"""The classes of :data:`MESSAGES`, by name."""


def cri_message(message: str, /, **fields: Any) -> Any:
    """A message of the CRI subset: ``cri_message("StatusRequest", verbose=True)``."""
    try:
        cls = CLASSES[message]
    except KeyError:
        raise ValueError(
            f"no CRI message {message!r} here; the subset has {', '.join(sorted(CLASSES))}"
        ) from None
    return cls(**fields)


def runtime_method(channel: Any, method: str, *, stream: bool = False) -> Any:
    """The grpcio multi-callable of ``runtime.v1.RuntimeService/METHOD`` on *channel*.

    Its reply is ``METHODResponse`` (``GetContainerEvents``: a stream of
    ``ContainerEventResponse``, with *stream* true).
    """
    response = "ContainerEventResponse" if stream else f"{method}Response"
    make = channel.unary_stream if stream else channel.unary_unary
    return make(
        f"/{PACKAGE}.RuntimeService/{method}",
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=CLASSES[response].FromString,
    )
