"""containerd's CRI view of the CNI directory, and pods through CRI, over gRPC.

What a kubelet does to give a pod its network: ``RunPodSandbox`` (CNI ADD),
``PodSandboxStatus``, ``StopPodSandbox`` (CNI DEL), ``RemovePodSandbox``,
``ListPodSandbox``, and ``RuntimeService/Status`` to read what CRI loaded.
containerd's Python client ships no CRI stubs and the project has no code
generation step: the messages are declared as data in
:mod:`pytest_runtimefaults.cri_api` (shared with the CRI event transport;
``cri_message`` and ``cri_message_classes`` are importable from here as
before) and sent with grpcio's generic ``unary_unary`` calls.  Fields a
runtime sends that are not declared are kept as unknown fields, ignored.

Needs the ``containerd`` extra (``grpcio``, ``protobuf<4``).

Example::

    status = cri_network_status(ctd.address)
    pods = CriPods(ctd.address, mount_pid=ctd.pid)
    pod = pods.run()                             # CNI ADD
    print(pod.ip, link_kind(pod.netns_path, "eth0"))
    pods.remove(pod.id)                          # CNI DEL
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from google.protobuf.empty_pb2 import Empty

from pytest_runtimefaults import naming
from pytest_runtimefaults.cni.cgroups import kill_cgroup_tree
from pytest_runtimefaults.core.log import logger, swallowed
from pytest_runtimefaults.cri_api import cri_message, cri_message_classes, runtime_method

if TYPE_CHECKING:
    from pytest_runtimefaults.journal import Journal

__all__ = [
    "CriNetworkStatus",
    "CriPod",
    "CriPods",
    "cri_message",
    "cri_message_classes",
    "cri_network_status",
    "decode_protobuf",
    "wait_cri_network",
]


def _call(address: str, method: str, request: Any, timeout: float) -> Any:
    """One ``runtime.v1.RuntimeService`` call over the Unix socket *address*."""
    import grpc

    with grpc.insecure_channel(f"unix://{address}") as channel:
        return runtime_method(channel, method)(request, timeout=timeout)


def decode_protobuf(buf: bytes) -> dict[int, list[Any]]:
    """Fields of one protobuf message: number -> values (ints or raw bytes).

    For looking at a reply this module has no message class for: parsed by
    the protobuf runtime as unknown fields.  Varints are ints;
    length-delimited, 64- and 32-bit fields are their raw bytes.
    """
    out: dict[int, list[Any]] = {}
    for number, wire, data in _unknown_fields(Empty.FromString(buf)):
        value: Any
        if wire == 1:
            value = struct.pack("<Q", data)
        elif wire == 5:
            value = struct.pack("<I", data)
        elif wire in (0, 2):
            value = data
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.setdefault(number, []).append(value)
    return out


def _unknown_fields(message: Any) -> Iterable[tuple[int, int, Any]]:
    try:  # protobuf >= 4.22 moved them out of the message
        from google.protobuf.unknown_fields import (  # type: ignore[import-not-found,unused-ignore]
            UnknownFieldSet,
        )
    except ImportError:
        fields = message.UnknownFields()
    else:
        fields = UnknownFieldSet(message)
    return [(f.field_number, f.wire_type, f.data) for f in fields]


@dataclass(frozen=True)
class CriNetworkStatus:
    """What containerd's CRI plugin says about its CNI configuration.

    *ready*/*reason*/*message*: the ``NetworkReady`` condition; *networks*:
    the loaded networks as ``(name, (plugin types...))`` (loopback excluded);
    *last_load*: the last config load status containerd reports.
    """

    ready: bool
    reason: str
    message: str
    networks: tuple[tuple[str, tuple[str, ...]], ...]
    last_load: str

    @property
    def plugin_types(self) -> tuple[str, ...]:
        return tuple(t for _, types in self.networks for t in types)

    @property
    def load_failed(self) -> bool:
        """The network is down *and* the last load says why.

        Wait for this, not for ``not ready``: while containerd reloads, its
        loaded networks are already cleared (not ready) before the new load
        status is stored, so for a moment it reports not ready with the old
        ``OK`` (seen with containerd 1.7.24).
        """
        return not self.ready and self.last_load not in ("", "OK")


def cri_network_status(address: str, timeout: float = 5.0) -> CriNetworkStatus:
    """Ask containerd's CRI ``RuntimeService/Status`` (verbose) over *address*."""
    response = _call(address, "Status", cri_message("StatusRequest", verbose=True), timeout)
    ready, reason, message = False, "", ""
    for condition in response.status.conditions:
        if condition.type == "NetworkReady":
            ready, reason, message = condition.status, condition.reason, condition.message
    info = dict(response.info)
    networks = _networks(info.get("cniconfig", "{}"))
    return CriNetworkStatus(
        bool(ready), reason, message, networks, info.get("lastCNILoadStatus", "")
    )


