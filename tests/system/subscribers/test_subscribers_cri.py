"""The subscriber swarm on CRI ``GetContainerEvents``, against a real containerd.

Three judgements (transports/cri.py), each by the expectations table per
containerd version: the swarm with churn (gaps, duplicates, order against
the witness, and every event the producer made against the witness and the
steady subscribers), fan-out (N concurrent subscribers, each must get every
event: cri-o issue 6466, containerd issue 7318 / PR 9661) and a SIGKILL and
restart under the swarm (kubernetes issue 129827, containerd/cri PR 617).
Two test-only susceptible clients prove the last two judgements can fail:
one that deals one upstream stream out to its callers, one that reads the
end of the stream as silence.

containerd 1.6 (Debian 12) has no ``GetContainerEvents``: the fixture skips,
naming the version and the daemon's ``UNIMPLEMENTED``.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from typing import Any

import pytest
from findings import judged

from pytest_runtimefaults import expectations as ex
from pytest_runtimefaults.containerd import Containerd
from pytest_runtimefaults.subscribers import (
    Churn,
    Connection,
    Event,
    SubscriberRecord,
    Subscription,
    SubscriptionError,
    SwarmReport,
    first_events,
)
from pytest_runtimefaults.transports.cri import (
    EVENT_TYPES,
    CriEvents,
    CriLifecycles,
    CriRun,
    event_key,
    fan_out_outcome,
    missing_events,
    run_fan_out,
    run_restart,
    split_unsent,
)

pytestmark = pytest.mark.timeout(180)
#: the tests that run pods and containers
needs_containers = pytest.mark.needs("container-cgroups")

FAN_OUT = 8  # concurrent subscribers (plus the witness)
STREAMS = 50  # streams opened and cancelled with no event in flight
CONTAINERS = 10  # container lifecycles one subscriber watches, one after another


def _show(what: str, run: CriRun) -> None:
    print(f"\n{what}: {run.outcome.value}: {run.evidence}")
    print(run.report.summary())
    for index, lost in sorted(run.missing.items())[:5]:
        who = "witness" if index < 0 else f"subscriber {index}"
        print(f"  {who} missed {len(lost)}: {lost[:4]}")


def _judge(record_property: Any, fault: str, run: CriRun) -> None:
    verdict = judged(record_property, "containerd", fault, run.outcome, run.evidence)
    assert verdict.ok, verdict.message


# --- test-only susceptible clients ---------------------------------------------


class SharedStream:
    """A susceptible client: one upstream stream dealt out to its callers in turn.

    containerd 1.7's server bug (one channel, many readers) made in a client,
    as a kubelet that multiplexed one stream to several consumers by hand
    would: each subscription gets only some of the events.
    """

    name = "cri events, one stream shared"

    def __init__(self, inner: CriEvents) -> None:
        self.inner = inner
        self._queues: list[queue.SimpleQueue[Event]] = []
        self._lock = threading.Lock()
        self._upstream: Subscription | None = None
        self._turn = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _deal(self) -> None:
        assert self._upstream is not None
        while not self._stop.is_set():
            try:
                event = self._upstream.receive(0.1)
            except SubscriptionError:
                return
            if event is None:
                continue
            with self._lock:
                if self._queues:
                    self._queues[next(self._turn) % len(self._queues)].put(event)

    def subscribe(self) -> Subscription:
        mine: queue.SimpleQueue[Event] = queue.SimpleQueue()
        with self._lock:
            if self._upstream is None:
                self._upstream = self.inner.subscribe()
                self._thread = threading.Thread(target=self._deal, daemon=True)
                self._thread.start()
            self._queues.append(mine)
        shared = self

        class Share:
            def receive(self, timeout: float) -> Event | None:
                try:
                    return mine.get(timeout=max(timeout, 0.0))
                except queue.Empty:
                    return None

            def cancel(self) -> None:
                with shared._lock:
                    if mine in shared._queues:
                        shared._queues.remove(mine)

        return Share()

    def close(self) -> None:
        self._stop.set()
        if self._upstream is not None:
            self._upstream.cancel()
        if self._thread is not None:
            self._thread.join(10)
            assert not self._thread.is_alive(), "the dealer thread did not stop"


class SwallowsEndOfStream:
    """A susceptible client: the end of its stream reads as "no event yet".

    What kubelet's Evented PLEG must not do (kubernetes issue 129827): after
    the daemon dies, such a subscriber sits on a dead stream forever, never
    reconnects, and receives nothing again.
    """

    name = "cri events, end of stream swallowed"

    def __init__(self, inner: CriEvents) -> None:
        self.inner = inner

    def subscribe(self) -> Subscription:
        real = self.inner.subscribe()

        class Deaf:
            ended = False

            def receive(self, timeout: float) -> Event | None:
                if self.ended:
                    threading.Event().wait(timeout)
                    return None
                try:
                    return real.receive(timeout)
                except SubscriptionError:
                    self.ended = True
                    return None

            def cancel(self) -> None:
                real.cancel()

        return Deaf()


# --- the judging, on made-up records ----------------------------------------------


def _record(index: int, *steps: tuple[str, str]) -> SubscriberRecord:
    conn = Connection(opened=1.0, keys=[event_key(c, k, n) for n, (c, k) in enumerate(steps)])
    conn.times = [2.0] * len(conn.keys)
    return SubscriberRecord(index=index, steady=True, connections=[conn])


def _report(records: list[SubscriberRecord]) -> SwarmReport:
    return SwarmReport("t", 0, [], records[0], records[1:], [], 1.0)


MADE = [("a", "CREATED"), ("a", "STARTED"), ("a", "STOPPED"), ("a", "DELETED")]


def test_an_event_nobody_got_is_told_apart_from_a_fan_out_loss() -> None:
    records = [_record(-1, *MADE[:2], MADE[3]), _record(0, MADE[0], MADE[3])]
    missing, unsent = split_unsent(missing_events(records, MADE), len(records))
    assert unsent == [("a", "STOPPED")]
    assert missing == {0: [("a", "STARTED")]}
    outcome, evidence = fan_out_outcome(_report(records), missing, 4, unsent=unsent)
    assert outcome is ex.Outcome.MISBEHAVES
    assert "1 of 4 events reached no subscriber (STOPPED)" in evidence


def test_a_daemon_that_sends_nothing_does_not_pass_for_one_that_fans_out() -> None:
    made = [(f"c{i}", kind) for i in range(5) for _, kind in MADE]  # 20 events, none delivered
    records = [_record(-1), _record(0)]
    missing, unsent = split_unsent(missing_events(records, made), len(records))
    assert missing == {}
    outcome, _ = fan_out_outcome(_report(records), missing, len(made), unsent=unsent)
    assert outcome is ex.Outcome.MISBEHAVES
    everything = [_record(-1, *MADE), _record(0, *MADE)]
    assert fan_out_outcome(_report(everything), {}, 4)[0] is ex.Outcome.SURVIVES


# --- against the real containerd ------------------------------------------------


@needs_containers
def test_cri_events_of_pods_and_containers_one_subscriber(
    cri_events_containerd: Containerd, cri_lifecycles: CriLifecycles, record_property: Any
) -> None:
    """One subscriber sees each container's four steps once; in the order they happened?

    Each step is a CRI call that returned before the next began, so the
    order is known: CREATED, STARTED, STOPPED, DELETED.  Whether the daemon
    keeps it is judged by the table (``subscribers:cri-event-order``).
    """
    transport = CriEvents(cri_events_containerd.address)
    sub = transport.subscribe()
    got: list[Event] = []
    try:
        pod = cri_lifecycles.pod()
        # The pod's own first events may race the subscription's registration
        # (CRI acknowledges none): the containers made after it are judged.
        cids = [cri_lifecycles.container(pod) for _ in range(CONTAINERS)]
        cri_lifecycles.remove_pod(pod)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            event = sub.receive(0.1)
            if event is not None:
                got.append(event)
            elif all(sum(e.key.startswith(c) for e in got) >= 4 for c in cids):
                break
    finally:
        sub.cancel()
    steps = {c: [e.topic for e in got if e.key.startswith(c)] for c in cids}
    for cid in cids:
        assert {e.data for e in got if e.key.startswith(cid)} == {pod.id}
    # The one deviation seen (containerd 1.7.24 and 2.1.9): a container's (or
    # the pod sandbox's) STOPPED comes after its DELETED, or not at all.
    # Anything else fails.  The pod's first events may predate the subscription.
    late = [c for c, t in steps.items() if t == ["CREATED", "STARTED", "DELETED", "STOPPED"]]
    unsent = [c for c, t in steps.items() if t == ["CREATED", "STARTED", "DELETED"]]
    other = {c: t for c, t in steps.items() if t != list(EVENT_TYPES) and c not in late + unsent}
    assert not other, other
    pod_end = [e.topic for e in got if e.key.startswith(pod.id)][-2:]
    if pod_end == ["DELETED", "STOPPED"]:
        late.append(pod.id)
    elif pod_end[-1:] == ["DELETED"] and "STOPPED" not in pod_end:
        unsent.append(pod.id)
    else:
        assert pod_end == ["STOPPED", "DELETED"], pod_end
    observed = ex.Outcome.MISBEHAVES if late or unsent else ex.Outcome.SURVIVES
    detail = (
        f"of {len(cids)} containers made one after another and their pod, {len(late)} got "
        f"STOPPED after DELETED and {len(unsent)} no STOPPED at all"
    )
    print(f"\nCRI event order: {detail}")
    verdict = judged(record_property, "containerd", "subscribers:cri-event-order", observed, detail)
    assert verdict.ok, verdict.message


@needs_containers
def test_cri_swarm_with_churn(
    cri_events_containerd: Containerd,
    cri_lifecycles: CriLifecycles,
    subscribers: Any,
    record_property: Any,
) -> None:
    """20 CRI subscribers with churn: the witness and the steady ones get every event."""
    transport = CriEvents(cri_events_containerd.address)
    ctd = cri_events_containerd
    assert ctd.pid is not None
    # One pod's whole lifecycle first: CRI starts workers of its own on the
    # first pod, and the producer's channel belongs to the baseline too.
    cri_lifecycles.cycle(1)
    assert cri_lifecycles.pods() == []
    time.sleep(1)
    # Descriptors only: goroutines of cancelled streams outlive them until the
    # next event (subscribers:cri-cancelled-stream, judged below).
    watch = subscribers.watch(ctd.pid, ctd.daemon.log_path)
    swarm = subscribers(transport, 20, churn=Churn(max_events=12, max_life=1.5, steady=5))
    run = run_fan_out(
        swarm, cri_lifecycles, pods=6, containers=3, steady_only=True, ambiguous=("head",)
    )
    _show("CRI swarm with churn", run)
    assert run.report.cancels > 10  # the churn happened
    _judge(record_property, "subscribers:cri-churn", run)
    # Every stream gone, every pod removed: containerd's fds are back to the
    # baseline, and no panic was logged.
    watch.check(settle=10)
    assert first_events(transport, lambda: cri_lifecycles.cycle(1), timeout=20)


@needs_containers
def test_cri_streams_cancelled_while_no_event_comes(
    cri_events_containerd: Containerd, cri_lifecycles: CriLifecycles, record_property: Any
) -> None:
    """Do a cancelled stream's goroutines end at once, or only when the next event comes?"""
    ctd = cri_events_containerd
    cri_lifecycles.cycle(1)  # CRI's own first-pod workers belong to the baseline
    time.sleep(1)
    before = ctd.goroutines()
    transport = CriEvents(ctd.address)
    for _ in range(STREAMS):
        sub = transport.subscribe()
        time.sleep(0.01)  # served: the daemon has the stream
        sub.cancel()
    deadline = time.monotonic() + 10
    while (held := ctd.goroutines() - before) > 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    cri_lifecycles.cycle(1)  # events: a stream that is still served notices now
    time.sleep(2)
    after_events = ctd.goroutines() - before
    print(
        f"\n{STREAMS} cancelled streams: {held:+d} goroutines 10 s later, "
        f"{after_events:+d} after one pod's events"
    )
    observed = ex.Outcome.LEAKS if held > 2 else ex.Outcome.SURVIVES
    detail = (
        f"{STREAMS} streams opened and cancelled: {held:+d} goroutines 10 s later, "
        f"{after_events:+d} once one pod's 12 events were sent"
    )
    verdict = judged(
        record_property, "containerd", "subscribers:cri-cancelled-stream", observed, detail
    )
    assert verdict.ok, verdict.message


