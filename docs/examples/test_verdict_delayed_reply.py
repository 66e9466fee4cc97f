"""Record a verdict, not a pass or a fail: what the runtime did under a delayed reply."""

import pytest

from pytest_runtimefaults.scenarios import lifecycle_outcome, observe, runtime_identity


@pytest.mark.family("dbus", incident=1)
def test_delayed_reply(verdict, runtime, systemd, systemd_dbus_proxy, oci_bundle):
    """A lifecycle whose StartTransientUnit reply comes half a second late."""
    component, version = runtime_identity(runtime)  # "runc", "1.1.5"
    units_before = systemd.inspector().scopes_and_slices()
    systemd_dbus_proxy.add("Delay(0.5) reply_to=StartTransientUnit")
    runtime.timeout = 10  # the bound: a command still running then is "blocked"
    under_fault = [runtime.lifecycle(oci_bundle, "web")]
    systemd_dbus_proxy.clear()
    after = runtime.lifecycle(oci_bundle, "web-after")
    left, gone = observe(systemd, runtime, units_before)  # leftovers; did the bus go away?
    outcome, evidence = lifecycle_outcome(under_fault, after, left, bound=10, gone=gone)
    finding = verdict.record(
        outcome,
        component=component,
        version=version,
        fault="dbus:delay-reply",
        evidence=evidence,
        seconds=under_fault[0].duration,
        leftovers=left,
    )
    # The test passes whatever the verdict: the finding is in the JSON report and
    # JUnit XML, and `runtimefaults scenarios` style gates decide what is acceptable.
    print(finding.shown, "-", finding.message)
