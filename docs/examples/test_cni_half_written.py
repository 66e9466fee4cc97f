"""A half-written config must cost one network, never all of them."""

import pytest

from pytest_runtimefaults.netns import CniError


@pytest.mark.recovers(within=5, probe="cni-configs")
def test_broken_file_is_reported_by_name(cni_dir, cni_sandbox, cni_half_written):
    good = cni_dir.single(cni_dir.bridge())
    cni_dir.write(good, "20-good.conf")
    broken = cni_half_written("10-broken.conf", cni_dir.single(cni_dir.bridge()), mode="truncate")

    ns = cni_sandbox.container()
    errors, up = {}, []
    for i, path in enumerate(cni_dir.files()):  # what your runtime does, per file
        try:
            cni_sandbox.invoke("ADD", path.read_bytes(), ns, plugin="bridge", ifname=f"eth{i}")
            up.append(path.name)
        except CniError as exc:  # the bridge plugin's own error
            errors[str(path)] = exc.msg

    assert up == ["20-good.conf"]
    assert "unexpected end of JSON input" in errors[str(broken.path)]
    cni_sandbox.invoke(
        "DEL", (cni_dir.path("20-good.conf")).read_bytes(), ns, plugin="bridge", ifname="eth1"
    )
    cni_sandbox.remove_container(ns)
