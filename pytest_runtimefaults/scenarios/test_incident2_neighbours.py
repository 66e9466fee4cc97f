"""Neighbours of incident 2 (issue 15): systemd's answers that a runtime must handle.

* a job that ends badly: JobRemoved of the runtime's scope says ``failed``
  (runc PR 2331, crun PR 331);
* "Unit ... already exists": a live scope of the runtime's name is there
  before the create (runc PR 1124, podman issue 15583, crun PR 348);
* systemd re-executes with the runtime's call unanswered (systemd issue 27204).

Recovered means: the create fails with a clear error (or succeeds, where
the fault allows it) within a bound, nothing is left once the fault is
lifted, nothing the runtime did not make is stopped, and the next lifecycle
succeeds.  What runc and crun versions do is in the expectations table.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from pytest_runtimefaults.dbus.actions import JobResult
from pytest_runtimefaults.expectations import Outcome
from pytest_runtimefaults.scenarios import lifecycle_outcome, observe, runtime_identity
from pytest_runtimefaults.systemd.neighbours import LeftoverScope, ReexecMidCall, scope_name

BOUND = 35.0  # seconds a create may take before we call the runtime blocked (runc waits 30 s)
CID = "rf-neighbour"


def _sandboxed(systemd: Any) -> None:
    """These faults change systemd's own state: only a sandboxed systemd's, never the host's."""
    if not hasattr(systemd, "workdir"):
        pytest.skip("needs the sandboxed systemd (not --runtimefaults-host-systemd)")


def _scope(runtime: Any) -> str:
    try:
        return scope_name(runtime.name, CID)
    except ValueError as exc:
        pytest.skip(str(exc))


@pytest.mark.family("serials", incident=2)
@pytest.mark.timeout(120)
def test_job_that_ended_badly_is_reported(
    verdict: Any, runtime: Any, systemd: Any, systemd_dbus_proxy: Any, oci_bundle: Any
) -> None:
    """JobRemoved of the runtime's scope says ``failed``: create must fail, leaving nothing."""
    component, version = runtime_identity(runtime)
    units_before = systemd.inspector().scopes_and_slices()
    unit = _scope(runtime)
    rule = systemd_dbus_proxy.add(JobResult("failed", unit=unit).on(member="JobRemoved").times(1))
    created = runtime.create(CID, oci_bundle, timeout=BOUND)
    systemd_dbus_proxy.clear()
    runtime.delete(CID, force=True)
    after = runtime.lifecycle(oci_bundle, "rf-after-job")
    left, gone = observe(systemd, runtime, units_before)
    outcome, evidence = lifecycle_outcome([created], after, left, bound=BOUND, gone=gone)
    if outcome is Outcome.SURVIVES and rule.applied:
        outcome, evidence = Outcome.MISBEHAVES, f"took a failed job for a created scope; {evidence}"
    verdict.record(
        outcome,
        component=component,
        version=version,
        fault="dbus:job-removed-result",
        evidence=evidence,
        seconds=created.duration,
        leftovers=left,
    )


@pytest.mark.family("serials", incident=2)
@pytest.mark.timeout(120)
def test_leftover_scope_of_the_runtimes_name(
    verdict: Any, runtime: Any, systemd: Any, systemd_dbus_proxy: Any, oci_bundle: Any
) -> None:
    """A live scope of the runtime's name: fail clearly, never stop what is not its own."""
    _sandboxed(systemd)
    component, version = runtime_identity(runtime)
    inspector = systemd.inspector()
    units_before = inspector.scopes_and_slices()
    unit = _scope(runtime)
    with LeftoverScope(systemd, unit):
        created = runtime.create(CID, oci_bundle, timeout=BOUND)
        runtime.delete(CID, force=True)
        survived = unit in inspector.unit_names(["scope"])
    after = runtime.lifecycle(oci_bundle, CID)
    left, gone = observe(systemd, runtime, units_before)
    outcome, evidence = lifecycle_outcome([created], after, left, bound=BOUND, gone=gone)
    if not survived and outcome in (Outcome.SURVIVES, Outcome.FAILS_CLEANLY):
        outcome = Outcome.MISBEHAVES
        evidence = f"stopped the leftover {unit} (and its process), not its own; {evidence}"
    verdict.record(
        outcome,
        component=component,
        version=version,
        fault="systemd:unit-exists",
        evidence=evidence,
        seconds=created.duration,
        leftovers=left,
    )


