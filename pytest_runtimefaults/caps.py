"""What this host can do, and what to install for what it cannot.

Used by the report header, by ``runtimefaults doctor`` and by fixtures that
need a capability.  The pytest-facing checks (:func:`require` skips the test
with the reason and the Debian package that provides what is missing, or fails
it when the user asked for ``--runtimefaults-strict``) live in
:mod:`pytest_runtimefaults.fixtures._common`; the names here delegate to it.

Example::

    from pytest_runtimefaults import caps
    caps.require_command(request, "dbus-daemon", package="dbus-daemon")
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest

__all__ = [
    "Capability",
    "cgroup_layout",
    "cgroup_readonly",
    "container_controllers",
    "header_line",
    "install_commands",
    "probe_all",
    "require",
    "require_cgroup_controllers",
    "require_command",
    "require_container_controllers",
    "require_root",
    "resolve_layout",
    "sandbox_controllers",
    "strict_key",
]

CNI_PLUGIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin", "/usr/libexec/cni")


@dataclass(frozen=True)
class Capability:
    """One capability: whether the host has it, a detail, and how to get it.

    *install* is what to type (``apt-get install X`` or ``pip install X``);
    *needed_by* names the fixtures or families that skip without it.
    """

    name: str
    ok: bool
    detail: str
    remedy: str = ""
    needed_by: str = ""
    header: bool = False  # shown in the pytest report header even when present


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


def cgroup_readonly() -> list[str]:
    """``/sys/fs/cgroup`` and the mounts below it that are read-only (should be none)."""
    from pytest_runtimefaults.leaks import mount_table

    return sorted(
        m.target
        for m in mount_table()
        if (m.target == "/sys/fs/cgroup" or m.target.startswith("/sys/fs/cgroup/")) and m.readonly
    )


def systemd_is_pid1() -> bool:
    """True if the host's PID 1 is systemd (sd_booted(3)'s test)."""
    return os.path.isdir("/run/systemd/system")


def cni_plugin_dir() -> Path | None:
    for d in CNI_PLUGIN_DIRS:
        if os.path.exists(os.path.join(d, "bridge")):
            return Path(d)
    return None


def _short_version(line: str) -> str:
    """'D-Bus Message Bus Daemon 1.14.10' -> '1.14.10'; 'systemd 252 (252.39-1)' -> '252'."""
    match = re.search(r"\b(\d+(?:\.\d+)*)\b", line)
    return match.group(1) if match else line


def _tool(name: str, package: str, needed_by: str, *, header: bool = False) -> Capability:
    path = shutil.which(name)
    return Capability(
        name, path is not None, path or "not found", f"apt-get install {package}", needed_by, header
    )


def _module(module: str, pip: str, needed_by: str, extra: str = "") -> Capability:
    found = importlib.util.find_spec(module) is not None
    remedy = f"pip install {pip}" + (f" ({extra})" if extra else "")
    return Capability(
        f"python:{module}", found, "importable" if found else "not importable", remedy, needed_by
    )


@cache
def probe_all() -> tuple[Capability, ...]:
    """Probe everything once per process (a few fast subprocesses, ~50 ms)."""
    caps: list[Capability] = []
    root = os.geteuid() == 0
    caps.append(
        Capability(
            "root",
            root,
            "uid 0" if root else f"uid {os.geteuid()}",
            "run the tests as root (namespaces, cgroups, netns and mounts need it)",
            "systemd, cni, netns, runtime fixtures",
            True,
        )
    )
    dbus = _version(["dbus-daemon", "--version"]) if shutil.which("dbus-daemon") else ""
    caps.append(
        Capability(
            "dbus-daemon",
            bool(dbus),
            _short_version(dbus) if dbus else "not found",
            "apt-get install dbus-daemon",
            "private bus, D-Bus proxy, systemd",
            True,
        )
    )
    sd = (
        _version(["/lib/systemd/systemd", "--version"])
        if os.path.exists("/lib/systemd/systemd")
        else ""
    )
    if not sd:
        where = "not installed"
    elif systemd_is_pid1():
        where = "PID 1"
    else:
        where = "sandboxable (own namespaces)" if root else "not PID 1; sandbox needs root"
    caps.append(
        Capability(
            "systemd",
            bool(sd) and (root or systemd_is_pid1()),
            f"{_short_version(sd)} {where}" if sd else where,
            "apt-get install systemd" if not sd else "run as root to sandbox it",
            "systemd fixtures, runc/crun --systemd-cgroup",
            True,
        )
    )
    readonly = cgroup_readonly()
    caps.append(
        Capability(
            "cgroups",
            not readonly,
            cgroup_layout() + (f", READ-ONLY: {', '.join(readonly)}" if readonly else ""),
            "find out what remounted it (findmnt -R /sys/fs/cgroup), then "
            "mount -o remount,rw /sys/fs/cgroup, or reboot",
            "every runtime test",
            True,
        )
    )
    cni = cni_plugin_dir()
    plugins = sorted(p.name for p in cni.iterdir()) if cni else []
    caps.append(
        Capability(
            "cni",
            bool(plugins),
            f"{len(plugins)} plugins in {cni}" if cni else "no CNI plugins",
            "apt-get install containernetworking-plugins",
            "cni fixtures",
            True,
        )
    )
    found = [name for name in ("runc", "crun", "youki") if shutil.which(name)]
    detail = " ".join(found) or "none"
    if "crun" in found and cgroup_layout() == "hybrid":
        detail += " (crun needs its own cgroup mounts on a hybrid host)"
    caps.append(
        Capability(
            "runtimes", bool(found), detail, "apt-get install runc crun", "runtime fixtures", True
        )
    )
    caps.extend(
        [
            _tool("containerd", "containerd", "containerd events, runtime fixture"),
            _tool("podman", "podman", "podman events, CNI through podman"),
            _tool("busybox", "busybox-static", "container rootfs"),
            _tool("ip", "iproute2", "netns, links, cleanup of them"),
            _tool("unshare", "util-linux", "systemd sandbox, private mounts"),
            _tool("nsenter", "util-linux", "runc/crun inside the systemd sandbox"),
            _tool("tshark", "tshark", "decoding D-Bus pcap files (optional)"),
            _tool("xdg-dbus-proxy", "xdg-dbus-proxy", "proxy overhead benchmark (optional)"),
            _module("pyroute2", "pyroute2", "netns, links"),
            _module(
                "pystemd",
                "pystemd",
                "systemd inspection helpers",
                "builds against libsystemd: apt-get install libsystemd-dev pkg-config",
            ),
            _module("jeepney", "jeepney", "D-Bus clients in tests"),
            _module("xdist", "pytest-xdist", "pytest -n N (optional)"),
        ]
    )
    caps.append(sandbox_controllers_capability())
    return tuple(caps)


def header_line() -> str:
    """The capability line of the pytest report header."""
    parts = []
    for cap in probe_all():
        if cap.header:
            parts.append(f"{cap.name} {cap.detail}" if cap.ok else f"{cap.name} MISSING")
    missing = [c.name for c in probe_all() if not c.ok and not c.header]
    if missing:
        parts.append(f"missing: {' '.join(missing)} (runtimefaults doctor says what to install)")
    return ", ".join(parts)


def install_commands(capabilities: tuple[Capability, ...] | None = None) -> list[str]:
    """One ``apt-get install`` and one ``pip install`` line for everything missing."""
    apt: list[str] = []
    pip: list[str] = []
    for cap in capabilities if capabilities is not None else probe_all():
        if cap.ok:
            continue
        for prefix, bucket in (("apt-get install ", apt), ("pip install ", pip)):
            if cap.remedy.startswith(prefix):
                for pkg in cap.remedy[len(prefix) :].split(" (")[0].split():
                    if pkg not in bucket:
                        bucket.append(pkg)
    lines = []
    if apt:
        lines.append("apt-get update && apt-get install -y " + " ".join(apt))
    if pip:
        lines.append("pip install " + " ".join(pip))
    return lines


def strict_key() -> pytest.StashKey[bool]:
    """The stash key of ``--runtimefaults-strict`` (kept for old callers)."""
    from pytest_runtimefaults._keys import STRICT_KEY

    return STRICT_KEY


# The pytest-facing checks live in fixtures._common; these names stay for old
# callers.  Imported when called, so that ``runtimefaults doctor`` (which reads
# only the probes above) does not load pytest.


def require(request: pytest.FixtureRequest, ok: bool, reason: str, remedy: str = "") -> None:
    """Skip (or fail under ``--runtimefaults-strict``) unless *ok*."""
    from pytest_runtimefaults.fixtures import _common

    _common.require(request, ok, reason, remedy)


def require_command(request: pytest.FixtureRequest, name: str, *, package: str) -> str:
    """Return the path of command *name*, or skip naming the Debian *package*."""
    from pytest_runtimefaults.fixtures import _common

    return _common.require_command(request, name, package=package)


def require_root(request: pytest.FixtureRequest, why: str) -> None:
    """Skip (or fail when strict) unless running as root; *why* says what needs it."""
    from pytest_runtimefaults.fixtures import _common

    _common.require_root(request, why)


# --- cgroup controllers in the systemd sandbox ---------------------------------

CONTROLLERS_REMEDY = (
    "cgroup v2 with them enabled for the children of the cgroup pytest runs in "
    "(cgroup.subtree_control; docs/systemd.md, 'What a CI host must provide'), or "
    "--runtimefaults-cgroup-layout=hybrid or legacy on a cgroup v1 host"
)


SANDBOX_LAYOUTS = ("auto", "hybrid", "legacy", "unified")


def resolve_layout(layout: str) -> str:
    """A systemd sandbox's cgroup layout: ``auto`` -> the host's; one it cannot build -> ValueError.

    ``auto`` is ``unified`` on a cgroup v1 host too when the sandbox's systemd is
    258 or later, which removed cgroup v1 and refuses to boot on it.

    ``unified`` can be built anywhere (a fresh cgroup2 mount in the sandbox's
    namespaces); ``hybrid`` and ``legacy`` need v1 controllers, which a cgroup
    v2 host has bound to cgroup2.
    """
    if layout not in SANDBOX_LAYOUTS:
        raise ValueError(f"cgroup layout must be auto, hybrid, legacy or unified, not {layout!r}")
    host = cgroup_layout()
    if layout == "auto":
        if host != "v2" and _systemd_without_v1():
            # systemd 258 removed cgroup v1: on a v1 host it refuses to boot
            # ("Detected unsupported legacy cgroup hierarchy, refusing execution").
            return "unified"
        return {"v2": "unified", "hybrid": "hybrid", "v1": "legacy"}[host]
    if layout != "unified" and host == "v2":
        raise ValueError(
            f"cgroup layout {layout!r} cannot be built on a cgroup v2 host (every controller "
            "is bound to cgroup2 there); use 'unified' or 'auto'"
        )
    return layout


#: The first systemd without cgroup v1 (its 258 release removed "legacy" and "hybrid").
SYSTEMD_WITHOUT_V1 = 258


@cache
def _systemd_without_v1(systemd: str = "/lib/systemd/systemd") -> bool:
    """True if the sandbox's *systemd* is 258 or later (it cannot boot on cgroup v1)."""
    try:
        out = subprocess.run(
            [systemd, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    match = re.match(r"systemd (\d+)", out)
    return match is not None and int(match.group(1)) >= SYSTEMD_WITHOUT_V1


def _known_controllers() -> set[str]:
    """Every controller this kernel has (``/proc/cgroups``)."""
    try:
        with open("/proc/cgroups") as f:
            return {ln.split()[0] for ln in f if ln.strip() and not ln.startswith("#")}
    except OSError:
        return set()


def sandbox_controllers(layout: str = "auto") -> frozenset[str]:
    """The cgroup controllers a systemd sandbox of *layout* gets on this host.

    The v1 layouts mount every v1 controller the host has.  ``unified``'s
    cgroup2 root is a new child of this process's cgroup2 cgroup, so it gets
    what that cgroup enables for its children (``cgroup.subtree_control``):
    nothing on a hybrid host whose controllers are all bound to v1.

    Example::

        if {"memory", "pids"} <= sandbox_controllers("unified"): ...
    """
    from pytest_runtimefaults.leaks import mount_table

    layout = resolve_layout(layout)
    mounts = [m for m in mount_table() if m.fstype in ("cgroup", "cgroup2")]
    if layout != "unified":
        known = _known_controllers()
        return frozenset(
            c for m in mounts if m.fstype == "cgroup" for c in m.super_options if c in known
        )
    with open("/proc/self/cgroup") as f:
        own = next((ln.rstrip("\n")[3:] for ln in f if ln.startswith("0::")), None)
    for m in mounts:
        if m.fstype == "cgroup2" and own is not None and m.target.startswith("/sys/fs/cgroup"):
            try:
                text = Path(m.target + own.rstrip("/"), "cgroup.subtree_control").read_text()
            except OSError:
                return frozenset()
            return frozenset(text.split())
    return frozenset()


#: What containerd 2 (``cpu.weight`` for every container) and podman
#: (``pids.max``, its default pids limit) write whatever the container asks.
CONTAINER_CONTROLLERS = frozenset({"cpu", "pids"})

CONTAINER_CONTROLLERS_REMEDY = (
    "cgroup v2 with the controllers available at the root of the hierarchy that "
    "containerd and podman make containers in (/sys/fs/cgroup/cgroup.controllers: "
    "a CI runner's default; inside a container they must be delegated to it), or a "
    "cgroup v1 or hybrid host"
)


def container_controllers() -> frozenset[str]:
    """The controllers a container made directly on this host (not in a sandbox) can use.

    containerd and podman, with the cgroupfs driver, make their cgroups below
    the root of each hierarchy: on a cgroup v1 or hybrid host, every v1
    controller mounted; on a pure cgroup v2 host, what the cgroup2 root lists
    in ``cgroup.controllers`` (none in a container that was delegated none:
    this project's Debian sid run, where runc then fails with ``openat2
    .../cpu.weight: no such file or directory``).

    Example::

        if {"cpu", "pids"} <= container_controllers(): ...
    """
    from pytest_runtimefaults.leaks import mount_table

    if cgroup_layout() == "v2":
        try:
            return frozenset(Path("/sys/fs/cgroup/cgroup.controllers").read_text().split())
        except OSError:
            return frozenset()
    known = _known_controllers()
    return frozenset(
        c for m in mount_table() if m.fstype == "cgroup" for c in m.super_options if c in known
    )


def require_container_controllers(
    request: pytest.FixtureRequest, needed: Iterable[str] = CONTAINER_CONTROLLERS
) -> None:
    """Skip (or fail under ``--runtimefaults-strict``) unless containers here get *needed*.

    For tests that run a container through containerd or podman directly on
    the host (see :func:`container_controllers`).
    """
    have = container_controllers()
    missing = sorted(set(needed) - have)
    require(
        request,
        not missing,
        f"containers made on this host get no {', '.join(missing)} cgroup controller "
        f"(available: {' '.join(sorted(have)) or 'none'}; this host is cgroup "
        f"{cgroup_layout()}), and containerd 2 and podman write their limits",
        CONTAINER_CONTROLLERS_REMEDY,
    )


def sandbox_controllers_capability() -> Capability:
    """The capability ``sandbox-cgroup-controllers``: what each sandbox layout gets here."""
    found: dict[str, frozenset[str]] = {}
    for layout in SANDBOX_LAYOUTS[1:]:
        try:
            found[layout] = sandbox_controllers(layout)
        except ValueError:
            continue  # a layout this host cannot build
    detail = "; ".join(f"{k}: {' '.join(sorted(v)) or 'none'}" for k, v in found.items())
    return Capability(
        "sandbox-cgroup-controllers",
        bool(sandbox_controllers("auto")),
        detail,
        CONTROLLERS_REMEDY,
        "runtime tests that set resource limits",
    )


def require_cgroup_controllers(
    request: pytest.FixtureRequest,
    needed: Iterable[str],
    *,
    layout: str = "auto",
    available: Iterable[str] | None = None,
) -> None:
    """Skip (or fail under ``--runtimefaults-strict``) unless the sandbox has *needed*.

    *available* is what a booted sandbox has (``SystemdSandbox.controllers``);
    without it, what a sandbox of *layout* would get on this host.

    Example::

        caps.require_cgroup_controllers(request, {"memory", "pids"}, available=sd.controllers)
    """
    resolved = resolve_layout(layout)
    have = frozenset(available) if available is not None else sandbox_controllers(resolved)
    missing = sorted(set(needed) - have)
    require(
        request,
        not missing,
        f"the {resolved} systemd sandbox has no {', '.join(missing)} cgroup controller "
        f"(it has: {' '.join(sorted(have)) or 'none'}; this host is cgroup {cgroup_layout()})",
        CONTROLLERS_REMEDY,
    )
