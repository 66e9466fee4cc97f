"""Crash-safe cleanup: SIGKILL pytest in the middle of a fixture, the next run reaps.

The inner pytest runs in a real subprocess with its own journal directory.  Its
fixture creates a child process and a temporary directory, journals both,
says it is ready and sleeps; the outer test SIGKILLs it there.  A second run
(or ``runtimefaults cleanup``) must then kill the orphan and remove the
directory, and must leave a live run's resources alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_runtimefaults.host import proc
from pytest_runtimefaults.journal import Journal, process_starttime, reap_dead_owners

pytestmark = pytest.mark.timeout(120)

CRASHING_TEST = """
import os, pathlib, subprocess, tempfile, time
import pytest

@pytest.fixture
def resources(runtimefaults_journal):
    d = tempfile.mkdtemp(prefix="rfcrash", dir="/tmp")
    runtimefaults_journal.add("path", path=d)
    pathlib.Path(d, "data").write_text("x")
    # start_new_session: the outer test's SIGKILL of pytest must not reach it.
    p = subprocess.Popen(["sleep", "300"], start_new_session=True)
    runtimefaults_journal.add_process(p.pid)
    pathlib.Path(os.environ["RF_READY"]).write_text(f"{p.pid} {d}")
    time.sleep(300)  # killed here
    yield

def test_crashes(resources):
    pass
"""


def _gone(pid: int, starttime: int | None) -> bool:
    """True once *pid* is no longer that process (a zombie counts as gone)."""
    return process_starttime(pid) != starttime or not proc.alive(pid)


def _wait(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def _start_and_kill(pytester: pytest.Pytester, state: Path) -> tuple[int, int | None, Path]:
    pytester.makepyfile(test_crash=CRASHING_TEST)
    ready = pytester.path / "ready"
    ready.unlink(missing_ok=True)
    inner = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "runtimefaults", "-p", "no:cacheprovider",
         f"--runtimefaults-state-dir={state}", "test_crash.py"],
        cwd=pytester.path,
        env={**os.environ, "RF_READY": str(ready)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # write_text creates the file before it writes: wait for both words.
        assert _wait(lambda: ready.exists() and len(ready.read_text().split()) == 2, 30), (
            "the inner pytest never reached its fixture"
        )
        pid_s, directory = ready.read_text().split()
        pid, starttime = int(pid_s), process_starttime(int(pid_s))
        # While the inner run lives, nobody may touch its resources.
        assert reap_dead_owners(state).reaped == []
        assert not _gone(pid, starttime)
    finally:
        inner.send_signal(signal.SIGKILL)
        inner.wait()
    assert not _gone(pid, starttime), "the orphan should outlive the killed pytest"
    assert Path(directory, "data").exists()
    return pid, starttime, Path(directory)


def test_next_run_reaps_what_a_sigkilled_run_left(pytester: pytest.Pytester) -> None:
    state = pytester.path / "state"
    pid, starttime, directory = _start_and_kill(pytester, state)
    try:
        pytester.makepyfile(test_next="def test_fine():\n    pass\n")
        result = pytester.runpytest_subprocess(
            "-p", "runtimefaults", f"--runtimefaults-state-dir={state}", "test_next.py"
        )
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(
            ["*runtimefaults reaped 2 resource(s) left by 1 killed run(s)*"]
        )
        assert _wait(lambda: _gone(pid, starttime)), "the orphan process was not killed"
        assert not directory.exists(), "the journaled directory was not removed"
        assert list(state.glob("*.jsonl")) == [], "the dead run's journal was not removed"
    finally:
        if not _gone(pid, starttime):
            os.kill(pid, signal.SIGKILL)


def test_cleanup_command_reaps_by_hand(pytester: pytest.Pytester) -> None:
    state = pytester.path / "state"
    pid, starttime, directory = _start_and_kill(pytester, state)
    try:
        cli = [sys.executable, "-m", "pytest_runtimefaults", "cleanup", f"--state-dir={state}"]
        dry = subprocess.run([*cli, "--dry-run"], capture_output=True, text=True, timeout=60)
        assert "would reap process" in dry.stdout, dry.stdout
        assert "would reap path" in dry.stdout, dry.stdout
        assert not _gone(pid, starttime), "--dry-run killed the process"
        assert directory.exists(), "--dry-run removed the directory"
        done = subprocess.run(cli, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "2 resource(s) from 1 dead run(s)" in done.stdout
        assert _wait(lambda: _gone(pid, starttime))
        assert not directory.exists()
    finally:
        if not _gone(pid, starttime):
            os.kill(pid, signal.SIGKILL)


def test_reaping_a_directory_never_empties_a_mount_inside_it(tmp_path: Path) -> None:
    """A bind mount left inside a journaled directory is detached, not emptied.

    Run in a private mount namespace (unshare), so the host's mounts are never touched.
    """
    script = tmp_path / "reap.py"
    script.write_text(
        f"""
