"""CRI-O's negative WaitGroup panic, caught by a churning subscriber swarm."""

import pytest

from pytest_runtimefaults.subscribers import Churn


def run_swarm(server, subscribers):
    """20 subscribers come and go while 400 events are broadcast in bursts."""
    swarm = subscribers(server.transport(), 20, churn=Churn(max_events=15, max_life=0.5))
    try:
        swarm.prime(lambda: server.publish(1))
        for _ in range(20):
            server.publish(20, burst=10)
    except ConnectionError:
        pass  # the broadcaster died mid-swarm: judged below
    swarm.drain(timeout=10)
    return swarm.report()


def test_the_buggy_broadcaster_panics(subscribers, event_broadcaster):
    server = event_broadcaster(bug="double-done")  # Done() on failed Send and on close
    watch = subscribers.watch(server.pid, server.log_path)
    run_swarm(server, subscribers)
    assert server.wait(10) == 2  # Go's exit status after a panic
    with pytest.raises(AssertionError, match="negative WaitGroup counter"):
        watch.check()


def test_the_fixed_broadcaster_survives(subscribers, event_broadcaster):
    server = event_broadcaster()  # the stream is closed exactly once
    watch = subscribers.watch(server.pid, server.log_path)
    report = run_swarm(server, subscribers)
    report.assert_ok()  # no gap, duplicate or reordering for anyone
    print(report.summary())
    watch.check()  # alive, no panic, file descriptors back to the baseline


@pytest.mark.recovers(within=5)  # lifts the swarm, then polls the watched daemon
def test_the_daemon_recovers_after_the_swarm(subscribers, event_broadcaster):
    server = event_broadcaster()
    subscribers.watch(server.pid, server.log_path)  # offered to `recovers` as a probe
    run_swarm(server, subscribers).assert_ok()
