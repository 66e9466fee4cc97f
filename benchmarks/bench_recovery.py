"""What recovery, budgets and leak checks cost, measured side by side in one run.

    .venv/bin/python benchmarks/bench_recovery.py

1. Plugin overhead: the same 300 trivial tests with the plugin disabled, with
   it loaded, and with every test marked ``recovers`` (callable probe).
2. ``failure_budget`` per-run overhead: N calls of a trivial body through the
   marker against a plain Python loop.
3. Recovery-time resolution: a probe that turns healthy after T seconds; how
   much later than T the measured recovery time is (poll back-off).
4. Leak-check snapshot costs (each helper of ``leaks``).

Prints a table per measurement; ratios are within one run on one machine.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pytest_runtimefaults import leaks
from pytest_runtimefaults.recovery import CallableProbe, wait_until_healthy

PY = sys.executable


def _pytest(directory: Path, *args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=directory,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - t0


def plugin_overhead(repeats: int = 3) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "test_plain.py").write_text(
            "import pytest\n@pytest.mark.parametrize('i', range(300))\ndef test_x(i):\n    pass\n"
        )
        (d / "test_marked.py").write_text(
            "import pytest\n"
            "@pytest.mark.recovers(within=1, probe=lambda: True)\n"
            "@pytest.mark.parametrize('i', range(300))\n"
            "def test_x(i):\n    pass\n"
        )
        rows = {
            "plugin disabled": ("-p", "no:runtimefaults", "test_plain.py"),
            "plugin loaded": ("test_plain.py",),
            "recovers on every test": ("test_marked.py",),
        }
        times = {name: [_pytest(d, *args) for _ in range(repeats)] for name, args in rows.items()}
    base = statistics.median(times["plugin disabled"])
    print(f"\n1. pytest run of 300 trivial tests (median of {repeats}, subprocess)")
    print(f"{'':28} {'seconds':>8} {'ratio':>6}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:28} {med:8.3f} {med / base:6.2f}")


def budget_overhead(runs: int = 20000) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "test_budget.py").write_text(
            "import pytest\n"
            f"@pytest.mark.failure_budget(runs={runs}, max_rate=0.5)\n"
            "def test_x():\n    assert 1 + 1 == 2\n"
        )
        _pytest(d, "--runtimefaults-report=r.json")
        report = json.loads((d / "r.json").read_text())
        item = report["tests"][0]["duration"]

    def body() -> None:
        assert 1 + 1 == 2

    t0 = time.perf_counter()
    for _ in range(runs):
        try:
            body()
        except Exception:
            pass
    plain = time.perf_counter() - t0
    print(f"\n2. {runs} runs of a trivial body")
    print(f"{'':28} {'us/run':>8} {'ratio':>6}")
    print(f"{'plain Python loop':28} {plain / runs * 1e6:8.2f} {1.0:6.2f}")
    print(f"{'failure_budget (item time)':28} {item / runs * 1e6:8.2f} {item / plain:6.2f}")


def recovery_resolution(repeats: int = 5) -> None:
    print("\n3. recovery-time resolution: probe healthy after T; measured - T (ms)")
    print(f"{'T (s)':>6} {'median':>8} {'worst':>8}")
    for target in (0.01, 0.1, 0.5, 2.0):
        overs = []
        for _ in range(repeats):
            t0 = time.monotonic()
            probe = CallableProbe(lambda t0=t0, target=target: time.monotonic() - t0 >= target)
            result = wait_until_healthy([probe], within=target + 5)
            overs.append((result.seconds - target) * 1000)
        print(f"{target:6.2f} {statistics.median(overs):8.1f} {max(overs):8.1f}")


def snapshot_costs(repeats: int = 200) -> None:
    sock_dir = tempfile.mkdtemp()
    try:
        cases = {
            "child_processes(self)": functools.partial(leaks.child_processes, os.getpid()),
            "descendant_processes(1)": functools.partial(leaks.descendant_processes, 1),
            "processes_by_exe('runc')": functools.partial(leaks.processes_by_exe, "runc"),
            "mounts('/sys/fs/cgroup')": functools.partial(leaks.mounts, "/sys/fs/cgroup"),
            "netns_names()": leaks.netns_names,
            "links()": leaks.links,
            "socket_files(tmpdir)": functools.partial(leaks.socket_files, sock_dir),
            "open_fds(self)": functools.partial(leaks.open_fds, os.getpid()),
        }
        print(
            f"\n4. leak snapshot cost (median of {repeats}, "
            f"{len(os.listdir('/proc'))} /proc entries)"
        )
        print(f"{'':28} {'us':>8}")
        for name, fn in cases.items():
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            print(f"{name:28} {statistics.median(ts) * 1e6:8.1f}")
    finally:
        os.rmdir(sock_dir)


if __name__ == "__main__":
    plugin_overhead()
    budget_overhead()
    recovery_resolution()
    snapshot_costs()
