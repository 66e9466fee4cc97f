"""``runtimefaults systemd``: boot the sandboxed systemd by hand.

Examples::

    runtimefaults systemd                      # boot, print the bus, wait for Ctrl-C
    runtimefaults systemd --boot-only          # boot, print the boot time, stop
    runtimefaults systemd --cgroup-layout unified   # a pure cgroup2 inside, on any host
    runtimefaults systemd -- runc --systemd-cgroup list   # run one command inside
    runtimefaults systemd --lifecycles 50 --runtime crun  # churn and report leftovers
    runtimefaults systemd --bus-daemon dbus-broker --lifecycles 20   # on dbus-broker
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import threading
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "systemd",
        help="boot a real systemd in its own namespaces (and run a command or a runtime in it)",
        description="Boot systemd as PID 1 of new PID, mount and cgroup namespaces with its own "
        "bus (dbus-daemon or dbus-broker); print its bus address; run COMMAND inside it, or "
        "churn a runtime, or wait for Ctrl-C. The host's cgroup mounts are checked unchanged "
        "at the end.",
    )
    parser.add_argument(
        "--cgroup-layout",
        "--layout",
        dest="layout",
        default="auto",
        choices=("auto", "hybrid", "legacy", "unified"),
        help="cgroup layout inside the sandbox (default: the host's); unified is a pure "
        "cgroup2 with the controllers the host leaves to it",
    )
    parser.add_argument(
        "--bus-daemon",
        default="dbus-daemon",
        choices=("dbus-daemon", "dbus-broker"),
        help="the bus the sandbox runs (default: dbus-daemon; dbus-broker needs the package "
        "dbus-broker)",
    )
    parser.add_argument("--boot-only", action="store_true", help="boot, print, stop")
    parser.add_argument(
        "--lifecycles",
        type=int,
        default=0,
        metavar="N",
        help="run N create/delete lifecycles of --runtime and report times and leftovers",
    )
    parser.add_argument("--runtime", default="runc", help="runc, crun, youki or a path")
    parser.add_argument(
        "--cgroup-driver", default="systemd", choices=("systemd", "cgroupfs"), help="driver"
    )
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="a command to run inside (after --)"
    )
    parser.set_defaults(func=_systemd)


def _systemd(args: argparse.Namespace) -> int:
    from pytest_runtimefaults.journal import Journal
    from pytest_runtimefaults.systemd import (
        SandboxError,
        SystemdSandbox,
        describe,
        host_cgroup_state,
    )

    before = host_cgroup_state()
    command = [c for c in args.command if c != "--"] if args.command else []
    status = 0
    try:
        sandbox = SystemdSandbox(
            layout=args.layout, journal=Journal.default(), bus_daemon=args.bus_daemon
        )
        sandbox.start()
    except (ValueError, SandboxError) as exc:
        print(f"runtimefaults systemd: {exc}", file=sys.stderr)
        return 2
    with sandbox as sd:
        print(describe(sd), end="", flush=True)
        if command:
            env = {
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                "DBUS_SYSTEM_BUS_ADDRESS": sd.inner_bus_address,
            }
            result = sd.run(command, env=env, timeout=None)
            sys.stdout.write(result.stdout.decode(errors="replace"))
            sys.stderr.write(result.stderr.decode(errors="replace"))
            status = result.returncode
        elif args.lifecycles:
            status = _churn(sd, args)
        elif not args.boot_only:
            print("Ctrl-C to stop", flush=True)
            done = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: done.set())
            done.wait()
    changed = host_cgroup_state() != before
    print("host cgroup mounts: " + ("CHANGED" if changed else "unchanged"))
    return 2 if changed else status


def _churn(sd: Any, args: argparse.Namespace) -> int:
    from pytest_runtimefaults.rootfs import build_bundle
    from pytest_runtimefaults.runtime import Runtime

    inspector = sd.inspector()
    baseline = inspector.scopes_and_slices()
    with tempfile.TemporaryDirectory(prefix="rf-bundle-") as tmp:
        bundle = build_bundle(f"{tmp}/b", ["/bin/sleep", "600"])
        with Runtime(args.runtime, cgroup_driver=args.cgroup_driver, sandbox=sd) as rt:
            times, failures = [], 0
            for i in range(args.lifecycles):
                result = rt.lifecycle(bundle, f"rf-cli-{i}")
                if result.ok:
                    times.append(result.duration)
                else:
                    failures += 1
                    print(f"cycle {i}: {result.stderr.strip()[-300:]}")
    left = inspector.wait_gone({u.name for u in inspector.leftovers(baseline)})
    median = statistics.median(times) if times else float("nan")
    print(
        f"{rt.name} ({args.cgroup_driver}): {len(times)}/{args.lifecycles} ok, "
        f"median {median:.4f} s; units left: {sorted(left) or 'none'}; "
        f"processes left: {sorted(sd.processes()) or 'none'}"
    )
    return 1 if failures or left else 0
