"""CRI's container event stream (``runtime.v1.RuntimeService/GetContainerEvents``).

The stream kubelet's Evented PLEG reads: one ``ContainerEventResponse`` per
lifecycle step of every container and pod sandbox (created, started,
stopped, deleted).  Each subscription is its own gRPC channel to the CRI
socket (containerd's own socket, with the CRI plugin enabled) and one
server-streaming call on it, so the daemon sees N separate clients, as it
would with N kubelets.  The messages are the CRI subset of
:mod:`pytest_runtimefaults.cri_api`, shared with
:mod:`pytest_runtimefaults.cni.cri` and built by the protobuf runtime from one
table (field numbers from CRI's ``api.proto``); no encoding is written by hand.

An event's key is container id + event type + ``created_at`` (ns): every
subscriber gets the same response for one broadcast, and a container has
one event of each type.  A broken stream (the daemon killed:
``UNAVAILABLE``) or a stream the daemon ends is a
:class:`~pytest_runtimefaults.subscribers.SubscriptionError` naming what
happened; a cancelled one ends quietly.  :func:`cri_events_unsupported`
tells a daemon without the method (containerd 1.6: ``UNIMPLEMENTED``).

:class:`CriLifecycles` is the producer: pod sandboxes (host network, so no
CNI configuration is needed) and containers in them made through
``RunPodSandbox`` / ``CreateContainer`` / ``StartContainer`` /
``StopContainer`` / ``RemoveContainer`` / ``StopPodSandbox`` /
``RemovePodSandbox``, each step's expected event recorded, so a swarm is
judged against what was really done, not only against its witness.

Example::

    transport = CriEvents(ctd.address)
    life = CriLifecycles(ctd.address, image=BUSYBOX)
    with Swarm(transport, subscribers=10, seed=1) as swarm:
        pod = life.pod()
        swarm.prime(lambda: life.container(pod))
        for _ in range(20):
            life.container(pod)
        life.remove_pod(pod)
        swarm.drain()
    print(missing_events(swarm, life.expected))
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pytest_runtimefaults import naming
from pytest_runtimefaults.cni.cgroups import kill_cgroup_tree
from pytest_runtimefaults.core.log import logger, swallowed
from pytest_runtimefaults.cri_api import cri_message as _message
from pytest_runtimefaults.cri_api import runtime_method
from pytest_runtimefaults.subscribers import (
    Event,
    Subscription,
    SubscriptionError,
    ThreadedSubscription,
)

if TYPE_CHECKING:
    from pytest_runtimefaults.containerd import Containerd
    from pytest_runtimefaults.expectations import Outcome
    from pytest_runtimefaults.faults import FaultRegistry
    from pytest_runtimefaults.journal import Journal
    from pytest_runtimefaults.subscribers import SubscriberRecord, Swarm, SwarmReport

__all__ = [
    "EVENT_TYPES",
    "PAUSE_IMAGE",
    "CriEvents",
    "CriLifecycles",
    "containerd_with_cri_events",
    "cri_events_unsupported",
    "event_key",
    "fan_out_outcome",
    "import_pause_image",
    "missing_events",
    "restart_outcome",
    "run_fan_out",
    "run_restart",
    "settle",
    "split_unsent",
]

#: CRI's ``ContainerEventType`` values, by number (an enum is an int32 on the wire)
EVENT_TYPES = ("CREATED", "STARTED", "STOPPED", "DELETED")

#: the pods' sandbox image (busybox-static ``sleep``), also the containers' image
PAUSE_IMAGE = "localhost/runtimefaults/pause:latest"

_NODE = 2  # NamespaceMode.NODE: the pod shares the host's network (no CNI)


def _channel(address: str) -> Any:
    import grpc

    return grpc.insecure_channel(
        f"unix://{address}",
        options=[
            # A dead daemon should fail the call, not queue it until it is back.
            ("grpc.enable_retries", 0),
            # Without this grpcio shares one connection among all channels to
            # the same socket: the daemon would see one client, not N.
            ("grpc.use_local_subchannel_pool", 1),
        ],
    )


def _events_call(channel: Any) -> Any:
    """Open one ``GetContainerEvents`` stream on *channel* (returns the call)."""
    method = runtime_method(channel, "GetContainerEvents", stream=True)
    return method(_message("GetEventsRequest"))


def event_key(container_id: str, event_type: int | str, created_at: int) -> str:
    """The swarm's key of one CRI event: ``ID/TYPE@created_at``."""
    kind = EVENT_TYPES[event_type] if isinstance(event_type, int) else event_type
    return f"{container_id}/{kind}@{created_at}"