def _networks(cniconfig: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The networks in CRI's verbose ``cniconfig`` (libcni's loaded config, as JSON)."""
    networks: list[tuple[str, tuple[str, ...]]] = []
    # containerd's format, not a contract: what does not parse lists no network.
    with swallowed((ValueError, KeyError, TypeError), "reading CRI's cniconfig %.200r", cniconfig):
        for net in json.loads(cniconfig).get("Networks") or []:
            config = net["Config"]
            if config["Name"] == "cni-loopback":
                continue
            types = tuple(str(p["Network"]["type"]) for p in config["Plugins"])
            networks.append((str(config["Name"]), types))
    return tuple(networks)


def wait_cri_network(
    address: str, predicate: Callable[[CriNetworkStatus], bool], timeout: float = 5.0
) -> CriNetworkStatus:
    """Poll :func:`cri_network_status` until *predicate* holds; return the last status.

    containerd reloads the CNI config on inotify events, asynchronously, so
    a test waits for the reload instead of sleeping a guessed time.  Just
    after containerd (re)starts, its CRI service may still say ``server is
    not initialized yet`` (UNKNOWN) or be UNAVAILABLE: that counts as not yet,
    and is raised only if it lasts past *timeout*.
    """
    import grpc

    deadline = time.monotonic() + timeout
    while True:
        try:
            status = cri_network_status(address)
        except grpc.RpcError as exc:
            code = exc.code()
            starting = code == grpc.StatusCode.UNAVAILABLE or (
                code == grpc.StatusCode.UNKNOWN and "not initialized" in str(exc.details())
            )
            if not starting or time.monotonic() > deadline:
                raise
        else:
            if predicate(status) or time.monotonic() > deadline:
                return status
        time.sleep(0.02)


@dataclass(frozen=True)
class CriPod:
    """A pod sandbox created through CRI: its id, IP and network namespace.

    *netns* is the path containerd gave it; *netns_path* the same namespace
    as this process can open it (through ``/proc/PID/root`` when containerd
    runs in its own mount namespace), for :func:`~pytest_runtimefaults.netns.link_kind`.
    """

    id: str
    ip: str
    netns: str
    netns_path: str


class CriPods:
    """``RunPodSandbox``/``StopPodSandbox``/``RemovePodSandbox`` over CRI's gRPC socket.

    Each pod is a sandbox only (no containers), which is where CNI ADD and DEL
    happen.  Its cgroups go under :attr:`cgroup_parent`, unique and journaled
    (kind ``cgroup-tree``), so :meth:`remove_all` ends what containerd left.
    """

    def __init__(
        self,
        address: str,
        *,
        mount_pid: int | None = None,
        timeout: float = 30.0,
        journal: Journal | None = None,
    ) -> None:
        self.address = address
        self.mount_pid = mount_pid
        self.timeout = timeout
        self.pods: list[str] = []
        #: every pod's cgroups go under this unique parent (see :func:`kill_cgroup_tree`)
        self.cgroup_parent = "/" + naming.unique_name("rfcricg", maxlen=40)
        self.journal = journal if journal is not None else _default_journal()
        self._rid: int | None = self.journal.add("cgroup-tree", parent=self.cgroup_parent)

    def _reach(self, path: str) -> str:
        if not path or self.mount_pid is None:
            return path
        # /var/run is a symlink to /run: an absolute symlink met under
        # /proc/PID/root resolves against *our* root, so resolve it first.
        return f"/proc/{self.mount_pid}/root{os.path.realpath(path)}"

    def _call(self, method: str, request: Any) -> Any:
        return _call(self.address, method, request, self.timeout)

    def run(self, name: str | None = None, log_dir: str = "/tmp") -> CriPod:
        """Create a pod sandbox; raises ``grpc.RpcError`` with containerd's message."""
        name = name or naming.unique_name("rfpod", maxlen=40)
        config = cri_message(
            "PodSandboxConfig",
            metadata=cri_message(
                "PodSandboxMetadata", name=name, uid=f"uid-{name}", namespace="rf"
            ),
            hostname=name[:63],
            log_directory=log_dir,
            linux=cri_message("LinuxPodSandboxConfig", cgroup_parent=self.cgroup_parent),
        )
        response = self._call("RunPodSandbox", cri_message("RunPodSandboxRequest", config=config))
        pod_id = str(response.pod_sandbox_id)
        self.pods.append(pod_id)
        return self.status(pod_id)

    def status(self, pod_id: str) -> CriPod:
        request = cri_message("PodSandboxStatusRequest", pod_sandbox_id=pod_id, verbose=True)
        response = self._call("PodSandboxStatus", request)
        netns = _network_namespace(dict(response.info).get("info", ""))
        return CriPod(pod_id, str(response.status.network.ip), netns, self._reach(netns))

    def remove(self, pod_id: str) -> None:
        """Stop (CNI DEL) and remove a pod sandbox."""
        self._call("StopPodSandbox", cri_message("StopPodSandboxRequest", pod_sandbox_id=pod_id))
        self._call(
            "RemovePodSandbox", cri_message("RemovePodSandboxRequest", pod_sandbox_id=pod_id)
        )
        if pod_id in self.pods:
            self.pods.remove(pod_id)

    def namespaces(self) -> set[str]:
        """Pod network namespaces containerd has mounted, as ``netns:cri/NAME``
        (a leak check: ``registry.add_leak_check("netns:cri", pods.namespaces)``)."""
        where = self._reach("/run/netns")
        try:
            return {f"netns:cri/{name}" for name in os.listdir(where)}
        except FileNotFoundError:
            return set()  # nothing mounted yet, or containerd is gone
        except OSError:
            logger.debug("listing pod namespaces in %s", where, exc_info=True)
            return set()

    def list_ids(self) -> list[str]:
        """Ids of every pod sandbox CRI knows, ready or not (failed runs included)."""
        response = self._call("ListPodSandbox", cri_message("ListPodSandboxRequest"))
        return [str(item.id) for item in response.items]

    def remove_all(self) -> list[str]:
        """Stop and remove every pod CRI lists, and delete a pod's network
        namespace if containerd left it; returns the namespaces it had to delete."""
        left: list[str] = []
        for pod_id in self.list_ids():
            netns = ""
            # Best effort per pod, as a kubelet's garbage collection: one pod that
            # cannot be read or removed must not keep the others.
            with swallowed(Exception, "reading the status of pod %s", pod_id):
                netns = self.status(pod_id).netns
            with swallowed(Exception, "removing pod %s", pod_id):
                self.remove(pod_id)
            if netns and os.path.exists(self._reach(netns)):
                enter = ["nsenter", "-t", str(self.mount_pid), "-m"] if self.mount_pid else []
                subprocess.run(
                    [*enter, "ip", "netns", "delete", os.path.basename(netns)],
                    check=False,
                    capture_output=True,
                    timeout=30,
                )
                left.append(os.path.basename(netns))
        kill_cgroup_tree(self.cgroup_parent)
        if self.journal is not None and self._rid is not None:
            self.journal.release(self._rid)
            self._rid = None
        return left


def _network_namespace(info: str) -> str:
    """The network namespace path in a verbose PodSandboxStatus ``info`` (the OCI spec)."""
    netns = ""
    if not info:
        return netns  # not verbose, or a runtime that does not report its spec
    with swallowed((ValueError, KeyError, TypeError), "reading a pod's runtimeSpec"):
        for ns in json.loads(info)["runtimeSpec"]["linux"]["namespaces"]:
            if ns["type"] == "network":
                netns = str(ns.get("path", ""))
    return netns


def _default_journal() -> Journal:
    """The default journal (``runtimefaults cleanup`` reads it): classes journal
    what they create even when no fixture handed them one."""
    from pytest_runtimefaults.journal import Journal

    return Journal.default()
