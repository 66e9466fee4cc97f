"""``runtimefaults scenarios``: run the shipped fault scenarios (the main job)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "scenarios",
        help="run the shipped fault scenarios against a real runtime (the main job)",
        description="Run the incident scenarios shipped in pytest_runtimefaults.scenarios "
        "with pytest and this plugin: a sandboxed systemd with its own dbus-daemon, the "
        "D-Bus fault proxy, and the runtime under test (runc by default). Arguments after "
        "-- go to pytest.",
    )
    parser.add_argument(
        "--runtime",
        default="runc",
        help="runtime under test: runc, crun, youki or a path (default runc)",
    )
    parser.add_argument(
        "--report",
        default="runtimefaults-scenarios.json",
        metavar="FILE",
        help="JSON report of the run (default %(default)s; '' for none)",
    )
    parser.add_argument("-k", dest="keyword", default=None, help="only scenarios matching")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument(
        "pytest_args", nargs=argparse.REMAINDER, help="extra pytest arguments, after --"
    )
    parser.set_defaults(func=_scenarios)


def scenario_argv(args: argparse.Namespace, config_dir: str) -> list[str]:
    """The pytest command line of a scenarios run."""
    # A config file of our own, so that the caller's pytest.ini/pyproject (its addopts,
    # its testpaths, its conftest) does not change what the scenarios do.
    config = os.path.join(config_dir, "pytest.ini")
    with open(config, "w") as f:
        f.write("[pytest]\nxfail_strict = true\n")
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-c",
        config,
        "--rootdir",
        config_dir,
        "-p",
        "runtimefaults",
        "-p",
        "no:cacheprovider",
        "-ra",
        "--pyargs",
        "pytest_runtimefaults.scenarios",
        f"--runtimefaults-runtime={args.runtime}",
    ]
    if args.report:
        argv.append(f"--runtimefaults-report={os.path.abspath(args.report)}")
    if args.keyword:
        argv += ["-k", args.keyword]
    if args.list:
        argv += ["--collect-only", "-q"]
    extra = [a for a in args.pytest_args if a != "--"]
    return argv + extra


def _scenarios(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="rf-scenarios-") as tmp:
        argv = scenario_argv(args, tmp)
        print("runtimefaults scenarios:", " ".join(argv[1:]), flush=True)
        rc = subprocess.call(argv)
    if rc == 5:
        print(
            "runtimefaults scenarios: no scenario ran (exit 5): that is a failure", file=sys.stderr
        )
        return 1
    return rc
