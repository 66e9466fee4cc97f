"""Snapshots of host state, for leak checks.

A leak check compares two snapshots of some host state, one taken before a
test and one after: whatever appears only in the second one was left behind.
Each function here returns a ``set[str]`` naming resources so that it can be
handed straight to :meth:`FaultRegistry.add_leak_check
<pytest_runtimefaults.faults.FaultRegistry.add_leak_check>`; they read
``/proc`` (through psutil, :mod:`pytest_runtimefaults.host.proc`) and ``/sys``
directly (no subprocess), so a snapshot costs a few milliseconds and can be
polled while a runtime settles.  :func:`open_fds` reads ``/proc/PID/fd``
itself: psutil lists only regular files (``open_files``) or counts
(``num_fds``), and a leak check needs every target (``socket:[inode]``...).

Example::

    from functools import partial
    from pytest_runtimefaults import leaks

    registry.add_leak_check("processes:runc", partial(leaks.processes_by_exe, "runc"))
    registry.add_leak_check("fds:containerd", partial(leaks.open_fds, daemon.pid))
    registry.add_leak_check("sockets", partial(leaks.socket_files, state_dir))

Leak-check names follow ``kind`` or ``kind:detail``, where kind is one of
:data:`LEAK_KINDS`; ``--runtimefaults-leak-checks`` switches them by kind or by
full name.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pytest_runtimefaults.host import proc as host_proc

# The mount table moved to host.mounts; re-exported here, where it was.
from pytest_runtimefaults.host.mounts import MountEntry, mount_table

__all__ = [
    "LEAK_KINDS",
    "MountEntry",
    "child_processes",
    "descendant_processes",
    "links",
    "mount_table",
    "mounts",
    "netns_names",
    "open_fds",
    "processes_by_exe",
    "processes_with_arg",
    "socket_files",
    "systemd_units",
]

#: The standard kinds of leak check (the part of a check's name before ``:``).
LEAK_KINDS = (
    "processes",
    "units",
    "mounts",
    "netns",
    "links",
    "sockets",
    "fds",
    "addresses",
    "ipam",
)

NETNS_DIR = Path("/run/netns")


def mounts(under: str | os.PathLike[str] = "/", pid: int | str = "self") -> set[str]:
    """Mount points at or below *under*, as ``"target fstype ro|rw"``.

    Including the ro/rw state means that a mount remounted read-only shows up
    as a change, which is how a systemd sharing the host's ``/sys/fs/cgroup``
    damages a machine.
    """
    base = os.path.normpath(os.fspath(under))
    prefix = base.rstrip("/") + "/"
    return {
        f"{m.target} {m.fstype} {'ro' if m.readonly else 'rw'}"
        for m in mount_table(pid)
        if m.target == base or m.target.startswith(prefix) or base == "/"
    }


def _zombie(pid: int | str) -> bool:
    """True for a zombie, and for a process that is gone (as good as reaped)."""
    return not host_proc.alive(int(pid))


def child_processes(pid: int, *, include_zombies: bool = False) -> set[str]:
    """Direct children of *pid*, as ``"PID COMM"`` (all its threads' children).

    Zombies (exited, not yet waited for) are left out unless asked for: they
    hold no resources but a PID, and a parent that waits late is not a leak.
    """
    return {
        f"{child} {_comm(child)}"
        for child in host_proc.children(pid, include_zombies=include_zombies)
    }


def descendant_processes(pid: int) -> set[str]:
    """Children of *pid*, their children and so on, as ``"PID COMM"``."""
    found: set[str] = set()
    todo = [pid]
    while todo:
        for entry in child_processes(todo.pop()):
            if entry not in found:
                found.add(entry)
                todo.append(int(entry.split(" ", 1)[0]))
    return found


def _comm(pid: int) -> str:
    return host_proc.comm(pid)


def processes_by_exe(name: str, *, include_zombies: bool = False) -> set[str]:
    """Processes whose executable's base name (or full path) is *name*, as ``"PID NAME"``.

    A process whose ``exe`` link cannot be read (a zombie, a kernel thread) is
    matched by its ``comm``; zombies are left out unless asked for.
    """
    found: set[str] = set()
    for pid in host_proc.pids():
        exe = host_proc.exe(pid) or _comm(pid)
        if (exe == name or os.path.basename(exe) == name) and (include_zombies or not _zombie(pid)):
            found.add(f"{pid} {name}")
    return found


def processes_with_arg(text: str, *, include_zombies: bool = False) -> set[str]:
    """Processes with *text* in their command line, as ``"PID ARGV0"``.

    Host-wide checks such as :func:`processes_by_exe` see every pytest-xdist
    worker's runc; matching a string only this test uses (the runtime's
    unique ``--root``, a container id, a socket path) keeps the check to the
    test's own processes.
    """
    found: set[str] = set()
    for pid in host_proc.pids_with_arg(text):
        if include_zombies or not _zombie(pid):
            argv = host_proc.cmdline(pid) or [""]
            found.add(f"{pid} {os.path.basename(argv[0])}")
    return found


def netns_names() -> set[str]:
    """Named network namespaces (what ``ip netns list`` shows)."""
    try:
        return set(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return set()


def links(netns: str | None = None) -> set[str]:
    """Network interfaces of this process's network namespace (or of *netns*).

    Reading ``/sys/class/net`` is instantaneous; another namespace needs
    ``ip -n NETNS`` (a subprocess).
    """
    if netns is None:
        return set(os.listdir("/sys/class/net"))
    import subprocess

    out = subprocess.run(
        ["ip", "-n", netns, "-o", "link", "show"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines() if ": " in line}


def socket_files(directory: str | os.PathLike[str]) -> set[str]:
    """Unix socket files at any depth below *directory* (does not follow symlinks)."""
    found: set[str] = set()
    for root, dirs, files in os.walk(directory):
        for name in files + dirs:
            path = os.path.join(root, name)
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    found.add(path)
            except OSError:
                continue
    return found


def open_fds(pid: int) -> set[str]:
    """Open file descriptors of *pid*, as ``"FD -> TARGET"`` (``socket:[inode]``...).

    Raises ``ProcessLookupError`` if the process is gone: a daemon that died is
    not a leak-free daemon.
    """
    base = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(base)
    except FileNotFoundError:
        raise ProcessLookupError(f"process {pid} is gone")
    found: set[str] = set()
    for fd in fds:
        try:
            found.add(f"{fd} -> {os.readlink(f'{base}/{fd}')}")
        except OSError:
            continue  # closed between listdir and readlink
    return found


def systemd_units(
    cgroup_root: str | os.PathLike[str],
    suffixes: tuple[str, ...] = (".scope", ".slice", ".service"),
) -> set[str]:
    """Transient units as seen in a cgroup tree: directories ending in a unit suffix.

    *cgroup_root* is the ``name=systemd`` (or unified) hierarchy of the systemd
    under test, e.g. ``/proc/PID/root/sys/fs/cgroup/systemd`` for a systemd in
    its own namespaces.  Returned relative to *cgroup_root*.
    """
    root = os.fspath(cgroup_root)
    found: set[str] = set()
    for dirpath, dirs, _files in os.walk(root):
        for d in dirs:
            if d.endswith(suffixes):
                found.add(os.path.relpath(os.path.join(dirpath, d), root))
    return found
