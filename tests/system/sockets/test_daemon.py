"""The daemon harness against small real daemons and the real dbus-daemon."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from pytest_runtimefaults.daemon import (
    Daemon,
    DaemonError,
    DaemonExited,
    DaemonNotReady,
    connect_error,
    socket_accepts,
)
from pytest_runtimefaults.faults import FaultRegistry
from pytest_runtimefaults.journal import Journal, reap_dead_owners

# A tiny Unix-socket server: binds argv[1] after unlinking a stale file, prints
# "ready", answers "hi". Extra behaviours by argv[2]: "fork" leaves a child in
# its session; "panic" prints a Go panic and exits 2; "slow" waits 60 s first.
SERVER = textwrap.dedent(
    """
    import os, socket, sys, time
    path, mode = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""
    if mode == "slow":
        time.sleep(60)
    if mode == "panic":
        print("panic: sync: negative WaitGroup counter", flush=True)
        print("goroutine 1 [running]:", flush=True)
        sys.exit(2)
    if mode == "fork" and os.fork() == 0:
        time.sleep(120)
        os._exit(0)
    if os.path.exists(path):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(16)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        try:
            c.sendall(b"hi")
        except OSError:
            pass
        c.close()
    """
)


def server(tmp_path: Path, mode: str = "", **kwargs: object) -> Daemon:
    sock = tmp_path / "s.sock"
    marker = f"--marker={uuid.uuid4().hex}"
    kwargs.setdefault("socket_path", sock)
    return Daemon(
        [sys.executable, "-c", SERVER, str(sock), mode, marker],
        name="toy",
        **kwargs,  # type: ignore[arg-type]
    )


def pids_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.timeout(20)
def test_start_waits_for_the_socket_and_stop_ends_it(tmp_path: Path) -> None:
    d = server(tmp_path)
    with d:
        assert d.running
        assert socket_accepts(tmp_path / "s.sock")
        assert d.current_run is not None
        assert d.current_run.seconds_to_ready is not None
        pid = d.pid
    assert not d.running
    assert pid is not None
    assert not os.path.exists(f"/proc/{pid}")
    d.stop()  # idempotent


@pytest.mark.timeout(20)
def test_ready_log_and_probe(tmp_path: Path) -> None:
    calls: list[int] = []

    def probe() -> bool:
        calls.append(1)
        return len(calls) >= 3

    with server(tmp_path, socket_path=None, ready_log=r"^ready$", ready_probe=probe) as d:
        assert "ready" in d.run_log()
        assert len(calls) >= 3


@pytest.mark.timeout(20)
def test_exit_before_ready_raises_with_output_and_panic_is_detected(tmp_path: Path) -> None:
    d = server(tmp_path, "panic")
    with pytest.raises(DaemonExited, match="negative WaitGroup") as info:
        d.start()
    assert info.value.returncode == 2
    assert d.fatal_errors() == ["panic: sync: negative WaitGroup counter"]
    with pytest.raises(DaemonError, match="1 fatal error"):
        d.assert_no_fatal_errors()
    d.stop()


@pytest.mark.parametrize(
    "line",
    [
        "thread 'main' panicked at src/main.rs:3:5:",
        "fatal error: concurrent map writes",
        "SIGSEGV: segmentation violation",
        'time="x" level=fatal msg="failed to load plugin"',
    ],
)
def test_fatal_patterns(tmp_path: Path, line: str) -> None:
    d = Daemon(["true"], log_path=tmp_path / "log")
    (tmp_path / "log").write_text(f"ok\n{line}\nok\n")
    assert d.fatal_errors() == [line]
    (tmp_path / "log").write_text('level=info msg="no panic: here"\n')
    assert d.fatal_errors() == []


@pytest.mark.timeout(20)
def test_not_ready_is_bounded_and_names_what_it_waited_for(tmp_path: Path) -> None:
    d = server(tmp_path, "slow", ready_timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(DaemonNotReady, match=r"socket .*s\.sock accepting"):
        d.start()
    assert time.monotonic() - t0 < 5  # ready_timeout=0.3, not the default 30 s
    pid = d.runs[-1].pid
    d.stop()
    assert not os.path.exists(f"/proc/{pid}")


@pytest.mark.timeout(30)
def test_sigkill_leaves_stale_socket_and_restart_measures_time_to_serve(tmp_path: Path) -> None:
    with server(tmp_path) as d:
        assert d.kill() == -signal.SIGKILL
        assert connect_error(tmp_path / "s.sock") == "ECONNREFUSED"
        d.start()
        took = d.time_to_serve_again()
        assert took is not None
        assert 0 < took < 10
        assert 0 < d.crash_restart() < 10
        assert [r.kill_signal for r in d.runs] == [signal.SIGKILL, signal.SIGKILL, None]
        assert d.runs[0].returncode == -signal.SIGKILL
        assert d.logs.count("--- runtimefaults: toy run") == 3


@pytest.mark.timeout(30)
def test_any_signal_and_graceful_restart(tmp_path: Path) -> None:
    with server(tmp_path) as d:
        assert d.kill(signal.SIGTERM) == -signal.SIGTERM
        assert d.restart() > 0
        first = d.pid
        d.restart()
        assert d.pid != first
        assert d.running


@pytest.mark.timeout(30)
def test_stop_ends_children_left_by_a_killed_instance(tmp_path: Path) -> None:
    d = server(tmp_path, "fork")
    with d:
        time.sleep(0.2)
        d.kill()
        leftovers = d.leftover_pids()
        assert leftovers, "the forked child should outlive a SIGKILLed parent"
        d.start()
    for pid in leftovers:
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.timeout(30)
def test_registry_probe_and_kill_fault_lifted_by_restart(tmp_path: Path) -> None:
    registry = FaultRegistry()
    with server(tmp_path, registry=registry) as d:
        probe = registry.probes["daemon toy"]
        assert probe()
        d.kill()
        with pytest.raises(DaemonError, match="not running"):
            probe()
        assert [r.name for r in registry.active] == ["SIGKILL toy"]
        registry.lift_all()
        assert d.running  # started again; the lift does not wait for it to serve
        d.wait_ready()
        assert probe()


@pytest.mark.timeout(30)
def test_journal_records_each_instance_and_reaps_a_dead_owner(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "state")
    with server(tmp_path, journal=journal) as d:
        assert [r["kind"] for r in journal.live()] == ["path", "daemon"]  # logs, process
        d.crash_restart()
        assert [r.get("pid") for r in journal.live()] == [None, d.pid]
    assert journal.live() == []
    # A journal whose owner is dead: its daemon (and session) is reaped.
    owner = subprocess.Popen(["sleep", "0"])
    owner.wait()
    dead = Journal(tmp_path / "state2", owner_pid=owner.pid)
    dead.owner_starttime = 1
    dead.path = dead.state_dir / f"{owner.pid}-1.jsonl"
    orphan = server(tmp_path, die_with_parent=False)
    orphan.start()
    assert orphan.pid is not None
    dead.add("daemon", pid=orphan.pid, starttime=orphan.runs[0].starttime)
    result = reap_dead_owners(tmp_path / "state2")
    assert [r["kind"] for r in result.reaped] == ["daemon"]
    orphan._proc.wait(5)  # type: ignore[union-attr]
    assert not orphan.running
    orphan.stop()


@pytest.mark.timeout(20)
def test_real_dbus_daemon_restarts_over_its_stale_socket(tmp_path: Path) -> None:
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon not installed (apt-get install dbus-daemon)")
    sock = tmp_path / "bus"
    argv = ["dbus-daemon", "--session", "--nofork", "--nopidfile", f"--address=unix:path={sock}"]
    with Daemon(argv, socket_path=sock) as d:
        d.kill()
        assert connect_error(sock) == "ECONNREFUSED"
        assert d.start() is not None
        assert d.fatal_errors() == []


PYTESTER_RESTART = """
import signal, sys, time, uuid
import pytest
from pytest_runtimefaults.daemon import Daemon

