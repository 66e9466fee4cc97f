"""The launcher: the shell scripts that build the sandbox's namespaces and exec systemd.

Two scripts, both plain text built here from facts the sandbox gathers
(pure functions: no file is read and no process started in this module):

* :func:`launcher_script`, run by the host: it moves itself into the
  sandbox's cgroups (``echo $$ > cgroup.procs``), so the new cgroup
  namespace's root is a directory the sandbox owns, then execs ``unshare``
  (:func:`unshare_argv`) into new PID, mount and cgroup namespaces;
* :func:`inner_script`, PID 1 of those namespaces: the guard's first part
  (a cgroup namespace other than the host's), a private ``/run``, the
  console pty on ``/dev/console``, fresh cgroup mounts
  (:func:`cgroup_mount_lines`), the guard's second part (:data:`GUARD_AWK`
  over ``/proc/self/mountinfo``), a wait for the host's go, and ``exec``
  systemd.

The guard refuses (exit status :data:`REFUSED`) rather than let systemd touch
a cgroup mount the host shares: a systemd that shared the host's
``/sys/fs/cgroup`` tmpfs once remounted it read-only for the whole machine.

Example::

    script = inner_script(
        layout="unified", workdir=workdir, console="/dev/pts/7",
        mount_lines=cgroup_mount_lines("unified", cgroup_mounts()),
        host_dev="0:27", host_cgroupns="cgroup:[4026531835]",
    )
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path

from pytest_runtimefaults.systemd.cgroups import CgroupMount
from pytest_runtimefaults.systemd.units import SYSTEMD, TARGET

__all__ = [
    "GUARD_AWK",
    "LAUNCHER_ENV",
    "NO_GO",
    "REFUSED",
    "cgroup_mount_lines",
    "inner_script",
    "launcher_script",
    "unshare_argv",
]

REFUSED = 97  # the launcher's exit status when the guard refuses to start systemd
NO_GO = 98  # its exit status when the host closed its stdin without saying "go"
LAUNCHER_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

# The guard, run by awk over /proc/self/mountinfo inside the new namespaces just
# before systemd would start.  It prints why it refuses, or nothing.  Fields:
# $3 major:minor, $4 the mount's root within its filesystem (for cgroup
# filesystems: relative to the reader's cgroup namespace root), $5 the mount
# point; the filesystem type follows the "-" separator.
GUARD_AWK = r"""
{
    for (i = 7; i <= NF && $i != "-"; i++) ;
    fs = $(i + 1); root = $4; mp = $5
    under = (mp == "/sys/fs/cgroup" || index(mp, "/sys/fs/cgroup/") == 1)
    if (mp == "/sys/fs/cgroup") { topfs = fs; topdev = $3 }
    if (under && (fs == "cgroup" || fs == "cgroup2") && root != "/")
        bad = bad " " mp " (" fs ", root " root ")"
}
END {
    if (bad != "")
        print "the host's cgroup hierarchy is still mounted:" bad
    else if (layout == "unified" && topfs != "cgroup2")
        print "/sys/fs/cgroup is " (topfs == "" ? "not mounted" : topfs) ", not a fresh cgroup2"
    else if (layout != "unified" && (topfs != "tmpfs" || topdev == hostdev))
        print "/sys/fs/cgroup is still the host one (" topfs " " topdev ")"
}
"""

# systemd chooses its layout from its command line (in a container: the env
# SYSTEMD_PROC_CMDLINE); without it, it would add cgroup2 to a "legacy" sandbox.
_CMDLINE = {
    "unified": "systemd.unified_cgroup_hierarchy=1",
    "hybrid": "systemd.unified_cgroup_hierarchy=0",
    "legacy": "systemd.unified_cgroup_hierarchy=0 systemd.legacy_systemd_cgroup_controller=1",
}
_REFUSE = f'echo "runtimefaults: refusing to start systemd: $why" >&2; exit {REFUSED}'
_FLAGS = "nosuid,nodev,noexec"


def unshare_argv() -> list[str]:
    """``unshare`` into new cgroup, PID and mount namespaces, with a private propagation."""
    # --kill-child: should the launcher be killed (a reaper, a crash), PID 1
    # gets SIGKILL, and with it the whole PID namespace.
    return [
        "unshare",
        "--cgroup",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount",
        "--mount-proc",
        "--propagation",
        "private",
    ]


def launcher_script(procs_files: Iterable[str], unshare: Sequence[str], inner: Path) -> str:
    """The host side: join the sandbox's cgroups (*procs_files*), then unshare and run *inner*."""
    join = "; ".join(f"echo $$ > {shlex.quote(p)}" for p in procs_files)
    return f"{join}; exec {' '.join(unshare)} /bin/sh {shlex.quote(str(inner))}"


