"""Reload races of a CNI conf dir watcher: a config renamed into place, the
conf dir deleted and recreated, an event storm that overflows the queue.

Each fault is run against containerd's CRI plugin (its network status read
over CRI, what it did judged by the expectations table) and against the
test-only readers of ``tests/helpers/cni_readers.py``: the susceptible one
must be caught, the correct one must pass.  Outcomes per containerd version
are tabled in docs/cni.md.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cni_readers import ConfReader
from findings import judged

from pytest_runtimefaults import expectations as ex
from pytest_runtimefaults.cni import CniDir, CriNetworkStatus, wait_cri_network
from pytest_runtimefaults.cni.faults import ConfDirSwap, EventStorm, RenamedInto
from pytest_runtimefaults.containerd import Containerd

pytestmark = pytest.mark.timeout(90)

#: how long a reload may take before the daemon is said to have missed it;
#: containerd reloads within milliseconds, and 2.x polls a vanished conf dir
#: every 5 s
RELOAD_BOUND = 3.0
SWAP_BOUND = 12.0


def storm_files() -> int:
    """Scratch files for 1.5 x the host's inotify queue (4 events each)."""
    queued = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    return queued * 3 // 8 + 1


def ready_with(name: str) -> Any:
    return lambda s: s is not None and s.ready and [n for n, _ in s.networks] == [name]


def wait_unless_gone(ctd: Containerd, predicate: Any, timeout: float) -> CriNetworkStatus | None:
    """:func:`wait_cri_network`, or None when containerd stops serving meanwhile
    (it may exit on the fault: then the outcome is the crash, not an RPC error)."""
    import grpc

    try:
        return wait_cri_network(ctd.address, predicate, timeout)
    except grpc.RpcError:
        if ctd.running:
            time.sleep(1)  # dying: give it the second it takes
        if ctd.running:
            raise
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of *pid* so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_lines(ctd: Containerd, *needles: str) -> list[str]:
    return [line for line in ctd.logs.splitlines() if any(n in line for n in needles)]


# --- containerd's CRI plugin ---------------------------------------------------


@pytest.mark.parametrize("beside", [False, True], ids=["empty-dir", "beside-another"])
def test_containerd_config_renamed_into_the_conf_dir(
    cni_dir: CniDir,
    cni_containerd: Containerd,
    cni_renamed_into: Any,
    record_property: Any,
    beside: bool,
) -> None:
    # containerd skips fsnotify's Create, and a rename into the directory is
    # reported as Create: the file is never loaded (issue 11715).  Beside
    # another file, the new one sorts first and should become the default.
    old = cni_dir.bridge()
    if beside:
        cni_dir.write(old, "20-old.conflist")
        assert wait_cri_network(cni_containerd.address, ready_with(old["name"])).ready
    new = cni_dir.bridge()
    fault = cni_renamed_into("10-new.conflist", new)
    status = wait_cri_network(cni_containerd.address, ready_with(new["name"]), RELOAD_BOUND)
    observed = ex.Outcome.SURVIVES if ready_with(new["name"])(status) else ex.Outcome.MISBEHAVES
    if observed is ex.Outcome.MISBEHAVES and not beside:
        assert "no network config found" in status.last_load, status
    verdict = judged(
        record_property,
        "containerd",
        "cni:config-renamed-into",
        observed,
        f"{RELOAD_BOUND} s after the rename: {status}",
    )
    assert verdict.ok, verdict.message
    fault.lift()  # an in-dir write (temp + rename): every version reloads on it
    assert ready_with(new["name"])(
        wait_cri_network(cni_containerd.address, ready_with(new["name"]))
    )


