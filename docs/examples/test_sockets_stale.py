"""A daemon must restart over the stale socket an OOM kill left, and must not
steal a live instance's socket or delete what is not a socket.

The daemon here is the package's demo daemon with the ``correct`` bind policy;
put your own daemon's command line in its place.
"""

import pytest

from pytest_runtimefaults.sockets import demo_daemon_argv


@pytest.mark.parametrize("variant", ["stale", "live", "file", "symlink", "abstract"])
def test_daemon_tells_the_variants_apart(stale_socket, daemon, variant):
    planted = stale_socket(variant=variant)
    d = daemon(
        demo_daemon_argv(planted.path, "correct"),
        ready_log=r"^ready",  # its own word: a held path accepts connections too
        start=False,
    )
    verdict = planted.judge(d)  # starts it, then looks at what it did
    assert verdict.ok, verdict


@pytest.mark.recovers(within=10, probe="daemon demo")
def test_daemon_serves_again_after_an_oom_kill(stale_socket, daemon):
    planted = stale_socket(variant="stale")
    d = daemon(demo_daemon_argv(planted.path, "correct"), socket_path=planted.path, name="demo")
    seconds = d.crash_restart()  # SIGKILL, start over its own stale socket
    assert seconds < 5
    d.kill()  # left down: lifting this fault restarts it, recovers() waits
    d.assert_no_fatal_errors()
