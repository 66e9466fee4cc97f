"""Incident 3 (Dragonfly dfdaemon): a daemon over every stale-socket variant, and a SIGKILL.

Each variant of :mod:`pytest_runtimefaults.sockets` is planted at the socket
path of a real daemon (containerd and dbus-daemon by default; any daemon with
``--runtimefaults-daemon 'CMD ... {socket}'``), which is then started there.
A correct daemon serves over a stale socket and refuses, with a clear error
and nothing damaged, a live socket, a file, a directory, a symlink, a
directory someone else controls, a held abstract name.  Once the path is
cleared it must serve.  The SIGKILL scenario kills the daemon while a client
talks to it, restarts it over what it left and measures the time to serve
again.  The stale-shim scenario (containerd only; containerd issues 11292,
10192, 7394) SIGKILLs a running task's shim while containerd is down, so its
socket stays in ``/run/containerd/s``, and restarts containerd over it.

Each scenario records a verdict: ``survives`` (served a stale socket, or
restarted and serves), ``fails_cleanly`` (refused as it should, or the
client's call failed at once and the daemon serves again), ``misbehaves``
(served where it must refuse: stole a live socket, deleted a file or a
symlink; or refused a stale socket, the Dragonfly crash-loop), ``blocks``
(neither served nor exited within the bound), ``leaks`` (processes left),
``crashes`` (a panic in its log).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_runtimefaults import caps
from pytest_runtimefaults.containerd import Containerd
from pytest_runtimefaults.daemon import Daemon, DaemonError, connect_error
from pytest_runtimefaults.expectations import Outcome, Version, installed_version
from pytest_runtimefaults.sockets import VARIANTS, StaleSocket
from pytest_runtimefaults.sockets import Verdict as SocketVerdict

pytestmark = [pytest.mark.family("sockets"), pytest.mark.timeout(60)]

BOUND = 10.0  # seconds a daemon may take to serve, refuse, or serve again

#: the daemons run when --runtimefaults-daemon is not given
DEFAULT_DAEMONS = ("containerd", "dbus-daemon")

#: the expectations table's fault id of each variant
FAULT_OF_VARIANT = {
    "stale": "socket:stale",
    "live": "socket:live",
    "file": "socket:regular-file",
    "directory": "socket:directory",
    "symlink": "socket:symlink",
    "foreign-dir": "socket:foreign-dir",
    "open-dir": "socket:open-dir",
    "abstract": "socket:abstract",
    "bind-mount": "socket:bind-mount",
}

# A crash, not a refusal: containerd reports a bad socket path with an error
# line and exit 1, which the harness's "level=fatal" pattern would also match.
_PANIC = re.compile(r"^panic: |fatal error:|^SIG(ABRT|BUS|FPE|ILL|SEGV|SYS|TRAP): |panicked at")


@dataclass(frozen=True)
class DaemonSpec:
    """One ``--runtimefaults-daemon`` value: a built-in name or a command with ``{socket}``."""

    text: str

    @property
    def builtin(self) -> bool:
        return self.text in DEFAULT_DAEMONS

    @property
    def component(self) -> str:
        """The expectations table's component name (a command: its program's name)."""
        return self.text if self.builtin else os.path.basename(shlex.split(self.text)[0])

    def argv(self, path: str) -> list[str]:
        """The command line for a daemon listening on *path* (``@name``: abstract)."""
        if self.text == "dbus-daemon":
            address = f"unix:abstract={path[1:]}" if path.startswith("@") else f"unix:path={path}"
            return [
                "dbus-daemon",
                "--session",
                "--nofork",
                "--nopidfile",
                "--print-address=1",
                f"--address={address}",
            ]
        return [arg.replace("{socket}", path) for arg in shlex.split(self.text)]

    def version(self) -> Version | None:
        return installed_version(self.component) if self.builtin else None


def parse_daemon_specs(values: list[str] | None) -> list[DaemonSpec]:
    """The daemons of ``--runtimefaults-daemon`` (default: :data:`DEFAULT_DAEMONS`).

    A value that is neither a built-in name nor a command line holding
    ``{socket}`` is a usage error saying so.
    """
    specs = [DaemonSpec(v.strip()) for v in (values or DEFAULT_DAEMONS)]
    for spec in specs:
        if spec.builtin:
            continue
        try:
            words = shlex.split(spec.text)
        except ValueError as exc:
            raise pytest.UsageError(f"--runtimefaults-daemon {spec.text!r}: {exc}") from None
        if not words or not any("{socket}" in w for w in words):
            raise pytest.UsageError(
                f"--runtimefaults-daemon {spec.text!r}: give 'containerd', 'dbus-daemon' or a "
                "command line with {socket} where the socket path goes, e.g. "
                "'mydaemon --listen {socket}'"
            )
    return specs


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    specs = parse_daemon_specs(metafunc.config.getoption("runtimefaults_daemon", None))
    if "spec" in metafunc.fixturenames:
        ids = [s.text if s.builtin else f"cmd:{s.component}" for s in specs]
        metafunc.parametrize("spec", specs, ids=ids)
    if "containerd_spec" in metafunc.fixturenames:
        # A shim is containerd's: the scenario runs once, if containerd is a daemon under test.
        ours: list[Any] = [s for s in specs if s.text == "containerd"]
        skip = pytest.mark.skip(reason="--runtimefaults-daemon does not name containerd")
        params = ours or [pytest.param(DaemonSpec("containerd"), marks=skip)]
        metafunc.parametrize("containerd_spec", params, ids=["containerd"])


class Subject:
    """The daemon under test at one socket path: a private containerd, or a
    :class:`~pytest_runtimefaults.daemon.Daemon` from the ``daemon`` fixture."""

    def __init__(self, spec: DaemonSpec, path: str, factory: Callable[..., Daemon]) -> None:
        self.spec = spec
        self.path = path
        self.containerd: Containerd | None = None
        if spec.text == "containerd":
            self.containerd = Containerd(socket_path=path, ready_timeout=BOUND)
            self.containerd.prepare()
            self.daemon = self.containerd.daemon
        else:
            self.daemon = factory(
                spec.argv(path),
                socket_path=path,
                ready_log=r"^unix:" if spec.text == "dbus-daemon" else None,
                ready_timeout=BOUND,
                name=spec.component,
                start=False,
            )

    def panics(self) -> list[str]:
        return [line for line in self.daemon.logs.splitlines() if _PANIC.search(line)]

    def leftovers(self) -> list[str]:
        """Processes the daemon's dead instances left in their sessions; for
        containerd, its orphans instead (a shim outliving containerd is by
        design, as long as the restarted containerd knows its task)."""
        if self.containerd is not None:
            return sorted(self.containerd.orphans()) if self.containerd.running else []
        return [f"{self.spec.component}: pid {pid}" for pid in self.daemon.leftover_pids()]

    def stop(self) -> None:
        if self.containerd is not None:
            self.containerd.stop()
        else:
            self.daemon.stop()


def _subjects(
    spec: DaemonSpec, daemon: Callable[..., Daemon], request: pytest.FixtureRequest
) -> Callable[[str], Subject]:
    caps.require_root(request, "stale-socket variants chown directories and bind-mount")
    program = "containerd" if spec.text == "containerd" else spec.argv("/x")[0]
    caps.require_command(request, program, package=program)

    def make(path: str) -> Subject:
        made = Subject(spec, path, daemon)
        request.addfinalizer(made.stop)
        return made

    return make


@pytest.fixture
def subject(
    spec: DaemonSpec, daemon: Callable[..., Daemon], request: pytest.FixtureRequest
) -> Callable[[str], Subject]:
    """Factory: ``subject(path)`` is the daemon of *spec* set up (not started) at *path*."""
    return _subjects(spec, daemon, request)


@pytest.fixture
def containerd_subject(
    containerd_spec: DaemonSpec, daemon: Callable[..., Daemon], request: pytest.FixtureRequest
) -> Callable[[str], Subject]:
    """Factory: ``containerd_subject(path)``, a private containerd set up at *path*."""
    return _subjects(containerd_spec, daemon, request)


def variant_outcome(
    verdict: SocketVerdict, *, panics: list[str], serves_after: str | None
) -> Outcome:
    """The outcome of one variant from what the daemon did with it.

    *verdict*: :meth:`StaleSocket.judge`'s; *panics*: crash lines in its log;
    *serves_after*: None if it served once the path was cleared, else why not.
    """
    if panics:
        return Outcome.CRASHES
    if verdict.outcome == "hung":
        return Outcome.BLOCKS
    if not verdict.ok or serves_after is not None:
        return Outcome.MISBEHAVES
    return Outcome.SURVIVES if verdict.outcome == "served" else Outcome.FAILS_CLEANLY


@pytest.mark.parametrize("variant", VARIANTS)
def test_daemon_over_a_stale_socket_variant(
    spec: DaemonSpec,
    variant: str,
    # stale_socket before subject: the daemon is stopped before the variant's
    # directory (where its socket is) is removed, or its teardown waits on ctr.
    stale_socket: Callable[..., StaleSocket],
    subject: Callable[[str], Subject],
    verdict: Any,
) -> None:
    """A daemon started over a stale-socket variant: serves a stale socket, refuses the rest."""
    stale = stale_socket(variant=variant)
    under_test = subject(stale.path)
    judged = stale.judge(under_test.daemon, timeout=BOUND)
    # Recovered also means: once the path is cleared, the daemon serves there.
    stale.lift()
    serves_after: str | None = None
    try:
        under_test.daemon.restart(timeout=BOUND)
    except DaemonError as exc:
        serves_after = str(exc).splitlines()[0]
    evidence = str(judged) + (f"; once cleared: {serves_after}" if serves_after else "")
    if variant == "abstract" and serves_after is not None:
        # The held name is free again: a daemon that still cannot listen there
        # cannot use abstract names at all (containerd chmods "@name.ttrpc"),
        # which its refusal above already shows; not a second defect.
        evidence += " (it cannot listen on an abstract name at all)"
        serves_after = None
    outcome = variant_outcome(judged, panics=under_test.panics(), serves_after=serves_after)
    leftovers = under_test.leftovers()
    verdict.record(
        Outcome.LEAKS
        if leftovers and outcome in (Outcome.SURVIVES, Outcome.FAILS_CLEANLY)
        else outcome,
        component=spec.component,
        fault=FAULT_OF_VARIANT[variant],
        evidence=evidence,
        version=spec.version(),
        seconds=judged.seconds,
        leftovers=leftovers,
    )


# --- SIGKILL while a client talks to it, and restart -----------------------------------


def sigkill_outcome(
    *, panics: list[str], client_error: str | None, serves_again: str | None, lost: str | None
) -> Outcome:
    """The outcome of a SIGKILL + restart.

    *client_error*: what the client's call ended with (None: it was still
    waiting at the bound); *serves_again*: None if the restarted daemon
    serves, else why not; *lost*: None, or what the restart lost (a running
    container containerd no longer knows).
    """
    if panics:
        return Outcome.CRASHES
    if client_error is None:
        return Outcome.BLOCKS
    if serves_again is not None:
        # Refusing its own stale socket is the Dragonfly crash-loop; hanging, a block.
        return Outcome.BLOCKS if "not ready after" in serves_again else Outcome.MISBEHAVES
    if lost is not None:
        return Outcome.MISBEHAVES
    return Outcome.FAILS_CLEANLY


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A private directory with a short path (a Unix socket path has at most 107 bytes)."""
    path = tempfile.mkdtemp(prefix="rfsk-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _client_of_containerd(ctd: Containerd) -> subprocess.Popen[str]:
    """``ctr events``: a long call in flight when containerd dies."""
    return subprocess.Popen(
        ctd.ctr_argv("events"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_client(proc: subprocess.Popen[str], bound: float) -> str | None:
    try:
        out, _ = proc.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return f"rc {proc.returncode}: {lines[-1] if lines else '(no output)'}"


def _wait_socket_client(sock: socket.socket, bound: float) -> str | None:
    sock.settimeout(bound)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return "EOF"
    except TimeoutError:
        return None
    except OSError as exc:
        return type(exc).__name__
    finally:
        sock.close()


def test_daemon_sigkill_and_restart(
    spec: DaemonSpec,
    short_dir: str,
    subject: Callable[[str], Subject],
    verdict: Any,
    request: pytest.FixtureRequest,
) -> None:
    """SIGKILL the daemon mid-call, restart it over its socket: time to serve again."""
    path = os.path.join(short_dir, "d.sock")
    under_test = subject(path)
    daemon = under_test.daemon
    ctd = under_test.containerd
    lost: str | None = None
    if ctd is not None:
        # a running container: containerd 2 writes cpu.weight for it
        caps.require_container_controllers(request)
        daemon.start()
        image = ctd.import_busybox()
        ctd.run(image, "rf-keeps", "sleep", "3600", detach=True)
        client: Any = _client_of_containerd(ctd)
    else:
        daemon.start()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
    time.sleep(0.2)  # the client's call is in flight
    daemon.kill()
    killed_at = time.monotonic()
    if ctd is not None:
        client_error = _wait_client(client, BOUND)
    else:
        client_error = _wait_socket_client(client, BOUND)
    client_s = time.monotonic() - killed_at
    serves_again: str | None = None
    try:
        daemon.start(timeout=BOUND)
    except DaemonError as exc:
        serves_again = str(exc).splitlines()[0]
    seconds = daemon.time_to_serve_again()
    if ctd is not None and serves_again is None:
        tasks = ctd.ctr("tasks", "ls").stdout.split()
        if "rf-keeps" not in tasks or tasks[tasks.index("rf-keeps") + 2] != "RUNNING":
            lost = "the running container rf-keeps is no longer RUNNING after the restart"
        else:
            ctd.run(ctd.import_busybox(), "rf-after", "true")  # the next operation
    elif serves_again is None and connect_error(path) is not None:
        serves_again = f"ready, but {path} refuses: {connect_error(path)}"
    outcome = sigkill_outcome(
        panics=under_test.panics(), client_error=client_error, serves_again=serves_again, lost=lost
    )
    leftovers = under_test.leftovers()
    if leftovers and outcome is Outcome.FAILS_CLEANLY:
        outcome = Outcome.LEAKS
    evidence = (
        f"client: {client_error or f'still waiting after {BOUND:.0f} s'} ({client_s:.2f} s after "
        f"the kill); restart: {serves_again or f'serves again {seconds:.3f} s after the kill'}"
        + (f"; {lost}" if lost else "")
        + ("; the running container was re-adopted" if ctd is not None and not lost else "")
    )
    verdict.record(
        outcome,
        component=spec.component,
        fault="daemon:sigkill",
        evidence=evidence,
        version=spec.version(),
        seconds=seconds,
        leftovers=leftovers,
    )


# --- a SIGKILLed shim's socket left for containerd's next start ----------------------


def shim_sockets(ctd: Containerd) -> set[str]:
    """The sockets in the directory where containerd keeps its shims' sockets."""
    where = ctd.shim_socket_dir
    return {p.name for p in where.iterdir()} if where.is_dir() else set()


def dead(pid: int) -> bool:
    """*pid* is gone or a zombie (a SIGKILLed shim whose parent has not reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def stale_shim_outcome(
    *, panics: list[str], serves_again: str | None, problems: list[str], left: list[int]
) -> Outcome:
    """The outcome of a restart over a killed shim's socket.

    *serves_again*: None if containerd serves again within the bound, else
    why not; *problems*: the task still listed running, or the same ID or a new
    container failing to run; *left*: PIDs of the task still running.
    """
    if panics:
        return Outcome.CRASHES
    if serves_again is not None:
        return Outcome.BLOCKS if "not ready after" in serves_again else Outcome.MISBEHAVES
    if problems:
        return Outcome.MISBEHAVES
    return Outcome.LEAKS if left else Outcome.SURVIVES


def test_containerd_restart_over_a_killed_shims_socket(
    containerd_spec: DaemonSpec,
    short_dir: str,
    containerd_subject: Callable[[str], Subject],
    verdict: Any,
    request: pytest.FixtureRequest,
) -> None:
    """A running task's shim SIGKILLed while containerd is down, its socket left: containerd
    restarts over it, does not report the task running, and the same ID runs again."""
    caps.require_container_controllers(request)  # a running container
    under_test = containerd_subject(os.path.join(short_dir, "d.sock"))
    ctd = under_test.containerd
    assert ctd is not None
    daemon = under_test.daemon
    daemon.start()
    image = ctd.import_busybox()
    before = shim_sockets(ctd)
    ctd.run(image, "rf-keeps", "sleep", "3600", detach=True)
    ours = shim_sockets(ctd) - before  # the new task's shim (others may share the directory)
    shim = ctd.shims()["rf-keeps"]
    ctd.kill()
    os.kill(shim, signal.SIGKILL)
    deadline = time.monotonic() + BOUND
    while not dead(shim) and time.monotonic() < deadline:
        time.sleep(0.01)
    left_at_start = sorted(ours & shim_sockets(ctd))
    # No stale socket, no fault: the scenario would judge a plain restart.
    assert left_at_start, f"the killed shim left no socket in {ctd.shim_socket_dir}"
    serves_again: str | None = None
    try:
        daemon.start(timeout=BOUND)
    except DaemonError as exc:
        serves_again = str(exc).splitlines()[0]
    seconds = daemon.time_to_serve_again()
    problems: list[str] = []
    left: list[int] = []
    if serves_again is None:
        tasks = ctd.ctr("tasks", "ls").stdout.splitlines()[1:]
        if any(t.split()[:1] == ["rf-keeps"] and "RUNNING" in t for t in tasks):
            problems.append("the killed shim's task is still listed RUNNING")
        left = sorted(ctd.cgroup_processes().get("rf-keeps", set()))
        ctd.remove_all_containers()
        for cid in ("rf-keeps", "rf-fresh"):
            try:
                ctd.run(image, cid, "true")
            except Exception as exc:  # what failed (CtrError, a timeout) is the evidence
                problems.append(f"{cid}: {str(exc).splitlines()[0]}")
    evidence = (
        f"stale shim sockets at the restart: {len(left_at_start)} of {len(ours)}; "
        f"restart: {serves_again or f'serves again {seconds:.3f} s after the kill'}; "
        f"still there after it: {len(ours & shim_sockets(ctd))}; task processes left: "
        f"{left or 'none'}; " + ("; ".join(problems) or "the same ID and a new one run")
    )
    outcome = stale_shim_outcome(
        panics=under_test.panics(), serves_again=serves_again, problems=problems, left=left
    )
    verdict.record(
        outcome,
        component="containerd",
        fault="daemon:stale-shim-socket",
        evidence=evidence,
        version=containerd_spec.version(),
        seconds=seconds,
        leftovers=[f"pid {pid} of rf-keeps" for pid in left],
    )
