"""The subscriber swarm: its judging, the broadcaster pair, the command transport."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from pytest_runtimefaults.core.fault import Fault
from pytest_runtimefaults.faults import FaultRegistry
from pytest_runtimefaults.subscribers import (
    Churn,
    DaemonWatch,
    Event,
    Subscription,
    SubscriptionError,
    Swarm,
    ThreadedSubscription,
    first_events,
)
from pytest_runtimefaults.transports.broadcaster import Broadcaster
from pytest_runtimefaults.transports.command import CommandTransport


class MemoryBus:
    """An in-process broadcaster with switchable delivery defects.

    Not a stand-in for a daemon: it exists to prove that the swarm's judging
    catches each defect (a check that cannot fail is a defect itself).
    """

    name = "memory"

    def __init__(self, defect: str | None = None, victim: int = 3) -> None:
        self.defect = defect
        self.victim = victim  # which subscription (in order of subscribing) is hurt
        self.subs: list[tuple[int, list[Event], threading.Condition]] = []
        self.lock = threading.Lock()
        self.seq = 0
        self.count = 0
        self.held: Event | None = None

    def subscribe(self) -> Subscription:
        cond = threading.Condition()
        box: list[Event] = []
        with self.lock:
            sid = self.count
            self.count += 1
            entry = (sid, box, cond)
            self.subs.append(entry)
        stop = threading.Event()

        def pump(put, cancelled):  # type: ignore[no-untyped-def]
            while not stop.is_set():
                with cond:
                    cond.wait_for(lambda: box or stop.is_set(), timeout=0.1)
                    items, box[:] = list(box), []
                for ev in items:
                    put(ev)

        def cancel() -> None:
            stop.set()
            with self.lock:
                if entry in self.subs:
                    self.subs.remove(entry)

        return ThreadedSubscription(pump, on_cancel=cancel)

    def publish(self, n: int = 1) -> None:
        for _ in range(n):
            with self.lock:
                self.seq += 1
                ev = Event(key=str(self.seq), topic="/mem")
                for sid, box, cond in self.subs:
                    copies = [ev]
                    hurt = sid == self.victim and self.seq % 7 == 0
                    if hurt and self.defect == "drop":
                        copies = []
                    elif hurt and self.defect == "duplicate":
                        copies = [ev, ev]
                    if sid == self.victim and self.defect == "swap":
                        # Hold one event back and deliver it after the next.
                        if hurt:
                            self.held, copies = ev, []
                        elif self.held is not None:
                            copies, self.held = [ev, self.held], None
                    with cond:
                        box.extend(copies)
                        cond.notify()
            time.sleep(0.0005)


def run_memory(defect: str | None, seed: int = 1) -> tuple[MemoryBus, Swarm]:
    bus = MemoryBus(defect, victim=3)  # 0 is the witness; 3 a steady subscriber
    swarm = Swarm(bus, subscribers=6, seed=seed, churn=Churn(max_events=30, steady=3))
    with swarm:
        swarm.prime(bus.publish)
        bus.publish(400)
        swarm.drain(timeout=10)
    return bus, swarm


@pytest.mark.timeout(30)
def test_a_faithful_broadcast_passes() -> None:
    _, swarm = run_memory(None)
    report = swarm.report()
    report.assert_ok()
    figures = report.figures()
    assert figures["steady_complete"] == 3
    assert report.cancels > 0
    assert len(report.reference) >= 401


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("defect", "kind"), [("drop", "gap"), ("duplicate", "duplicate"), ("swap", "order")]
)
def test_the_judge_catches_each_defect(defect: str, kind: str) -> None:
    _, swarm = run_memory(defect)
    report = swarm.report()
    assert not report.ok
    kinds = {p.kind for p in report.problems}
    assert kind in kinds, report.summary()
    with pytest.raises(AssertionError, match=kind):
        report.assert_ok()


def test_churn_decisions_replay_with_the_seed() -> None:
    a = Swarm(MemoryBus(), subscribers=5, seed=42)
    b = Swarm(MemoryBus(), subscribers=5, seed=42)
    c = Swarm(MemoryBus(), subscribers=5, seed=43)
    assert a._seeds == b._seeds != c._seeds


def test_threaded_subscription_reports_a_broken_stream() -> None:
    def pump(put, cancelled):  # type: ignore[no-untyped-def]
        put(Event("1"))
        raise SubscriptionError("connection reset by daemon")

    sub = ThreadedSubscription(pump, on_cancel=lambda: None)
    assert sub.receive(1.0) == Event("1")
    with pytest.raises(SubscriptionError, match="reset"):
        sub.receive(1.0)


# --- the broadcaster pair: CRI-O's bug caught, the fix passes ---------------------


#: Publishing rounds of 20 events each.  The double Done needs a subscriber to
#: leave while events for it are still queued, a race the churn wins only now
#: and then: in a slow container (Python 3.13, 3.14) 20 rounds were not always
#: enough.  The swarm stops publishing as soon as the broadcaster died, and the
#: fixed broadcaster gets the same load.
ROUNDS = 150


def swarm_against(server: Broadcaster, seed: int) -> Swarm:
    swarm = Swarm(
        server.transport(),
        subscribers=20,
        seed=seed,
        churn=Churn(max_events=15, max_life=0.5, steady=3),
    )
    with swarm:
        try:
            swarm.prime(lambda: server.publish(1))
            for _ in range(ROUNDS):
                if not server.alive():
                    break
                server.publish(20, burst=10, pause=0.005)
        except ConnectionError:
            pass  # the broadcaster died under us: judged below
        swarm.drain(timeout=10)
    return swarm


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_double_done_broadcaster_panics_under_the_swarm(seed: int) -> None:
    with Broadcaster(bug="double-done") as server:
        watch = DaemonWatch(pid=server.pid, log_path=server.log_path)
        watch.baseline()
        swarm_against(server, seed).report()
        assert server.wait(5) == 2, server.log()
        assert any("negative WaitGroup counter" in line for line in watch.panics())
        with pytest.raises(AssertionError, match="panic"):
            watch.check()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fixed_broadcaster_survives_the_swarm(seed: int) -> None:
    with Broadcaster(bug=None) as server:
        watch = DaemonWatch(pid=server.pid, log_path=server.log_path)
        time.sleep(0.2)  # let the start-up probe connection close before the baseline
        watch.baseline()
        swarm = swarm_against(server, seed)
        report = swarm.report()
        report.assert_ok()
        assert report.cancels > 20, report.summary()
        assert report.figures()["steady_complete"] == 3
        assert len(report.reference) > 400
        watch.check(settle=5)
        assert server.stats() == 0
        events = first_events(server.transport(), lambda: server.publish(1), count=2)
        assert len(events) == 2


@pytest.mark.timeout(60)
def test_the_swarm_is_a_fault_the_registry_lifts() -> None:
    with Broadcaster(bug=None) as server:
        swarm = Swarm(
            server.transport(), subscribers=8, seed=5, churn=Churn(max_events=3, steady=2)
        )
        assert isinstance(swarm, Fault)
        registry = FaultRegistry()
        assert registry.register(swarm) is swarm
        assert swarm.start() is swarm
        assert swarm.start() is swarm  # idempotent
        swarm.prime(lambda: server.publish(1))
        for _ in range(10):
            server.publish(10, burst=5, pause=0.005)
        deadline = time.monotonic() + 10
        while swarm.applied == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert registry.lift_all() == [f"subscriber swarm x8 on {server.transport().name}"]
        # Lifted: every subscriber disconnected, every thread joined.
        assert not any(t.is_alive() for t in swarm._threads)
        assert all(c.closed is not None for r in swarm.records for c in r.connections)
        report = swarm.report()
        assert swarm.applied == report.cancels > 0
        assert registry.records[0].applied == report.cancels
        swarm.stop()  # idempotent after the lift


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_remove_while_ranging_broadcaster_loses_and_doubles_events(seed: int) -> None:
    """containerd 1.6's go-events defect, reproduced: the swarm sees it every time."""
    with Broadcaster(bug="remove-while-ranging") as server:
        report = swarm_against(server, seed).report()
        assert server.alive()  # nothing crashes: events are silently lost
    kinds = {p.kind for p in report.problems}
    assert {"gap", "duplicate"} <= kinds, report.summary()
    assert kinds <= {"gap", "duplicate", "tail"}, report.summary()


