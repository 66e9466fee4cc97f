"""Pods through containerd's CRI: ADD on RunPodSandbox, DEL on StopPodSandbox."""

import pytest

from pytest_runtimefaults.cni import wait_cri_network
from pytest_runtimefaults.netns import link_kind


@pytest.mark.recovers(within=10, probe="cri-network-ready", leaks=["netns", "ipam"])
def test_pod_network_comes_and_goes(cni_dir, cni_containerd, cni_cri_pods):
    conf = cni_dir.bridge()
    cni_dir.write(conf)
    assert wait_cri_network(cni_containerd.address, lambda s: s.ready).plugin_types == ("bridge",)

    pod = cni_cri_pods.run()
    assert link_kind(pod.netns_path, "eth0") == "veth"
    cni_cri_pods.remove(pod.id)  # must free the address: the ipam leak check says so
