"""Serials through a real dbus-daemon: one sequence per sender, seen by two real clients.

A service (a jeepney connection straight to the bus) sends to two jeepney
clients that go through the proxy, and to a third that does not.  Like sd-bus,
it numbers every message from one counter, so the fake serials the two proxied
clients get are one sequence: interleaved, with a gap where the other client
(or the unproxied one) got a message, one serial for a broadcast both get, a
stall that starts at the same message for both, and a "cycle" that skips a
serial still awaiting a reply on the other connection.  Under the old model
(one rewriter per proxied connection) each client saw a sequence of its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from jeepney import DBusAddress, HeaderFields, MessageType, new_method_return, new_signal
from jeepney.bus_messages import MatchRule, message_bus
from jeepney.io.blocking import DBusConnection, open_dbus_connection
from jeepney.low_level import Message as JMessage
from jeepney.wrappers import new_method_call

from pytest_runtimefaults.dbus.bus import PrivateBus
from pytest_runtimefaults.dbus.proxy import DBusFaultProxy
from pytest_runtimefaults.dbus.rules import Serials
from pytest_runtimefaults.dbus.trace import TO_CLIENT

pytestmark = pytest.mark.timeout(60)
OBJ = DBusAddress("/org/example/Ticks", "org.example.Ticks", "org.example.Ticks")


@pytest.fixture(scope="module")
def bus() -> Iterator[PrivateBus]:
    with PrivateBus() as b:
        yield b


@pytest.fixture
def proxy(bus: PrivateBus) -> Iterator[DBusFaultProxy]:
    with DBusFaultProxy(upstream=bus.address, seed=1) as p:
        yield p
    assert p.errors == []


class _Peers:
    """The service (direct), clients *a* and *b* (through the proxy), *c* (direct)."""

    def __init__(self, bus: PrivateBus, proxy: DBusFaultProxy) -> None:
        self.svc = open_dbus_connection(bus=bus.address)
        self.a = open_dbus_connection(bus=proxy.address)
        self.b = open_dbus_connection(bus=proxy.address)
        self.c = open_dbus_connection(bus=bus.address)
        self.serial = 100  # the service's serials from here on: ours to name
        for client in (self.a, self.b):  # both subscribe to the service's broadcasts
            rule = MatchRule(type="signal", sender=self.svc.unique_name)
            client.send_and_get_reply(message_bus.AddMatch(rule), timeout=5)

    def send(self, to: DBusConnection | None, n: int, *, call: bool = False) -> int:
        """The service sends Tick(n) (a call if *call*) to *to* (None: broadcast)."""
        msg = new_method_call(OBJ, "Ask", "u", (n,)) if call else new_signal(OBJ, "Tick", "u", (n,))
        if to is not None:
            msg.header.fields[HeaderFields.destination] = to.unique_name
        self.serial += 1
        self.svc.send(msg, serial=self.serial)
        return self.serial

    def close(self) -> None:
        for c in (self.svc, self.a, self.b, self.c):
            c.close()


@pytest.fixture
def peers(bus: PrivateBus, proxy: DBusFaultProxy) -> Iterator[_Peers]:
    p = _Peers(bus, proxy)
    yield p
    p.close()


def _ticks(conn: DBusConnection, n: int, timeout: float = 5) -> dict[int, int]:
    """The next *n* messages from the service: Tick number -> serial the client got."""
    got: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while len(got) < n:
        msg = conn.receive(timeout=max(deadline - time.monotonic(), 0.01))
        if msg.header.fields.get(HeaderFields.member) in ("Tick", "Ask"):
            got[msg.body[0]] = msg.header.serial
    return got


def _nothing_more(conn: DBusConnection, wait: float = 0.5) -> list[JMessage]:
    """What else *conn* receives within *wait* seconds (nothing, when withheld)."""
    extra = []
    try:
        while True:
            msg = conn.receive(timeout=wait)
            if msg.header.fields.get(HeaderFields.member) in ("Tick", "Ask"):
                extra.append(msg)
    except TimeoutError:
        return extra


def test_two_clients_see_one_sequence_with_the_gaps(proxy: DBusFaultProxy, peers: _Peers) -> None:
    proxy.add(
        Serials(start=0xFFFFFFF0, on_overflow="wrap").on(
            direction=TO_CLIENT, sender=peers.svc.unique_name
        )
    )
    p = peers
    for to in (p.a, p.b, p.c, p.a, None, p.b, p.a):  # Tick 0..6; Tick 4 to both
        p.send(to, p.serial - 100)
    a, b = _ticks(p.a, 4), _ticks(p.b, 3)
    assert _ticks(p.c, 1) == {2: 103}  # the unproxied client sees the real serial
    base = 0xFFFFFFF0
    assert a == {0: base, 3: base + 3, 4: base + 4, 6: base + 6}
    assert b == {1: base + 1, 4: base + 4, 5: base + 5}
    rewrites = [e.fault for e in proxy.trace.faults() if "Serials: serial" in (e.fault or "")]
    assert f"Serials: serial 105 -> {base + 4}" in rewrites  # the broadcast, once per client
    assert len(rewrites) == 7


def test_stall_starts_at_the_same_service_message_for_both(
    proxy: DBusFaultProxy, peers: _Peers
) -> None:
    p = peers
    proxy.add(
        Serials(start=0xFFFFFFFC, on_overflow="stall").on(
            direction=TO_CLIENT, sender=p.svc.unique_name
        )
    )
    # Ticks 0 and 1 to a; broadcasts 2, 3, 4; Tick 5 to b.  The service's fifth message
    # (broadcast 4) would be 0x100000000: the stall begins there, for both clients.
    plan = (p.a, p.a, None, None, None, p.b)
    serials = [p.send(to, n) for n, to in enumerate(plan)]
    assert _ticks(p.a, 4) == {0: 0xFFFFFFFC, 1: 0xFFFFFFFD, 2: 0xFFFFFFFE, 3: 0xFFFFFFFF}
    assert _ticks(p.b, 2) == {2: 0xFFFFFFFE, 3: 0xFFFFFFFF}
    assert _nothing_more(p.a) == []
    assert _nothing_more(p.b) == []
    by_name = {e.destination: e.conn for e in proxy.trace.messages(TO_CLIENT) if e.destination}
    stalled: dict[int, list[int]] = {}
    for e in proxy.trace.faults():
        if "stalled" in (e.fault or "") and e.serial is not None:
            stalled.setdefault(e.conn, []).append(e.serial)
    assert stalled == {
        by_name[p.a.unique_name]: [serials[4]],
        by_name[p.b.unique_name]: serials[4:],
    }


def test_cycle_skips_a_serial_awaiting_a_reply_on_the_other_connection(
    proxy: DBusFaultProxy, peers: _Peers
) -> None:
    p = peers
    # cycle_to=start: the second pass over the range, where sd-bus checks its pending
    # calls, comes after 16 messages instead of 2^31.
    proxy.add(
        Serials(start=0xFFFFFFF0, on_overflow="cycle", cycle_to=0xFFFFFFF0).on(
            direction=TO_CLIENT, sender=p.svc.unique_name
        )
    )
    asked = p.send(p.a, 0, call=True)  # a call to a, which a does not answer yet
    call = p.a.receive(timeout=5)
    while call.header.message_type != MessageType.method_call:
        call = p.a.receive(timeout=5)
    assert call.header.serial == 0xFFFFFFF0
    for n in range(1, 18):
        p.send(p.b, n)
    b = _ticks(p.b, 17)
    assert [b[n] for n in range(1, 16)] == list(range(0xFFFFFFF1, 0xFFFFFFFF + 1))
    # past 0xffffffff, 0xfffffff0 is still awaited on a: b's next is 0xfffffff1
    assert b[16] == 0xFFFFFFF1
    assert b[17] == 0xFFFFFFF2
    # a answers; the service gets the reply to its own serial
    p.a.send(new_method_return(call, "s", ("ok",)))
    reply = p.svc.receive(timeout=5)
    while reply.header.message_type != MessageType.method_return:
        reply = p.svc.receive(timeout=5)
    assert reply.header.fields[HeaderFields.reply_serial] == asked
    assert reply.body == ("ok",)
