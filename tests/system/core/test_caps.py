"""Capabilities: the header line, ``runtimefaults doctor`` and what it tells you to install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_runtimefaults import caps, expectations
from pytest_runtimefaults.journal import Journal

pytestmark = pytest.mark.timeout(60)


def _doctor(*args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, "-m", "pytest_runtimefaults", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def test_doctor_on_this_host_finds_the_tools() -> None:
    out = _doctor().stdout
    for line in ("ok       root", "ok       dbus-daemon", "ok       runtimes", "ok       cni"):
        assert line in out, out


def test_doctor_says_what_to_install_for_what_is_missing() -> None:
    """With an empty PATH every command is missing: each gets its package, once."""
    proc = _doctor(path="/nonexistent")
    assert proc.returncode == 0
    out = proc.stdout
    assert "MISSING  dbus-daemon" in out
    assert "fix: apt-get install dbus-daemon" in out
    assert "needed by: private bus, D-Bus proxy, systemd" in out
    install = next(line for line in out.splitlines() if "apt-get install -y" in line)
    assert "dbus-daemon" in install
    assert "runc crun" in install
    assert install.count("util-linux") == 1
    strict = _doctor("--strict", path="/nonexistent")
    assert strict.returncode == 1


def test_install_commands_split_apt_and_pip() -> None:
    missing = (
        caps.Capability("x", False, "", "apt-get install a b"),
        caps.Capability("y", False, "", "apt-get install b"),
        caps.Capability("python:z", False, "", "pip install z (needs apt-get install libz-dev)"),
        caps.Capability("ok", True, "", "apt-get install never"),
    )
    assert caps.install_commands(missing) == [
        "apt-get update && apt-get install -y a b",
        "pip install z",
    ]


def _cgroup_layout() -> str:
    """This machine's layout in caps' words, from /proc/self/mounts (not through caps)."""
    mounts = {
        m.split()[1]: m.split()[2] for m in Path("/proc/self/mounts").read_text().splitlines()
    }
    if mounts.get("/sys/fs/cgroup") == "cgroup2":
        return "v2"
    return "hybrid" if mounts.get("/sys/fs/cgroup/unified") == "cgroup2" else "v1"


def test_header_line_reports_the_host() -> None:
    # The versions installed here, whatever the release (Debian 12: dbus
    # 1.14.10, systemd 252; scripts/distro runs this in 13 and sid too).
    dbus = expectations.installed_version("dbus-daemon")
    systemd = expectations.installed_version("systemd")
    assert dbus is not None, "dbus-daemon --version printed no version"
    assert systemd is not None, "systemctl --version printed no version"
    line = caps.header_line()
    assert line.startswith(f"root uid 0, dbus-daemon {dbus}")
    assert f"cgroups {_cgroup_layout()}" in line
    assert "runtimes runc crun" in line
    assert f"systemd {systemd.parts[0]} sandboxable" in line
    assert caps.cgroup_readonly() == []


def test_doctor_mentions_what_killed_runs_left(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    Journal(tmp_path, owner_pid=dead.pid).add("path", path=str(tmp_path / "gone"))
    env = {**os.environ, "RUNTIMEFAULTS_STATE_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "pytest_runtimefaults", "doctor"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    ).stdout
    assert (
        f"1 resource(s) left by 1 killed run(s) in {tmp_path}: run `runtimefaults cleanup`" in out
    )
    assert list(tmp_path.glob("*.jsonl")), "doctor must not reap"
