"""containerd 1.6's CRI plugin reloading a CNI conf dir that is half-written,
held, vanishing or racing.

CRI watches ``conf_dir`` with inotify and reloads on every change; with the
default ``max_conf_num = 1`` it uses the first file (in name order) as the
pod network.  What it makes of the directory is read from CRI's own
``RuntimeService/Status`` (verbose): the ``NetworkReady`` condition and the
loaded networks' plugin types.  The results are tabled in docs/cni.md.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from findings import judged

from pytest_runtimefaults import caps, naming
from pytest_runtimefaults import expectations as ex
from pytest_runtimefaults.cni import (
    CniDir,
    CriNetworkStatus,
    CriPods,
    cri_network_status,
    wait_cri_network,
)
from pytest_runtimefaults.containerd import Containerd
from pytest_runtimefaults.faults import FaultRegistry
from pytest_runtimefaults.netns import (
    CniSandbox,
    link_kind,
    own_namespaces,
    snapshot_ipam,
    snapshot_links,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def host_unchanged() -> Iterator[None]:
    before = host_state()
    yield
    deadline = time.monotonic() + 3  # another worker's podman may own a cni-* netns briefly
    while host_state() != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert host_state() == before


def host_state() -> tuple[set[str], set[str], set[str], set[str]]:
    """Namespaces, root links, libcni's host cache and the runtimes' cgroup parents."""
    cache = Path("/var/lib/cni")
    files = {str(p) for p in cache.rglob("*")} if cache.exists() else set()
    memory = Path("/sys/fs/cgroup/memory")
    groups = {
        p.name
        for p in (memory.iterdir() if memory.is_dir() else [])
        if p.name in ("libpod_parent", "k8s.io")
        # Ours only: another xdist worker's pod parents carry its own process tag.
        or (p.name.startswith(("rfpodcg", "rfcricg")) and naming.process_tag() in p.name)
    }
    return own_namespaces(), snapshot_links(None), files, groups


def ready_with(name: str) -> Any:
    return lambda s: s.ready and [n for n, _ in s.networks] == [name]


def sample(address: str, seconds: float) -> Counter[tuple[bool, tuple[str, ...]]]:
    """(NetworkReady, plugin types) as CRI reports them, polled for *seconds*."""
    seen: Counter[tuple[bool, tuple[str, ...]]] = Counter()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = cri_network_status(address)
        seen[(status.ready, status.plugin_types)] += 1
        time.sleep(0.01)
    return seen


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("truncate", "unexpected end of JSON input"),
        ("empty", "unexpected end of JSON input"),
        ("nul", "invalid character '\\x00' after top-level value"),
    ],
)
def test_containerd_a_broken_first_file_takes_the_pod_network_down(
    cni_dir: CniDir,
    cni_containerd: Containerd,
    cni_half_written: Any,
    runtimefaults_faults: FaultRegistry,
    mode: str,
    reason: str,
) -> None:
    good = cni_dir.bridge()
    cni_dir.write(good, priority=10)
    assert wait_cri_network(cni_containerd.address, ready_with(good["name"])).ready
    fault = cni_half_written("05-broken.conflist", cni_dir.bridge(), mode=mode, restore=False)
    status = wait_cri_network(cni_containerd.address, lambda s: s.load_failed)
    # containerd names the file and the reason, but the whole pod network is
    # down although 10-*.conflist is whole: per-file recovery it is not.
    assert (status.ready, status.networks) == (False, ())
    assert f"failed to load CNI config list file {fault.path}" in status.last_load
    assert reason in status.last_load
    assert "cni plugin not initialized" in status.message
    assert "failed to reload cni configuration after receiving fs change event" in (
        cni_containerd.logs
    )
    runtimefaults_faults.lift_all()  # the broken file goes away: CRI reloads by itself
    assert wait_cri_network(cni_containerd.address, ready_with(good["name"])).ready


def test_containerd_ignores_a_broken_file_sorted_after_its_network(
    cni_dir: CniDir, cni_containerd: Containerd, cni_half_written: Any
) -> None:
    good = cni_dir.bridge()
    cni_dir.write(good, priority=10)
    assert wait_cri_network(cni_containerd.address, ready_with(good["name"])).ready
    cni_half_written("20-broken.conflist", cni_dir.bridge(), mode="truncate")
    assert set(sample(cni_containerd.address, 0.5)) == {(True, ("bridge",))}


def test_containerd_takes_a_wrong_version_file_as_its_pod_network(
    cni_dir: CniDir, cni_containerd: Containerd, cni_half_written: Any, record_property: Any
) -> None:
    # containerd 1.6/1.7's loader does not check cniVersion: the broken network
    # becomes the default and NetworkReady stays true (only a pod's ADD would
    # fail).  containerd 2 asks the plugins for STATUS, which the version
    # refuses: network not ready, with the plugins' words.  Which one this
    # containerd does is the table's (expectations, "cni:wrong-version-config").
    good = cni_dir.bridge()
    cni_dir.write(good, priority=10)
    assert wait_cri_network(cni_containerd.address, ready_with(good["name"])).ready
    bad = cni_dir.bridge()
    cni_half_written("05-bad.conflist", bad, mode="wrong-version")

    def taken(s: Any) -> bool:
        return bool(ready_with(bad["name"])(s))

    def refused(s: Any) -> bool:
        return not s.ready and "does not allow STATUS" in s.message

    status = wait_cri_network(cni_containerd.address, lambda s: taken(s) or refused(s))
    if taken(status):
        observed = ex.Outcome.MISBEHAVES
    elif refused(status):
        observed = ex.Outcome.FAILS_CLEANLY
    else:
        pytest.fail(f"neither taken nor refused: {status}")
    verdict = judged(
        record_property, "containerd", "cni:wrong-version-config", observed, f"status {status}"
    )
    assert verdict.ok, verdict.message


def test_containerd_held_half_written_file_until_released(
    cni_dir: CniDir, cni_containerd: Containerd, cni_held_half_written: Any
) -> None:
    conf = cni_dir.bridge()
    held = cni_held_half_written(cni_dir.filename(conf), conf)
    status = wait_cri_network(cni_containerd.address, lambda s: "unexpected end" in s.last_load)
    assert not status.ready
    assert str(held.path) in status.last_load
    held.release()
    assert wait_cri_network(cni_containerd.address, ready_with(conf["name"])).ready


def test_containerd_macvlan_stays_macvlan_under_the_racing_writer(
    cni_dir: CniDir,
    cni_sandbox: CniSandbox,
    cni_containerd: Containerd,
    cni_racing_writer: Any,
    runtimefaults_faults: FaultRegistry,
) -> None:
    mac = cni_dir.macvlan(cni_sandbox.master_link())
    writer = cni_racing_writer({"10-mac.conflist": mac, "20-bridge.conflist": cni_dir.bridge()})
    seen = sample(cni_containerd.address, 1.5)
    assert writer.rounds > 0
    # In-place rewrites leave the file torn, never absent: CRI goes NotReady at
    # times but never takes the bridge file instead.
    # Transient states (not ready with macvlan loaded, ready with nothing listed yet)
    # are containerd's own business; the incident is the bridge showing up.
    assert not [types for _, types in seen if "bridge" in types], seen
    assert seen[(True, ("macvlan",))] > 0, seen
    runtimefaults_faults.lift_all()
    status = wait_cri_network(cni_containerd.address, lambda s: s.ready)
    assert status.plugin_types == ("macvlan",)


def test_containerd_delete_and_recreate_brings_macvlan_up_as_bridge(
    cni_dir: CniDir,
    cni_sandbox: CniSandbox,
    cni_containerd: Containerd,
    cni_delete_recreate: Any,
    runtimefaults_faults: FaultRegistry,
) -> None:
    # The incident's "macvlan network brought up as a bridge", for real: while
    # 10-mac.conflist is absent, CRI's reload takes the next file as the pod
    # network.  A pod created in that moment gets the wrong plugin type.
    mac = cni_dir.macvlan(cni_sandbox.master_link())
    cni_dir.write(cni_dir.bridge(), "20-bridge.conflist")
    flap = cni_delete_recreate("10-mac.conflist", mac, gap=0.02, period=(0.005, 0.02))
    seen: Counter[tuple[bool, tuple[str, ...]]] = Counter()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (True, ("bridge",)) not in seen:
        seen.update(sample(cni_containerd.address, 0.2))
    assert flap.count > 0
    assert (True, ("bridge",)) in seen, seen
    runtimefaults_faults.lift_all()
    status = wait_cri_network(cni_containerd.address, lambda s: s.plugin_types == ("macvlan",))
    assert isinstance(status, CriNetworkStatus)
    assert status.ready


# --- real pods (RunPodSandbox: CNI ADD; StopPodSandbox: CNI DEL) -------------------


@pytest.mark.needs("container-cgroups")
def test_containerd_pod_gets_the_network_then_frees_it(
    cni_dir: CniDir, cni_cri_pods: CriPods, cni_containerd: Containerd
) -> None:
    conf = cni_dir.bridge()
    cni_dir.write(conf)
    assert wait_cri_network(cni_containerd.address, ready_with(conf["name"])).ready
    pod = cni_cri_pods.run()
    assert pod.ip.startswith(str(conf["plugins"][0]["ipam"]["subnet"]).rsplit(".", 1)[0])
    assert link_kind(pod.netns_path, "eth0") == "veth"
    assert len(snapshot_ipam(cni_dir.ipam_dir)) == 1
    cni_cri_pods.remove(pod.id)
    assert snapshot_ipam(cni_dir.ipam_dir) == set()


def test_containerd_pod_fails_without_naming_the_broken_file(
    request: pytest.FixtureRequest,
    record_property: Any,
    cni_dir: CniDir,
    cni_cri_pods: CriPods,
    cni_containerd: Containerd,
    cni_half_written: Any,
    runtimefaults_faults: FaultRegistry,
) -> None:
    import grpc

    good = cni_dir.bridge()
    cni_dir.write(good, priority=10)
    assert wait_cri_network(cni_containerd.address, ready_with(good["name"])).ready
    fault = cni_half_written("05-broken.conflist", cni_dir.bridge(), restore=False)
    wait_cri_network(cni_containerd.address, lambda s: s.load_failed)
    with pytest.raises(grpc.RpcError) as info:
        cni_cri_pods.run()
    details = info.value.details()  # type: ignore[attr-defined]
    assert "failed to setup network for sandbox" in details
    assert "cni plugin not initialized" in details
    assert fault.path.name not in details  # the pod's error does not say which file
    # Is the failed sandbox kept (NotReady, with its namespace, until removed)?
    # containerd 1.6/1.7 keep it, 2.1 does not: the table says which is known.
    listed = cni_cri_pods.list_ids()
    netns_left = runtimefaults_faults.leak_checks["netns:cri"].leaked()
    observed = ex.Outcome.LEAKS if listed or netns_left else ex.Outcome.FAILS_CLEANLY
    verdict = judged(
        record_property,
        "containerd",
        "cni:broken-config-at-pod-start",
        observed,
        f"sandboxes listed {listed}, namespaces left {sorted(netns_left)}",
    )
    assert verdict.ok, verdict.message
    assert len(listed) == len(netns_left)  # a kept sandbox keeps exactly its namespace
    cni_cri_pods.remove_all()
    assert runtimefaults_faults.leak_checks["netns:cri"].leaked() == set()
    runtimefaults_faults.lift_all()
    assert wait_cri_network(cni_containerd.address, ready_with(good["name"])).ready
    # A pod that comes up runs a container: containerd 2 writes cpu.weight for it.
    caps.require_container_controllers(request)
    pod = cni_cri_pods.run()
    assert link_kind(pod.netns_path, "eth0") == "veth"


@pytest.mark.needs("container-cgroups")
def test_containerd_pods_come_up_as_bridge_while_the_macvlan_file_is_recreated(
    cni_dir: CniDir,
    cni_sandbox: CniSandbox,
    cni_cri_pods: CriPods,
    cni_containerd: Containerd,
    cni_delete_recreate: Any,
) -> None:
    mac = cni_dir.macvlan(cni_sandbox.master_link())
    cni_dir.write(cni_dir.bridge(), "20-bridge.conflist")
    cni_dir.write(mac, "10-mac.conflist")
    assert wait_cri_network(cni_containerd.address, lambda s: s.plugin_types == ("macvlan",))
    cni_delete_recreate("10-mac.conflist", mac, gap=0.02, period=(0.005, 0.02))
    kinds: Counter[str | None] = Counter()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and sum(kinds.values()) < 30 and not kinds["veth"]:
        pod = cni_cri_pods.run()
        kinds[link_kind(pod.netns_path, "eth0")] += 1
    # The incident, with real pods: the macvlan network's pods get a veth on
    # the bridge network while its file is briefly absent.
    assert kinds["veth"] >= 1, kinds


@pytest.mark.needs("container-cgroups")
def test_containerd_del_after_the_default_network_changed_leaks_the_reservation(
    cni_dir: CniDir,
    cni_sandbox: CniSandbox,
    cni_cri_pods: CriPods,
    cni_containerd: Containerd,
    runtimefaults_faults: FaultRegistry,
) -> None:
    mac = cni_dir.macvlan(cni_sandbox.master_link())
    cni_dir.write(cni_dir.bridge(), "20-bridge.conflist")
    cni_dir.write(mac, "10-mac.conflist")
    assert wait_cri_network(cni_containerd.address, lambda s: s.plugin_types == ("macvlan",))
    pod = cni_cri_pods.run()
    assert link_kind(pod.netns_path, "eth0") == "macvlan"
    cni_dir.remove("10-mac.conflist")  # the pod's network file vanishes while it runs
    assert wait_cri_network(cni_containerd.address, lambda s: s.plugin_types == ("bridge",))
    cni_cri_pods.remove(pod.id)  # DEL goes to the bridge network, not the pod's
    leaked = runtimefaults_faults.leak_checks["ipam:cni"].leaked()
    assert leaked == {f"ipam:{mac['name']}/{pod.ip}={pod.id}"}


@pytest.mark.needs("container-cgroups")
def test_containerd_ten_concurrent_pods_get_distinct_addresses(
    cni_dir: CniDir, cni_cri_pods: CriPods, cni_containerd: Containerd
) -> None:
    conf = cni_dir.bridge()
    cni_dir.write(conf)
    assert wait_cri_network(cni_containerd.address, ready_with(conf["name"])).ready
    with ThreadPoolExecutor(10) as pool:
        pods = list(pool.map(lambda i: cni_cri_pods.run(f"rfpar{i}"), range(10)))
    assert len({p.ip for p in pods}) == 10
    assert len(snapshot_ipam(cni_dir.ipam_dir)) == 10
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda p: cni_cri_pods.remove(p.id), pods))
    assert snapshot_ipam(cni_dir.ipam_dir) == set()
