"""Ending every process under a uniquely named cgroup parent, and removing it.

podman (``--cgroup-parent``) and containerd's CRI (``cgroup_parent``) put the
containers and pods of the CNI fixtures under a parent the fixtures name
uniquely, journaled as kind ``cgroup-tree``.  :func:`kill_cgroup_tree` ends
exactly those processes (pause and container processes that a SIGKILLed run
left behind, whose shims are gone) and removes the cgroups, deepest first.

Importing this module teaches the journal the ``cgroup-tree`` kind (the one
place it is registered), so that a killed run's trees are reaped at the next
session start and by ``runtimefaults cleanup``.

Example::

    parent = "/" + naming.unique_name("rfpodcg")
    ...                                  # podman run --cgroup-parent parent ...
    killed = kill_cgroup_tree(parent)    # PIDs that had to be killed
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from pytest_runtimefaults.core.log import swallowed
from pytest_runtimefaults.journal import register_reaper

__all__ = ["CGROUP_ROOT", "kill_cgroup_tree"]

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_dirs(parent: str) -> list[Path]:
    """*parent* (``/rfpodXYZ``) in every mounted hierarchy (v1 controllers, cgroup2)."""
    rel = parent.strip("/")
    out = []
    with swallowed(OSError, "listing the hierarchies under %s", CGROUP_ROOT):
        for hierarchy in sorted(CGROUP_ROOT.iterdir()):
            if hierarchy.is_dir() and not hierarchy.is_symlink():
                out.append(hierarchy / rel)
    if (CGROUP_ROOT / "cgroup.controllers").exists():  # a pure cgroup2 host
        out.append(CGROUP_ROOT / rel)
    return [d for d in out if d.is_dir()]


def _pids(roots: list[Path]) -> set[int]:
    pids: set[int] = set()
    for root in roots:
        for procs in root.rglob("cgroup.procs"):
            # A cgroup removed between the walk and the read has no processes left.
            with swallowed((OSError, ValueError), "reading %s", procs):
                pids.update(int(x) for x in procs.read_text().split())
    pids.discard(os.getpid())
    return pids


def kill_cgroup_tree(parent: str, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process under cgroup *parent* in every hierarchy, wait for
    them to go, remove the cgroups (deepest first).  Returns the PIDs killed.

    The runtimes under test put containers under a cgroup parent that the
    fixtures name uniquely (``--cgroup-parent``, CRI ``cgroup_parent``), so
    this ends exactly their processes.
    """
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        pids = _pids(_cgroup_dirs(parent))
        if not pids or time.monotonic() > deadline:
            break
        for pid in pids:
            with swallowed(ProcessLookupError, "killing %d (already gone)", pid):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.05)
    for root in _cgroup_dirs(parent):
        subs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for sub in [*subs, root]:
            with swallowed(OSError, "removing the cgroup %s", sub):
                sub.rmdir()
    return sorted(set(killed))


def _reap_cgroup_tree(record: dict[str, Any]) -> None:
    kill_cgroup_tree(str(record["parent"]))


register_reaper("cgroup-tree", _reap_cgroup_tree)
