"""Recovery and a failure budget against a real daemon on a real Unix socket.

The "runtime" here is a small echo daemon started as a subprocess; the fault
kills it with SIGKILL (leaving its socket file behind, as a crashed daemon
does) and lifting the fault restarts it.  ``recovers`` then waits for the
registered probe; the failure budget repeats a client call 50 times.
"""

import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from pytest_runtimefaults import leaks
from pytest_runtimefaults.recovery import UnixSocketProbe

DAEMON = """
import os, socket, sys
path = sys.argv[1]
if os.path.lexists(path):
    os.unlink(path)  # a stale socket from the previous, killed instance
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(64)
while True:
    conn, _ = server.accept()
    try:
        conn.sendall(conn.recv(64).upper())
    except OSError:
        pass  # a client (or a probe) that hung up early
    conn.close()
"""


class EchoDaemon:
    """A real daemon process: start() returns once it accepts connections."""

    def __init__(self, path):
        self.path = path
        self.proc = None

    def spawn(self):
        self.proc = subprocess.Popen([sys.executable, "-c", DAEMON, self.path])

    def start(self):
        self.spawn()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                return UnixSocketProbe(self.path).check(timeout=1)
            except Exception:
                time.sleep(0.01)
        raise TimeoutError(f"daemon did not listen on {self.path}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()


def echo(path, text):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(path)
        s.sendall(text.encode())
        return s.recv(64).decode()


@pytest.fixture
def daemon(runtimefaults_faults, runtimefaults_journal):
    """The daemon under test; offers the 'runtime' probe and a process leak check."""
    directory = tempfile.mkdtemp(prefix="rfdoc", dir="/tmp")
    rid = runtimefaults_journal.add("path", path=directory)  # reaped if pytest is killed
    d = EchoDaemon(os.path.join(directory, "echo.sock"))
    d.start()
    runtimefaults_faults.add_probe("runtime", lambda: echo(d.path, "ping") == "PING")
    runtimefaults_faults.add_leak_check(
        "processes:daemon-children", functools.partial(leaks.child_processes, d.proc.pid)
    )
    yield d
    d.stop()
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    os.rmdir(directory)
    runtimefaults_journal.release(rid)


@pytest.fixture
def daemon_crash(daemon, runtimefaults_faults):
    """Kill the daemon with SIGKILL; lifting the fault spawns it again.

    The lift does not wait for the daemon to listen: that wait is the recovery
    time ``recovers`` measures.
    """
    daemon.stop()
    runtimefaults_faults.add("daemon SIGKILL", lift=daemon.spawn)
    return daemon


@pytest.mark.recovers(within=10)
def test_daemon_comes_back_after_sigkill(daemon_crash):
    with pytest.raises(ConnectionRefusedError):  # the stale socket refuses
        echo(daemon_crash.path, "ping")


@pytest.mark.recovers(within=10, probe="runtime")
@pytest.mark.failure_budget(runs=50, max_rate=0.02)
def test_echo_is_reliable(daemon):
    assert echo(daemon.path, "hello") == "HELLO"
