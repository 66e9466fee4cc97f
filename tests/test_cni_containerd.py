"""containerd 1.6's CRI plugin reloading a CNI conf dir that is half-written,
held, vanishing or racing.

CRI watches ``conf_dir`` with inotify and reloads on every change; with the
default ``max_conf_num = 1`` it uses the first file (in name order) as the
pod network.  What it makes of the directory is read from CRI's own
``RuntimeService/Status`` (verbose): the ``NetworkReady`` condition and the
loaded networks' plugin types.  The results are tabled in docs/cni.md.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from pytest_runtimefaults.cni import CniDir, CriNetworkStatus, cri_network_status, wait_cri_network
from pytest_runtimefaults.containerd import Containerd
from pytest_runtimefaults.faults import FaultRegistry
from pytest_runtimefaults.netns import CniSandbox, own_namespaces, snapshot_links

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.timeout(60),
]


@pytest.fixture(autouse=True)
def host_unchanged() -> Iterator[None]:
    before = (own_namespaces(), snapshot_links(None))
    yield
    deadline = time.monotonic() + 3  # another worker's podman may own a cni-* netns briefly
    while (own_namespaces(), snapshot_links(None)) != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (own_namespaces(), snapshot_links(None)) == before


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
    status = wait_cri_network(cni_containerd.address, lambda s: not s.ready)
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
    cni_dir: CniDir, cni_containerd: Containerd, cni_half_written: Any
) -> None:
    # The loader does not check cniVersion: the broken network becomes the
    # default and NetworkReady stays true; only a pod's ADD would fail.
    good = cni_dir.bridge()
    cni_dir.write(good, priority=10)
    assert wait_cri_network(cni_containerd.address, ready_with(good["name"])).ready
    bad = cni_dir.bridge()
    cni_half_written("05-bad.conflist", bad, mode="wrong-version")
    status = wait_cri_network(cni_containerd.address, ready_with(bad["name"]))
    assert status.ready
    assert [n for n, _ in status.networks] == [bad["name"]]


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
    # In-place rewrites leave the file torn, never absent: CRI goes NotReady
    # at times but never takes the bridge file instead.
    assert set(seen) <= {(True, ("macvlan",)), (False, ())}, seen
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
