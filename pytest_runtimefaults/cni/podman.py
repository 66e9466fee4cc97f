"""podman with the CNI backend on a private CNI directory, in private storage.

Example::

    with CniDir() as cni, CniSandbox() as sb, CniPodman(cni, sb) as podman:
        cni.write(cni.bridge("net1"))
        print(podman.run("net1", "ip", "-4", "addr").stdout)
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_runtimefaults import naming
from pytest_runtimefaults.cni.busybox import busybox_rootfs
from pytest_runtimefaults.cni.cgroups import kill_cgroup_tree
from pytest_runtimefaults.cni.namespaces import private_state_argv
from pytest_runtimefaults.containerd import cleanup_containerd_dir
from pytest_runtimefaults.core.log import logger, swallowed

if TYPE_CHECKING:
    from pytest_runtimefaults.cni.config import CniDir
    from pytest_runtimefaults.journal import Journal
    from pytest_runtimefaults.netns import CniSandbox

__all__ = ["CniPodman", "podman_major", "podman_network_argv", "private_podman_argv"]


class CniPodman:
    """podman with the CNI backend on a :class:`CniDir`, in private storage.

    Every call runs ``podman --root/--runroot/--tmpdir`` under a private temp
    dir, ``--network-config-dir`` = ``cni.conf_dir``, inside the sandbox's
    host namespace (so the bridges it makes never reach the machine's root
    namespace).  Containers run from a busybox rootfs (``--rootfs``): no image,
    no registry.  ``stop()`` ends what podman left (conmon, mounts) and
    removes the directory.

    Example::

        with CniDir() as cni, CniSandbox() as sb, CniPodman(cni, sb) as podman:
            cni.write(cni.bridge("net1"))
            print(podman.run("net1", "ip", "-4", "addr").stdout)
    """

    # podman needs both raised: root here lacks CAP_SYS_RESOURCE (HOST.md).
    ULIMITS = ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768")

    def __init__(
        self,
        cni: CniDir,
        sandbox: CniSandbox,
        *,
        binary: str = "podman",
        runtime: str = "runc",
        journal: Journal | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.cni = cni
        self.sandbox = sandbox
        self.binary = binary
        self.runtime = runtime
        self.journal = journal if journal is not None else _default_journal()
        self.timeout = timeout
        self.directory = Path("/nonexistent")
        #: every container's cgroup goes under this unique parent (removed on stop)
        self.cgroup_parent = "/" + naming.unique_name("rfpodcg", maxlen=40)
        self._rid: int | None = None
        self._cg_rid: int | None = None
        self._started = False

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs"

    def start(self) -> CniPodman:
        if self._started:
            return self
        self.directory = Path(tempfile.mkdtemp(prefix="rfpod-"))
        if self.journal is not None:
            # The containerd kind ends processes naming the dir, unmounts, removes.
            self._rid = self.journal.add("containerd", dir=str(self.directory))
        if self.journal is not None:
            self._cg_rid = self.journal.add("cgroup-tree", parent=self.cgroup_parent)
        for sub in ("root", "runroot", "tmp"):
            (self.directory / sub).mkdir()
        busybox_rootfs(self.rootfs)
        self._started = True
        return self

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        # Best effort: what podman cannot remove, the directory cleanup below ends.
        with swallowed(Exception, "podman rm --all in %s", self.directory):
            done = self.podman("rm", "--all", "--force", timeout=30)
            if done.returncode != 0:
                logger.debug(
                    "podman rm --all in %s: rc %d: %s",
                    self.directory,
                    done.returncode,
                    done.stderr.strip(),
                )
        cleanup_containerd_dir(str(self.directory))
        kill_cgroup_tree(self.cgroup_parent)
        if self.journal is not None:
            for rid in (self._rid, self._cg_rid):
                if rid is not None:
                    self.journal.release(rid)
            self._rid = self._cg_rid = None

    def __enter__(self) -> CniPodman:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def argv(self, *args: str) -> list[str]:
        return [
            *private_state_argv(self.sandbox.host.path),
            *private_podman_argv(
                self.binary, self.directory, self.cni.conf_dir, backend="cni", runtime=self.runtime
            ),
            *args,
        ]

    def podman(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``podman args...``; returns the CompletedProcess (text), never raises on rc."""
        return subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            timeout=timeout or self.timeout,
            check=False,
        )

    def run(self, network: str, *command: str) -> subprocess.CompletedProcess[str]:
        """``podman run --rm --network NETWORK --rootfs ROOTFS command...``."""
        return self.podman(
            "run",
            "--rm",
            *self.ULIMITS,
            "--cgroup-parent",
            self.cgroup_parent,
            "--network",
            network,
            "--rootfs",
            str(self.rootfs),
            *command,
        )


def _default_journal() -> Journal:
    """The default journal (``runtimefaults cleanup`` reads it): classes journal
    what they create even when no fixture handed them one."""
    from pytest_runtimefaults.journal import Journal

    return Journal.default()


def podman_major(binary: str = "podman") -> int | None:
    """podman's major version (``podman --version``), or None if it cannot be read."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError:
        return None
    match = re.search(r"(\d+)\.\d+", out)
    return int(match.group(1)) if match else None


def podman_network_argv(config_dir: Path | str, binary: str = "podman") -> list[str]:
    """Global podman flags that keep its network state off the host.

    A private ``--network-config-dir``; on podman 4, also ``--network-backend
    cni``: with netavark installed, podman 4 picks netavark for a fresh storage
    and then writes ``/etc/containers/networks/netavark.lock`` and
    ``/run/containers/networks`` on the host even for ``--network=none``.
    podman 5 has only netavark (its run directory cannot be moved: run it in
    a private mount namespace, as :class:`~pytest_runtimefaults.cni.netavark.NetavarkPodman`
    does, when that matters).
    """
    argv = ["--network-config-dir", str(config_dir)]
    major = podman_major(binary)
    if major is not None and major < 5:
        argv += ["--network-backend", "cni"]
    return argv


def private_podman_argv(
    binary: str,
    directory: Path,
    config_dir: Path,
    *,
    backend: str,
    runtime: str,
    events: str = "none",
) -> list[str]:
    """``podman`` and the global flags that keep everything it writes private.

    Storage, run root and tmpdir under *directory* (``root``, ``runroot``,
    ``tmp``), network configs in *config_dir* read by *backend*, the cgroupfs
    manager, the *runtime*, and the vfs storage driver (no overlay mounts to
    leak).  The harnesses of both network backends share it.
    """
    return [
        binary,
        *("--root", str(directory / "root"), "--runroot", str(directory / "runroot")),
        *("--tmpdir", str(directory / "tmp")),
        *("--network-config-dir", str(config_dir), "--network-backend", backend),
        *("--cgroup-manager", "cgroupfs", "--runtime", runtime),
        *("--events-backend", events, "--storage-driver", "vfs"),
    ]