def _type_name(number: int) -> str:
    return EVENT_TYPES[number] if 0 <= number < len(EVENT_TYPES) else f"TYPE{number}"


def _rpc_error_text(exc: BaseException) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{getattr(code, 'name', code)}: {details}"


class CriEvents:
    """Subscribe to CRI's ``GetContainerEvents`` over *address* (see module doc).

    Example::

        transport = CriEvents(ctd.address)
        sub = transport.subscribe()
        print(sub.receive(5.0))   # Event(key='ID/CREATED@...', topic='CREATED', data=pod id)
        sub.cancel()
    """

    def __init__(self, address: str, *, name: str = "cri events") -> None:
        self.address = address
        self.name = name

    def subscribe(self) -> Subscription:
        import grpc

        channel = _channel(self.address)
        call = _events_call(channel)

        def pump(put: Callable[[Event], None], cancelled: Callable[[], bool]) -> None:
            try:
                for resp in call:
                    kind = _type_name(int(resp.container_event_type))
                    put(
                        Event(
                            key=event_key(resp.container_id, kind, int(resp.created_at)),
                            topic=kind,
                            data=str(resp.pod_sandbox_status.id),
                        )
                    )
                if not cancelled():
                    # A clean end (status OK) is still an end: kubelet's Evented
                    # PLEG reads it as EOF and has to reconnect.
                    raise SubscriptionError(f"CRI at {self.address} ended the event stream")
            except grpc.RpcError as exc:
                if cancelled():
                    return
                raise SubscriptionError(f"CRI at {self.address}: {_rpc_error_text(exc)}") from exc
            finally:
                channel.close()

        return ThreadedSubscription(pump, on_cancel=call.cancel, name="cri-events")


def cri_events_unsupported(address: str, wait: float = 2.0) -> str | None:
    """None if the daemon at *address* serves ``GetContainerEvents``, else why not.

    A daemon without the method answers ``UNIMPLEMENTED`` at once (containerd
    1.6); one that has it keeps the stream open and silent, so a stream still
    open after *wait* seconds counts as served.
    """
    import grpc

    channel = _channel(address)
    call = _events_call(channel)
    done = threading.Event()
    call.add_done_callback(lambda _: done.set())
    try:
        if not done.wait(wait):
            return None
        try:
            next(iter(call))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return f"no CRI GetContainerEvents ({_rpc_error_text(exc)})"
            return f"GetContainerEvents failed: {_rpc_error_text(exc)}"
        except StopIteration:
            return "GetContainerEvents ended at once, with no error"
        return None  # an event arrived in the wait: served
    finally:
        call.cancel()
        channel.close()


def import_pause_image(ctd: Containerd, ref: str = PAUSE_IMAGE) -> str:
    """Import a busybox-static image whose default command is ``sleep`` into *ctd*.

    A pod's sandbox image must keep running; the same image runs the
    containers (their command is given).  Needs ``busybox-static``.
    """
    from pytest_runtimefaults.host.rootfs import busybox_image_tar

    tar = ctd.directory / "pause-oci.tar"
    tar.write_bytes(busybox_image_tar(ref=ref, cmd=("/bin/sleep", "86400")))
    try:
        ctd.ctr("images", "import", "--base-name", ref.rsplit(":", 1)[0], str(tar))
    finally:
        tar.unlink()
    return ref


@dataclass(frozen=True)
class CriPodRef:
    """A pod sandbox made by :class:`CriLifecycles`: its id and the config it ran with."""

    id: str
    config: Any


