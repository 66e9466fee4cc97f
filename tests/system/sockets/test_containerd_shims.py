"""A killed shim's stale socket (containerd issues 11292, 10192, 7394), and
where a private containerd keeps its shims' sockets.

containerd puts every shim's socket in ``/run/containerd/s/<sha256>``, ctr's
FIFOs in ``/run/containerd/fifo`` and runc's state in ``/run/containerd/runc``,
whatever its config says.  A SIGKILLed shim leaves its socket there, and the
incidents are what containerd made of it at its next start: connect loops on
ENOENT/ECONNREFUSED, a slow start, a task reported wrongly.  The
:class:`~pytest_runtimefaults.containerd.Containerd` harness keeps that
directory private (its own mount namespace, ``/run/containerd`` =
``run_dir``), so the stale socket is real, where containerd looks for it, and
not on the host.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from findings import judged

from pytest_runtimefaults import expectations as ex
from pytest_runtimefaults.containerd import Containerd
from pytest_runtimefaults.daemon import Daemon, DaemonNotReady

pytestmark = pytest.mark.timeout(90)

HOST_RUN = Path("/run/containerd")


def private_run(containerd: Containerd) -> None:
    if not containerd.private_run:
        pytest.skip(
            "the kernel refused to keep containerd's mount namespace here (EINVAL binding "
            "/proc/PID/ns/mnt, seen in sid's containers): containerd uses this /run/containerd"
        )


def host_entries() -> set[str]:
    found: set[str] = set()
    for sub in ("s", "fifo", "runc"):
        path = HOST_RUN / sub
        if path.is_dir():
            found |= {str(p) for p in path.iterdir()}
    return found


def shim_socket(containerd: Containerd, cid: str) -> Path:
    """The socket path containerd gave the shim of task *cid*: its bundle's
    ``address`` file (1.6, 1.7) or ``bootstrap.json`` (2.x)."""
    bundle = containerd.state / "io.containerd.runtime.v2.task" / containerd.namespace / cid
    if (bundle / "bootstrap.json").exists():
        address = json.loads((bundle / "bootstrap.json").read_text())["address"]
    else:
        address = (bundle / "address").read_text().strip()
    assert address.startswith("unix://"), address
    return Path(address.removeprefix("unix://"))


def refuses(path: Path, within: float = 5.0) -> bool:
    """A socket file nobody listens on (any more): a connect is refused."""
    deadline = time.monotonic() + within
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(path))
            except ConnectionRefusedError:
                return True
            except OSError:
                return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def wait_gone(pid: int, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state == "Z":
            return
        time.sleep(0.01)


@pytest.mark.needs("container-cgroups")
def test_shim_sockets_fifos_and_runc_state_stay_in_the_instance(
    containerd: Containerd,
) -> None:
    private_run(containerd)
    before = host_entries()
    image = containerd.import_busybox()
    containerd.run(image, "keeps", "sleep", "3600", detach=True)
    containerd.run(image, "once", "true")  # ctr's FIFOs, a task that comes and goes
    sock = shim_socket(containerd, "keeps")
    # containerd names the path it always names, but in its mount namespace
    # that is the instance's run_dir, not the host's /run/containerd.
    assert sock.parent == HOST_RUN / "s"
    assert (containerd.run_dir / "s" / sock.name).is_socket()
    assert not sock.exists()
    assert (containerd.run_dir / "fifo").is_dir()  # ctr ran in the same namespace
    assert host_entries() == before


def susceptible_daemon(state: Path, socket_path: Path, *, bounded: bool) -> list[str]:
    """A test-only daemon that re-attaches to the shims in *state* before it serves.

    The susceptible one retries every shim socket until it answers (the loop
    of containerd issue 11292); the correct one takes a refused connect for a
    dead shim, removes its socket and goes on.
    """
    code = textwrap.dedent(
        """
        import os, socket, sys, time
        state, path, bounded = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
        for name in sorted(os.listdir(state)):
            shim = os.path.join(state, name)
            while True:
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(shim)
                    break
                except OSError:
                    if bounded:
                        os.unlink(shim)  # a dead shim: its task is cleaned up
                        break
                    time.sleep(0.05)
                finally:
                    s.close()
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen()
        print("serving", flush=True)
        while True:
            listener.accept()[0].close()
        """
    )
    return [sys.executable, "-c", code, str(state), str(socket_path), "1" if bounded else "0"]


@pytest.mark.needs("container-cgroups")
def test_a_killed_shims_socket_catches_a_daemon_that_retries_it_forever(
    containerd: Containerd, tmp_path: Path
) -> None:
    private_run(containerd)  # the daemons below get links to the socket, in tmp_path
    image = containerd.import_busybox()
    containerd.run(image, "keeps", "sleep", "3600", detach=True)
    sock = containerd.shim_socket_dir / shim_socket(containerd, "keeps").name
    containerd.kill()
    shim = containerd.shims()["keeps"]
    os.kill(shim, signal.SIGKILL)
    wait_gone(shim)
    assert refuses(sock)  # the fault: a socket file no shim listens on
    # Copies of the stale socket for the two test-only daemons (the real one
    # stays for containerd): a socket file copied is a socket file.
    outcomes = {}
    for bounded in (False, True):
        state = tmp_path / f"state{int(bounded)}"
        state.mkdir()
        os.link(sock, state / sock.name)
        daemon = Daemon(
            susceptible_daemon(state, tmp_path / f"d{int(bounded)}.sock", bounded=bounded),
            socket_path=tmp_path / f"d{int(bounded)}.sock",
            ready_timeout=3,
            name="reattach",
        )
        try:
            try:
                outcomes[bounded] = daemon.start()
            except DaemonNotReady:
                outcomes[bounded] = None
        finally:
            daemon.stop()
    assert outcomes[False] is None, "the retry-forever daemon served over a dead shim's socket"
    assert outcomes[True] is not None
    assert outcomes[True] < 3
    containerd.daemon.start()


@pytest.mark.needs("container-cgroups")
@pytest.mark.parametrize("when", ["containerd-down", "containerd-up"])
def test_containerd_restarts_over_a_killed_shims_socket(
    containerd: Containerd, record_property: Callable[[str, object], None], when: str
) -> None:
    """SIGKILL a running task's shim (containerd down, or up), restart
    containerd: it serves again, the task is not reported running, nothing of
    it is left running, and the same ID and a new container run."""
    image = containerd.import_busybox()
    containerd.run(image, "keeps", "sleep", "3600", detach=True)
    sock = containerd.shim_socket_dir / shim_socket(containerd, "keeps").name
    shim = containerd.shims()["keeps"]
    if when == "containerd-down":
        containerd.kill()
    os.kill(shim, signal.SIGKILL)
    wait_gone(shim)
    if when == "containerd-up":
        time.sleep(0.5)  # let containerd see its shim go (it cleans up after it)
        containerd.kill()
    left_at_start = sock.exists()
    started = time.monotonic()
    containerd.daemon.start()
    serve_again = time.monotonic() - started
    tasks = containerd.ctr("tasks", "ls").stdout.split("\n")[1:]
    running = [line for line in tasks if line.split()[:1] == ["keeps"] and "RUNNING" in line]
    processes = containerd.cgroup_processes().get("keeps", set())
    containerd.remove_all_containers()
    problems = []
    for cid in ("keeps", "fresh"):
        try:
            containerd.run(image, cid, "true")
        except Exception as exc:  # what failed is the evidence
            problems.append(f"{cid}: {exc}")
    evidence = (
        f"served again after {serve_again:.2f} s; the stale socket "
        f"{'was there at the restart' if left_at_start else 'was already gone'} and "
        f"{'is still there' if sock.exists() else 'is gone'}; task listed running: "
        f"{running or 'no'}; its processes left: {sorted(processes) or 'none'}; "
        f"next runs: {problems or 'ok'}"
    )
    print(evidence)
    if running or problems:
        observed = ex.Outcome.MISBEHAVES
    elif processes:
        observed = ex.Outcome.LEAKS
    elif serve_again > 5:
        observed = ex.Outcome.BLOCKS
    else:
        observed = ex.Outcome.SURVIVES
    verdict = judged(record_property, "containerd", "daemon:stale-shim-socket", observed, evidence)
    assert verdict.ok, verdict.message
    containerd.remove_orphans()
    assert containerd.fatal_errors() == []


@pytest.mark.parametrize("name", ["k8s.io", "../rfns1", "rfns1/../..", ""])
def test_host_runc_state_cleanup_touches_only_our_namespaces(name: str, tmp_path: Path) -> None:
    from pytest_runtimefaults import containerd as ctd_module

    before = host_entries()
    ctd_module.remove_host_runc_state(name)  # refused: not a name this project makes
    assert host_entries() == before
