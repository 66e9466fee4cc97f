"""The real daemons: containerd and dbus-daemon, per stale_socket variant, and
SIGKILLed mid-operation then restarted over their stale socket.

The expected outcomes are what these daemons (Debian 12: containerd 1.6.20,
dbus 1.14.10) were measured to do; docs/sockets.md has the same table.  A
change here means the daemon changed: update both.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from random import Random

import pytest
from findings import judged

from pytest_runtimefaults import expectations as ex
from pytest_runtimefaults.containerd import Containerd, CtrError
from pytest_runtimefaults.daemon import Daemon, connect_error
from pytest_runtimefaults.faults import FaultRegistry
from pytest_runtimefaults.sockets import VARIANTS, StaleSocket

pytestmark = pytest.mark.timeout(60)

# variant -> (outcome, ok per the correct behaviour, what it did wrong, if anything)
DBUS = {
    "stale": ("served", ""),
    "live": ("served", "stole the socket of a live process"),
    "file": ("refused", ""),
    "directory": ("refused", ""),
    "symlink": ("served", "removed or replaced the symlink"),
    "foreign-dir": ("served", "served where a correct daemon refuses"),
    "open-dir": ("served", "served where a correct daemon refuses"),
    "abstract": ("refused", ""),
    "bind-mount": ("served", ""),
}
CONTAINERD = {
    "stale": ("served", ""),
    "live": ("served", "stole the socket of a live process"),
    "file": ("served", "deleted or replaced the regular file"),
    "directory": ("refused", ""),
    "symlink": ("served", "removed or replaced the symlink"),
    "foreign-dir": ("served", "served where a correct daemon refuses"),
    "open-dir": ("served", "served where a correct daemon refuses"),
    "abstract": ("refused", ""),
    "bind-mount": ("served", ""),
}


def dbus_argv(path: str) -> list[str]:
    address = f"unix:abstract={path[1:]}" if path.startswith("@") else f"unix:path={path}"
    return [
        "dbus-daemon",
        "--session",
        "--nofork",
        "--nopidfile",
        "--print-address=1",
        f"--address={address}",
    ]


def check(verdict_problems: list[str], wrong: str) -> None:
    if wrong:
        assert any(wrong in p for p in verdict_problems), verdict_problems
    else:
        assert verdict_problems == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_dbus_daemon_per_variant(
    variant: str, stale_socket: Callable[..., StaleSocket], daemon: Callable[..., Daemon]
) -> None:
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon not installed (apt-get install dbus-daemon)")
    s = stale_socket(variant=variant)
    d = daemon(dbus_argv(s.path), ready_log=r"^unix:", name="dbus-daemon", start=False)
    verdict = s.judge(d)
    outcome, wrong = DBUS[variant]
    assert verdict.outcome == outcome, str(verdict)
    check(verdict.problems, wrong)
    if outcome == "refused":
        assert "Failed to bind socket" in verdict.error
        assert "Address already in use" in verdict.error
    if variant == "bind-mount":
        assert s.client_view_error() == "ECONNREFUSED"


@pytest.mark.parametrize("variant", VARIANTS)
def test_containerd_per_variant(
    variant: str,
    stale_socket: Callable[..., StaleSocket],
    request: pytest.FixtureRequest,
) -> None:
    if shutil.which("containerd") is None:
        pytest.skip("containerd not installed (apt-get install containerd)")
    s = stale_socket(variant=variant)
    ctd = Containerd(socket_path=s.path, ready_timeout=10)
    request.addfinalizer(ctd.stop)
    ctd.prepare()
    verdict = s.judge(ctd.daemon)
    outcome, wrong = CONTAINERD[variant]
    assert verdict.outcome == outcome, str(verdict)
    check(verdict.problems, wrong)
    if variant == "directory":
        # 1.6/1.7: "...main endpoint: is a directory"; 2.1 names the socket in between.
        assert "failed to get listener for main endpoint: " in verdict.error
        assert verdict.error.endswith("is a directory")
    if variant == "abstract":
        # containerd never gets as far as the held name: it chmods its ttrpc
        # socket, which an abstract socket has no file for.
        assert "chmod @" in verdict.error


# --- SIGKILL mid-operation ----------------------------------------------------


@pytest.mark.needs("container-cgroups")
def test_containerd_sigkill_with_a_running_container(containerd: Containerd) -> None:
    image = containerd.import_busybox()
    containerd.run(image, "keeps", "sleep", "3600", detach=True)
    shims = containerd.shim_pids()
    assert shims
    took = containerd.crash_restart()
    assert connect_error(containerd.address) is None
    assert 0 < took < 5
    tasks = containerd.ctr("tasks", "ls").stdout.split()
    assert tasks[tasks.index("keeps") + 2] == "RUNNING"
    assert containerd.shim_pids() == shims  # the shim outlived containerd, and is re-adopted
    assert containerd.fatal_errors() == []


@pytest.mark.needs("container-cgroups")
def test_containerd_sigkill_during_ctr_run(
    containerd: Containerd,
    runtimefaults_rng: Random,
    runtimefaults_faults: FaultRegistry,
    record_property: Callable[[str, object], None],
) -> None:
    """Kill containerd at seeded moments of ``ctr run --rm``: it serves again
    every time; what the interrupted run left is classified, and once removed
    (containers, orphan snapshots, orphan shims) the same ID runs again."""
    image = containerd.import_busybox()
    seen: set[str] = set()
    restarts: list[float] = []
    for i in range(3):
        cid = f"mid{i}"
        run = subprocess.Popen(
            containerd.run_argv(image, cid, "sleep", "0.2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            time.sleep(runtimefaults_rng.uniform(0.0, 0.15))
            containerd.kill()
            out, _ = run.communicate(timeout=30)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
        assert run.returncode != 0
        # How ctr words a server gone mid-call: 1.6 "transport is closing" or
        # "connection refused"; 1.7 "error reading from server: EOF" or "error
        # reading from server: read unix @->SOCKET: read: connection reset by
        # peer"; 2.1 "error reading server preface: connection reset by peer"
        # or, killed later in the call, "error reading from server: connection
        # reset by peer".
        lost = (
            "transport is closing",
            "connection refused",
            "error reading from server: EOF",
            "error reading server preface",
            "connection reset by peer",
        )
        assert any(text in out for text in lost), out
        containerd.daemon.start()
        serve_again = containerd.daemon.time_to_serve_again()
        assert serve_again is not None, "containerd never served again after the restart"
        restarts.append(serve_again)
        seen |= {o.split(":")[0].split(" (")[0].replace(cid, "ID") for o in containerd.orphans()}
        if cid in containerd.ctr("containers", "ls", "-q").stdout.split():
            seen.add("container record")
        containerd.remove_all_containers()
        containerd.remove_orphans()
        try:
            containerd.run(image, cid, "true")
        except CtrError as exc:
            if "failed to rename" not in str(exc) or "snapshots" not in str(exc):
                raise
            # Seen rarely (about 1 in 100 interrupted runs): the kill fell
            # inside an overlayfs Prepare; the snapshot directory was renamed
            # but its metadata transaction was lost, so the next Prepare gets
            # the same id and "file exists".  Nothing through ctr removes it.
            pytest.xfail(f"containerd left an overlayfs snapshot directory: {exc.stderr}")
    # How soon it serves again: under a second, or (containerd 1.7.24, one kill in
    # one run) a 10 s wait on the interrupted run's shim.  The table knows which.
    observed = ex.Outcome.SURVIVES if max(restarts) < 5 else ex.Outcome.MISBEHAVES
    verdict = judged(
        record_property,
        "containerd",
        "daemon:sigkill-mid-run-restart",
        observed,
        f"served again after {', '.join(f'{t:.2f}' for t in restarts)} s",
    )
    assert verdict.ok, verdict.message
    print("left behind by interrupted runs:", sorted(seen) or "nothing")
    assert runtimefaults_faults.leak_checks["containerd:orphans"].leaked() == set()
    assert containerd.fatal_errors() == []


@pytest.mark.needs("container-cgroups")
def test_containerd_orphan_shim_blocks_the_id_until_killed(
    containerd: Containerd, record_property: Callable[[str, object], None]
) -> None:
    """The 1.6.20 behaviour found with this harness: SIGKILLed after it started a
    task's shim but before it recorded the task, containerd restarts without
    knowing that shim, which keeps the ID taken until it is killed."""
    image = containerd.import_busybox()
    # Reproduce the orphan for sure: SIGKILL at the moment the shim exists but
    # the task is not yet created, by polling for the shim process.
    for attempt in range(20):
        cid = f"orph{attempt}"
        run = subprocess.Popen(
            containerd.run_argv(image, cid, "sleep", "0.2"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while cid not in containerd.shims() and time.monotonic() < deadline:
            time.sleep(0.001)
        containerd.kill()
        run.wait(30)
        containerd.daemon.start()
        if cid in containerd.orphan_shims():
            break
        containerd.remove_all_containers()
    else:
        pytest.skip("could not catch the shim before its task was recorded in 20 tries")
    containerd.remove_all_containers()
    containerd.remove_orphan_snapshots()
    assert f"shim of unknown task {cid} (pid {containerd.shims()[cid]})" in containerd.orphans()
    # Is the ID still taken?  containerd 1.6.20: "task ID: already exists" while
    # the shim lives; once it exits by itself, its bundle directory: "failed to
    # start shim: mkdir ...: file exists", twice (nothing cleans it up).
    # containerd 2.1: the ID is free again.  The table says which is known.
    errors = []
    for _ in range(2):
        try:
            containerd.run(image, cid, "true")
        except CtrError as exc:
            errors.append(str(exc))
    assert all(re.search(r"already exists|file exists", e) for e in errors), errors
    observed = ex.Outcome.LEAKS if errors else ex.Outcome.SURVIVES
    verdict = judged(
        record_property,
        "containerd",
        "daemon:sigkill-shim",
        observed,
        f"{len(errors)} of 2 runs with ID {cid} refused",
    )
    assert verdict.ok, verdict.message
    assert len(errors) in (0, 2), errors  # never once refused, once not
    containerd.kill_orphan_shims()
    time.sleep(0.1)
    containerd.remove_orphans()  # the bundle, if containerd did not reap it
    assert containerd.orphans() == set()
    containerd.run(image, cid, "true")


def test_dbus_daemon_sigkill_with_a_call_in_flight(
    daemon: Callable[..., Daemon], tmp_path: object
) -> None:
    """A client blocked in a call when dbus-daemon is SIGKILLed gets an error at
    once (not a hang); the restarted daemon serves over the stale socket."""
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon not installed (apt-get install dbus-daemon)")
    from jeepney import DBusAddress, new_method_call
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    with StaleSocket(variant="stale") as s:
        d = daemon(dbus_argv(s.path), ready_log=r"^unix:", name="dbus-daemon")
        address = f"unix:path={s.path}"
        service = open_dbus_connection(bus=address)
        client = open_dbus_connection(bus=address)
        try:
            service.send_and_get_reply(message_bus.RequestName("org.runtimefaults.Slow"))
            call = new_method_call(
                DBusAddress("/", bus_name="org.runtimefaults.Slow", interface="org.x"), "Wait"
            )
            failure: list[tuple[BaseException, float]] = []

            def blocked_call() -> None:
                try:
                    client.send_and_get_reply(call, timeout=20)
                except BaseException as exc:
                    failure.append((exc, time.monotonic()))

            caller = threading.Thread(target=blocked_call)
            caller.start()
            time.sleep(0.2)
            assert failure == []  # still waiting: the service never answers
            d.kill()
            killed_at = d.runs[-1].killed_at
            caller.join(10)
            assert failure, "the call should fail once the bus is gone"
            assert killed_at is not None
            assert failure[0][1] - killed_at < 5  # the kill ends the call, not a timeout
            assert connect_error(s.path) == "ECONNREFUSED"
        finally:
            service.close()
            client.close()
        d.start()
        assert (d.time_to_serve_again() or 99) < 5
        fresh = open_dbus_connection(bus=address)
        try:
            reply = fresh.send_and_get_reply(message_bus.ListNames())
            assert "org.freedesktop.DBus" in reply.body[0]
        finally:
            fresh.close()
        assert d.fatal_errors() == []


def test_ctr_error_when_containerd_is_down(containerd: Containerd) -> None:
    containerd.kill()
    with pytest.raises(CtrError, match="connection refused"):
        containerd.ctr("version", timeout=20)
