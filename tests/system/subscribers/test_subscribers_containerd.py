"""The subscriber swarm against a real containerd: gRPC Subscribe and ``ctr events``."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pytest_runtimefaults import caps
from pytest_runtimefaults.containerd import Containerd
from pytest_runtimefaults.naming import unique_name
from pytest_runtimefaults.rootfs import build_rootfs
from pytest_runtimefaults.subscribers import Churn, DaemonWatch, Swarm, SwarmReport, first_events
from pytest_runtimefaults.transports.command import CommandTransport
from pytest_runtimefaults.transports.containerd import ContainerdEvents, require_client

LIFECYCLE = (
    "/containers/create",
    "/tasks/create",
    "/tasks/start",
    "/tasks/exit",
    "/tasks/delete",
    "/containers/delete",
)


@pytest.fixture
def grpc_client(request: pytest.FixtureRequest) -> None:
    why = require_client()
    caps.require(request, why is None, why or "", "pip install grpcio containerd 'protobuf<4'")


@pytest.fixture
def rootfs(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A busybox root filesystem for ``ctr run --rootfs`` (no image needed)."""
    busybox = caps.require_command(request, "busybox", package="busybox-static")
    # build_rootfs makes /proc, /sys and /dev beforehand: two runc instances sharing a
    # rootfs that lacks /proc race to mkdirat it, and the loser fails with EEXIST.
    return build_rootfs(tmp_path / "rootfs", busybox)


def run_lifecycles(ctd: Containerd, rootfs: Path, count: int, parallel: int = 2) -> list[str]:
    """``ctr run --rm`` *count* containers, *parallel* at a time (bursts of events)."""
    names = [unique_name("rfsub") for _ in range(count)]

    def one(name: str) -> None:
        ctd.ctr("run", "--rm", "--rootfs", str(rootfs), name, "/bin/true", timeout=60)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, names))
    return names


def topics_by_container(swarm: Swarm) -> dict[str, list[str]]:
    """The witness's lifecycle topics per container id (from ctr-visible payload order)."""
    out: dict[str, list[str]] = defaultdict(list)
    for conn in swarm.witness.connections:
        for key in conn.keys:
            out[key.split("@")[0]].append(key)
    return out


def assert_only_go_events_losses(report: SwarmReport) -> None:
    """containerd 1.6's known delivery defect, and nothing else.

    containerd's exchange closes a departing subscriber's queue before it asks
    docker/go-events' Broadcaster to remove it.  A broadcast that meets the
    closed queue removes it *while ranging over the sink slice*: the sink that
    slides into its slot is skipped (one event lost for that subscriber) and
    the last sink is visited twice (the same event delivered twice).  So under
    churn, a few subscribers lose events and others get one twice, but order
    is kept and nothing else goes wrong.  Any other problem fails.

    ``head`` misses (events broadcast more than ``grace`` after a connection
    opened, before its first event) are printed but not counted: containerd
    acknowledges no subscription, so how long it takes to register one is
    invisible, and on a loaded machine (one CI run: 78 connections, 2-6 events
    each) it takes longer than the grace.  A gap inside what a subscriber
    received is unambiguous, and that is the go-events signature.

    The witness is a subscriber of the same broadcaster, so it can be skipped
    too (or register late after a restart): an event a subscriber got that the
    witness never saw (``unknown``) is the same signature, counted as a loss.
    """
    accepted = ("gap", "duplicate", "tail", "head", "unknown")
    other = [p for p in report.problems if p.kind not in accepted]
    assert not other, report.summary()
    losses = [p for p in report.problems if p.kind in ("gap", "tail", "unknown")]
    # Rare and scattered: well under 1 % of the deliveries.
    assert sum(len(p.keys) for p in losses) <= report.deliveries // 100, report.summary()
    heads = [p for p in report.problems if p.kind == "head"]
    print(f"head misses (registration latency or loss, not told apart): {len(heads)} connections")
    lost = {k for p in losses for k in p.keys}
    doubled = {k for p in report.problems if p.kind == "duplicate" for k in p.keys}
    print(
        f"go-events signature: {sum(len(p.keys) for p in losses)} events lost, "
        f"{sum(p.kind == 'duplicate' for p in report.problems)} duplicate deliveries, "
        f"{len(lost & doubled)} of {len(lost)} lost events delivered twice elsewhere"
    )


@pytest.mark.needs("container-cgroups")
@pytest.mark.timeout(120)
def test_containerd_survives_a_churning_swarm(
    grpc_client: None, containerd: Containerd, rootfs: Path, subscribers, record_property
) -> None:  # type: ignore[no-untyped-def]
    """50 subscribers with churn while 500+ lifecycle events are broadcast."""
    transport = ContainerdEvents(containerd.address)
    transport.publish()  # the publisher's own connection is part of the baseline
    time.sleep(0.3)
    assert containerd.pid is not None
    watch = subscribers.watch(
        containerd.pid, containerd.directory / "containerd.log", goroutines=containerd.goroutines
    )
    swarm = subscribers(transport, 50, churn=Churn(max_events=40, max_life=2.0, steady=10))
    swarm.prime(transport.publish)
    t0 = time.monotonic()
    names = run_lifecycles(containerd, rootfs, 84, parallel=3)  # 6 events each: 504
    produced_s = time.monotonic() - t0
    swarm.drain(timeout=30)
    report = swarm.report()
    figures = report.figures()
    print("\ncontainerd swarm:", figures, f"production {produced_s:.1f} s")
    print(report.summary())
    assert_only_go_events_losses(report)
    # What it did, for docs/matrix.md: the go-events signature is a misbehaviour.
    signature = any(p.kind in ("gap", "duplicate", "tail", "unknown") for p in report.problems)
    record_property("runtimefaults_verdict.outcome", "misbehaved" if signature else "survived")
    # The witness is a sink of the same broadcaster: it saw every lifecycle on
    # containerd 1.6.20, and missed 2-5 of 504 to the same defect on 2.1.9
    # (under 2 % of them).
    lifecycle_keys = [k for k in report.reference if not k.split("@")[0].endswith("/marker")]
    missed = 6 * len(names) - len(lifecycle_keys)
    assert 0 <= missed <= len(lifecycle_keys) // 50, (missed, len(lifecycle_keys))
    # Every steady subscriber kept its one connection to the end, with nothing but
    # the go-events signature (or registration latency) against it.
    steady = [rec for rec in report.subscribers if rec.steady]
    assert len(steady) == 10
    assert all(len(r.connections) == 1 and r.connections[0].end == "stop" for r in steady)
    assert report.cancels > 50
    swarm.stop()
    watch.check(settle=10)
    assert first_events(transport, transport.publish)
    transport.close()


