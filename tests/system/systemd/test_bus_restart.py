"""The bus restarts under the runtime (runc PRs 2923 and 3475, crun's
``sd-bus call: Transport endpoint is not connected``).

``systemctl restart dbus`` closes every connection to the bus, while systemd
keeps the listening socket, so a client that reconnects gets through at once
and one that keeps its old connection fails for good.  Two ways to cause it
mid-call: :meth:`SystemdSandbox.restart_bus` (the real restart, dbus-daemon or
dbus-broker as the session's ``--runtimefaults-bus-daemon`` says) and
:meth:`DBusFaultProxy.drop_connections` (the proxy closes its clients' connections,
and may refuse new ones for a while).  The call is held by a ``Delay`` rule so the
restart falls inside it, every time.

The two test-only clients show the fault catches its bug class; runc's and
crun's outcomes are judged by the expectations table
(``dbus:bus-restart-mid-call``, ``dbus:bus-restart-before-jobremoved``).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from findings import judged
from jeepney import DBusAddress, new_method_call
from jeepney.auth import AuthenticationError
from jeepney.io.blocking import DBusConnection, open_dbus_connection
from runtime_proxy import (  # noqa: F401 - the fixtures: pytest finds them here
    proxy_fixture,
    rootfs_fixture,
    runtime_through,
    sandbox_fixture,
)

from pytest_runtimefaults.dbus.proxy import DBusFaultProxy
from pytest_runtimefaults.dbus.rules import Delay, Rule
from pytest_runtimefaults.expectations import Outcome
from pytest_runtimefaults.rootfs import build_bundle
from pytest_runtimefaults.systemd import SystemdSandbox

RUNTIMES = [r for r in ("runc", "crun") if shutil.which(r)]
BOUND = 45.0  # seconds a create may take: above runc's 30 s wait for JobRemoved
MANAGER = DBusAddress(
    "/org/freedesktop/systemd1", "org.freedesktop.systemd1", "org.freedesktop.systemd1.Manager"
)

pytestmark = [pytest.mark.needs("systemd"), pytest.mark.timeout(150)]


class OneConnectionClient:
    """Test-only, susceptible: keeps the one connection it opened and never reconnects.

    What a runtime does that caches its bus connection for its whole life
    (runc before PR 2923 kept one per process).
    """

    def __init__(self, address: str) -> None:
        self.conn: DBusConnection = open_dbus_connection(address)

    def get_unit(self, unit: str) -> str:
        reply = self.conn.send_and_get_reply(
            new_method_call(MANAGER, "GetUnit", "s", (unit,)), timeout=10
        )
        return str(reply.body[0])

    def close(self) -> None:
        self.conn.close()


class ReconnectingClient(OneConnectionClient):
    """Test-only, correct: when its connection breaks mid-call, it reconnects and calls again.

    Connecting is retried for *patience* seconds (a bus being restarted, or a
    proxy refusing connections for a while).  Safe here: GetUnit changes nothing.
    """

    def __init__(self, address: str, patience: float = 5.0) -> None:
        self.address = address
        self.patience = patience
        self.reconnects = 0
        super().__init__(address)

    def get_unit(self, unit: str) -> str:
        try:
            return super().get_unit(unit)
        except OSError:  # ConnectionResetError (EOF), BrokenPipeError
            self._reconnect()
            return super().get_unit(unit)

    def _reconnect(self) -> None:
        self.conn.close()
        deadline = time.monotonic() + self.patience
        while True:
            try:
                self.conn = open_dbus_connection(self.address)
                self.reconnects += 1
                return
            except (OSError, AuthenticationError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _when_seen(
    proxy: DBusFaultProxy, member: str, kind: str, then: Callable[[], object]
) -> threading.Thread:
    """A thread that runs *then* 0.2 s after the proxy relays *member* (a *kind*).

    Inside the Delay that holds what follows: the disruption falls mid-call.
    """
    errors: list[BaseException] = []

    def wait_and_act() -> None:
        try:
            deadline = time.monotonic() + 30
            while not any(e.member == member and e.type == kind for e in proxy.trace.entries()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {kind} {member} through the proxy in 30 s")
                time.sleep(0.01)
            time.sleep(0.2)
            then()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=wait_and_act, name="rf-bus-restart")
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def _joined(thread: threading.Thread) -> None:
    thread.join(timeout=60)
    assert not thread.is_alive(), "the disruption thread did not finish"
    errors = thread.errors  # type: ignore[attr-defined]
    if errors:
        raise errors[0]


def _disruption(how: str, sandbox: SystemdSandbox, proxy: DBusFaultProxy) -> Callable[[], object]:
    if how == "restart":
        return sandbox.restart_bus
    return lambda: proxy.drop_connections(refuse_for=0.5)


@pytest.mark.parametrize("how", ["restart", "drop"])
def test_a_client_that_never_reconnects_fails_and_one_that_reconnects_passes(
    how: str, sandbox: SystemdSandbox, proxy: DBusFaultProxy
) -> None:
    rule = proxy.add(Delay(1.0).on_reply(member="GetUnit"))
    susceptible = OneConnectionClient(proxy.address)
    try:
        assert susceptible.get_unit("dbus.service").endswith("dbus_2eservice")
        bus_before = sandbox.bus_pids()
        # Mid-call: the bus goes away while the susceptible client waits on its reply.
        proxy.trace.clear()  # first: the thread must see this call, not the one before
        thread = _when_seen(proxy, "GetUnit", "method_call", _disruption(how, sandbox, proxy))
        with pytest.raises(OSError):
            susceptible.get_unit("dbus.service")
        _joined(thread)
        with pytest.raises(OSError):  # and for good: its connection is gone
            susceptible.get_unit("dbus.service")
    finally:
        susceptible.close()
    # The same disruption under the reconnecting client: it gets its answer.
    time.sleep(0.6)  # past a refusal: its first connection must get through
    correct = ReconnectingClient(proxy.address)
    try:
        assert correct.get_unit("dbus.service").endswith("dbus_2eservice")
        proxy.trace.clear()
        thread = _when_seen(proxy, "GetUnit", "method_call", _disruption(how, sandbox, proxy))
        assert correct.get_unit("dbus.service").endswith("dbus_2eservice")
        _joined(thread)
        assert correct.reconnects == 1
    finally:
        correct.close()
    assert rule.applied >= 3
    faults = [e.fault or "" for e in proxy.trace.entries()]
    if how == "restart":
        assert sandbox.bus_pids() != bus_before  # a new bus, really
    else:
        # The reconnecting client was refused at first, then got through.
        assert any("drop_connections: refused" in f for f in faults), faults


@pytest.mark.needs("runc|crun")
@pytest.mark.parametrize("moment", ["mid-call", "before-jobremoved"])
@pytest.mark.parametrize("name", RUNTIMES)
def test_runtime_and_a_bus_restart_during_create(
    name: str,
    moment: str,
    sandbox: SystemdSandbox,
    proxy: DBusFaultProxy,
    rootfs: Path,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """runc and crun when the bus restarts while create waits on systemd.

    ``mid-call``: the StartTransientUnit reply is held 1 s and the bus restarts
    inside; ``before-jobremoved``: the reply came, JobRemoved is held 2 s and
    the bus restarts inside.  A correct runtime reconnects and creates the
    container (survives); failing at once with a clear error is tolerated
    (fails_cleanly); what each version does is in the expectations table.
    Recovered means too: nothing left once deleted, the next lifecycle works.
    """
    bundle = build_bundle(tmp_path / "bundle", ["/bin/sleep", "600"], rootfs=rootfs)
    inspector = sandbox.inspector()
    baseline = inspector.scopes_and_slices()
    rt = runtime_through(name, sandbox, proxy, timeout=BOUND)
    rule: Rule
    if moment == "mid-call":
        rule = proxy.add(Delay(1.0).on_reply(member="StartTransientUnit"))
        thread = _when_seen(proxy, "StartTransientUnit", "method_call", sandbox.restart_bus)
    else:
        rule = proxy.add(Delay(2.0).on(member="JobRemoved"))
        thread = _when_seen(proxy, "JobRemoved", "signal", sandbox.restart_bus)
    created = rt.create("rf-restart", bundle)
    _joined(thread)
    state = rt.state("rf-restart")
    proxy.clear()
    deleted = rt.delete("rf-restart", force=True)
    left = inspector.wait_gone({u.name for u in inspector.leftovers(baseline)})
    processes = sandbox.processes()
    after = rt.lifecycle(bundle)
    detail = (
        f"on {sandbox.bus_daemon}: create rc={created.returncode} in {created.duration:.2f} s: "
        f"{created.stderr.strip()[-200:]}; units left {sorted(left)}, processes left "
        f"{sorted(processes)}; next lifecycle {'ok' if after.ok else after.stderr[-200:]}"
    )
    print(detail)
    assert rule.applied >= 1, "the hold never fired: the restart fell outside the call"
    if created.timed_out:
        observed = Outcome.BLOCKS
    elif left or processes:
        observed = Outcome.LEAKS
    elif created.ok and state.ok and state.json()["status"] == "created" and deleted.ok:
        observed = Outcome.SURVIVES
    elif not created.ok:
        observed = Outcome.FAILS_CLEANLY
    else:
        observed = Outcome.MISBEHAVES  # created, but in a state a caller cannot use
    verdict = judged(record_property, name, f"dbus:bus-restart-{moment}", observed, detail)
    assert verdict.ok, verdict.message
    assert after.ok, f"the next lifecycle failed once the bus was back: {after.stderr}"
