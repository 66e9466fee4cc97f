"""What this host can do, and what to install for what it cannot.

Used by the report header, by ``runtimefaults doctor`` and by fixtures that
need a capability: :func:`require` skips the test with the reason and the
Debian package that provides what is missing, or fails it when the user asked
for ``--runtimefaults-strict``.

Example::

    from pytest_runtimefaults import caps
    caps.require_command(request, "dbus-daemon", package="dbus-daemon")
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest

__all__ = [
    "Capability",
    "cgroup_layout",
    "probe_all",
    "require",
    "require_command",
    "require_root",
    "strict_key",
]

CNI_PLUGIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin", "/usr/libexec/cni")


@dataclass(frozen=True)
class Capability:
    """One capability: whether the host has it, a detail, and how to get it."""

    name: str
    ok: bool
    detail: str
    remedy: str = ""


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else ""


def cgroup_layout() -> str:
    """``v2`` (unified), ``hybrid`` (v1 with a cgroup2 mount) or ``v1``."""
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return "v2"
    if os.path.ismount("/sys/fs/cgroup/unified"):
        return "hybrid"
    return "v1"


def systemd_is_pid1() -> bool:
    """True if the host's PID 1 is systemd (sd_booted(3)'s test)."""
    return os.path.isdir("/run/systemd/system")


def cni_plugin_dir() -> Path | None:
    for d in CNI_PLUGIN_DIRS:
        if os.path.exists(os.path.join(d, "bridge")):
            return Path(d)
    return None


@cache
def probe_all() -> tuple[Capability, ...]:
    """Probe everything once per process (a few fast subprocesses)."""
    caps: list[Capability] = []
    root = os.geteuid() == 0
    caps.append(
        Capability(
            "root",
            root,
            "uid 0" if root else f"uid {os.geteuid()}",
            "run as root (namespaces, cgroups and netns need it)",
        )
    )
    dbus = _version(["dbus-daemon", "--version"]) if shutil.which("dbus-daemon") else ""
    caps.append(
        Capability("dbus-daemon", bool(dbus), dbus or "not found", "apt-get install dbus-daemon")
    )
    sd = (
        _version(["/lib/systemd/systemd", "--version"])
        if os.path.exists("/lib/systemd/systemd")
        else ""
    )
    caps.append(
        Capability(
            "systemd",
            bool(sd),
            (sd or "not installed") + ("; PID 1" if systemd_is_pid1() else "; sandboxable"),
            "apt-get install systemd",
        )
    )
    caps.append(Capability("cgroups", True, cgroup_layout()))
    cni = cni_plugin_dir()
    plugins = sorted(p.name for p in cni.iterdir()) if cni else []
    caps.append(
        Capability(
            "cni",
            bool(plugins),
            f"{cni}: {len(plugins)} plugins" if cni else "no CNI plugins",
            "apt-get install containernetworking-plugins",
        )
    )
    found = [name for name in ("runc", "crun", "youki") if shutil.which(name)]
    caps.append(
        Capability("runtimes", bool(found), ", ".join(found) or "none", "apt-get install runc crun")
    )
    for tool, pkg in (
        ("containerd", "containerd"),
        ("podman", "podman"),
        ("busybox", "busybox-static"),
        ("tshark", "tshark"),
        ("xdg-dbus-proxy", "xdg-dbus-proxy"),
    ):
        caps.append(
            Capability(
                tool,
                shutil.which(tool) is not None,
                shutil.which(tool) or "not found",
                f"apt-get install {pkg}",
            )
        )
    return tuple(caps)


def strict_key() -> pytest.StashKey[bool]:
    from pytest_runtimefaults.plugin import STRICT_KEY

    return STRICT_KEY


def require(request: pytest.FixtureRequest, ok: bool, reason: str, remedy: str = "") -> None:
    """Skip (or fail under ``--runtimefaults-strict``) unless *ok*."""
    if ok:
        return
    import pytest

    message = f"{reason} ({remedy})" if remedy else reason
    if request.config.stash.get(strict_key(), False):
        pytest.fail(f"runtimefaults strict mode: {message}", pytrace=False)
    pytest.skip(message)


def require_command(request: pytest.FixtureRequest, name: str, *, package: str) -> str:
    """Return the path of command *name*, or skip naming the Debian *package*."""
    path = shutil.which(name)
    require(request, path is not None, f"{name} not found on PATH", f"apt-get install {package}")
    assert path is not None
    return path


def require_root(request: pytest.FixtureRequest, why: str) -> None:
    require(request, os.geteuid() == 0, f"needs root: {why}", "run the tests as root")
