"""The CNI scenarios' judge (incident 4) comes out differently with what the pods get.

With whole config files, the scenario's own pod runs against containerd's
CRI survive; each way a pod can go wrong (the wrong plugin type, an error
naming no file, a reservation left, a call that never returned, no pod once
the files are whole) gives its own verdict.  What containerd does under
each fault is the scenario's verdict (``runtimefaults scenarios --only cni``).
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_runtimefaults.containerd import Containerd
from pytest_runtimefaults.expectations import Outcome
from pytest_runtimefaults.faults import FaultRegistry
from pytest_runtimefaults.scenarios.test_incident4_cni import PodRuns, _link_kind, finish

pytestmark = pytest.mark.timeout(60)


@pytest.mark.needs(
    "root", "containerd", "cni-plugins", "busybox-static", "runc", "container-cgroups"
)
def test_whole_configs_survive(
    cni_dir: Any,
    cni_sandbox: Any,
    cni_containerd: Containerd,
    cni_cri_pods: Any,
    runtimefaults_faults: FaultRegistry,
) -> None:
    from pytest_runtimefaults.cni import wait_cri_network

    mac = cni_dir.macvlan(cni_sandbox.master_link())
    cni_dir.write(cni_dir.bridge(), "20-bridge.conflist")
    cni_dir.write(mac, "10-mac.conflist")
    assert wait_cri_network(cni_containerd.address, lambda s: s.plugin_types == ("macvlan",))
    runs = PodRuns(wanted="macvlan")
    for _ in range(2):
        runs.run(cni_cri_pods, _link_kind)
    finish(runs, cni_cri_pods, runtimefaults_faults, cni_containerd, _link_kind)
    outcome, evidence = runs.outcome()
    assert outcome is Outcome.SURVIVES, evidence
    assert runs.kinds == ["macvlan", "macvlan"]


@pytest.mark.parametrize(
    ("runs", "outcome"),
    [
        (PodRuns("macvlan", kinds=["macvlan", "veth"]), Outcome.MISBEHAVES),
        (PodRuns("veth", errors=["cni plugin not initialized"]), Outcome.MISBEHAVES),
        (
            PodRuns("veth", errors=["cni plugin not initialized"], file_named=True),
            Outcome.FAILS_CLEANLY,
        ),
        (PodRuns("veth", kinds=["veth"], leftovers=["ipam:n/10.0.0.2=x"]), Outcome.LEAKS),
        (PodRuns("veth", blocked=["deadline exceeded"]), Outcome.BLOCKS),
        (PodRuns("veth", kinds=["veth"], after="the next pod failed: x"), Outcome.MISBEHAVES),
        (PodRuns("veth", kinds=["veth", "veth"]), Outcome.SURVIVES),
    ],
)
def test_each_way_a_pod_goes_wrong_has_its_verdict(runs: PodRuns, outcome: Outcome) -> None:
    got, evidence = runs.outcome()
    assert got is outcome, evidence
