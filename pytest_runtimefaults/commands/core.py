"""``runtimefaults doctor`` and ``runtimefaults cleanup``."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    doctor = subparsers.add_parser(
        "doctor", help="print what this host can do and what to install for the rest"
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

    missing = 0
    for cap in caps.probe_all():
        mark = "ok" if cap.ok else "MISSING"
        print(f"{mark:8} {cap.name:15} {cap.detail}")
        if not cap.ok:
            missing += 1
            if cap.remedy:
                print(f"{'':8} {'':15} -> {cap.remedy}")
    print(f"\n{missing} missing" if missing else "\neverything found")
    return 0


def _cleanup(args: argparse.Namespace) -> int:
    from pytest_runtimefaults.journal import reap_dead_owners

    result = reap_dead_owners(args.state_dir, dry_run=args.dry_run)
    verb = "would reap" if args.dry_run else "reaped"
    for record in result.reaped:
        fields = {k: v for k, v in record.items() if k not in ("op", "id", "kind")}
        print(f"{verb} {record['kind']}: {fields}")
    for error in result.errors:
        print(f"error: {error}")
    print(f"{len(result.reaped)} resource(s) from {result.journals} dead run(s)")
    return 1 if result.errors else 0
