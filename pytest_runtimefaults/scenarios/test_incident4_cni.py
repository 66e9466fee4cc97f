"""Incident 4 (nerdctl, containerd, libcni): half-written, held, vanishing and racing CNI configs.

A private containerd runs its CRI plugin on a private CNI directory, inside
a network namespace of its own; pods are made through CRI as a kubelet makes
them (``RunPodSandbox``: CNI ADD; ``StopPodSandbox``: CNI DEL).  Each
scenario puts one fault of the catalogue in the directory while a few pods
start, then removes every pod and looks at what is left.

Recovered means: a pod either gets the network it asked for or fails with a
clear error naming the broken file; never the wrong plugin type (a macvlan
network brought up as a bridge); no IPAM reservation, namespace or link
left once the pods are removed; and pods start again once the files are
whole.  Verdicts: ``survives`` (every pod got its network), ``fails_cleanly``
(pods failed, the broken file was named, nothing left, the next pod fine),
``misbehaves`` (a wrong plugin type, an error naming no file, or no pod
once the files were whole), ``leaks`` (reservations, namespaces, links
left), ``blocks`` (a pod call that did not return within the bound).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from pytest_runtimefaults import caps
from pytest_runtimefaults.containerd import Containerd
from pytest_runtimefaults.daemon import DaemonError
from pytest_runtimefaults.expectations import Outcome, installed_version
from pytest_runtimefaults.faults import FaultRegistry

pytestmark = [pytest.mark.family("cni"), pytest.mark.timeout(90)]

BOUND = 15.0  # seconds a CRI call may take before we call it blocked
PODS = 4  # pods per scenario under the fault (a few, not 20)
#: leak checks registered by cni_sandbox and cni_cri_pods
LEAK_CHECKS = ("ipam:cni", "netns:cri", "links:cni")


@dataclass
class PodRuns:
    """What the pods of one scenario got: kinds of their eth0, errors, leftovers."""

    wanted: str  # the link kind the pod network should give: "veth" or "macvlan"
    kinds: list[str | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    after: str | None = None  # None: a pod got its network once the files were whole
    file_named: bool = False  # some error the runtime gave (pod, status, log) named the file

    def run(self, pods: Any, link_kind: Callable[[str, str], str | None]) -> None:
        """Run one pod and record what it got."""
        import grpc

        try:
            pod = pods.run()
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                self.blocked.append(str(details))
            else:
                self.errors.append(str(details))
            return
        self.kinds.append(link_kind(pod.netns_path, "eth0"))

    def outcome(self) -> tuple[Outcome, str]:
        """The verdict of the scenario, with its evidence."""
        wrong = [k for k in self.kinds if k != self.wanted]
        text = (
            f"{len(self.kinds)} pods up ({', '.join(str(k) for k in self.kinds) or 'none'}; "
            f"wanted {self.wanted}), {len(self.errors)} failed"
        )
        if self.errors:
            text += f" (first: {self.errors[0][:200]})"
        text += "; broken file named by the runtime" if self.file_named else ""
        if self.after is not None:
            text += f"; once whole: {self.after}"
        if self.leftovers:
            text += f"; left: {sorted(self.leftovers)[:5]}"
        if self.blocked:
            return (
                Outcome.BLOCKS,
                f"{len(self.blocked)} pod calls still waiting at {BOUND} s; {text}",
            )
        if wrong:
            return Outcome.MISBEHAVES, f"wrong network type: {text}"
        if self.leftovers:
            return Outcome.LEAKS, text
        if self.after is not None:
            return Outcome.MISBEHAVES, text
        if self.errors:
            if not self.file_named:
                return Outcome.MISBEHAVES, f"no error names the broken file: {text}"
            return Outcome.FAILS_CLEANLY, text
        return Outcome.SURVIVES, text


def finish(
    runs: PodRuns,
    pods: Any,
    registry: FaultRegistry,
    ctd: Containerd,
    link_kind: Callable[[str, str], str | None],
) -> None:
    """Remove every pod, collect leftovers, lift the faults, and try one more pod."""
    from pytest_runtimefaults.cni import wait_cri_network

    pods.remove_all()
    for name in LEAK_CHECKS:
        check = registry.leak_checks.get(name)
        if check is not None:
            runs.leftovers += sorted(check.leaked())
    registry.lift_all()
    wait_cri_network(ctd.address, lambda s: s.ready, timeout=5)
    before = len(runs.kinds), len(runs.errors)
    runs.run(pods, link_kind)
    if (len(runs.kinds), len(runs.errors)) == before or runs.kinds[-1:] != [runs.wanted]:
        runs.after = (
            f"the next pod failed: {runs.errors[-1][:200]}"
            if len(runs.errors) > before[1]
            else f"the next pod got {runs.kinds[-1:]}"
        )
        if len(runs.errors) > before[1]:
            runs.errors.pop()
    else:
        runs.kinds.pop()  # the probe pod is not one of the scenario's
    pods.remove_all()


def names_file(path: Any, ctd: Containerd, runs: PodRuns) -> bool:
    """Whether the runtime named *path* in a pod error, its CRI status or its log."""
    from pytest_runtimefaults.cni import cri_network_status

    text = str(path)
    status = cri_network_status(ctd.address)
    return any(text in t for t in [*runs.errors, status.last_load, status.message, ctd.logs])


def record(
    verdict: Any,
    runs: PodRuns,
    fault: str,
    seconds: float,
    crash: tuple[Outcome, str] | None = None,
) -> None:
    """Record the pods' verdict, or *crash* (containerd exited of the fault: its
    verdict and evidence) with what the pods got once it was restarted."""
    outcome, evidence = runs.outcome()
    if crash is not None:
        outcome, evidence = (
            crash[0],
            crash[1] + (f"; after a restart: {runs.after}" if runs.after is not None else ""),
        )
    verdict.record(
        outcome,
        component="containerd",
        fault=fault,
        evidence=evidence,
        version=installed_version("containerd"),
        seconds=seconds,
        leftovers=runs.leftovers,
    )


@pytest.fixture
def pods(cni_cri_pods: Any, request: pytest.FixtureRequest) -> Any:
    """``cni_cri_pods`` with CRI calls bounded by :data:`BOUND`."""
    # A pod runs a pause container: containerd 2 writes cpu.weight for it.
    caps.require_container_controllers(request)
    cni_cri_pods.timeout = BOUND
    return cni_cri_pods


def _link_kind(netns: str, ifname: str) -> str | None:
    """The kind of *ifname* in the namespace at *netns* (``veth``, ``macvlan``), or None.

    Through ``nsenter ip`` rather than pyroute2's NetNS, which forks without
    exec: in this process, full of gRPC threads, its child hung once for good.
    """
    argv = ["nsenter", f"--net={netns}", "ip", "-d", "-j", "link", "show", "dev", ifname]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return None
    if res.returncode != 0:
        return None
    try:
        links = json.loads(res.stdout)
    except ValueError:
        return None
    for link in links:
        kind = (link.get("linkinfo") or {}).get("info_kind")
        return str(kind) if kind else "device"
    return None


@pytest.fixture
def link_kind() -> Callable[[str, str], str | None]:
    """How a pod's link kind is read (a fixture, so a test can swap it)."""
    return _link_kind


