"""Benchmark: the systemd sandbox's boot time, and runtime lifecycles with and without the proxy.

Run as root::

    .venv/bin/python benchmarks/bench_runtime.py [--boots 10] [--cycles 40] [--runtimes runc,crun]

For each runtime (systemd cgroup driver, inside one sandbox) it times two kinds
of cycle, side by side in one run, alternating the direct path and the path
through :class:`~pytest_runtimefaults.dbus.proxy.DBusFaultProxy` (no rule), so
that both see the same machine load:

* ``create/delete``: ``create`` then ``delete --force`` (runc's forced delete of
  a created container sleeps 100 ms in its kill loop: a fixed cost);
* ``run``: ``run`` of ``/bin/true`` (create, start, wait, delete in one call).

It prints the medians, the ratio of the medians proxy/direct (goal: at most
1.05), the median of the ratios of adjacent pairs (less sensitive to load that
drifts during the run) and the ratio of the minima (the least disturbed
cycles).  On a loaded machine the three disagree: report all of them.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pytest_runtimefaults.rootfs import build_bundle, build_rootfs
from pytest_runtimefaults.runtime import Runtime, RuntimeResult
from pytest_runtimefaults.systemd import SystemdSandbox, host_cgroup_state


def _median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:7.1f} ms" if values else "      n/a"


def bench_boot(n: int) -> None:
    times = []
    for _ in range(n):
        t0 = time.monotonic()
        with SystemdSandbox() as sd:
            assert sd.boot_seconds is not None
            times.append(sd.boot_seconds)
        times_total = time.monotonic() - t0
    print(
        f"sandbox boot ({n}x): median {_median_ms(times)}, min {min(times) * 1000:.1f} ms, "
        f"max {max(times) * 1000:.1f} ms (last boot+stop {times_total * 1000:.0f} ms)"
    )


def _proxy_factory() -> Callable[[str], object] | None:
    try:
        from pytest_runtimefaults.dbus.proxy import DBusFaultProxy
    except ImportError:
        return None
    return DBusFaultProxy


def bench_runtime(name: str, cycles: int, tmp: Path, rootfs: Path) -> None:
    proxy_cls = _proxy_factory()
    sleeper = build_bundle(tmp / f"{name}-sleep", ["/bin/sleep", "600"], rootfs=rootfs)
    true = build_bundle(tmp / f"{name}-true", ["/bin/true"], rootfs=rootfs)
    with SystemdSandbox() as sd:
        inspector = sd.inspector()
        baseline = inspector.scopes_and_slices()
        direct = Runtime(name, cgroup_driver="systemd", sandbox=sd)
        proxy = None
        via: Runtime | None = None
        if proxy_cls is not None:
            proxy = proxy_cls(sd.bus_address)  # type: ignore[call-arg]
            proxy.__enter__()  # type: ignore[attr-defined]
            via = Runtime(
                name,
                cgroup_driver="systemd",
                sandbox=sd,
                dbus_address=proxy.address,  # type: ignore[attr-defined]
            )
        try:
            results: dict[str, list[float]] = {}
            failures: list[str] = []

            def timed(key: str, fn: Callable[[], RuntimeResult]) -> None:
                t0 = time.monotonic()
                result = fn()
                elapsed = time.monotonic() - t0
                if result.ok:
                    results.setdefault(key, []).append(elapsed)
                else:
                    failures.append(f"{key}: {result.stderr.strip()[-200:]}")

            # Warm up both paths (page cache, first D-Bus connection).
            for rt in filter(None, (direct, via)):
                rt.lifecycle(sleeper)
            # Each pair runs back to back, in a seeded random order, so neither path
            # always follows the other (systemd cleans a scope up after the call).
            rng = random.Random(0)
            paths = [("direct", direct), *([("proxy", via)] if via is not None else [])]
            for i in range(cycles):
                for kind in ("create/delete", "run"):
                    for label, rt in rng.sample(paths, len(paths)):
                        if kind == "run":
                            timed(f"{label} run", lambda rt=rt, i=i: rt.run(f"rf-b-{i}", true))
                        else:
                            timed(f"{label} create/delete", lambda rt=rt: rt.lifecycle(sleeper))
            left = inspector.wait_gone({u.name for u in inspector.leftovers(baseline)})
        finally:
            if proxy is not None:
                proxy.__exit__(None, None, None)  # type: ignore[attr-defined]
    for kind in ("create/delete", "run"):
        d, p = results.get(f"direct {kind}", []), results.get(f"proxy {kind}", [])
        if d and p:
            pairs = statistics.median(b / a for a, b in zip(d, p, strict=False))
            ratio = (
                f"ratio {statistics.median(p) / statistics.median(d):.3f} "
                f"(pairs {pairs:.3f}, minima {min(p) / min(d):.3f})"
            )
        else:
            ratio = "ratio n/a (no proxy)"
        print(
            f"{name:5} systemd driver {kind:14} direct {_median_ms(d)}  proxy {_median_ms(p)}  "
            f"{ratio}  (n={len(d)})"
        )
    if failures:
        print(f"{name}: {len(failures)} failures, first: {failures[:3]}")
    print(f"{name}: units left {sorted(left) or 'none'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=10)
    parser.add_argument("--cycles", type=int, default=40)
    parser.add_argument("--runtimes", default="runc,crun")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    before = host_cgroup_state()
    bench_boot(args.boots)
    with tempfile.TemporaryDirectory(prefix="rf-bench-") as tmp:
        rootfs = build_rootfs(Path(tmp) / "rootfs")
        for name in args.runtimes.split(","):
            if shutil.which(name):
                bench_runtime(name, args.cycles, Path(tmp), rootfs)
            else:
                print(f"{name}: not installed")
    unchanged = host_cgroup_state() == before
    print("host cgroup mounts: " + ("unchanged" if unchanged else "CHANGED"))
    return 0 if unchanged else 1


if __name__ == "__main__":
    sys.exit(main())
