"""A swarm of concurrent event subscribers racing a daemon's broadcaster.

Incident 5 of the fault catalog: CRI-O panicked with ``sync: negative
WaitGroup counter`` when a ``GetContainerEvents`` subscriber disconnected while
events were in flight.  Bugs of this class only show when many subscribers
come and go while events are being broadcast, so this module builds exactly
that: N subscribers, each in its own thread, that connect, read some events,
cancel at a random moment, pause and reconnect, over and over, while the test
produces real events (container lifecycles).  All the churn decisions come from
one seeded :class:`random.Random`, so a run replays.

Every subscriber records what it received in each of its connections.  One
extra subscriber, the *witness*, never churns: what it saw is the reference
(the daemon's broadcast order).  The report then names, per subscriber and per
connection, the events it missed (gaps), got twice (duplicates), got out of
order, or got although the reference never saw them; and whether subscribers
still connected at the end got everything up to the last event.

The daemon side is checked by :class:`DaemonWatch`: still alive, no panic in
its log, its open file descriptors back to the baseline once the swarm has
disconnected, and a new subscriber receives events.

A transport is the small adapter between the swarm and one kind of event
stream (:class:`Transport`, :class:`Subscription`); adapters for containerd's
gRPC ``Subscribe``, for any command printing one event a line (``ctr events``,
``podman events``), for D-Bus signals and for a line protocol over a Unix
socket live in :mod:`pytest_runtimefaults.transports`.

Example::

    from pytest_runtimefaults.subscribers import Churn, Swarm
    from pytest_runtimefaults.transports.broadcaster import Broadcaster

    with Broadcaster(bug=None) as server:
        with Swarm(server.transport(), subscribers=20, seed=1) as swarm:
            swarm.prime(lambda: server.publish(1))
            server.publish(300, burst=20)
            swarm.drain()
        report = swarm.report()
    report.assert_ok()
    print(report.summary())
"""

from __future__ import annotations

import queue
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from pytest_runtimefaults import leaks
from pytest_runtimefaults.core.fault import FaultBase
from pytest_runtimefaults.core.log import logger, swallowed
from pytest_runtimefaults.host import proc
from pytest_runtimefaults.journal import process_starttime

__all__ = [
    "Churn",
    "Connection",
    "DaemonWatch",
    "Event",
    "Problem",
    "SubscriberRecord",
    "Subscription",
    "SubscriptionError",
    "Swarm",
    "SwarmReport",
    "ThreadedSubscription",
    "Transport",
    "first_events",
]


