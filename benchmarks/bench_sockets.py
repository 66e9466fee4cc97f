"""Stale sockets and crashing daemons, measured: the tables of docs/sockets.md.

Run as root: ``.venv/bin/python benchmarks/bench_sockets.py [--trials N] [--seed S]``.

1. Every stale_socket variant against the three demo bind policies,
   dbus-daemon and containerd: what each did and whether that was right.
2. Time to serve again after SIGKILL (kill -> ready), against the time of a
   cold start, side by side in one run (the ratio is what to compare).
3. containerd SIGKILLed at seeded moments of ``ctr run --rm``: what each
   interrupted run left behind.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable

from pytest_runtimefaults.containerd import Containerd
from pytest_runtimefaults.daemon import Daemon
from pytest_runtimefaults.sockets import EXPECTED, POLICIES, VARIANTS, StaleSocket, demo_daemon_argv


def dbus_argv(path: str) -> list[str]:
    address = f"unix:abstract={path[1:]}" if path.startswith("@") else f"unix:path={path}"
    return [
        "dbus-daemon",
        "--session",
        "--nofork",
        "--nopidfile",
        "--print-address=1",
        f"--address={address}",
    ]


def judge_daemon(name: str, variant: str) -> str:
    with StaleSocket(variant=variant) as s:
        if name == "containerd":
            ctd = Containerd(socket_path=s.path, ready_timeout=10)
            try:
                ctd.prepare()
                v = s.judge(ctd.daemon)
            finally:
                ctd.stop()
        else:
            argv = dbus_argv(s.path) if name == "dbus-daemon" else demo_daemon_argv(s.path, name)
            ready = r"^unix:" if name == "dbus-daemon" else r"^ready"
            d = Daemon(argv, ready_log=ready, ready_timeout=10, name=name)
            try:
                v = s.judge(d)
            finally:
                d.stop()
    cell = ("ok: " if v.ok else "**WRONG**: ") + v.outcome
    if v.problems:
        cell += (
            " ("
            + "; ".join(
                p.split(" (")[0].split(" at /")[0]
                for p in v.problems
                if not p.startswith(v.outcome)
            )
            + ")"
        )
    cell = cell.replace(" ()", "")
    for n in v.notes:
        cell += " [" + n.split(": ", 1)[1].split(" (")[0] + "]"
    return cell


def table() -> None:
    names = [*POLICIES, "dbus-daemon", "containerd"]
    print("| variant | correct | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for variant in VARIANTS:
        cells = [judge_daemon(n, variant) for n in names]
        print(f"| {variant} | {EXPECTED[variant]} | " + " | ".join(cells) + " |")


def restart_times(trials: int) -> None:
    print("\n| daemon | cold start, median (s) | SIGKILL -> serving again, median (s) | ratio |")
    print("|---|---|---|---|")

    def measure(name: str, make: Callable[[str], Daemon]) -> None:
        cold, again = [], []
        for _ in range(trials):
            with StaleSocket(variant="stale") as s:
                import os

                os.unlink(s.path)
                d = make(s.path)
                try:
                    t = d.start()
                    assert t is not None
                    cold.append(t)
                    again.append(d.crash_restart())
                finally:
                    d.stop()
        c, a = statistics.median(cold), statistics.median(again)
        print(f"| {name} | {c:.4f} | {a:.4f} | {a / c:.2f} |")

    measure("demo (correct)", lambda p: Daemon(demo_daemon_argv(p, "correct"), socket_path=p))
    measure("dbus-daemon", lambda p: Daemon(dbus_argv(p), socket_path=p, ready_log=r"^unix:"))
    cold, again, with_task = [], [], []
    for _ in range(trials):
        with Containerd() as c:
            cold.append(c.daemon.runs[0].seconds_to_ready or 0)
            again.append(c.crash_restart())
    with Containerd() as c:
        image = c.import_busybox()
        c.run(image, "bench", "sleep", "600", detach=True)
        for _ in range(trials):
            with_task.append(c.crash_restart())
        c.remove_all_containers()
    cm, am, wm = (statistics.median(x) for x in (cold, again, with_task))
    print(f"| containerd | {cm:.4f} | {am:.4f} | {am / cm:.2f} |")
    print(f"| containerd, 1 running container | {cm:.4f} | {wm:.4f} | {wm / cm:.2f} |")


def interrupted_runs(trials: int, seed: int) -> None:
    rng = random.Random(seed)
    left: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    again: list[float] = []
    with Containerd() as c:
        image = c.import_busybox()
        for i in range(trials):
            cid = f"b{i}"
            run = subprocess.Popen(
                c.run_argv(image, cid, "sleep", "0.2"),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            time.sleep(rng.uniform(0.0, 0.15))
            c.kill()
            out, _ = run.communicate(timeout=30)
            errors[
                "transport is closing"
                if "transport is closing" in out
                else "connection refused"
                if "connection refused" in out
                else out.strip()[-60:] or f"rc {run.returncode}"
            ] += 1
            c.daemon.start()
            again.append(c.daemon.time_to_serve_again() or 0)
            found = {o.split(":")[0].split(" (")[0].replace(cid, "ID") for o in c.orphans()}
            if cid in c.ctr("containers", "ls", "-q").stdout.split():
                found.add("container record (ctr --rm never removed it)")
            if cid in c.ctr("tasks", "ls", "-q").stdout.split():
                found.add("task")
            for f in found or {"nothing"}:
                left[f] += 1
            c.remove_all_containers()
            c.remove_orphans()
            r = c.ctr(*c.run_argv(image, cid, "true")[5:], check=False)
            if r.returncode != 0:
                left["ID still unusable after cleanup: " + r.stderr.strip()[-70:]] += 1
    print(f"\ncontainerd SIGKILLed during `ctr run --rm`, {trials} seeded moments (seed {seed}):")
    print(f"time to serve again: median {statistics.median(again):.3f} s, max {max(again):.3f} s")
    print("| ctr saw | runs |\n|---|---|")
    for k, n in errors.most_common():
        print(f"| {k} | {n} |")
    print("| left behind | runs |\n|---|---|")
    for k, n in left.most_common():
        print(f"| {k} | {n} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    table()
    restart_times(args.trials)
    interrupted_runs(args.trials * 3, args.seed)


if __name__ == "__main__":
    main()
