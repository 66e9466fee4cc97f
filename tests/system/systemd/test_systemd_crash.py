"""A plain Python script using SystemdSandbox, SIGKILLed: ``runtimefaults cleanup`` reaps it all.

Issue 11, part 4: a library user creates ``SystemdSandbox()`` with no journal
argument, runs a runc container in it, and is killed.  The sandbox journals by
default (the journal ``runtimefaults cleanup`` reads), so cleanup kills
``unshare``, systemd, dbus-daemon, the container's processes and any ``runc
init``, and removes the sandbox's cgroups and work directory.

The script's journal goes to a private state directory
(``RUNTIMEFAULTS_STATE_DIR``, which :meth:`Journal.default` honours), so this
test never reaps another run's journals.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import pytest_runtimefaults
from pytest_runtimefaults import caps
from pytest_runtimefaults.host import proc as host_proc
from pytest_runtimefaults.journal import process_starttime
from pytest_runtimefaults.rootfs import build_bundle, build_rootfs
from pytest_runtimefaults.systemd import _own_cgroups, cgroup_mounts, host_cgroup_state

LAYOUTS = ["unified"] if caps.cgroup_layout() == "v2" else ["hybrid", "unified"]

pytestmark = [
    pytest.mark.needs("systemd", "runc"),
    pytest.mark.timeout(120),
]

SCRIPT = textwrap.dedent(
    """\
    import sys
    from pytest_runtimefaults.runtime import Runtime
    from pytest_runtimefaults.systemd import SystemdSandbox

    layout, bundle = sys.argv[1], sys.argv[2]
    sd = SystemdSandbox(layout=layout)          # no journal argument: the default one
    print("name", sd.name, flush=True)
    sd.start()
    print("booted", sd._launcher.pid, sd.pid, sd.workdir, flush=True)
    rt = Runtime("runc", cgroup_driver="systemd", sandbox=sd)
    assert rt.create("rf-crash", bundle).ok
    assert rt.start("rf-crash").ok
    print("container", flush=True)
    i = 0
    while True:                                  # churn: a kill can land inside runc
        rt.lifecycle(bundle, f"rf-churn-{i}")
        i += 1
        print("cycle", i, flush=True)
    """
)

# (the line the script prints, then how long to wait before SIGKILL)
MOMENTS = {
    "mid-boot": ("name", 0.01),
    "booted": ("booted", 0.0),
    "container-running": ("container", 0.0),
    "mid-runc-lifecycle": ("cycle", 0.1),
}


def _sandbox_cgroups(name: str) -> list[Path]:
    own = _own_cgroups()
    return [
        Path(m.mount_point + own[m.name].rstrip("/")) / name
        for m in cgroup_mounts()
        if m.name in own
    ]


def _pids_in(cgroups: list[Path]) -> set[tuple[int, int | None]]:
    """(pid, start time) of every process in the cgroups, recursively."""
    found: set[tuple[int, int | None]] = set()
    for root in cgroups:
        if root.is_dir():
            for procs in root.rglob("cgroup.procs"):
                try:
                    pids = procs.read_text().split()
                except OSError:
                    continue
                found.update((int(p), process_starttime(int(p))) for p in pids)
    return found


def _alive(pid: int, starttime: int | None) -> bool:
    """Still the same process, and not a zombie (reaped by its new parent soon)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z" and process_starttime(pid) == starttime


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("crash")
    rootfs = build_rootfs(root / "rootfs")
    return build_bundle(root / "bundle", ("/bin/sleep", "600"), rootfs=rootfs)


# Every moment is reaped by `runtimefaults cleanup`; one also by the next pytest run.
CASES = [(m, "cleanup") for m in MOMENTS] + [("container-running", "next pytest run")]


def _reap(reaper: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    if reaper == "cleanup":
        argv = [sys.executable, "-m", "pytest_runtimefaults", "cleanup"]
    else:
        (cwd / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
        argv = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "runtimefaults",
            "-p",
            "no:cacheprovider",
            "test_nothing.py",
        ]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


@pytest.mark.parametrize(("moment", "reaper"), CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cleanup_reaps_a_sigkilled_scripts_sandbox(
    layout: str, moment: str, reaper: str, bundle: Path, tmp_path: Path
) -> None:
    before = host_cgroup_state()
    state = tmp_path / "state"
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    project = str(Path(pytest_runtimefaults.__file__).resolve().parent.parent)
    env = {**os.environ, "RUNTIMEFAULTS_STATE_DIR": str(state), "PYTHONPATH": project}
    proc = subprocess.Popen(
        [sys.executable, str(script), layout, str(bundle)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    marker, delay = MOMENTS[moment]
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while not (lines and lines[-1].startswith(marker)):
            line = proc.stdout.readline()
            assert line, (
                f"the script ended early: {lines} {proc.stderr.read() if proc.stderr else ''}"
            )
            lines.append(line.strip())
            assert time.monotonic() < deadline, lines
        name = lines[0].split()[1]
        if moment == "mid-boot":
            # The launcher is spawned right after inner.sh is written: kill while
            # unshare, the guard or systemd's start-up runs.
            while not list(Path("/tmp").glob(f"{name}-*/inner.sh")):
                assert time.monotonic() < deadline
                time.sleep(0.002)
        time.sleep(delay)
        seen = _pids_in(_sandbox_cgroups(name))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    launcher_line = next((ln for ln in lines if ln.startswith("booted")), None)
    if launcher_line is not None:
        _, launcher, systemd, _ = launcher_line.split()
        seen |= {(int(p), process_starttime(int(p))) for p in (launcher, systemd)}
    seen |= _pids_in(_sandbox_cgroups(name))  # and whatever started since
    seen = {(pid, start) for pid, start in seen if start is not None}
    workdirs = list(Path("/tmp").glob(f"{name}-*"))

    left = {pid for pid, start in seen if _alive(pid, start)}
    # A process may exit between the check and the read: "?" then, dropped.
    comms = sorted(c for c in (host_proc.comm(pid) for pid in left) if c != "?")
    try:
        if moment != "mid-boot":
            # What the issue found: the script's death alone leaves the sandbox running.
            assert {"systemd", "dbus-daemon", "unshare"} <= set(comms), comms
            if moment != "booted":
                assert "sleep" in comms, comms  # the container's process
            assert workdirs
            assert list(state.glob("*.jsonl")), "no journal was written"
    finally:
        # Reap whatever the checks above found, so a failing case leaves nothing.
        cleanup = _reap(reaper, env, tmp_path)
    assert cleanup.returncode == 0, cleanup.stdout + cleanup.stderr
    if reaper == "next pytest run":
        assert "runtimefaults reaped" in cleanup.stdout + cleanup.stderr, cleanup.stdout
    print(f"{layout} {moment}: left {comms}; {reaper}: {cleanup.stdout.splitlines()[-1]}")

    deadline = time.monotonic() + 10
    while {pid for pid, start in seen if _alive(pid, start)} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not {pid for pid, start in seen if _alive(pid, start)}, cleanup.stdout
    assert not [p for p in _sandbox_cgroups(name) if p.exists()], cleanup.stdout
    assert not [w for w in workdirs if w.exists()], cleanup.stdout
    assert not list(state.glob("*.jsonl")), cleanup.stdout
    again = subprocess.run(
        [sys.executable, "-m", "pytest_runtimefaults", "cleanup", "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert again.stdout.strip().endswith("0 resource(s) from 0 dead run(s)"), again.stdout
    assert host_cgroup_state() == before
