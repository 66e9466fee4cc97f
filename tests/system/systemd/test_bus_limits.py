"""runc and crun against a bus at its limits, in a real sandboxed systemd (issue 15).

* ``dbus:connect-eagain``: the proxy in front of systemd's bus stops accepting
  with its backlog full for 2 s (:class:`~pytest_runtimefaults.dbus.limits.
  ConnectBacklogFull`) as ``create`` starts: connect() gets EAGAIN (systemd
  before 254 listened with a backlog of 128; opencontainers/cgroups PR 45).
* ``dbus:connection-cap``: the sandbox's bus capped at 8 connections per user
  and the cap reached (:class:`~pytest_runtimefaults.dbus.limits.
  ConnectionCap`; podman PR 11313: crun ``sd-bus call: No buffer space
  available``).  On dbus-broker, which counts no connections, through its
  per-user fd quota (and a restart of the bus to apply it).

A test-only client that opens a connection per call and leaks it hits the
cap; one that reuses its connection does not (on either bus).

What each version does is a row of the expectations table, judged here.
Recovered means too: nothing left, and the next lifecycle works once lifted.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from findings import judged
from jeepney import DBusAddress, DBusErrorResponse, Properties
from jeepney.bus import get_bus
from jeepney.io.blocking import DBusConnection, open_dbus_connection, prep_socket
from runtime_proxy import (  # noqa: F401 - the fixtures: pytest finds them here
    proxy_fixture,
    rootfs_fixture,
    sandbox_fixture,
)

from pytest_runtimefaults.dbus.limits import LIMITS_EXCEEDED, ConnectBacklogFull, ConnectionCap
from pytest_runtimefaults.dbus.proxy import DBusFaultProxy
from pytest_runtimefaults.expectations import Outcome
from pytest_runtimefaults.rootfs import build_bundle
from pytest_runtimefaults.runtime import Runtime, RuntimeResult
from pytest_runtimefaults.systemd import SystemdSandbox

RUNTIMES = [r for r in ("runc", "crun") if shutil.which(r)]
BOUND = 35.0  # seconds: above runc's 30 s wait for JobRemoved
EAGAIN_FOR = 2.0  # seconds the backlog stays full
CID = "rf-limits"

pytestmark = [
    pytest.mark.needs("systemd"),
    pytest.mark.needs("runc|crun"),
    pytest.mark.timeout(150),
]


def _observe(
    rt: Runtime, sandbox: SystemdSandbox, created: RuntimeResult, baseline: set[str], bundle: Path
) -> tuple[Outcome, str, bool]:
    """(outcome, detail, next lifecycle ok) once the fault is lifted."""
    state = rt.state(CID)
    running_ok = created.ok and state.ok and state.json()["status"] == "created"
    deleted = rt.delete(CID, force=True)
    inspector = sandbox.inspector()
    left = inspector.wait_gone({u.name for u in inspector.leftovers(baseline)})
    processes = sandbox.processes()
    after = rt.lifecycle(bundle)
    err = created.stderr.strip().splitlines()[-1:] or [""]
    detail = (
        f"on {sandbox.bus_daemon}: create rc {created.returncode} in {created.duration:.2f} s: "
        f"{err[0][-200:]!r}; units left {sorted(left)}, processes left {sorted(processes)}; "
        f"next lifecycle {'ok' if after.ok else after.stderr[-200:]}"
    )
    if created.timed_out:
        observed = Outcome.BLOCKS
    elif left or processes:
        observed = Outcome.LEAKS
    elif running_ok and deleted.ok:
        observed = Outcome.SURVIVES
    elif not created.ok:
        observed = Outcome.FAILS_CLEANLY
    else:
        observed = Outcome.MISBEHAVES
    return observed, detail, after.ok


@pytest.mark.parametrize("name", RUNTIMES)
def test_runtime_when_connect_gets_eagain(
    name: str,
    sandbox: SystemdSandbox,
    proxy: DBusFaultProxy,
    rootfs: Path,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """create while systemd's bus socket answers connect() with EAGAIN for 2 s."""
    bundle = build_bundle(tmp_path / "bundle", ["/bin/sleep", "600"], rootfs=rootfs)
    baseline = sandbox.inspector().scopes_and_slices()
    rt = Runtime(
        name, cgroup_driver="systemd", sandbox=sandbox, dbus_address=proxy.address, timeout=BOUND
    )
    with ConnectBacklogFull(proxy, duration=EAGAIN_FOR) as fault:
        created = rt.create(CID, bundle)
    assert fault.applied == 1
    calls = sum(1 for e in proxy.trace.entries() if e.member == "StartTransientUnit")
    observed, detail, after_ok = _observe(rt, sandbox, created, baseline, bundle)
    # Where its create's calls went: through the proxy (after the backlog drained),
    # or elsewhere (go-systemd falls back to /run/systemd/private for root).
    detail += f"; StartTransientUnit calls through the proxy during create: {calls}"
    print(f"{name}: {detail}")
    verdict = judged(record_property, name, "dbus:connect-eagain", observed, detail)
    assert verdict.ok, verdict.message
    assert after_ok, f"the next lifecycle failed once the backlog drained: {detail}"


