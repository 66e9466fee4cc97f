"""The ``recovers`` and ``failure_budget`` markers, through pytest (pytester).

The runtime under test here is a real daemon process serving a real Unix
socket; the fault is a real SIGKILL of it, and "recovery" a real restart.  A
runtime that comes back passes, one that stays down fails with the probe's
last error and the time waited.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(120)

# A tiny daemon and the fixtures around it, as a user's conftest would have them.
DAEMON_CONFTEST = r'''
import os, socket, subprocess, sys, tempfile, time
import pytest

DAEMON = """
import os, socket, sys
path = sys.argv[1]
if os.path.lexists(path):
    os.unlink(path)
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(64)
while True:
    c, _ = s.accept()
    c.close()
"""


class Daemon:
    def __init__(self, path):
        self.path = path
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", DAEMON, self.path])

    def wait_ready(self, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(self.path)
                return
            except OSError:
                time.sleep(0.01)
            finally:
                s.close()
        raise TimeoutError(self.path)

    def kill(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def healthy(self):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.settimeout(1)
            s.connect(self.path)
        finally:
            s.close()


@pytest.fixture
def daemon(runtimefaults_faults):
    d = Daemon(os.path.join(tempfile.mkdtemp(prefix="rfd", dir="/tmp"), "d.sock"))
    d.start()
    d.wait_ready()
    runtimefaults_faults.add_probe("runtime", d.healthy)
    yield d
    d.kill()
    os.unlink(d.path) if os.path.lexists(d.path) else None
    os.rmdir(os.path.dirname(d.path))


@pytest.fixture
def crash(daemon, runtimefaults_faults):
    """crash(restarts=True): SIGKILL the daemon; lifting restarts it (or not)."""
    def inject(restarts=True):
        daemon.kill()
        runtimefaults_faults.add("daemon SIGKILL", lift=daemon.start if restarts else None)
    return inject
'''


@pytest.fixture
def daemon_tests(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(DAEMON_CONFTEST)
    return pytester


def test_runtime_that_recovers_passes(daemon_tests: pytest.Pytester) -> None:
    daemon_tests.makepyfile(
        """
        import pytest

        @pytest.mark.recovers(within=10)
        def test_crash(daemon, crash):
            crash(restarts=True)

        @pytest.mark.recovers(within=10, probe="runtime")
        def test_crash_named_probe(daemon, crash):
            crash(restarts=True)
        """
    )
    result = daemon_tests.runpytest("-p", "runtimefaults")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*runtimefaults*", "faults injected: 2 (daemon SIGKILL x2)"])
    result.stdout.fnmatch_lines(["recoveries: 2 of 2 ok; median *"])


def test_runtime_that_stays_down_fails_with_last_error_and_time(
    daemon_tests: pytest.Pytester,
) -> None:
    daemon_tests.makepyfile(
        """
        import pytest

        @pytest.mark.recovers(within=0.5)
        def test_crash(daemon, crash):
            crash(restarts=False)
        """
    )
    result = daemon_tests.runpytest("-p", "runtimefaults")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*recovers: the runtime did not recover within 0.5 s (waited * s, * probe round(s));"
            " last error: runtime: ConnectionRefusedError: *Connection refused*"
            " (faults lifted: daemon SIGKILL)"
        ]
    )


def test_body_failure_is_reported_as_such_not_as_recovery(daemon_tests: pytest.Pytester) -> None:
    daemon_tests.makepyfile(
        """
        import pytest

        @pytest.mark.recovers(within=5)
        def test_crash(daemon, crash):
            crash(restarts=True)
            assert False, "the body itself failed"
        """
    )
    result = daemon_tests.runpytest("-p", "runtimefaults")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: the body itself failed*"])
    result.stdout.no_fnmatch_line("*did not recover*")


def test_socket_path_probe(pytester: pytest.Pytester) -> None:
    """probe='/abs/path': a real listener passes; the path with nothing behind it fails."""
    pytester.makepyfile(
        """
        import os, socket, tempfile
        import pytest

        DIR = tempfile.mkdtemp(prefix="rfs", dir="/tmp")
        LIVE, DEAD = os.path.join(DIR, "live.sock"), os.path.join(DIR, "dead.sock")

        @pytest.fixture(scope="module", autouse=True)
        def listener():
            s = socket.socket(socket.AF_UNIX)
            s.bind(LIVE)
            s.listen(8)
            # A stale socket: bound, then closed without unlinking (what a
            # SIGKILLed daemon leaves): connect() gets ECONNREFUSED.
            stale = socket.socket(socket.AF_UNIX)
            stale.bind(DEAD)
            stale.close()
            yield
            s.close()
            for p in (LIVE, DEAD):
                os.unlink(p)
            os.rmdir(DIR)

        @pytest.mark.recovers(within=2, probe=LIVE)
        def test_live():
            pass

        @pytest.mark.recovers(within=0.3, probe=DEAD)
        def test_stale():
            pass
        """
    )
    result = pytester.runpytest("-p", "runtimefaults")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*last error: socket /tmp/rfs*/dead.sock: connect: Connection refused*"]
    )


def test_command_probe(pytester: pytest.Pytester) -> None:
    """A command that must exit 0: it passes once a file the 'fault' removed is back."""
    pytester.makepyfile(
        """
        import os, tempfile
        import pytest

        FLAG = os.path.join(tempfile.gettempdir(), f"rf-flag-{os.getpid()}")

        @pytest.fixture
        def missing_flag(runtimefaults_faults):
            if os.path.exists(FLAG):
                os.unlink(FLAG)
            runtimefaults_faults.add("flag removed", lift=lambda: open(FLAG, "w").close())
            yield
            if os.path.exists(FLAG):
                os.unlink(FLAG)

        @pytest.mark.recovers(within=5, probe=["test", "-e", FLAG])
        def test_flag_restored(missing_flag):
            assert not os.path.exists(FLAG)

        @pytest.mark.recovers(within=0.3, probe=["sh", "-c", "echo broken >&2; exit 3"])
        def test_command_fails():
            pass
        """
    )
    result = pytester.runpytest("-p", "runtimefaults")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*last error: command sh -c *: exit status 3: broken*"])


def test_callable_probe_and_missing_probe(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import time
        import pytest

        T0 = []

        def healthy_after_100ms():
            return time.monotonic() - T0[0] > 0.1

        @pytest.mark.recovers(within=5, probe=healthy_after_100ms)
        def test_callable():
            T0.append(time.monotonic())

        @pytest.mark.recovers(within=1)
        def test_no_probe_at_all():
            pass

        @pytest.mark.recovers(within=1, probe="runtime")
        def test_unknown_name(runtimefaults_faults):
            runtimefaults_faults.add_probe("other", lambda: None)
        """
    )
    result = pytester.runpytest("-p", "runtimefaults", "--runtimefaults-report=r.json")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*recovers: no health probe: pass recovers(probe=...)*",
            "*no probe named 'runtime' was registered by this test's fixtures (registered: other)*",
        ]
    )
    import json

    report = json.loads((pytester.path / "r.json").read_text())
    callable_test = next(t for t in report["tests"] if t["nodeid"].endswith("test_callable"))
    assert 0.1 <= callable_test["recovery"]["seconds"] < 5


