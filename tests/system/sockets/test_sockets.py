"""stale_socket variants, against the three test-only bind policies.

The demo daemon's policies reproduce the Dragonfly history: ``naive`` (bind as
is: the crash loop), ``always-unlink`` (the first fix: steals live sockets),
``correct`` (unlink only a socket that refuses connections, refuse the rest).
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_runtimefaults.core.fault import Fault
from pytest_runtimefaults.daemon import Daemon, connect_error
from pytest_runtimefaults.faults import FaultRegistry
from pytest_runtimefaults.sockets import (
    EXPECTED,
    VARIANTS,
    SocketPathError,
    StaleSocket,
    demo_daemon_argv,
    safe_bind,
)

pytestmark = pytest.mark.timeout(30)


def demo(path: str, policy: str) -> Daemon:
    return Daemon(
        demo_daemon_argv(path, policy), ready_log=r"^ready", ready_timeout=10, name=policy
    )


@pytest.fixture(params=VARIANTS)
def planted(request: pytest.FixtureRequest) -> Iterator[StaleSocket]:
    with StaleSocket(variant=request.param) as s:
        yield s


def judge(planted: StaleSocket, policy: str) -> str:
    d = demo(planted.path, policy)
    try:
        verdict = planted.judge(d)
    finally:
        d.stop()
    return str(verdict)


# --- what must be shown ------------------------------------------------------


def test_naive_daemon_crash_loops_on_a_stale_socket() -> None:
    with StaleSocket(variant="stale") as s:
        for _ in range(2):  # every restart fails the same way: a crash loop
            d = demo(s.path, "naive")
            verdict = s.judge(d)
            d.stop()
            assert not verdict.ok
            assert verdict.outcome == "refused"
            assert "Address already in use" in verdict.error


def test_always_unlink_passes_stale_but_steals_a_live_socket() -> None:
    with StaleSocket(variant="stale") as s:
        d = demo(s.path, "always-unlink")
        assert s.judge(d).ok
        d.stop()
    with StaleSocket(variant="live") as s:
        d = demo(s.path, "always-unlink")
        verdict = s.judge(d)
        d.stop()
        assert not verdict.ok
        assert any("stole the socket of a live process" in p for p in verdict.problems)


def test_correct_daemon_passes_every_variant(planted: StaleSocket) -> None:
    d = demo(planted.path, "correct")
    try:
        verdict = planted.judge(d)
    finally:
        d.stop()
    assert verdict.ok, str(verdict)
    assert verdict.outcome == ("served" if EXPECTED[planted.variant] == "serve" else "refused")


# Which variants each flawed policy gets wrong (measured; see docs/sockets.md).
WRONG = {
    "naive": {"stale", "bind-mount"},
    "always-unlink": {"live", "file", "symlink", "foreign-dir", "open-dir"},
}


@pytest.mark.parametrize("policy", sorted(WRONG))
def test_flawed_policies_are_caught_exactly_where_expected(policy: str) -> None:
    wrong = set()
    for variant in VARIANTS:
        with StaleSocket(variant=variant) as s:
            d = demo(s.path, policy)
            try:
                if not s.judge(d).ok:
                    wrong.add(variant)
            finally:
                d.stop()
    assert wrong == WRONG[policy]


# --- the variants themselves ------------------------------------------------------


def test_stale_is_a_real_socket_refusing_connections() -> None:
    with StaleSocket(variant="stale") as s:
        assert stat.S_ISSOCK(os.lstat(s.path).st_mode)
        assert connect_error(s.path) == "ECONNREFUSED"
        path = s.path
    assert not os.path.exists(os.path.dirname(path))


def test_live_and_abstract_are_held_by_a_listener() -> None:
    with StaleSocket(variant="live") as live, StaleSocket(variant="abstract") as abstract:
        assert live.greets()
        assert abstract.path.startswith("@")
        assert abstract.greets()
        with socket.socket(socket.AF_UNIX) as s, pytest.raises(OSError, match="in use"):
            s.bind(b"\0" + abstract.path[1:].encode())
    assert not live.greets()
    assert not abstract.greets()


def test_symlink_points_to_a_stale_socket_elsewhere() -> None:
    with StaleSocket(variant="symlink") as s:
        assert os.path.islink(s.path)
        assert s.target is not None
        assert os.readlink(s.path) == s.target
        assert connect_error(s.target) == "ECONNREFUSED"
        os.unlink(s.target)  # what a daemon following the link would do
        assert any("deleted through the symlink" in p for p in s.damage())


def test_wrong_owner_and_mode_directories_are_restored() -> None:
    with StaleSocket(variant="foreign-dir") as s:
        parent = os.path.dirname(s.path)
        assert os.stat(parent).st_uid == 65534
        assert connect_error(s.path) == "ECONNREFUSED"
    with StaleSocket(variant="open-dir") as s:
        assert stat.S_IMODE(os.stat(os.path.dirname(s.path)).st_mode) == 0o777


def _host_mounts() -> str:
    with open("/proc/self/mountinfo") as f:
        return f.read()


def test_bind_mount_lives_only_in_a_private_mount_namespace() -> None:
    with StaleSocket(variant="bind-mount") as s:
        private = os.path.dirname(s.path)
        assert s.client_view is not None
        assert s.client_view.startswith("/proc/")
        # Mounted in the holder's namespace, not in ours (the host's).
        assert private not in _host_mounts()
        holder = s.client_view.split("/")[2]
        assert private in Path(f"/proc/{holder}/mountinfo").read_text()
        assert connect_error(s.client_view) == "ECONNREFUSED"
        # A daemon replaces the stale socket: the client's mount keeps the old inode.
        os.unlink(s.path)
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(s.path)
            server.listen()
            assert connect_error(s.path) is None
            assert connect_error(s.client_view) == "ECONNREFUSED"
    assert private not in _host_mounts()
    assert not os.path.exists(f"/proc/{holder}")


def test_unknown_variant_names_the_choices() -> None:
    with pytest.raises(ValueError, match="choose one of stale, live"):
        StaleSocket(variant="stael")


def test_registry_lift_removes_what_was_planted_but_not_a_daemon_socket() -> None:
    registry = FaultRegistry()
    with StaleSocket(variant="file") as s:
        assert isinstance(s, Fault)
        assert s.applied == 1
        assert registry.register(s) is s
        assert [r.name for r in registry.active] == ["stale_socket file"]
        assert [r.applied for r in registry.records] == [1]
        registry.lift_all()
        assert not os.path.exists(s.path)
        assert os.path.isdir(os.path.dirname(s.path))  # lifted, not stopped
    assert not os.path.exists(os.path.dirname(s.path))
    with StaleSocket(variant="stale") as s:
        os.unlink(s.path)
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(s.path)  # the daemon's socket now
            s.remove()
            assert os.path.exists(s.path)


def test_the_registry_keyword_still_works_but_is_deprecated() -> None:
    registry = FaultRegistry()
    with pytest.warns(DeprecationWarning, match=r"registry.register\(stale\)"):
        stale = StaleSocket(variant="file", registry=registry)
    with stale:
        assert [r.name for r in registry.active] == ["stale_socket file"]
    assert stale.start() is stale  # idempotent, and start() returns the fault


# --- safe_bind, the reference ------------------------------------------------------


def test_safe_bind_messages(tmp_path: object) -> None:
    with StaleSocket(variant="live") as s, pytest.raises(SocketPathError, match="in use"):
        safe_bind(s.path)
    with StaleSocket(variant="file") as s, pytest.raises(SocketPathError, match="regular file"):
        safe_bind(s.path)
    with StaleSocket(variant="stale") as s:
        safe_bind(s.path).close()


# --- the fixture, through the plugin ----------------------------------------------------

PLUGIN_TEST = """
import pytest
from pytest_runtimefaults.sockets import demo_daemon_argv