# --- the transport interface ------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One event as a subscriber received it.

    ``key`` identifies the event: two subscribers that received the same
    broadcast event must produce the same key, and two different events must
    not (containerd: topic + timestamp + payload digest; D-Bus: sender +
    serial).  ``topic`` is for humans and filters; ``data`` is optional detail.
    """

    key: str
    topic: str = ""
    data: str = ""


class SubscriptionError(Exception):
    """The stream broke: the daemon closed it, died, or refused the connection.

    A transport raises this (and only this) for every failure the daemon
    causes, with a message a human can act on; the swarm counts it as a *clean*
    error and reconnects.  Any other exception from a transport is reported as
    a defect of the transport or of the daemon.
    """


@runtime_checkable
class Subscription(Protocol):
    """One open event stream.

    ``receive(timeout)`` returns the next event, or ``None`` if none arrived
    within *timeout* seconds; it raises :class:`SubscriptionError` when the
    stream broke.  ``cancel()`` closes the stream from any thread, at once and
    without waiting for the daemon; it is idempotent, and after it
    ``receive`` returns ``None`` or raises :class:`SubscriptionError`.
    """

    def receive(self, timeout: float) -> Event | None: ...

    def cancel(self) -> None: ...


@runtime_checkable
class Transport(Protocol):
    """A way to subscribe to one daemon's events.

    ``subscribe()`` opens a new subscription and returns once the stream is
    open (as far as the protocol tells); it raises :class:`SubscriptionError`
    if the daemon cannot be reached.  It is called from many threads at once.

    Example: a transport for CRI's ``GetContainerEvents`` wraps the gRPC
    stream in a :class:`ThreadedSubscription`::

        class CriEvents:
            name = "cri"

            def __init__(self, channel):
                self.stub = RuntimeServiceStub(channel)

            def subscribe(self) -> Subscription:
                call = self.stub.GetContainerEvents(GetEventsRequest())

                def pump(put, cancelled):
                    try:
                        for resp in call:
                            put(Event(key=f"{resp.container_id}/"
                                      f"{resp.container_event_type}/{resp.created_at}"))
                    except grpc.RpcError as exc:
                        if not cancelled():
                            raise SubscriptionError(exc.details()) from exc

                return ThreadedSubscription(pump, on_cancel=call.cancel)
    """

    name: str

    def subscribe(self) -> Subscription: ...


_END = object()


class ThreadedSubscription:
    """A :class:`Subscription` around a blocking reader, run in its own thread.

    ``pump(put, cancelled)`` reads the stream and calls ``put(event)`` for each
    event; it returns when the stream ends and may raise
    :class:`SubscriptionError`.  ``cancelled()`` tells it that the end was
    asked for.  ``on_cancel`` unblocks the reader (closes the socket, cancels
    the call, kills the process).  Use it for any stream API that has no
    per-read timeout.
    """

    def __init__(
        self,
        pump: Callable[[Callable[[Event], None], Callable[[], bool]], None],
        on_cancel: Callable[[], None],
        name: str = "subscription",
    ) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._on_cancel = on_cancel
        self._error: BaseException | None = None
        self._ended = False

        def run() -> None:
            try:
                pump(self._queue.put, self._cancelled.is_set)
            except BaseException as exc:
                # After a cancel the reader's error is expected (its socket was shut).
                logger.debug("reader %s ended with an error", name, exc_info=True)
                if not self._cancelled.is_set():
                    self._error = exc
            finally:
                self._queue.put(_END)

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def receive(self, timeout: float) -> Event | None:
        if self._ended:
            self._raise_end()
            return None
        try:
            item = self._queue.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None
        if item is _END:
            self._ended = True
            self._raise_end()
            return None
        assert isinstance(item, Event)
        return item

    def _raise_end(self) -> None:
        if self._cancelled.is_set():
            return
        if self._error is not None:
            raise self._error
        raise SubscriptionError("the daemon ended the stream")

    def cancel(self) -> None:
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        with swallowed(Exception, "unblocking the reader of %s", self._thread.name):
            self._on_cancel()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


# --- what the swarm records --------------------------------------------------


@dataclass
class Connection:
    """One connection of one subscriber: when, what it received, how it ended.

    ``end`` is ``cancel`` (the swarm cancelled it at a random moment), ``stop``
    (still open when the swarm stopped), ``error`` (the transport raised
    :class:`SubscriptionError`; ``error`` holds the message), ``connect``
    (subscribing itself failed) or ``crash`` (any other exception).
    """

    opened: float
    keys: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    closed: float | None = None
    end: str = ""
    error: str = ""


@dataclass
class SubscriberRecord:
    """Everything one subscriber did, connection by connection."""

    index: int
    steady: bool
    connections: list[Connection] = field(default_factory=list)

    @property
    def received(self) -> int:
        return sum(len(c.keys) for c in self.connections)

    @property
    def errors(self) -> list[Connection]:
        return [c for c in self.connections if c.end in ("error", "connect")]

    @property
    def recovered(self) -> bool:
        """True if, after its last error, a connection received events again."""
        last_error = max(
            (i for i, c in enumerate(self.connections) if c.end in ("error", "connect")),
            default=-1,
        )
        return any(c.keys for c in self.connections[last_error + 1 :])


@dataclass(frozen=True)
class Problem:
    """One defect found in what a subscriber received.

    ``kind``: ``gap`` (events missed between the first and last received),
    ``head`` (events broadcast well after the connection opened but before its
    first event), ``tail`` (a connection open at the end missed the last
    events), ``duplicate``, ``order``, ``unknown`` (an event the witness never
    saw), ``crash`` (a transport raised something other than
    :class:`SubscriptionError`).
    """

    subscriber: int
    connection: int
    kind: str
    detail: str
    keys: tuple[str, ...] = ()

    def __str__(self) -> str:
        who = "witness" if self.subscriber < 0 else f"subscriber {self.subscriber}"
        return f"{who} connection {self.connection}: {self.kind}: {self.detail}"


@dataclass(frozen=True)
class Churn:
    """How subscribers come and go (all choices drawn from the seeded RNG).

    Each connection of a churning subscriber is cancelled after
    ``randint(1, max_events)`` events or after ``uniform(min_life, max_life)``
    seconds, whichever comes first: right after an event was read, so that the
    next events of the burst are in flight.  Then it pauses
    ``uniform(0, max_pause)`` seconds and reconnects.  After a
    :class:`SubscriptionError` it waits ``backoff`` seconds, doubling up to
    ``max_backoff``, jittered.  ``steady`` subscribers (a count) never cancel:
    they are the ones that must receive every event.
    """

    max_events: int = 20
    min_life: float = 0.0
    max_life: float = 1.0
    max_pause: float = 0.1
    backoff: float = 0.05
    max_backoff: float = 1.0
    steady: int = 5


@dataclass
class SwarmReport:
    """The outcome of a swarm run: the reference, each subscriber, the problems."""

    transport: str
    seed: int | str
    reference: list[str]
    witness: SubscriberRecord
    subscribers: list[SubscriberRecord]
    problems: list[Problem]
    duration: float

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def connections(self) -> int:
        return sum(len(s.connections) for s in self.subscribers)

    @property
    def deliveries(self) -> int:
        return sum(s.received for s in self.subscribers)

    def _count(self, end: str) -> int:
        return sum(1 for s in self.subscribers for c in s.connections if c.end == end)

    @property
    def cancels(self) -> int:
        return self._count("cancel")

    @property
    def clean_errors(self) -> int:
        return self._count("error") + self._count("connect")

    def figures(self) -> dict[str, object]:
        """The run in numbers (for logs, benchmarks and the docs)."""
        steady = [s for s in self.subscribers if s.steady]
        errored = [s for s in self.subscribers if s.errors]
        return {
            "transport": self.transport,
            "seed": self.seed,
            "subscribers": len(self.subscribers),
            "steady": len(steady),
            "events": len(self.reference),
            "connections": self.connections,
            "cancels": self.cancels,
            "clean_errors": self.clean_errors,
            "subscribers_with_errors": len(errored),
            "recovered_after_error": sum(1 for s in errored if s.recovered),
            "deliveries": self.deliveries,
            "steady_complete": sum(
                1
                for s in steady
                if s.index not in self._with_problems()
                and len(s.connections) == 1
                and s.connections[0].end == "stop"
            ),
            "duration_s": round(self.duration, 3),
            "problems": len(self.problems),
        }

    def _with_problems(self) -> set[int]:
        return {p.subscriber for p in self.problems}

    def summary(self) -> str:
        lines = [" ".join(f"{k}={v}" for k, v in self.figures().items())]
        by_kind: dict[str, int] = {}
        for p in self.problems:
            by_kind[p.kind] = by_kind.get(p.kind, 0) + 1
        if by_kind:
            lines.append("problems: " + ", ".join(f"{k} x{n}" for k, n in sorted(by_kind.items())))
            lines.extend(f"  {p}" for p in self.problems[:20])
            if len(self.problems) > 20:
                lines.append(f"  ... and {len(self.problems) - 20} more")
        return "\n".join(lines)

    def assert_ok(self) -> None:
        """Raise AssertionError listing the problems, if any."""
        if self.problems:
            raise AssertionError(f"subscriber swarm on {self.transport}:\n{self.summary()}")


# --- the swarm -----------------------------------------------------------------


class _Live:
    """The swarm's shared state for one subscriber's current connection."""

    def __init__(self) -> None:
        self.subscription: Subscription | None = None
        self.connection: Connection | None = None


class Swarm(FaultBase):
    """N concurrent subscribers with seeded churn, plus a witness (a fault).

    ``start()`` opens the witness and the subscribers; ``prime(make_event)``
    produces events until the witness and every steady subscriber have
    received one (so none of the events that follow can fall before them);
    the test then produces its events; ``drain()`` stops the churn and waits
    until every open connection has caught up with the witness; ``stop()``
    closes everything; ``report()`` judges.  As a context manager, the block
    runs between ``start()`` and ``stop()``.

    *witness*: a transport for the witness alone (default: *transport*), so
    that the reference can come straight from the daemon while the swarm
    goes through a fault proxy.  *grace*: seconds after a connection opened
    before a missed event counts against it (subscriptions without an
    acknowledgement are not in place at once).

    Background errors (a subscriber thread that died) are re-raised by
    ``stop()`` and ``report()``, in the test that caused them.

    As a fault: ``start()`` returns the swarm, ``lift()`` disconnects every
    subscriber and joins the threads (raising if one is stuck or died),
    ``stop()`` lifts, and ``applied`` counts the connections the churn
    cancelled.  Hand it to a test's registry with ``registry.register(swarm)``.
    """

    def __init__(
        self,
        transport: Transport,
        subscribers: int = 20,
        *,
        churn: Churn | None = None,
        seed: int | str | None = None,
        rng: random.Random | None = None,
        grace: float = 1.0,
        poll: float = 0.05,
        witness: Transport | None = None,
    ) -> None:
        if subscribers < 1:
            raise ValueError("a swarm needs at least one subscriber")
        super().__init__()
        self.stop_timeout = 10.0
        self.transport = transport
        # The reference may come another way than the swarm's own streams: straight
        # from the daemon while the subscribers go through a fault proxy.
        self.witness_transport = witness or transport
        self.n = subscribers
        self.churn = churn or Churn()
        if rng is None:
            rng = random.Random(seed if seed is not None else 0)
        self.seed: int | str = seed if seed is not None else "rng"
        # One independent stream per subscriber, derived up front, so a
        # subscriber's decisions do not depend on thread scheduling.
        self._seeds = [rng.getrandbits(64) for _ in range(subscribers)]
        self.grace = grace
        self.poll = poll
        self.witness = SubscriberRecord(index=-1, steady=True)
        steady = min(self.churn.steady, subscribers)
        self.records = [SubscriberRecord(index=i, steady=i < steady) for i in range(subscribers)]
        self._live = {r.index: _Live() for r in [self.witness, *self.records]}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._calm = threading.Event()
        self._threads: list[threading.Thread] = []
        self._thread_errors: list[BaseException] = []
        self._started_at = 0.0
        self._stopped_at: float | None = None

    # the fault

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"subscriber swarm x{self.n} on {self.transport.name}"

    @property
    def applied(self) -> int:
        """How many connections the churn cancelled so far."""
        with self._lock:
            return sum(1 for r in self.records for c in r.connections if c.end == "cancel")

    # lifecycle

    def _start(self) -> None:
        """Open the witness first, then start every subscriber's thread (``start()``)."""
        self._started_at = time.monotonic()
        self._spawn(self.witness, random.Random(0))
        # The witness must be subscribed before anyone else, or the reference
        # could lack events that others saw.
        deadline = time.monotonic() + 10
        while self._live[-1].subscription is None and time.monotonic() < deadline:
            if self._thread_errors:
                break
            time.sleep(0.005)
        for rec, s in zip(self.records, self._seeds, strict=True):
            self._spawn(rec, random.Random(s))

    def _spawn(self, rec: SubscriberRecord, rng: random.Random) -> None:
        name = "witness" if rec.index < 0 else f"subscriber-{rec.index}"

        def target() -> None:
            try:
                self._subscriber(rec, rng)
            except BaseException as exc:  # surfaced by stop()/report()
                logger.debug("swarm thread %s died", name, exc_info=True)
                self._thread_errors.append(exc)

        t = threading.Thread(target=target, name=f"swarm-{name}", daemon=True)
        self._threads.append(t)
        t.start()

    def stop(self, timeout: float | None = None) -> None:
        """Cancel every open subscription and join the threads (idempotent).

        Raises if a thread died or is still alive *timeout* seconds (default
        :attr:`stop_timeout`) after it was asked to stop.
        """
        if timeout is not None:
            self.stop_timeout = timeout
        super().stop()

    def _lift(self) -> None:
        timeout = self.stop_timeout
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        self._stopping.set()
        with self._lock:
            subs = [lv.subscription for lv in self._live.values() if lv.subscription]
        for sub in subs:
            with swallowed(Exception, "cancelling a subscription of %s", self.name):
                sub.cancel()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        self._raise_background()
        if stuck:
            raise RuntimeError(
                f"{len(stuck)} subscriber thread(s) did not stop within {timeout} s "
                f"({', '.join(stuck[:5])}): a transport's cancel() does not unblock receive()"
            )

    def _raise_background(self) -> None:
        if self._thread_errors:
            raise RuntimeError("a swarm thread died") from self._thread_errors[0]

    # the subscriber loop

    def _subscriber(self, rec: SubscriberRecord, rng: random.Random) -> None:
        churn = self.churn
        transport = self.witness_transport if rec.index < 0 else self.transport
        live = self._live[rec.index]
        failures = 0
        while not self._stopping.is_set():
            conn = Connection(opened=time.monotonic())
            with self._lock:
                rec.connections.append(conn)
            try:
                sub = transport.subscribe()
            except SubscriptionError as exc:
                conn.closed, conn.end, conn.error = time.monotonic(), "connect", str(exc)
                failures += 1
                self._stopping.wait(self._backoff(rng, failures))
                continue
            except Exception as exc:
                logger.debug("%s: subscribe() crashed", transport.name, exc_info=True)
                conn.closed, conn.end, conn.error = time.monotonic(), "crash", repr(exc)
                failures += 1
                self._stopping.wait(self._backoff(rng, failures))
                continue
            # Judged from when subscribe() returned: for a transport with an
            # acknowledgement, the moment the subscription is known to be live.
            conn.opened = time.monotonic()
            with self._lock:
                live.subscription, live.connection = sub, conn
            if self._stopping.is_set():
                sub.cancel()
            # Draw both limits even for steady subscribers, so that the
            # sequence of draws does not depend on the role.
            budget = rng.randint(1, max(1, churn.max_events))
            life = rng.uniform(churn.min_life, max(churn.min_life, churn.max_life))
            deadline = conn.opened + life
            end, error = "stop", ""
            try:
                while not self._stopping.is_set():
                    churning = not rec.steady and not self._calm.is_set()
                    now = time.monotonic()
                    if churning and (budget <= 0 or now >= deadline):
                        end = "cancel"
                        break
                    wait = self.poll if not churning else max(0.0, min(self.poll, deadline - now))
                    event = sub.receive(wait)
                    if event is None:
                        continue
                    conn.keys.append(event.key)
                    conn.times.append(time.monotonic())
                    budget -= 1
                    failures = 0
            except SubscriptionError as exc:
                end, error = "error", str(exc) or type(exc).__name__
            except Exception as exc:
                logger.debug("%s: receive() crashed", transport.name, exc_info=True)
                end, error = "crash", repr(exc)
            finally:
                sub.cancel()
                with self._lock:
                    live.subscription = None
                    conn.closed, conn.end, conn.error = time.monotonic(), end, error
            if end in ("error", "crash"):
                failures += 1
                self._stopping.wait(self._backoff(rng, failures))
            elif end == "cancel":
                self._stopping.wait(rng.uniform(0.0, churn.max_pause))

    def _backoff(self, rng: random.Random, failures: int) -> float:
        base = min(self.churn.max_backoff, self.churn.backoff * 2.0 ** min(failures - 1, 10))
        return base * rng.uniform(0.5, 1.0)

    # synchronisation with the producer

    def _steady_live(self) -> list[SubscriberRecord]:
        return [self.witness, *(r for r in self.records if r.steady)]

    def prime(self, make_event: Callable[[], object], timeout: float = 30.0) -> None:
        """Produce events until the witness and every steady subscriber got one.

        Call it after ``start()`` (and again after a daemon restart) with a
        callable that makes the daemon broadcast one cheap event.  An exception
        from *make_event* propagates.
        """
        marks = {r.index: self._received_total(r) for r in self._steady_live()}
        deadline = time.monotonic() + timeout
        while True:
            self._raise_background()
            waiting = [
                r for r in self._steady_live() if self._connected_total(r, marks[r.index]) == 0
            ]
            if not waiting:
                return
            if time.monotonic() > deadline:
                names = ", ".join("witness" if r.index < 0 else str(r.index) for r in waiting)
                raise TimeoutError(
                    f"subscribers {names} received no event within {timeout} s of priming: "
                    f"is the transport {self.transport.name!r} subscribed to what "
                    "make_event produces?"
                )
            make_event()  # its errors (the daemon died) are the caller's to judge
            time.sleep(0.1)

    def _received_total(self, rec: SubscriberRecord) -> int:
        with self._lock:
            return rec.received

    def _connected_total(self, rec: SubscriberRecord, mark: int) -> int:
        """Events received since *mark* in the current, open connection."""
        with self._lock:
            conn = self._live[rec.index].connection
            if (
                conn is None
                or conn.closed is not None
                or self._live[rec.index].subscription is None
            ):
                return 0
            before = rec.received - len(conn.keys)
            return len(conn.keys) - max(0, mark - before)

    def calm(self) -> None:
        """Stop cancelling: from now on, open connections stay open."""
        self._calm.set()

    def drain(self, quiet: float = 0.5, timeout: float = 30.0) -> None:
        """Stop the churn and wait until every open connection caught up.

        Waits until the witness received nothing for *quiet* seconds, then
        until each open connection that received anything has received the
        witness's last event (or *timeout*: the report then shows the tail).
        """
        self.calm()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._raise_background()
            with self._lock:
                last = self._last_time(self.witness)
            if last is None or time.monotonic() - last >= quiet:
                break
            time.sleep(0.05)
        while time.monotonic() < deadline:
            with self._lock:
                ref = [k for c in self.witness.connections for k in c.keys]
                target = ref[-1] if ref else None
                behind = [
                    rec.index
                    for rec in self.records
                    if (lv := self._live[rec.index]).connection is not None
                    and lv.subscription is not None
                    and lv.connection.keys
                    and lv.connection.keys[-1] != target
                ]
            if target is None or not behind:
                return
            time.sleep(0.05)

    @staticmethod
    def _last_time(rec: SubscriberRecord) -> float | None:
        for c in reversed(rec.connections):
            if c.times:
                return c.times[-1]
        return None

    def received_by(self, index: int) -> int:
        """Events received so far by subscriber *index* (``-1``: the witness)."""
        rec = self.witness if index < 0 else self.records[index]
        return self._received_total(rec)

    # judging

    def report(self) -> SwarmReport:
        """Judge every connection against the witness (stops the swarm first)."""
        self.stop()
        end = self._stopped_at or time.monotonic()
        reference: list[str] = []
        ref_times: list[float] = []
        index: dict[str, int] = {}
        problems: list[Problem] = []
        for c in self.witness.connections:
            for k, t in zip(c.keys, c.times, strict=True):
                if k in index:
                    problems.append(Problem(-1, 0, "duplicate", f"witness got {k!r} twice"))
                    continue
                index[k] = len(reference)
                reference.append(k)
                ref_times.append(t)
        windows = [(c.opened, c.closed or end) for c in self.witness.connections]
        for rec in self.records:
            problems.extend(self._judge(rec, reference, ref_times, index, windows))
        for i, c in enumerate(self.witness.connections):
            if c.end == "crash":
                problems.append(Problem(-1, i, "crash", c.error))
        return SwarmReport(
            transport=self.transport.name,
            seed=self.seed,
            reference=reference,
            witness=self.witness,
            subscribers=self.records,
            problems=problems,
            duration=end - self._started_at,
        )

    def _judge(
        self,
        rec: SubscriberRecord,
        reference: list[str],
        ref_times: list[float],
        index: dict[str, int],
        windows: list[tuple[float, float]],
    ) -> Iterator[Problem]:
        seen: set[str] = set()
        for ci, conn in enumerate(rec.connections):
            if conn.end == "crash":
                yield Problem(rec.index, ci, "crash", conn.error)
            positions: list[int] = []
            for k, t in zip(conn.keys, conn.times, strict=True):
                if k in seen:
                    yield Problem(rec.index, ci, "duplicate", f"{k!r}", (k,))
                    continue
                seen.add(k)
                pos = index.get(k)
                if pos is None:
                    # Only a defect if the witness was listening at that moment
                    # (it may itself be reconnecting after a daemon restart).
                    if any(a + self.grace <= t <= b for a, b in windows):
                        yield Problem(
                            rec.index, ci, "unknown", f"{k!r} never reached the witness", (k,)
                        )
                    continue
                if positions and pos < positions[-1]:
                    yield Problem(
                        rec.index,
                        ci,
                        "order",
                        f"{k!r} (#{pos}) after #{positions[-1]}",
                        (k,),
                    )
                positions.append(pos)
            if not positions:
                # Connected a while during the broadcast, yet nothing arrived.
                opened, closed = conn.opened + self.grace, conn.closed or float("inf")
                missed = [i for i, t in enumerate(ref_times) if opened <= t <= closed - self.grace]
                if missed and conn.end != "crash":
                    yield Problem(
                        rec.index,
                        ci,
                        "head",
                        f"nothing received, {len(missed)} events broadcast while open "
                        f"(first {reference[missed[0]]!r})",
                    )
                continue
            first, last = min(positions), max(positions)
            have = set(positions)
            missing = [i for i in range(first, last + 1) if i not in have]
            if missing:
                yield Problem(
                    rec.index,
                    ci,
                    "gap",
                    f"missed {len(missing)} of events #{first}..#{last}, "
                    f"first {reference[missing[0]]!r}",
                    tuple(reference[i] for i in missing),
                )
            head = [
                i
                for i in range(first)
                if ref_times[i] >= conn.opened + self.grace and i not in have
            ]
            if head:
                yield Problem(
                    rec.index,
                    ci,
                    "head",
                    f"missed {len(head)} events broadcast after it opened, before its first",
                    tuple(reference[i] for i in head),
                )
            if conn.end == "stop" and last < len(reference) - 1:
                tail = len(reference) - 1 - last
                yield Problem(
                    rec.index,
                    ci,
                    "tail",
                    f"open to the end but missed the last {tail} events "
                    f"(from {reference[last + 1]!r})",
                    tuple(reference[last + 1 :]),
                )


