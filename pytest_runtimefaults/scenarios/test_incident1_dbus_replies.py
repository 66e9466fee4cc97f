"""Incident 1 (youki): D-Bus replies after a signal, split, stray, late or reordered.

The runtime talks through the fault proxy to a real, sandboxed systemd; every
container lifecycle must succeed under each fault and leave no scope behind
(the ``recovers`` marker lifts the fault, probes a lifecycle and checks leaks).
"""

from __future__ import annotations

from typing import Any

import pytest

RULES = [
    "SignalBeforeReply('JobRemoved') reply_to=StartTransientUnit",
    "SignalBeforeReply('copy') reply_to=StartTransientUnit",
    "SplitMessage(3) reply_to=StartTransientUnit",
    "StrayReply('earlier') reply_to=StartTransientUnit",
    "Duplicate() reply_to=StartTransientUnit",
    "Delay(0.5, ordered=False) reply_to=StartTransientUnit",
    "Reorder() member=JobRemoved",
    "FlipByteOrder() reply_to=StartTransientUnit",
]


@pytest.mark.timeout(120)
@pytest.mark.recovers(within=15)
@pytest.mark.parametrize("rule", RULES)
def test_lifecycles_survive(
    runtime: Any, systemd_dbus_proxy: Any, oci_bundle: Any, rule: str
) -> None:
    applied = systemd_dbus_proxy.add(rule)
    for i in range(3):
        result = runtime.lifecycle(oci_bundle, f"rf-youki-{i}")
        assert result.ok, f"{runtime.name} under {rule}: {result.stderr.strip()}"
    assert applied.applied >= 1, f"the fault never fired: {rule}"
