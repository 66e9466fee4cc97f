"""cgroup trees: where the cgroup filesystems are mounted, and removing a tree.

A cgroup directory can only be removed when it has no children and no tasks,
and a task SIGKILLed a moment ago still holds its cgroup until the kernel has
freed it.  So a tree is removed deepest first, retried for a short while: one
implementation (:func:`remove_tree`) instead of the four copies the journal,
containerd, the CNI family and the systemd sandbox each had.

Example::

    from pytest_runtimefaults.host import cgroups

    cgroups.kill_tree(root)              # SIGKILL every task below root
    if not cgroups.remove_tree(root):    # False: still busy after the timeout
        ...
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

from pytest_runtimefaults.core.log import swallowed
from pytest_runtimefaults.host import proc
from pytest_runtimefaults.host.mounts import mount_table

__all__ = ["cgroup_mounts", "is_below_cgroup_mount", "kill_tree", "remove_tree", "tasks"]

_CGROUP_FSTYPES = ("cgroup", "cgroup2")


def cgroup_mounts(pid: int | str = "self") -> list[str]:
    """Mount points of cgroup (v1) and cgroup2 filesystems in *pid*'s mount namespace."""
    return [m.target for m in mount_table(pid) if m.fstype in _CGROUP_FSTYPES]


def is_below_cgroup_mount(path: str | os.PathLike[str]) -> bool:
    """True if *path* (absolute, no symlinks) lies strictly below a cgroup mount point."""
    text = os.fspath(path)
    if not os.path.isabs(text) or os.path.realpath(text) != text:
        return False
    return any(text.startswith(mount.rstrip("/") + "/") for mount in cgroup_mounts())


def tasks(roots: Iterable[Path]) -> set[int]:
    """Every PID listed in a ``cgroup.procs`` file at or below *roots*."""
    pids: set[int] = set()
    for root in roots:
        if not root.is_dir():
            continue
        for procs in root.rglob("cgroup.procs"):
            with swallowed((OSError, ValueError), "reading %s", procs):
                pids.update(int(p) for p in procs.read_text().split())
    return pids


def kill_tree(roots: Iterable[Path], timeout: float = 5.0) -> list[int]:
    """SIGKILL every task below *roots* until none is left (or *timeout*); the PIDs killed.

    Never this process nor one of its ancestors (a careless root would
    otherwise take the test run with it).
    """
    roots = list(roots)
    spared = proc.ancestors()
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        victims = tasks(roots) - spared
        if not victims or time.monotonic() > deadline:
            break
        for pid in victims:
            with swallowed(ProcessLookupError, "killing %d", pid):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(0.02)
    return sorted(killed)


def remove_tree(root: Path, timeout: float = 0.5) -> bool:
    """rmdir *root* and every cgroup below it, deepest first; True once it is gone.

    Retried until *timeout* while the kernel frees tasks that were just killed
    (``EBUSY``).  A tree that still has live tasks is left as it is.
    """
    deadline = time.monotonic() + timeout
    while True:
        if not root.is_dir():
            return True
        subs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for sub in [*subs, root]:
            with swallowed(OSError, "removing cgroup %s", sub):
                sub.rmdir()
        if not root.is_dir():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
