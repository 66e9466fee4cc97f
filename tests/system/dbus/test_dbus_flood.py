"""SignalFlood: a burst of signals toward a client that is closing (godbus issues 94, 158).

A real dbus-daemon, a real service (tests/helpers/dbus_service.py) whose
``Event`` signals the clients subscribe to, the proxy between.  The
test-only clients of tests/helpers/closing_clients.py deliver signals into a
bounded channel: the susceptible ones deadlock in ``close()`` (godbus before
PR 105) or fail with ``send on closed channel`` (before PR 161) when a burst
arrives as they close; the correct one closes cleanly; without a burst all
of them close cleanly (the fault is what catches them).  The proxy stays
healthy under a burst to a client that closes mid-way: another client keeps
getting answers within a bound, and the proxy reports no error.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Iterator

import pytest
from closing_clients import ChannelClosed, CorrectClient, SusceptibleClient, event_match
from dbus_helpers import NAME, PATH, service
from jeepney import DBusAddress, new_method_call
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import DBusConnection, open_dbus_connection

from pytest_runtimefaults.dbus.bus import PrivateBus
from pytest_runtimefaults.dbus.flood import FloodSignal, SignalFlood, flood_now
from pytest_runtimefaults.dbus.grammar import parse_rule
from pytest_runtimefaults.dbus.match import RuleError
from pytest_runtimefaults.dbus.proxy import DBusFaultProxy
from pytest_runtimefaults.dbus.wire import Framer

pytestmark = pytest.mark.timeout(90)

IFACE = NAME
SERVICE = DBusAddress(PATH, bus_name=NAME, interface=IFACE)
#: the service's own signal, forged by the proxy in numbers
EVENT = FloodSignal(PATH, IFACE, "Event", "s", lambda i: (f"flood-{i}",))
CLOSE_BOUND = 3.0  # seconds close() may take before we call it a deadlock
PING_BOUND = 0.6  # seconds another client's call may take while the burst goes on
#: (the proxy before its bounded EOF flush froze 1 s and more for a half-closed trickle reader)


@pytest.fixture(scope="module")
def bus() -> Iterator[PrivateBus]:
    with PrivateBus() as b, service(b.address):
        yield b


@pytest.fixture
def proxy(bus: PrivateBus) -> Iterator[DBusFaultProxy]:
    with DBusFaultProxy(upstream=bus.address, seed=1) as p:
        yield p
    assert p.errors == []


@pytest.fixture
def owner(bus: PrivateBus) -> str:
    """The service's unique name: the sender its real signals carry."""
    c = open_dbus_connection(bus.address)
    try:
        return str(c.send_and_get_reply(message_bus.GetNameOwner(NAME), timeout=5).body[0])
    finally:
        c.close()


def _ids(proxy: DBusFaultProxy) -> list[int]:
    """The ids of the proxy's open connections, read on its loop."""
    seen: list[int] = []
    proxy.inject(lambda ids: seen.extend(ids) or [])
    return seen


def _ping(conn: DBusConnection) -> str:
    return str(conn.send_and_get_reply(new_method_call(SERVICE, "Ping"), timeout=10).body[0])


def _emit_real(address: str, text: str = "real") -> None:
    """The service emits one real Event (every subscribed client gets it)."""
    c = open_dbus_connection(address)
    try:
        c.send_and_get_reply(new_method_call(SERVICE, "Emit", "s", (text,)), timeout=5)
    finally:
        c.close()


def _closes_cleanly(client: SusceptibleClient | CorrectClient) -> tuple[bool, list[BaseException]]:
    done = client.close_within(CLOSE_BOUND)
    if not done:
        client.abandon()
    client.settle()
    return done, client.errors


@pytest.mark.parametrize("mode", ["deadlock", "panic", "correct"])
def test_without_a_flood_every_client_closes_cleanly(proxy: DBusFaultProxy, mode: str) -> None:
    """The control: the fault, not the clients' own slowness, is what catches them."""
    match = event_match(IFACE, "Event")
    if mode == "correct":
        client: SusceptibleClient | CorrectClient = CorrectClient(proxy.address, match)
    else:
        client = SusceptibleClient(proxy.address, match, mode=mode)
    for i in range(5):
        _emit_real(proxy.address, f"e{i}")
    deadline = time.monotonic() + 5
    while client.received < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.received == 5
    client.unsubscribe()
    assert _closes_cleanly(client) == (True, [])