@pytest.mark.parametrize("variant", ["stale", "live"])
def test_it(stale_socket, daemon, runtimefaults_faults, variant):
    s = stale_socket(variant=variant)
    d = daemon(demo_daemon_argv(s.path, "correct"), ready_log="^ready", start=False)
    verdict = s.judge(d)
    assert verdict.ok, verdict
    assert f"stale_socket {variant}" in [r.name for r in runtimefaults_faults.records]
"""


def test_fixtures_through_the_plugin(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(PLUGIN_TEST)
    result = pytester.runpytest_subprocess("-p", "runtimefaults", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


RECOVERS_TEST = """
import os
import pytest
from pytest_runtimefaults.sockets import demo_daemon_argv

@pytest.mark.recovers(within=2, probe="daemon demo")
@pytest.mark.parametrize("policy", ["naive", "correct"])
def test_oom_kill(stale_socket, daemon, policy):
    path = stale_socket(variant="stale").path
    os.unlink(path)  # a fresh path: the first start binds
    d = daemon(demo_daemon_argv(path, policy), socket_path=path, name="demo")
    d.kill()  # leaves a real stale socket; the lift restarts the daemon over it
"""


def test_recovers_marker_catches_the_naive_daemon(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(RECOVERS_TEST)
    result = pytester.runpytest_subprocess("-p", "runtimefaults", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_oom_kill?naive?*"])
    assert "Address already in use" in result.stdout.str()
