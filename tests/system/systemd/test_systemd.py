"""The systemd sandbox: boots fast, answers on its bus, leaves the host as it was.

These tests boot the real /lib/systemd/systemd (as root); they never touch the
host's systemd, system bus or cgroup mounts, and check that.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from pytest_runtimefaults import caps
from pytest_runtimefaults.journal import Journal, default_state_dir, reap_dead_owners
from pytest_runtimefaults.naming import unique_name
from pytest_runtimefaults.systemd import (
    SandboxError,
    SystemdInspector,
    SystemdSandbox,
    _own_cgroups,
    cgroup_mounts,
    host_cgroup_state,
    sandbox_controllers,
)

# Every layout this host can build: all three on a v1 or hybrid host, only
# unified on a cgroup v2 host.
LAYOUTS = ["unified"] if caps.cgroup_layout() == "v2" else ["hybrid", "legacy", "unified"]

pytestmark = [
    pytest.mark.needs("systemd"),
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


@pytest.mark.parametrize("layout", LAYOUTS)
def test_boots_well_under_two_seconds_and_answers_on_its_bus(
    layout: str, host_before: tuple[list[str], set[str]]
) -> None:
    with SystemdSandbox(layout=layout) as sd:
        assert sd.layout == layout
        print(f"{layout}: booted in {sd.boot_seconds:.3f} s")
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
        # The layout inside is the one asked for.
        inside = sd.run(["cat", "/proc/self/mountinfo"], check=True).stdout.decode()
        fstypes = {
            ln.split(" - ")[1].split()[0] for ln in inside.splitlines() if "/sys/fs/cgroup" in ln
        }
        expected = {"unified": {"cgroup2"}, "hybrid": {"tmpfs", "cgroup", "cgroup2"}}
        assert fstypes == expected.get(layout, {"tmpfs", "cgroup"}), inside
    _assert_host_unchanged(host_before, sd)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_systemds_console_reaches_the_sandbox_log(layout: str) -> None:
    """A pty on /dev/console: systemd keeps it (a file gets ENOTTY and is closed)."""
    with SystemdSandbox(layout=layout, log_level="info") as sd:
        assert sd.workdir is not None
        console = (sd.workdir / "console.log").read_text()
        assert re.search(r"^systemd \d+\S* running in system mode", console, re.M), console
        assert "Detected virtualization container-other" in console
        assert "\r" not in console
        assert "\x1b" not in console
        assert console in sd.log()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_controllers_are_what_the_layout_gets_on_this_host(layout: str) -> None:
    with SystemdSandbox(layout=layout) as sd:
        assert sd.controllers == sandbox_controllers(layout)
        if layout == "unified":
            inside = sd.run(["cat", "/sys/fs/cgroup/cgroup.controllers"], check=True)
            assert frozenset(inside.stdout.decode().split()) == sd.controllers
        else:
            mounted = sd.run(["ls", "/sys/fs/cgroup"], check=True).stdout.decode().split()
            assert {m for c in sd.controllers for m in mounted if c in m.split(",")}, mounted
    if caps.cgroup_layout() == "hybrid":
        # This host binds every controller but hugetlb to v1, and leaves hugetlb
        # disabled on its cgroup2 root: a unified sandbox gets none.
        assert sandbox_controllers("unified") == frozenset()
        assert {"memory", "pids", "cpu"} <= sandbox_controllers("hybrid")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_systemd_remounts_only_its_own_cgroup_tmpfs_read_only(
    layout: str, host_before: tuple[list[str], set[str]]
) -> None:
    """The incident: systemd remounts /sys/fs/cgroup read-only.  It must be its own."""
    with SystemdSandbox(layout=layout) as sd:
        inside = sd.run(["cat", "/proc/self/mountinfo"], check=True).stdout.decode()
        line = next(ln for ln in inside.splitlines() if ln.split()[4] == "/sys/fs/cgroup")
        host_dev = os.stat("/sys/fs/cgroup").st_dev
        dev = f"{os.major(host_dev)}:{os.minor(host_dev)}"
        if layout == "unified":
            # One cgroup2 superblock for the machine; this mount is rooted at the
            # sandbox's own cgroup (the namespace's "/"), not the host's root.
            assert line.split()[3] == "/", line
            assert " - cgroup2 " in line, line
        else:
            # systemd did remount it read-only (what once hit the whole machine) ...
            assert line.split()[5].startswith("ro"), line
            # ... but it is a fresh tmpfs, not the host's superblock.
            assert line.split()[2] != dev, line
        # Every cgroup mount inside is rooted at the sandbox's cgroup.
        for ln in inside.splitlines():
            if " - cgroup" in ln and ln.split()[4].startswith("/sys/fs/cgroup"):
                assert ln.split()[3] == "/", ln
        # And the host's view is still read-write while it runs.
        assert host_cgroup_state() == host_before[0]
        assert not os.statvfs("/sys/fs/cgroup").f_flag & os.ST_RDONLY
        if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            # A pure cgroup2 host: no plain file can be made there, a cgroup can.
            probe = os.path.join("/sys/fs/cgroup", unique_name("rfwp"))
            os.mkdir(probe)
            os.rmdir(probe)
        else:
            with open("/sys/fs/cgroup/.rf-write-probe", "w"):
                pass
            os.unlink("/sys/fs/cgroup/.rf-write-probe")
    _assert_host_unchanged(host_before, sd)


class _SkipsFreshMounts(SystemdSandbox):
    """Forgets to unmount the host's cgroup mounts and to mount fresh ones."""

    def _cgroup_mount_lines(self) -> list[str]:
        return []

    def _inner_script(self) -> str:
        return super()._inner_script().replace("umount -R /sys/fs/cgroup\n", "")