BUDGET_TESTS = """
import pytest

CALLS = []

@pytest.fixture(scope="module")
def setups():
    return []

@pytest.fixture
def once(setups):
    setups.append(1)
    return setups

@pytest.mark.failure_budget(runs=200, max_rate=0.05)
def test_met(once):
    CALLS.append("met")
    assert len(once) == 1, "fixtures are set up once per item"
    # 4 % of runs fail: within a 5 % budget
    assert len([c for c in CALLS if c == "met"]) % 25 != 0, "every 25th run fails"

@pytest.mark.failure_budget(runs=100, max_rate=0.01)
def test_exceeded():
    CALLS.append("exc")
    n = len([c for c in CALLS if c == "exc"])
    if n % 10 == 0:
        raise RuntimeError(f"delete failed on run {n}: expected a reply, didn't get any")
"""


def test_failure_budget_met_passes_and_exceeded_fails_with_figures(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(BUDGET_TESTS)
    result = pytester.runpytest("-p", "runtimefaults")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*failure budget exceeded: 10 of 100 runs failed "
            "(rate 10.0%, 95 % CI 5.5%-17.4%; max_rate 1.0%)",
            "first failures:",
            "  run 10: RuntimeError: delete failed on run 10: expected a reply, didn't get any",
            "  run 20: RuntimeError: delete failed on run 20*",
            "  run 30: RuntimeError: *",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "failure budget ok: *test_met: 8/200 failed (4.0%, 95 % CI 2.0%-7.7%; max 5.0%)",
            "failure budget EXCEEDED: *test_exceeded: 10/100 failed*",
        ]
    )


def test_budget_with_recovery_and_pytest_fail_counts_as_a_failed_run(
    daemon_tests: pytest.Pytester,
) -> None:
    daemon_tests.makepyfile(
        """
        import pytest
        N = []

        @pytest.mark.recovers(within=10)
        @pytest.mark.failure_budget(runs=20, max_rate=0.1)
        def test_both(daemon, crash):
            N.append(1)
            if len(N) == 1:
                crash(restarts=True)
            if len(N) == 5:
                pytest.fail("explicit failure")
        """
    )
    result = daemon_tests.runpytest("-p", "runtimefaults")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["recoveries: 1 of 1 ok*", "failure budget ok: *1/20 failed (5.0%*"]
    )