def test_containerd_conf_dir_deleted_and_recreated(
    cni_dir: CniDir, cni_containerd: Containerd, cni_conf_dir_swap: Any, record_property: Any
) -> None:
    old = cni_dir.bridge()
    cni_dir.write(old, "20-old.conflist")
    assert wait_cri_network(cni_containerd.address, ready_with(old["name"])).ready
    new = cni_dir.bridge()
    fault = cni_conf_dir_swap({"10-new.conflist": new})
    status = wait_unless_gone(cni_containerd, ready_with(new["name"]), SWAP_BOUND)
    if not cni_containerd.running:
        observed = ex.Outcome.CRASHES
    elif ready_with(new["name"])(status):
        observed = ex.Outcome.SURVIVES
    else:
        observed = ex.Outcome.MISBEHAVES  # the watch died with the old inode
    verdict = judged(
        record_property,
        "containerd",
        "cni:conf-dir-swapped",
        observed,
        f"inodes {fault.inodes}; {SWAP_BOUND} s after: {status}; "
        f"log: {log_lines(cni_containerd, 'conf dir', 'is deleted', 'fatal')[-3:]}",
    )
    assert verdict.ok, verdict.message
    # What brings every version back: a restart, which watches the new inode.
    cni_containerd.restart()
    assert ready_with(new["name"])(
        wait_cri_network(cni_containerd.address, ready_with(new["name"]))
    )


def test_containerd_event_storm_overflowing_its_queue(
    cni_dir: CniDir, cni_containerd: Containerd, cni_event_storm: Any, record_property: Any
) -> None:
    old = cni_dir.bridge()
    cni_dir.write(old, "20-old.conflist")
    assert wait_cri_network(cni_containerd.address, ready_with(old["name"])).ready
    pid = cni_containerd.pid
    assert pid is not None
    new = cni_dir.bridge()
    # Frozen for the burst, as a daemon starved of CPU is: the kernel queues
    # the events and drops the excess with IN_Q_OVERFLOW.
    os.kill(pid, signal.SIGSTOP)
    try:
        storm = cni_event_storm(files=storm_files(), touch=("10-new.conflist", new))
    finally:
        os.kill(pid, signal.SIGCONT)
    status = wait_unless_gone(cni_containerd, ready_with(new["name"]), 10)
    detail = f"{storm.applied} files in {storm.seconds:.2f} s; then {status}"
    time.sleep(1)  # a daemon that dies of the overflow does so within this second
    quiet_cpu = 0.0
    if not cni_containerd.running:
        observed = ex.Outcome.CRASHES
    else:
        # After the backlog: a daemon stuck in a reload loop (issue 5041)
        # keeps burning CPU although nothing changes any more.
        before = cpu_seconds(pid)
        time.sleep(1)
        quiet_cpu = cpu_seconds(pid) - before
        later = cni_dir.bridge()
        cni_dir.write(later, "05-later.conflist")
        after = wait_unless_gone(cni_containerd, ready_with(later["name"]), RELOAD_BOUND)
        detail += f"; quiet CPU {quiet_cpu:.2f} s/s; a later change: {after}"
        if after is None:
            observed = ex.Outcome.CRASHES
        elif ready_with(later["name"])(after) and quiet_cpu < 0.5:
            observed = ex.Outcome.SURVIVES
        else:
            observed = ex.Outcome.MISBEHAVES
    detail += f"; log: {log_lines(cni_containerd, 'overflow', 'level=fatal')[-2:]}"
    verdict = judged(record_property, "containerd", "cni:event-storm", observed, detail)
    assert verdict.ok, verdict.message
    if observed is ex.Outcome.CRASHES:
        assert log_lines(cni_containerd, "overflow"), "containerd died without saying why"
    last = cni_dir.bridge()
    cni_dir.write(last, "01-last.conflist")
    cni_containerd.restart()  # back, with the directory as it is now
    status = wait_cri_network(cni_containerd.address, ready_with(last["name"]))
    assert ready_with(last["name"])(status), status


# --- the test-only readers: the fault catches the susceptible one -------------------


@pytest.fixture
def conf_dir(tmp_path: Path) -> Iterator[CniDir]:
    with CniDir(root=tmp_path) as cni:
        yield cni


CORRECT: dict[str, Any] = {}


@pytest.mark.parametrize(
    ("reader", "caught"),
    [(CORRECT, False), ({"creates": False}, True)],
    ids=["correct", "ignores-creates"],
)
def test_reader_config_renamed_into_the_conf_dir(
    conf_dir: CniDir, reader: dict[str, Any], caught: bool
) -> None:
    with ConfReader(conf_dir.conf_dir, **reader) as r:
        conf_dir.write(conf_dir.bridge(), "20-old.conflist")
        assert r.wait_for("20-old.conflist", RELOAD_BOUND)
        RenamedInto(conf_dir, "10-new.conflist", conf_dir.bridge()).start()
        assert r.wait_for("10-new.conflist", 1.0) is not caught


