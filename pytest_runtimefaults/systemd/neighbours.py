"""Faults made of real systemd state: a leftover scope, a re-executing systemd.

Two neighbours of incident 2 (docs/incidents.md, "Neighbours"), made in a
sandboxed systemd (:class:`~pytest_runtimefaults.systemd.SystemdSandbox`),
never in the host's:

* :class:`LeftoverScope`: a real transient scope, with a process of ours in
  it, named as the runtime will name its own (``runc-ID.scope``,
  ``crun-ID.scope``), so that the runtime's ``StartTransientUnit`` meets
  ``Unit runc-ID.scope already exists`` (runc PR 1124, podman issue 15583,
  crun PR 348, systemd issue 6347);
* :class:`ReexecMidCall`: systemd re-executes with the runtime's call in its
  socket, unanswered: systemd is stopped (SIGSTOP from the host), a
  ``Reexecute`` call is queued to it, the runtime's call queues behind it,
  and systemd goes on: it handles ``Reexecute`` first and closes its bus
  connection without answering the runtime (systemd issue 27204: ``Failed to
  query unit state: Remote peer disconnected``; dbus-daemon's words:
  ``Message recipient disconnected from message bus without replying``);
* :func:`daemon_reexec`: a plain ``systemctl daemon-reexec`` inside the
  sandbox (the remedy of incident 2).

Example::

    with SystemdSandbox() as sd, LeftoverScope(sd, scope_name("runc", "c1")):
        runtime.create("c1", bundle)  # meets the leftover
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import TYPE_CHECKING, Any

from pytest_runtimefaults.core.fault import FaultBase
from pytest_runtimefaults.core.log import logger, swallowed
from pytest_runtimefaults.systemd.errors import SandboxError

if TYPE_CHECKING:
    from pytest_runtimefaults.systemd.inspector import SystemdInspector
    from pytest_runtimefaults.systemd.sandbox import SystemdSandbox

__all__ = ["LeftoverScope", "ReexecMidCall", "daemon_reexec", "scope_name"]

#: the scope-name prefix each runtime uses with its default cgroupsPath
#: (runc: ``system.slice:runc:ID``; crun: ``crun-ID.scope``)
_PREFIXES = {"runc": "runc", "crun": "crun"}


def scope_name(runtime: str, container_id: str) -> str:
    """The scope *runtime* (``runc`` or ``crun``) asks systemd for, for *container_id*.

    Both name it ``PREFIX-ID.scope`` when the bundle has no cgroupsPath (the
    bundles of :func:`~pytest_runtimefaults.rootfs.build_bundle` have none).
    """
    prefix = _PREFIXES.get(runtime)
    if prefix is None:
        raise ValueError(
            f"no known scope name for runtime {runtime!r}: use one of {sorted(_PREFIXES)}, "
            "or give LeftoverScope the unit name itself"
        )
    return f"{prefix}-{container_id}.scope"


class LeftoverScope(FaultBase):
    """A real transient scope *unit* in *sandbox*'s systemd, with a ``sleep`` of ours in it.

    ``start()`` runs ``systemd-run --scope --unit=UNIT`` inside the sandbox (so
    the process is in systemd's PID namespace, as a runtime's would be) and
    waits until systemd reports the unit active; ``lift()`` stops the unit (the
    leftover is gone: the next create must succeed); ``stop()`` also reaps our
    process.  ``applied`` is 1 once the scope exists.  *slice* is where the
    scope goes (runc's default is ``system.slice``; the name alone collides).
    """

    def __init__(
        self,
        sandbox: SystemdSandbox,
        unit: str,
        *,
        slice: str = "system.slice",
        timeout: float = 10.0,
    ) -> None:
        super().__init__()
        if not isinstance(unit, str) or not unit.endswith(".scope") or "/" in unit:
            raise ValueError(f"LeftoverScope unit must be a NAME.scope unit name, got {unit!r}")
        if not isinstance(slice, str) or not slice.endswith(".slice"):
            raise ValueError(f"LeftoverScope slice must be a NAME.slice unit name, got {slice!r}")
        self.name = f"leftover scope {unit}"
        self.sandbox = sandbox
        self.unit = unit
        self.slice = slice
        self.timeout = timeout
        self._proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> None:
        argv = [
            "systemd-run",
            "--scope",
            "--quiet",
            f"--unit={self.unit}",
            f"--slice={self.slice}",
            "/bin/sleep",
            "infinity",
        ]
        self._proc = subprocess.Popen(
            self.sandbox.command(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        inspector = self.sandbox.inspector()
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.unit in inspector.unit_names(["scope"]):
                self._fired()
                return
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise SandboxError(
                    f"systemd-run could not make the leftover scope {self.unit} "
                    f"(exit {self._proc.returncode}): {err.strip() or 'no message'}"
                )
            time.sleep(0.02)
        self._reap()
        raise SandboxError(f"the leftover scope {self.unit} was not active within {self.timeout} s")

    def _lift(self) -> None:
        """Stop the scope: systemd kills our process and forgets the unit."""
        if self.sandbox.running:
            res = self.sandbox.run(["systemctl", "stop", self.unit], timeout=self.timeout)
            if res.returncode:
                logger.debug(
                    "systemctl stop %s: %s", self.unit, res.stderr.decode(errors="replace")
                )
            self.sandbox.inspector().wait_gone({self.unit}, timeout=self.timeout)

    def _stop(self) -> None:
        self._reap()

    def _reap(self) -> None:
        """Wait for our nsenter/systemd-run; kill its session (ours, by its PID) if it lingers."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            with swallowed(ProcessLookupError, "killing the session of pid %d", proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


class ReexecMidCall(FaultBase):
    """systemd re-executes while the runtime's next call waits in its socket, unanswered.

    ``start()``: SIGSTOP the sandbox's systemd (from the host: a signal from
    an ancestor PID namespace reaches its PID 1) and queue a ``Reexecute``
    call to it on a connection of our own; from then on every call anyone
    makes to systemd waits in its socket behind ``Reexecute``.  ``lift()``:
    SIGCONT; systemd handles ``Reexecute`` first (sd-bus dispatches one message
    per turn of its loop, and the loop ends once a re-execution is asked for),
    so it closes its bus connection with the later calls unanswered, and
    comes back as a new bus peer; ``lift()`` returns once it answers again.
    ``reexec_seconds`` says how long that took.  ``stop()`` makes sure
    systemd is not left stopped.  Only a sandboxed systemd, never the host's.
    """

    def __init__(self, sandbox: SystemdSandbox, *, timeout: float = 30.0) -> None:
        super().__init__()
        self.name = "systemd re-executes mid-call"
        self.sandbox = sandbox
        self.timeout = timeout
        self.reexec_seconds: float | None = None
        self._conn: Any = None
        self._stopped_pid: int | None = None

    def _start(self) -> None:
        from jeepney import DBusAddress, new_method_call
        from jeepney.io.blocking import open_dbus_connection

        pid = self.sandbox.pid
        if pid is None or not self.sandbox.running:
            raise SandboxError("the sandbox is not running: no systemd to re-execute")
        self._conn = open_dbus_connection(bus=self.sandbox.bus_address)
        os.kill(pid, signal.SIGSTOP)
        self._stopped_pid = pid
        manager = DBusAddress(
            "/org/freedesktop/systemd1",
            bus_name="org.freedesktop.systemd1",
            interface="org.freedesktop.systemd1.Manager",
        )
        # systemd never answers Reexecute (the client is to wait for it to disconnect).
        self._conn.send(new_method_call(manager, "Reexecute"))
        self._fired()

    def _lift(self) -> None:
        t0 = time.monotonic()
        self._cont()
        deadline = t0 + self.timeout
        inspector = self.sandbox.inspector()
        while not _answers(inspector):  # back once a new systemd answers on the bus
            if time.monotonic() > deadline:
                raise SandboxError(f"systemd did not answer within {self.timeout} s of Reexecute")
            time.sleep(0.05)
        self.reexec_seconds = time.monotonic() - t0

    def _stop(self) -> None:
        self._cont()
        conn, self._conn = self._conn, None
        if conn is not None:
            with swallowed(OSError, "closing the Reexecute connection"):
                conn.close()

    def _cont(self) -> None:
        pid, self._stopped_pid = self._stopped_pid, None
        if pid is not None:
            with swallowed(ProcessLookupError, "SIGCONT to systemd pid %d", pid):
                os.kill(pid, signal.SIGCONT)


def _answers(inspector: SystemdInspector) -> bool:
    """Whether systemd answers a property read now (it does not while it re-executes)."""
    try:
        inspector.system_state()
    except Exception:  # pystemd raises its own errors, of no common base but Exception
        logger.debug("systemd not answering yet after Reexecute", exc_info=True)
        return False
    return True


def daemon_reexec(sandbox: SystemdSandbox, *, timeout: float = 30.0) -> float:
    """``systemctl daemon-reexec`` in *sandbox*; the seconds until systemd answers again.

    systemd serializes its state, closes every connection (the bus's included)
    and executes itself anew; clients waiting on a call get ``Remote peer
    disconnected`` or ``... disconnected from message bus without replying``.
    Raises :class:`SandboxError` if the command fails or systemd does not come
    back within *timeout*.
    """
    t0 = time.monotonic()
    res = sandbox.run(["systemctl", "daemon-reexec"], timeout=timeout)
    if res.returncode:
        raise SandboxError(
            f"systemctl daemon-reexec failed (exit {res.returncode}): "
            f"{res.stderr.decode(errors='replace').strip()}"
        )
    deadline = t0 + timeout
    while True:
        # systemd is back once it answers on the bus again.
        probe = sandbox.run(["systemctl", "is-system-running"], timeout=timeout)
        if probe.stdout.strip() in (b"running", b"degraded"):
            return time.monotonic() - t0
        if time.monotonic() > deadline:
            raise SandboxError(
                f"systemd did not answer within {timeout} s of daemon-reexec: "
                f"{probe.stdout.decode(errors='replace').strip()}"
            )
        time.sleep(0.05)
