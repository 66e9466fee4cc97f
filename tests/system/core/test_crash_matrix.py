"""SIGKILL a plain Python script that uses a library class, then reap: nothing is left.

Library users get crash safety without pytest: every class that creates
processes, mounts, cgroups, links or namespaces journals them by default (the
default journal, the one ``runtimefaults cleanup`` reads).  Each row of
:data:`SUBJECTS` is a class, a script snippet using it directly, and the
moments at which the script says where it is (``moment("...")``).  The
harness runs the script as a subprocess (no pytest in it), waits for the
chosen moment, snapshots the script's descendants, SIGKILLs the script (only
the script: what it started is left to fend for itself, as after an OOM
kill), counts what is left, reaps with ``runtimefaults cleanup`` or with the
next pytest run, and asserts that nothing is left:

* processes: every descendant of the script seen at the kill;
* paths and mounts: anything in the script's ``$TMPDIR`` (a private one);
* network namespaces, links and cgroups: any whose name carries the script's
  :func:`~pytest_runtimefaults.naming.process_tag`, which every
  :func:`~pytest_runtimefaults.naming.unique_name` holds.

To add a class: add a :class:`Subject` row (its snippet calls ``moment()``
after each interesting step; ``needs`` names the commands it needs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from pytest_runtimefaults import leaks
from pytest_runtimefaults.host import cgroups, proc
from pytest_runtimefaults.rootfs import find_busybox

pytestmark = pytest.mark.timeout(240)


@dataclass(frozen=True)
class Subject:
    """A class under the crash test: the snippet that uses it and its moments."""

    name: str
    snippet: str
    moments: tuple[str, ...]
    needs: tuple[str, ...] = ()
    needs_busybox: bool = False


SUBJECTS = [
    Subject(
        "Daemon",
        """
        from pytest_runtimefaults.daemon import Daemon
        # A daemon that leaves a child in its session: the reaper must find it.
        d = Daemon(["sh", "-c", "sleep 600 & sleep 601"], name="sleeper")
        d.start()
        moment("started")
        d.crash_restart()
        moment("restarted")
        """,
        ("started", "restarted"),
        needs=("sh", "sleep"),
    ),
    Subject(
        "Containerd",
        """
        from pytest_runtimefaults.containerd import Containerd
        ctd = Containerd()
        ctd.start()
        moment("started")
        image = ctd.import_busybox()
        ctd.run(image, "rfcrash", "sleep", "600", detach=True)
        moment("container running")
        """,
        ("started", "container running"),
        needs=("containerd", "ctr", "runc"),
        needs_busybox=True,
    ),
    Subject(
        "NetNS",
        """
        import subprocess
        from pytest_runtimefaults.netns import NetNS
        ns = NetNS().start()
        moment("started")
        subprocess.run(["ip", "-n", ns.name, "link", "add", "v0", "type", "veth",
                        "peer", "name", "v1"], check=True)
        moment("with a veth pair")
        """,
        ("started", "with a veth pair"),
        needs=("ip",),
    ),
    Subject(
        "CniSandbox",
        """
        from pytest_runtimefaults.netns import CniSandbox
        sb = CniSandbox().start()
        moment("started")
        sb.container()
        sb.master_link()
        moment("with a container netns and a master link")
        """,
        ("started", "with a container netns and a master link"),
        needs=("ip",),
    ),
    Subject(
        "Broadcaster",
        """
        from pytest_runtimefaults.transports.broadcaster import Broadcaster
        b = Broadcaster()
        b.start()
        moment("started")
        b.publish(5)
        moment("published")
        """,
        ("started", "published"),
    ),
    Subject(
        "StaleSocket",
        """
        from pytest_runtimefaults.sockets import StaleSocket
        live = StaleSocket(variant="live").start()     # a listener process holds it
        moment("a live listener")
        mounted = StaleSocket(variant="bind-mount").start()
        moment("and a bind mount")
        """,
        ("a live listener", "and a bind mount"),
    ),
    Subject(
        "CniDir",
        """
        from pytest_runtimefaults.cni import CniDir
        d = CniDir().start()
        d.write(d.bridge())
        moment("with a network file")
        """,
        ("with a network file",),
    ),
]

PRELUDE = """
import json, os, time
from pytest_runtimefaults import naming

def moment(name):
    # Tell the harness where we are; at the chosen moment, wait to be killed.
    with open(os.environ["RF_REPORT"], "a") as f:
        f.write(json.dumps({"moment": name, "tag": naming.process_tag()}) + "\\n")
    if name == os.environ["RF_MOMENT"]:
        time.sleep(600)
"""


def _marks(moment: str) -> list[pytest.MarkDecorator]:
    # A running container: containerd 2 writes cpu.weight for it.
    return [pytest.mark.needs("container-cgroups")] if moment == "container running" else []


CASES = [
    pytest.param(s, m, r, id=f"{s.name}-{m.replace(' ', '_')}-{r}", marks=_marks(m))
    for s in SUBJECTS
    for m in s.moments
    for r in ("cleanup", "next-pytest")
]


def _skip_unless_available(subject: Subject) -> None:
    for command in subject.needs:
        if shutil.which(command) is None:
            pytest.skip(f"{command} not found")
    if subject.needs_busybox and find_busybox() is None:
        pytest.skip("no static busybox (apt-get install busybox-static)")


def _descendants(pid: int) -> dict[int, int | None]:
    """PID -> start time of every descendant of *pid* (named exactly: PIDs recycle)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    return {c.pid: proc.starttime(c.pid) for c in children}