@pytest.mark.parametrize(
    ("reader", "caught"),
    [(CORRECT, False), ({"rewatch": False}, True)],
    ids=["correct", "watch-added-once"],
)
def test_reader_conf_dir_deleted_and_recreated(
    conf_dir: CniDir, reader: dict[str, Any], caught: bool
) -> None:
    with ConfReader(conf_dir.conf_dir, **reader) as r:
        conf_dir.write(conf_dir.bridge(), "20-old.conflist")
        assert r.wait_for("20-old.conflist", RELOAD_BOUND)
        ConfDirSwap(conf_dir, {"10-new.conflist": conf_dir.bridge()}).start()
        new_seen = r.wait_for("10-new.conflist", 1.0)
        conf_dir.write(conf_dir.bridge(), "05-later.conflist")  # and a change after it
        assert (new_seen and r.wait_for("05-later.conflist", 1.0)) is not caught


@pytest.mark.parametrize(
    ("reader", "caught"),
    [(CORRECT, False), ({"overflow": "fatal"}, True)],
    ids=["correct", "overflow-fatal"],
)
def test_reader_event_storm_overflowing_its_queue(
    conf_dir: CniDir, reader: dict[str, Any], caught: bool
) -> None:
    with ConfReader(conf_dir.conf_dir, **reader) as r:
        conf_dir.write(conf_dir.bridge(), "20-old.conflist")
        assert r.wait_for("20-old.conflist", RELOAD_BOUND)
        r.paused.set()  # a reader slower than the burst
        time.sleep(0.2)  # parked: its last read is done
        EventStorm(
            conf_dir, files=storm_files(), touch=("10-new.conflist", conf_dir.bridge())
        ).start()
        r.paused.clear()
        # The new file is seen at the first read; the overflow only at the
        # end of the queue: a later change tells whether the reader lived.
        recovered = r.wait_for("10-new.conflist", RELOAD_BOUND)
        time.sleep(0.5)
        conf_dir.write(conf_dir.bridge(), "05-later.conflist")
        recovered = recovered and r.wait_for("05-later.conflist", RELOAD_BOUND)
        assert recovered is not caught, (r.error, r.reloads, r.network)


# --- the faults themselves --------------------------------------------------------

ALL_EVENTS = 0xFFF  # IN_ALL_EVENTS of inotify(7)


def test_renamed_into_queues_one_moved_to_and_nothing_else(conf_dir: CniDir) -> None:
    from inotify_simple import INotify, flags

    with INotify() as watch:
        watch.add_watch(conf_dir.conf_dir, ALL_EVENTS)
        RenamedInto(conf_dir, "10-new.conflist", conf_dir.bridge()).start()
        events = [(flags.from_mask(e.mask), e.name) for e in watch.read(timeout=200)]
    assert events == [([flags.MOVED_TO], "10-new.conflist")]
    assert not [p for p in conf_dir.root.iterdir() if p.name.startswith(".rf-staging-")]


def test_conf_dir_swap_ends_the_old_watch(conf_dir: CniDir) -> None:
    from inotify_simple import INotify, flags

    conf_dir.write(conf_dir.bridge(), "20-old.conflist")
    with INotify() as watch:
        watch.add_watch(conf_dir.conf_dir, flags.CREATE | flags.MOVED_TO | flags.DELETE_SELF)
        ConfDirSwap(conf_dir, {"10-new.conflist": conf_dir.bridge()}).start()
        masks = [e.mask for e in watch.read(timeout=200)]
        assert any(m & flags.IGNORED for m in masks), masks  # the kernel dropped the watch
        assert not any(m & flags.MOVED_TO for m in masks), masks  # the new file: unseen
    assert [p.name for p in conf_dir.files()] == ["10-new.conflist"]


def test_event_storm_overflows_a_paused_queue(conf_dir: CniDir) -> None:
    from inotify_simple import INotify, flags

    with INotify() as watch:
        watch.add_watch(conf_dir.conf_dir, flags.CREATE | flags.MODIFY | flags.DELETE)
        EventStorm(conf_dir, files=storm_files()).start()
        seen = []
        while batch := watch.read(timeout=100):
            seen += batch
    assert seen[-1].mask & flags.Q_OVERFLOW
    assert not list(conf_dir.conf_dir.iterdir())  # the scratch files are gone
