"""What containerd's CRI makes of a half-written first file in its conf_dir."""

from pytest_runtimefaults.cni import wait_cri_network


def test_containerd_cri_reload(cni_dir, cni_containerd, cni_half_written, runtimefaults_faults):
    good = cni_dir.bridge()
    cni_dir.write(good, priority=10)
    assert wait_cri_network(cni_containerd.address, lambda s: s.ready).ready

    broken = cni_half_written("05-broken.conflist", cni_dir.bridge(), restore=False)
    status = wait_cri_network(cni_containerd.address, lambda s: s.load_failed)
    assert str(broken.path) in status.last_load  # named, but the whole pod network is down

    runtimefaults_faults.lift_all()  # file removed: CRI reloads on its own
    assert wait_cri_network(cni_containerd.address, lambda s: s.ready).plugin_types == ("bridge",)