# --- daemon-side checks ------------------------------------------------------

PANIC_PATTERNS = (
    r"^panic: ",
    r"^fatal error: ",
    r"^goroutine \d+ \[running\]:",
    r"Traceback \(most recent call last\):",
)


@dataclass
class DaemonWatch:
    """What recovery means on the daemon's side of an event stream.

    Take ``baseline()`` before the swarm; after the swarm disconnected, call
    ``check()``: raises AssertionError unless the daemon is still the same live
    process, its log has no panic, and its open file descriptors came back to
    the baseline (within ``settle`` seconds; goroutines too, when
    ``goroutines`` is given, e.g. from containerd's pprof endpoint).

    Example::

        watch = DaemonWatch(pid=daemon.pid, log_path=daemon.log_path)
        watch.baseline()
        ...  # the swarm
        watch.check()
    """

    pid: int
    log_path: Path | str | None = None
    panic_patterns: tuple[str, ...] = PANIC_PATTERNS
    goroutines: Callable[[], int] | None = None
    fd_slack: int = 0
    goroutine_slack: int = 2
    starttime: int | None = None
    base_fds: set[str] = field(default_factory=set)
    base_goroutines: int | None = None
    log_offset: int = 0

    def alive(self) -> bool:
        """The same process (PID and start time) exists and is not a zombie."""
        start = process_starttime(self.pid)
        if start is None or (self.starttime is not None and start != self.starttime):
            return False
        return proc.alive(self.pid)

    def fds(self) -> set[str]:
        """The daemon's open descriptors as ``"N -> target"`` strings (none once it is gone)."""
        try:
            return leaks.open_fds(self.pid)
        except ProcessLookupError:
            return set()

    def baseline(self) -> None:
        """Record the start time, open fds, goroutines and log position now."""
        self.starttime = process_starttime(self.pid)
        self.base_fds = self.fds()
        if self.goroutines is not None:
            self.base_goroutines = self.goroutines()
        if self.log_path is not None:
            with swallowed(OSError, "sizing the daemon log %s", self.log_path):
                self.log_offset = Path(self.log_path).stat().st_size

    def panics(self) -> list[str]:
        """Log lines (since the baseline) that look like a panic or crash."""
        if self.log_path is None:
            return []
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return []
        pats = [re.compile(p) for p in self.panic_patterns]
        return [line for line in text.splitlines() if any(p.search(line) for p in pats)]

    def leaked_fds(self) -> set[str]:
        return self.fds() - self.base_fds

    def check(self, settle: float = 5.0) -> None:
        """Raise AssertionError unless the daemon recovered (see class doc)."""
        panics = self.panics()
        if panics:
            raise AssertionError(f"daemon {self.pid} logged a panic: {panics[:3]}")
        if not self.alive():
            raise AssertionError(f"daemon {self.pid} is gone (or was replaced)")
        deadline = time.monotonic() + settle
        while True:
            now_fds = self.fds()
            extra = len(now_fds) - len(self.base_fds)
            gor_extra = 0
            if self.goroutines is not None and self.base_goroutines is not None:
                gor_extra = self.goroutines() - self.base_goroutines
            if extra <= self.fd_slack and gor_extra <= self.goroutine_slack:
                return
            if time.monotonic() > deadline:
                detail = sorted(now_fds - self.base_fds)[:10]
                raise AssertionError(
                    f"daemon {self.pid} did not return to its baseline {settle} s after "
                    f"the swarm left: {extra:+d} fds ({len(self.base_fds)} before, "
                    f"{len(now_fds)} now; new: {detail})"
                    + (f", {gor_extra:+d} goroutines" if self.goroutines else "")
                )
            time.sleep(0.1)


def first_events(
    transport: Transport, make_event: Callable[[], object], timeout: float = 10.0, count: int = 1
) -> list[Event]:
    """Subscribe anew and return the first *count* events (a post-swarm probe).

    Raises AssertionError if no event arrives within *timeout* while
    *make_event* is called repeatedly.
    """
    sub = transport.subscribe()
    got: list[Event] = []
    try:
        deadline = time.monotonic() + timeout
        next_make = 0.0
        while len(got) < count:
            now = time.monotonic()
            if now > deadline:
                raise AssertionError(
                    f"a new subscriber on {transport.name!r} received {len(got)} of {count} "
                    f"events within {timeout} s"
                )
            if now >= next_make:
                make_event()
                next_make = now + 0.5
            ev = sub.receive(0.1)
            if ev is not None:
                got.append(ev)
    finally:
        sub.cancel()
    return got
