"""A real cookie overflow: the sandboxed systemd's own serials cross 0xffffffff."""

from jeepney import DBusAddress, new_method_call
from jeepney.io.blocking import open_dbus_connection

SYSTEMD1 = "org.freedesktop.systemd1"
PEER = DBusAddress("/org/freedesktop/systemd1", SYSTEMD1, "org.freedesktop.DBus.Peer")
PING = new_method_call(PEER, "Ping")


def test_systemd_continues_at_0x80000000(systemd, systemd_cookie_overflow):
    conn = open_dbus_connection(bus=systemd.bus_address)
    try:
        serials = [conn.send_and_get_reply(PING, timeout=5).header.serial for _ in range(17)]
    finally:
        conn.close()
    # 0xfffffff1 ... 0xffffffff, then what systemd (PR 11818) does past the boundary.
    assert serials[14:] == [0xFFFFFFFF, 0x80000000, 0x80000001]
    assert systemd_cookie_overflow.read() == 0x80000001
