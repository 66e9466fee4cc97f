"""Incident 2 (systemd 11809, runc): systemd's serials pass 0xffffffff.

With ``on_overflow="stall"`` the sandboxed systemd can send nothing more, as
PID 1 could not once sd-bus refused to seal messages.  Recovered means: the
runtime's create fails within a bound with a clear error (no runtime process
left blocked), nothing half-made remains once the fault is lifted, and the
next lifecycle succeeds.  runc 1.1.5 and crun 1.8.1 block instead (see
docs/systemd.md): once recovery has been checked, the scenario records that
as an expected failure for them, and as a failure for any other runtime.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from pytest_runtimefaults.dbus.rules import Serials

BOUND = 10.0  # seconds a create may take before we call the runtime blocked


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["cycle", "wrap"])
def test_serials_past_the_boundary_after_the_fix(
    runtime: Any, systemd: Any, systemd_dbus_proxy: Any, oci_bundle: Any, mode: str
) -> None:
    """systemd after PR 11818 continues its serials: the runtime never notices."""
    sender = systemd.inspector().unique_name()
    systemd_dbus_proxy.add(
        Serials(0xFFFFFFF8, on_overflow=mode).on(direction="to_client", sender=sender)
    )
    for i in range(3):
        result = runtime.lifecycle(oci_bundle, f"rf-serials-{i}")
        assert result.ok, result.stderr


@pytest.mark.timeout(120)
@pytest.mark.xfail(
    strict=True,
    reason="runc 1.1.5 and crun 1.8.1 wait for systemd with no "
    "timeout: a stalled systemd blocks them (incident 2)",
)
def test_stalled_systemd_fails_create_within_a_bound(
    runtime: Any, systemd: Any, systemd_dbus_proxy: Any, oci_bundle: Any
) -> None:
    inspector = systemd.inspector()
    baseline = inspector.scopes_and_slices()
    sender = inspector.unique_name()
    systemd_dbus_proxy.add(
        Serials(0xFFFFFFFF, on_overflow="stall").on(direction="to_client", sender=sender)
    )
    started = time.monotonic()
    created = runtime.create("rf-stall", oci_bundle, timeout=BOUND)
    elapsed = time.monotonic() - started
    # Lift the fault and clean up whatever the runtime left, then judge.
    systemd_dbus_proxy.clear()
    runtime.delete("rf-stall", force=True)
    inspector.wait_gone({u.name for u in inspector.leftovers(baseline)}, timeout=5)
    after = runtime.lifecycle(oci_bundle, "rf-after-stall")
    assert after.ok, f"the next lifecycle failed once systemd answered again: {after.stderr}"
    assert not created.timed_out, (
        f"{runtime.name} create was still blocked after {elapsed:.1f} s (no timeout on its "
        "D-Bus calls to systemd)"
    )
    assert not created.ok