@needs_containers
def test_cri_fan_out_every_subscriber_gets_every_event(
    cri_events_containerd: Containerd,
    cri_lifecycles: CriLifecycles,
    subscribers: Any,
    record_property: Any,
) -> None:
    """N concurrent subscribers, none leaving: does each get every event?"""
    transport = CriEvents(cri_events_containerd.address)
    swarm = subscribers(transport, FAN_OUT, churn=Churn(steady=FAN_OUT))
    run = run_fan_out(swarm, cri_lifecycles, pods=6, containers=2)
    _show("CRI fan-out", run)
    # 6 pods x (4 pod events + 2 containers x 4) + the primer pod's STOPPED, DELETED
    assert run.expected == 74
    _judge(record_property, "subscribers:cri-fan-out", run)


@needs_containers
def test_cri_sigkill_mid_stream_then_every_subscriber_reconnects(
    cri_events_containerd: Containerd,
    cri_lifecycles: CriLifecycles,
    subscribers: Any,
    record_property: Any,
) -> None:
    """containerd SIGKILLed and restarted while the swarm reads (kubernetes 129827)."""
    transport = CriEvents(cri_events_containerd.address)
    old_pid = cri_events_containerd.pid
    swarm = subscribers(transport, FAN_OUT, churn=Churn(steady=FAN_OUT, max_backoff=0.5))
    run = run_restart(swarm, cri_lifecycles, cri_events_containerd, pods=4, containers=2)
    _show("CRI SIGKILL mid-stream", run)
    assert cri_events_containerd.pid != old_pid
    errors = [c.error for r in [run.report.witness, *run.report.subscribers] for c in r.errors]
    # The stream's end is a clear error naming the status, on every version.
    assert errors, "no subscriber saw its stream end"
    assert all("UNAVAILABLE" in e for e in errors), errors[:5]
    _judge(record_property, "subscribers:cri-daemon-restart", run)