@pytest.mark.parametrize(
    ("decorator", "message"),
    [
        ("recovers()", "within=SECONDS is required"),
        ("recovers(within='5')", "within must be a number, got '5'"),
        ("recovers(within=-1)", "within must be between 0 and 3600 seconds"),
        ("recovers(within=5, prob='runtime')", "unknown argument(s) prob"),
        ("recovers(within=5, probe=42)", "probe=42 is not a probe"),
        ("recovers(within=5, probe=[])", "a command probe is a non-empty list of strings"),
        ("recovers(within=5, leaks=3)", "leaks must be True, False or a list"),
        ("failure_budget(runs=0, max_rate=0.1)", "runs must be an integer >= 1, got 0"),
        ("failure_budget(runs=10)", "runs=N and max_rate=R are both required"),
        ("failure_budget(runs=10, max_rate=5)", "max_rate must be a fraction in [0, 1), got 5.0"),
        ("failure_budget(10, 0.1)", "give runs= and max_rate= by name"),
    ],
)
def test_bad_marker_arguments_are_usage_errors_naming_the_test(
    pytester: pytest.Pytester, decorator: str, message: str
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        def test_fine():
            pass

        @pytest.mark.{decorator}
        def test_bad_args():
            pass
        """
    )
    result = pytester.runpytest("-p", "runtimefaults")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    name = decorator.split("(")[0]
    result.stderr.fnmatch_lines([f"ERROR: *::test_bad_args: bad @pytest.mark.{name}: *{message}*"])


@pytest.mark.parametrize(
    ("runs", "figures"),
    [("10**12", "got 1,000,000,000,000"), ("100_001", "got 100,001")],
)
def test_a_budget_of_too_many_runs_is_a_usage_error_with_the_figure(
    pytester: pytest.Pytester, runs: str, figures: str
) -> None:
    # Before: accepted, and the item looped for days (here: until --timeout).
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.failure_budget(runs={runs}, max_rate=0.01)
        def test_forever():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "runtimefaults", "--timeout=20")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: *::test_forever: bad @pytest.mark.failure_budget: runs must be at most "
            f"100,000, {figures} (split the budget over several tests or runs of pytest)"
        ]
    )


def test_budget_on_an_async_test_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.failure_budget(runs=2, max_rate=0.1)
        async def test_async():
            pass
        """
    )
    result = pytester.runpytest("-p", "runtimefaults")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: *::test_async: *cannot repeat an async test function*"])


def test_markers_are_documented_with_their_signatures(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("-p", "runtimefaults", "--markers")
    result.stdout.fnmatch_lines(
        [
            "@pytest.mark.recovers(within, probe=None, leaks=True): after the test body, *",
            "@pytest.mark.failure_budget(runs, max_rate): call the test function `runs` times *",
        ]
    )


def test_marker_on_a_class_applies_to_its_methods(daemon_tests: pytest.Pytester) -> None:
    daemon_tests.makepyfile(
        """
        import pytest

        @pytest.mark.recovers(within=0.2)
        class TestDaemon:
            def test_down(self, daemon, crash):
                crash(restarts=False)

            @pytest.mark.recovers(within=10)
            def test_closest_wins(self, daemon, crash):
                crash(restarts=True)
        """
    )
    result = daemon_tests.runpytest("-p", "runtimefaults")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*_ TestDaemon.test_down _*", "recovers: the runtime did not recover within 0.2 s*"]
    )


def test_bad_marker_under_xdist_is_an_error_naming_the_test(pytester: pytest.Pytester) -> None:
    """A worker cannot raise UsageError at collection (xdist reports INTERNALERROR):
    the test errors at setup with the same message instead."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.recovers(within="soon")
        def test_bad_args():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "runtimefaults", "-n", "2")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["UsageError: *::test_bad_args: bad @pytest.mark.recovers: within must be a number*"]
    )
    result.stdout.no_fnmatch_line("*INTERNALERROR*")


def test_runtimefaults_run_gives_fresh_per_run_resources(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os, shutil, tempfile
        import pytest

        BASE = tempfile.mkdtemp(prefix="rfrun", dir="/tmp")
        SEEN = []

        @pytest.mark.failure_budget(runs=20, max_rate=0.0)
        def test_fresh(runtimefaults_run):
            assert os.listdir(BASE) == [], "the previous run's directory was not removed"
            d = os.path.join(BASE, f"run{runtimefaults_run.index}")
            os.mkdir(d)
            runtimefaults_run.defer(lambda: os.rmdir(d))
            SEEN.append((runtimefaults_run.index, runtimefaults_run.runs))

        def test_after():
            assert SEEN == [(i, 20) for i in range(1, 21)]
            os.rmdir(BASE)

        @pytest.mark.failure_budget(runs=10, max_rate=0.0)
        def test_failing_cleanup_fails_its_run(runtimefaults_run):
            if runtimefaults_run.index == 4:
                runtimefaults_run.defer(lambda: os.rmdir("/nonexistent/rf"))
        """
    )
    result = pytester.runpytest("-p", "runtimefaults", "-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        ["*1 of 10 runs failed*", "  run 4: FileNotFoundError: *No such file or directory*"]
    )
