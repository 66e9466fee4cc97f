"""Side-by-side measurements for the cni family (run as root: python benchmarks/bench_cni.py).

Prints ratios measured in one run, on this machine, never absolute promises:

* atomic write (temp + fsync + rename + dir fsync) vs in-place write;
* atomic writes with the inotify torn-write watcher running vs without;
* 20 bridge ADDs one after another vs 20 at once (real plugins, private netns);
* how often a reader finds a file torn under the racing writer (the fault's strength);
* podman run with a broken file in its conf dir vs a clean dir.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pytest_runtimefaults.cni import (
    CniDir,
    CniPodman,
    HalfWritten,
    ParallelAdds,
    RacingWriter,
    TornWriteWatcher,
    validate_config,
    write_atomic,
)
from pytest_runtimefaults.netns import CniSandbox

N_WRITES = 50


def in_place(path: Path, conf: dict[str, object]) -> None:
    with open(path, "w") as f:
        json.dump(conf, f)


def time_writes(directory: Path, writer: object, n: int = N_WRITES) -> float:
    conf = {"cniVersion": "1.0.0", "name": "bench", "plugins": [{"type": "bridge"}]}
    start = time.perf_counter()
    for _ in range(n):
        writer(directory / "10-bench.conflist", conf)  # type: ignore[operator]
    return (time.perf_counter() - start) / n


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="rfbench-"))
    # Interleaved rounds, medians: the machine is shared and fsync is noisy.
    atomic_t, naive_t, watched_t = [], [], []
    events = torn = 0
    try:
        for _ in range(7):
            atomic_t.append(time_writes(tmp, write_atomic, 50))
            naive_t.append(time_writes(tmp, in_place, 50))
            with TornWriteWatcher(tmp) as watcher:
                watched_t.append(time_writes(tmp, write_atomic, 50))
            events += watcher.events
            torn += len(watcher.torn)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic, naive = statistics.median(atomic_t), statistics.median(naive_t)
    watched = statistics.median(watched_t)
    print(
        f"write: atomic {atomic * 1e6:.0f} us, in place {naive * 1e6:.0f} us, "
        f"ratio {atomic / naive:.1f}x"
    )
    print(
        f"atomic write with watcher {watched * 1e6:.0f} us vs without "
        f"{atomic * 1e6:.0f} us: ratio {watched / atomic:.2f}x "
        f"({events} inotify events, {torn} torn)"
    )

    if os.geteuid() != 0:
        print("not root: skipping the namespace and podman measurements")
        return
    with CniDir() as cni, CniSandbox() as sandbox:
        conf = cni.bridge()
        ns = sandbox.container()
        sandbox.add(conf, ns, container_id="warm")  # creates the bridge once
        sandbox.delete(conf, ns, container_id="warm")
        start = time.perf_counter()
        namespaces = []
        for i in range(20):  # as ParallelAdds does, one namespace each, but in turn
            namespaces.append(sandbox.container())
            sandbox.add(conf, namespaces[-1], container_id=f"s{i}")
        serial = time.perf_counter() - start
        for i, each in enumerate(namespaces):
            sandbox.delete(conf, each, container_id=f"s{i}")
            sandbox.remove_container(each)
        ops = ParallelAdds(sandbox, conf, 20)
        start = time.perf_counter()
        ops.add_all()
        parallel = time.perf_counter() - start
        ops.delete_all()
        print(
            f"20 ADDs: serial {serial:.3f} s, concurrent {parallel:.3f} s "
            f"(both incl. 20 netns creations), ratio {serial / parallel:.2f}x"
        )

        mac = cni.macvlan(sandbox.master_link())
        with RacingWriter(cni, {"10-mac.conflist": mac}, rng=random.Random(1)):
            reads = torn = 0
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                reads += 1
                torn += validate_config(cni.path("10-mac.conflist").read_bytes()) is not None
        print(f"racing writer: {torn}/{reads} reads torn ({100 * torn / reads:.0f} %)")

        with CniPodman(cni, sandbox) as podman:
            net = cni.bridge()
            cni.write(net, priority=20)
            podman.run(net["name"], "true")  # warm-up
            clean = [_timed(lambda: podman.run(net["name"], "true")) for _ in range(5)]
            with HalfWritten(cni, "05-broken.conflist", cni.bridge()):
                broken = [_timed(lambda: podman.run(net["name"], "true")) for _ in range(5)]
            c, b = statistics.median(clean), statistics.median(broken)
            print(
                f"podman run median: clean dir {c:.3f} s, with a broken file {b:.3f} s, "
                f"ratio {b / c:.2f}x"
            )


def _timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
