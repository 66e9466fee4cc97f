"""Incident 2 (systemd 11809, runc): systemd's serials pass 0xffffffff.

The fault proxy rewrites the serials of what the sandboxed systemd sends so
that they reach 0xffffffff, then continue at 0x80000000 (``cycle``: systemd
after PR 11818), wrap to 1 (``wrap``), or stop (``stall``: PID 1 can send
nothing more, as once sd-bus refused to seal messages).  Recovered means: the
runtime's create fails within a bound with a clear error (no runtime process
left blocked), nothing half-made remains once the fault is lifted, and the
next lifecycle succeeds.  What runc and crun versions are known to do here is
in the expectations table (pytest_runtimefaults/expectations.py), not here.
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_runtimefaults.dbus.rules import Serials
from pytest_runtimefaults.scenarios import lifecycle_outcome, observe, runtime_identity

BOUND = 10.0  # seconds a create may take before we call the runtime blocked


@pytest.mark.family("serials", incident=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["cycle", "wrap"])
def test_serials_past_the_boundary_after_the_fix(
    verdict: Any, runtime: Any, systemd: Any, systemd_dbus_proxy: Any, oci_bundle: Any, mode: str
) -> None:
    """systemd's serials continue past 0xffffffff (cycle or wrap): three lifecycles still work."""
    component, version = runtime_identity(runtime)
    inspector = systemd.inspector()
    units_before = inspector.scopes_and_slices()
    sender = inspector.unique_name()
    systemd_dbus_proxy.add(
        Serials(0xFFFFFFF8, on_overflow=mode).on(direction="to_client", sender=sender)
    )
    runtime.timeout = BOUND
    results = [runtime.lifecycle(oci_bundle, f"rf-serials-{i}") for i in range(3)]
    systemd_dbus_proxy.clear()
    for i in range(3):
        runtime.delete(f"rf-serials-{i}", force=True)
    after = runtime.lifecycle(oci_bundle, "rf-serials-after")
    left, gone = observe(systemd, runtime, units_before)
    outcome, evidence = lifecycle_outcome(results, after, left, bound=BOUND, gone=gone)
    verdict.record(
        outcome,
        component=component,
        version=version,
        fault=f"systemd:serials-{mode}",
        evidence=evidence,
        seconds=sum(r.duration for r in results),
        leftovers=left,
    )


@pytest.mark.family("serials", incident=2)
@pytest.mark.timeout(120)
def test_stalled_systemd_fails_create_within_a_bound(
    verdict: Any, runtime: Any, systemd: Any, systemd_dbus_proxy: Any, oci_bundle: Any
) -> None:
    """systemd stalls at serial 0xffffffff: create must fail within 10 s and leave nothing."""
    component, version = runtime_identity(runtime)
    inspector = systemd.inspector()
    units_before = inspector.scopes_and_slices()
    sender = inspector.unique_name()
    systemd_dbus_proxy.add(
        Serials(0xFFFFFFFF, on_overflow="stall").on(direction="to_client", sender=sender)
    )
    created = runtime.create("rf-stall", oci_bundle, timeout=BOUND)
    # Lift the fault and delete whatever the runtime made, then look at what is left.
    systemd_dbus_proxy.clear()
    runtime.delete("rf-stall", force=True)
    after = runtime.lifecycle(oci_bundle, "rf-after-stall")
    left, gone = observe(systemd, runtime, units_before)
    outcome, evidence = lifecycle_outcome([created], after, left, bound=BOUND, gone=gone)
    verdict.record(
        outcome,
        component=component,
        version=version,
        fault="systemd:serial-overflow-stall",
        evidence=evidence,
        seconds=created.duration,
        leftovers=left,
    )
