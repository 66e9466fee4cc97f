"""How fast can the subscriber swarm observe events, and what does it cost?

Run as root: ``.venv/bin/python benchmarks/bench_subscribers.py [--quick]``.

Measured side by side in one run, on the same event streams:

1. **Observation rate.**  The test-only broadcaster publishes a burst of
   events as fast as it can; a bare client (one socket, one ``recv`` loop,
   no swarm) reads them, then swarms of 1, 10 and 50 steady subscribers do.
   Printed: events/s seen by the slowest subscriber, deliveries/s in total,
   and the ratio to the bare client.  If the swarm of 1 keeps up with the bare
   client, the swarm is not the bottleneck: the daemon is.
2. **containerd.**  The same with containerd's ``Events.Publish`` as the
   source (called from a child process; gRPC, one channel per subscriber),
   against a bare gRPC stream.
3. **The swarm's own cost.**  CPU seconds the pytest process spends per
   delivery (``time.process_time``) and the time ``report()`` takes to judge
   a run.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from pytest_runtimefaults.journal import Journal
from pytest_runtimefaults.subscribers import Churn, Swarm, Transport
from pytest_runtimefaults.transports.broadcaster import Broadcaster

# What this script starts is journaled: if it is killed, the next run (or
# ``runtimefaults cleanup``) reaps the daemons and their directories.
JOURNAL = Journal.default()


def bare_unix(path: str, n: int, publish: Callable[[], object]) -> float:
    """Seconds for one plain client to read *n* events (no swarm)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(b"SUBSCRIBE\n")
    buf = b""
    while b"OK\n" not in buf:
        buf += s.recv(4096)
    buf = buf.split(b"OK\n", 1)[1]
    t0 = time.perf_counter()
    threading.Thread(target=publish, daemon=True).start()
    count = buf.count(b"\n")
    while count < n:
        chunk = s.recv(262144)
        count += chunk.count(b"\n")
    dt = time.perf_counter() - t0
    s.close()
    return dt


def swarm_rate(
    transport: Transport,
    n_subs: int,
    events: int,
    publish: Callable[[], object],
    prime: Callable[[], object],
) -> tuple[float, int, float, float]:
    """(seconds until every subscriber has every event, deliveries, cpu s, judge s)."""
    swarm = Swarm(transport, n_subs, seed=1, churn=Churn(steady=n_subs), grace=10.0)
    with swarm:
        swarm.prime(prime)
        base = [swarm.received_by(i) for i in range(n_subs)]
        cpu0, t0 = time.process_time(), time.perf_counter()
        threading.Thread(target=publish, daemon=True).start()
        deadline = t0 + 120
        while any(swarm.received_by(i) - base[i] < events for i in range(n_subs)):
            if time.perf_counter() > deadline:
                raise TimeoutError("the swarm did not receive every event in 120 s")
            time.sleep(0.002)
        dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    j0 = time.perf_counter()
    report = swarm.report()
    judge = time.perf_counter() - j0
    report.assert_ok()
    return dt, report.deliveries, cpu, judge


def row(
    label: str, events: int, n: int, dt: float, bare: float, cpu: float | None, judge: float | None
) -> None:
    cpu_s = f"{cpu / (events * n) * 1e6:8.1f}" if cpu is not None else "       -"
    judge_s = f"{judge * 1000:8.1f}" if judge is not None else "       -"
    print(
        f"{label:28} {n:5d} {events / dt:10.0f} {events * n / dt:12.0f} "
        f"{bare / dt:7.2f} {cpu_s} {judge_s}"
    )


def header(title: str) -> None:
    print(f"\n{title}")
    print(
        f"{'stream':28} {'subs':>5} {'ev/s each':>10} {'deliveries/s':>12} "
        f"{'vs bare':>7} {'cpu us/dl':>8} {'judge ms':>8}"
    )


def bench_broadcaster(events: int, sizes: list[int]) -> None:
    header(f"test-only broadcaster, {events} events in one burst")
    with Broadcaster(journal=JOURNAL) as server:
        bare = min(
            bare_unix(server.socket_path, events, lambda: server.publish(events, 1000, 0))
            for _ in range(3)
        )
        row("bare socket client", events, 1, bare, bare, None, None)
        for n in sizes:
            dt, _, cpu, judge = swarm_rate(
                server.transport(),
                n,
                events,
                lambda: server.publish(events, 1000, 0),
                lambda: server.publish(1),
            )
            row("swarm (unix line)", events, n, dt, bare, cpu, judge)


def bench_containerd(events: int, sizes: list[int]) -> None:
    from pytest_runtimefaults.containerd import Containerd
    from pytest_runtimefaults.transports.containerd import ContainerdEvents

    header(f"containerd Events.Publish, {events} events")
    with Containerd(journal=JOURNAL) as ctd:
        transport = ContainerdEvents(ctd.address)

        def publish() -> None:
            # In a child process, so this process's CPU time is the swarm's alone.
            code = (
                "import sys\nfrom pytest_runtimefaults.transports.containerd import "
                "ContainerdEvents\nt = ContainerdEvents(sys.argv[1])\n"
                "for _ in range(int(sys.argv[2])): t.publish()\n"
            )
            subprocess.run([sys.executable, "-c", code, ctd.address, str(events)], check=True)

        bare_sub = transport.subscribe()  # one stream, no swarm around it
        transport.publish()
        while bare_sub.receive(0.2) is None:  # until the stream is in place
            transport.publish()
        while bare_sub.receive(0.2) is not None:
            pass
        t0 = time.perf_counter()
        threading.Thread(target=publish, daemon=True).start()
        got = 0
        while got < events:
            if bare_sub.receive(5.0) is not None:
                got += 1
        bare = time.perf_counter() - t0
        bare_sub.cancel()
        row("bare gRPC stream", events, 1, bare, bare, None, None)
        for n in sizes:
            dt, _, cpu, judge = swarm_rate(transport, n, events, publish, transport.publish)
            row("swarm (gRPC)", events, n, dt, bare, cpu, judge)
        transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    args = parser.parse_args()
    scale = 1 if args.quick else 4
    bench_broadcaster(5000 * scale, [1, 10, 50])
    bench_containerd(500 * scale, [1, 10, 50])
    print(
        "\nvs bare: the bare client's time over the swarm's for the same events "
        "(1.00 = the swarm of that size observes as fast as a lone reader).\n"
        "cpu us/dl: CPU microseconds of this process per delivery (swarm + transport).\n"
        "judge ms: SwarmReport computation for the whole run."
    )


if __name__ == "__main__":
    main()
