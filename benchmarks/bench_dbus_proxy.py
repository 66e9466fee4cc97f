"""Added round-trip latency of our D-Bus proxy vs xdg-dbus-proxy, side by side.

A client process makes round trips of ``org.freedesktop.DBus.GetId`` to a
private dbus-daemon: directly, through :class:`DBusFaultProxy` (in this
process, as in a pytest run), through DBusFaultProxy with 20 rules that match
nothing, and through ``xdg-dbus-proxy`` (C, GLib).  Rounds alternate between
the paths so that machine noise hits all of them alike; the median of each
path gives the added latency of each proxy and the ratios.  Also measured: the
time from starting a PrivateBus + proxy to the first successful call.

With ``--fds`` the client also runs negotiating Unix fd passing (as sd-bus
and godbus clients do, so as runc and systemd's tools would), on the direct,
our and xdg paths: the proxy then reads with ``recvmsg`` to carry fds.

    python benchmarks/bench_dbus_proxy.py [--rounds 10] [--calls 400] [--fds]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pytest_runtimefaults.dbus.bus import PrivateBus
from pytest_runtimefaults.dbus.proxy import DBusFaultProxy
from pytest_runtimefaults.dbus.rules import Delay

CLIENT = str(Path(__file__).with_name("_dbus_pingclient.py"))


def ping(address: str, calls: int, fds: bool = False) -> list[float]:
    out = subprocess.run(
        [sys.executable, CLIENT, address, str(calls), *(["fds"] if fds else [])],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return [float(x) for x in out.stdout.split()]


def start_xdg(upstream: str, directory: str) -> tuple[subprocess.Popen[bytes], str]:
    path = os.path.join(directory, "xdg-bus")
    proc = subprocess.Popen(["xdg-dbus-proxy", upstream, path])
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"xdg-dbus-proxy did not start (exit {proc.returncode})")
        time.sleep(0.005)
    return proc, f"unix:path={path}"


def startup_times(n: int) -> list[float]:
    """Seconds from nothing to a proxied bus that answered a call."""
    from jeepney import DBusAddress, new_method_call
    from jeepney.io.blocking import open_dbus_connection

    target = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")
    times = []
    for _ in range(n):
        t = time.perf_counter()
        with PrivateBus() as bus, DBusFaultProxy(upstream=bus.address) as proxy:
            conn = open_dbus_connection(bus=proxy.address)
            conn.send_and_get_reply(new_method_call(target, "GetId"))
            times.append(time.perf_counter() - t)
            conn.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument(
        "--fds", action="store_true", help="also a client that negotiates fd passing"
    )
    args = parser.parse_args()
    if not shutil.which("xdg-dbus-proxy"):
        sys.exit("xdg-dbus-proxy not found: apt-get install xdg-dbus-proxy")
    samples: dict[str, list[float]] = {"direct": [], "ours": [], "ours+20 rules": [], "xdg": []}
    with (
        tempfile.TemporaryDirectory() as tmp,
        PrivateBus() as bus,
        DBusFaultProxy(upstream=bus.address) as ours,
        DBusFaultProxy(upstream=bus.address) as ruled,
    ):
        for i in range(20):  # rules that never match: the cost of checking them
            ruled.add(Delay(1).on(member=f"NoSuchMember{i}"))
        xdg, xdg_address = start_xdg(bus.address, tmp)
        ours.trace.enabled = ruled.trace.enabled = True
        try:
            paths = {
                "direct": bus.address,
                "ours": ours.address,
                "ours+20 rules": ruled.address,
                "xdg": xdg_address,
            }
            if args.fds:
                for name in ("direct", "ours", "xdg"):
                    paths[f"{name} fds"] = paths[name]
                    samples[f"{name} fds"] = []
            for r in range(args.rounds):
                order = list(paths)
                if r % 2:
                    order.reverse()
                for name in order:
                    fds = name.endswith(" fds")
                    samples[name].append(statistics.median(ping(paths[name], args.calls, fds)))
        finally:
            xdg.terminate()
            xdg.wait()
    med = {k: statistics.median(v) for k, v in samples.items()}
    added = {k: med[k] - med["direct"] for k in ("ours", "ours+20 rules", "xdg")}
    print(f"round-trip latency, median of {args.rounds} rounds x {args.calls} calls (us):")
    for k, v in med.items():
        print(f"  {k:14} {v:8.1f}" + (f"   added {added[k]:6.1f}" if k in added else ""))
    print(
        f"added latency ratio ours/xdg:              {added['ours'] / added['xdg']:.2f}"
        "   (goal <= 1.00)"
    )
    print(
        f"added latency ratio 20 rules/no rule:      "
        f"{added['ours+20 rules'] / added['ours']:.2f}   (goal <= 1.10)"
    )

    # The same ratios within each round, whose paths ran a moment apart: steadier
    # on a noisy machine than the ratio of medians taken over the whole run.
    def paired(a: str, b: str, base: str = "direct") -> float:
        return statistics.median(
            (x - d) / (y - d)
            for x, y, d in zip(samples[a], samples[b], samples[base], strict=True)
            if y - d > 1
        )

    print(
        f"paired per round: ours/xdg {paired('ours', 'xdg'):.2f}, "
        f"20 rules/no rule {paired('ours+20 rules', 'ours'):.2f}"
    )
    if args.fds:
        fd_added = {k: med[f"{k} fds"] - med["direct fds"] for k in ("ours", "xdg")}
        print(
            f"client negotiating fds: added ours {fd_added['ours']:.1f}, "
            f"xdg {fd_added['xdg']:.1f}, ratio ours/xdg "
            f"{fd_added['ours'] / fd_added['xdg']:.2f}, "
            f"paired per round {paired('ours fds', 'xdg fds', 'direct fds'):.2f}"
        )
    st = startup_times(20)
    print(
        f"PrivateBus + proxy start to first reply:  median {statistics.median(st) * 1000:.1f} ms"
        f", max {max(st) * 1000:.1f} ms   (goal: median < 100 ms)"
    )


if __name__ == "__main__":
    main()