@pytest.mark.family("serials", incident=2)
@pytest.mark.timeout(120)
def test_systemd_reexecutes_mid_call(
    verdict: Any, runtime: Any, systemd: Any, systemd_dbus_proxy: Any, oci_bundle: Any
) -> None:
    """systemd re-executes with the runtime's StartTransientUnit unanswered."""
    _sandboxed(systemd)
    component, version = runtime_identity(runtime)
    units_before = systemd.inspector().scopes_and_slices()
    box: dict[str, Any] = {}
    with ReexecMidCall(systemd) as fault:
        thread = threading.Thread(
            target=lambda: box.update(created=runtime.create(CID, oci_bundle, timeout=BOUND))
        )
        thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
            e.member == "StartTransientUnit" and e.type == "method_call"
            for e in systemd_dbus_proxy.trace.entries()
        ):
            time.sleep(0.01)
        time.sleep(0.2)  # through the bus, into systemd's socket behind Reexecute
        fault.lift()
        thread.join(BOUND + 5)
    created = box["created"]
    runtime.delete(CID, force=True)
    after = runtime.lifecycle(oci_bundle, "rf-after-reexec")
    left, gone = observe(systemd, runtime, units_before)
    outcome, evidence = lifecycle_outcome([created], after, left, bound=BOUND, gone=gone)
    verdict.record(
        outcome,
        component=component,
        version=version,
        fault="systemd:reexec-mid-call",
        evidence=evidence,
        seconds=created.duration,
        leftovers=left,
    )


# -- a bus at its limits (dbus/limits.py): connect() gets EAGAIN; the per-user cap ----------


@pytest.mark.family("serials", incident=2)
@pytest.mark.timeout(120)
def test_connect_gets_eagain_as_create_starts(
    verdict: Any,
    runtime: Any,
    systemd: Any,
    systemd_dbus_proxy: Any,
    connect_backlog_full: Any,
    oci_bundle: Any,
) -> None:
    """The bus's backlog is full for 2 s as create starts (systemd < 254; cgroups PR 45).

    Recovered: the create succeeds (it retried, or found another way to
    systemd) or fails at once naming EAGAIN; nothing left; the next lifecycle
    succeeds once the backlog drained.
    """
    component, version = runtime_identity(runtime)
    units_before = systemd.inspector().scopes_and_slices()
    fault = connect_backlog_full(systemd_dbus_proxy, duration=2.0)
    created = runtime.create(CID, oci_bundle, timeout=BOUND)
    fault.lift()
    runtime.delete(CID, force=True)
    after = runtime.lifecycle(oci_bundle, "rf-after-eagain")
    left, gone = observe(systemd, runtime, units_before)
    outcome, evidence = lifecycle_outcome([created], after, left, bound=BOUND, gone=gone)
    verdict.record(
        outcome,
        component=component,
        version=version,
        fault="dbus:connect-eagain",
        evidence=evidence,
        seconds=created.duration,
        leftovers=left,
    )


@pytest.mark.family("serials", incident=2)
@pytest.mark.timeout(120)
def test_per_user_connection_cap_reached(
    verdict: Any, runtime: Any, systemd: Any, connection_cap: Any, oci_bundle: Any
) -> None:
    """The bus refuses root's next connection (8 per user, all held; podman PR 11313).

    Recovered: the create fails at once with a clear error (or gets to systemd
    another way), nothing left, and the next lifecycle succeeds once the held
    connections are released.
    """
    _sandboxed(systemd)
    component, version = runtime_identity(runtime)
    units_before = systemd.inspector().scopes_and_slices()
    cap = connection_cap(systemd, max_per_user=8)
    created = runtime.create(CID, oci_bundle, timeout=BOUND)
    cap.lift()
    runtime.delete(CID, force=True)
    after = runtime.lifecycle(oci_bundle, "rf-after-cap")
    left, gone = observe(systemd, runtime, units_before)
    outcome, evidence = lifecycle_outcome([created], after, left, bound=BOUND, gone=gone)
    verdict.record(
        outcome,
        component=component,
        version=version,
        fault="dbus:connection-cap",
        evidence=f"{evidence}; the bus refused with {cap.refusal!r}",
        seconds=created.duration,
        leftovers=left,
    )


# -- the bus restarts under the runtime (runc PRs 2923 and 3475; crun's `sd-bus call:
# Transport endpoint is not connected`): tests/system/systemd/test_bus_restart.py --


