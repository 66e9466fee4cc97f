"""The sandbox's cgroups: the host's cgroup mounts, thawing, and the journal's reaper.

* :func:`cgroup_mounts` and :func:`host_cgroup_state` read the mount table
  through :mod:`pytest_runtimefaults.host.mounts` (the project's one
  mountinfo parser), as the facts the sandbox needs: which hierarchies to
  make its cgroups on, and whether the host's mounts are what they were;
* :func:`thaw` thaws what a killed runc left frozen (a frozen process does not
  die of SIGKILL);
* :func:`_reap_sandbox_cgroups` is the journal's reaper of the kind
  :data:`SANDBOX_CGROUPS`, named in :data:`pytest_runtimefaults.journal.REAPERS`
  (resolved when such a record is reaped; nothing registers it at import).

Example::

    before = host_cgroup_state()
    ...  # boot and stop a sandbox
    assert host_cgroup_state() == before
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_runtimefaults.core.log import swallowed
from pytest_runtimefaults.host import cgroups as host_cgroups
from pytest_runtimefaults.host import proc
from pytest_runtimefaults.host.mounts import mount_table
from pytest_runtimefaults.systemd.errors import SandboxError

__all__ = [
    "SANDBOX_CGROUPS",
    "CgroupMount",
    "cgroup_mounts",
    "host_cgroup_state",
    "thaw",
]

SANDBOX_CGROUPS = "systemd-sandbox-cgroups"  # the journal kind of a sandbox's cgroups
_PREFIX = "rfsd"  # every sandbox's name (naming.unique_name("rfsd")) starts so


@dataclass(frozen=True)
class CgroupMount:
    """One cgroup filesystem mount from ``/proc/self/mountinfo``."""

    mount_point: str
    fstype: str  # "cgroup" or "cgroup2"
    options: str  # super options without rw/ro, e.g. "cpu" or "name=systemd"
    mount_options: str  # per-mount options, "rw,nosuid,..."

    @property
    def readonly(self) -> bool:
        return "ro" in self.mount_options.split(",")

    @property
    def name(self) -> str:
        """How ``/proc/PID/cgroup`` names this hierarchy (``cpu``, ``name=systemd``, ``""``)."""
        return "" if self.fstype == "cgroup2" else self.options


def cgroup_mounts(pid: int | str = "self") -> list[CgroupMount]:
    """The cgroup and cgroup2 mounts seen by *pid* (default: this process)."""
    mounts: list[CgroupMount] = []
    for entry in mount_table(pid):
        if entry.fstype not in ("cgroup", "cgroup2"):
            continue
        opts = [o for o in entry.super_options if o not in ("rw", "ro")]
        mounts.append(
            CgroupMount(entry.target, entry.fstype, ",".join(opts), ",".join(entry.mount_options))
        )
    return mounts


def host_cgroup_state() -> list[str]:
    """Every mount under ``/sys/fs/cgroup`` with its mount and superblock options.

    Compare before and after a sandbox: equal lists mean no cgroup mount was
    added, removed or remounted (read-only) on the host.
    """
    return sorted(
        " ".join(
            [
                m.target,
                ",".join(m.mount_options),
                m.fstype,
                m.source,
                ",".join(m.super_options),
            ]
        )
        for m in mount_table()
        if m.target == "/sys/fs/cgroup" or m.target.startswith("/sys/fs/cgroup/")
    )


def _own_cgroups() -> dict[str, str]:
    """Hierarchy name -> this process's cgroup path, from ``/proc/self/cgroup``.

    Not :func:`pytest_runtimefaults.host.proc.cgroups`: that gives the paths
    alone, and the sandbox needs to know which hierarchy each belongs to.
    """
    out: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            out[names] = path
    return out


def thaw(roots: Iterable[Path | str]) -> list[str]:
    """Thaw every frozen cgroup under *roots* (v1 ``freezer.state``, v2 ``cgroup.freeze``).

    A frozen process does not die of SIGKILL until thawed.  Returns the cgroups thawed.
    """
    thawed: list[str] = []
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        for knob, frozen, value in (
            ("freezer.state", ("FROZEN", "FREEZING"), "THAWED"),
            ("cgroup.freeze", ("1",), "0"),
        ):
            for path in root.rglob(knob):
                # A cgroup removed meanwhile (its tasks died) needs no thawing.
                with swallowed(OSError, "thawing %s", path):
                    if path.read_text().strip() in frozen:
                        path.write_text(value)
                        thawed.append(str(path.parent))
    return thawed


def _sandbox_cgroup_ok(path: str) -> bool:
    """A journaled sandbox cgroup may be reaped: an ``rfsd*`` directory below a cgroup mount."""
    return (
        isinstance(path, str)
        and os.path.basename(path).startswith(_PREFIX)
        and host_cgroups.is_below_cgroup_mount(path)
    )


def _kill_tasks(roots: list[Path], timeout: float) -> None:
    """SIGKILL every task in *roots* (thawing them first) until none is left or *timeout*."""
    spared = proc.ancestors()
    deadline = time.monotonic() + timeout
    while True:
        # Thawed on every round: a frozen task would outlive its SIGKILL.
        thaw(roots)
        pids = host_cgroups.tasks(roots) - spared
        for pid in pids:
            with swallowed(ProcessLookupError, "killing %d", pid):
                os.kill(pid, signal.SIGKILL)
        if not pids or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def _reap_sandbox_cgroups(record: dict[str, Any]) -> None:
    """Journal reaper: kill what is left in a dead sandbox's cgroups, then remove them.

    The sandbox's systemd and launcher are journaled as processes and killed
    first (newest first); whatever still lives in its cgroups (a process that
    joined them from the host, ``nsenter``'s waiting parent) is the sandbox's
    by construction, and is killed here.  Only ``rfsd*`` directories under a
    cgroup mount are touched.
    """
    paths = [p for p in record.get("cgroups", []) if _sandbox_cgroup_ok(p)]
    refused = [p for p in record.get("cgroups", []) if p not in paths]
    _kill_tasks([Path(p) for p in paths], timeout=10)
    left = [p for p in paths if not host_cgroups.remove_tree(Path(p), timeout=10)]
    if left or refused:
        raise SandboxError(
            (f"cgroups still busy: {left}" if left else "")
            + (f"; not sandbox cgroups, left alone: {refused}" if refused else "")
        )
