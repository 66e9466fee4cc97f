"""The busybox rootfs, OCI bundles and the OCI image tar (imported by a real containerd)."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest

from pytest_runtimefaults.rootfs import (
    build_bundle,
    build_image_tar,
    build_rootfs,
    bundle_config,
)

pytestmark = [
    pytest.mark.needs("busybox-static"),
    pytest.mark.timeout(60),
]


def test_rootfs_has_busybox_and_its_applets(tmp_path: Path) -> None:
    root = build_rootfs(tmp_path / "rootfs")
    assert (root / "bin" / "busybox").stat().st_size > 100_000
    for applet in ("sh", "true", "sleep", "echo", "cat"):
        assert os.readlink(root / "bin" / applet) == "busybox"
    assert (root / "tmp").stat().st_mode & 0o1777 == 0o1777
    assert (root / "etc" / "passwd").read_text().startswith("root:")


def test_bundle_config_is_an_oci_config(tmp_path: Path) -> None:
    rootfs = build_rootfs(tmp_path / "shared")
    bundle = build_bundle(tmp_path / "b", ["/bin/echo", "hi"], rootfs=rootfs, network=True)
    config = json.loads((bundle / "config.json").read_text())
    assert config["ociVersion"].startswith("1.0")
    assert config["process"]["args"] == ["/bin/echo", "hi"]
    assert config["root"]["path"] == str(rootfs.resolve())
    assert {"type": "network"} in config["linux"]["namespaces"]
    assert "cgroupsPath" not in config["linux"]
    with_path = bundle_config(cgroups_path="system.slice:rf:x")
    assert with_path["linux"]["cgroupsPath"] == "system.slice:rf:x"
    own = build_bundle(tmp_path / "own")
    assert (own / "rootfs" / "bin" / "busybox").exists()
    assert json.loads((own / "config.json").read_text())["root"]["path"] == "rootfs"


def test_image_tar_is_a_valid_oci_layout_with_stable_digests(tmp_path: Path) -> None:
    rootfs = build_rootfs(tmp_path / "rootfs")
    one = build_image_tar(rootfs, tmp_path / "one.tar")
    two = build_image_tar(rootfs, tmp_path / "two.tar")
    assert one.read_bytes() == two.read_bytes()
    with tarfile.open(one) as tar:
        names = tar.getnames()
        assert "oci-layout" in names
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        manifest_desc = index["manifests"][0]
        assert manifest_desc["annotations"]["io.containerd.image.name"] == (
            "localhost/runtimefaults/busybox:latest"
        )
        blobs = {n.rsplit("/", 1)[1]: tar.extractfile(n).read() for n in names if "blobs/" in n}  # type: ignore[union-attr]
        for digest, data in blobs.items():
            assert hashlib.sha256(data).hexdigest() == digest
        manifest = json.loads(blobs[manifest_desc["digest"].split(":")[1]])
        assert manifest["layers"][0]["digest"].split(":")[1] in blobs


@pytest.mark.needs("container-cgroups")
@pytest.mark.needs("containerd")
def test_ctr_imports_the_image_and_runs_it(tmp_path: Path) -> None:
    from pytest_runtimefaults.containerd import Containerd

    rootfs = build_rootfs(tmp_path / "rootfs")
    tar = build_image_tar(rootfs, tmp_path / "busybox.tar")
    with Containerd() as ctd:
        imported = ctd.ctr("image", "import", str(tar))
        assert "localhost/runtimefaults/busybox:latest" in ctd.ctr("image", "ls", "-q").stdout, (
            imported.stdout
        )
        out = ctd.ctr(
            "run", "--rm", "localhost/runtimefaults/busybox:latest", "rf-img", "/bin/echo", "ok"
        )
        assert out.stdout.strip() == "ok"