@pytest.mark.parametrize("mode", ["deadlock", "panic"])
def test_a_flood_at_remove_match_breaks_the_susceptible_client(
    proxy: DBusFaultProxy, owner: str, mode: str
) -> None:
    """RemoveMatch (the client starts to disconnect) sets off 200 signals: deadlock, or panic."""
    rule = proxy.add(SignalFlood(200, EVENT, sender=owner).on(member="RemoveMatch"))
    client = SusceptibleClient(proxy.address, event_match(IFACE, "Event"), mode=mode)
    client.unsubscribe()
    assert client.wait_delivering(), "the burst never filled the client's channel"
    done, errors = _closes_cleanly(client)
    assert rule.applied == 1
    if mode == "deadlock":
        assert not done, "close() returned: the susceptible client did not deadlock"
        assert errors == []
    else:
        assert done
        assert errors, "no send on closed channel: the susceptible client did not fail"
        assert all(isinstance(e, ChannelClosed) for e in errors), errors
        assert str(errors[0]) == "send on closed channel"
    # The burst really came from the service's name, with serials of its own.
    flood = [e for e in proxy.trace.entries() if e.fault and "SignalFlood" in e.fault]
    assert len(flood) == 1, flood
    assert f"200 signals from {owner}" in (flood[0].fault or ""), flood


def test_the_correct_client_closes_cleanly_under_the_same_flood(
    proxy: DBusFaultProxy, owner: str
) -> None:
    rule = proxy.add(SignalFlood(200, EVENT, sender=owner).on(member="RemoveMatch"))
    client = CorrectClient(proxy.address, event_match(IFACE, "Event"))
    client.unsubscribe()
    assert client.wait_delivering()
    assert _closes_cleanly(client) == (True, [])
    assert rule.applied == 1


@pytest.mark.parametrize("mode", ["deadlock", "panic", "correct"])
def test_a_flood_on_demand_catches_the_same(proxy: DBusFaultProxy, owner: str, mode: str) -> None:
    """flood_now just before close(): the same outcomes, without a rule."""
    match = event_match(IFACE, "Event")
    if mode == "correct":
        client: SusceptibleClient | CorrectClient = CorrectClient(proxy.address, match)
    else:
        client = SusceptibleClient(proxy.address, match, mode=mode)
    assert flood_now(proxy, count=100, signal=EVENT, sender=owner) == 1
    assert client.wait_delivering()
    done, errors = _closes_cleanly(client)
    assert (done, bool(errors)) == {
        "deadlock": (False, False),
        "panic": (True, True),
        "correct": (True, False),
    }[mode]


def test_the_signals_are_well_formed_from_the_upstream_with_unique_serials(
    proxy: DBusFaultProxy, owner: str
) -> None:
    """A raw client reads the burst: each a whole signal from the service, serials unique.

    No sender named: the burst behind the service's reply takes the reply's sender.
    """
    raw = open_dbus_connection(proxy.address)
    try:
        raw.send_and_get_reply(message_bus.AddMatch(event_match(IFACE, "Event")), timeout=5)
        proxy.add(SignalFlood(300, EVENT).on_reply(member="Ping"))
        # the Ping reply, then the 300 signals behind it, all framed
        raw.send(new_method_call(SERVICE, "Ping"))
        framer, msgs = Framer(), []
        raw.sock.settimeout(10)
        while len([m for m in msgs if m.member == "Event"]) < 300:
            msgs += framer.feed(raw.sock.recv(65536))
    finally:
        raw.close()
    events = [m for m in msgs if m.member == "Event"]
    assert [m.sender for m in events] == [owner] * 300
    assert len({m.serial for m in events}) == 300
    assert 0 not in {m.serial for m in events}
    assert [m.signature for m in events] == ["s"] * 300
    assert all(m.destination is None for m in events)  # broadcast, as the bus delivers them


