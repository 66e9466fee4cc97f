"""Where the runtimes under test keep their per-host network state: a private place.

libcni (in podman and in containerd's CRI) caches every ADD result under
``/var/lib/cni/results`` on the host, with no option to move it, and the
runtimes mount their containers' network namespaces under ``/run/netns``.
:func:`private_state_argv` is the argv prefix that runs a runtime inside the
CNI sandbox's network namespace and a private mount namespace where both are
tmpfs, so even a SIGKILLed run leaves neither on the host.

Example::

    argv = [*private_state_argv(sandbox.host.path), "podman", "info"]
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["private_state_argv"]


def private_state_argv(netns_path: Path | str | None) -> list[str]:
    """An argv prefix: network namespace *netns_path* (None: the current
    one), then a private mount namespace with a tmpfs on ``/var/lib`` and on
    ``/run/netns``, then the command that follows.

    The mount namespace dies with the runtime (``slave`` propagation: the
    host's mounts come in, none go out).  Reach a namespace mounted there from
    outside through ``/proc/PID/root/run/netns/NAME``.
    """
    script = (
        "mount -t tmpfs -o mode=0755 rfvarlib /var/lib"
        " && mount -t tmpfs -o mode=0755 rfnetns /run/netns"
        ' && exec "$@"'
    )
    enter = ["nsenter", f"--net={netns_path}"] if netns_path is not None else []
    return [
        *enter,
        "unshare",
        "--mount",
        "--propagation",
        "slave",
        "sh",
        "-c",
        script,
        "sh",
    ]
