"""``runtimefaults proxy`` and ``runtimefaults bus`` given bad input, run as a user runs them.

Each case is the real command in a subprocess, against a real dbus-daemon
where one is needed (issue 11): a bad rule, an unwritable ``--pcap`` and an
unreachable ``--upstream`` exit 2 with one line at start; clients dropped
later are told on stderr as it happens; the summary counts the faults the
rules applied, not errors; ``runtimefaults bus`` ends when its daemon dies.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_runtimefaults.dbus.bus import PrivateBus

pytestmark = pytest.mark.timeout(120)
CLI = [sys.executable, "-m", "pytest_runtimefaults"]


@pytest.fixture
def bus() -> Iterator[PrivateBus]:
    with PrivateBus() as b:
        yield b


def _refused(*args: str) -> str:
    """Run the command, which must exit 2 at once; return its one line of stderr."""
    r = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("rule", "words"),
    [
        ("Delay(1) probability=abc", ["probability", "'abc'"]),
        ("Delay(1) probability=nan", ["probability", "'nan'"]),
        ("Delay(1) reply_to.bogus=x", ["unknown match field 'reply_to.bogus'"]),
        ("Delay(1e999)", ["Delay seconds", "got inf"]),
        ("Reorder(max_hold=-1)", ["Reorder max_hold", "got -1"]),
        ("SplitMessage(pause=1e999) member=X", ["SplitMessage pause", "got inf"]),
        ("JobResult('broken') member=JobRemoved", ["JobResult result 'broken'", "use one of"]),
    ],
)
def test_a_bad_rule_exits_2_with_one_line(bus: PrivateBus, rule: str, words: list[str]) -> None:
    line = _refused("proxy", "--upstream", bus.address, "--rule", rule)
    assert line.startswith(f"runtimefaults proxy: rule {rule!r}: ")
    for word in words:
        assert word in line


def test_a_pcap_that_cannot_be_written_is_refused_at_start(bus: PrivateBus) -> None:
    line = _refused("proxy", "--upstream", bus.address, "--pcap", "/nonexistent/dir/x.pcap")
    assert line == (
        "runtimefaults proxy: --pcap /nonexistent/dir/x.pcap: cannot write it: "
        "No such file or directory"
    )


def test_an_unreachable_upstream_is_refused_at_start() -> None:
    line = _refused("proxy", "--upstream", "unix:path=/nonexistent")
    assert line == (
        "runtimefaults proxy: --upstream unix:path=/nonexistent: cannot reach the bus: "
        "No such file or directory"
    )


class _Proxy:
    """``runtimefaults proxy`` running, its stderr in a file read while it runs."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.err_path = tmp_path / "proxy.err"
        self._err = self.err_path.open("w")
        self.proc = subprocess.Popen(
            [*CLI, "proxy", *args], stdout=subprocess.PIPE, stderr=self._err, text=True
        )
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()
        assert self.address.startswith("unix:path="), self.stderr

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_for(self, text: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            assert self.proc.poll() is None, f"the proxy exited: {self.stderr}"
            assert time.monotonic() < deadline, f"{text!r} not on stderr: {self.stderr}"
            time.sleep(0.05)

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=30)
        self._err.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # the process this test started, by its PID
            self.proc.wait()
        self._err.close()


def test_a_dropped_client_is_told_on_stderr_as_it_happens(tmp_path: Path) -> None:
    bus = PrivateBus().start()
    proxy = _Proxy(tmp_path, "--upstream", bus.address)
    try:
        bus.stop()  # the upstream goes away while the proxy runs
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(proxy.address.removeprefix("unix:path="))
            client.settimeout(10)
            assert client.recv(1) == b""  # dropped
        # Told now, while the proxy still runs (it used to wait for the exit).
        proxy.wait_for(f"error: connection #1: cannot reach the bus at {bus.address}")
        assert proxy.interrupt() == 0
    finally:
        proxy.kill()
        bus.stop()
    assert proxy.stderr.count("connection #1: cannot reach the bus") == 1  # told once


def _send_garbage(address: str) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(address.removeprefix("unix:path="))
        s.sendall(b"\0AUTH EXTERNAL 30\r\nBEGIN\r\n" + b"Q" * 16)
        time.sleep(0.2)


def test_the_summary_counts_faults_not_errors(bus: PrivateBus, tmp_path: Path) -> None:
    proxy = _Proxy(tmp_path, "--upstream", bus.address, "--rule", "Delay(0.01) member=NeverCalled")
    try:
        _send_garbage(proxy.address)
        proxy.wait_for("malformed data from the client: bad endianness byte 0x51")
        assert "error: connection #1: malformed data" in proxy.stderr
        assert proxy.interrupt() == 0
    finally:
        proxy.kill()
    assert "applied 0 faults" in proxy.stderr, proxy.stderr


def test_a_pcap_that_fails_at_exit_keeps_the_summary(bus: PrivateBus, tmp_path: Path) -> None:
    where = tmp_path / "pcaps"
    where.mkdir()
    pcap = where / "x.pcap"
    proxy = _Proxy(tmp_path, "--upstream", bus.address, "--pcap", str(pcap))
    try:
        r = subprocess.run(
            ["busctl", "--address", proxy.address, "list"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert r.returncode == 0, r.stderr
        where.rmdir()  # the start's check left nothing behind in it
        assert proxy.interrupt() == 1
    finally:
        proxy.kill()
    err = proxy.stderr
    assert f"runtimefaults proxy: cannot write {pcap}: " in err
    assert "Traceback" not in err
    assert "relayed " in err
    assert "applied 0 faults" in err


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def test_bus_exits_non_zero_when_its_daemon_dies() -> None:
    proc = subprocess.Popen(
        [*CLI, "bus"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        assert address.startswith("unix:path=")
        (daemon,) = _children(proc.pid)
        os.kill(daemon, signal.SIGKILL)  # the dbus-daemon this test's command started
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    first, *output = err.strip().splitlines()
    said = f"runtimefaults bus: dbus-daemon (pid {daemon}) was killed by SIGKILL"
    # What the daemon printed (here it warns that it cannot raise its fd limit).
    assert first == said + ("; its last output:" if output else "; it printed nothing")
    assert not output or any(f"dbus-daemon[{daemon}]" in line for line in output)
    bus_dir = Path(address.removeprefix("unix:path=").split(",")[0]).parent
    assert not bus_dir.exists()  # and it still cleaned up after itself
