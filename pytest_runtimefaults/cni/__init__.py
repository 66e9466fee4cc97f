"""CNI configuration faults: half-written, held, vanishing and racing config files.

Incident 4 of the fault catalog: runtimes that walk the CNI configuration
directory without a lock, and tools that write configs in place, let a reader
see a truncated file (``unexpected end of JSON input``), a file that vanished
between listing and opening, or one network's file while another is written
(a macvlan network brought up as a bridge).

One module per concern; every name is importable from here, as it was from
the old ``cni`` module:

* :mod:`~pytest_runtimefaults.cni.config`: writing and judging config files,
  :class:`CniDir` (a private conf dir), unique subnets;
* :mod:`~pytest_runtimefaults.cni.faults`: the file faults
  (:class:`HalfWritten`, :class:`HeldHalfWritten`, :class:`DeleteRecreate`,
  :class:`RacingWriter`) and the reload races of containerd's CRI plugin
  (:class:`RenamedInto`, :class:`ConfDirSwap`, :class:`EventStorm`), each a
  :class:`~pytest_runtimefaults.core.fault.Fault`;
* :mod:`~pytest_runtimefaults.cni.inotify`: :class:`InotifyInstancesHeld` (no
  inotify instance left in a user namespace) and :func:`inotify_instances`;
* :mod:`~pytest_runtimefaults.cni.parallel`: :class:`ParallelAdds`;
* :mod:`~pytest_runtimefaults.cni.watcher`: :class:`TornWriteWatcher` (inotify);
* :mod:`~pytest_runtimefaults.cni.namespaces`: :func:`private_state_argv`;
* :mod:`~pytest_runtimefaults.cni.podman`: :class:`CniPodman`;
* :mod:`~pytest_runtimefaults.cni.netavark`: podman's netavark backend
  (:class:`NetavarkDir`, :func:`validate_network`, :class:`NetavarkPodman`);
* :mod:`~pytest_runtimefaults.cni.churn`: :class:`NetworkChurn` (parallel
  podman network create/rm/run on netavark) and :func:`classify`;
* :mod:`~pytest_runtimefaults.cni.containerd`: :func:`containerd_in_sandbox`;
* :mod:`~pytest_runtimefaults.cni.cri`: the CRI client (:class:`CriPods`,
  :func:`cri_network_status`; needs the ``containerd`` extra);
* :mod:`~pytest_runtimefaults.cni.cgroups`: :func:`kill_cgroup_tree` and the
  journal's ``cgroup-tree`` reaper;
* :mod:`~pytest_runtimefaults.cni.busybox`: :func:`busybox_rootfs`.

Names resolve lazily (PEP 562), so importing the package loads nothing else;
protobuf, grpc and inotify_simple load with the module that needs them.  The
journal finds the ``cgroup-tree`` reaper through its own table.

Example::

    with CniDir() as cni:
        conf = cni.bridge()                     # unique name, bridge and subnet
        cni.write(conf)                         # temp + fsync + rename
        with HalfWritten(cni, "10-broken.conflist", conf, mode="truncate"):
            ...                                 # run the runtime against cni.conf_dir
        with TornWriteWatcher(cni.conf_dir) as watcher:
            ...                                 # the runtime writes its configs
        assert not watcher.torn, watcher.report()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_runtimefaults._lazy import lazy_exports

_MODULES: dict[str, tuple[str, ...]] = {
    "config": (
        "BROKEN_MODES",
        "CONFIG_SUFFIXES",
        "BrokenMode",
        "CniDir",
        "broken_bytes",
        "next_subnet",
        "validate_config",
        "whole_files",
        "write_atomic",
    ),
    "faults": (
        "ConfDirSwap",
        "ConfigDir",
        "DeleteRecreate",
        "EventStorm",
        "HalfWritten",
        "HeldHalfWritten",
        "RacingWriter",
        "RenamedInto",
    ),
    "inotify": ("InotifyInstancesHeld", "inotify_instances"),
    "parallel": ("ParallelAdds",),
    "watcher": (
        "IN_CLOEXEC",
        "IN_CLOSE_WRITE",
        "IN_CREATE",
        "IN_DELETE",
        "IN_MODIFY",
        "IN_MOVED_FROM",
        "IN_MOVED_TO",
        "IN_NONBLOCK",
        "IN_Q_OVERFLOW",
        "TornWrite",
        "TornWriteWatcher",
    ),
    "namespaces": ("private_state_argv",),
    "podman": ("CniPodman",),
    "netavark": (
        "NETAVARK_SUFFIXES",
        "NetavarkDir",
        "NetavarkPodman",
        "find_netavark",
        "host_network_state",
        "netavark_network",
        "netavark_state_argv",
        "validate_network",
    ),
    "containerd": ("containerd_in_sandbox",),
    "churn": ("ChurnOp", "NetworkChurn", "ReaderTally", "classify", "error_line"),
    "cri": (
        "CriNetworkStatus",
        "CriPod",
        "CriPods",
        "cri_network_status",
        "decode_protobuf",
        "wait_cri_network",
    ),
    "cgroups": ("CGROUP_ROOT", "kill_cgroup_tree"),
    "busybox": ("busybox_rootfs",),
}

# name -> the module that defines it, resolved by __getattr__.
_LAZY, __getattr__, __dir__ = lazy_exports(__name__, _MODULES)

__all__ = [
    "BROKEN_MODES",
    "CGROUP_ROOT",
    "CONFIG_SUFFIXES",
    "IN_CLOEXEC",
    "IN_CLOSE_WRITE",
    "IN_CREATE",
    "IN_DELETE",
    "IN_MODIFY",
    "IN_MOVED_FROM",
    "IN_MOVED_TO",
    "IN_NONBLOCK",
    "IN_Q_OVERFLOW",
    "NETAVARK_SUFFIXES",
    "BrokenMode",
    "ChurnOp",
    "CniDir",
    "CniPodman",
    "ConfDirSwap",
    "ConfigDir",
    "CriNetworkStatus",
    "CriPod",
    "CriPods",
    "DeleteRecreate",
    "EventStorm",
    "HalfWritten",
    "HeldHalfWritten",
    "InotifyInstancesHeld",
    "NetavarkDir",
    "NetavarkPodman",
    "NetworkChurn",
    "ParallelAdds",
    "RacingWriter",
    "ReaderTally",
    "RenamedInto",
    "TornWrite",
    "TornWriteWatcher",
    "broken_bytes",
    "busybox_rootfs",
    "classify",
    "containerd_in_sandbox",
    "cri_network_status",
    "decode_protobuf",
    "error_line",
    "find_netavark",
    "host_network_state",
    "inotify_instances",
    "kill_cgroup_tree",
    "netavark_network",
    "netavark_state_argv",
    "next_subnet",
    "private_state_argv",
    "validate_config",
    "validate_network",
    "wait_cri_network",
    "whole_files",
    "write_atomic",
]

if TYPE_CHECKING:  # pragma: no cover
    from pytest_runtimefaults.cni.busybox import busybox_rootfs
    from pytest_runtimefaults.cni.cgroups import CGROUP_ROOT, kill_cgroup_tree
    from pytest_runtimefaults.cni.churn import (
        ChurnOp,
        NetworkChurn,
        ReaderTally,
        classify,
        error_line,
    )
    from pytest_runtimefaults.cni.config import (
        BROKEN_MODES,
        CONFIG_SUFFIXES,
        BrokenMode,
        CniDir,
        broken_bytes,
        next_subnet,
        validate_config,
        whole_files,
        write_atomic,
    )
    from pytest_runtimefaults.cni.containerd import containerd_in_sandbox
    from pytest_runtimefaults.cni.cri import (
        CriNetworkStatus,
        CriPod,
        CriPods,
        cri_network_status,
        decode_protobuf,
        wait_cri_network,
    )
    from pytest_runtimefaults.cni.faults import (
        ConfDirSwap,
        ConfigDir,
        DeleteRecreate,
        EventStorm,
        HalfWritten,
        HeldHalfWritten,
        RacingWriter,
        RenamedInto,
    )
    from pytest_runtimefaults.cni.inotify import InotifyInstancesHeld, inotify_instances
    from pytest_runtimefaults.cni.namespaces import private_state_argv
    from pytest_runtimefaults.cni.netavark import (
        NETAVARK_SUFFIXES,
        NetavarkDir,
        NetavarkPodman,
        find_netavark,
        host_network_state,
        netavark_network,
        netavark_state_argv,
        validate_network,
    )
    from pytest_runtimefaults.cni.parallel import ParallelAdds
    from pytest_runtimefaults.cni.podman import CniPodman
    from pytest_runtimefaults.cni.watcher import (
        IN_CLOEXEC,
        IN_CLOSE_WRITE,
        IN_CREATE,
        IN_DELETE,
        IN_MODIFY,
        IN_MOVED_FROM,
        IN_MOVED_TO,
        IN_NONBLOCK,
        IN_Q_OVERFLOW,
        TornWrite,
        TornWriteWatcher,
    )