class CriLifecycles:
    """Pods and containers through CRI, each step's expected event recorded.

    ``expected`` lists ``(id, TYPE)`` in the order the steps completed:
    ``pod()`` -> the sandbox's CREATED, STARTED; ``container(pod)`` -> the
    container's CREATED, STARTED, STOPPED, DELETED; ``remove_pod(pod)`` ->
    the sandbox's STOPPED, DELETED.  Pods share the host's network (no CNI
    configuration needed) and their cgroups go under one unique, journaled
    parent, so :meth:`remove_all` ends whatever containerd left.  Thread-safe.
    """

    def __init__(
        self,
        address: str,
        *,
        image: str = PAUSE_IMAGE,
        timeout: float = 30.0,
        journal: Journal | None = None,
    ) -> None:
        self.address = address
        self.image = image
        self.timeout = timeout
        self.expected: list[tuple[str, str]] = []
        self.cgroup_parent = "/" + naming.unique_name("rfcrievcg", maxlen=40)
        if journal is None:
            from pytest_runtimefaults.journal import Journal

            journal = Journal.default()
        self.journal = journal
        self._rid: int | None = journal.add("cgroup-tree", parent=self.cgroup_parent)
        self._lock = threading.Lock()
        self._channel: Any = None

    def _call(self, method: str, request: Any) -> Any:
        with self._lock:
            if self._channel is None:
                self._channel = _channel(self.address)
            channel = self._channel
        return runtime_method(channel, method)(request, timeout=self.timeout)

    def _expect(self, *steps: tuple[str, str]) -> None:
        with self._lock:
            self.expected.extend(steps)

    def reset(self) -> None:
        """Forget the channel (after the daemon restarted: the old one is broken)."""
        with self._lock:
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def pod(self) -> CriPodRef:
        """``RunPodSandbox``: a host-network pod running the pause image."""
        name = naming.unique_name("rfevpod", maxlen=40)
        config = _message(
            "PodSandboxConfig",
            metadata=_message("PodSandboxMetadata", name=name, uid=f"uid-{name}", namespace="rf"),
            # No hostname: a host-network pod shares the host's UTS namespace
            # (runc: "unable to set hostname without a private UTS namespace").
            log_directory="/tmp",
            linux=_message(
                "LinuxPodSandboxConfig",
                cgroup_parent=self.cgroup_parent,
                security_context=_message(
                    "LinuxSandboxSecurityContext",
                    namespace_options=_message("NamespaceOption", network=_NODE),
                ),
            ),
        )
        response = self._call("RunPodSandbox", _message("RunPodSandboxRequest", config=config))
        pod_id = str(response.pod_sandbox_id)
        self._expect((pod_id, "CREATED"), (pod_id, "STARTED"))
        return CriPodRef(pod_id, config)

    def container(self, pod: CriPodRef) -> str:
        """One whole container lifecycle in *pod*: create, start, stop, remove."""
        name = naming.unique_name("rfevctr", maxlen=40)
        config = _message(
            "ContainerConfig",
            metadata=_message("ContainerMetadata", name=name),
            image=_message("ImageSpec", image=self.image),
            command=["/bin/sleep", "600"],
        )
        request = _message(
            "CreateContainerRequest",
            pod_sandbox_id=pod.id,
            config=config,
            sandbox_config=pod.config,
        )
        cid = str(self._call("CreateContainer", request).container_id)
        self._expect((cid, "CREATED"))
        self._call("StartContainer", _message("StartContainerRequest", container_id=cid))
        self._expect((cid, "STARTED"))
        # timeout 0: SIGKILL at once (busybox sleep as PID 1 ignores SIGTERM).
        self._call("StopContainer", _message("StopContainerRequest", container_id=cid, timeout=0))
        self._expect((cid, "STOPPED"))
        self._call("RemoveContainer", _message("RemoveContainerRequest", container_id=cid))
        self._expect((cid, "DELETED"))
        return cid

    def remove_pod(self, pod: CriPodRef) -> None:
        """``StopPodSandbox`` and ``RemovePodSandbox``."""
        self._call("StopPodSandbox", _message("StopPodSandboxRequest", pod_sandbox_id=pod.id))
        self._expect((pod.id, "STOPPED"))
        self._call("RemovePodSandbox", _message("RemovePodSandboxRequest", pod_sandbox_id=pod.id))
        self._expect((pod.id, "DELETED"))

    def pods(self) -> list[str]:
        """Ids of every pod sandbox CRI lists (``ListPodSandbox``)."""
        response = self._call("ListPodSandbox", _message("ListPodSandboxRequest"))
        return [str(item.id) for item in response.items]

    def cycle(self, containers: int = 2) -> None:
        """A pod with *containers* container lifecycles in it, then the pod removed."""
        pod = self.pod()
        for _ in range(containers):
            self.container(pod)
        self.remove_pod(pod)

    def remove_all(self) -> None:
        """Stop and remove every pod CRI lists (best effort, as a kubelet's garbage
        collection), kill what is left under the cgroup parent, close the channel."""
        with swallowed(Exception, "listing CRI pods at %s", self.address):
            for pod_id in self.pods():
                with swallowed(Exception, "removing CRI pod %s", pod_id):
                    self.remove_pod(CriPodRef(pod_id, None))
        kill_cgroup_tree(self.cgroup_parent)
        if self._rid is not None:
            self.journal.release(self._rid)
            self._rid = None
        self.reset()


