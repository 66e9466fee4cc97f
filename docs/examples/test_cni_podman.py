"""podman names a half-written network file and carries on with the others."""


def test_podman_skips_the_broken_file(cni_dir, cni_podman, cni_half_written):
    good = cni_dir.bridge()
    cni_dir.write(good, priority=20)
    broken = cni_half_written("10-broken.conflist", cni_dir.bridge(), mode="truncate")

    result = cni_podman.run(good["name"], "true")

    assert result.returncode == 0, result.stderr
    assert f"Error loading CNI config file {broken.path}" in result.stderr
