"""The systemd sandbox on dbus-broker, and dbus-broker's driver serial 0xffffffff.

dbus-broker (Debian 13 and later package it; Fedora and Arch run it by
default) sends every message of its own driver (``org.freedesktop.DBus``:
the Hello reply, NameAcquired, every reply to a bus method) with serial
0xffffffff (its src/bus/driver.c), legally: nothing answers them.  Our
serial rules must read that neither as an overflow nor as a sequence, and the
trace must show it as it is.

The rest of the systemd family runs on dbus-broker with
``--runtimefaults-bus-daemon=dbus-broker`` (every sandbox of the session
follows it): see docs/systemd.md.
"""

from __future__ import annotations

import os
import shutil
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest
from jeepney import DBusAddress, new_method_call
from jeepney.io.blocking import DBusConnection, open_dbus_connection
from jeepney.low_level import Message

from pytest_runtimefaults.dbus.proxy import DBusFaultProxy
from pytest_runtimefaults.dbus.rules import Serials
from pytest_runtimefaults.dbus.trace import TO_CLIENT, TraceEntry
from pytest_runtimefaults.host import proc
from pytest_runtimefaults.rootfs import build_bundle, build_rootfs
from pytest_runtimefaults.runtime import Runtime
from pytest_runtimefaults.systemd import (
    SystemdSandbox,
    default_bus_daemon,
    describe,
    host_cgroup_state,
    set_default_bus_daemon,
)

RUNTIMES = [r for r in ("runc", "crun") if shutil.which(r)]
LIFECYCLES = int(os.environ.get("RUNTIMEFAULTS_LIFECYCLES", "20"))
DRIVER = "org.freedesktop.DBus"
MAX = 0xFFFFFFFF

BUS = DBusAddress("/org/freedesktop/DBus", DRIVER, DRIVER)
MANAGER = DBusAddress(
    "/org/freedesktop/systemd1", "org.freedesktop.systemd1", "org.freedesktop.systemd1.Manager"
)

pytestmark = [
    pytest.mark.needs("systemd"),
    pytest.mark.needs("dbus-broker"),
    pytest.mark.timeout(120),
]


@pytest.fixture
def broker() -> Iterator[SystemdSandbox]:
    """A sandbox on dbus-broker, whatever the session's default; the host unchanged after."""
    before = host_cgroup_state()
    with SystemdSandbox(bus_daemon="dbus-broker") as sd:
        yield sd
    assert host_cgroup_state() == before


@pytest.fixture
def proxy(broker: SystemdSandbox) -> Iterator[DBusFaultProxy]:
    with DBusFaultProxy(broker.bus_address, directory=broker.workdir) as p:
        yield p
        assert not p.errors, p.errors


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_rootfs(tmp_path_factory.mktemp("rootfs") / "rootfs")


def _driver_entries(proxy: DBusFaultProxy, conn: int | None = None) -> list[TraceEntry]:
    """What the bus driver sent the clients, as the trace recorded it before any rewrite."""
    return [
        e
        for e in proxy.trace.entries()
        if e.direction == TO_CLIENT
        and e.message is not None
        and e.sender == DRIVER
        and not e.fault
        and (conn is None or e.conn == conn)
    ]


def _call(
    conn: DBusConnection, addr: DBusAddress, member: str, sig: str = "", *args: object
) -> Message:
    return conn.send_and_get_reply(new_method_call(addr, member, sig, args), timeout=5)


# -- the sandbox boots on dbus-broker ----------------------------------------------


def test_the_sandbox_boots_on_dbus_broker(broker: SystemdSandbox) -> None:
    # The bus is dbus-broker: its launcher and the broker it execs, in dbus.service.
    comms = sorted(proc.comm(pid) for pid in broker.bus_pids())
    assert comms == ["dbus-broker", "dbus-broker-launch"], comms
    state = broker.run(["systemctl", "is-system-running"])
    assert state.stdout.decode().strip() == "running", broker.log()[-2000:]
    # Inside, the usual system bus path reaches it (a symlink to the one socket).
    inner = broker.run(
        ["busctl", "--system", "call", DRIVER, "/org/freedesktop/DBus", DRIVER, "GetId"]
    )
    assert inner.returncode == 0, inner.stderr
    assert "dbus-broker" in describe(broker)
    assert "Ready" in broker.bus_log()  # its log reached our journal socket
    assert not broker.processes()  # the journal sink's cat is the bus's, not a leftover


