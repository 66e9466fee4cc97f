"""The plugin under pytest-timeout (both methods) and the suite's host-invariant check."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_runtimefaults import naming
from pytest_runtimefaults.journal import process_starttime

pytestmark = pytest.mark.timeout(180)

CONFTEST = Path(__file__).parents[2] / "conftest.py"  # the suite's: tests/conftest.py

HANGING = """
import os, pathlib, subprocess
import pytest

@pytest.fixture
def journaled_child(runtimefaults_journal):
    p = subprocess.Popen(["sleep", "300"], start_new_session=True)
    rid = runtimefaults_journal.add_process(p.pid)
    pathlib.Path("child.pid").write_text(str(p.pid))
    yield p
    p.kill()
    p.wait()
    runtimefaults_journal.release(rid)

@pytest.mark.recovers(within=120, probe=["false"])
def test_never_recovers(journaled_child):
    pass

@pytest.mark.failure_budget(runs=100000, max_rate=0.0)
def test_endless_budget():
    import time
    time.sleep(0.001)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_timeout_signal_method_ends_recovery_wait_and_budget_and_tears_down(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_hang=HANGING)
    state = pytester.path / "state"
    started = time.monotonic()
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--timeout=2", "--timeout-method=signal",
        f"--runtimefaults-state-dir={state}",
    )  # fmt: skip
    assert time.monotonic() - started < 30
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*Timeout (>2.0s) from pytest-timeout*"])
    result.stdout.no_fnmatch_line("*failure budget exceeded*")
    pid = int((pytester.path / "child.pid").read_text())
    assert not _alive(pid), "fixture teardown did not run after the timeout"
    assert list(state.glob("*.jsonl")) == []


def test_timeout_thread_method_kills_pytest_and_the_next_run_reaps(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_hang=HANGING)
    state = pytester.path / "state"
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--timeout=2", "--timeout-method=thread",
        f"--runtimefaults-state-dir={state}", "-k", "never_recovers",
    )  # fmt: skip
    assert "+ Timeout +" in result.stdout.str() + result.stderr.str()
    pid = int((pytester.path / "child.pid").read_text())
    starttime = process_starttime(pid)
    try:
        assert _alive(pid), "os._exit skips teardown: the child must still be there"
        pytester.makepyfile(test_next="def test_ok():\n    pass\n")
        nxt = pytester.runpytest_subprocess(
            "-p", "runtimefaults", f"--runtimefaults-state-dir={state}", "test_next.py"
        )
        nxt.assert_outcomes(passed=1)
        nxt.stdout.fnmatch_lines(["*runtimefaults reaped 1 resource(s) left by 1 killed run(s)*"])
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(pid)
    finally:
        if _alive(pid) and process_starttime(pid) == starttime:
            os.kill(pid, signal.SIGKILL)