# --- the command-line transport ------------------------------------------------------


@pytest.mark.timeout(20)
def test_command_transport_reads_lines_and_reports_exit() -> None:
    script = "import sys,time\nfor i in range(3): print(f'/t ev{i}', flush=True)\n" + (
        "sys.stderr.write('boom: daemon gone\\n'); sys.exit(3)"
    )
    transport = CommandTransport([sys.executable, "-c", script])
    sub = transport.subscribe()
    got = [sub.receive(5.0) for _ in range(3)]
    assert [e.key for e in got if e] == ["/t ev0", "/t ev1", "/t ev2"]
    assert {e.topic for e in got if e} == {"/t"}
    with pytest.raises(SubscriptionError, match=r"status 3: boom: daemon gone"):
        sub.receive(5.0)


@pytest.mark.timeout(20)
def test_command_transport_cancel_kills_the_child() -> None:
    transport = CommandTransport([sys.executable, "-c", "import time; time.sleep(60)"])
    sub = transport.subscribe()
    assert sub.receive(0.1) is None
    t0 = time.monotonic()
    sub.cancel()
    assert sub.receive(2.0) is None
    assert time.monotonic() - t0 < 10  # the child sleeps 60 s


@pytest.mark.timeout(30)
def test_command_transport_under_the_swarm(event_broadcaster) -> None:  # type: ignore[no-untyped-def]
    """Any line-printing client works: here a tiny one reading the broadcaster."""
    server = event_broadcaster()
    client = (
        "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n"
        "s.sendall(b'SUBSCRIBE\\n')\nf=s.makefile('rb')\nf.readline()\n"
        "for line in f: sys.stdout.buffer.write(line); sys.stdout.flush()\n"
    )
    transport = CommandTransport([sys.executable, "-c", client, server.socket_path], name="client")
    swarm = Swarm(transport, subscribers=6, seed=7, churn=Churn(max_events=20, steady=2))
    with swarm:
        swarm.prime(lambda: server.publish(1))
        server.publish(200, burst=20, pause=0.01)
        swarm.drain(timeout=10)
    report = swarm.report()
    report.assert_ok()
    assert report.cancels > 0