def missing_events(
    records: Iterable[SubscriberRecord], expected: Iterable[tuple[str, str]], after: float = 0.0
) -> dict[int, list[tuple[str, str]]]:
    """Per subscriber (``-1``: the witness), the expected ``(id, TYPE)`` it never got.

    Only connections opened at or after *after* (``time.monotonic()``) count:
    after a daemon restart, what matters is what each subscriber got once
    it reconnected.  Subscribers that got everything are left out.
    """
    want = list(expected)
    out: dict[int, list[tuple[str, str]]] = {}
    for rec in records:
        got = {
            tuple(key.split("@", 1)[0].rsplit("/", 1))
            for conn in rec.connections
            if conn.opened >= after
            for key in conn.keys
        }
        lost = [step for step in want if step not in got]
        if lost:
            out[rec.index] = lost
    return out


def swarm_records(swarm: Swarm) -> list[SubscriberRecord]:
    """The witness and every subscriber of *swarm* (for :func:`missing_events`)."""
    return [swarm.witness, *swarm.records]


def settle(
    swarm: Swarm,
    expected: Callable[[], list[tuple[str, str]]],
    *,
    after: float = 0.0,
    quiet: float = 1.0,
    timeout: float = 20.0,
) -> None:
    """Wait until every subscriber got every expected event, or nothing moves.

    The swarm's own ``drain()`` waits for each connection to reach the
    witness's last event, which never happens on a daemon that deals each
    event to one caller (containerd 1.7): here the producer's list is the
    reference, and a swarm that received nothing new for *quiet* seconds is
    as far as it will get.
    """
    swarm.calm()
    deadline = time.monotonic() + timeout
    last_total, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        records = swarm_records(swarm)
        if not missing_events(records, expected(), after=after):
            return
        total = sum(swarm.received_by(r.index) for r in records)
        if total != last_total:
            last_total, last_change = total, time.monotonic()
        elif time.monotonic() - last_change >= quiet:
            return
        time.sleep(0.05)


def split_unsent(
    missing: dict[int, list[tuple[str, str]]], judged: int
) -> tuple[dict[int, list[tuple[str, str]]], list[tuple[str, str]]]:
    """Separate the events no subscriber got from those only some missed.

    *missing*: :func:`missing_events` over *judged* records.  An event every
    one of them missed was never delivered by the daemon at all (containerd
    sometimes sends no STOPPED for a container removed right after its stop:
    ``subscribers:cri-event-order``); that is not a fan-out defect, so the
    fan-out and restart judgements report it apart.  Returns (missing
    without those, those).
    """
    if len(missing) < judged:
        return missing, []
    counts: dict[tuple[str, str], int] = {}
    for lost in missing.values():
        for step in set(lost):
            counts[step] = counts.get(step, 0) + 1
    unsent = [step for step, n in counts.items() if n == judged]
    gone = set(unsent)
    rest = {i: kept for i, lost in missing.items() if (kept := [s for s in lost if s not in gone])}
    return rest, unsent


def _unsent_verdict(unsent: list[tuple[str, str]], expected: int) -> tuple[bool, str]:
    """(too many to be the known race, evidence text) for events nobody got."""
    if not unsent:
        return False, ""
    kinds = sorted({kind for _, kind in unsent})
    text = f"; {len(unsent)} of {expected} events reached no subscriber ({', '.join(kinds)})"
    # One in ten is far beyond the race seen (0-1 STOPPED of 74): a daemon
    # that sends little or nothing must not pass for one that fans out.
    return len(unsent) > expected // 10, text


def _lost_summary(missing: dict[int, list[tuple[str, str]]], expected: int) -> str:
    worst = max((len(v) for v in missing.values()), default=0)
    kinds = sorted({kind for lost in missing.values() for _, kind in lost})
    return (
        f"{len(missing)} subscribers missed events (up to {worst} of {expected}; "
        f"types {', '.join(kinds)})"
    )