def _tagged_cgroups(tag: str) -> list[Path]:
    return [
        child
        for mount in cgroups.cgroup_mounts()
        if os.path.isdir(mount)
        for child in Path(mount).iterdir()
        if child.is_dir() and tag in child.name
    ]


def _leftovers(tag: str, tmpdir: Path, pids: dict[int, int | None]) -> dict[str, list[str]]:
    live = {p for p, start in pids.items() if proc.starttime(p) == start and proc.alive(p)}
    # Daemonised processes (containerd's shims) are no descendants of the
    # script: they are found by the private path they name, their containers
    # by the cgroups named after the script.
    live |= {p for p in proc.pids_with_arg(str(tmpdir)) if proc.alive(p)}
    live |= {p for p in cgroups.tasks(_tagged_cgroups(tag)) if proc.alive(p)}
    found = {
        "process": sorted(f"{p} {proc.comm(p)}" for p in live),
        "path": sorted(os.listdir(tmpdir)),
        "mount": sorted(m for m in leaks.mounts(tmpdir)),
        "netns": sorted(n for n in leaks.netns_names() if tag in n),
        "link": sorted(n for n in leaks.links() if tag in n),
        "cgroup": sorted(str(c) for c in _tagged_cgroups(tag)),
    }
    return {kind: items for kind, items in found.items() if items}


def _wait_clean(tag: str, tmpdir: Path, pids: dict[int, int | None]) -> dict[str, list[str]]:
    # SIGKILL and cgroup removal finish a moment after the reaper returns.
    deadline = time.monotonic() + 15
    while True:
        left = _leftovers(tag, tmpdir, pids)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _force_clean(tag: str, tmpdir: Path, pids: dict[int, int | None]) -> None:
    """After a failure: leave the host as it was (only what this test's script made)."""
    left = {p for p, start in pids.items() if proc.starttime(p) == start}
    left |= set(proc.pids_with_arg(str(tmpdir))) | cgroups.tasks(_tagged_cgroups(tag))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    for root in _tagged_cgroups(tag):
        cgroups.remove_tree(root, timeout=2)
    for name in leaks.netns_names():
        if tag in name:
            subprocess.run(["ip", "netns", "delete", name], check=False)
    for mount in sorted(leaks.mounts(tmpdir), reverse=True):
        subprocess.run(["umount", "-l", mount.split()[0]], check=False)


@pytest.mark.parametrize(("subject", "moment", "reaper"), CASES)
def test_a_sigkilled_script_leaves_nothing_after_reaping(
    subject: Subject,
    moment: str,
    reaper: str,
    short_tmp: Path,
    pytester: pytest.Pytester,
) -> None:
    _skip_unless_available(subject)
    state, tmpdir, report = short_tmp / "state", short_tmp / "tmp", short_tmp / "report"
    tmpdir.mkdir()
    script = short_tmp / "script.py"
    script.write_text(PRELUDE + textwrap.dedent(subject.snippet))
    env = {
        **os.environ,
        "RUNTIMEFAULTS_STATE_DIR": str(state),
        "TMPDIR": str(tmpdir),
        "RF_REPORT": str(report),
        "RF_MOMENT": moment,
    }
    child = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(short_tmp / "stderr", "wb"),  # noqa: SIM115 (closed with the child)
    )
    tag, pids = "", {}
    try:
        deadline = time.monotonic() + 120
        while True:
            lines = report.read_text().splitlines() if report.exists() else []
            reached = [json.loads(line) for line in lines]
            if any(r["moment"] == moment for r in reached):
                tag = reached[-1]["tag"]
                break
            assert child.poll() is None, (short_tmp / "stderr").read_text()
            assert time.monotonic() < deadline, f"never reached {moment!r}"
            time.sleep(0.05)
        pids = _descendants(child.pid)
        child.send_signal(signal.SIGKILL)
        child.wait()
        time.sleep(0.3)  # let PR_SET_PDEATHSIG take those it takes
        before = _leftovers(tag, tmpdir, pids)
        if reaper == "cleanup":
            done = subprocess.run(
                [sys.executable, "-m", "pytest_runtimefaults", "cleanup", f"--state-dir={state}"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            output = done.stdout + done.stderr
            assert done.returncode == 0, output
        else:
            pytester.makepyfile(test_next="def test_fine():\n    pass\n")
            result = pytester.runpytest_subprocess(
                "-p", "runtimefaults", f"--runtimefaults-state-dir={state}", "test_next.py"
            )
            output = result.stdout.str()
            result.assert_outcomes(passed=1, warnings=1)
            assert "errors:" not in output, output
        after = _wait_clean(tag, tmpdir, pids)
        summary = {k: len(v) for k, v in before.items()}
        print(f"MATRIX {subject.name} | {moment} | {reaper} | before {summary} | after {after}")
        assert after == {}, f"left after {reaper}: {after}\n{output}"
        assert list(state.glob("*.jsonl")) == [], "the dead script's journal is still there"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if tag:
            _force_clean(tag, tmpdir, pids)
