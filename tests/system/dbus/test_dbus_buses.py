"""PrivateBus on either bus: dbus-daemon, or dbus-broker without systemd (issue 15).

The bus in use is the session's (``--runtimefaults-bus-daemon``), and
:data:`~pytest_runtimefaults.dbus.bus.BUS_TRAITS` says how it differs from the
other: what its driver does is measured here against the table, so a wrong
row fails.  The dbus-broker tests run where it is installed (the Debian 13
and sid rootfs: ``scripts/distro debian13-broker``); the host (Debian 12, no
dbus-broker on purpose) checks the error that names its package.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator

import pytest
from dbus_crafted import crafted
from jeepney import DBusAddress, message_bus, new_method_call
from jeepney.io.blocking import open_dbus_connection

from pytest_runtimefaults.dbus.bus import BUS_TRAITS, BusError, PrivateBus
from pytest_runtimefaults.systemd import default_bus_daemon

pytestmark = pytest.mark.timeout(60)
DBUS = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")
HAVE_BROKER = shutil.which("dbus-broker-launch") is not None and shutil.which("dbus-broker")
needs_broker = pytest.mark.skipif(
    not HAVE_BROKER or os.geteuid() != 0,
    reason="needs dbus-broker (apt-get install dbus-broker) and root",
)


@pytest.fixture
def broker() -> Iterator[PrivateBus]:
    with PrivateBus(bus_daemon="dbus-broker", journal=None) as b:
        yield b


def _get_id(address: str) -> str:
    conn = open_dbus_connection(address)
    try:
        return str(conn.send_and_get_reply(new_method_call(DBUS, "GetId"), timeout=5).body[0])
    finally:
        conn.close()


def test_dbus_bus_is_the_sessions_bus(dbus_bus: PrivateBus) -> None:
    assert dbus_bus.bus_daemon == default_bus_daemon()
    assert dbus_bus.traits is BUS_TRAITS[dbus_bus.bus_daemon]
    assert _get_id(dbus_bus.address)


def test_the_driver_serials_are_as_the_table_says(dbus_bus: PrivateBus) -> None:
    conn = open_dbus_connection(dbus_bus.address)
    try:
        serials = [
            conn.send_and_get_reply(new_method_call(DBUS, member), timeout=5).header.serial
            for member in ("GetId", "ListNames", "GetId")
        ]
    finally:
        conn.close()
    expected = dbus_bus.traits.driver_serial
    if expected is None:  # counting up: three replies, three serials
        assert len(set(serials)) == 3, serials
        assert all(0 < s < 0x80000000 for s in serials), serials
    else:
        assert serials == [expected] * 3, serials


def test_an_unknown_bus_daemon_is_an_error() -> None:
    with pytest.raises(ValueError, match="use one of dbus-daemon, dbus-broker"):
        PrivateBus(bus_daemon="dbus-brokr")


@pytest.mark.skipif(bool(HAVE_BROKER), reason="dbus-broker is installed here")
def test_a_missing_dbus_broker_is_an_error_naming_its_package() -> None:
    bus = PrivateBus(bus_daemon="dbus-broker", journal=None)
    with pytest.raises(BusError, match=r"apt-get install dbus-broker"):
        bus.start()
    assert bus.dir is None  # nothing left behind


@needs_broker
def test_dbus_broker_serves_and_logs() -> None:
    # The launcher's journal socket is in its own mount namespace: this one's
    # /run/systemd is as it was (in a container, it does not even exist).
    journal_socket = "/run/systemd/journal/socket"
    existed = os.path.exists(journal_socket)
    with PrivateBus(bus_daemon="dbus-broker", journal=None) as broker:
        assert broker.traits.driver_serial == 0xFFFFFFFF
        assert _get_id(broker.address)
        assert "Ready" in broker.broker_log()
        assert os.path.exists(journal_socket) == existed
        assert broker.dir is not None
        assert (broker.dir / "journal" / "socket").exists()
    assert os.path.exists(journal_socket) == existed


@needs_broker
def test_dbus_broker_keeps_serving_past_the_journal_socket_queue(broker: PrivateBus) -> None:
    """30 records in a row (a datagram socket queues 10): the broker must not block on its log.

    Each client sends a message with an invalid header, which dbus-broker logs as
    it disconnects it.  With the journal socket read by the test process only
    when it asked, the 12th such client was never served, nor any other.
    """
    auth = b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n"
    hello = bytes(message_bus.Hello().serialise(serial=1))
    invalid = dict(crafted())["a() field"]  # a header field of a signature the spec forbids
    for _ in range(30):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(broker.socket_path))
            sock.sendall(auth)
            assert sock.recv(256).startswith(b"OK "), "the broker did not answer SASL"
            sock.sendall(b"BEGIN\r\n" + hello + invalid)
            while sock.recv(65536):  # Hello's reply, NameAcquired, then EOF: dropped
                pass
    assert _get_id(broker.address)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if sum("is being disconnected" in line for line in broker.broker_log()) >= 30:
            break
        time.sleep(0.05)
    assert sum("is being disconnected" in line for line in broker.broker_log()) >= 30


@needs_broker
def test_dbus_broker_restarts_on_the_same_socket(broker: PrivateBus) -> None:
    before, pid = _get_id(broker.address), broker.pid
    broker.restart_bus()
    assert broker.pid != pid
    assert _get_id(broker.address) != before  # a new bus: a new id
    assert broker.broker_log().count("Ready") == 2


@needs_broker
def test_a_dead_broker_is_reported_with_its_log(broker: PrivateBus) -> None:
    assert broker.exit_report() is None
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGKILL)
    assert broker.process is not None
    broker.process.wait(timeout=5)
    report = broker.exit_report()
    assert report is not None
    assert report.startswith(f"dbus-broker-launch (pid {broker.pid}) was killed by SIGKILL")
    assert "log: Ready" in report
