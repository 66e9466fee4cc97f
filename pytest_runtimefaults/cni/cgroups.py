"""Ending every process under a uniquely named cgroup parent, and removing it.

podman (``--cgroup-parent``) and containerd's CRI (``cgroup_parent``) put the
containers and pods of the CNI fixtures under a parent the fixtures name
uniquely, journaled as kind ``cgroup-tree``.  :func:`kill_cgroup_tree` ends
exactly those processes (pause and container processes that a SIGKILLed run
left behind, whose shims are gone) and removes the cgroups, deepest first.

The journal's reaper table (``journal.REAPERS``) names :func:`_reap_cgroup_tree`
for the ``cgroup-tree`` kind, so a killed run's trees are reaped at the next
session start and by ``runtimefaults cleanup`` without importing this module first.

Example::

    parent = "/" + naming.unique_name("rfpodcg")
    ...                                  # podman run --cgroup-parent parent ...
    killed = kill_cgroup_tree(parent)    # PIDs that had to be killed
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytest_runtimefaults.core.log import swallowed
from pytest_runtimefaults.host import cgroups

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


def kill_cgroup_tree(parent: str, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process under cgroup *parent* in every hierarchy, wait for
    them to go, remove the cgroups (deepest first).  Returns the PIDs killed.

    The runtimes under test put containers under a cgroup parent that the
    fixtures name uniquely (``--cgroup-parent``, CRI ``cgroup_parent``), so
    this ends exactly their processes (never this process or its ancestors:
    :func:`pytest_runtimefaults.host.cgroups.kill_tree`).
    """
    killed = cgroups.kill_tree(_cgroup_dirs(parent), timeout=timeout)
    for root in _cgroup_dirs(parent):
        cgroups.remove_tree(root)
    return killed


def _reap_cgroup_tree(record: dict[str, Any]) -> None:
    """The journal's reaper of kind ``cgroup-tree`` (see ``journal.REAPERS``)."""
    kill_cgroup_tree(str(record["parent"]))