@pytest.mark.parametrize("how", ["close", "half-close-slow-reader"])
def test_a_client_that_closes_mid_burst_harms_no_other_client(
    proxy: DBusFaultProxy, owner: str, how: str
) -> None:
    """20000 signals (about 2.5 MB) to a client that stops reading and closes mid-way.

    Another client of the proxy pings the service throughout: every answer
    within a bound; the proxy's loop, its other connection and its errors
    (none) stay as they were.  ``half-close-slow-reader``: the flooded client
    shuts its writing side (the proxy reads EOF) and then reads a trickle.
    """
    victim = open_dbus_connection(proxy.address)
    victim.send_and_get_reply(message_bus.AddMatch(event_match(IFACE, "Event")), timeout=5)
    (victim_id,) = _ids(proxy)
    other = open_dbus_connection(proxy.address)
    latencies: list[float] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def pinger() -> None:
        try:
            while not stop.is_set():
                t0 = time.monotonic()
                assert _ping(other) == "pong"
                latencies.append(time.monotonic() - t0)
                time.sleep(0.02)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=pinger)
    thread.start()
    try:
        time.sleep(0.2)
        assert flood_now(proxy, count=20000, signal=EVENT, sender=owner, conn=victim_id) == 1
        time.sleep(0.1)  # mid-burst: the victim read nothing, the proxy holds the rest
        if how == "close":
            victim.sock.shutdown(socket.SHUT_RDWR)
            victim.close()
        else:
            victim.sock.shutdown(socket.SHUT_WR)
            victim.sock.settimeout(0.2)
            for _ in range(15):  # a trickle: 64 bytes every 0.1 s for 1.5 s
                try:
                    victim.sock.recv(64)
                except OSError:
                    break
                time.sleep(0.1)
            victim.close()
        time.sleep(0.5)
        deadline = time.monotonic() + 10
        while victim_id in _ids(proxy) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert victim_id not in _ids(proxy), "the proxy kept the closed connection"
    finally:
        stop.set()
        thread.join(30)
        other.close()
    assert not failures, failures
    assert latencies
    assert max(latencies) < PING_BOUND, (
        f"{len(latencies)} pings, median {statistics.median(latencies):.3f} s, "
        f"max {max(latencies):.3f} s"
    )
    assert proxy.threads, "the proxy's loop ended"
    faults = [e.fault for e in proxy.trace.entries() if e.fault]
    assert any("flood_now: 20000 Event signals from" in f for f in faults), faults
    if how == "half-close-slow-reader":  # what it could not take in time, said
        assert any("eof: the client stopped sending;" in f for f in faults), faults
    print(f"{how}: {len(latencies)} pings, max {max(latencies) * 1000:.0f} ms")


@pytest.mark.parametrize("mode", ["panic", "correct"])
def test_the_text_form_floods_like_the_object(proxy: DBusFaultProxy, mode: str) -> None:
    """The rule as the ``dbus_faults`` marker and ``runtimefaults proxy --rule`` write it."""
    rule = proxy.add(parse_rule("SignalFlood(200, 'PropertiesChanged') member=RemoveMatch times=1"))
    match = event_match(IFACE, "Event")
    if mode == "correct":
        client: SusceptibleClient | CorrectClient = CorrectClient(proxy.address, match)
    else:
        client = SusceptibleClient(proxy.address, match, mode=mode)
    client.unsubscribe()
    assert client.wait_delivering(), "the burst never filled the client's channel"
    done, errors = _closes_cleanly(client)
    assert rule.applied == 1
    assert done
    if mode == "correct":
        assert errors == []
    else:
        assert errors, "no send on closed channel: the susceptible client did not fail"
        assert all(isinstance(e, ChannelClosed) for e in errors), errors
    flood = [e.fault for e in proxy.trace.entries() if e.fault and "SignalFlood" in e.fault]
    assert len(flood) == 1, flood
    assert "SignalFlood(200, 'PropertiesChanged'): 200 signals" in (flood[0] or ""), flood


def test_bad_arguments_are_rule_errors_naming_them(proxy: DBusFaultProxy) -> None:
    with pytest.raises(RuleError, match="SignalFlood count must be an integer in"):
        SignalFlood(0)
    with pytest.raises(RuleError, match="SignalFlood signal 'Nope': use one of"):
        SignalFlood(10, "Nope")
    with pytest.raises(RuleError, match="SignalFlood sender must be a bus name"):
        SignalFlood(10, sender="")
    with pytest.raises(RuleError, match=r"rule 'SignalFlood\(10, sender=3\)': SignalFlood sender"):
        parse_rule("SignalFlood(10, sender=3)")
    with pytest.raises(ValueError, match="no connection #999"):
        flood_now(proxy, conn=999)
