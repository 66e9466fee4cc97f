"""A minimal busybox-static root filesystem for podman's ``--rootfs`` containers.

Kept apart so that the one rootfs builder of the ``host`` package can replace
it (:mod:`pytest_runtimefaults.rootfs` builds the richer tree containerd's
pause image needs).

Example::

    rootfs = busybox_rootfs(tmp_path / "rootfs")
    podman run --rootfs rootfs /bin/sh -c 'ip -4 addr'
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["BUSYBOX_APPLETS", "busybox_rootfs"]

#: the applets the CNI tests run inside a container
BUSYBOX_APPLETS = ("sh", "true", "false", "ip", "cat", "ls", "sleep", "ifconfig", "hostname")


def busybox_rootfs(directory: Path | str, busybox: str = "/bin/busybox") -> Path:
    """A minimal root filesystem: busybox-static and a symlink per applet used here."""
    root = Path(directory)
    (root / "bin").mkdir(parents=True, exist_ok=True)
    for sub in ("proc", "sys", "dev", "etc", "tmp"):
        (root / sub).mkdir(exist_ok=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        link = root / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    return root