@pytest.mark.parametrize("mode", ["truncate", "empty", "nul"])
def test_half_written_config(
    cni_dir: Any,
    cni_containerd: Containerd,
    pods: Any,
    cni_half_written: Any,
    runtimefaults_faults: FaultRegistry,
    link_kind: Any,
    verdict: Any,
    mode: str,
) -> None:
    """A broken config sorted first: pods fail naming the file, or use the whole one."""
    from pytest_runtimefaults.cni import wait_cri_network

    good = cni_dir.bridge()
    cni_dir.write(good, priority=10)
    wait_cri_network(cni_containerd.address, lambda s: s.ready)
    started = time.monotonic()
    fault = cni_half_written("05-broken.conflist", cni_dir.bridge(), mode=mode)
    wait_cri_network(cni_containerd.address, lambda s: str(fault.path) in s.last_load, timeout=3)
    runs = PodRuns(wanted="veth")
    for _ in range(PODS // 2):
        runs.run(pods, link_kind)
    runs.file_named = names_file(fault.path, cni_containerd, runs)
    finish(runs, pods, runtimefaults_faults, cni_containerd, link_kind)
    record(verdict, runs, "cni:truncated-config", time.monotonic() - started)


def test_held_half_written_config(
    cni_dir: Any,
    cni_containerd: Containerd,
    pods: Any,
    cni_held_half_written: Any,
    runtimefaults_faults: FaultRegistry,
    link_kind: Any,
    verdict: Any,
) -> None:
    """The pod network's file held half-written while pods start, then completed."""
    from pytest_runtimefaults.cni import wait_cri_network

    conf = cni_dir.bridge()
    started = time.monotonic()
    held = cni_held_half_written(cni_dir.filename(conf), conf)
    wait_cri_network(cni_containerd.address, lambda s: str(held.path) in s.last_load, timeout=3)
    runs = PodRuns(wanted="veth")
    for _ in range(PODS // 2):
        runs.run(pods, link_kind)
    runs.file_named = names_file(held.path, cni_containerd, runs)
    finish(runs, pods, runtimefaults_faults, cni_containerd, link_kind)
    record(verdict, runs, "cni:held-half-written", time.monotonic() - started)


def test_vanishing_config(
    cni_dir: Any,
    cni_sandbox: Any,
    cni_containerd: Containerd,
    pods: Any,
    cni_delete_recreate: Any,
    runtimefaults_faults: FaultRegistry,
    link_kind: Any,
    verdict: Any,
) -> None:
    """The macvlan network's file deleted and recreated while pods start: never a bridge pod."""
    from pytest_runtimefaults.cni import wait_cri_network

    mac = cni_dir.macvlan(cni_sandbox.master_link())
    cni_dir.write(cni_dir.bridge(), "20-bridge.conflist")
    cni_dir.write(mac, "10-mac.conflist")
    wait_cri_network(cni_containerd.address, lambda s: s.plugin_types == ("macvlan",))
    started = time.monotonic()
    flap = cni_delete_recreate("10-mac.conflist", mac, gap=0.02, period=(0.005, 0.02))
    runs = PodRuns(wanted="macvlan")
    # A few pods; stop at the first on the wrong network (the finding).
    for _ in range(2 * PODS):
        runs.run(pods, link_kind)
        if any(k != "macvlan" for k in runs.kinds):
            break
    runs.file_named = names_file(cni_dir.path("10-mac.conflist"), cni_containerd, runs)
    assert flap.count > 0, "the file was never deleted and recreated"
    finish(runs, pods, runtimefaults_faults, cni_containerd, link_kind)
    record(verdict, runs, "cni:delete-recreate", time.monotonic() - started)


def test_config_renamed_into_place(
    cni_dir: Any,
    cni_sandbox: Any,
    cni_containerd: Containerd,
    pods: Any,
    cni_renamed_into: Any,
    runtimefaults_faults: FaultRegistry,
    link_kind: Any,
    verdict: Any,
) -> None:
    """A macvlan network's file renamed into the dir beside a bridge one: pods must get macvlan.

    The rename queues only IN_MOVED_TO (containerd issue 11715): a watcher
    that skips creates keeps the bridge network as the default.
    """
    from pytest_runtimefaults.cni import wait_cri_network

    cni_dir.write(cni_dir.bridge(), "20-bridge.conflist")
    wait_cri_network(cni_containerd.address, lambda s: s.plugin_types == ("bridge",))
    started = time.monotonic()
    mac = cni_dir.macvlan(cni_sandbox.master_link())
    fault = cni_renamed_into("10-mac.conflist", mac)
    # A reload takes milliseconds; a second is generous.
    wait_cri_network(cni_containerd.address, lambda s: s.plugin_types == ("macvlan",), 1.0)
    runs = PodRuns(wanted="macvlan")
    for _ in range(PODS // 2):
        runs.run(pods, link_kind)
    runs.file_named = names_file(fault.path, cni_containerd, runs)
    finish(runs, pods, runtimefaults_faults, cni_containerd, link_kind)
    record(verdict, runs, "cni:config-renamed-into", time.monotonic() - started)


def _status_or_exit(ctd: Containerd, predicate: Callable[[Any], bool], bound: float) -> Any:
    """CRI's network status once *predicate* holds (or at *bound*), or None when
    containerd exits meanwhile: where the fault kills it, the crash is the outcome."""
    from pytest_runtimefaults.cni import cri_network_status

    status: Any = None
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if not ctd.running:
            return None
        try:
            status = cri_network_status(ctd.address)
        except Exception as exc:  # grpc.RpcError: dying or not up yet; it decides below
            status = f"CRI: {exc}"
        else:
            if predicate(status):
                break
        time.sleep(0.05)
    time.sleep(1)  # a daemon dying of the fault does so within this second
    return status if ctd.running else None


def _crashed(ctd: Containerd, pods: Any, last: str) -> tuple[Outcome, str]:
    """A crash's verdict and evidence; containerd is restarted, so that this
    scenario's teardown and probe pod meet a live daemon (and every scenario
    has its own containerd: ``cni_containerd`` is per test)."""
    said = [ln for ln in ctd.logs.splitlines() if "level=fatal" in ln or "overflow" in ln]
    ctd.restart()
    pods.mount_pid = ctd.pid  # the pods' namespaces are under the new process's root
    return Outcome.CRASHES, f"containerd exited ({last}); log: {[s[:200] for s in said[-2:]]}"


@pytest.fixture
def macvlan_pods_or_crash(
    cni_dir: Any,
    cni_containerd: Containerd,
    pods: Any,
    runtimefaults_faults: FaultRegistry,
    link_kind: Callable[[str, str], str | None],
) -> Callable[[float, str], tuple[PodRuns, tuple[Outcome, str] | None]]:
    """``macvlan_pods_or_crash(bound, when)``, once the fault is in: a few pods that
    must get ``10-mac.conflist``'s macvlan network, and :func:`finish`, unless
    containerd exits of the fault (before *bound* s, while the pods start, or while
    they are removed): then the crash's verdict (*when* names the moment), and
    :func:`finish` against the restarted containerd."""
    ctd, path = cni_containerd, cni_dir.path("10-mac.conflist")

    def run(bound: float, when: str) -> tuple[PodRuns, tuple[Outcome, str] | None]:
        status = _status_or_exit(ctd, lambda s: s.plugin_types == ("macvlan",), bound)
        runs = PodRuns(wanted="macvlan")
        try:
            if status is None:
                raise ProcessLookupError("containerd exited")
            for _ in range(PODS // 2):
                runs.run(pods, link_kind)
            if not ctd.running:
                raise ProcessLookupError("containerd exited")
            runs.file_named = names_file(path, ctd, runs)
            finish(runs, pods, runtimefaults_faults, ctd, link_kind)
        except Exception:
            if ctd.running:
                raise  # not the crash: a failure of the scenario itself
            crash = _crashed(ctd, pods, when)
            finish(runs, pods, runtimefaults_faults, ctd, link_kind)
            return runs, crash
        return runs, None

    return run


def test_conf_dir_swapped(
    cni_dir: Any,
    cni_sandbox: Any,
    cni_containerd: Containerd,
    cni_conf_dir_swap: Any,
    macvlan_pods_or_crash: Any,
    verdict: Any,
) -> None:
    """The conf dir deleted and recreated holding a macvlan network (containerd 6490): pods
    must get macvlan; a watch on the old inode never hears of it."""
    from pytest_runtimefaults.cni import wait_cri_network

    cni_dir.write(cni_dir.bridge(), "20-bridge.conflist")
    wait_cri_network(cni_containerd.address, lambda s: s.plugin_types == ("bridge",))
    started = time.monotonic()
    cni_conf_dir_swap({"10-mac.conflist": cni_dir.macvlan(cni_sandbox.master_link())})
    # 2.x polls a vanished conf dir every 5 s: a bound past that
    runs, crash = macvlan_pods_or_crash(12.0, "after the swap")
    record(verdict, runs, "cni:conf-dir-swapped", time.monotonic() - started, crash)


def test_event_storm(
    cni_dir: Any,
    cni_sandbox: Any,
    cni_containerd: Containerd,
    cni_event_storm: Any,
    macvlan_pods_or_crash: Any,
    verdict: Any,
) -> None:
    """A storm of conf dir events while containerd is frozen, its queue overflowing
    (containerd 5041: a reload loop; 1.6-2.1 exit), then a macvlan network: pods get it."""
    import os
    import signal
    from pathlib import Path

    from pytest_runtimefaults.cni import wait_cri_network

    cni_dir.write(cni_dir.bridge(), "20-bridge.conflist")
    wait_cri_network(cni_containerd.address, lambda s: s.plugin_types == ("bridge",))
    pid = cni_containerd.pid
    assert pid is not None
    # 1.5 x the queue (4 events a file): the kernel drops the excess with IN_Q_OVERFLOW
    files = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text()) * 3 // 8 + 1
    started = time.monotonic()
    mac = cni_dir.macvlan(cni_sandbox.master_link())
    os.kill(pid, signal.SIGSTOP)  # frozen for the burst, as a daemon starved of CPU is
    try:
        cni_event_storm(files=files, touch=("10-mac.conflist", mac))
    finally:
        os.kill(pid, signal.SIGCONT)
    runs, crash = macvlan_pods_or_crash(10.0, f"after {files} scratch files")
    record(verdict, runs, "cni:event-storm", time.monotonic() - started, crash)


def test_no_inotify_instance_left(
    request: pytest.FixtureRequest,
    cni_dir: Any,
    cni_sandbox: Any,
    inotify_exhausted: Any,
    runtimefaults_journal: Any,
    runtimefaults_faults: FaultRegistry,
    verdict: Any,
) -> None:
    """containerd started with no inotify instance left to it (containerd 10468, 10308:
    ``failed to create fsnotify watcher: too many open files``): it must refuse saying
    why, or serve CRI; and be back once the instances are.  Its own containerd, in the
    fault's user namespace; the host's limit is never touched."""
    import grpc

    from pytest_runtimefaults.cni import containerd_in_sandbox, cri_network_status
    from pytest_runtimefaults.cni import wait_cri_network as wait

    for program, package in (("containerd", "containerd"), ("runc", "runc")):
        caps.require_command(request, program, package=package)
    caps.require_command(request, "busybox", package="busybox-static")
    conf = cni_dir.bridge()
    cni_dir.write(conf)
    held = inotify_exhausted(limit=4)
    started = time.monotonic()
    ctd = containerd_in_sandbox(
        cni_dir,
        cni_sandbox,
        journal=runtimefaults_journal,
        registry=runtimefaults_faults,
        enter=held.argv,
    )
    try:
        status: Any
        try:
            status = cri_network_status(ctd.address)
        except grpc.RpcError as exc:  # no CRI service: what a kubelet would see
            status = f"{exc.code()}: {exc.details()}"
        said = [ln[:200] for ln in ctd.logs.splitlines() if "too many open files" in ln]
        serving = not isinstance(status, str)
        held.release()
        later = cni_dir.bridge()
        cni_dir.write(later, "05-later.conflist")

        def has_later(s: Any) -> bool:
            return bool(s.ready and [n for n, _ in s.networks] == [later["name"]])

        by_itself = serving and has_later(wait(ctd.address, has_later, 3))
        running = ctd.running
        try:
            ctd.restart()  # what brought every version back, measured: checked, not assumed
            restarted = has_later(wait(ctd.address, has_later, 5))
        except (DaemonError, grpc.RpcError) as exc:
            restarted = False
            said.append(f"the restart: {str(exc).splitlines()[0]}")
    finally:
        ctd.stop()
    if serving and by_itself and restarted:
        outcome = Outcome.SURVIVES
    elif not running and said and restarted:
        outcome = Outcome.FAILS_CLEANLY  # refused to run, saying why
    else:
        outcome = Outcome.MISBEHAVES  # running without CRI (or its watch), or never back
    verdict.record(
        outcome,
        component="containerd",
        fault="cni:inotify-instances-exhausted",
        evidence=(
            f"CRI at start: {status}; running: {running}; said: {said[:1] or 'nothing'}; "
            f"instances back, a new file loaded by itself: {by_itself}; after a restart: "
            f"{restarted}"
        ),
        version=installed_version("containerd"),
        seconds=time.monotonic() - started,
    )


def test_racing_writer(
    cni_dir: Any,
    cni_sandbox: Any,
    cni_containerd: Containerd,
    pods: Any,
    cni_racing_writer: Any,
    runtimefaults_faults: FaultRegistry,
    link_kind: Any,
    verdict: Any,
) -> None:
    """Both networks' files rewritten in place in small chunks while pods start."""
    from pytest_runtimefaults.cni import wait_cri_network

    mac = cni_dir.macvlan(cni_sandbox.master_link())
    files = {"10-mac.conflist": mac, "20-bridge.conflist": cni_dir.bridge()}
    for name, conf in files.items():
        cni_dir.write(conf, name)
    wait_cri_network(cni_containerd.address, lambda s: s.plugin_types == ("macvlan",))
    started = time.monotonic()
    cni_racing_writer(files)
    runs = PodRuns(wanted="macvlan")
    for _ in range(PODS):
        runs.run(pods, link_kind)
    runs.file_named = any(names_file(cni_dir.path(n), cni_containerd, runs) for n in files)
    finish(runs, pods, runtimefaults_faults, cni_containerd, link_kind)
    record(verdict, runs, "cni:racing-writer", time.monotonic() - started)


def test_wrong_version_config(
    cni_dir: Any,
    cni_containerd: Containerd,
    pods: Any,
    cni_half_written: Any,
    runtimefaults_faults: FaultRegistry,
    link_kind: Any,
    verdict: Any,
) -> None:
    """A config with a cniVersion the plugins lack, sorted first: an error naming it."""
    from pytest_runtimefaults.cni import wait_cri_network

    good = cni_dir.bridge()
    cni_dir.write(good, priority=10)
    wait_cri_network(cni_containerd.address, lambda s: s.ready)
    started = time.monotonic()
    bad = cni_dir.bridge()
    fault = cni_half_written("05-bad.conflist", bad, mode="wrong-version")
    wait_cri_network(cni_containerd.address, lambda s: bad["name"] in [n for n, _ in s.networks])
    runs = PodRuns(wanted="veth")
    for _ in range(PODS // 2):
        runs.run(pods, link_kind)
    runs.file_named = names_file(fault.path, cni_containerd, runs)
    finish(runs, pods, runtimefaults_faults, cni_containerd, link_kind)
    record(verdict, runs, "cni:wrong-version-config", time.monotonic() - started)


def test_network_file_gone_before_delete(
    cni_dir: Any,
    cni_sandbox: Any,
    cni_containerd: Containerd,
    pods: Any,
    runtimefaults_faults: FaultRegistry,
    link_kind: Any,
    verdict: Any,
) -> None:
    """The pod's network file removed while the pod runs: its DEL must still free its address."""
    from pytest_runtimefaults.cni import wait_cri_network

    mac = cni_dir.macvlan(cni_sandbox.master_link())
    cni_dir.write(cni_dir.bridge(), "20-bridge.conflist")
    cni_dir.write(mac, "10-mac.conflist")
    wait_cri_network(cni_containerd.address, lambda s: s.plugin_types == ("macvlan",))
    started = time.monotonic()
    runs = PodRuns(wanted="macvlan")
    runs.run(pods, link_kind)
    cni_dir.remove("10-mac.conflist")  # the pod's network file vanishes while it runs
    wait_cri_network(cni_containerd.address, lambda s: s.plugin_types == ("bridge",))

    # The file comes back after the pods are gone (finish), so the next pod is macvlan again.
    def put_back() -> None:
        cni_dir.write(mac, "10-mac.conflist")

    runtimefaults_faults.add("10-mac.conflist removed", lift=put_back)
    finish(runs, pods, runtimefaults_faults, cni_containerd, link_kind)
    record(verdict, runs, "cni:default-gone-at-del", time.monotonic() - started)


@pytest.mark.parametrize("mode", ["truncate", "empty"])
def test_podman_half_written_network(
    netavark_dir: Any,
    podman_netavark: Any,
    netavark_half_written: Any,
    runtimefaults_faults: FaultRegistry,
    verdict: Any,
    mode: str,
) -> None:
    """podman (netavark) beside a half-written network file: runs on the others, names it."""
    good = netavark_dir.network()
    netavark_dir.write(good)
    broken = netavark_dir.network()
    started = time.monotonic()
    fault = netavark_half_written(netavark_dir.filename(broken), broken, mode=mode)
    on_good = podman_netavark.run(good["name"], "true")
    on_broken = podman_netavark.run(broken["name"], "true")
    named = str(fault.path) in on_good.stderr + on_broken.stderr
    runtimefaults_faults.lift_all()
    after = podman_netavark.run(broken["name"], "true")
    text = (
        f"run on the whole network: rc {on_good.returncode}; on the broken one: rc "
        f"{on_broken.returncode} ({_last_line(on_broken.stderr)}); broken file "
        f"{'named' if named else 'not named'}; once whole: rc {after.returncode}"
    )
    if on_good.returncode != 0:
        outcome = Outcome.MISBEHAVES  # one broken file took a whole network down
    elif on_broken.returncode == 0 or after.returncode != 0:
        outcome = Outcome.MISBEHAVES  # ran on a broken network, or not once it was whole
    elif not named:
        outcome = Outcome.MISBEHAVES
        text = f"no error names the broken file: {text}"
    else:
        # the run on the broken network failed, naming it: as the table words
        # podman's CNI backend doing the same
        outcome = Outcome.FAILS_CLEANLY
    verdict.record(
        outcome,
        component="podman",
        fault="cni:truncated-config",
        evidence=text,
        seconds=time.monotonic() - started,
    )


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "no output"


def test_podman_network_churn(
    podman_netavark: Any, netavark_network_churn: Any, verdict: Any
) -> None:
    """podman (netavark) under parallel network create / rm / run / ls (podman
    issues 7807, 7808, 9472): no race, and ls, files and namespace agree after."""
    started = time.monotonic()
    churn = netavark_network_churn(workers=3, rounds=5).wait()
    problems = churn.check_state()
    cats = churn.by_category()
    first = next(iter(churn.failures()), None)
    text = (
        f"{len(churn.ops)} ops ({churn.ops_per_second:.1f}/s, seed {churn.seed}): "
        f"{dict(cats)}; state: {'; '.join(problems) or 'consistent'}"
        + (f"; first failure: {first.line()}" if first is not None else "")
    )
    outcome = churn.outcome(problems)
    verdict.record(
        outcome,
        component="podman",
        fault="cni:network-churn",
        evidence=text,
        seconds=time.monotonic() - started,
    )
