"""A real systemd for every test, and pystemd-based inspection of what runtimes leave.

Incident 2 (FAULTS.md) is about systemd as the cgroup manager of runc and crun.
CI machines and laptops often do not run systemd as PID 1, and a test must never
touch the host's systemd anyway, so :class:`SystemdSandbox` boots the real
``/lib/systemd/systemd`` as PID 1 of its own PID, mount and cgroup namespaces:

* the launcher first moves into a fresh cgroup of its own on every hierarchy
  (journaled, removed on stop), so the cgroup namespace's root is a directory
  the sandbox owns and systemd's ``init.scope``/``system.slice`` land there;
* inside its mount namespace (private propagation) ``/run`` is a new tmpfs,
  ``/sys/fs/cgroup`` is unmounted and rebuilt from **fresh** mounts.  This
  matters: a systemd that shared the host's ``/sys/fs/cgroup`` tmpfs once
  remounted it read-only for the whole machine, because a remount changes the
  superblock, which every mount namespace shares.  The launcher refuses to
  exec systemd if ``/sys/fs/cgroup`` is still the host's filesystem;
* a unit directory of empty stub targets, a ``dbus.socket`` and a
  ``dbus.service`` (its own dbus-daemon) is all systemd loads: it is on
  ``running`` in a fraction of a second.

The bus is reachable from the host as ``unix:path=/proc/PID/root/run/dbus/
system_bus_socket`` (:attr:`SystemdSandbox.bus_address`).  Programs that pass
PIDs to systemd (a runtime creating a scope) must run inside the sandbox's
namespaces: :meth:`SystemdSandbox.command` prefixes ``nsenter``.

Layouts (``layout=``, or ``--runtimefaults-cgroup-layout``): ``"hybrid"``
mounts every v1 controller, ``name=systemd`` and cgroup2 at ``unified``;
``"legacy"`` leaves cgroup2 out (crun refuses a hybrid layout whose cgroup2
still holds a controller); ``"unified"`` mounts a pure cgroup2 at
``/sys/fs/cgroup``, on a cgroup v2 host and on a v1 or hybrid one alike (it then
has the controllers the host leaves to cgroup2: none on this project's hybrid
machine, where every controller but hugetlb is bound to v1).  ``"auto"`` is the
host's own layout.  :func:`sandbox_controllers` says which controllers a layout
gets before booting; :attr:`SystemdSandbox.controllers` what it got.

The guard before systemd starts checks, inside the new namespaces, that the
cgroup namespace is not the host's, that every cgroup mount under
``/sys/fs/cgroup`` is rooted at ``/`` (a fresh mount in a new cgroup namespace
is; a copy or bind of the host's shows ``/..``), and, for v1 layouts, that
``/sys/fs/cgroup`` is a tmpfs other than the host's.  Device numbers alone
cannot tell: cgroup2 (and each v1 hierarchy) is one superblock, so a fresh
mount has the host's ``st_dev``.

systemd's console is a pty whose master the sandbox drains into
``console.log``: with a file on ``/dev/console`` systemd gets ENOTTY, closes
it and says nothing, so a sandbox that fails to boot could not say why.

Inspection (:class:`SystemdInspector`) lists units over any bus address with
pystemd and finds what a runtime left behind: transient scopes, slices such as
``libcontainer_*_systemd_test_default.slice``, failed units.

Example::

    with SystemdSandbox() as sd:
        print(sd.bus_address, sd.boot_seconds)
        sd.run(["runc", "--systemd-cgroup", "run", "-b", bundle, "c1"])
        print(SystemdInspector(sd.bus_address).leftovers())
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_runtimefaults import caps
from pytest_runtimefaults.core.log import logger, swallowed
from pytest_runtimefaults.journal import Journal, process_starttime, register_reaper
from pytest_runtimefaults.naming import unique_name

__all__ = [
    "CgroupMount",
    "HostSystemd",
    "SandboxError",
    "SystemdInspector",
    "SystemdSandbox",
    "UnitInfo",
    "cgroup_mounts",
    "host_cgroup_state",
    "resolve_layout",
    "sandbox_controllers",
    "thaw",
]

SYSTEMD = "/lib/systemd/systemd"
# The layouts, and what each gets on this host, are host facts kept in caps (the
# capability ``sandbox-cgroup-controllers``); re-exported here.
LAYOUTS = caps.SANDBOX_LAYOUTS
resolve_layout = caps.resolve_layout
sandbox_controllers = caps.sandbox_controllers
REFUSED = 97  # the launcher's exit status when the guard refuses to start systemd
SANDBOX_CGROUPS = "systemd-sandbox-cgroups"  # the journal kind of a sandbox's cgroups
INNER_BUS_PATH = "/run/dbus/system_bus_socket"
TARGET = "runtimefaults-sandbox.target"
STUB_TARGETS = (
    "sysinit.target",
    "basic.target",
    "sockets.target",
    "slices.target",
    "paths.target",
    "timers.target",
    "local-fs.target",
    "remote-fs.target",
    "network.target",
    "network-online.target",
    "multi-user.target",
    "default.target",
    "shutdown.target",
    "umount.target",
    "final.target",
)
# A permissive system bus: the sandbox is private, root talks to it from the host.
DBUS_CONFIG = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow eavesdrop="true"/>
  </policy>
  <limit name="max_incoming_bytes">1000000000</limit>
  <limit name="max_outgoing_bytes">1000000000</limit>
  <limit name="max_message_size">100000000</limit>
</busconfig>
"""


