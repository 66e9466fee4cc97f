"""The ``runtimefaults`` command: reproduce faults by hand, inspect and clean the host.

Each sub-command lives in a module of :mod:`pytest_runtimefaults.commands` that
defines ``register(subparsers)``; the module is imported only to build the
parser, and what a command runs is imported only when it runs.

Example::

    runtimefaults doctor
    runtimefaults bus
    runtimefaults proxy --upstream unix:path=/run/dbus/system_bus_socket --pcap out.pcap
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMAND_MODULES = (
    "pytest_runtimefaults.commands.core",
    "pytest_runtimefaults.commands.dbus",
    "pytest_runtimefaults.commands.systemd",
    "pytest_runtimefaults.commands.scenarios",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runtimefaults",
        description="Fault injection for container runtimes: run the pieces of "
        "pytest-runtimefaults by hand.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
