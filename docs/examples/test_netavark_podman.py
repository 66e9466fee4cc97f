"""podman (netavark backend) names a half-written network file and runs on the others."""


def test_podman_netavark_skips_the_broken_file(
    netavark_dir, podman_netavark, netavark_half_written
):
    good = netavark_dir.network()
    netavark_dir.write(good)
    broken = netavark_dir.network()
    fault = netavark_half_written(netavark_dir.filename(broken), broken, mode="truncate")

    result = podman_netavark.run(good["name"], "true")

    assert result.returncode == 0, result.stderr
    # podman logs through logrus, which quotes the path as \"PATH\".
    assert f'Error reading network config file \\"{fault.path}\\"' in result.stderr
    assert "network not found" in podman_netavark.run(broken["name"], "true").stderr
