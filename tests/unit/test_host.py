"""host/: process facts through psutil, the mount table, cgroup trees (no root needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_runtimefaults.host import cgroups, proc
from pytest_runtimefaults.host.mounts import mount_table
from pytest_runtimefaults.journal import Journal

pytestmark = pytest.mark.timeout(60)


def _stat_starttime(pid: int) -> int:
    # The journal's unit since its first version: field 22 of /proc/PID/stat.
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    return int(raw[raw.rindex(b")") + 2 :].split()[19])


def test_starttime_is_in_clock_ticks_as_journals_have_always_recorded() -> None:
    """Journals written by older versions name processes by this number: it must not change."""
    pids = [1, os.getpid(), os.getppid()]
    assert [proc.starttime(p) for p in pids] == [_stat_starttime(p) for p in pids]


def test_a_process_that_is_gone_or_a_zombie_is_not_alive() -> None:
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while proc.status(child.pid) != "zombie" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.status(child.pid) == "zombie"
    assert not proc.alive(child.pid)
    assert proc.starttime(child.pid) is not None, "a zombie still has its start time"
    child.wait()
    assert proc.starttime(child.pid) is None
    assert proc.comm(child.pid) == "?"
    assert proc.cmdline(child.pid) is None


def test_children_sessions_and_command_lines() -> None:
    marker = f"rf-host-test-{os.getpid()}"
    leader = subprocess.Popen(
        ["sh", "-c", f"sleep 30 & sleep 31; : {marker}"], start_new_session=True
    )
    try:
        # Two children, each past its exec: a forked child is still "sh" until
        # it execs sleep (seen once in CI when the comm was read at once).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            kids = proc.children(leader.pid)
            if len(kids) == 2 and all(proc.comm(k) == "sleep" for k in kids):
                break
            time.sleep(0.01)
        kids = proc.children(leader.pid)
        assert sorted(proc.comm(k) for k in kids) == ["sleep", "sleep"]
        assert set(kids) <= set(proc.children(os.getpid(), recursive=True))
        assert set(proc.session_members(leader.pid)) == {leader.pid, *kids}
        assert proc.pids_with_arg(marker) == [leader.pid]
        assert proc.cmdline(leader.pid) == ["sh", "-c", f"sleep 30 & sleep 31; : {marker}"]
        assert {os.getpid(), 1} <= proc.ancestors()
    finally:
        os.killpg(leader.pid, 9)
        leader.wait()


def test_the_mount_table_unescapes_and_knows_cgroup_mounts() -> None:
    entries = mount_table()
    assert any(m.target == "/" for m in entries)
    for mount in cgroups.cgroup_mounts():
        assert any(m.target == mount and m.fstype.startswith("cgroup") for m in entries)


def test_remove_tree_goes_deepest_first_and_reports_what_it_could_not(tmp_path: Path) -> None:
    # rmdir(2) on a plain directory tree behaves as on a cgroup tree: only empty leaves go.
    root = tmp_path / "rfroot"
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "d").mkdir()
    assert cgroups.remove_tree(root, timeout=0.1)
    assert not root.exists()
    (root / "busy").mkdir(parents=True)
    (root / "busy" / "tasks").write_text("1\n")  # a file: rmdir fails, like a live task
    assert not cgroups.remove_tree(root, timeout=0.1)
    assert (root / "busy" / "tasks").exists()


def test_is_below_cgroup_mount() -> None:
    mounts = cgroups.cgroup_mounts()
    if not mounts:
        pytest.skip("no cgroup filesystem mounted")
    assert cgroups.is_below_cgroup_mount(mounts[0] + "/rfx")
    assert not cgroups.is_below_cgroup_mount(mounts[0])
    assert not cgroups.is_below_cgroup_mount("/tmp/rfx")
    assert not cgroups.is_below_cgroup_mount(mounts[0] + "/../../tmp")


def test_the_default_journal_is_one_per_process_and_follows_the_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNTIMEFAULTS_STATE_DIR", str(tmp_path / "a"))
    first = Journal.default()
    assert Journal.default() is first
    assert first.state_dir == tmp_path / "a"
    monkeypatch.setenv("RUNTIMEFAULTS_STATE_DIR", str(tmp_path / "b"))
    assert Journal.default().state_dir == tmp_path / "b"
    code = "from pytest_runtimefaults.journal import Journal\nprint(Journal.default().owner_pid)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) != os.getpid(), "another process has its own journal"