SLOW = "import sys, time; time.sleep(3600)"

@pytest.mark.timeout(3, method="{method}")
def test_timeout_during_restart(daemon, tmp_path):
    d = daemon([sys.executable, "-c", SLOW, "{marker}"], socket_path=None,
               ready_probe=lambda: True)
    d.kill()
    # never ready: the socket is never bound; pytest-timeout fires in here
    d.socket_path = str(tmp_path / "never.sock")
    d.start(timeout=60)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["signal", "thread"])
def test_no_process_left_when_pytest_timeout_fires_during_restart(
    pytester: pytest.Pytester, method: str
) -> None:
    marker = f"rf-marker-{uuid.uuid4().hex}"
    pytester.makepyfile(PYTESTER_RESTART.format(method=method, marker=marker))
    state = pytester.path / "state"
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", f"--runtimefaults-state-dir={state}", "-p", "no:cacheprovider"
    )
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*Timeout*"])
    assert "test_timeout_during_restart" in result.stdout.str()
    for _ in range(200):
        if not pids_with(marker):
            break
        time.sleep(0.01)
    assert pids_with(marker) == []
    if method == "thread":
        # pytest died in os._exit: its journal is left for the next run to reap.
        assert list(state.glob("*.jsonl"))
        result = reap_dead_owners(state)
        assert not list(state.glob("*.jsonl"))
        logs = [r["path"] for r in result.reaped if r["kind"] == "path"]
        assert logs  # the harness's private log directory was journaled...
        assert not any(os.path.exists(p) for p in logs)  # ...and is gone


READY_TIMEOUT_TEST = """
import sys
import pytest
from pytest_runtimefaults.daemon import DaemonNotReady

def test_bound(daemon, tmp_path):
    with pytest.raises(DaemonNotReady, match="not ready after 0.3 s"):
        daemon([sys.executable, "-c", "import time; time.sleep(30)"],
               socket_path=str(tmp_path / "never"))
"""


def test_ready_timeout_option_and_ini(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(READY_TIMEOUT_TEST)
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-daemon-ready-timeout=0.3"
    )
    result.assert_outcomes(passed=1)
    pytester.makeini("[pytest]\nruntimefaults_daemon_ready_timeout = 0.3\n")
    result = pytester.runpytest_subprocess("-p", "runtimefaults")
    result.assert_outcomes(passed=1)
    pytester.makeini("[pytest]\nruntimefaults_daemon_ready_timeout = soon\n")
    result = pytester.runpytest_subprocess("-p", "runtimefaults")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "runtimefaults_daemon_ready_timeout must be a number of seconds" in result.stderr.str()
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-daemon-ready-timeout=0"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "must be a positive number" in result.stderr.str()


def test_fixture_docstrings_are_shown(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("-p", "runtimefaults", "--fixtures")
    out = result.stdout.str()
    for name in ("daemon", "containerd", "stale_socket"):
        assert f"\n{name} -- " in out or f"\n{name} [" in out or f"\n{name}\n" in out, name
    assert "Factory starting daemons under test" in out