@pytest.mark.parametrize("name", RUNTIMES)
def test_runtime_past_the_per_user_connection_cap(
    name: str,
    sandbox: SystemdSandbox,
    rootfs: Path,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """create when the bus refuses root's next connection (8 per user, all taken)."""
    bundle = build_bundle(tmp_path / "bundle", ["/bin/sleep", "600"], rootfs=rootfs)
    baseline = sandbox.inspector().scopes_and_slices()
    rt = Runtime(name, cgroup_driver="systemd", sandbox=sandbox, timeout=BOUND)
    with ConnectionCap.of(sandbox, max_per_user=8) as cap:
        created = rt.create(CID, bundle)
    print(f"the bus refused with: {cap.refusal}; the cap held {cap.applied} connections")
    assert cap.applied >= 1
    assert cap.refusal
    observed, detail, after_ok = _observe(rt, sandbox, created, baseline, bundle)
    detail += f"; the bus refused with {cap.refusal!r}"
    print(f"{name}: {detail}")
    verdict = judged(record_property, name, "dbus:connection-cap", observed, detail)
    assert verdict.ok, verdict.message
    assert after_ok, f"the next lifecycle failed once the cap was lifted: {detail}"


MANAGER = DBusAddress(
    "/org/freedesktop/systemd1", "org.freedesktop.systemd1", "org.freedesktop.systemd1.Manager"
)


def _version(conn: DBusConnection) -> str:
    """systemd's Version property: a call that needs systemd, and changes nothing."""
    reply = conn.send_and_get_reply(Properties(MANAGER).get("Version"), timeout=10)
    return str(reply.body[0][1])


def open_connection(address: str) -> DBusConnection:
    """jeepney's open_dbus_connection, but closing the socket when Hello is refused."""
    sock = prep_socket(get_bus(address), False, timeout=5)
    try:
        return DBusConnection(sock)
    except BaseException:
        sock.close()
        raise


def _leak_until_refused(address: str, leaked: list[DBusConnection]) -> Exception:
    """Susceptible: a new connection per call, never closed; the error that ended it."""
    for _ in range(10):
        try:
            conn = open_connection(address)
        except (DBusErrorResponse, ConnectionError) as exc:
            return exc
        leaked.append(conn)
        _version(conn)
    raise AssertionError("10 leaked connections got through: no cap")


def test_a_leaking_systemd_client_hits_the_cap_and_a_reusing_one_does_not(
    sandbox: SystemdSandbox,
) -> None:
    """On the sandbox's bus, dbus-daemon or dbus-broker: 3 connections left under the cap."""
    leaked: list[DBusConnection] = []
    correct: DBusConnection | None = None
    try:
        with ConnectionCap.of(sandbox, max_per_user=8, leave=4) as cap:
            # Opened under the cap (a broker's restart drops earlier connections).
            correct = open_dbus_connection(sandbox.bus_address)
            print(f"{sandbox.bus_daemon} refused with {cap.refusal!r}, {cap.held} held")
            refused = _leak_until_refused(sandbox.bus_address, leaked)
            assert len(leaked) == 3, f"{len(leaked)} got through: the cap did not bite at 4"
            for _ in range(30):
                assert _version(correct)
            if sandbox.bus_daemon == "dbus-daemon":
                assert LIMITS_EXCEEDED in str(refused), refused
                assert cap.refusal == (
                    f"{LIMITS_EXCEEDED}: The maximum number of active connections for UID 0 "
                    "has been reached"
                )
            else:  # dbus-broker closes it during the handshake, saying nothing
                assert isinstance(refused, (ConnectionResetError, BrokenPipeError)), repr(refused)
                assert cap.refusal in (
                    "connect or handshake: [Errno 104] Connection reset by peer",
                    "connect or handshake: [Errno 32] Broken pipe",
                ), cap.refusal
        for conn in leaked:
            conn.close()
        leaked.clear()
        for _ in range(12):  # lifted: the cap is gone
            leaked.append(open_dbus_connection(sandbox.bus_address))
    finally:
        for conn in leaked:
            conn.close()
        if correct is not None:
            correct.close()
