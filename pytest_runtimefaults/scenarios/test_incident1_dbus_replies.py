"""Incident 1 (youki): D-Bus replies after a signal, split, stray, late or reordered.

The runtime talks through the fault proxy to a real, sandboxed systemd and
runs three container lifecycles under each fault; then the fault is lifted,
one more lifecycle runs, and what is left (units, processes, containers) is
listed.  Verdict: survived (every lifecycle worked), failed cleanly (a clear
error within the bound, nothing left, the next lifecycle worked), blocked,
leaked, misbehaved or crashed.
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_runtimefaults.scenarios import lifecycle_outcome, observe, runtime_identity

#: Seconds one runtime command may take under a fault (the slowest rule, Reorder,
#: holds a message for up to 2 s).
BOUND = 15.0

#: (rule, fault id of expectations.FAULTS)
RULES = [
    ("SignalBeforeReply('JobRemoved') reply_to=StartTransientUnit", "dbus:signal-before-reply"),
    ("SignalBeforeReply('copy') reply_to=StartTransientUnit", "dbus:signal-before-reply"),
    ("SplitMessage(3) reply_to=StartTransientUnit", "dbus:split-reply"),
    ("StrayReply('earlier') reply_to=StartTransientUnit", "dbus:stray-reply"),
    ("Duplicate() reply_to=StartTransientUnit", "dbus:duplicate-reply"),
    ("Delay(0.5, ordered=False) reply_to=StartTransientUnit", "dbus:delay-reply"),
    ("Reorder() member=JobRemoved", "dbus:reorder"),
    ("FlipByteOrder() reply_to=StartTransientUnit", "dbus:big-endian-reply"),
]


@pytest.mark.family("dbus", incident=1)
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("rule", "fault"), RULES, ids=[r for r, _ in RULES])
def test_lifecycles_survive(
    verdict: Any,
    runtime: Any,
    systemd: Any,
    systemd_dbus_proxy: Any,
    oci_bundle: Any,
    rule: str,
    fault: str,
) -> None:
    """Three lifecycles under a D-Bus reply fault: each gets its own reply, nothing is left."""
    component, version = runtime_identity(runtime)
    units_before = systemd.inspector().scopes_and_slices()
    applied = systemd_dbus_proxy.add(rule)
    runtime.timeout = BOUND
    results = [runtime.lifecycle(oci_bundle, f"rf-youki-{i}") for i in range(3)]
    fired = applied.applied
    systemd_dbus_proxy.clear()
    for i in range(3):  # whatever a failed or killed lifecycle did not delete
        runtime.delete(f"rf-youki-{i}", force=True)
    after = runtime.lifecycle(oci_bundle, "rf-youki-after")
    left, gone = observe(systemd, runtime, units_before)
    if fired == 0:
        # The fault never met the runtime's traffic: no verdict about it can be reached.
        pytest.fail(f"the fault never fired: {rule} (did the runtime talk to systemd?)")
    outcome, evidence = lifecycle_outcome(results, after, left, bound=BOUND, gone=gone)
    verdict.record(
        outcome,
        component=component,
        version=version,
        fault=fault,
        evidence=evidence,  # the rule is in the scenario id
        seconds=sum(r.duration for r in results),
        leftovers=left,
    )
