"""The D-Bus fixtures, marker and commands as a user meets them (pytester, subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def test_fixtures_give_a_private_bus_and_a_proxy_with_env(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os, subprocess

        def test_env(dbus_bus, dbus_proxy):
            assert dbus_proxy.upstream == dbus_bus.address
            assert dbus_proxy.env["DBUS_SYSTEM_BUS_ADDRESS"] == dbus_proxy.address
            r = subprocess.run(["busctl", "--system", "list"], capture_output=True, text=True,
                               env={**os.environ, **dbus_proxy.env})
            assert r.returncode == 0, r.stderr
            assert "org.freedesktop.DBus" in r.stdout
            assert os.stat(dbus_proxy.dir).st_mode & 0o777 == 0o700
            open("dirs", "w").write(f"{dbus_bus.dir}\\n{dbus_proxy.dir}\\n{dbus_bus.pid}")
        """
    )
    result = pytester.runpytest_subprocess("-p", "runtimefaults")
    result.assert_outcomes(passed=1)
    bus_dir, proxy_dir, pid = (pytester.path / "dirs").read_text().split()
    assert not Path(bus_dir).exists()
    assert not Path(proxy_dir).exists()
    assert not Path(f"/proc/{pid}").exists()


def test_failing_test_shows_the_trace_and_still_cleans_up(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import subprocess, pytest

        @pytest.mark.dbus_faults("Delay(0.05) reply_to=ListNames")
        def test_fails(dbus_proxy):
            subprocess.run(["busctl", "--address", dbus_proxy.address, "list"], check=True,
                           capture_output=True)
            open("dirs", "w").write(str(dbus_proxy.dir))
            assert False, "the runtime did not recover"
        """
    )
    result = pytester.runpytest_subprocess("-p", "runtimefaults")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*runtimefaults D-Bus trace (call)*",
            "*->bus method_call*org.freedesktop.DBus.ListNames*",
            "*fault: Delay(seconds=0.05*",
        ]
    )
    assert not Path((pytester.path / "dirs").read_text()).exists()


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ('"Dealy(1) member=X"', "unknown action 'Dealy'"),
        ('"Delay(1) membr=X"', "match fields are"),
        ("42", "is not a rule"),
        ('rule="Delay(1)"', "positional arguments"),
        # issue 11: these were an INTERNALERROR (ValueError, TypeError) or accepted
        ('"Delay(1) probability=abc"', "probability needs a number in [0, 1], got 'abc'"),
        ('"Delay(1) reply_to.bogus=x"', "unknown match field 'reply_to.bogus'"),
        ('"Delay(1e999) member=X"', "Delay seconds must be a number of seconds"),
        ('"SplitMessage(pause=-1) member=X"', "SplitMessage pause must be"),
    ],
)
def test_bad_marker_is_a_usage_error_naming_the_test(
    pytester: pytest.Pytester, marker: str, message: str
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.dbus_faults({marker})
        def test_typo(dbus_proxy):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "runtimefaults")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*test_bad_marker*::test_typo: bad dbus_faults marker*"
            if "positional" not in message
            else "*test_typo*"
        ]
    )
    assert message in result.stderr.str()
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_marker_accepts_rule_objects_and_counts_per_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import subprocess, pytest
        from pytest_runtimefaults.dbus.rules import ErrorReply

        RULE = ErrorReply("org.example.Injected", "no").on(member="ListNames").times(1)

        @pytest.mark.parametrize("n", [1, 2])
        @pytest.mark.dbus_faults(RULE)
        def test_error(dbus_proxy, n):
            r = subprocess.run(["busctl", "--address", dbus_proxy.address, "call",
                                "org.freedesktop.DBus", "/org/freedesktop/DBus",
                                "org.freedesktop.DBus", "ListNames"],
                               capture_output=True, text=True)
            assert r.returncode != 0
            assert "no" in r.stderr
            assert dbus_proxy.rules[0].applied == 1
        """
    )
    pytester.runpytest_subprocess("-p", "runtimefaults").assert_outcomes(passed=2)