# --- the fixtures, through the plugin ---------------------------------------------------


@pytest.mark.timeout(120)
def test_fixtures_through_the_plugin(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from pytest_runtimefaults.subscribers import Churn

        def test_swarm(subscribers, event_broadcaster):
            server = event_broadcaster()
            swarm = subscribers(server.transport(), churn=Churn(steady=2))
            assert swarm.n == 7
            swarm.prime(lambda: server.publish(1))
            server.publish(100, burst=10)
            swarm.drain()
            swarm.report().assert_ok()
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-swarm-size=7", "--runtimefaults-seed=5"
    )
    result.assert_outcomes(passed=1)


@pytest.mark.timeout(120)
def test_recovers_marker_judges_the_daemon_after_the_swarm(pytester: pytest.Pytester) -> None:
    """``recovers`` lifts the swarm and probes the watched daemon: buggy fails, fixed passes."""
    pytester.makepyfile(
        """
        import pytest
        from pytest_runtimefaults.subscribers import Churn

        @pytest.mark.recovers(within=3)
        @pytest.mark.parametrize("bug", ["double-done", None])
        def test_swarm(subscribers, event_broadcaster, bug):
            server = event_broadcaster(bug=bug)
            subscribers.watch(server.pid, server.log_path)
            swarm = subscribers(server.transport(), 20, churn=Churn(max_events=15, max_life=0.5))
            try:
                swarm.prime(lambda: server.publish(1))
                for _ in range(20):
                    server.publish(20, burst=10)
            except ConnectionError:
                pass
            swarm.drain(timeout=10)
        """
    )
    result = pytester.runpytest_subprocess("-p", "runtimefaults", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*recovers*negative WaitGroup counter*"])


def test_bad_swarm_size_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(subscribers):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "runtimefaults", "--runtimefaults-swarm-size=0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*swarm size must be at least 1, got 0*"])
