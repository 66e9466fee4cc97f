"""A bus at its limits: connect() gets EAGAIN; the per-user connection cap is reached."""

import socket
import subprocess

import pytest


def test_connect_gets_eagain_while_the_backlog_is_full(dbus_proxy, connect_backlog_full):
    # The proxy stops accepting, its listen backlog full, until lifted (or for duration=).
    fault = connect_backlog_full(dbus_proxy)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.setblocking(False)  # as sd-bus and Go connect
    with client, pytest.raises(BlockingIOError, match="Resource temporarily unavailable"):
        client.connect(str(dbus_proxy.socket_path))  # EAGAIN
    busctl = ["busctl", "--address", dbus_proxy.address, "status"]
    failed = subprocess.run(busctl, capture_output=True, text=True)
    assert failed.returncode != 0  # sd-bus does not retry
    assert "Resource temporarily unavailable" in failed.stderr
    fault.lift()  # accepting again: the next connect gets through
    subprocess.run(busctl, capture_output=True, check=True)


def test_the_per_user_connection_cap(dbus_bus, connection_cap):
    # max_connections_per_user=4 in dbus_bus's config (reloaded); the fault holds the rest.
    cap = connection_cap(dbus_bus, max_per_user=4)
    assert cap.refusal == (
        "org.freedesktop.DBus.Error.LimitsExceeded: "
        "The maximum number of active connections for UID 0 has been reached"
    )
    gdbus = ["gdbus", "call", "-a", dbus_bus.address, "-d", "org.freedesktop.DBus"]
    gdbus += ["-o", "/", "-m", "org.freedesktop.DBus.GetId"]
    refused = subprocess.run(gdbus, capture_output=True, text=True)
    assert "LimitsExceeded" in refused.stderr
    cap.lift()  # connections released, the config restored
    subprocess.run(gdbus, capture_output=True, check=True)