def test_the_report_counts_what_each_rule_applied(pytester: pytest.Pytester) -> None:
    # The registry reads each rule's own count, live: the report is built when the
    # call ends, before teardown (where the count used to be copied, too late).
    pytester.makepyfile(
        """
        import subprocess, pytest

        @pytest.mark.dbus_faults("Delay(0.01) reply_to=ListNames")
        def test_counted(dbus_proxy):
            for _ in range(2):
                subprocess.run(["busctl", "--address", dbus_proxy.address, "call",
                                "org.freedesktop.DBus", "/org/freedesktop/DBus",
                                "org.freedesktop.DBus", "ListNames"],
                               check=True, capture_output=True)
            assert dbus_proxy.rules[0].applied == 2

        @pytest.mark.dbus_faults("Drop() member=Nothing")
        def test_lifted_by_the_registry(dbus_proxy, runtimefaults_faults):
            from pytest_runtimefaults.dbus.actions import Delay

            added = dbus_proxy.add(Delay(5).on(member="ListNames"))
            assert [r.fault for r in runtimefaults_faults.records][-1] is added
            assert runtimefaults_faults.lift_all() == [
                f"dbus_proxy: {added.describe()}", "dbus_proxy: Drop() on member=Nothing"
            ]
            assert dbus_proxy.rules == []
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-report=report.json"
    )
    result.assert_outcomes(passed=2)
    tests = json.loads((pytester.path / "report.json").read_text())["tests"]
    (test,) = [t for t in tests if t["nodeid"].endswith("test_counted")]
    (fault,) = test["faults"]
    assert fault["name"].startswith("dbus_proxy: Delay(seconds=0.01")
    assert fault["applied"] == 2


def test_malformed_data_fails_the_test_unless_acknowledged(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import socket, time

        def _garbage(proxy):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(proxy.socket_path))
            s.sendall(b"\\0AUTH EXTERNAL 30\\r\\nBEGIN\\r\\n" + b"Q" * 16)
            deadline = time.monotonic() + 10
            while not proxy.errors and time.monotonic() < deadline:
                time.sleep(0.01)
            s.close()

        def test_unacknowledged(dbus_proxy):
            _garbage(dbus_proxy)

        def test_acknowledged(dbus_proxy):
            _garbage(dbus_proxy)
            assert "bad endianness byte 0x51" in dbus_proxy.errors[0]
            dbus_proxy.errors.clear()
        """
    )
    result = pytester.runpytest_subprocess("-p", "runtimefaults")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*dbus_proxy met malformed D-Bus data*",
            "*malformed data from the client: bad endianness byte 0x51*",
        ]
    )


def test_pcap_dir_option(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(
        """
        import subprocess

        def test_one(dbus_proxy):
            subprocess.run(["busctl", "--address", dbus_proxy.address, "list"], check=True,
                           capture_output=True)
        """
    )
    pytester.runpytest_subprocess(
        "-p", "runtimefaults", f"--runtimefaults-pcap-dir={tmp_path}"
    ).assert_outcomes(passed=1)
    (pcap,) = tmp_path.glob("*.pcap")
    assert "test_one" in pcap.name
    assert pcap.stat().st_size > 100


def test_host_bus_upstream_is_refused_without_consent(
    pytester: pytest.Pytester, short_tmp: Path
) -> None:
    # A conftest makes a socket of the test's own stand in for the host's system bus
    # (in a short directory: pytester's path can be too long for a socket under xdist).
    path = short_tmp / "system_bus_socket"
    pytester.makeconftest(
        f"""
        import os, socket
        from pytest_runtimefaults.dbus import proxy

        def pytest_configure(config):
            path = {str(path)!r}
            if os.path.exists(path):
                os.unlink(path)  # left by the first of the two runs below
            config._fake_bus = socket.socket(socket.AF_UNIX)
            config._fake_bus.bind(path)
            proxy.HOST_BUS_PATHS = (path,)
        """
    )
    pytester.makepyfile("def test_x(dbus_proxy):\n    pass\n")
    upstream = f"--runtimefaults-dbus-upstream=unix:path={path}"
    result = pytester.runpytest_subprocess("-p", "runtimefaults", upstream)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*refusing to proxy the host's system bus*"])
    consent = pytester.runpytest_subprocess(
        "-p", "runtimefaults", upstream, "--runtimefaults-allow-host-bus"
    )
    consent.assert_outcomes(passed=1)


def _spawn(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest_runtimefaults", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def test_cli_bus_and_proxy_by_hand(tmp_path: Path) -> None:
    bus, bus_address = _spawn("bus")
    pcap = tmp_path / "t.pcap"
    proxy, proxy_address = _spawn(
        "proxy",
        "--upstream",
        bus_address,
        "--pcap",
        str(pcap),
        "--rule",
        "Delay(0.2) reply_to=ListNames",
    )
    try:
        assert proxy_address.startswith("unix:path=")
        t = time.monotonic()
        r = subprocess.run(
            ["busctl", "--address", proxy_address, "list"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t >= 0.2
    finally:
        for p in (proxy, bus):
            p.send_signal(signal.SIGINT)
        _, err = proxy.communicate(timeout=20)
        bus.communicate(timeout=20)
    assert proxy.returncode == 0
    assert "applied 1 faults" in err
    assert pcap.stat().st_size > 0
    assert "rule: Delay(seconds=0.2" in err


def test_cli_proxy_bad_rule_says_what_is_wrong() -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest_runtimefaults",
            "proxy",
            "--upstream",
            "unix:path=/nonexistent",
            "--rule",
            "Delay(1) membr=X",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "match fields are" in r.stderr


def test_cli_proxy_help_shows_the_rule_syntax() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pytest_runtimefaults", "proxy", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "SignalBeforeReply" in r.stdout
    assert "reply_to=MEMBER" in r.stdout
    assert os.path.basename(sys.executable)  # the command ran under this interpreter
