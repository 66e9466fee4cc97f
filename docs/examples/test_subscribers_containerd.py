"""A private containerd under 30 churning gRPC subscribers and real container lifecycles."""

import shutil

import pytest

from pytest_runtimefaults.naming import unique_name
from pytest_runtimefaults.rootfs import build_rootfs
from pytest_runtimefaults.subscribers import Churn, first_events
from pytest_runtimefaults.transports.containerd import ContainerdEvents


@pytest.fixture
def rootfs(tmp_path):
    # busybox plus /proc, /sys and /dev: parallel runs of one rootfs need them made
    return build_rootfs(tmp_path / "rootfs", shutil.which("busybox"))


def test_containerd_keeps_broadcasting(containerd, subscribers, rootfs):
    events = ContainerdEvents(containerd.address)
    watch = subscribers.watch(
        containerd.pid,
        containerd.directory / "containerd.log",
        goroutines=containerd.goroutines,  # pprof on containerd's debug socket
    )
    swarm = subscribers(events, 30, churn=Churn(max_events=20, max_life=1.0, steady=5))
    swarm.prime(events.publish)  # every steady subscriber is listening
    for _ in range(15):  # 6 events each: /containers/create ... /containers/delete
        containerd.ctr("run", "--rm", "--rootfs", str(rootfs), unique_name("doc"), "/bin/true")
    swarm.drain()
    report = swarm.report()
    print(report.summary())
    # containerd 1.6 (docker/go-events) may skip or double a single event for a
    # subscriber next to one that is leaving: see "What we found".  A gRPC
    # subscription is not acknowledged, so a loaded machine can also show "head"
    # misses (registration slower than the grace).  The witness subscribes to the
    # same broadcaster and can be skipped too ("unknown").  Nothing else.
    accepted = {"gap", "duplicate", "tail", "head", "unknown"}
    assert {p.kind for p in report.problems} <= accepted
    events.close()  # the publishing connection too
    watch.check(settle=10)  # alive, no panic, fds and goroutines back to the baseline
    assert first_events(events, events.publish)  # a newcomer is served
    events.close()