def fan_out_outcome(
    report: SwarmReport,
    missing: dict[int, list[tuple[str, str]]],
    expected: int,
    ambiguous: tuple[str, ...] = (),
    unsent: list[tuple[str, str]] | None = None,
) -> tuple[Outcome, str]:
    """The verdict of a fan-out run: did every subscriber get every event once, in order?

    *missing*: :func:`missing_events` of the witness and the subscribers;
    *expected*: how many events the producer made.  ``survives`` when
    nothing is missing and the swarm's report (gaps, duplicates, order,
    unknown events, against the witness) is clean; ``misbehaves`` otherwise.
    Problem kinds in *ambiguous* are counted in the evidence only (``head``
    for churning subscribers: CRI acknowledges no subscription, so a miss
    before a new connection's first event may be registration latency).
    *unsent*: events no subscriber got (:func:`split_unsent`): evidence only,
    unless they are more than a tenth of *expected*.
    """
    from pytest_runtimefaults.expectations import Outcome

    too_many, unsent_text = _unsent_verdict(unsent or [], expected)
    figures = report.figures()
    summary = (
        f"{figures['subscribers']} subscribers + witness, {expected} events made, "
        f"{figures['deliveries']} deliveries"
    )
    kinds: dict[str, int] = {}
    for p in report.problems:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    if kinds:
        summary += "; problems: " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))
    summary += unsent_text
    if missing:
        return Outcome.MISBEHAVES, f"{_lost_summary(missing, expected)}; {summary}"
    if too_many or set(kinds) - set(ambiguous):
        return Outcome.MISBEHAVES, summary
    return Outcome.SURVIVES, summary


def restart_outcome(
    report: SwarmReport,
    missing: dict[int, list[tuple[str, str]]],
    expected: int,
    *,
    panics: list[str],
    alive: bool,
    unsent: list[tuple[str, str]] | None = None,
) -> tuple[Outcome, str]:
    """The verdict of a daemon SIGKILLed and restarted under the swarm.

    ``fails_cleanly``: every subscriber's stream ended with a
    :class:`~pytest_runtimefaults.subscribers.SubscriptionError`, each
    reconnected, and each got every one of the *expected* events made after
    it reconnected (*missing* empty); ``blocks``: a subscriber never saw its
    stream end; ``misbehaves``: one got nothing after reconnecting, or
    missed events; ``crashes``: a panic in the daemon's log, or no daemon.
    """
    import re

    from pytest_runtimefaults.expectations import Outcome

    records = [report.witness, *report.subscribers]
    too_many, unsent_text = _unsent_verdict(unsent or [], expected)
    summary = f"{len(records)} subscribers, {expected} events made after they reconnected"
    if panics:
        return Outcome.CRASHES, f"the daemon panicked: {panics[:2]}; {summary}"
    if not alive:
        return Outcome.CRASHES, f"the daemon is gone; {summary}"
    silent = [r.index for r in records if not r.errors]
    if silent:
        return (
            Outcome.BLOCKS,
            f"{len(silent)} subscribers never saw their stream end at the kill; {summary}",
        )
    # The socket path differs per run: "SOCK" keeps the distinct errors few.
    errors = sorted({re.sub(r"/\S+", "SOCK", c.error)[:120] for r in records for c in r.errors})
    summary += f"; stream ends: {errors[:3]}"
    unrecovered = [r.index for r in records if not r.recovered]
    if unrecovered:
        return (
            Outcome.MISBEHAVES,
            f"{len(unrecovered)} subscribers received nothing after reconnecting; {summary}",
        )
    summary += unsent_text
    if missing:
        return Outcome.MISBEHAVES, f"{_lost_summary(missing, expected)}; {summary}"
    if too_many:
        return Outcome.MISBEHAVES, summary
    return Outcome.FAILS_CLEANLY, summary


def containerd_with_cri_events(
    *, journal: Journal | None = None, registry: FaultRegistry | None = None
) -> Containerd:
    """A started private containerd with its CRI plugin and the pause image.

    Pods made by :class:`CriLifecycles` share the host's network, so no CNI
    configuration is needed (CRI reports the network not ready, and runs
    host-network pods all the same).  Namespace ``k8s.io``, the one CRI
    uses, so the imported image is CRI's.
    """
    from pytest_runtimefaults.containerd import Containerd

    ctd = Containerd(
        cri=True,
        namespace="k8s.io",
        log_level="info",
        # restrict_oom_score_adj: the sandbox's -998 needs CAP_SYS_RESOURCE,
        # which root lacks on this kind of host (runc init dies otherwise).
        cri_config=(
            f'enable_cdi = false\nrestrict_oom_score_adj = true\nsandbox_image = "{PAUSE_IMAGE}"'
        ),
        journal=journal,
        registry=registry,
    )
    try:
        ctd.start()
        import_pause_image(ctd)
    except BaseException:
        ctd.stop()
        raise
    return ctd