@pytest.mark.needs("container-cgroups")
@pytest.mark.timeout(120)
def test_containerd_sigkill_mid_swarm_gives_clean_errors_then_reconnects(
    grpc_client: None, containerd: Containerd, rootfs: Path, subscribers
) -> None:  # type: ignore[no-untyped-def]
    transport = ContainerdEvents(containerd.address)
    swarm = subscribers(transport, 20, churn=Churn(max_events=20, max_life=1.5, steady=5))
    swarm.prime(transport.publish)
    run_lifecycles(containerd, rootfs, 10)
    transport.close()
    old_pid = containerd.pid
    containerd.kill()
    # Every subscriber sees its stream break (or its reconnect refused).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(rec.errors for rec in swarm.records) and swarm.witness.errors:
            break
        time.sleep(0.05)
    containerd.restart()
    assert containerd.pid != old_pid
    swarm.prime(transport.publish)
    run_lifecycles(containerd, rootfs, 10)
    swarm.drain(timeout=30)
    report = swarm.report()
    figures = report.figures()
    print("\ncontainerd SIGKILL mid-swarm:", figures)
    print(report.summary())
    assert_only_go_events_losses(report)
    errors = [c.error for rec in report.subscribers for c in rec.errors]
    assert len({rec.index for rec in report.subscribers if rec.errors}) == 20
    assert all("UNAVAILABLE" in e for e in errors), errors[:5]
    assert figures["recovered_after_error"] == 20
    assert containerd.pid is not None
    watch = DaemonWatch(pid=containerd.pid, log_path=containerd.directory / "containerd.log")
    watch.baseline()
    watch.log_offset = 0  # the whole log: neither instance may have panicked
    assert watch.panics() == []
    assert watch.alive()
    assert first_events(transport, transport.publish)
    transport.close()


@pytest.mark.needs("container-cgroups")
@pytest.mark.timeout(90)
def test_ctr_events_under_the_swarm(containerd: Containerd, rootfs: Path, subscribers) -> None:  # type: ignore[no-untyped-def]
    """The command-line transport: each subscriber is a ``ctr events`` process."""
    transport = CommandTransport(containerd.ctr_argv("events"), name="ctr events")
    swarm = subscribers(transport, 8, churn=Churn(max_events=15, max_life=1.5, steady=3))
    names: list[str] = []

    def prime() -> None:
        names.extend(run_lifecycles(containerd, rootfs, 1))

    swarm.prime(prime, timeout=30)
    run_lifecycles(containerd, rootfs, 15)
    swarm.drain(timeout=20)
    report = swarm.report()
    print("\nctr events swarm:", report.figures())
    assert_only_go_events_losses(report)
    assert sum(" /tasks/exit " in k for k in report.reference) >= 15
    deadline = time.monotonic() + 5  # the readers reap their ctr after the swarm stops
    while [p for p in os.listdir("/proc") if p.isdigit() and _is_our_ctr_events(p, containerd)]:
        assert time.monotonic() < deadline, "ctr events processes left behind"
        time.sleep(0.05)


def _is_our_ctr_events(pid: str, ctd: Containerd) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"events" in cmd and ctd.address.encode() in cmd


@pytest.mark.timeout(60)
def test_goroutines_from_the_debug_socket_catch_subscriptions_left_open(
    grpc_client: None, containerd: Containerd
) -> None:
    """The goroutine check fails while subscriptions are held, passes once they go."""
    assert containerd.pid is not None
    watch = DaemonWatch(pid=containerd.pid, goroutines=containerd.goroutines)
    watch.baseline()
    assert watch.base_goroutines is not None
    assert watch.base_goroutines > 0
    transport = ContainerdEvents(containerd.address)
    held = [transport.subscribe() for _ in range(5)]
    deadline = time.monotonic() + 10  # each stream is a goroutine or more once served
    while containerd.goroutines() < watch.base_goroutines + 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    watch.fd_slack = 1000  # the held streams' fds too: judge goroutines alone here
    with pytest.raises(AssertionError, match=r"\+\d+ goroutines"):
        watch.check(settle=0.5)
    for sub in held:
        sub.cancel()
    transport.close()
    watch.check(settle=10)


def test_goroutines_of_a_stopped_containerd_name_the_socket(tmp_path: Path) -> None:
    ctd = Containerd(directory=tmp_path / "ctd")  # never started
    with pytest.raises(RuntimeError, match=r"debug\.sock did not answer.*is containerd running"):
        ctd.goroutines(timeout=1)