# --- the susceptible clients are caught -----------------------------------------


@needs_containers
def test_a_client_sharing_one_stream_is_caught_by_the_fan_out_judgement(
    cri_events_containerd: Containerd, cri_lifecycles: CriLifecycles, subscribers: Any
) -> None:
    shared = SharedStream(CriEvents(cri_events_containerd.address))
    try:
        swarm = subscribers(shared, 4, churn=Churn(steady=4))
        run = run_fan_out(swarm, cri_lifecycles, pods=3, containers=2)
    finally:
        shared.close()
    _show("one stream shared", run)
    assert run.outcome is ex.Outcome.MISBEHAVES
    # Dealt out in turn among 5 (the witness too): each got about a fifth.
    assert len(run.missing) == 5
    assert all(len(lost) >= run.expected // 2 for lost in run.missing.values())


@needs_containers
def test_a_client_swallowing_the_end_of_stream_is_caught_by_the_restart_judgement(
    cri_events_containerd: Containerd, cri_lifecycles: CriLifecycles, subscribers: Any
) -> None:
    deaf = SwallowsEndOfStream(CriEvents(cri_events_containerd.address))
    swarm = subscribers(deaf, 3, churn=Churn(steady=3))
    run = run_restart(swarm, cri_lifecycles, cri_events_containerd, pods=1, containers=1)
    _show("end of stream swallowed", run)
    assert run.outcome is ex.Outcome.BLOCKS
    assert "4 subscribers never saw their stream end" in run.evidence
