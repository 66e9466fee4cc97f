"""One test per D-Bus fault action, each against a real dbus-daemon and real clients.

The docs include each test next to its action's description.
"""

import subprocess
import time

import pytest
from jeepney import DBusAddress, HeaderFields, MessageType, new_method_call, new_signal
from jeepney.io.blocking import open_dbus_connection

from pytest_runtimefaults.dbus.rules import (
    Delay,
    Disconnect,
    Drop,
    Duplicate,
    ErrorReply,
    FlipByteOrder,
    Reorder,
    Serials,
    SignalBeforeReply,
    SplitMessage,
    StrayReply,
)

BUS = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")


def connect(proxy):
    return open_dbus_connection(bus=proxy.address)


def replies(conn, n):
    """The next n non-signal messages the client receives."""
    out = []
    while len(out) < n:
        msg = conn.receive(timeout=5)
        if msg.header.message_type != MessageType.signal:
            out.append(msg)
    return out


def test_delay(dbus_proxy):
    dbus_proxy.add(Delay(0.25).on_reply(member="GetId"))
    conn = connect(dbus_proxy)
    started = time.monotonic()
    conn.send_and_get_reply(new_method_call(BUS, "GetId"), timeout=5)
    assert time.monotonic() - started >= 0.25
    conn.close()


def test_reorder(dbus_proxy):
    dbus_proxy.add(Reorder().on_reply(member="GetId").times(1))
    conn = connect(dbus_proxy)
    conn.send(new_method_call(BUS, "GetId"), serial=100)
    time.sleep(0.05)
    conn.send(new_method_call(BUS, "ListNames"), serial=101)
    assert [m.header.fields[5] for m in replies(conn, 2)] == [101, 100]
    conn.close()


def test_signal_before_reply(dbus_proxy):
    dbus_proxy.add(SignalBeforeReply("JobRemoved").on_reply(member="GetId"))
    conn = connect(dbus_proxy)
    conn.send(new_method_call(BUS, "GetId"), serial=100)
    msg = conn.receive(timeout=5)
    while msg.header.fields.get(3) == "NameAcquired":
        msg = conn.receive(timeout=5)
    assert msg.header.fields[3] == "JobRemoved"  # the signal comes first, in its own write
    assert replies(conn, 1)[0].header.fields[5] == 100
    conn.close()


def test_split_message(dbus_proxy):
    dbus_proxy.add(SplitMessage(parts=3, pause=0.01).on_reply(member="GetId"))
    conn = connect(dbus_proxy)  # jeepney frames properly: a split reply is still a reply
    assert conn.send_and_get_reply(new_method_call(BUS, "GetId"), timeout=5).body
    (fault,) = [e for e in dbus_proxy.trace.faults() if "SplitMessage" in e.fault]
    assert fault.member is None  # a reply carries no member
    assert fault.type == "method_return"
    conn.close()


def test_stray_reply(dbus_proxy):
    dbus_proxy.add(StrayReply(answer="none").on_reply(member="GetId"))
    conn = connect(dbus_proxy)
    conn.send(new_method_call(BUS, "GetId"), serial=100)
    stray, real = replies(conn, 2)
    assert stray.header.fields[5] != 100  # nobody asked for this one
    assert real.header.fields[5] == 100
    conn.close()


def test_flip_byte_order(dbus_proxy):
    dbus_proxy.add(FlipByteOrder().on_reply(member="GetId"))
    r = subprocess.run(
        [
            "busctl",
            "--address",
            dbus_proxy.address,
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "GetId",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0  # big-endian messages are legal D-Bus


def test_drop(dbus_proxy):
    dbus_proxy.add(Drop().on(member="GetId").times(1))
    conn = connect(dbus_proxy)
    with pytest.raises(TimeoutError):
        conn.send_and_get_reply(new_method_call(BUS, "GetId"), timeout=0.3)
    conn.close()


def test_duplicate(dbus_proxy):
    dbus_proxy.add(Duplicate().on_reply(member="GetId"))
    conn = connect(dbus_proxy)
    conn.send(new_method_call(BUS, "GetId"), serial=100)
    assert [m.header.fields[5] for m in replies(conn, 2)] == [100, 100]
    conn.close()


def test_error_reply(dbus_proxy):
    dbus_proxy.add(ErrorReply("org.freedesktop.systemd1.NoSuchUnit", "gone").on(member="GetId"))
    r = subprocess.run(
        [
            "gdbus",
            "call",
            "--address",
            dbus_proxy.address,
            "--dest",
            "org.freedesktop.DBus",
            "--object-path",
            "/org/freedesktop/DBus",
            "--method",
            "org.freedesktop.DBus.GetId",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    assert "NoSuchUnit" in r.stderr


def test_disconnect(dbus_proxy):
    dbus_proxy.add(Disconnect(mid_message=True).on_reply(member="GetId"))
    conn = connect(dbus_proxy)
    with pytest.raises((ConnectionError, OSError, TimeoutError)):
        conn.send_and_get_reply(new_method_call(BUS, "GetId"), timeout=5)
    conn.close()


@pytest.mark.parametrize(("mode", "next_serial"), [("wrap", 1), ("cycle", 0x80000000)])
def test_serials(dbus_proxy, mode, next_serial):
    dbus_proxy.add(Serials(start=0xFFFFFFFE, on_overflow=mode).on(direction="to_client"))
    conn = connect(dbus_proxy)  # the Hello reply is 0xfffffffe, NameAcquired 0xffffffff
    reply = conn.send_and_get_reply(new_method_call(BUS, "GetId"), timeout=5)
    assert reply.header.serial == next_serial
    conn.close()


def test_serials_one_sequence_per_sender(dbus_proxy):
    service = open_dbus_connection(bus=dbus_proxy.upstream)  # straight to the bus
    dbus_proxy.add(
        Serials(start=0xFFFFFFFE, on_overflow="cycle").on(
            direction="to_client", sender=service.unique_name
        )
    )
    a, b = connect(dbus_proxy), connect(dbus_proxy)
    seen = []
    for client in (a, b, a):  # the service's messages, alternately to two clients
        signal = new_signal(DBusAddress("/x", interface="org.example.X"), "Tick")
        signal.header.fields[HeaderFields.destination] = client.unique_name
        service.send(signal)
        msg = client.receive(timeout=5)
        while msg.header.fields.get(HeaderFields.member) != "Tick":  # NameAcquired...
            msg = client.receive(timeout=5)
        seen.append(msg.header.serial)
    assert seen == [0xFFFFFFFE, 0xFFFFFFFF, 0x80000000]  # one sequence for both
    for conn in (a, b, service):
        conn.close()
