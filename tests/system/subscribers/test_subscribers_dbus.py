"""systemd's D-Bus signals through the fault proxy, under a churning swarm."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from pytest_runtimefaults.dbus.proxy import DBusFaultProxy
from pytest_runtimefaults.dbus.rules import Delay, Drop, Reorder
from pytest_runtimefaults.naming import unique_name
from pytest_runtimefaults.subscribers import Churn, DaemonWatch, first_events
from pytest_runtimefaults.systemd import SystemdSandbox
from pytest_runtimefaults.transports.dbus import DBusSignals


@pytest.fixture
def proxy(systemd: SystemdSandbox) -> Iterator[DBusFaultProxy]:
    with DBusFaultProxy(upstream=systemd.bus_address) as p:
        yield p


@pytest.fixture
def start_unit(systemd: SystemdSandbox) -> Iterator[Callable[[], None]]:
    """Start a transient oneshot unit running /bin/true: UnitNew, JobNew, JobRemoved..."""
    from jeepney import DBusAddress, MessageType, new_method_call
    from jeepney.io.blocking import open_dbus_connection

    conn = open_dbus_connection(bus=systemd.bus_address)
    manager = DBusAddress(
        "/org/freedesktop/systemd1",
        bus_name="org.freedesktop.systemd1",
        interface="org.freedesktop.systemd1.Manager",
    )

    def start() -> None:
        props = [
            ("ExecStart", ("a(sasb)", [("/bin/true", ["/bin/true"], False)])),
            ("Type", ("s", "oneshot")),
        ]
        name = unique_name("rfsu") + ".service"
        msg = new_method_call(
            manager, "StartTransientUnit", "ssa(sv)a(sa(sv))", (name, "fail", props, [])
        )
        reply = conn.send_and_get_reply(msg, timeout=10)
        assert reply.header.message_type == MessageType.method_return, reply.body

    yield start
    conn.close()


def systemd_swarm(
    systemd: SystemdSandbox,
    proxy: DBusFaultProxy,
    start_unit: Callable[[], None],
    subscribers,  # type: ignore[no-untyped-def]
    label: str,
) -> None:
    """20 churning subscribers through the proxy, 60 transient units, full checks."""
    assert systemd.pid is not None
    watch = DaemonWatch(pid=systemd.pid)
    watch.baseline()
    transport = DBusSignals(proxy.address)
    swarm = subscribers(
        transport,
        20,
        churn=Churn(max_events=12, max_life=1.0, steady=4),
        witness=DBusSignals(systemd.bus_address),
    )
    swarm.prime(start_unit)
    for _ in range(60):
        start_unit()
    swarm.drain(timeout=15)
    report = swarm.report()
    print(f"\nsystemd signals via proxy ({label}):", report.figures())
    report.assert_ok()
    assert report.cancels > 10  # the swarm did churn (how much depends on the rule's delays)
    assert report.figures()["steady_complete"] == 4
    senders = {t.split("/")[0] for t in report.reference}
    assert len(senders) == 1  # one sender: systemd
    watch.check(settle=5)  # systemd forgot every subscriber: fds back
    assert first_events(transport, start_unit)


@pytest.mark.timeout(60)
def test_systemd_signals_through_the_proxy_under_churn(
    systemd: SystemdSandbox, proxy: DBusFaultProxy, start_unit: Callable[[], None], subscribers
) -> None:  # type: ignore[no-untyped-def]
    systemd_swarm(systemd, proxy, start_unit, subscribers, "no rule")


@pytest.mark.timeout(60)
def test_systemd_signals_through_a_delaying_proxy_under_churn(
    systemd: SystemdSandbox, proxy: DBusFaultProxy, start_unit: Callable[[], None], subscribers
) -> None:  # type: ignore[no-untyped-def]
    delay = proxy.add(Delay(0.05).on(member="JobRemoved"))
    systemd_swarm(systemd, proxy, start_unit, subscribers, "Delay JobRemoved 50 ms")
    assert delay.applied > 100  # the witness is direct: these are the swarm's copies


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("action", "kind"), [(Drop(), "gap"), (Reorder(), "order")])
def test_lost_or_reordered_signals_are_caught(
    systemd: SystemdSandbox,
    proxy: DBusFaultProxy,
    start_unit: Callable[[], None],
    subscribers,  # type: ignore[no-untyped-def]
    action: Drop | Reorder,
    kind: str,
) -> None:
    """The same swarm fails when the proxy loses or reorders signals."""
    swarm = subscribers(
        DBusSignals(proxy.address),
        6,
        churn=Churn(max_events=50, max_life=3.0, steady=3),
        witness=DBusSignals(systemd.bus_address),
    )
    swarm.prime(start_unit)
    proxy.add(action.on(member="JobNew").every(7))
    for _ in range(30):
        start_unit()
    swarm.drain(timeout=10)
    report = swarm.report()
    assert kind in {p.kind for p in report.problems}, report.summary()
