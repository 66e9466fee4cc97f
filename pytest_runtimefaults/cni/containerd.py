"""A private containerd whose CRI plugin loads a private CNI directory.

Example::

    with CniDir() as cni, CniSandbox() as sandbox:
        ctd = containerd_in_sandbox(cni, sandbox)
        try:
            print(cri_network_status(ctd.address).ready)
        finally:
            ctd.stop()
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_runtimefaults.cni.namespaces import private_state_argv

if TYPE_CHECKING:
    from pytest_runtimefaults.cni.config import CniDir
    from pytest_runtimefaults.containerd import Containerd
    from pytest_runtimefaults.faults import FaultRegistry
    from pytest_runtimefaults.journal import Journal
    from pytest_runtimefaults.netns import CniSandbox

__all__ = ["PAUSE_IMAGE", "containerd_in_sandbox"]

#: the pods' sandbox image, imported into each private containerd
PAUSE_IMAGE = "localhost/runtimefaults/pause:latest"


def containerd_in_sandbox(
    cni: CniDir,
    sandbox: CniSandbox,
    *,
    journal: Journal | None = None,
    registry: FaultRegistry | None = None,
    enter: Sequence[str] = (),
) -> Containerd:
    """A private containerd with CRI on *cni*'s conf dir, running inside *sandbox*.

    The CRI plugin runs the CNI plugins from containerd's own network
    namespace, so containerd runs in the sandbox's (``netns=``), and through
    :func:`private_state_argv` (a two-line wrapper script, inside the
    instance's own mount namespace): pod bridges and veths stay in the sandbox,
    libcni's result cache and the pods' namespace mounts in containerd's own
    mount namespace (reach them with ``CriPods(address, mount_pid=ctd.pid)``).
    Its ``sandbox_image`` is a busybox-static image (``sleep``) imported
    into the private store, so pods need no registry.  *enter* is an argv
    run before the private mount namespace is made, inside the network
    namespace: ``InotifyInstancesHeld.argv`` starts containerd as root of
    that fault's user namespace (whose mount namespace it then makes).  Returns a started
    :class:`~pytest_runtimefaults.containerd.Containerd`; :func:`CriPods`
    talks to it.
    """
    from pytest_runtimefaults.containerd import Containerd

    ctd = Containerd(
        binary=str(_wrapper(cni, sandbox, enter)),
        cri=True,
        cni_conf_dir=cni.conf_dir,
        cni_bin_dir=cni.plugin_dir,
        namespace="k8s.io",
        netns=sandbox.host.path,
        log_level="info",
        # restrict_oom_score_adj: the sandbox's -998 needs CAP_SYS_RESOURCE,
        # which root lacks on this kind of host (runc init dies otherwise).
        cri_config=(
            f'enable_cdi = false\nrestrict_oom_score_adj = true\nsandbox_image = "{PAUSE_IMAGE}"'
        ),
        journal=journal,
        registry=registry,
    )
    try:
        ctd.start()
        _import_pause_image(ctd)
    except BaseException:
        ctd.stop()
        raise
    return ctd


def _wrapper(cni: CniDir, sandbox: CniSandbox, enter: Sequence[str] = ()) -> Path:
    """``containerd "$@"`` behind :func:`private_state_argv`, as a script (the
    daemon harness runs one binary, and watches its PID: containerd's own)."""
    wrapper = cni.root / f"containerd-in-{sandbox.host.name}"
    # The network namespace is entered before the wrapper (Containerd's netns=):
    # its path is the host's, and containerd's mount namespace hides /run.
    prefix = " ".join(shlex.quote(a) for a in [*enter, *private_state_argv(None)])
    wrapper.write_text(f'#!/bin/sh\nexec {prefix} containerd "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def _import_pause_image(ctd: Containerd) -> None:
    """Build the busybox-static pause image (``sleep``) and import it into *ctd*."""
    from pytest_runtimefaults.rootfs import build_image_tar, build_rootfs

    build_rootfs(ctd.directory / "pause-rootfs")
    tar = build_image_tar(
        ctd.directory / "pause-rootfs",
        ctd.directory / "pause.tar",
        ref=PAUSE_IMAGE,
        cmd=("/bin/sleep", "86400"),
    )
    ctd.ctr("image", "import", str(tar))
