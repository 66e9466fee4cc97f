"""Leak checks after recovery, and the snapshot helpers of ``leaks``, on real processes,
sockets, fds and mounts."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from pytest_runtimefaults import leaks
from pytest_runtimefaults.faults import FaultRegistry
from pytest_runtimefaults.fixtures.recovery import LeakFilter

pytestmark = pytest.mark.timeout(60)

LEAKY = """
import functools, os, subprocess, tempfile, socket
import pytest
from pytest_runtimefaults import leaks

@pytest.fixture
def children_checked(runtimefaults_faults):
    runtimefaults_faults.add_leak_check(
        "processes:children", functools.partial(leaks.child_processes, os.getpid())
    )
    started = []
    yield started
    for p in started:
        p.kill()
        p.wait()

@pytest.fixture
def socket_dir(runtimefaults_faults):
    d = tempfile.mkdtemp(prefix="rfl", dir="/tmp")
    runtimefaults_faults.add_leak_check("sockets", functools.partial(leaks.socket_files, d))
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)

@pytest.mark.recovers(within=0.3, probe=["true"])
def test_leaves_a_process(children_checked):
    children_checked.append(subprocess.Popen(["sleep", "30"]))

@pytest.mark.recovers(within=2, probe=["true"])
def test_process_that_exits_in_time_is_no_leak(children_checked):
    children_checked.append(subprocess.Popen(["sleep", "0.2"]))

@pytest.mark.recovers(within=0.3, probe=["true"])
def test_leaves_a_socket(socket_dir):
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.path.join(socket_dir, "left.sock"))
    s.close()

@pytest.mark.recovers(within=0.3, probe=["true"], leaks=["sockets"])
def test_marker_narrows_to_sockets(children_checked):
    children_checked.append(subprocess.Popen(["sleep", "30"]))

@pytest.mark.recovers(within=0.3, probe=["true"], leaks=False)
def test_marker_switches_off(children_checked, socket_dir):
    children_checked.append(subprocess.Popen(["sleep", "30"]))
"""


def test_leak_checks_fail_with_what_was_left(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(LEAKY)
    result = pytester.runpytest("-p", "runtimefaults", "--runtimefaults-report=r.json")
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(
        [
            "recovers: recovered in * s but left behind:",
            "  processes:children: * sleep",
            "(switch a check off with --runtimefaults-leak-checks=-KIND or recovers(leaks=[...]))",
        ]
    )
    result.stdout.fnmatch_lines(["  sockets: /tmp/rfl*/left.sock"])
    result.stdout.fnmatch_lines(["leaks found: 2"])


def test_leak_checks_switched_off_by_option(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(LEAKY)
    result = pytester.runpytest("-p", "runtimefaults", "--runtimefaults-leak-checks=-processes")
    result.assert_outcomes(passed=4, failed=1)  # the socket leak is still caught
    result = pytester.runpytest("-p", "runtimefaults", "--runtimefaults-leak-checks=none")
    result.assert_outcomes(passed=5)


def test_leak_filter_by_kind_and_name() -> None:
    everything = LeakFilter.parse("all")
    assert everything.enabled("processes:runc")
    assert not everything.enabled("processes:runc", marker=False)
    assert everything.enabled("processes:runc", marker=("processes",))
    assert not everything.enabled("fds:containerd", marker=("processes",))
    only = LeakFilter.parse("processes,mounts")
    assert only.enabled("mounts")
    assert not only.enabled("fds:containerd")
    minus = LeakFilter.parse("-fds,-processes:runc")
    assert not minus.enabled("fds:containerd")
    assert not minus.enabled("processes:runc")
    assert minus.enabled("processes:crun")
    assert not LeakFilter.parse("none").enabled("mounts")


def test_leak_check_baseline_is_taken_at_registration() -> None:
    registry = FaultRegistry()
    state = {"a"}
    check = registry.add_leak_check("units", lambda: set(state))
    state |= {"b"}
    assert check.leaked() == {"b"}


def test_a_second_check_of_the_same_name_does_not_replace_the_first() -> None:
    registry = FaultRegistry()
    first = registry.add_leak_check("processes:runtime", set)
    second = registry.add_leak_check("processes:runtime", set)
    assert (first.name, second.name) == ("processes:runtime", "processes:runtime#2")
    assert set(registry.leak_checks) == {"processes:runtime", "processes:runtime#2"}
    assert not LeakFilter.parse("-processes:runtime").enabled(second.name)
    assert LeakFilter.parse("all").enabled(second.name, marker=("processes:runtime",))


def test_child_and_descendant_processes_and_by_exe() -> None:
    sh = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    try:
        grand: set[str] = set()
        deadline = time.monotonic() + 10
        # Between fork and exec the child is still called "sh": wait for "sleep".
        while not any(e.endswith(" sleep") for e in grand) and time.monotonic() < deadline:
            grand = leaks.child_processes(sh.pid)
            time.sleep(0.01)
        assert any(entry.endswith(" sleep") for entry in grand)
        assert f"{sh.pid} sh" in leaks.child_processes(os.getpid())
        assert grand <= leaks.descendant_processes(os.getpid())
        sleep_pid = next(iter(grand)).split()[0]
        assert f"{sleep_pid} sleep" in leaks.processes_by_exe("sleep")
    finally:
        sh.kill()
        sh.wait()


def test_processes_with_arg_finds_only_the_tests_own() -> None:
    mine = subprocess.Popen(["sleep", "30.123456"])
    other = subprocess.Popen(["sleep", "30.654321"])
    try:
        assert leaks.processes_with_arg("30.123456") == {f"{mine.pid} sleep"}
    finally:
        for p in (mine, other):
            p.kill()
            p.wait()
    assert leaks.processes_with_arg("30.123456") == set()


def test_open_fds_sees_a_new_socket_and_raises_for_a_dead_process() -> None:
    before = leaks.open_fds(os.getpid())
    s = socket.socket(socket.AF_UNIX)
    try:
        new = leaks.open_fds(os.getpid()) - before
        assert any("socket:[" in entry for entry in new)
    finally:
        s.close()
    dead = subprocess.Popen(["true"])
    dead.wait()
    with pytest.raises(ProcessLookupError):
        leaks.open_fds(dead.pid)


def test_socket_files_ignores_other_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "file").write_text("")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(tmp_path / "sub" / "a.sock"))
        assert leaks.socket_files(tmp_path) == {str(tmp_path / "sub" / "a.sock")}
    finally:
        s.close()


def test_mounts_see_cgroup_ro_state_and_netns_links_are_readable() -> None:
    cgroup = leaks.mounts("/sys/fs/cgroup")
    assert any(m.startswith("/sys/fs/cgroup ") and m.endswith(" rw") for m in cgroup)
    assert "lo" in leaks.links()
    assert isinstance(leaks.netns_names(), set)


@pytest.mark.needs("root")  # unshare --mount
def test_mount_table_unescapes_spaces(tmp_path: Path) -> None:
    """A mount point with a space, in a private mount namespace."""
    target = tmp_path / "with space"
    target.mkdir()
    code = (
        "import subprocess, sys; from pytest_runtimefaults import leaks; "
        f"subprocess.run(['mount', '-t', 'tmpfs', '-o', 'ro', 'x', {str(target)!r}], check=True); "
        f"print(leaks.mounts({str(tmp_path)!r}))"
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "python3", "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{target} tmpfs ro" in proc.stdout