@dataclass
class CriRun:
    """One judged run: the swarm's report, what each subscriber missed, the verdict."""

    report: SwarmReport
    #: per subscriber, what it missed that some other subscriber got
    missing: dict[int, list[tuple[str, str]]]
    expected: int
    outcome: Outcome
    evidence: str
    seconds: float
    #: events no subscriber got (:func:`split_unsent`)
    unsent: list[tuple[str, str]]


def produce(life: CriLifecycles, pods: int, containers: int, parallel: int = 2) -> None:
    """*pods* pods with *containers* container lifecycles each, *parallel* at a time."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(lambda _: life.cycle(containers), range(pods)))


def _prime(swarm: Swarm, life: CriLifecycles, pod: CriPodRef, timeout: float) -> None:
    try:
        swarm.prime(lambda: life.container(pod), timeout=timeout)
    except TimeoutError:
        # A subscriber that never receives again is what the judging reports
        # (its connection and what it missed), not an error of the run.
        logger.debug("priming the CRI swarm timed out", exc_info=True)


def run_fan_out(
    swarm: Swarm,
    life: CriLifecycles,
    *,
    pods: int = 6,
    containers: int = 2,
    steady_only: bool = False,
    ambiguous: tuple[str, ...] = (),
) -> CriRun:
    """Prime *swarm*, make pods and containers, and judge who got which event.

    Every subscriber (or, with *steady_only*, the witness and the steady
    ones: churning subscribers cannot have everything) must get every event
    made after priming.
    """
    pod = life.pod()
    _prime(swarm, life, pod, timeout=30)
    start = len(life.expected)
    began = time.monotonic()
    produce(life, pods, containers)
    life.remove_pod(pod)
    expected = life.expected[start:]
    records = [swarm.witness, *(r for r in swarm.records if r.steady or not steady_only)]
    settle(swarm, lambda: expected)
    report = swarm.report()
    missing, unsent = split_unsent(missing_events(records, expected), len(records))
    outcome, evidence = fan_out_outcome(report, missing, len(expected), ambiguous, unsent)
    seconds = time.monotonic() - began
    return CriRun(report, missing, len(expected), outcome, evidence, seconds, unsent)


def run_restart(
    swarm: Swarm,
    life: CriLifecycles,
    ctd: Containerd,
    *,
    pods: int = 4,
    containers: int = 2,
) -> CriRun:
    """SIGKILL *ctd* under *swarm*, restart it, and judge the reconnection.

    Events are made before the kill (so the streams are busy), then the
    daemon is killed; once every subscriber saw its stream end (or 10 s),
    it is started again, the swarm primed anew, and every event of the pods
    and containers made after that must reach every subscriber on a
    connection opened after the restart.
    """
    from pytest_runtimefaults.subscribers import DaemonWatch

    pod = life.pod()
    _prime(swarm, life, pod, timeout=30)
    produce(life, 1, containers)
    ctd.kill()
    killed = time.monotonic()
    records = swarm_records(swarm)
    while time.monotonic() < killed + 10 and not all(r.errors for r in records):
        time.sleep(0.05)
    ctd.daemon.start()
    life.reset()  # the producer's channel died with the daemon
    restarted = time.monotonic()
    pod = life.pod()
    _prime(swarm, life, pod, timeout=20)
    start = len(life.expected)
    produce(life, pods, containers)
    life.remove_pod(pod)
    expected = life.expected[start:]
    settle(swarm, lambda: expected, after=restarted)
    report = swarm.report()
    missing, unsent = split_unsent(missing_events(records, expected, after=restarted), len(records))
    assert ctd.pid is not None
    watch = DaemonWatch(pid=ctd.pid, log_path=ctd.daemon.log_path)
    watch.baseline()
    watch.log_offset = 0  # the whole log: neither instance may have panicked
    outcome, evidence = restart_outcome(
        report, missing, len(expected), panics=watch.panics(), alive=watch.alive(), unsent=unsent
    )
    return CriRun(report, missing, len(expected), outcome, evidence, restarted - killed, unsent)
