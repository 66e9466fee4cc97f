"""SignalFlood: a burst of signals toward a client as it starts to disconnect.

godbus issues 94 and 158: a client whose reader delivers signals into a
bounded channel that ``close()`` shuts while the reader still sends
deadlocks, or panics with ``send on closed channel``.  The burst comes right
behind the client's ``RemoveMatch`` (what it sends last before closing), or
on demand with ``flood_now``.
"""

import socket

from jeepney import DBusAddress, MatchRule, MessageType, new_method_call
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

from pytest_runtimefaults.dbus.flood import FloodSignal, SignalFlood, flood_now

#: a signal of a test interface (SIGNALS has systemd's: PropertiesChanged, JobRemoved...)
TICK = FloodSignal("/org/example/Clock", "org.example.Clock", "Tick", "u", lambda i: (i,))
BUS = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")


def test_a_burst_behind_remove_match(dbus_proxy):
    flood = SignalFlood(500, TICK, sender="org.example.Clock")
    rule = dbus_proxy.add(flood.on(member="RemoveMatch"))
    conn = open_dbus_connection(dbus_proxy.address)
    match = MatchRule(type="signal", interface="org.example.Clock")
    conn.send_and_get_reply(message_bus.AddMatch(match))
    # The client starts to disconnect: the 500 signals come right behind its call.
    conn.send(message_bus.RemoveMatch(match))
    ticks = []
    while len(ticks) < 500:
        msg = conn.receive(timeout=5)
        if msg.header.message_type == MessageType.signal:
            ticks.append(msg.body[0])
    conn.close()
    assert ticks == list(range(500))
    assert rule.applied == 1


def test_a_client_closing_mid_burst_harms_no_one(dbus_proxy):
    victim = open_dbus_connection(dbus_proxy.address)
    other = open_dbus_connection(dbus_proxy.address)
    # 20000 signals to every connection; the victim closes without reading them.
    assert flood_now(dbus_proxy, count=20000, signal=TICK, sender="org.example.Clock") == 2
    victim.sock.shutdown(socket.SHUT_RDWR)
    victim.close()
    # The proxy goes on: the other client still gets its answer (behind its own burst).
    other.send(new_method_call(BUS, "GetId"))
    while (reply := other.receive(timeout=10)).header.message_type != MessageType.method_return:
        pass
    assert len(reply.body[0]) == 32
    other.close()
    assert dbus_proxy.errors == []
