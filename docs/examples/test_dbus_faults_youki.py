"""A fault that catches a bug class: a client that reads once after a call.

youki's D-Bus client (youki issues 2826/2559) read the socket once after a call
and took the first METHOD_RETURN in that read.  SignalBeforeReply delivers a
signal in its own write just before the reply: such a client finds no reply.
"""

import os
import socket

import pytest
from jeepney import DBusAddress, MessageType, Parser, new_method_call
from jeepney.io.blocking import open_dbus_connection

from pytest_runtimefaults.dbus.rules import SignalBeforeReply

BUS = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")


def read_once_client(address, member):
    """Call *member*, read once, return the first METHOD_RETURN's body (the bug)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(address.split("path=", 1)[1])
    sock.sendall(b"\0AUTH EXTERNAL " + str(os.geteuid()).encode().hex().encode() + b"\r\n")
    assert sock.recv(4096).startswith(b"OK")
    sock.sendall(b"BEGIN\r\n" + new_method_call(BUS, "Hello").serialise(serial=1))
    sock.settimeout(0.05)  # drain the Hello reply and NameAcquired, however they come
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        pass
    sock.settimeout(5)
    sock.sendall(new_method_call(BUS, member).serialise(serial=2))
    parser = Parser()
    parser.add_data(sock.recv(65536))
    sock.close()
    while (msg := parser.get_next_message()) is not None:
        if msg.header.message_type == MessageType.method_return:
            return msg.body
    raise RuntimeError("expected to get a reply for method call, didn't get any")


def test_read_once_client_is_caught(dbus_proxy):
    assert read_once_client(dbus_proxy.address, "GetId")  # fine with no fault

    dbus_proxy.add(SignalBeforeReply("JobRemoved").on_reply(member="GetId"))
    with pytest.raises(RuntimeError, match="didn't get any"):
        read_once_client(dbus_proxy.address, "GetId")

    # A correct client (matches reply_serial, frames properly) is unaffected.
    conn = open_dbus_connection(bus=dbus_proxy.address)
    assert conn.send_and_get_reply(new_method_call(BUS, "GetId"), timeout=5).body
    conn.close()
