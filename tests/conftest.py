"""Shared test configuration: the suite must leave the host as it found it.

The project's tests run as root against real systemd, runc, CNI plugins and
network namespaces.  One mistake seen on this machine (a systemd sharing the
host's ``/sys/fs/cgroup`` remounted it read-only for the whole machine) is why
every session checks, cheaply, from ``/proc`` and ``/sys`` only:

* at start: ``/sys/fs/cgroup`` is not already read-only (else refuse to run);
* at start and end (:func:`host_invariants`, session scope, autouse): the
  ``/sys/fs/cgroup`` mounts and their ro/rw state, the directories at the root
  of each cgroup hierarchy, the named network namespaces, the host's network
  links, podman's and containerd's host state (``/run/containerd/runc/<ns>`` of
  our containerd namespaces: runc's state, which a containerd outside its own
  mount namespace leaves there), and this process's child processes.

Several pytest runs (xdist workers, other developers' runs) may share the host,
so a namespace or link that *appeared* fails the session only when its name
carries this process's tag (:func:`pytest_runtimefaults.naming.process_tag`),
and one that *disappeared* only when its name is not one test runs and
runtimes use for transient resources (``rf*``, ``cni*``, ``veth*``...); the
rest is reported as a warning.

What a test needs from the host is said once, with ``@pytest.mark.needs(...)``
(see :data:`NEEDS`): the test skips with the reason and the Debian package to
install, or fails under ``--runtimefaults-strict``.  Every test under
``tests/system/`` needs root without saying so (``tests/system/conftest.py``).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_runtimefaults import leaks, naming
from pytest_runtimefaults.fixtures._common import strict
from pytest_runtimefaults.journal import process_starttime

CGROUP_ROOT = "/sys/fs/cgroup"


def _readonly_cgroup_mounts() -> list[str]:
    return sorted(
        m.target
        for m in leaks.mount_table()
        if (m.target == CGROUP_ROOT or m.target.startswith(CGROUP_ROOT + "/")) and m.readonly
    )


def pytest_configure(config: pytest.Config) -> None:
    readonly = _readonly_cgroup_mounts()
    if readonly:
        raise pytest.UsageError(
            f"refusing to run: {', '.join(readonly)} is mounted read-only on this host. "
            "A systemd that shared the host's cgroup mounts (an earlier, broken test run?) "
            "does this to the whole machine, and the suite would fail in confusing ways. "
            "Check `findmnt -R /sys/fs/cgroup`, and once you know nothing depends on the "
            "current state, restore it (e.g. `mount -o remount,rw /sys/fs/cgroup`) or reboot."
        )


def _top_cgroups() -> set[str]:
    """``hierarchy/name`` of the directories at the root of each cgroup hierarchy.

    On a pure cgroup v2 host /sys/fs/cgroup is the one hierarchy: its own
    children, by name alone.
    """
    found: set[str] = set()
    if os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")):
        try:
            return {d.name for d in os.scandir(CGROUP_ROOT) if d.is_dir(follow_symlinks=False)}
        except OSError:
            return found
    try:
        hierarchies = os.listdir(CGROUP_ROOT)
    except OSError:
        return found
    for hierarchy in hierarchies:
        path = os.path.join(CGROUP_ROOT, hierarchy)
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            found.update(
                f"{hierarchy}/{d.name}" for d in os.scandir(path) if d.is_dir(follow_symlinks=False)
            )
        except OSError:
            continue
    return found


@dataclass(frozen=True)
class HostState:
    cgroup_mounts: frozenset[str]
    netns: frozenset[str]
    links: frozenset[str]
    top_cgroups: frozenset[str]
    podman_state: frozenset[str]
    containerd_run: frozenset[str]

    @classmethod
    def take(cls) -> HostState:
        return cls(
            frozenset(leaks.mounts(CGROUP_ROOT)),
            frozenset(leaks.netns_names()),
            frozenset(leaks.links()),
            frozenset(_top_cgroups()),
            frozenset(p for p in PODMAN_HOST_STATE if os.path.lexists(p)),
            frozenset(_containerd_run()),
        )


#: Where containerd and its shims put state whatever their config says (shim
#: sockets, ctr's FIFOs, runc's state): a private containerd must not.
CONTAINERD_RUN = "/run/containerd"


def _containerd_run() -> set[str]:
    found = {CONTAINERD_RUN} if os.path.lexists(CONTAINERD_RUN) else set()
    for sub in ("s", "fifo", "runc"):
        path = os.path.join(CONTAINERD_RUN, sub)
        try:
            found.update(os.path.join(path, name) for name in os.listdir(path))
        except OSError:
            continue
    return found


#: What a podman run without private network state creates on the host (podman
#: 4 with netavark installed picks netavark for a fresh storage and writes its
#: lock and run directory there, even for --network=none): tests must not.
PODMAN_HOST_STATE = (
    "/etc/containers/networks/netavark.lock",
    "/run/containers/networks",
    "/etc/cni/net.d/87-podman-bridge.conflist",
    "/var/lib/cni",
)


def _live_children() -> dict[int, str]:
    """Children of this process that are not zombies: pid -> command line."""
    children: dict[int, str] = {}
    for entry in leaks.child_processes(os.getpid()):
        pid = int(entry.split(" ", 1)[0])
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue
        if state != b"Z":
            children[pid] = cmdline or entry
    return children


def _ours(name: str) -> bool:
    return naming.process_tag() in name


# Names that test runs and runtimes create and delete all the time: another
# run sharing the host may remove them while this session runs.
TRANSIENT_PREFIXES = ("rf", "cni", "netns-", "veth", "podman", "nerdctl", "br-")


def _transient(name: str) -> bool:
    return name.startswith(TRANSIENT_PREFIXES)


@pytest.fixture(scope="session", autouse=True)
def host_invariants(request: pytest.FixtureRequest) -> Iterator[None]:
    """Session scope, autouse: fail the session if it changed the host (see module doc)."""
    before = HostState.take()
    children_before = set(_live_children())
    yield
    problems: list[str] = []
    deadline = time.monotonic() + 10.0
    # Processes being torn down may need a moment to exit and be waited for.
    while True:
        left = {p: c for p, c in _live_children().items() if p not in children_before}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    after = HostState.take()
    if after.cgroup_mounts != before.cgroup_mounts:
        problems.append(
            "the host's /sys/fs/cgroup mounts changed: "
            f"gone {sorted(before.cgroup_mounts - after.cgroup_mounts)}, "
            f"new {sorted(after.cgroup_mounts - before.cgroup_mounts)}"
        )
    if after.podman_state - before.podman_state:
        problems.append(
            "podman state created on the host (a podman run without private network "
            f"state): {sorted(after.podman_state - before.podman_state)}"
        )
    foreign: list[str] = []
    # runc's state directories are named by the containerd namespace (ours carry
    # our tag); shim sockets (hashes) and FIFO directories name no process, so a
    # new one is another run's as likely as ours: reported, not failed on
    # (test_containerd_shims.py checks where our own go).
    new_state = sorted(after.containerd_run - before.containerd_run)
    mine = [p for p in new_state if p.startswith(f"{CONTAINERD_RUN}/runc/") and _ours(p)]
    if mine:
        problems.append(
            f"containerd state created on the host (a containerd outside its own mount "
            f"namespace): {mine[:5]}"
        )
    foreign += [f"containerd state new: {p}" for p in new_state if p not in mine][:10]
    # A systemd that shared the host's cgroup mounts creates init.scope and
    # system.slice at the host's root: units there are never another run's.
    units = sorted(
        c
        for c in after.top_cgroups - before.top_cgroups
        if c.endswith((".scope", ".slice")) or _ours(c)
    )
    if units:
        problems.append(f"cgroups created at the root of the host's hierarchies: {units}")
    foreign += [
        f"cgroup new: {c}" for c in sorted(after.top_cgroups - before.top_cgroups) if c not in units
    ]
    for what, old, new in (
        ("network namespaces", before.netns, after.netns),
        ("host network links", before.links, after.links),
    ):
        gone = old - new
        if any(not _transient(n) for n in gone):
            problems.append(f"{what} disappeared: {sorted(n for n in gone if not _transient(n))}")
        foreign += [f"{what} gone: {n}" for n in sorted(gone) if _transient(n)]
        appeared = new - old
        if any(_ours(n) for n in appeared):
            problems.append(f"{what} left behind: {sorted(n for n in appeared if _ours(n))}")
        foreign += [f"{what} new: {n}" for n in sorted(appeared) if not _ours(n)]
    if left:
        problems.append(
            "child processes of pytest left running (now killed): "
            + "; ".join(f"{pid} {cmd[:120]}" for pid, cmd in sorted(left.items()))
        )
        for pid in left:
            # Our own children, identified by PID and still the same process.
            if process_starttime(pid) is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    unreleased = _unreleased_records(request.config)
    if unreleased:
        # What an object never closed left: the next run's reap undoes it, but a
        # fixture or a test forgot its cleanup.  Inside a scripts/distro container
        # /run and /tmp go with the container: reported there, failed on the host.
        message = (
            f"{len(unreleased)} journal record(s) never released (an object not closed or "
            "a cleanup that forgot journal.release): "
            + "; ".join(_shown(r) for r in unreleased[:5])
        )
        if os.environ.get("RUNTIMEFAULTS_DISTRO"):
            foreign.append(message)
        else:
            problems.append(message)
    if foreign:
        warnings.warn(
            "changed during the run, not named by this process (another pytest run or "
            f"xdist worker, or a runtime's own names): {foreign}",
            pytest.PytestWarning,
            stacklevel=1,
        )
    assert not problems, "the test session changed the host:\n  " + "\n  ".join(problems)


def _unreleased_records(config: pytest.Config) -> list[dict[str, object]]:
    """Live records of this process's journals: the plugin's and the default one."""
    from pytest_runtimefaults import journal as journal_module
    from pytest_runtimefaults._keys import JOURNAL_KEY

    journals = [config.stash.get(JOURNAL_KEY, None), *journal_module._defaults.values()]
    seen: set[int] = set()
    live: list[dict[str, object]] = []
    for journal in journals:
        if journal is None or id(journal) in seen or journal.owner_pid != os.getpid():
            continue
        seen.add(id(journal))
        live += journal.live()
    return live


def _shown(record: dict[str, object]) -> str:
    return f"{record.get('kind')} " + ", ".join(
        f"{k}={str(v)[:80]}" for k, v in sorted(record.items()) if k not in ("op", "id", "kind")
    )


@pytest.fixture
def record_property(request: pytest.FixtureRequest) -> Callable[[str, object], None]:
    """pytest's ``record_property``, without its warning under ``junit_family
    = xunit2`` (pytest's default).  The property goes on the test's
    ``user_properties``, which is what pytest's own fixture does and what the
    JUnit XML writer reads in every family; scripts/matrix-table reads it there."""

    def record(name: str, value: object) -> None:
        request.node.user_properties.append((name, value))

    return record


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp directory with a short path, for Unix sockets (at most 107 bytes).

    ``tmp_path`` under pytest-xdist (``.../popen-gw1/test_long_name0/...``) can
    be too long for a socket path; this one is ``/tmp/rf-t-XXXXXXXX``.
    """
    path = Path(tempfile.mkdtemp(prefix="rf-t-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- what a test needs: one marker, one table ----------------------------------------


@dataclass(frozen=True)
class Need:
    """One thing a test may need from the host: how to check it, and how to get it."""

    present: Callable[[], bool]
    remedy: str


def _command(name: str, package: str) -> Need:
    return Need(lambda: shutil.which(name) is not None, f"apt-get install {package}")


def _busybox() -> bool:
    from pytest_runtimefaults.rootfs import find_busybox

    return find_busybox() is not None


def _container_cgroups() -> bool:
    from pytest_runtimefaults import caps

    return caps.container_controllers() >= caps.CONTAINER_CONTROLLERS


def _podman_cni() -> bool:
    from pytest_runtimefaults.cni.podman import podman_major

    major = podman_major()
    return major is not None and major < 5


#: Every name ``@pytest.mark.needs(...)`` accepts.  ``"a|b"`` means either will do.
NEEDS: dict[str, Need] = {
    "root": Need(lambda: os.geteuid() == 0, "run the tests as root"),
    "systemd": Need(lambda: os.access("/lib/systemd/systemd", os.X_OK), "apt-get install systemd"),
    "cni-plugins": Need(
        lambda: Path("/usr/lib/cni/bridge").exists(), "apt-get install containernetworking-plugins"
    ),
    "busybox-static": Need(_busybox, "apt-get install busybox-static"),
    "runc": _command("runc", "runc"),
    "crun": _command("crun", "crun"),
    "containerd": _command("containerd", "containerd"),
    "dbus-daemon": _command("dbus-daemon", "dbus-daemon"),
    # Not installed by scripts/setup: Debian's package makes itself the host's
    # system bus at the next boot.  scripts/distro debian13-broker has it.
    "dbus-broker": Need(
        lambda: shutil.which("dbus-broker-launch") is not None,
        "scripts/distro debian13-broker, or apt-get install dbus-broker on a machine whose "
        "system bus may become dbus-broker",
    ),
    "podman": _command("podman", "podman"),
    "tshark": _command("tshark", "tshark"),
    "unshare": _command("unshare", "util-linux"),
    # containerd 2 and podman write cpu.weight / pids.max for every container
    "container-cgroups": Need(
        _container_cgroups,
        "cgroup v2 with the cpu and pids controllers at the root containers are made "
        "under (/sys/fs/cgroup/cgroup.controllers), or cgroup v1",
    ),
    "podman-cni": Need(_podman_cni, "podman 4 (podman 5 has only netavark: the netavark tests)"),
}


def _choices(item: pytest.Item, name: object) -> list[str]:
    """The names *name* (``"a"`` or ``"a|b"``) stands for; a usage error if one is unknown."""
    choices = name.split("|") if isinstance(name, str) else []
    if not choices or any(c not in NEEDS for c in choices):
        raise pytest.UsageError(
            f"{item.nodeid}: @pytest.mark.needs({name!r}): unknown need; "
            f"known: {', '.join(sorted(NEEDS))} (or 'a|b' for either)"
        )
    return choices


def _missing(item: pytest.Item) -> list[str]:
    """What this host lacks of the test's needs, each as ``"NAME (REMEDY)"``."""
    names = dict.fromkeys(n for mark in item.iter_markers("needs") for n in mark.args)
    missing: list[str] = []
    for name in names:
        choices = _choices(item, name)
        if not any(NEEDS[c].present() for c in choices):
            remedy = " or ".join(NEEDS[c].remedy for c in choices)
            missing.append(f"{' or '.join(choices)} ({remedy})")
    return missing


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--needs-only",
        metavar="NAME",
        default=None,
        help="run only the tests marked @pytest.mark.needs(NAME) (scripts/distro sid-hybrid: "
        "the tests that run containers, where the host can give them controllers)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A misspelt need is a usage error at collection, naming the test."""
    for item in items:
        for mark in item.iter_markers("needs"):
            if mark.kwargs:
                raise pytest.UsageError(
                    f"{item.nodeid}: @pytest.mark.needs takes names only, not {sorted(mark.kwargs)}"
                )
            for name in mark.args:
                _choices(item, name)
    only = config.getoption("--needs-only")
    if only is not None:
        if only not in NEEDS:
            raise pytest.UsageError(f"--needs-only={only!r}: known: {', '.join(sorted(NEEDS))}")
        keep = [i for i in items if any(only in m.args for m in i.iter_markers("needs"))]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip (fail under ``--runtimefaults-strict``) a test whose needs are not met.

    Runs before any fixture is set up, so a skipped test starts nothing.
    """
    missing = _missing(item)
    if not missing:
        return
    reason = "needs " + "; ".join(missing)
    if strict(item.config):
        pytest.fail(f"runtimefaults strict mode: {reason}", pytrace=False)
    pytest.skip(reason)