class SandboxError(RuntimeError):
    """The sandbox could not boot, or stopping it left something behind."""


# --- cgroup mounts ----------------------------------------------------------


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


def _mountinfo(pid: int | str = "self") -> list[list[str]]:
    with open(f"/proc/{pid}/mountinfo") as f:
        return [line.split() for line in f]


def cgroup_mounts(pid: int | str = "self") -> list[CgroupMount]:
    """The cgroup and cgroup2 mounts seen by *pid* (default: this process)."""
    mounts: list[CgroupMount] = []
    for fields in _mountinfo(pid):
        sep = fields.index("-")
        fstype, super_opts = fields[sep + 1], fields[sep + 3]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        opts = [o for o in super_opts.split(",") if o not in ("rw", "ro")]
        mounts.append(CgroupMount(fields[4], fstype, ",".join(opts), fields[5]))
    return mounts


def host_cgroup_state() -> list[str]:
    """Every mount under ``/sys/fs/cgroup`` with its mount and superblock options.

    Compare before and after a sandbox: equal lists mean no cgroup mount was
    added, removed or remounted (read-only) on the host.
    """
    state = []
    for fields in _mountinfo():
        if fields[4] == "/sys/fs/cgroup" or fields[4].startswith("/sys/fs/cgroup/"):
            sep = fields.index("-")
            state.append(" ".join([fields[4], fields[5], *fields[sep + 1 : sep + 4]]))
    return sorted(state)


def _own_cgroups() -> dict[str, str]:
    """Hierarchy name -> this process's cgroup path, from ``/proc/self/cgroup``."""
    out: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            out[names] = path
    return out


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

_ANSI = re.compile(rb"\x1b(?:\[[0-9;?!]*[A-Za-z]|[()][0-9A-B]|[=>c])")


class _ConsoleDrain:
    """A pty for systemd's console; a thread copies what it writes into a file.

    systemd, as PID 1, writes its log to ``/dev/console`` and closes it if that
    is not a terminal (ENOTTY).  The sandbox binds the slave of this pty on
    ``/dev/console``; the master must be read all the time, or systemd blocks
    once the pty's buffer is full.
    """

    def __init__(self, path: Path) -> None:
        self.master, self.slave = os.openpty()
        self.slave_path = os.ttyname(self.slave)
        self._out = open(path, "ab")  # noqa: SIM115 - closed in close()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"console {path}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                stopping = self._stop.is_set()
                ready, _, _ = select.select([self.master], [], [], 0 if stopping else 0.1)
                if not ready:
                    if stopping:
                        return
                    continue
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: every slave end is closed
                    return
                if not data:
                    return
                # The tty turns "\n" into "\r\n"; colours and resets are noise in a file.
                self._out.write(_ANSI.sub(b"", data).replace(b"\r", b""))
                self._out.flush()
        except BaseException as exc:  # surfaced by close()
            self.error = exc

    def close(self) -> None:
        """Copy what is left, stop the thread, close the pty (idempotent)."""
        if self._out.closed:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        os.close(self.slave)
        os.close(self.master)
        self._out.close()
        if self._thread.is_alive():
            raise SandboxError("the console reader thread did not stop")
        if self.error is not None:
            raise SandboxError(f"the console reader thread failed: {self.error!r}")


# --- the sandbox --------------------------------------------------------------