def test_the_session_default_bus_reaches_sandboxes_built_without_one() -> None:
    previous = set_default_bus_daemon("dbus-broker")
    try:
        assert SystemdSandbox().bus_daemon == "dbus-broker"
        assert SystemdSandbox(bus_daemon="dbus-daemon").bus_daemon == "dbus-daemon"
    finally:
        set_default_bus_daemon(previous)
    assert default_bus_daemon() == previous
    with pytest.raises(ValueError, match=r"unknown bus daemon 'dbus-brokr'.*dbus-broker"):
        SystemdSandbox(bus_daemon="dbus-brokr")


def test_a_bus_that_is_not_installed_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_runtimefaults.systemd import SandboxError, units

    # The host's PATH as a sandbox would search it, without dbus-broker-launch.
    real_which = shutil.which
    monkeypatch.setattr(
        units.shutil,
        "which",
        lambda name, **kw: None if name.startswith("dbus-broker") else real_which(name, **kw),
    )
    sandbox = SystemdSandbox(bus_daemon="dbus-broker")
    with pytest.raises(
        SandboxError, match=r"dbus-broker is not installed \(apt-get install dbus-broker"
    ):
        sandbox.start()
    assert sandbox.workdir is None  # nothing made before the check


def test_the_option_sets_the_bus_and_a_typo_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        "from pytest_runtimefaults.systemd import SystemdSandbox\n"
        "def test_x():\n"
        "    assert SystemdSandbox().bus_daemon == 'dbus-broker'\n"
    )
    ok = pytester.runpytest_subprocess(
        "-p", "runtimefaults", "--runtimefaults-bus-daemon=dbus-broker"
    )
    assert ok.ret == pytest.ExitCode.OK, ok.stdout.str()
    ok.stdout.fnmatch_lines(
        ["runtimefaults: bus daemon: dbus-broker (systemd sandboxes, dbus_bus, PrivateBus)"]
    )
    bad = pytester.runpytest_subprocess("-p", "runtimefaults", "--runtimefaults-bus-daemon=broker")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(
        [
            "ERROR: --runtimefaults-bus-daemon=broker: unknown bus daemon 'broker': use one of "
            "dbus-daemon, dbus-broker"
        ]
    )


@pytest.mark.needs("runc|crun")
@pytest.mark.parametrize("through_proxy", [False, True], ids=["direct", "proxy"])
@pytest.mark.parametrize("name", RUNTIMES)
def test_runtime_lifecycles_on_dbus_broker_leave_nothing(
    name: str, through_proxy: bool, broker: SystemdSandbox, rootfs: Path, tmp_path: Path
) -> None:
    bundle = build_bundle(tmp_path / "bundle", ["/bin/sleep", "600"], rootfs=rootfs)
    inspector = broker.inspector()
    baseline = inspector.scopes_and_slices()
    with DBusFaultProxy(broker.bus_address, directory=broker.workdir) as proxy:
        address = proxy.address if through_proxy else None
        rt = Runtime(name, cgroup_driver="systemd", sandbox=broker, dbus_address=address)
        durations = []
        for i in range(LIFECYCLES):
            result = rt.lifecycle(bundle, f"rf-bk-{i}")
            assert result.ok, f"cycle {i}: {result.stderr}"
            durations.append(result.duration)
        calls = [e for e in proxy.trace.entries() if e.member == "StartTransientUnit"]
        # Through the proxy, every create asked dbus-broker's systemd for a scope.
        assert len(calls) == (LIFECYCLES if through_proxy else 0)
        assert not proxy.errors, proxy.errors
    assert not inspector.wait_gone({u.name for u in inspector.leftovers(baseline)})
    assert not broker.processes()
    print(f"{name} on dbus-broker: median {statistics.median(durations):.4f} s")


# -- dbus-broker's driver serial ----------------------------------------------------


