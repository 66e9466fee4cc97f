"""``podman events`` (file events backend) under the swarm, with podman's container lifecycles."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_runtimefaults import caps
from pytest_runtimefaults.cni import busybox_rootfs, kill_cgroup_tree
from pytest_runtimefaults.cni.podman import podman_major, podman_network_argv
from pytest_runtimefaults.containerd import cleanup_containerd_dir
from pytest_runtimefaults.journal import Journal
from pytest_runtimefaults.naming import unique_name
from pytest_runtimefaults.subscribers import Churn
from pytest_runtimefaults.transports.command import CommandTransport


@pytest.fixture
def podman_argv(
    request: pytest.FixtureRequest, runtimefaults_journal: Journal
) -> Iterator[Callable[..., list[str]]]:
    """podman in private storage, events in a file under its private tmpdir."""
    caps.require_root(request, "podman with private storage and cgroups")
    caps.require_command(request, "podman", package="podman")
    directory = Path(tempfile.mkdtemp(prefix="rfpodev-"))
    # Reaped like a private containerd dir: processes naming it, mounts, the dir.
    rid = runtimefaults_journal.add("containerd", dir=str(directory))
    cgroup_parent = "/" + unique_name("rfpodsub", maxlen=40)
    cg_rid = runtimefaults_journal.add("cgroup-tree", parent=cgroup_parent)
    for sub in ("root", "runroot", "tmp", "networks"):
        (directory / sub).mkdir()
    busybox_rootfs(directory / "rootfs")

    # podman 5 has only netavark, whose run directory (/run/containers/networks)
    # cannot be moved: each podman runs in a private mount namespace with its own
    # /run, that directory bound from ours.
    major = podman_major()
    private_run: list[str] = []
    if major is not None and major >= 5:
        (directory / "run-networks").mkdir()
        private_run = [
            "unshare", "--mount", "--propagation", "slave", "sh", "-c",
            "mount -t tmpfs -o mode=0755 rfrun /run && mkdir -p /run/lock /run/containers/networks"
            ' && mount --bind "$0" /run/containers/networks && exec "$@"',
            str(directory / "run-networks"),
        ]  # fmt: skip

    def argv(*args: str) -> list[str]:
        d = directory
        return [
            *private_run,
            "podman",
            *("--root", str(d / "root"), "--runroot", str(d / "runroot")),
            *("--tmpdir", str(d / "tmp"), "--cgroup-manager", "cgroupfs"),
            *("--runtime", "runc", "--events-backend", "file", "--storage-driver", "vfs"),
            *podman_network_argv(d / "networks"),
            *args,
        ]

    argv.rootfs = directory / "rootfs"  # type: ignore[attr-defined]
    argv.cgroup_parent = cgroup_parent  # type: ignore[attr-defined]
    yield argv
    import subprocess

    subprocess.run(argv("rm", "--all", "--force"), capture_output=True, timeout=60, check=False)
    cleanup_containerd_dir(str(directory))
    kill_cgroup_tree(cgroup_parent)
    runtimefaults_journal.release(rid)
    runtimefaults_journal.release(cg_rid)


@pytest.mark.needs("container-cgroups")
@pytest.mark.timeout(120)
def test_podman_events_under_the_swarm(podman_argv, subscribers) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    def run_one() -> None:
        result = subprocess.run(
            podman_argv(
                "run", "--rm", "--network", "none",
                "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768",
                "--cgroup-parent", podman_argv.cgroup_parent,
                "--rootfs", str(podman_argv.rootfs), "/bin/true",
            ),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr

    run_one()  # podman's first use refreshes its state: not part of the swarm
    fmt = "{{.Time}} {{.Type}} {{.Status}} {{.ID}}"
    transport = CommandTransport(podman_argv("events", "--format", fmt), name="podman events")
    # Each subscriber is a `podman events` process, which acknowledges nothing and
    # can take over a second to start on a loaded machine: a wider grace.
    swarm = subscribers(transport, 8, churn=Churn(max_events=12, max_life=2.0, steady=3), grace=5.0)
    swarm.prime(run_one, timeout=60)
    for _ in range(12):
        run_one()
    swarm.drain(timeout=20)
    report = swarm.report()
    print("\npodman events swarm:", report.figures())
    report.assert_ok()
    assert report.cancels > 5
    assert sum(" container died " in k for k in report.reference) >= 12