import os, subprocess, sys
from pytest_runtimefaults.journal import Journal, reap_dead_owners
precious = {str(tmp_path / "precious")!r}
owned = {str(tmp_path / "rfowned")!r}
os.makedirs(precious); open(os.path.join(precious, "keep"), "w").write("x")
os.makedirs(os.path.join(owned, "mnt"))
dead = subprocess.Popen(["true"]); dead.wait()
journal = Journal({str(tmp_path / "state")!r}, owner_pid=dead.pid)
journal.add("path", path=owned)
subprocess.run(["mount", "--bind", precious, os.path.join(owned, "mnt")], check=True)
result = reap_dead_owners({str(tmp_path / "state")!r})
print(len(result.reaped), result.errors)
assert os.path.exists(os.path.join(precious, "keep")), "the bind mount's source was emptied"
assert not os.path.exists(owned), "the owned directory was not removed"
"""
    )
    if not os.path.exists("/usr/bin/unshare"):
        pytest.skip("unshare not found (apt-get install util-linux)")
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("1 []")


def test_live_owners_journal_is_left_alone_and_released_entries_are_not_reaped(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path)
    kept = tmp_path / "kept"
    kept.mkdir()
    rid = journal.add("path", path=str(kept))
    assert reap_dead_owners(tmp_path).reaped == []  # we are alive
    assert kept.exists()
    journal.release(rid)
    assert not journal.path.exists(), "an empty journal removes its file"
    # Two journals in one process (a pytester inline run) do not share a file.
    other = Journal(tmp_path)
    assert other.path != journal.path


def test_unknown_start_time_never_kills_a_recycled_pid(tmp_path: Path) -> None:
    """A process journaled without a start time is not killed: its PID may be a stranger's."""
    victim = subprocess.Popen(["sleep", "30"])
    try:
        dead = subprocess.Popen(["true"])
        dead.wait()
        journal = Journal(tmp_path, owner_pid=dead.pid)
        journal.add("process", pid=victim.pid, starttime=None)
        result = reap_dead_owners(tmp_path)
        assert result.reaped == []
        assert "no start time recorded" in result.errors[0], result.errors
        assert victim.poll() is None, "a process with an unknown start time was killed"
    finally:
        victim.kill()
        victim.wait()


def test_cleanup_imports_the_module_that_knows_a_kind(tmp_path: Path) -> None:
    """A kind reaped by another module (``daemon``) is reaped by the CLI, which never
    imported that module: the journal's reaper table names it."""
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        writer = (
            "import sys, pytest_runtimefaults.daemon\n"
            "from pytest_runtimefaults.journal import Journal, process_starttime\n"
            f"j = Journal({str(tmp_path)!r})\n"
            f"j.add('daemon', pid={victim.pid}, starttime=process_starttime({victim.pid}))\n"
        )
        subprocess.run([sys.executable, "-c", writer], check=True, timeout=60)
        done = subprocess.run(
            [sys.executable, "-m", "pytest_runtimefaults", "cleanup", f"--state-dir={tmp_path}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout
        assert "reaped daemon" in done.stdout
        assert victim.wait(timeout=10) == -9
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
