"""The private containerd component, for real: start, ctr, SIGKILL, restart."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from pytest_runtimefaults.containerd import Containerd, CtrError, _alive
from pytest_runtimefaults.daemon import connect_error
from pytest_runtimefaults.journal import Journal

pytestmark = pytest.mark.timeout(60)


def test_private_containerd_serves_and_restarts_over_its_stale_socket(
    containerd: Containerd,
) -> None:
    assert containerd.address.startswith(str(containerd.directory))
    assert "Server:" in containerd.ctr("version").stdout
    containerd.ctr("namespaces", "create", "rf-before")
    containerd.kill()
    assert os.path.exists(containerd.address)
    assert connect_error(containerd.address) == "ECONNREFUSED"
    with pytest.raises(CtrError, match="connection refused"):
        containerd.ctr("version")
    took = containerd.daemon.start()
    assert took is not None
    assert "rf-before" in containerd.ctr("namespaces", "ls").stdout
    assert 0 < containerd.crash_restart() < 10
    assert containerd.fatal_errors() == []


def test_directory_and_journal_are_cleaned(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    with Containerd(journal=journal) as ctd:
        directory = ctd.directory
        kinds = sorted(r["kind"] for r in journal.live())
        assert kinds == ["containerd", "daemon"]
        assert (directory / "config.toml").read_text().startswith("version = 2")
    assert not directory.exists()
    assert journal.live() == []


@pytest.mark.parametrize(
    "containerd",
    [{"cri": True, "cri_config": "enable_cdi = false", "log_level": "info"}],
    indirect=True,
)
def test_cri_plugin_with_private_cni_conf_dir(containerd: Containerd) -> None:
    text = containerd.config_path.read_text()
    assert f'conf_dir = "{containerd.cni_conf_dir}"' in text
    assert containerd.cni_conf_dir.is_dir()
    plugins = containerd.ctr("plugins", "ls").stdout
    cri = [line.split() for line in plugins.splitlines() if " cri " in line]
    assert cri, plugins
    assert cri[0][0] == "io.containerd.grpc.v1"
    assert cri[0][-1] == "ok"


def test_extra_config_is_appended() -> None:
    extra = '[plugins."io.containerd.gc.v1.scheduler"]\n  pause_threshold = 0.03'
    ctd = Containerd(extra_config=extra)
    try:
        assert ctd.config_text().rstrip().endswith("pause_threshold = 0.03")
        ctd.start()
        assert ctd.running
    finally:
        ctd.stop()


def test_ctr_failure_names_stderr(containerd: Containerd) -> None:
    with pytest.raises(CtrError, match="not found"):
        containerd.ctr("containers", "info", "no-such-container")
    result = containerd.ctr("containers", "info", "no-such-container", check=False)
    assert result.returncode != 0
    assert isinstance(result, subprocess.CompletedProcess)


@pytest.mark.needs("container-cgroups")
def test_stop_leaves_nothing_on_the_host_after_a_crash_with_a_running_container() -> None:
    ctd = Containerd()
    try:
        ctd.start()
        image = ctd.import_busybox()
        ctd.run(image, "left", "sleep", "600", detach=True)
        shims = ctd.shim_pids()
        assert shims
        with open("/proc/self/mountinfo") as f:
            assert str(ctd.directory) in f.read()  # the container's rootfs
        ctd.kill()  # containerd gone, its shim and container live on
        assert all(os.path.exists(f"/proc/{pid}") for pid in shims)
    finally:
        ctd.stop()
    assert not ctd.directory.exists()
    assert not any(_alive(pid) for pid in shims)
    with open("/proc/self/mountinfo") as f:
        assert str(ctd.directory) not in f.read()
    cgroups = [p for p in Path("/sys/fs/cgroup").glob(f"*/{ctd.namespace}")]
    assert cgroups == []


def test_a_go_crash_dump_is_a_fatal_error(containerd: Containerd) -> None:
    assert containerd.fatal_errors() == []
    assert containerd.kill(signal.SIGABRT) == 2  # the Go runtime dumps and exits 2
    assert containerd.fatal_errors() == ["SIGABRT: abort"]


@pytest.mark.needs("container-cgroups")
def test_a_refused_namespace_bind_keeps_run_private_through_a_holder(tmp_path: Path) -> None:
    """Where the kernel refuses to bind the namespace file (here for a known
    reason: its directory is a shared mount, so the bind would propagate into
    the namespace itself), a holder process keeps the namespace instead, and
    containerd's shims still leave nothing in the host's /run/containerd."""
    directory = tmp_path / "ctd"
    nsdir = directory / "ns"
    nsdir.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(nsdir), str(nsdir)], check=True)
    subprocess.run(["mount", "--make-shared", str(nsdir)], check=True)
    host_run = Path("/run/containerd")
    before = sorted(p.name for p in host_run.iterdir()) if host_run.is_dir() else None
    ctd = Containerd(directory=directory)
    try:
        ctd.start()
        assert ctd.private_run
        assert ctd.mount_ns_path.startswith("/proc/"), ctd.mount_ns_path
        holder = int(ctd.mount_ns_path.split("/")[2])
        assert os.stat(ctd.mount_ns_path).st_ino != os.stat("/proc/self/ns/mnt").st_ino
        image = ctd.import_busybox()
        ctd.run(image, "held", "sleep", "600", detach=True)
        assert list(ctd.shim_socket_dir.iterdir())  # the shim's socket, in our run_dir
        after = sorted(p.name for p in host_run.iterdir()) if host_run.is_dir() else None
        assert after == before
        ctd.kill()
        assert ctd.restart() < 10  # the same namespace, through the holder
        assert "held" in ctd.ctr("containers", "ls", "-q").stdout
    finally:
        ctd.stop()
        subprocess.run(["umount", "-l", str(nsdir)], check=False)
    assert not _alive(holder)
    with open("/proc/self/mountinfo") as f:
        assert str(directory) not in f.read()