HOST_CGROUP2 = next((m.mount_point for m in cgroup_mounts() if m.fstype == "cgroup2"), "")


class _BindsHostCgroup2(SystemdSandbox):
    """Puts a bind of the host's cgroup2 mount where the fresh cgroup2 should be."""

    def _cgroup_mount_lines(self) -> list[str]:
        return ["mount --bind /run/rf-host-cgroup2 /sys/fs/cgroup"]

    def _inner_script(self) -> str:
        keep = f"mkdir /run/rf-host-cgroup2\nmount --bind {HOST_CGROUP2} /run/rf-host-cgroup2\n"
        script = super()._inner_script()
        return script.replace("umount -R /sys/fs/cgroup\n", keep + "umount -R /sys/fs/cgroup\n")


class _BindsHostTmpfs(SystemdSandbox):
    """Puts a (non-recursive) bind of the host's cgroup tmpfs back at /sys/fs/cgroup."""

    def _cgroup_mount_lines(self) -> list[str]:
        return ["mount --bind /run/rf-host-tmpfs /sys/fs/cgroup"]

    def _inner_script(self) -> str:
        keep = "mkdir /run/rf-host-tmpfs\nmount --bind /sys/fs/cgroup /run/rf-host-tmpfs\n"
        script = super()._inner_script()
        return script.replace("umount -R /sys/fs/cgroup\n", keep + "umount -R /sys/fs/cgroup\n")


class _HostCgroupNamespace(SystemdSandbox):
    """Runs in the host's cgroup namespace (a fresh cgroup2 would then be rooted at the
    host's root, and show as "/" too).  The guard refuses before any mount: in the
    host's namespace a cgroup2 mount's options would apply to the whole machine."""

    def _unshare_argv(self) -> list[str]:
        return [a for a in super()._unshare_argv() if a != "--cgroup"]


GUARD_CASES = [
    *[
        (_SkipsFreshMounts, layout, "the host's cgroup hierarchy is still mounted")
        for layout in LAYOUTS
    ],
    (_HostCgroupNamespace, "unified", "its cgroup namespace is the host one"),
]
if HOST_CGROUP2:
    GUARD_CASES.append(
        (
            _BindsHostCgroup2,
            "unified",
            "the host's cgroup hierarchy is still mounted: /sys/fs/cgroup (cgroup2, root /..",
        )
    )
if caps.cgroup_layout() != "v2":
    GUARD_CASES += [
        (_BindsHostTmpfs, "hybrid", "/sys/fs/cgroup is still the host one (tmpfs"),
        (_HostCgroupNamespace, "hybrid", "its cgroup namespace is the host one"),
    ]


