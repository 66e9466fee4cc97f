"""Twenty containers join one bridge network at once: twenty addresses, all freed."""

import pytest

from pytest_runtimefaults.netns import snapshot_ipam


@pytest.mark.recovers(within=5, leaks=["netns", "links", "ipam"])
def test_twenty_concurrent_adds(cni_dir, cni_parallel_adds):
    ops = cni_parallel_adds(cni_dir.bridge(), n=20)
    ops.add_all()
    assert len(set(ops.addresses())) == 20
    assert ops.delete_all() == [None] * 20
    assert snapshot_ipam(cni_dir.ipam_dir) == set()
