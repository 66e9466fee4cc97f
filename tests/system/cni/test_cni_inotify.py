"""No inotify instance left to the daemon (containerd issues 10468, 10308;
podman issue 10686: ``failed to create fsnotify watcher: too many open files``).

The fault is a user namespace whose own limit (``user.max_inotify_instances``
inside it) is all held by the fixture: the host's sysctl is never written,
and only the few held instances count against the host's root.  containerd
runs inside it as root; the test-only readers of ``tests/helpers/cni_readers.py``
too.  Outcomes per containerd version are in docs/cni.md.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from findings import judged

from pytest_runtimefaults import caps
from pytest_runtimefaults import expectations as ex
from pytest_runtimefaults.cni import CniDir, cri_network_status, wait_cri_network
from pytest_runtimefaults.cni.inotify import InotifyInstancesHeld, inotify_instances
from pytest_runtimefaults.cni.namespaces import private_state_argv
from pytest_runtimefaults.containerd import Containerd
from pytest_runtimefaults.netns import CniSandbox

pytestmark = pytest.mark.timeout(90)

READERS = Path(__file__).resolve().parents[2] / "helpers" / "cni_readers.py"


def ready_with(name: str) -> Any:
    return lambda s: s.ready and [n for n, _ in s.networks] == [name]


def containerd_in(
    held: InotifyInstancesHeld, cni: CniDir, sandbox: CniSandbox, directory: Path
) -> Containerd:
    """A containerd with CRI on *cni*, as root of *held*'s user namespace.

    The sandbox's network namespace is joined first (with the host's
    privileges, by Containerd's own ``nsenter``, with its mount namespace),
    then the user namespace, then a private mount namespace, which is the
    user namespace's own (so containerd may mount in it).
    """
    argv = [*held.argv, *private_state_argv(None)]  # nsenter --user, unshare --mount
    wrapper = directory / "containerd-in-userns"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.join(argv)} containerd "$@"\n')
    wrapper.chmod(0o755)
    return Containerd(
        binary=str(wrapper),
        cri=True,
        cni_conf_dir=cni.conf_dir,
        cni_bin_dir=cni.plugin_dir,
        namespace="k8s.io",
        netns=sandbox.host.path,
        log_level="info",
        cri_config="enable_cdi = false\nrestrict_oom_score_adj = true",
    )


def test_the_fault_exhausts_its_namespace_only(inotify_exhausted: Any) -> None:
    probe = (
        "import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
        "fd = libc.inotify_init1(0); print(fd, os.strerror(ctypes.get_errno()))"
    )
    held = inotify_exhausted(limit=3)
    assert held.held == inotify_instances(held.pid) == 3
    inside = subprocess.run(
        [*held.argv, sys.executable, "-c", probe], capture_output=True, text=True
    )
    assert inside.stdout.split(None, 1) == ["-1", "Too many open files\n"], inside
    outside = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert int(outside.stdout.split()[0]) >= 0, outside  # the host's root is not starved
    held.release()
    assert inotify_instances(held.pid) == 0
    again = subprocess.run(
        [*held.argv, sys.executable, "-c", probe], capture_output=True, text=True
    )
    assert int(again.stdout.split()[0]) >= 0, again


def test_containerd_without_an_inotify_instance(
    request: pytest.FixtureRequest,
    cni_dir: CniDir,
    cni_sandbox: CniSandbox,
    inotify_exhausted: Any,
    tmp_path: Path,
    record_property: Any,
) -> None:
    import grpc

    caps.require_command(request, "containerd", package="containerd")
    conf = cni_dir.bridge()
    cni_dir.write(conf)
    held = inotify_exhausted(limit=4)
    ctd = containerd_in(held, cni_dir, cni_sandbox, tmp_path)
    try:
        ctd.start()
        status: Any = None
        try:
            status = cri_network_status(ctd.address)
        except grpc.RpcError as exc:
            status = f"{exc.code()}: {exc.details()}"  # type: ignore[attr-defined]
        said = [line for line in ctd.logs.splitlines() if "too many open files" in line]
        cri_up = not isinstance(status, str)
        if cri_up and ready_with(conf["name"])(status):
            observed = ex.Outcome.SURVIVES
        elif not ctd.running and said:
            observed = ex.Outcome.FAILS_CLEANLY  # refused to run, saying why
        else:
            # Running and healthy to every other client, without a CRI (or
            # without a watch): what a kubelet sees is "unknown service".
            observed = ex.Outcome.MISBEHAVES
        detail = f"CRI: {status}; running {ctd.running}; log: {[s[:300] for s in said[:2]]}"
        # Recovery: with the instances back, does it come back by itself?
        held.release()
        later = cni_dir.bridge()
        cni_dir.write(later, "05-later.conflist")
        by_itself = False
        if ctd.running and cri_up:
            by_itself = ready_with(later["name"])(
                wait_cri_network(ctd.address, ready_with(later["name"]), 3)
            )
        detail += f"; after release, by itself: {by_itself}"
        verdict = judged(
            record_property, "containerd", "cni:inotify-instances-exhausted", observed, detail
        )
        assert verdict.ok, verdict.message
        assert said, f"containerd never said 'too many open files': {detail}"
        # A restart with the instances back recovers every version.
        ctd.restart()
        assert ready_with(later["name"])(wait_cri_network(ctd.address, ready_with(later["name"])))
        assert inotify_instances(ctd.pid or 0) >= 1
    finally:
        ctd.stop()


# --- the test-only readers ------------------------------------------------------


def run_reader(held: InotifyInstancesHeld, conf_dir: Path, no_watch: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*held.argv, sys.executable, str(READERS), str(conf_dir), "--no-watch", no_watch],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def reports(
    proc: subprocess.Popen[str], until: Callable[[dict[str, Any]], bool], timeout: float
) -> list[dict[str, Any]]:
    """The reader's JSON lines until one satisfies *until* (or *timeout* passes)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)  # a reader that says nothing must not hang the test
    seen: list[dict[str, Any]] = []
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            chunk = b""
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            seen.append(json.loads(line))
            if until(seen[-1]):
                return seen
        if not chunk:
            time.sleep(0.02)
    return seen


@pytest.mark.parametrize(
    ("no_watch", "caught"), [("poll", False), ("ignore", True)], ids=["correct", "watchless"]
)
def test_reader_without_an_inotify_instance(
    cni_dir: CniDir, inotify_exhausted: Any, no_watch: str, caught: bool
) -> None:
    held = inotify_exhausted(limit=2)
    proc = run_reader(held, cni_dir.conf_dir, no_watch)
    try:
        first = reports(proc, lambda r: True, 10)
        assert first, "the reader said nothing"
        assert "too many open files" in (first[0]["error"] or "").lower(), first
        assert "max_user_instances" in first[0]["error"]  # it says what to raise
        held.release()
        time.sleep(0.2)  # a correct reader gets its watch back in its next poll
        conf = cni_dir.bridge()
        name = cni_dir.filename(conf)
        cni_dir.write(conf)
        seen = reports(proc, lambda r: r["network"] == name, 3)
        assert bool(seen and seen[-1]["network"] == name) is not caught, seen
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
