"""A harness for daemons under test: start, wait until serving, crash, restart.

A container runtime's system test needs its daemons (containerd, dbus-daemon,
the runtime's own) to behave like production: started with their own socket,
state and environment, killed the way the kernel's OOM killer does it
(SIGKILL, no cleanup), and restarted over whatever they left behind.  This
module runs one such daemon and answers the questions a test asks:

* is it serving?  (:meth:`Daemon.wait_ready`: the socket accepts a connection,
  and/or a log line appeared, and/or a probe returns true; always bounded);
* what did it say?  (:attr:`Daemon.logs`: stdout and stderr of every run, in
  one file);
* did it crash?  (:meth:`Daemon.fatal_errors`: Go ``panic:``, Rust
  ``panicked at``, ``fatal error:``, a Go crash dump ``SIGABRT: abort``,
  logrus ``level=fatal``);
* how long did it take to serve again after a crash?
  (:meth:`Daemon.crash_restart` returns seconds from the kill to serving).

No process is left behind: every instance runs in its own session and is
killed with its whole process group on :meth:`Daemon.stop`; each is started
with ``PR_SET_PDEATHSIG=SIGKILL`` (so it dies with the test process even when
pytest itself is killed, e.g. by pytest-timeout's ``thread`` method) from a
long-lived spawner thread (so the death signal is not sent when a short-lived
thread that asked for the restart exits); and each is recorded in the
crash-safe :class:`~pytest_runtimefaults.journal.Journal` so the next run
reaps it if everything else failed.

Example::

    from pytest_runtimefaults.daemon import Daemon

    with Daemon(["dbus-daemon", "--session", "--nofork",
                 "--address=unix:path=/tmp/d/bus"],
                socket_path="/tmp/d/bus") as d:
        seconds = d.crash_restart()        # SIGKILL, start again, wait ready
        assert not d.fatal_errors(), d.log_tail()
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_runtimefaults.core.log import logger, swallowed
from pytest_runtimefaults.host import proc as host_proc
from pytest_runtimefaults.journal import Journal, process_starttime, recorded_process_alive

if TYPE_CHECKING:
    from pytest_runtimefaults.faults import FaultRegistry

__all__ = [
    "DEFAULT_FATAL_PATTERNS",
    "Daemon",
    "DaemonError",
    "DaemonExited",
    "DaemonNotReady",
    "Run",
    "connect_error",
    "socket_accepts",
]

#: Log lines that mean the daemon crashed or is about to: a Go panic, a Rust
#: panic, a Go runtime fatal error (``fatal error: concurrent map writes``),
#: the Go runtime's dump on a crash signal (``SIGABRT: abort``, ``SIGSEGV:
#: segmentation violation``), logrus' ``level=fatal``.
DEFAULT_FATAL_PATTERNS: tuple[str, ...] = (
    r"^panic: ",
    r"panicked at",
    r"fatal error:",
    r"^SIG(ABRT|BUS|FPE|ILL|QUIT|SEGV|SYS|TRAP): ",
    r"level=fatal\b",
)

_POLL = 0.005  # readiness poll interval: short, restart times are measured in ms


class DaemonError(RuntimeError):
    """The daemon did not do what the harness needed; the message has its log tail."""


class DaemonExited(DaemonError):
    """The daemon exited while the harness waited for it to become ready."""

    def __init__(self, message: str, returncode: int | None) -> None:
        super().__init__(message)
        self.returncode = returncode


class DaemonNotReady(DaemonError):
    """The daemon was still not serving when the readiness bound expired."""


def socket_accepts(path: str | os.PathLike[str], timeout: float = 0.5) -> bool:
    """True if a Unix stream socket at *path* (``@name``: abstract) accepts a connection."""
    address: str | bytes = os.fspath(path)
    if isinstance(address, str) and address.startswith("@"):
        address = b"\0" + address[1:].encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError:
            return False
        return True


@dataclass
class Run:
    """One instance of the daemon, from spawn to exit."""

    number: int
    pid: int
    started: float  # time.monotonic() at spawn
    log_offset: int  # where this run's output starts in the log file
    starttime: int | None = None  # kernel start time (clock ticks), names the process
    ready_at: float | None = None
    killed_at: float | None = None
    kill_signal: int | None = None
    returncode: int | None = None

    @property
    def seconds_to_ready(self) -> float | None:
        return None if self.ready_at is None else self.ready_at - self.started


# --- process spawning --------------------------------------------------------

# PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the
# process.  Spawning from one long-lived thread makes it mean "when this
# process dies", whichever thread (a test, a chaos thread) asked for the start.
_spawner: concurrent.futures.ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _spawn_executor() -> concurrent.futures.ThreadPoolExecutor:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="runtimefaults-spawner"
            )
        return _spawner


def _pdeathsig_argv() -> list[str]:
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _session_members(sid: int, not_before: int | None) -> list[int]:
    """PIDs whose session id is *sid* (and which started at or after *not_before*)."""
    return host_proc.session_members(sid, not_before)


def _kill_session(sid: int, starttime: int | None) -> None:
    spared = host_proc.ancestors()
    for pid in _session_members(sid, starttime):
        if pid in spared:
            continue  # never the reaper itself or what runs it, whatever a journal says
        with swallowed(ProcessLookupError, "killing %d of session %d", pid, sid):
            os.kill(pid, signal.SIGKILL)


def _reap_daemon(record: dict[str, Any]) -> None:
    """Journal reaper for kind ``daemon``: its leader and its whole session.

    Only if the leader is recognisably the recorded daemon (same start time and
    command line; :func:`~pytest_runtimefaults.journal.recorded_process_alive`),
    or gone: a session whose id is a PID now held by a stranger is not ours.
    """
    # Raises RefusedToReap for PID 1, an ancestor, a missing start time or command
    # line, or a PID that now runs something else.
    if recorded_process_alive(record):
        with swallowed(ProcessLookupError, "killing daemon %s", record["pid"]):
            os.kill(int(record["pid"]), signal.SIGKILL)
    elif process_starttime(int(record["pid"])) is not None and host_proc.alive(int(record["pid"])):
        return  # the PID is a stranger's now: so is a session with its id
    _kill_session(int(record["pid"]), int(record["starttime"]))


# --- the harness ---------------------------------------------------------------


class Daemon:
    """A daemon under test: one command, restarted as many times as the test wants.

    *argv* and *env* (the whole environment; default: this process's) are used
    for every start.  Readiness, checked by :meth:`wait_ready` after each start,
    is every condition given: *socket_path* accepts a connection (``@name`` for
    an abstract socket); a line of output matches *ready_log* (a regex searched
    in this run's output only); *ready_probe()* returns true (exceptions count
    as not ready).  With none given, a started process counts as ready.
    *ready_timeout* bounds every wait.

    Output (stdout and stderr) of all runs goes to one file, *log_path*
    (default: a file in a private temporary directory, removed on
    :meth:`stop` unless *keep_logs*).  *stop_signal* and *stop_timeout* say how
    :meth:`stop` asks the daemon to exit before it uses SIGKILL.

    With a *journal*, every instance is recorded as it starts (kind
    ``daemon``), so a killed test run's daemons are reaped by the next one;
    when *argv* is a wrapper that execs the daemon (``nsenter ... containerd``),
    *exec_argv* is the command line it execs, by which the reaper knows it.
    With a *registry*, each :meth:`kill` is registered as a fault whose lift
    restarts the daemon if it is down, and the daemon offers a health probe
    ``daemon <name>``.
    """

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        socket_path: str | os.PathLike[str] | None = None,
        ready_log: str | re.Pattern[str] | None = None,
        ready_probe: Callable[[], object] | None = None,
        ready_timeout: float = 10.0,
        name: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
        keep_logs: bool = False,
        stop_signal: int = signal.SIGTERM,
        stop_timeout: float = 5.0,
        fatal_patterns: Sequence[str] = DEFAULT_FATAL_PATTERNS,
        journal: Journal | None = None,
        registry: FaultRegistry | None = None,
        die_with_parent: bool = True,
        exec_argv: Sequence[str | os.PathLike[str]] | None = None,
    ) -> None:
        if not argv:
            raise ValueError("Daemon needs a command (argv is empty)")
        self.argv = [os.fspath(a) for a in argv]
        # What argv execs into when it is a wrapper (``nsenter ... containerd``):
        # the journal's reaper recognises the daemon by either command line.
        self.exec_argv = [os.fspath(a) for a in exec_argv] if exec_argv is not None else None
        self.name = name or Path(self.argv[0]).name
        self.env = dict(env) if env is not None else None
        self.cwd = os.fspath(cwd) if cwd is not None else None
        self.socket_path = os.fspath(socket_path) if socket_path is not None else None
        self.ready_log = re.compile(ready_log) if isinstance(ready_log, str) else ready_log
        self.ready_probe = ready_probe
        self.ready_timeout = ready_timeout
        self.stop_signal = stop_signal
        self.stop_timeout = stop_timeout
        self.fatal_patterns = [re.compile(p, re.MULTILINE) for p in fatal_patterns]
        # Journaled by default (the journal `runtimefaults cleanup` reads): a
        # plain script killed half-way leaves nothing the next run cannot reap.
        self.journal = journal if journal is not None else Journal.default()
        self.registry = registry
        self.die_with_parent = die_with_parent
        self.keep_logs = keep_logs
        self._own_dir: str | None = None
        if log_path is None:
            self._own_dir = tempfile.mkdtemp(prefix=f"rfd-{self.name[:12]}-")
            log_path = os.path.join(self._own_dir, "daemon.log")
        self.log_path = Path(log_path)
        self._dir_journal_id: int | None = None
        if self._own_dir is not None:
            self._dir_journal_id = self.journal.add("path", path=self._own_dir)
        self.runs: list[Run] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._journal_ids: dict[int, int] = {}  # pid -> journal id
        self._lock = threading.RLock()
        self._closed = False
        if registry is not None:
            registry.add_probe(f"daemon {self.name}", self.probe)

    # -- context manager -----------------------------------------------------

    def __enter__(self) -> Daemon:
        # __exit__ is not called when __enter__ raises: clean up here.
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<Daemon {self.name} {state}, {len(self.runs)} run(s)>"

    # -- state -----------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """PID of the current instance, or None if none was started or it exited."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last instance (negative: killed by that signal)."""
        proc = self._proc
        return None if proc is None else proc.poll()

    @property
    def current_run(self) -> Run | None:
        return self.runs[-1] if self.runs else None

    @property
    def logs(self) -> str:
        """Everything every instance wrote to stdout and stderr, with a header per run."""
        try:
            return self.log_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def run_log(self, run: Run | None = None) -> str:
        """What one instance (default: the latest) wrote."""
        run = run or self.current_run
        if run is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(run.log_offset)
                data = f.read()
        except FileNotFoundError:
            return ""
        later = [r.log_offset for r in self.runs if r.number > run.number]
        if later:
            data = data[: later[0] - run.log_offset]
        return data.decode(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        """The last *lines* lines of the log, for error messages."""
        return "\n".join(self.logs.splitlines()[-lines:])

    def fatal_errors(self) -> list[str]:
        """Log lines, of every run, that match a fatal pattern (panics, fatal errors)."""
        found: list[str] = []
        for line in self.logs.splitlines():
            if any(p.search(line) for p in self.fatal_patterns):
                found.append(line)
        return found

    def assert_no_fatal_errors(self) -> None:
        """Raise :class:`DaemonError` quoting the lines if the daemon ever panicked."""
        found = self.fatal_errors()
        if found:
            raise DaemonError(
                f"{self.name} logged {len(found)} fatal error(s):\n"
                + "\n".join(found[:20])
                + f"\n--- log tail ({self.log_path}) ---\n{self.log_tail()}"
            )

    # -- lifecycle -------------------------------------------------------------

    def _spawn(self) -> None:
        """Start one instance; runs on the spawner thread."""
        with self._lock:
            if self._closed:
                raise DaemonError(f"{self.name}: harness already stopped")
            number = len(self.runs) + 1
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as log:
                log.write(f"--- runtimefaults: {self.name} run {number} ---\n".encode())
                # Flushed before the child writes to the same file, or the
                # header would land after its first lines.
                log.flush()
                offset = log.tell()
                argv = (_pdeathsig_argv() if self.die_with_parent else []) + self.argv
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    cwd=self.cwd,
                    start_new_session=True,
                )
            # Recorded before anything else can raise, so stop() always finds it.
            self._proc = popen
            run = Run(number, popen.pid, time.monotonic(), offset, process_starttime(popen.pid))
            self.runs.append(run)
            # The command line it runs once setpriv has exec'd it: the reaper
            # kills the PID only while it still runs this.
            then = {} if self.exec_argv is None else {"exec_cmdline": self.exec_argv}
            self._journal_ids[popen.pid] = self.journal.add(
                "daemon", name=self.name, pid=popen.pid, starttime=run.starttime,
                cmdline=self.argv, **then,
            )  # fmt: skip

    def start(self, *, wait: bool = True, timeout: float | None = None) -> float | None:
        """Start an instance (no-op if one is running); wait until it serves.

        Returns the seconds from spawn to ready (None with ``wait=False``).
        Raises :class:`DaemonExited` if it exits first, :class:`DaemonNotReady`
        when *timeout* (default *ready_timeout*) expires; the instance is then
        left running for the test to inspect (``stop()`` ends it).
        """
        with self._lock:
            if self._closed:
                raise DaemonError(f"{self.name}: harness already stopped; make a new Daemon")
            if self.running:
                return 0.0
            if self._proc is not None:
                self._reap_current()
        # The start happens on the spawner thread (see module docstring); if this
        # thread is interrupted (pytest-timeout's SIGALRM), _spawn still records
        # the process, so stop() still ends it.
        _spawn_executor().submit(self._spawn).result()
        if not wait:
            return None
        return self.wait_ready(timeout)

    def ready(self) -> bool:
        """True if every readiness condition holds for the current instance now."""
        run = self.current_run
        if run is None or not self.running:
            return False
        if self.socket_path is not None and not socket_accepts(self.socket_path):
            return False
        if self.ready_log is not None and not self.ready_log.search(self.run_log(run)):
            return False
        if self.ready_probe is not None:
            try:
                if not self.ready_probe():
                    return False
            except Exception:
                # A probe that raises means "not ready yet": logged, polled again.
                logger.debug("%s: readiness probe raised", self.name, exc_info=True)
                return False
        return True

    def probe(self) -> bool:
        """Health probe for the recovery marker: running and ready, else raises."""
        if not self.running:
            raise DaemonError(
                f"{self.name} is not running (exit status {self.returncode})\n{self.log_tail()}"
            )
        if not self.ready():
            raise DaemonError(f"{self.name} is running but not serving\n{self.log_tail()}")
        return True

    def wait_ready(self, timeout: float | None = None) -> float:
        """Wait until the current instance serves; return seconds since its spawn."""
        run = self.current_run
        if run is None:
            raise DaemonError(f"{self.name} was never started")
        bound = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + bound
        while True:
            if self.ready():
                run.ready_at = time.monotonic()
                return run.ready_at - run.started
            proc = self._proc
            if proc is not None and proc.poll() is not None:
                run.returncode = proc.returncode
                self._release(proc.pid)
                raise DaemonExited(
                    f"{self.name} exited with status {proc.returncode} before it was "
                    f"ready (command: {' '.join(self.argv)})\n"
                    f"--- its output ---\n{self.run_log(run).strip()}",
                    proc.returncode,
                )
            if time.monotonic() >= deadline:
                raise DaemonNotReady(
                    f"{self.name} (pid {run.pid}) not ready after {bound:.1f} s: "
                    + self._readiness_text()
                    + f"\n--- its output ---\n{self.run_log(run).strip()[-4000:]}"
                )
            time.sleep(_POLL)

    def _readiness_text(self) -> str:
        wanted = []
        if self.socket_path is not None:
            wanted.append(f"socket {self.socket_path} accepting")
        if self.ready_log is not None:
            wanted.append(f"a log line matching {self.ready_log.pattern!r}")
        if self.ready_probe is not None:
            wanted.append("ready_probe() true")
        return "waited for " + " and ".join(wanted or ["the process"])

    def kill(
        self, sig: int = signal.SIGKILL, *, group: bool = False, wait: float | None = 5.0
    ) -> int | None:
        """Send *sig* to the current instance, as the OOM killer would (SIGKILL).

        Only the daemon's main process gets it, like an OOM kill, unless
        *group*.  Waits up to *wait* seconds for it to exit (None: don't wait)
        and returns its exit status (None if it did not exit).  With a
        registry, the kill is registered as a fault lifted by :meth:`revive`.
        """
        with self._lock:
            proc, run = self._proc, self.current_run
            if proc is None or run is None or proc.poll() is not None:
                raise DaemonError(f"{self.name} is not running: nothing to kill")
            run.killed_at = time.monotonic()
            run.kill_signal = sig
            with swallowed(ProcessLookupError, "killing %s", self.name):
                if group:
                    os.killpg(proc.pid, sig)
                else:
                    proc.send_signal(sig)
        if self.registry is not None:
            self.registry.add(f"{_signal_name(sig)} {self.name}", lift=self.revive)
        if wait is None:
            return None
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            return None
        run.returncode = proc.returncode
        self._release(proc.pid)
        return proc.returncode

    def revive(self) -> None:
        """Start the daemon again if it is down (the lift of a kill fault).

        Does not wait for it to serve: that wait is the recovery time the
        ``recovers`` marker measures with the probe ``daemon <name>``.
        """
        if not self._closed and not self.running:
            self.start(wait=False)

    def restart(self, *, timeout: float | None = None) -> float:
        """Stop the current instance (gracefully) if running, start again, wait.

        Returns seconds from the new spawn to ready.
        """
        if self.running:
            self._stop_current()
        result = self.start(timeout=timeout)
        assert result is not None
        return result

    def crash_restart(self, sig: int = signal.SIGKILL, *, timeout: float | None = None) -> float:
        """Kill with *sig* (SIGKILL: an OOM kill), start again over what it left.

        Returns the time to serve again: seconds from the kill until the new
        instance is ready.
        """
        self.kill(sig)
        killed_at = self.runs[-1].killed_at
        assert killed_at is not None
        self.start(timeout=timeout)
        ready_at = self.runs[-1].ready_at
        assert ready_at is not None
        return ready_at - killed_at

    def time_to_serve_again(self) -> float | None:
        """Seconds from the last kill to the next instance being ready, if both happened."""
        for earlier, later in zip(reversed(self.runs[:-1]), reversed(self.runs), strict=False):
            if earlier.killed_at is not None and later.ready_at is not None:
                return later.ready_at - earlier.killed_at
        return None

    def _reap_current(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is not None:
            if self.current_run is not None:
                self.current_run.returncode = proc.returncode
            self._release(proc.pid)

    def _release(self, pid: int) -> None:
        rid = self._journal_ids.pop(pid, None)
        if rid is not None:
            self.journal.release(rid)

    def _stop_current(self) -> None:
        proc, run = self._proc, self.current_run
        if proc is None:
            return
        if proc.poll() is None:
            with swallowed(ProcessLookupError, "signalling %s", self.name):
                proc.send_signal(self.stop_signal)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                with swallowed(ProcessLookupError, "killing %s", self.name):
                    proc.kill()
                proc.wait()
        # Whatever the instance started in its session goes with it.
        _kill_session(proc.pid, run.starttime if run is not None else None)
        if run is not None:
            run.returncode = proc.returncode
        self._release(proc.pid)

    def leftover_pids(self) -> list[int]:
        """Live processes in the sessions of this daemon's dead instances.

        An instance runs in its own session, so whatever it forked and did not
        take with it when it died (a SIGKILL does not) is found here.
        """
        live = self.pid
        pids: list[int] = []
        for run in self.runs:
            if run.pid == live:
                continue
            pids.extend(_session_members(run.pid, run.starttime))
        return pids

    def stop(self) -> None:
        """Stop the current instance and everything any instance left in its session.

        Idempotent; safe after any outcome (the daemon crashed, never started,
        or a timeout interrupted a restart).  After it, the harness cannot
        start again.
        """
        with self._lock:
            self._closed = True
            # A start may be under way on the spawner thread: let it finish so
            # its process is known and ended here.
        with swallowed(Exception, "waiting for a start under way on the spawner"):
            _spawn_executor().submit(lambda: None).result(timeout=10)
        with self._lock:
            try:
                self._stop_current()
            finally:
                for run in self.runs:
                    _kill_session(run.pid, run.starttime)
                    self._release(run.pid)
                if self._own_dir is not None and not self.keep_logs:
                    with swallowed(OSError, "removing %s", self._own_dir):
                        shutil.rmtree(self._own_dir)
                if self._dir_journal_id is not None:
                    self.journal.release(self._dir_journal_id)
                    self._dir_journal_id = None

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """``with daemon.down():`` the daemon is stopped inside the block, started after."""
        if self.running:
            self._stop_current()
        try:
            yield
        finally:
            self.start()


def connect_error(path: str | os.PathLike[str], timeout: float = 0.5) -> str | None:
    """None if *path* accepts a connection, else the error, e.g. ``ECONNREFUSED``."""
    address: str | bytes = os.fspath(path)
    if isinstance(address, str) and address.startswith("@"):
        address = b"\0" + address[1:].encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except TimeoutError:
            return "timeout"
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, str(exc))
        return None
