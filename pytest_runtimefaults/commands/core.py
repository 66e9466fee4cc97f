"""``runtimefaults doctor`` and ``runtimefaults cleanup``."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    doctor = subparsers.add_parser(
        "doctor", help="print what this host can do and what to install for the rest"
    )
    doctor.add_argument(
        "--strict", action="store_true", help="exit 1 if anything is missing (for CI set-up checks)"
    )
    doctor.set_defaults(func=_doctor)
    cleanup = subparsers.add_parser(
        "cleanup", help="undo resources left by killed runs (journals of dead owners)"
    )
    cleanup.add_argument("--state-dir", default=None, help="journal directory")
    cleanup.add_argument("--dry-run", action="store_true", help="list, change nothing")
    cleanup.set_defaults(func=_cleanup)


def _doctor(args: argparse.Namespace) -> int:
    from pytest_runtimefaults import caps

    capabilities = caps.probe_all()
    width = max(len(c.name) for c in capabilities)
    missing = [c for c in capabilities if not c.ok]
    for cap in capabilities:
        mark = "ok" if cap.ok else "MISSING"
        print(f"{mark:8} {cap.name:{width}}  {cap.detail}")
        if not cap.ok:
            print(f"{'':8} {'':{width}}  needed by: {cap.needed_by}")
            print(f"{'':8} {'':{width}}  fix: {cap.remedy}")
    from pytest_runtimefaults.dbus.proxy import fast_path

    # Not a capability: the pure-Python relay works everywhere, only slower.
    print(f"{'info':8} {'dbus relay':{width}}  {fast_path()}")
    from pytest_runtimefaults.journal import StateDirError, default_state_dir, reap_dead_owners

    try:
        pending = reap_dead_owners(dry_run=True)
    except StateDirError as exc:
        print(f"\nMISSING  journal: {exc}")
        return 1
    for warning in pending.warnings:
        print(f"warning: {warning}")
    for error in pending.errors:
        print(f"would refuse: {error}")
    # Refused records are left by killed runs too: counted, and listed above.
    left = len(pending.reaped) + len(pending.errors)
    if left:
        print(
            f"\n{left} resource(s) left by {pending.journals} killed run(s) in "
            f"{default_state_dir()}: run `runtimefaults cleanup` (or any pytest run) to undo them"
        )
    if not missing:
        print("\neverything found")
        return 0
    print(
        f"\n{len(missing)} missing; tests that need them skip (or fail under "
        "--runtimefaults-strict)."
    )
    commands = caps.install_commands(capabilities)
    if commands:
        print("To install what is missing:")
        for command in commands:
            print(f"  {command}")
    return 1 if args.strict else 0


def _cleanup(args: argparse.Namespace) -> int:
    from pytest_runtimefaults.journal import StateDirError, reap_dead_owners

    try:
        result = reap_dead_owners(args.state_dir, dry_run=args.dry_run)
    except StateDirError as exc:
        print(f"error: {exc}")
        return 2
    for warning in result.warnings:
        print(f"warning: {warning}")
    verb = "would reap" if args.dry_run else "reaped"
    for record in result.reaped:
        fields = {k: v for k, v in record.items() if k not in ("op", "id", "kind")}
        print(f"{verb} {record['kind']}: {fields}")
    for error in result.errors:
        print(f"error: {error}")
    print(f"{len(result.reaped)} resource(s) from {result.journals} dead run(s)")
    return 1 if result.errors else 0
