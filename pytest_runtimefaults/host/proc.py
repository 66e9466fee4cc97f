"""Facts about processes, through psutil: start time, children, status, command line.

Five modules used to parse ``/proc/PID/stat`` by hand (the command name may
hold spaces and parentheses, so each had its own ``rindex(b")")``); psutil
does it once, and is maintained for every kernel's quirks.  What psutil does
not offer is added here in a few lines: the start time in clock ticks (the
unit the journal has always recorded, so journals written by older versions
still name the same processes), the session id (:func:`os.getsid`) and the
cgroup membership (``/proc/PID/cgroup``, two lines of parsing).

A process that vanishes between two questions is normal on a busy host:
every function here answers "gone" (``None``, ``False``, an empty list) rather
than raising.

Example::

    from pytest_runtimefaults.host import proc

    start = proc.starttime(pid)          # None once it is gone
    if proc.alive(pid):                  # exists and is not a zombie
        print(proc.comm(pid), proc.children(pid, recursive=True))
"""

from __future__ import annotations

import os

import psutil

__all__ = [
    "alive",
    "ancestors",
    "cgroups",
    "children",
    "cmdline",
    "comm",
    "exe",
    "pids",
    "pids_with_arg",
    "session_members",
    "starttime",
    "status",
]

_CLK_TCK = os.sysconf("SC_CLK_TCK")
# psutil raises these for a process that is gone or that we may not inspect.
_GONE = (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError, PermissionError)


def starttime(pid: int) -> int | None:
    """The start time of *pid* in clock ticks since boot (field 22 of ``/proc/PID/stat``).

    ``None`` once the process is gone.  Together with the PID it names a
    process uniquely: a recycled PID has another start time.
    """
    try:
        created = psutil.Process(pid).create_time()
    except _GONE:
        return None
    # psutil computes created = ticks / CLK_TCK + boot_time; undo it exactly.
    return round((created - psutil.boot_time()) * _CLK_TCK)


def status(pid: int) -> str | None:
    """psutil's status of *pid* (``"running"``, ``"sleeping"``, ``"zombie"``...), or None."""
    try:
        return str(psutil.Process(pid).status())
    except _GONE:
        return None


def alive(pid: int) -> bool:
    """True if *pid* exists and is not a zombie (exited, its parent not yet waiting)."""
    state = status(pid)
    return state is not None and state != psutil.STATUS_ZOMBIE


def comm(pid: int) -> str:
    """The command name of *pid* (``/proc/PID/comm``), or ``"?"`` once it is gone."""
    try:
        return str(psutil.Process(pid).name())
    except _GONE:
        return "?"


def exe(pid: int) -> str | None:
    """The executable of *pid* (without `` (deleted)``), or None (gone, kernel thread, zombie)."""
    try:
        path = str(psutil.Process(pid).exe())
    except (*_GONE, psutil.ZombieProcess):
        return None
    return path.removesuffix(" (deleted)") or None


def cmdline(pid: int) -> list[str] | None:
    """The argument vector of *pid*, or None once it is gone (``[]`` for a kernel thread)."""
    try:
        return [str(a) for a in psutil.Process(pid).cmdline()]
    except (*_GONE, psutil.ZombieProcess):
        return None


def pids() -> list[int]:
    """Every PID on the host (in this PID namespace)."""
    return [int(p) for p in psutil.pids()]


def children(pid: int, *, recursive: bool = False, include_zombies: bool = True) -> list[int]:
    """The children of *pid* (of all its threads), or all its descendants with *recursive*."""
    try:
        found = psutil.Process(pid).children(recursive=recursive)
    except _GONE:
        return []
    out = []
    for child in found:
        if not include_zombies:
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
            except _GONE:
                continue  # gone meanwhile: as good as reaped
        out.append(int(child.pid))
    return out


def ancestors(pid: int | None = None) -> set[int]:
    """*pid* (default: this process) and all its ancestors, up to PID 1 (included)."""
    pid = os.getpid() if pid is None else pid
    found = {pid, 1}
    try:
        found.update(int(p.pid) for p in psutil.Process(pid).parents())
    except _GONE:
        pass  # nothing more to add: the caller's own set still holds pid and 1
    return found


def session_members(sid: int, not_before: int | None = None) -> list[int]:
    """PIDs whose session id is *sid* and (with *not_before*) which started at or after it."""
    out = []
    for pid in pids():
        try:
            if os.getsid(pid) != sid:
                continue
        except OSError:
            continue
        if not_before is not None:
            start = starttime(pid)
            if start is None or start < not_before:
                continue
        out.append(pid)
    return out


def pids_with_arg(needle: str, *, exclude_self: bool = True) -> list[int]:
    """PIDs with *needle* somewhere in their command line (a unique private path)."""
    me = os.getpid()
    out = []
    for pid in pids():
        if exclude_self and pid == me:
            continue
        argv = cmdline(pid)
        if argv and needle in "\0".join(argv):
            out.append(pid)
    return out


def cgroups(pid: int | str = "self") -> list[str]:
    """The cgroup paths of *pid*, one per hierarchy (``/proc/PID/cgroup``'s third field)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return [line.rstrip("\n").split(":", 2)[2] for line in f if line.count(":") >= 2]
    except OSError:
        return []