@pytest.mark.needs("dbus-daemon")
@pytest.mark.parametrize("bus_daemon", ["dbus-daemon", "dbus-broker"])
def test_the_driver_serial_of_each_bus_as_the_trace_shows_it(bus_daemon: str) -> None:
    """dbus-broker's driver: every message 0xffffffff; dbus-daemon's: a sequence from 1."""
    with (
        SystemdSandbox(bus_daemon=bus_daemon) as sd,
        DBusFaultProxy(sd.bus_address, directory=sd.workdir) as proxy,
    ):
        conn = open_dbus_connection(proxy.address)
        try:
            for _ in range(5):
                _call(conn, BUS, "GetId")
            _call(conn, BUS, "ListNames")
        finally:
            conn.close()
        entries = _driver_entries(proxy)
        kinds = {(e.type, e.member) for e in entries}
        assert ("signal", "NameAcquired") in kinds, [e.format() for e in entries]
        assert len([e for e in entries if e.type == "method_return"]) == 7  # Hello + 6
        serials = [e.serial for e in entries]
        if bus_daemon == "dbus-broker":
            assert set(serials) == {MAX}, serials
        else:
            assert max(serials) < 100, serials
            assert len(set(serials)) == len(serials), serials
        # Shown as it is: no fault, no "overflow" or "stall" note anywhere in the trace.
        text = proxy.trace.tail(200)
        assert "overflow" not in text, text
        assert "stall" not in text, text
        assert not proxy.errors, proxy.errors


def test_a_serials_rule_over_every_sender_does_not_read_the_driver_as_an_overflow(
    broker: SystemdSandbox, proxy: DBusFaultProxy
) -> None:
    """Serials(start=0x10, stall) on everything the clients get, the driver's 0xffffffff included.

    The rewritten serials stay far below the boundary, so nothing may stall:
    two clients keep getting every reply, from the driver and from systemd.
    """
    rule = proxy.add(Serials(0x10, on_overflow="stall").on(direction=TO_CLIENT))
    clients = [open_dbus_connection(proxy.address) for _ in range(2)]
    try:
        for _ in range(10):
            for conn in clients:
                assert _call(conn, BUS, "GetId").body
                assert _call(conn, MANAGER, "GetUnit", "s", "dbus.service").body
    finally:
        for conn in clients:
            conn.close()
    driver = _driver_entries(proxy)
    assert {e.serial for e in driver} == {MAX}
    # Every message each client got went through the rule: 2 x (Hello reply,
    # NameAcquired, 10 driver replies, 10 systemd replies).
    assert rule.applied >= 2 * 20, proxy.trace.tail(60)
    rewritten = [e for e in proxy.trace.entries() if e.fault and e.fault.startswith("Serials:")]
    assert all(e.serial is not None and e.serial < 0x1000 for e in rewritten)
    assert "stall" not in proxy.trace.tail(400)


def test_systemd_stalls_at_its_own_boundary_while_the_driver_keeps_answering(
    broker: SystemdSandbox, proxy: DBusFaultProxy
) -> None:
    """Incident 2's rule on systemd alone: its 17th message stalls, the driver's 0xffffffff not.

    The first message the client gets is the driver's Hello reply with serial
    0xffffffff: a rule that took that for systemd's boundary, or for any
    sender's, would stall at once.
    """
    systemd = broker.inspector().unique_name()
    rule = proxy.add(
        Serials(0xFFFFFFF0, on_overflow="stall").on(direction=TO_CLIENT, sender=systemd)
    )
    conn = open_dbus_connection(proxy.address)
    try:
        answered: list[int] = []
        # Until systemd's serials pass 0xffffffff: 16 replies (0xfffffff0 ... 0xffffffff)
        # when it sends nothing else meanwhile, fewer if a rule keeps the gaps of its
        # one sequence; never none, as a stall at the driver's 0xffffffff would give.
        while len(answered) <= 16:
            try:
                reply = conn.send_and_get_reply(
                    new_method_call(MANAGER, "GetUnit", "s", ("dbus.service",)), timeout=1
                )
            except TimeoutError:
                break
            answered.append(reply.header.serial)
        assert answered, "stalled at once: the driver's 0xffffffff was read as systemd's"
        assert len(answered) <= 16, f"no stall past 0xffffffff: {answered}"
        assert answered == sorted(set(answered)), answered
        assert answered[0] >= 0xFFFFFFF0, answered
        assert answered[-1] <= MAX, answered
        # The driver still answers, with its own serial, untouched.
        for _ in range(3):
            assert _call(conn, BUS, "GetId").header.serial == MAX
    finally:
        conn.close()
    assert rule.applied >= len(answered)
    assert all(e.serial == MAX for e in _driver_entries(proxy))