def _when_relayed(proxy: Any, member: str, kind: str, then: Any) -> threading.Thread:
    """A thread that runs *then* 0.2 s after *proxy* relays *member* (a *kind*): inside its hold."""
    errors: list[BaseException] = []

    def wait_and_act() -> None:
        try:
            deadline = time.monotonic() + BOUND
            while not any(e.member == member and e.type == kind for e in proxy.trace.entries()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {kind} {member} through the proxy in {BOUND:g} s")
                time.sleep(0.01)
            time.sleep(0.2)
            then()
        except BaseException as exc:  # raised in the scenario by _joined
            errors.append(exc)

    thread = threading.Thread(target=wait_and_act, name="rf-bus-restart")
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def _joined(thread: threading.Thread) -> None:
    thread.join(BOUND + 30)
    if thread.is_alive():
        raise RuntimeError("the bus restart did not finish (systemctl restart dbus hangs?)")
    errors = thread.errors  # type: ignore[attr-defined]
    if errors:
        raise errors[0]


@pytest.mark.family("serials", incident=2)
@pytest.mark.timeout(150)
@pytest.mark.parametrize("moment", ["mid-call", "before-jobremoved"])
def test_bus_restarts_while_create_waits(
    moment: str,
    verdict: Any,
    runtime: Any,
    systemd: Any,
    systemd_dbus_proxy: Any,
    oci_bundle: Any,
) -> None:
    """The bus restarts while create waits on systemd: reconnect, or fail cleanly."""
    _sandboxed(systemd)
    from pytest_runtimefaults.dbus.actions import Delay

    component, version = runtime_identity(runtime)
    units_before = systemd.inspector().scopes_and_slices()
    proxy = systemd_dbus_proxy
    proxy.trace.clear()  # the restart waits for this create's call, not an earlier one
    if moment == "mid-call":  # the StartTransientUnit reply held 1 s, the restart inside
        rule = proxy.add(Delay(1.0).on_reply(member="StartTransientUnit"))
        thread = _when_relayed(proxy, "StartTransientUnit", "method_call", systemd.restart_bus)
    else:  # the reply came; JobRemoved held 2 s, the restart inside
        rule = proxy.add(Delay(2.0).on(member="JobRemoved"))
        thread = _when_relayed(proxy, "JobRemoved", "signal", systemd.restart_bus)
    created = runtime.create(CID, oci_bundle, timeout=BOUND)
    _joined(thread)
    proxy.clear()
    runtime.delete(CID, force=True)
    after = runtime.lifecycle(oci_bundle, "rf-after-restart")
    left, gone = observe(systemd, runtime, units_before)
    outcome, evidence = lifecycle_outcome([created], after, left, bound=BOUND, gone=gone)
    if not rule.applied:
        raise RuntimeError("the hold never fired: the restart fell outside the call")
    verdict.record(
        outcome,
        component=component,
        version=version,
        fault=f"dbus:bus-restart-{moment}",
        evidence=f"on {systemd.bus_daemon}: {evidence}",
        seconds=created.duration,
        leftovers=left,
    )


# -- signals flood while the runtime closes (godbus issues 94, 158): dbus/flood.py,
# tests/system/systemd/test_signal_flood.py --


@pytest.mark.family("serials", incident=2)
@pytest.mark.timeout(150)
def test_signal_flood_as_the_runtime_closes(
    verdict: Any, runtime: Any, systemd: Any, systemd_dbus_proxy: Any, oci_bundle: Any
) -> None:
    """5000 forged JobRemoved behind each real one as the runtime closes: ignore them."""
    from pytest_runtimefaults.dbus.flood import SignalFlood

    component, version = runtime_identity(runtime)
    units_before = systemd.inspector().scopes_and_slices()
    rule = systemd_dbus_proxy.add(SignalFlood(5000, "JobRemoved").on(member="JobRemoved"))
    created = runtime.create(CID, oci_bundle, timeout=BOUND)
    deleted = runtime.delete(CID, force=True)
    systemd_dbus_proxy.clear()
    after = runtime.lifecycle(oci_bundle, "rf-after-flood")
    left, gone = observe(systemd, runtime, units_before)
    outcome, evidence = lifecycle_outcome([created, deleted], after, left, bound=BOUND, gone=gone)
    if not rule.applied:
        raise RuntimeError("no JobRemoved reached the runtime: the flood never came")
    verdict.record(
        outcome,
        component=component,
        version=version,
        fault="dbus:signal-flood-jobremoved",
        evidence=f"{rule.applied} bursts; {evidence}",
        seconds=created.duration,
        leftovers=left,
    )
