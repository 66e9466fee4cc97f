"""SystemdSandbox: systemd 252+ as PID 1 of its own PID, mount and cgroup namespaces.

The sandbox's lifecycle, in the order :meth:`SystemdSandbox.start` runs it:

1. a work directory under ``/tmp`` with the units (:mod:`.units`) and the guard;
2. a cgroup of its own on every hierarchy, journaled before it exists
   (:meth:`SystemdSandbox._make_cgroups`);
3. the launcher (:mod:`.launcher`) with a pty for systemd's console
   (:mod:`.console`), released to exec systemd once it may;
4. a wait for ``running`` over the bus (:mod:`.inspector`);
5. the cgroups commands join before ``nsenter`` (:meth:`SystemdSandbox.command`).

:meth:`SystemdSandbox.stop` undoes it all; a sandbox whose owner was killed is
undone by the journal (processes, the work directory, and the cgroups through
:func:`.cgroups._reap_sandbox_cgroups`).

Example::

    with SystemdSandbox(layout="unified") as sd:
        sd.run(["systemctl", "is-system-running"], check=True)

The bus is dbus-daemon or dbus-broker (``bus_daemon=``; the default is
:func:`default_bus_daemon`, which the plugin sets from
``--runtimefaults-bus-daemon`` for a pytest session, so tests that build
their own sandbox follow the option too).  :meth:`SystemdSandbox.restart_bus`
restarts it under whatever talks to it (``systemctl restart dbus``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_runtimefaults import caps
from pytest_runtimefaults.core.log import logger, swallowed
from pytest_runtimefaults.host import cgroups as host_cgroups
from pytest_runtimefaults.host import proc
from pytest_runtimefaults.journal import Journal, process_starttime
from pytest_runtimefaults.naming import unique_name
from pytest_runtimefaults.systemd.cgroups import (
    SANDBOX_CGROUPS,
    CgroupMount,
    _own_cgroups,
    cgroup_mounts,
    thaw,
)
from pytest_runtimefaults.systemd.console import _ConsoleDrain
from pytest_runtimefaults.systemd.errors import SandboxError
from pytest_runtimefaults.systemd.inspector import SystemdInspector
from pytest_runtimefaults.systemd.launcher import (
    GUARD_AWK,
    LAUNCHER_ENV,
    cgroup_mount_lines,
    inner_script,
    launcher_script,
    unshare_argv,
)
from pytest_runtimefaults.systemd.units import (
    BUS_DAEMON_PACKAGES,
    INNER_BUS_PATH,
    SYSTEMD,
    bus_daemon_executable,
    check_bus_daemon,
    install_units,
)

__all__ = ["SystemdSandbox", "default_bus_daemon", "describe", "set_default_bus_daemon"]

# The bus a sandbox runs when its caller names none.  One process-wide value:
# the plugin sets it from --runtimefaults-bus-daemon at configure time (and
# puts the old one back at unconfigure), so the option reaches every sandbox
# of the session, those tests build themselves included.
_default_bus_daemon = "dbus-daemon"


def default_bus_daemon() -> str:
    """The bus a :class:`SystemdSandbox` runs when given none (``"dbus-daemon"`` at first)."""
    return _default_bus_daemon


def set_default_bus_daemon(bus_daemon: str) -> str:
    """Make *bus_daemon* the default (one of ``BUS_DAEMONS``); returns the previous default.

    Example::

        previous = set_default_bus_daemon("dbus-broker")
        try:
            ...
        finally:
            set_default_bus_daemon(previous)
    """
    global _default_bus_daemon
    previous, _default_bus_daemon = _default_bus_daemon, check_bus_daemon(bus_daemon)
    return previous


# The units of the sandbox's own bus (dbus-broker's journal sink included):
# their processes are not what a runtime left behind.
_BUS_UNITS = ("dbus.service", "runtimefaults-journal.service")
_CGROUP_RMDIR_TIMEOUT = 5.0  # seconds stop() waits for the kernel to free a killed task's cgroup


def _log_rmtree_error(func: Callable[..., Any], path: str, exc_info: Any) -> None:
    # shutil.rmtree's onerror: go on removing the rest, but say what stayed.
    logger.debug(
        "removing the work directory: %s(%s) failed", func.__name__, path, exc_info=exc_info
    )


class SystemdSandbox:
    """systemd 252+ as PID 1 of its own PID, mount and cgroup namespaces.

    A context manager; ``start()``/``stop()`` are idempotent.  Every resource is
    journaled, in *journal* or else the default one (:meth:`Journal.default`,
    the journal ``runtimefaults cleanup`` reads), so a sandbox whose owner was
    killed is reaped by the next pytest run or by ``runtimefaults cleanup``.

    Args:
        layout: ``"auto"`` (the host's layout; ``"unified"`` for systemd 258
            and later, which cannot boot on cgroup v1), ``"hybrid"``, ``"legacy"``
            (cgroup v1 only) or ``"unified"`` (a pure cgroup2, on any host).
        boot_timeout: seconds to wait for systemd to reach ``running``.
        workdir_parent: where the work directory (units, bus config, log) goes;
            it must be visible inside the sandbox, so not under ``/run``.
        extra_units: file name -> content of more units to install.
        log_level: systemd's ``--log-level``.
        bus_daemon: the bus it runs, ``"dbus-daemon"`` or ``"dbus-broker"``
            (default: :func:`default_bus_daemon`).  An unknown name is a
            ValueError here; a bus that is not installed, a SandboxError at start.
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
        bus_daemon: str | None = None,
    ) -> None:
        self.layout = caps.resolve_layout(layout)
        self.bus_daemon = check_bus_daemon(bus_daemon or default_bus_daemon())
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
        if bus_daemon_executable(self.bus_daemon) is None:
            package = BUS_DAEMON_PACKAGES[self.bus_daemon]
            raise SandboxError(
                f"the sandbox's bus {self.bus_daemon} is not installed "
                f"(apt-get install {package}, or choose the other bus: bus_daemon=, "
                "--runtimefaults-bus-daemon)"
            )
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

    # -- step 1: files

    def _write_files(self) -> None:
        assert self.workdir is not None
        install_units(self.workdir, self.extra_units, self.bus_daemon)
        (self.workdir / "console.log").touch()
        (self.workdir / "guard.awk").write_text(GUARD_AWK)

    def _inner_script(self) -> str:
        """The shell that runs as PID 1 of the new namespaces, then execs systemd.

        It checks its cgroup namespace, mounts, checks the mounts
        (:data:`~pytest_runtimefaults.systemd.GUARD_AWK`), waits for
        the host's go (a line on stdin: on cgroup v2 the launcher must leave
        the sandbox's root cgroup first), then execs systemd.
        """
        assert self.workdir is not None
        host_dev = os.stat("/sys/fs/cgroup").st_dev
        return inner_script(
            layout=self.layout,
            workdir=self.workdir,
            console=self._console_path(),
            mount_lines=self._cgroup_mount_lines(),
            host_dev=f"{os.major(host_dev)}:{os.minor(host_dev)}",
            host_cgroupns=os.readlink("/proc/self/ns/cgroup"),
            systemd=self.systemd,
            log_level=self.log_level,
        )

    def _console_path(self) -> str:
        """What the launcher binds on ``/dev/console``: the pty's slave (or the log file)."""
        assert self.workdir is not None
        if self._console is not None:
            return self._console.slave_path
        return str(self.workdir / "console.log")

    def _cgroup_mount_lines(self) -> list[str]:
        """Fresh cgroup mounts for the layout, after ``umount -R /sys/fs/cgroup``."""
        return cgroup_mount_lines(self.layout, cgroup_mounts())

    def _unshare_argv(self) -> list[str]:
        return unshare_argv()

    # -- step 2: cgroups

    def _make_cgroups(self) -> list[str]:
        """A cgroup of the sandbox's own on every hierarchy; its cgroup.procs files."""
        own = _own_cgroups()
        planned: list[tuple[CgroupMount, Path]] = []
        for m in cgroup_mounts():
            rel = own.get(m.name)
            if rel is not None:
                planned.append((m, Path(m.mount_point + rel.rstrip("/")) / self.name))
        # Journaled before they exist; the reaper waits for the sandbox's processes to die.
        self._track(SANDBOX_CGROUPS, cgroups=[str(p) for _, p in planned])
        return [self._make_cgroup(m, path) for m, path in planned]

    def _make_cgroup(self, mount: CgroupMount, path: Path) -> str:
        path.mkdir()
        self._cgroup_dirs.append(path)
        # systemd tracks every process in name=systemd (v1) or cgroup2 (v2).
        if mount.name == "name=systemd" or (mount.fstype == "cgroup2" and self.layout == "unified"):
            self._tracking_dir = path
        if "cpuset" in mount.options.split(","):
            # A new cpuset cgroup starts empty: no task can join until it has CPUs and nodes.
            for knob in ("cpuset.cpus", "cpuset.mems"):
                (path / knob).write_text((path.parent / knob).read_text())
        return str(path / "cgroup.procs")

    # -- step 3: the launcher

    def _spawn(self, procs_files: Sequence[str]) -> None:
        assert self.workdir is not None
        # Without a pty (no devpts), systemd's console is the bare file: it then
        # writes nothing, but the sandbox still boots.
        with swallowed(OSError, "opening a pty for systemd's console"):
            self._console = _ConsoleDrain(self.workdir / "console.log")
        # Written now: the script names the pty's slave.
        inner = self.workdir / "inner.sh"
        inner.write_text(self._inner_script())
        script = launcher_script(procs_files, self._unshare_argv(), inner)
        self._log = open(self.workdir / "systemd.log", "wb")  # noqa: SIM115
        go_read, self._go = os.pipe()
        try:
            self._launcher = subprocess.Popen(
                ["/bin/sh", "-c", script],
                stdin=go_read,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=dict(LAUNCHER_ENV),
            )
        finally:
            os.close(go_read)
        # On cgroup v2 the launcher leaves the sandbox's cgroup before its go
        # (_move_launcher_out), so the reaper cannot know it by its cgroup:
        # it knows it by the unshare command line the shell execs.
        then = [*self._unshare_argv(), "/bin/sh", str(inner)]
        self._rids.append(self.journal.add_process(self._launcher.pid, then=then))
        if self.layout != "unified":
            self._release_launcher()

    def _release_launcher(self) -> None:
        """Tell the launcher's shell to exec systemd (one line on its stdin)."""
        go, self._go = self._go, None
        if go is not None:
            try:
                os.write(go, b"go\n")
            except BrokenPipeError:
                # It already exited; _wait_booted reports its status and log.
                logger.debug("the launcher exited before its go", exc_info=True)
            finally:
                os.close(go)

    def log(self) -> str:
        """What the launcher and systemd (its console) wrote so far.

        With dbus-broker, what its launcher printed (``bus.log``: the fatal
        errors it prints before it can log) follows, headed ``[bus.log]``.
        """
        if self.workdir is None:
            return ""
        parts = []
        for name in ("systemd.log", "console.log", "bus.log"):
            try:
                text = (self.workdir / name).read_text(errors="replace")
            except FileNotFoundError:
                continue
            parts.append(f"[{name}]\n{text}" if name == "bus.log" and text else text)
        return "".join(parts)

    def bus_log(self) -> str:
        """dbus-broker's own log records (the ``MESSAGE=`` fields of ``journal.log``).

        Empty for dbus-daemon, whose messages go nowhere (the sandbox has no journald).
        """
        if self.workdir is None:
            return ""
        try:
            raw = (self.workdir / "journal.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "".join(line[8:] + "\n" for line in raw.splitlines() if line.startswith("MESSAGE="))

    # -- step 4: boot

    def _find_pid(self) -> int | None:
        """unshare's child, PID 1 of the new namespace, as the host sees it (None: not yet)."""
        assert self._launcher is not None
        children = proc.children(self._launcher.pid)
        return children[0] if children else None

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
                self._adopt_pid()
            if (
                self.pid is not None
                and os.path.exists(self.bus_path)
                and self._system_state() in ("running", "degraded")
            ):
                return
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"systemd did not reach 'running' within {self.boot_timeout} s:\n"
                    + self.log()[-3000:]
                )
            time.sleep(0.01)

    def _adopt_pid(self) -> None:
        """Once unshare's child exists: journal it, and on cgroup v2 release the launcher."""
        pid = self._find_pid()
        if pid is None:
            return
        self.pid = pid
        self._track_process(pid)
        if self.layout == "unified":
            # unshare's child exists, so the cgroup namespace is made:
            # unshare may leave its root, and must, before systemd starts.
            self._move_launcher_out()
            self._release_launcher()

    def _system_state(self) -> str | None:
        try:
            return SystemdInspector(self.bus_address).system_state()
        except Exception:
            # Asked while systemd and its bus are still starting: "not yet".
            logger.debug("asking the booting systemd its state", exc_info=True)
            return None

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

    # -- step 5: running commands inside

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

    def _read_controllers(self) -> frozenset[str]:
        """The controllers systemd can use: its cgroup2 root's, or the v1 ones mounted."""
        if self.layout != "unified":
            return caps.sandbox_controllers(self.layout)
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
        """``PID:comm`` of every process in the sandbox but systemd and its bus.

        Found through the sandbox's cgroups on the host (``name=systemd`` or cgroup2):
        what a runtime or its containers left running.
        """
        out: set[str] = set()
        launcher_pid = self._launcher.pid if self._launcher is not None else None
        root = self._tracking_dir
        if root is None or not root.exists():
            return out
        for procs in root.rglob("cgroup.procs"):
            rel = procs.parent.relative_to(root).as_posix()
            if rel.startswith("init.scope") or rel.endswith(_BUS_UNITS):
                continue
            pids: list[str] = []
            # A cgroup systemd removed meanwhile (its unit stopped) has no processes left.
            with swallowed(OSError, "reading %s", procs):
                pids = procs.read_text().split()
            for pid in map(int, pids):
                if pid == launcher_pid:
                    continue
                comm = proc.comm(pid)
                if comm != "?":  # "?": gone since the read
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

    # -- the bus under the runtime

    def bus_pids(self) -> list[int]:
        """The host PIDs of the bus's processes (the cgroup of ``dbus.service``).

        dbus-daemon is one process; dbus-broker two (the launcher and the broker).
        """
        root = self._tracking_dir
        if root is None:
            return []
        for procs in root.rglob("dbus.service/cgroup.procs"):
            with swallowed(OSError, "reading %s", procs):
                return sorted(map(int, procs.read_text().split()))
        return []

    def restart_bus(self, *, timeout: float = 10.0) -> float:
        """``systemctl restart dbus.service`` inside; returns the seconds until systemd is back.

        What runc PRs 2923 and 3475 and crun's ``sd-bus call: Transport
        endpoint is not connected`` are about: every connection to the bus is
        closed (a client sees EOF), the socket stays (systemd holds it, so a
        connect during the restart waits in the backlog instead of failing),
        and a new bus serves it.  Returns once ``org.freedesktop.systemd1``
        answers on the new bus (PID 1 reconnects on its own); a SandboxError
        if it does not within *timeout*, or if systemctl fails.

        Example::

            before = sd.bus_pids()
            sd.restart_bus()
            assert sd.bus_pids() != before
        """
        t0 = time.monotonic()
        result = self.run(["systemctl", "restart", "dbus.service"], timeout=timeout)
        if result.returncode != 0:
            raise SandboxError(
                f"systemctl restart dbus.service failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}\n" + self.log()[-2000:]
            )
        deadline = t0 + timeout
        while self._system_state() not in ("running", "degraded"):
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"systemd did not answer on the restarted {self.bus_daemon} within "
                    f"{timeout} s:\n" + self.log()[-2000:]
                )
            time.sleep(0.01)
        return time.monotonic() - t0

    # -- stop

    def stop(self) -> None:
        """Kill systemd and everything in its PID namespace; remove its cgroups and files."""
        launcher_proc, self._launcher = self._launcher, None
        errors: list[str] = []
        if launcher_proc is not None:
            self._kill(launcher_proc)
        self._close_files(errors)
        self._remove_cgroups(errors)
        if self.workdir is not None and not os.environ.get("RUNTIMEFAULTS_KEEP_SANDBOX"):
            shutil.rmtree(self.workdir, onerror=_log_rmtree_error)
        self.pid = None
        if errors:
            raise SandboxError("; ".join(errors))
        for rid in self._rids:
            self.journal.release(rid)
        self._rids = []

    def _kill(self, launcher_proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL systemd (and with it its PID namespace), else the launcher; wait for it."""
        if self.pid is not None and process_starttime(self.pid) is not None:
            # SIGKILL to a PID namespace's init kills the whole namespace...
            with swallowed(ProcessLookupError, "killing systemd %d", self.pid):
                os.kill(self.pid, signal.SIGKILL)
            # ... once frozen processes thaw: runc freezes a container while it
            # sets unit properties, and a runc killed then leaves it frozen.
            thaw(self._cgroup_dirs)
        else:
            with swallowed(ProcessLookupError, "killing the launcher %d", launcher_proc.pid):
                os.killpg(launcher_proc.pid, signal.SIGKILL)
        try:
            launcher_proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with swallowed(ProcessLookupError, "killing the launcher %d", launcher_proc.pid):
                os.killpg(launcher_proc.pid, signal.SIGKILL)
            launcher_proc.wait(timeout=10)

    def _close_files(self, errors: list[str]) -> None:
        """Close the launcher's stdin, its log and the console (its errors into *errors*)."""
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

    def _remove_cgroups(self, errors: list[str]) -> None:
        for path in reversed(self._cgroup_dirs):
            if not host_cgroups.remove_tree(path, timeout=_CGROUP_RMDIR_TIMEOUT):
                errors.append(f"cgroup {path} could not be removed")
        self._cgroup_dirs = []


def describe(sandbox: SystemdSandbox) -> str:  # pragma: no cover - CLI helper
    """A few lines for humans: PID, bus, layout, boot time."""
    return textwrap.dedent(
        f"""\
        systemd PID {sandbox.pid} (layout {sandbox.layout}), booted in {sandbox.boot_seconds:.3f} s
        cgroup controllers: {" ".join(sorted(sandbox.controllers)) or "none"}
        bus (host side): {sandbox.bus_address} ({sandbox.bus_daemon})
        run inside:      nsenter -t {sandbox.pid} -m -p -C -- CMD  (after joining its cgroups)
        """
    )