class SystemdSandbox:
    """systemd 252+ as PID 1 of its own PID, mount and cgroup namespaces.

    A context manager; ``start()``/``stop()`` are idempotent.  Every resource is
    journaled, in *journal* or else the default one (:meth:`Journal.default`,
    the journal ``runtimefaults cleanup`` reads), so a sandbox whose owner was
    killed is reaped by the next pytest run or by ``runtimefaults cleanup``.

    Args:
        layout: ``"auto"`` (the host's layout), ``"hybrid"``, ``"legacy"``
            (cgroup v1 only) or ``"unified"`` (a pure cgroup2, on any host).
        boot_timeout: seconds to wait for systemd to reach ``running``.
        workdir_parent: where the work directory (units, bus config, log) goes;
            it must be visible inside the sandbox, so not under ``/run``.
        extra_units: file name -> content of more units to install.
        log_level: systemd's ``--log-level``.
    """

    def __init__(
        self,
        *,
        layout: str = "auto",
        boot_timeout: float = 15.0,
        journal: Journal | None = None,
        workdir_parent: str | os.PathLike[str] = "/tmp",
        extra_units: Mapping[str, str] | None = None,
        log_level: str = "notice",
        systemd: str = SYSTEMD,
    ) -> None:
        self.layout = resolve_layout(layout)
        self.boot_timeout = boot_timeout
        # Journaled by default: a library user's killed script must be reapable too.
        self.journal = journal if journal is not None else Journal.default()
        self.workdir_parent = Path(workdir_parent)
        self.extra_units = dict(extra_units or {})
        self.log_level = log_level
        self.systemd = systemd
        self.name = unique_name("rfsd")
        self.workdir: Path | None = None
        self.pid: int | None = None  # systemd, as the host sees it
        self.boot_seconds: float | None = None
        self.controllers: frozenset[str] = frozenset()
        """The cgroup controllers systemd can use in the sandbox (set at boot)."""
        self._launcher: subprocess.Popen[bytes] | None = None
        self._go: int | None = None  # the launcher's stdin: a line releases it to exec systemd
        self._console: _ConsoleDrain | None = None
        self._cgroup_dirs: list[Path] = []
        self._exec_procs: list[str] = []
        self._exec_mkdirs: list[str] = []
        self._tracking_dir: Path | None = None
        self._rids: list[int] = []
        self._log: Any = None

    # -- lifecycle

    def __enter__(self) -> SystemdSandbox:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._launcher is not None and self._launcher.poll() is None

    @property
    def bus_address(self) -> str:
        """The sandbox's system bus, as reachable from the host (and from inside)."""
        return f"unix:path={self.bus_path}"

    @property
    def bus_path(self) -> str:
        """A socket of the sandbox's dbus-daemon in its work directory (under /tmp)."""
        if self.workdir is None:
            raise SandboxError("the sandbox is not running")
        return str(self.workdir / "bus")

    @property
    def proc_bus_address(self) -> str:
        """The bus's usual socket, ``/run/dbus/system_bus_socket``, seen through /proc."""
        if self.pid is None:
            raise SandboxError("the sandbox is not running")
        return f"unix:path=/proc/{self.pid}/root{INNER_BUS_PATH}"

    inner_bus_address = f"unix:path={INNER_BUS_PATH}"
    """The bus as programs inside the sandbox see it (the default system bus there)."""

    private_run = True
    """``/run`` inside is the sandbox's own tmpfs: state kept there goes with it."""

    def _track(self, kind: str, **fields: Any) -> None:
        self._rids.append(self.journal.add(kind, **fields))

    def _track_process(self, pid: int) -> None:
        self._rids.append(self.journal.add_process(pid))

    def start(self) -> SystemdSandbox:
        if self._launcher is not None:
            return self
        if os.geteuid() != 0:
            raise SandboxError("the systemd sandbox needs root (namespaces, cgroups)")
        if not os.access(self.systemd, os.X_OK):
            raise SandboxError(f"{self.systemd} not found (apt-get install systemd)")
        t0 = time.monotonic()
        try:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=self.workdir_parent))
            self._track("path", path=str(self.workdir))
            self._write_files()
            procs_files = self._make_cgroups()
            self._spawn(procs_files)
            self._wait_booted(t0)
            self._make_exec_cgroups()
            self.controllers = self._read_controllers()
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - t0
        return self

    def _write_files(self) -> None:
        assert self.workdir is not None
        units = self.workdir / "units"
        units.mkdir()
        (self.workdir / "generators").mkdir()
        (self.workdir / "bus.conf").write_text(DBUS_CONFIG)
        stub = "[Unit]\nDefaultDependencies=no\n"
        for target in STUB_TARGETS:
            (units / target).write_text(stub)
        (units / TARGET).write_text(
            "[Unit]\nDescription=runtimefaults sandbox\nDefaultDependencies=no\n"
            "Wants=dbus.socket dbus.service\nAfter=dbus.socket dbus.service\n"
        )
        # A second listening socket in the work directory: the host reaches the
        # bus by a plain path (``/proc/PID/root/...`` would resolve, by realpath,
        # to the host's own /run/dbus/system_bus_socket and scare safety checks).
        (units / "dbus.socket").write_text(
            "[Unit]\nDefaultDependencies=no\n[Socket]\n"
            f"ListenStream={INNER_BUS_PATH}\nListenStream={self.workdir / 'bus'}\n"
            "SocketMode=0666\n"
        )
        dbus_daemon = shutil.which("dbus-daemon") or "/usr/bin/dbus-daemon"
        (units / "dbus.service").write_text(
            "[Unit]\nDefaultDependencies=no\nRequires=dbus.socket\nAfter=dbus.socket\n"
            "[Service]\nType=notify\nNotifyAccess=main\n"
            f"ExecStart={dbus_daemon} --config-file={self.workdir / 'bus.conf'} "
            "--address=systemd: --nofork --nopidfile --systemd-activation\n"
        )
        for name, content in self.extra_units.items():
            (units / name).write_text(content)
        (self.workdir / "console.log").touch()
        (self.workdir / "guard.awk").write_text(GUARD_AWK)

    def _inner_script(self) -> str:
        """The shell that runs as PID 1 of the new namespaces, then execs systemd.

        It checks its cgroup namespace, mounts, checks the mounts
        (:data:`GUARD_AWK`), waits for the host's go
        (a line on stdin: on cgroup v2 the launcher must leave the sandbox's
        root cgroup first), then execs systemd.
        """
        assert self.workdir is not None
        host_dev = os.stat("/sys/fs/cgroup").st_dev
        host_cgroupns = os.readlink("/proc/self/ns/cgroup")
        console = "/dev/console"
        refuse = f'echo "runtimefaults: refusing to start systemd: $why" >&2; exit {REFUSED}'
        lines = [
            "set -eu",
            # The guard that keeps the host safe, part 1, before any mount: a
            # cgroup namespace of its own.  In the host's, a fresh cgroup mount
            # would be rooted at the host's root (and show "/" too), and a
            # cgroup2 mount's options (nsdelegate, memory_recursiveprot...) would
            # apply to the whole machine.
            f'if [ "$(readlink /proc/self/ns/cgroup)" = {shlex.quote(host_cgroupns)} ]; then',
            "  why='its cgroup namespace is the host one'",
            f"  {refuse}",
            "fi",
            "mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run",
            "mkdir -p /run/dbus",
            # PID 1 logs to /dev/console: make that the sandbox's pty, not the machine's.
            f"mount --bind {shlex.quote(self._console_path())} {console}",
            "umount -R /sys/fs/cgroup",
            *self._cgroup_mount_lines(),
        ]
        # systemd chooses its layout from its command line (in a container: the
        # env below); without it, it would add cgroup2 to a "legacy" sandbox.
        cmdline = {
            "unified": "systemd.unified_cgroup_hierarchy=1",
            "hybrid": "systemd.unified_cgroup_hierarchy=0",
            "legacy": "systemd.unified_cgroup_hierarchy=0 "
            "systemd.legacy_systemd_cgroup_controller=1",
        }[self.layout]
        lines += [
            # Part 2: every cgroup mount is fresh (GUARD_AWK).
            f"why=$(awk -v layout={self.layout} -v hostdev={os.major(host_dev)}:"
            f"{os.minor(host_dev)} -f {shlex.quote(str(self.workdir / 'guard.awk'))} "
            "/proc/self/mountinfo)",
            f'if [ -n "$why" ]; then {refuse}; fi',
            'if ! read -r go || [ "$go" != go ]; then',
            "  echo 'runtimefaults: the launcher gave no go; not starting systemd' >&2",
            "  exit 98",
            "fi",
            "exec env -i container=other PATH=/usr/sbin:/usr/bin:/sbin:/bin"
            " SYSTEMD_COLORS=0 SYSTEMD_LOG_COLOR=0"
            f" SYSTEMD_PROC_CMDLINE={shlex.quote(cmdline)}"
            f" SYSTEMD_UNIT_PATH={self.workdir / 'units'}"
            f" SYSTEMD_GENERATOR_PATH={self.workdir / 'generators'}"
            f" SYSTEMD_ENVIRONMENT_GENERATOR_PATH={self.workdir / 'generators'}"
            f" {self.systemd} --system --unit={TARGET} --log-target=console"
            f" --log-level={self.log_level} --show-status=no </dev/null",
        ]
        return "\n".join(lines) + "\n"

    def _console_path(self) -> str:
        """What the launcher binds on ``/dev/console``: the pty's slave (or the log file)."""
        assert self.workdir is not None
        if self._console is not None:
            return self._console.slave_path
        return str(self.workdir / "console.log")

    def _cgroup_mount_lines(self) -> list[str]:
        """Fresh cgroup mounts for the layout, after ``umount -R /sys/fs/cgroup``."""
        flags = "nosuid,nodev,noexec"
        if self.layout == "unified":
            return [f"mount -t cgroup2 -o {flags} cgroup2 /sys/fs/cgroup"]
        lines = [f"mount -t tmpfs -o mode=755,{flags} cgroupfs /sys/fs/cgroup"]
        for m in cgroup_mounts():
            if m.fstype == "cgroup2":
                continue
            sub = "/sys/fs/cgroup/" + os.path.basename(m.mount_point)
            opts = m.options if not m.options.startswith("name=") else "none," + m.options
            lines.append(f"mkdir -p {sub}")
            lines.append(f"mount -t cgroup -o {flags},{opts} cgroup {sub}")
        if self.layout == "hybrid":
            lines.append("mkdir -p /sys/fs/cgroup/unified")
            lines.append(f"mount -t cgroup2 -o {flags} cgroup2 /sys/fs/cgroup/unified")
        return lines

    def _unshare_argv(self) -> list[str]:
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

    def _make_cgroups(self) -> list[str]:
        """Step 1: a cgroup of the sandbox's own on every hierarchy; its cgroup.procs files."""
        own = _own_cgroups()
        procs: list[str] = []
        planned: list[tuple[CgroupMount, Path]] = []
        for m in cgroup_mounts():
            rel = own.get(m.name)
            if rel is not None:
                planned.append((m, Path(m.mount_point + rel.rstrip("/")) / self.name))
        # Journaled before they exist; the reaper waits for the sandbox's processes to die.
        self._track(SANDBOX_CGROUPS, cgroups=[str(p) for _, p in planned])
        for m, path in planned:
            path.mkdir()
            self._cgroup_dirs.append(path)
            # systemd tracks every process in name=systemd (v1) or cgroup2 (v2).
            if m.name == "name=systemd" or (m.fstype == "cgroup2" and self.layout == "unified"):
                self._tracking_dir = path
            if "cpuset" in m.options.split(","):
                # A new cpuset cgroup starts empty: no task can join until it has CPUs and nodes.
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    (path / knob).write_text((path.parent / knob).read_text())
            procs.append(str(path / "cgroup.procs"))
        return procs

    def _spawn(self, procs_files: Sequence[str]) -> None:
        assert self.workdir is not None
        # Without a pty (no devpts), systemd's console is the bare file: it then
        # writes nothing, but the sandbox still boots.
        with swallowed(OSError, "opening a pty for systemd's console"):
            self._console = _ConsoleDrain(self.workdir / "console.log")
        # Written now: the script names the pty's slave.
        (self.workdir / "inner.sh").write_text(self._inner_script())
        join = "; ".join(f"echo $$ > {shlex.quote(p)}" for p in procs_files)
        unshare = " ".join(self._unshare_argv())
        script = f"{join}; exec {unshare} /bin/sh {shlex.quote(str(self.workdir / 'inner.sh'))}"
        self._log = open(self.workdir / "systemd.log", "wb")  # noqa: SIM115
        go_read, self._go = os.pipe()
        try:
            self._launcher = subprocess.Popen(
                ["/bin/sh", "-c", script],
                stdin=go_read,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )
        finally:
            os.close(go_read)
        self._track_process(self._launcher.pid)
        if self.layout != "unified":
            self._release_launcher()

    def _release_launcher(self) -> None:
        """Tell the launcher's shell to exec systemd (one line on its stdin)."""
        go, self._go = self._go, None
        if go is not None:
            try:
                os.write(go, b"go\n")
            except BrokenPipeError:
                pass  # it already exited; _wait_booted reports its status and log
            finally:
                os.close(go)

    def log(self) -> str:
        """What the launcher and systemd (its console) wrote so far."""
        if self.workdir is None:
            return ""
        try:
            return "".join(
                (self.workdir / name).read_text(errors="replace")
                for name in ("systemd.log", "console.log")
            )
        except FileNotFoundError:
            return ""

    def _find_pid(self) -> int | None:
        assert self._launcher is not None
        try:
            with open(f"/proc/{self._launcher.pid}/task/{self._launcher.pid}/children") as f:
                children = f.read().split()
        except FileNotFoundError:
            return None
        return int(children[0]) if children else None

    def _wait_booted(self, t0: float) -> None:
        deadline = t0 + self.boot_timeout
        while True:
            assert self._launcher is not None
            if self._launcher.poll() is not None:
                raise SandboxError(
                    f"systemd exited with status {self._launcher.returncode} while booting:\n"
                    + self.log()[-3000:]
                )
            if self.pid is None:
                pid = self._find_pid()
                if pid is not None:
                    self.pid = pid
                    self._track_process(pid)
                    if self.layout == "unified":
                        # unshare's child exists, so the cgroup namespace is made:
                        # unshare may leave its root, and must, before systemd starts.
                        self._move_launcher_out()
                        self._release_launcher()
            if self.pid is not None and os.path.exists(self.bus_path):
                state = self._system_state()
                if state in ("running", "degraded"):
                    return
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"systemd did not reach 'running' within {self.boot_timeout} s:\n"
                    + self.log()[-3000:]
                )
            time.sleep(0.01)

    def _system_state(self) -> str | None:
        try:
            return SystemdInspector(self.bus_address).system_state()
        except Exception:
            return None

    def _make_exec_cgroups(self) -> None:
        """Where commands run inside the sandbox join, from the host, before nsenter.

        A process entering the sandbox's cgroup namespace from outside its root
        would see its cgroup as ``/..``, and runtimes compute cgroup paths from
        ``/proc/self/cgroup``.  On cgroup v1 and hybrid hosts commands join the
        sandbox's root cgroup (``/`` inside, like a host process).  A leaf of
        our own would not do: systemd trims unknown cgroups under its root.  On
        cgroup v2 the root has controllers enabled, so processes cannot live
        there: commands join a leaf, recreated if systemd trimmed it.
        """
        self._exec_procs = []
        self._exec_mkdirs = []
        for root in self._cgroup_dirs:
            # Only the cgroup2 root systemd manages needs the leaf; a v1 hierarchy
            # of a unified sandbox is not systemd's (and a cpuset leaf would need
            # its cpus and mems first).
            if self.layout == "unified" and root == self._tracking_dir:
                self._exec_mkdirs.append(str(root / "runtimefaults.exec"))
                self._exec_procs.append(str(root / "runtimefaults.exec" / "cgroup.procs"))
            else:
                self._exec_procs.append(str(root / "cgroup.procs"))

    def _move_launcher_out(self) -> None:
        """cgroup2: take ``unshare`` out of the sandbox's root cgroup before systemd starts.

        The namespace's root was fixed when it was created.  A process left in
        it would stop systemd from enabling controllers below it (cgroup v2
        allows no process in a cgroup that enables controllers for its
        children: EBUSY), so unshare goes back to this process's own cgroup2
        cgroup.  Its v1 cgroups stay the sandbox's (v1 has no such rule).
        """
        assert self._launcher is not None
        own = _own_cgroups().get("")
        for m in cgroup_mounts():
            if m.fstype == "cgroup2" and own is not None:
                with swallowed(OSError, "moving the launcher out of %s", m.mount_point):
                    Path(m.mount_point + own.rstrip("/"), "cgroup.procs").write_text(
                        str(self._launcher.pid)
                    )

    def _read_controllers(self) -> frozenset[str]:
        """The controllers systemd can use: its cgroup2 root's, or the v1 ones mounted."""
        if self.layout != "unified":
            return sandbox_controllers(self.layout)
        if self._tracking_dir is None:
            return frozenset()
        try:
            return frozenset((self._tracking_dir / "cgroup.controllers").read_text().split())
        except OSError:
            logger.debug("no cgroup.controllers in %s", self._tracking_dir, exc_info=True)
            return frozenset()

    def command(self, argv: Sequence[str]) -> list[str]:
        """*argv* wrapped to run inside the sandbox's PID, mount and cgroup namespaces."""
        if self.pid is None:
            raise SandboxError("the sandbox is not running")
        mkdirs = "".join(f"mkdir -p {shlex.quote(p)}; " for p in self._exec_mkdirs)
        join = "".join(f"echo $$ > {shlex.quote(p)}; " for p in self._exec_procs)
        return [
            "/bin/sh",
            "-c",
            f'{mkdirs}{join}exec nsenter -t {self.pid} -m -p -C -- "$@"',
            "runtimefaults-exec",
            *argv,
        ]

    def processes(self) -> set[str]:
        """``PID:comm`` of every process in the sandbox but systemd and dbus-daemon.

        Found through the sandbox's cgroups on the host (``name=systemd`` or cgroup2):
        what a runtime or its containers left running.
        """
        out: set[str] = set()
        launcher = str(self._launcher.pid) if self._launcher is not None else ""
        root = self._tracking_dir
        if root is not None and root.exists():
            for procs in root.rglob("cgroup.procs"):
                rel = procs.parent.relative_to(root).as_posix()
                if rel.startswith("init.scope") or rel.endswith("dbus.service"):
                    continue
                with contextlib.suppress(OSError):
                    for pid in procs.read_text().split():
                        if pid == launcher:
                            continue
                        try:
                            comm = Path(f"/proc/{pid}/comm").read_text().strip()
                        except OSError:
                            continue
                        out.add(f"{pid}:{comm}")
        return out

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = 60,
        check: bool = False,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run *argv* inside the sandbox; returns the completed process (bytes)."""
        return subprocess.run(
            self.command(argv),
            env=dict(env) if env is not None else None,
            capture_output=True,
            timeout=timeout,
            check=check,
            input=input,
        )

    def inspector(self) -> SystemdInspector:
        return SystemdInspector(self.bus_address)

    def stop(self) -> None:
        """Kill systemd and everything in its PID namespace; remove its cgroups and files."""
        launcher, self._launcher = self._launcher, None
        errors: list[str] = []
        if launcher is not None:
            if self.pid is not None and process_starttime(self.pid) is not None:
                # SIGKILL to a PID namespace's init kills the whole namespace...
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                # ... once frozen processes thaw: runc freezes a container while it
                # sets unit properties, and a runc killed then leaves it frozen.
                thaw(self._cgroup_dirs)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(launcher.pid, signal.SIGKILL)
            try:
                launcher.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait(timeout=10)
        if self._go is not None:
            os.close(self._go)
            self._go = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._console is not None:
            try:
                self._console.close()
            except SandboxError as exc:
                errors.append(str(exc))
            self._console = None
        for path in reversed(self._cgroup_dirs):
            if not _rmdir_tree(path):
                errors.append(f"cgroup {path} could not be removed")
        self._cgroup_dirs = []
        if self.workdir is not None and not os.environ.get("RUNTIMEFAULTS_KEEP_SANDBOX"):
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.pid = None
        if not errors:
            for rid in self._rids:
                self.journal.release(rid)
            self._rids = []
        if errors:
            raise SandboxError("; ".join(errors))


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
                with contextlib.suppress(OSError):
                    if path.read_text().strip() in frozen:
                        path.write_text(value)
                        thawed.append(str(path.parent))
    return thawed


def _sandbox_cgroup_ok(path: str) -> bool:
    """A journaled sandbox cgroup may be reaped: an ``rfsd*`` directory below a cgroup mount."""
    if not isinstance(path, str) or not os.path.basename(path).startswith("rfsd"):
        return False
    real = os.path.realpath(path)
    return real == path and any(
        real.startswith(m.mount_point.rstrip("/") + "/") for m in cgroup_mounts()
    )


def _cgroup_pids(root: Path) -> set[int]:
    pids: set[int] = set()
    if root.is_dir():
        for procs in root.rglob("cgroup.procs"):
            with swallowed(OSError, "reading %s", procs):
                pids.update(int(p) for p in procs.read_text().split())
    return pids


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
    ours = {os.getpid(), 1}
    deadline = time.monotonic() + 10
    while True:
        thaw(paths)
        pids = set().union(*(_cgroup_pids(Path(p)) for p in paths)) - ours
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not pids or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    left = [p for p in paths if not _rmdir_tree(Path(p), timeout=10)]
    if left or refused:
        raise SandboxError(
            (f"cgroups still busy: {left}" if left else "")
            + (f"; not sandbox cgroups, left alone: {refused}" if refused else "")
        )


register_reaper(SANDBOX_CGROUPS, _reap_sandbox_cgroups)


def _rmdir_tree(root: Path, timeout: float = 5.0) -> bool:
    """rmdir a cgroup tree leaf first; retried while the kernel frees dying tasks."""
    deadline = time.monotonic() + timeout
    while True:
        if not root.exists():
            return True
        dirs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for d in [*dirs, root]:
            with contextlib.suppress(OSError):
                d.rmdir()
        if not root.exists():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


# --- inspection -----------------------------------------------------------------


@dataclass(frozen=True)
class UnitInfo:
    """One row of ``ListUnits``."""

    name: str
    description: str
    load_state: str
    active_state: str
    sub_state: str
    object_path: str

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def _typed(signature: bytes, args: Sequence[Any]) -> list[Any]:
    from pystemd.dbuslib import apply_signature

    return list(apply_signature(signature, list(args))) if signature else []


def _s(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class SystemdInspector:
    """Ask a systemd, over any bus address, what units it has (pystemd).

    Each call opens its own short connection, so an inspector is cheap, is safe
    from any thread, and never keeps a fault proxy busy between calls.

    Example::

        inspector = SystemdInspector("unix:path=/proc/1234/root/run/dbus/system_bus_socket")
        for unit in inspector.leftovers(baseline):
            inspector.reset(unit.name)
    """

    DESTINATION = b"org.freedesktop.systemd1"
    PATH = b"/org/freedesktop/systemd1"
    MANAGER = b"org.freedesktop.systemd1.Manager"

    def __init__(self, address: str | None = None, *, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout

    @contextlib.contextmanager
    def _bus(self) -> Any:
        from pystemd.dbuslib import DBus, DBusAddress

        bus = DBusAddress(self.address.encode()) if self.address else DBus(system=True)
        with bus:
            yield bus

    def _call(self, method: bytes, signature: bytes = b"", args: Sequence[Any] = ()) -> Any:
        typed = _typed(signature, args)
        with self._bus() as bus:
            return bus.call_method(self.DESTINATION, self.PATH, self.MANAGER, method, typed).body

    def _get(self, prop: bytes, rtype: bytes = b"s") -> Any:
        with self._bus() as bus:
            return bus.get_property(self.DESTINATION, self.PATH, self.MANAGER, prop, rtype)

    def unique_name(self) -> str:
        """systemd's unique connection name on the bus (``:1.0``): the ``sender`` of
        its messages, for fault rules aimed at systemd alone."""
        with self._bus() as bus:
            reply = bus.call_method(
                b"org.freedesktop.DBus",
                b"/org/freedesktop/DBus",
                b"org.freedesktop.DBus",
                b"GetNameOwner",
                _typed(b"s", [self.DESTINATION]),
            ).body
        return _s(reply[0] if isinstance(reply, (tuple, list)) else reply)

    def system_state(self) -> str:
        """``initializing``, ``starting``, ``running``, ``degraded``..."""
        return _s(self._get(b"SystemState"))

    def version(self) -> str:
        return _s(self._get(b"Version"))

    def units(self) -> list[UnitInfo]:
        """Every unit systemd has loaded (``ListUnits``)."""
        rows = self._call(b"ListUnits")
        if isinstance(rows, tuple) and len(rows) == 1:
            rows = rows[0]
        return [UnitInfo(_s(r[0]), _s(r[1]), _s(r[2]), _s(r[3]), _s(r[4]), _s(r[6])) for r in rows]

    def unit_names(self, kinds: Iterable[str] | None = None) -> set[str]:
        wanted = set(kinds) if kinds is not None else None
        return {u.name for u in self.units() if wanted is None or u.kind in wanted}

    def scopes_and_slices(self) -> set[str]:
        """Names of every scope and slice (the units runtimes create)."""
        return self.unit_names(("scope", "slice"))

    def failed(self) -> set[str]:
        return {u.name for u in self.units() if u.active_state == "failed"}

    def leftovers(self, baseline: Iterable[str] = ()) -> list[UnitInfo]:
        """Scopes, slices and failed units not in *baseline*: what a runtime left.

        Typical finds: ``libcontainer_*_systemd_test_default.slice`` (runc before
        PR 2117), the ``*.scope`` of a deleted container, a failed transient unit.
        """
        base = set(baseline)
        return [
            u
            for u in self.units()
            if u.name not in base and (u.kind in ("scope", "slice") or u.active_state == "failed")
        ]

    def reset(self, name: str) -> None:
        """Stop unit *name* (if active) and clear its failed state, so it is unloaded."""
        from pystemd.dbusexc import DBusBaseError

        for method, sig, args in (
            (b"StopUnit", b"ss", [name.encode(), b"replace"]),
            (b"ResetFailedUnit", b"s", [name.encode()]),
        ):
            with contextlib.suppress(DBusBaseError):
                self._call(method, sig, args)

    def wait_gone(self, names: Iterable[str], timeout: float = 5.0) -> set[str]:
        """Wait until none of *names* is loaded; return those still there."""
        pending = set(names)
        deadline = time.monotonic() + timeout
        while pending:
            pending &= self.unit_names()
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return pending

    def snapshot_fn(self, kinds: Iterable[str] = ("scope", "slice")) -> Callable[[], set[str]]:
        """A leak-check snapshot: the names of units of *kinds*, plus failed units."""
        wanted = tuple(kinds)

        def snapshot() -> set[str]:
            return {u.name for u in self.units() if u.kind in wanted or u.active_state == "failed"}

        return snapshot


class HostSystemd:
    """The host's own systemd, used only by consent (``--runtimefaults-host-systemd``).

    Offers the same surface as :class:`SystemdSandbox` where it makes sense:
    commands run directly, the bus is the host's system bus.
    """

    def __init__(self) -> None:
        if not caps.systemd_is_pid1():
            raise SandboxError("the host does not run systemd as PID 1")
        self.pid = 1
        self.boot_seconds = 0.0
        self.layout = {"v2": "unified", "hybrid": "hybrid", "v1": "legacy"}[caps.cgroup_layout()]

    bus_address = "unix:path=/run/dbus/system_bus_socket"
    inner_bus_address = bus_address

    def __enter__(self) -> HostSystemd:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def start(self) -> HostSystemd:
        return self

    def stop(self) -> None:
        pass

    def command(self, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = 60,
        check: bool = False,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            list(argv),
            env=dict(env) if env is not None else None,
            capture_output=True,
            timeout=timeout,
            check=check,
            input=input,
        )

    def inspector(self) -> SystemdInspector:
        return SystemdInspector(self.bus_address)


def describe(sandbox: SystemdSandbox) -> str:  # pragma: no cover - CLI helper
    """A few lines for humans: PID, bus, layout, boot time."""
    return textwrap.dedent(
        f"""\
        systemd PID {sandbox.pid} (layout {sandbox.layout}), booted in {sandbox.boot_seconds:.3f} s
        cgroup controllers: {" ".join(sorted(sandbox.controllers)) or "none"}
        bus (host side): {sandbox.bus_address}
        run inside:      nsenter -t {sandbox.pid} -m -p -C -- CMD  (after joining its cgroups)
        """
    )