def test_host_check_catches_a_left_child_and_a_left_netns(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(
        """
        import pathlib, subprocess
        from pytest_runtimefaults import naming

        def test_leaves_a_child():
            subprocess.Popen(["sleep", "60"])

        def test_leaves_a_netns():
            name = naming.unique_name("rfhc")
            pathlib.Path("netns.name").write_text(name)
            subprocess.run(["ip", "netns", "add", name], check=True)

        def test_leaves_a_unit_cgroup_at_the_host_root():
            # What a systemd sharing the host's cgroup mounts does (init.scope).
            # On a pure cgroup v2 host the hierarchy is /sys/fs/cgroup itself.
            root = pathlib.Path("/sys/fs/cgroup")
            if not (root / "cgroup.controllers").exists():
                root = root / "pids"
            path = root / (naming.unique_name("rfcg") + ".scope")
            pathlib.Path("cgroup.path").write_text(str(path))
            path.mkdir()
        """
    )
    result = pytester.runpytest_subprocess("-p", "runtimefaults")
    name = (pytester.path / "netns.name").read_text()
    cgroup = Path((pytester.path / "cgroup.path").read_text())
    try:
        result.assert_outcomes(passed=3, errors=1)
        result.stdout.fnmatch_lines(
            [
                "*cgroups created at the root of the host's hierarchies: "
                f"?'{cgroup.relative_to('/sys/fs/cgroup')}'?"
            ]
        )
        result.stdout.fnmatch_lines(
            [
                "*the test session changed the host:",
                f"*network namespaces left behind: ?'{name}'?",
                "*child processes of pytest left running (now killed): * sleep 60",
            ]
        )
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
        if cgroup.exists():
            cgroup.rmdir()


def test_refuses_to_run_when_cgroup_is_read_only(pytester: pytest.Pytester) -> None:
    """In a private mount namespace whose /sys/fs/cgroup is a fresh read-only tmpfs.

    A *new* tmpfs, not a remount: remounting the host's tmpfs read-only would
    change its superblock, i.e. the whole machine (the incident this guards against).
    """
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile("def test_x():\n    pass\n")
    script = (
        "mount -t tmpfs -o ro,size=1k rftest /sys/fs/cgroup && "
        f"exec {sys.executable} -m pytest -p runtimefaults -p no:cacheprovider"
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert "refusing to run: /sys/fs/cgroup is mounted read-only on this host" in proc.stderr
    # And the host's own mount is untouched.
    with open("/proc/self/mountinfo") as f:
        line = next(x for x in f if x.split()[4] == "/sys/fs/cgroup")
    assert line.split()[5].startswith("rw")


def test_unique_names_differ_between_processes_and_fit_an_ifname() -> None:
    code = "from pytest_runtimefaults import naming; print(naming.unique_name('rfbr'))"
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    mine = {naming.unique_name("rfbr") for _ in range(1000)}
    assert len(mine) == 1000
    assert other not in mine
    assert all(len(n) <= 15 for n in mine)
    assert all(naming.process_tag() in n for n in mine)
    with pytest.raises(ValueError):
        naming.unique_name("a-very-long-prefix")


def test_unique_names_of_two_pids_never_collide(monkeypatch: pytest.MonkeyPatch) -> None:
    """PID 46 ('1a') with its 75th name and PID 1658 ('1a2') with its 3rd: the
    unpadded scheme gave both 'rfbr1a23'; the fixed-width tag keeps them apart."""
    names = {}
    for pid, n in ((46, 75), (1658, 3)):
        monkeypatch.setattr(naming.os, "getpid", lambda pid=pid: pid)
        monkeypatch.setattr(naming, "_counter", itertools.count(n))
        names[pid] = naming.unique_name("rfbr")
    assert names[46] != names[1658], names
    assert len(naming.process_tag()) == 5
    # The largest PID Linux allows still fits, and still fits an interface name.
    monkeypatch.setattr(naming.os, "getpid", lambda: 2**22)
    assert naming.process_tag() == "2hwcg"
    assert len(naming.unique_name("rfnet")) <= 15


def test_xdist_worker_that_dies_is_reaped_by_the_controller_at_the_end(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import os, pathlib, subprocess
        import pytest

        @pytest.fixture
        def child(runtimefaults_journal):
            p = subprocess.Popen(["sleep", "300"], start_new_session=True)
            runtimefaults_journal.add_process(p.pid)
            pathlib.Path("child.pid").write_text(str(p.pid))
            yield p

        def test_worker_dies(child):
            os._exit(3)

        def test_other():
            pass
        """
    )
    state = pytester.path / "state"
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "-n", "2", f"--runtimefaults-state-dir={state}"
    )
    pid = int((pytester.path / "child.pid").read_text())
    starttime = process_starttime(pid)
    try:
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(
            ["runtimefaults: reaped 1 resource(s) left by 1 dead worker(s)"]
        )
        assert not _alive(pid)
        assert list(state.glob("*.jsonl")) == []
    finally:
        if _alive(pid) and process_starttime(pid) == starttime:
            os.kill(pid, signal.SIGKILL)