def cgroup_mount_lines(layout: str, host_mounts: Iterable[CgroupMount]) -> list[str]:
    """Fresh cgroup mounts for *layout*, after ``umount -R /sys/fs/cgroup``.

    A v1 layout gets a tmpfs with one fresh mount per v1 hierarchy of the host
    (*host_mounts*: the same controllers, each a mount of its own).
    """
    if layout == "unified":
        return [f"mount -t cgroup2 -o {_FLAGS} cgroup2 /sys/fs/cgroup"]
    lines = [f"mount -t tmpfs -o mode=755,{_FLAGS} cgroupfs /sys/fs/cgroup"]
    for m in host_mounts:
        if m.fstype == "cgroup2":
            continue
        sub = "/sys/fs/cgroup/" + os.path.basename(m.mount_point)
        opts = m.options if not m.options.startswith("name=") else "none," + m.options
        lines.append(f"mkdir -p {sub}")
        lines.append(f"mount -t cgroup -o {_FLAGS},{opts} cgroup {sub}")
    if layout == "hybrid":
        lines.append("mkdir -p /sys/fs/cgroup/unified")
        lines.append(f"mount -t cgroup2 -o {_FLAGS} cgroup2 /sys/fs/cgroup/unified")
    return lines


def _namespace_guard(host_cgroupns: str) -> list[str]:
    # The guard that keeps the host safe, part 1, before any mount: a cgroup
    # namespace of its own.  In the host's, a fresh cgroup mount would be
    # rooted at the host's root (and show "/" too), and a cgroup2 mount's
    # options (nsdelegate, memory_recursiveprot...) would apply to the whole machine.
    return [
        f'if [ "$(readlink /proc/self/ns/cgroup)" = {shlex.quote(host_cgroupns)} ]; then',
        "  why='its cgroup namespace is the host one'",
        f"  {_REFUSE}",
        "fi",
    ]


def _private_mounts(console: str, mount_lines: Sequence[str]) -> list[str]:
    return [
        "mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run",
        "mkdir -p /run/dbus",
        # PID 1 logs to /dev/console: make that the sandbox's pty, not the machine's.
        f"mount --bind {shlex.quote(console)} /dev/console",
        "umount -R /sys/fs/cgroup",
        *mount_lines,
    ]


def _mount_guard(layout: str, host_dev: str, guard: Path) -> list[str]:
    # Part 2: every cgroup mount is fresh (GUARD_AWK).
    return [
        f"why=$(awk -v layout={layout} -v hostdev={host_dev} "
        f"-f {shlex.quote(str(guard))} /proc/self/mountinfo)",
        f'if [ -n "$why" ]; then {_REFUSE}; fi',
    ]


def _wait_for_go() -> list[str]:
    # On cgroup v2 the launcher must leave the sandbox's root cgroup before
    # systemd starts; the host says "go" once it has moved it out.
    return [
        'if ! read -r go || [ "$go" != go ]; then',
        "  echo 'runtimefaults: the launcher gave no go; not starting systemd' >&2",
        f"  exit {NO_GO}",
        "fi",
    ]


def _exec_systemd(layout: str, workdir: Path, systemd: str, log_level: str) -> str:
    return (
        "exec env -i container=other PATH=/usr/sbin:/usr/bin:/sbin:/bin"
        " SYSTEMD_COLORS=0 SYSTEMD_LOG_COLOR=0"
        f" SYSTEMD_PROC_CMDLINE={shlex.quote(_CMDLINE[layout])}"
        f" SYSTEMD_UNIT_PATH={workdir / 'units'}"
        f" SYSTEMD_GENERATOR_PATH={workdir / 'generators'}"
        f" SYSTEMD_ENVIRONMENT_GENERATOR_PATH={workdir / 'generators'}"
        f" {systemd} --system --unit={TARGET} --log-target=console"
        f" --log-level={log_level} --show-status=no </dev/null"
    )


def inner_script(
    *,
    layout: str,
    workdir: Path,
    console: str,
    mount_lines: Sequence[str],
    host_dev: str,
    host_cgroupns: str,
    systemd: str = SYSTEMD,
    log_level: str = "notice",
) -> str:
    """The shell that runs as PID 1 of the new namespaces, then execs systemd.

    *console* is bound on ``/dev/console``; *mount_lines* rebuild
    ``/sys/fs/cgroup``; *host_dev* (``major:minor`` of the host's
    ``/sys/fs/cgroup``) and *host_cgroupns* (``readlink /proc/self/ns/cgroup``
    on the host) are what the guard compares with; ``workdir/guard.awk`` must
    hold :data:`GUARD_AWK`.
    """
    lines = [
        "set -eu",
        *_namespace_guard(host_cgroupns),
        *_private_mounts(console, mount_lines),
        *_mount_guard(layout, host_dev, workdir / "guard.awk"),
        *_wait_for_go(),
        _exec_systemd(layout, workdir, systemd, log_level),
    ]
    return "\n".join(lines) + "\n"
