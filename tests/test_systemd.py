"""The systemd sandbox: boots fast, answers on its bus, leaves the host as it was.

These tests boot the real /lib/systemd/systemd (as root); they never touch the
host's systemd, system bus or cgroup mounts, and check that.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from pytest_runtimefaults import caps
from pytest_runtimefaults.journal import Journal, reap_dead_owners
from pytest_runtimefaults.systemd import (
    SandboxError,
    SystemdInspector,
    SystemdSandbox,
    _own_cgroups,
    cgroup_mounts,
    host_cgroup_state,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, cgroups)"),
    pytest.mark.skipif(
        not os.access("/lib/systemd/systemd", os.X_OK), reason="apt-get install systemd"
    ),
    pytest.mark.timeout(60),
]


def _cgroup_dirs() -> set[str]:
    """Every directory two levels deep under each host cgroup mount."""
    out: set[str] = set()
    for m in cgroup_mounts():
        root = Path(m.mount_point)
        for child in root.iterdir():
            if child.is_dir():
                out.add(str(child))
    return out


def _gone(pid: int, timeout: float = 5.0) -> bool:
    """The process is gone or a zombie (its parent may be slow to reap it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat[stat.rindex(")") + 2] == "Z":
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


@pytest.fixture
def host_before() -> tuple[list[str], set[str]]:
    return host_cgroup_state(), _cgroup_dirs()


def _sandbox_dirs(sd: SystemdSandbox) -> set[str]:
    """Where the sandbox's cgroups are, on every hierarchy, whether or not they exist."""
    own = _own_cgroups()
    return {
        str(Path(m.mount_point + own[m.name].rstrip("/")) / sd.name)
        for m in cgroup_mounts()
        if m.name in own
    }


def _assert_host_unchanged(before: tuple[list[str], set[str]], sd: SystemdSandbox) -> None:
    state, dirs = before
    after = host_cgroup_state()
    assert after == state, "the host's /sys/fs/cgroup mounts changed"
    assert all("ro" not in line.split()[1].split(",") for line in after), after
    # Other tests (other xdist workers) may add cgroups: check the sandbox's own.
    left = {d for d in _sandbox_dirs(sd) if os.path.exists(d)}
    assert not left, f"sandbox cgroups left on the host: {left}"
    assert not {d for d in _cgroup_dirs() - dirs if d.endswith("/" + sd.name)}


def test_boots_well_under_two_seconds_and_answers_on_its_bus(
    host_before: tuple[list[str], set[str]],
) -> None:
    with SystemdSandbox() as sd:
        assert sd.boot_seconds is not None
        assert sd.boot_seconds < 2.0, sd.boot_seconds
        inspector = sd.inspector()
        assert inspector.system_state() in ("running", "degraded")
        assert inspector.version().startswith("2")
        names = inspector.unit_names()
        assert {"init.scope", "dbus.service", "dbus.socket", "-.slice"} <= names
        assert sd.bus_address == f"unix:path={sd.workdir}/bus"
        assert sd.proc_bus_address == f"unix:path=/proc/{sd.pid}/root/run/dbus/system_bus_socket"
        assert SystemdInspector(sd.proc_bus_address).system_state() == inspector.system_state()
        # It is PID 1 of its own PID namespace.
        status = Path(f"/proc/{sd.pid}/status").read_text()
        assert f"NSpid:\t{sd.pid}\t1\n" in status
    _assert_host_unchanged(host_before, sd)


def test_systemd_remounts_only_its_own_cgroup_tmpfs_read_only(
    host_before: tuple[list[str], set[str]],
) -> None:
    """The incident: systemd remounts /sys/fs/cgroup read-only.  It must be its own."""
    with SystemdSandbox() as sd:
        inside = sd.run(["cat", "/proc/self/mountinfo"], check=True).stdout.decode()
        line = next(ln for ln in inside.splitlines() if ln.split()[4] == "/sys/fs/cgroup")
        # systemd did remount it read-only (what once hit the whole machine) ...
        assert line.split()[5].startswith("ro"), line
        # ... but it is a fresh tmpfs, not the host's superblock.
        host_dev = os.stat("/sys/fs/cgroup").st_dev
        dev = f"{os.major(host_dev)}:{os.minor(host_dev)}"
        assert line.split()[2] != dev, line
        # And the host's view is still read-write while it runs.
        assert host_cgroup_state() == host_before[0]
        with open("/sys/fs/cgroup/.rf-write-probe", "w"):
            pass
        os.unlink("/sys/fs/cgroup/.rf-write-probe")
    _assert_host_unchanged(host_before, sd)


def test_launcher_refuses_to_exec_systemd_on_the_host_cgroup_fs(tmp_path: Path) -> None:
    """The guard before exec: a launcher that forgot the fresh mounts stops there.

    /bin/true stands in for systemd, so even a broken guard cannot hurt the host.
    """

    class Forgetful(SystemdSandbox):
        def _inner_script(self) -> str:
            script = super()._inner_script()
            return "\n".join(
                ln
                for ln in script.splitlines()
                if not (ln.startswith(("mount", "umount", "mkdir")) and "/sys/fs/cgroup" in ln)
            )

    before = host_cgroup_state()
    sandbox = Forgetful(systemd="/bin/true", boot_timeout=5)
    with pytest.raises(SandboxError) as info:
        sandbox.start()
    assert "status 97" in str(info.value)
    assert "still the host one" in str(info.value)
    assert host_cgroup_state() == before


def test_commands_run_in_the_sandbox_namespaces() -> None:
    with SystemdSandbox() as sd:
        out = sd.run(["sh", "-c", "echo $$; cat /proc/self/cgroup; ls /run/systemd"], check=True)
        lines = out.stdout.decode().splitlines()
        assert int(lines[0]) > 1  # a PID of the sandbox's namespace, small
        assert any(ln.endswith(":/") for ln in lines if "name=systemd" in ln or ln[:2] == "0:")
        assert "system" in lines  # /run/systemd/system: what runtimes test for systemd


def test_inspector_finds_and_resets_leftovers() -> None:
    with SystemdSandbox() as sd:
        inspector = SystemdInspector(sd.bus_address)
        baseline = inspector.scopes_and_slices()
        # A failed transient service and a slice with a running scope in it.
        sd.run(["systemd-run", "--unit=rf-fails", "/bin/false"], check=True)
        proc = subprocess.Popen(
            sd.command(
                ["systemd-run", "--scope", "--slice=rf-left", "--unit=rf-held", "sleep", "60"]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                left = {u.name for u in inspector.leftovers(baseline)}
                # systemd-run makes the scope, then waits for its job, then execs sleep.
                sleeping = any(p.endswith(":sleep") for p in sd.processes())
                if {"rf-fails.service", "rf-held.scope", "rf-left.slice"} <= left and sleeping:
                    break
                time.sleep(0.05)
            assert {"rf-fails.service", "rf-held.scope", "rf-left.slice"} <= left, left
            assert "rf-fails.service" in inspector.failed()
            assert any(p.endswith(":sleep") for p in sd.processes()), sd.processes()
            for name in sorted(left):
                inspector.reset(name)
            assert not inspector.wait_gone(left, timeout=5)
            assert not inspector.leftovers(baseline)
        finally:
            proc.kill()
            proc.wait()


def test_stop_is_idempotent_and_kills_everything_inside(
    host_before: tuple[list[str], set[str]],
) -> None:
    sd = SystemdSandbox()
    sd.start()
    sd.start()
    subprocess.Popen(sd.command(["sleep", "300"]), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while not sd.processes() and time.monotonic() < deadline:
        time.sleep(0.02)
    pids = [int(p.split(":")[0]) for p in sd.processes()]
    assert pids
    systemd_pid = sd.pid
    sd.stop()
    sd.stop()
    assert not sd.running
    assert systemd_pid is not None
    for pid in [*pids, systemd_pid]:
        assert _gone(pid), pid
    _assert_host_unchanged(host_before, sd)


def test_a_killed_runs_sandbox_is_reaped_from_its_journal(
    tmp_path: Path, host_before: tuple[list[str], set[str]]
) -> None:
    # An owner PID that is gone: the journal looks like a SIGKILLed pytest's.
    dead = subprocess.Popen(["true"])
    dead.wait()
    journal = Journal(tmp_path, owner_pid=dead.pid)
    sd = SystemdSandbox(journal=journal)
    sd.start()
    pid, workdir = sd.pid, sd.workdir
    kinds = sorted({r["kind"] for r in journal.live()})
    assert kinds == ["path", "process", "systemd-sandbox-cgroups"]
    result = reap_dead_owners(tmp_path)
    assert not result.errors, result.errors
    assert len(result.reaped) >= 3
    assert sd._launcher is not None
    sd._launcher.wait(timeout=10)
    assert pid is not None
    assert _gone(pid)
    assert workdir is not None
    assert not workdir.exists()
    sd._launcher = None  # what a new process would see: nothing left to stop
    _assert_host_unchanged(host_before, sd)


def test_layout_must_match_the_host() -> None:
    wrong = "legacy" if caps.cgroup_layout() == "v2" else "unified"
    with pytest.raises(ValueError, match="cannot be built"):
        SystemdSandbox(layout=wrong)
    with pytest.raises(ValueError, match="layout must be"):
        SystemdSandbox(layout="v3")


@pytest.mark.skipif(caps.cgroup_layout() != "hybrid", reason="a hybrid host only")
def test_legacy_layout_on_a_hybrid_host_has_no_cgroup2() -> None:
    with SystemdSandbox(layout="legacy") as sd:
        mounts = sd.run(["cat", "/proc/self/mountinfo"], check=True).stdout.decode()
        assert " - cgroup2 " not in mounts
        assert sd.inspector().system_state() in ("running", "degraded")


@pytest.mark.skipif(
    not any("freezer" in m.options.split(",") for m in cgroup_mounts()),
    reason="no cgroup v1 freezer on this host",
)
def test_stop_thaws_a_frozen_process_left_by_a_killed_runtime(
    host_before: tuple[list[str], set[str]],
) -> None:
    """runc freezes a container around SetUnitProperties; killed then, it stays frozen."""
    sd = SystemdSandbox()
    sd.start()
    try:
        freezer = next(d for d in sd._cgroup_dirs if "/freezer/" in str(d))
        proc = subprocess.Popen(
            sd.command(
                [
                    "sh",
                    "-c",
                    "mkdir -p /sys/fs/cgroup/freezer/rf-frozen && "
                    "echo $$ > /sys/fs/cgroup/freezer/rf-frozen/cgroup.procs && exec sleep 300",
                ]
            )
        )
        state = freezer / "rf-frozen" / "freezer.state"
        deadline = time.monotonic() + 5
        while not (state.exists() and (freezer / "rf-frozen" / "cgroup.procs").read_text()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        state.write_text("FROZEN")
        while state.read_text().strip() != "FROZEN":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        t0 = time.monotonic()
    finally:
        sd.stop()
    assert time.monotonic() - t0 < 20  # the stop did not hang on the frozen process
    proc.wait(timeout=5)
    _assert_host_unchanged(host_before, sd)