@pytest.mark.parametrize(
    ("cls", "layout", "reason"),
    GUARD_CASES,
    ids=[f"{c.__name__[1:]}-{layout}" for c, layout, _ in GUARD_CASES],
)
def test_the_guard_refuses_to_start_systemd_on_the_hosts_cgroup_mounts(
    cls: type[SystemdSandbox], layout: str, reason: str
) -> None:
    """The guard before exec: a launcher that got the mounts wrong stops there.

    /bin/true stands in for systemd, so even a broken guard cannot hurt the host.
    """
    before = host_cgroup_state()
    sandbox = cls(layout=layout, systemd="/bin/true", boot_timeout=5)
    with pytest.raises(SandboxError) as info:
        sandbox.start()
    assert "status 97" in str(info.value)
    assert "refusing to start systemd: " + reason in str(info.value)
    assert host_cgroup_state() == before


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_guard_lets_fresh_mounts_through(layout: str) -> None:
    """The control for the test above: right mounts, and /bin/true is exec'd (status 0)."""
    with pytest.raises(SandboxError) as info:
        SystemdSandbox(layout=layout, systemd="/bin/true", boot_timeout=5).start()
    assert "exited with status 0" in str(info.value)
    assert "refusing" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"log_level": "bogus"}, 'Failed to parse log level "bogus"'),
        (
            {
                "extra_units": {
                    "runtimefaults-sandbox.target": "[Unit]\nDefaultDependencies=no\n"
                    "Requires=rf-nope.service\nAfter=rf-nope.service\n"
                }
            },
            "Unit rf-nope.service not found",
        ),
    ],
    ids=["bad-argument", "missing-unit"],
)
def test_a_failed_boot_says_why(kwargs: dict[str, object], says: str) -> None:
    """systemd's own words reach the error: its console is a pty drained into console.log."""
    with pytest.raises(SandboxError) as info:
        SystemdSandbox(boot_timeout=10, **kwargs).start()  # type: ignore[arg-type]
    assert says in str(info.value)
    assert "Exiting PID 1" in str(info.value)


def test_a_sandbox_journals_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a journal argument, the default journal (the one cleanup reads) records it."""
    monkeypatch.setenv("RUNTIMEFAULTS_STATE_DIR", str(tmp_path / "state"))
    assert default_state_dir() == tmp_path / "state"
    with SystemdSandbox() as sd:
        journals = list((tmp_path / "state").glob("*.jsonl"))
        assert [j.name.split("-")[0] for j in journals] == [str(os.getpid())]
        assert sd.journal.path == journals[0]
        kinds = sorted({r["kind"] for r in sd.journal.live()})
        assert kinds == ["path", "process", "systemd-sandbox-cgroups"]
    assert not list((tmp_path / "state").glob("*.jsonl"))  # all released, file removed


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


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stop_is_idempotent_and_kills_everything_inside(
    layout: str, host_before: tuple[list[str], set[str]]
) -> None:
    sd = SystemdSandbox(layout=layout)
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


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_killed_runs_sandbox_is_reaped_from_its_journal(
    layout: str, tmp_path: Path, host_before: tuple[list[str], set[str]]
) -> None:
    # An owner PID that is gone: the journal looks like a SIGKILLed pytest's.
    dead = subprocess.Popen(["true"])
    dead.wait()
    journal = Journal(tmp_path, owner_pid=dead.pid)
    sd = SystemdSandbox(layout=layout, journal=journal)
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
    sd.stop()  # closes its console pty; nothing else is left
    _assert_host_unchanged(host_before, sd)


def test_layouts_this_host_cannot_build_are_refused() -> None:
    if caps.cgroup_layout() == "v2":
        for wrong in ("hybrid", "legacy"):
            with pytest.raises(ValueError, match="cannot be built on a cgroup v2 host"):
                SystemdSandbox(layout=wrong)
    else:
        assert SystemdSandbox(layout="unified").layout == "unified"  # any host can
    assert SystemdSandbox(layout="auto").layout in LAYOUTS
    with pytest.raises(ValueError, match="layout must be auto, hybrid, legacy or unified"):
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


def test_on_a_v2_host_only_unified_can_be_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layout rules for a cgroup v2 host (this machine is hybrid: the host fact is
    replaced, nothing is booted)."""
    monkeypatch.setattr(caps, "cgroup_layout", lambda: "v2")
    assert SystemdSandbox(layout="auto").layout == "unified"
    for layout in ("hybrid", "legacy"):
        with pytest.raises(ValueError, match="cannot be built on a cgroup v2 host"):
            SystemdSandbox(layout=layout)
