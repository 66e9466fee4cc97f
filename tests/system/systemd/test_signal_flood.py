"""runc and crun under a signal flood as they finish with systemd (godbus issues 94, 158).

runc's godbus subscribes to ``JobRemoved`` while it creates the scope (and
while ``delete`` stops it), then exits, closing its connections; crun's
sd-bus waits for the same signal.  The proxy follows every real JobRemoved
toward the runtime with a burst of forged signals from systemd's name
(:class:`~pytest_runtimefaults.dbus.flood.SignalFlood`): other jobs'
JobRemoved, or a unit's PropertiesChanged, so they arrive as the runtime
closes.  A runtime whose signal delivery blocks or panics at close hangs or
crashes; a correct one ignores what is not its own and exits.  What each
version does is in the expectations table (``dbus:signal-flood-at-close``).
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
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection
from runtime_proxy import (  # noqa: F401 - the fixtures: pytest finds them here
    proxy_fixture,
    rootfs_fixture,
    sandbox_fixture,
)

from pytest_runtimefaults.dbus.flood import SignalFlood
from pytest_runtimefaults.dbus.proxy import DBusFaultProxy
from pytest_runtimefaults.expectations import Outcome
from pytest_runtimefaults.rootfs import build_bundle
from pytest_runtimefaults.runtime import Runtime
from pytest_runtimefaults.systemd import SystemdSandbox

RUNTIMES = [r for r in ("runc", "crun") if shutil.which(r)]
BOUND = 45.0  # seconds a command may take: above runc's 30 s wait for JobRemoved
COUNT = 5000  # signals behind each JobRemoved (about 0.9 MB of JobRemoved)
PING_BOUND = 1.0  # seconds another client's call may take meanwhile
MANAGER = DBusAddress(
    "/org/freedesktop/systemd1", "org.freedesktop.systemd1", "org.freedesktop.systemd1.Manager"
)

pytestmark = [
    pytest.mark.needs("systemd"),
    pytest.mark.needs("runc|crun"),
    pytest.mark.timeout(200),
]


class Pinger:
    """Another client of the proxy asking systemd ``GetUnit`` every 50 ms; its latencies."""

    def __init__(self, address: str) -> None:
        self.conn = open_dbus_connection(address)
        self.latencies: list[float] = []
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rf-test-pinger")
        self._thread.start()

    def _run(self) -> None:
        call = new_method_call(MANAGER, "GetUnit", "s", ("dbus.socket",))
        try:
            while not self._stop.is_set():
                t0 = time.monotonic()
                self.conn.send_and_get_reply(call, timeout=10)
                self.latencies.append(time.monotonic() - t0)
                time.sleep(0.05)
        except BaseException as exc:
            self.failures.append(exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.conn.close()


#: (fault id, the signals, where the burst goes): behind each JobRemoved (the runtime
#: closes as it arrives), or behind the StartTransientUnit reply (the runtime must read
#: through it to its own JobRemoved)
CASES = {
    "dbus:signal-flood-jobremoved": ("JobRemoved", "behind JobRemoved"),
    "dbus:signal-flood-propertieschanged": ("PropertiesChanged", "behind JobRemoved"),
    "dbus:signal-flood-before-jobremoved": ("JobRemoved", "behind the StartTransientUnit reply"),
}


@pytest.mark.parametrize(
    "fault", list(CASES), ids=[f.removeprefix("dbus:signal-flood-") for f in CASES]
)
@pytest.mark.parametrize("name", RUNTIMES)
def test_runtime_under_a_signal_flood_as_it_closes(
    name: str,
    fault: str,
    sandbox: SystemdSandbox,
    proxy: DBusFaultProxy,
    rootfs: Path,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """5000 signals behind each JobRemoved (or the StartTransientUnit reply); the proxy stays up.

    A correct runtime creates and deletes the container (survives); the
    proxy answers another client within a bound throughout.
    """
    kind, where = CASES[fault]
    bundle = build_bundle(tmp_path / "bundle", ["/bin/sleep", "600"], rootfs=rootfs)
    inspector = sandbox.inspector()
    baseline = inspector.scopes_and_slices()
    rt = Runtime(
        name, cgroup_driver="systemd", sandbox=sandbox, dbus_address=proxy.address, timeout=BOUND
    )
    # systemd's unique name, the sender its real JobRemoved carry: named, the burst is
    # marshalled now rather than on the proxy's loop at the first JobRemoved
    ask = open_dbus_connection(sandbox.bus_address)
    try:
        owner = ask.send_and_get_reply(message_bus.GetNameOwner("org.freedesktop.systemd1"))
        systemd = str(owner.body[0])
    finally:
        ask.close()
    flood = SignalFlood(COUNT, kind, sender=systemd)
    if where == "behind JobRemoved":
        rule = proxy.add(flood.on(member="JobRemoved"))
    else:
        rule = proxy.add(flood.on_reply(member="StartTransientUnit"))
    pinger = Pinger(proxy.address)
    try:
        created = rt.create("rf-flood", bundle)
        state = rt.state("rf-flood")
        deleted = rt.delete("rf-flood", force=True)
    finally:
        pinger.stop()
    proxy.clear()
    left = inspector.wait_gone({u.name for u in inspector.leftovers(baseline)})
    processes = sandbox.processes()
    after = rt.lifecycle(bundle)
    senders = {
        (e.fault or "").rsplit(" from ", 1)[-1]
        for e in proxy.trace.entries()
        if e.fault and e.fault.startswith("SignalFlood")
    }
    detail = (
        f"{rule.applied} bursts of {COUNT} {kind} {where} from {sorted(senders)}: create "
        f"rc={created.returncode} in {created.duration:.2f} s "
        f"{created.stderr.strip()[-200:]!r}; delete rc={deleted.returncode} in "
        f"{deleted.duration:.2f} s {deleted.stderr.strip()[-200:]!r}; units left {sorted(left)}, "
        f"processes left {sorted(processes)}; next lifecycle "
        f"{'ok' if after.ok else after.stderr[-200:]}; other client: "
        f"{len(pinger.latencies)} calls, max {max(pinger.latencies, default=0):.3f} s"
    )
    print(detail)
    assert senders == {systemd}, senders
    assert rule.applied >= 1, f"nothing {where} went to the runtime: the flood never came"
    assert not pinger.failures, f"another client of the proxy failed: {pinger.failures}"
    assert max(pinger.latencies, default=0) < PING_BOUND, detail
    if created.timed_out or deleted.timed_out:
        observed = Outcome.BLOCKS
    elif (created.returncode is not None and created.returncode < 0) or "panic:" in (
        created.stderr + deleted.stderr
    ):
        observed = Outcome.CRASHES
    elif left or processes:
        observed = Outcome.LEAKS
    elif created.ok and state.ok and state.json()["status"] == "created" and deleted.ok:
        observed = Outcome.SURVIVES
    elif not created.ok:
        observed = Outcome.FAILS_CLEANLY
    else:
        observed = Outcome.MISBEHAVES
    verdict = judged(record_property, name, fault, observed, detail)
    assert verdict.ok, verdict.message
    assert after.ok, f"the next lifecycle failed once the flood was lifted: {after.stderr}"
