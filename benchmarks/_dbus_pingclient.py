"""Helper for bench_dbus_proxy.py: N round trips of org.freedesktop.DBus.GetId on ADDRESS.

``_dbus_pingclient.py ADDRESS N [fds]``: with ``fds``, the client negotiates
Unix fd passing (NEGOTIATE_UNIX_FD), as sd-bus and godbus clients (systemd
tools, runc, crun) do.

Run as a separate process (as a runtime under test would be); prints one latency
per line in microseconds.  Uses jeepney's blocking connection: its cost is the
same on every path, so differences between paths are the proxies' own.
"""

from __future__ import annotations

import sys
import time

from jeepney import DBusAddress, new_method_call
from jeepney.io.blocking import open_dbus_connection


def main() -> None:
    address, n = sys.argv[1], int(sys.argv[2])
    conn = open_dbus_connection(bus=address, enable_fds=sys.argv[3:] == ["fds"])
    target = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")
    msg = new_method_call(target, "GetId")
    for _ in range(50):  # warm up
        conn.send_and_get_reply(msg)
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        conn.send_and_get_reply(msg)
        out.append((time.perf_counter_ns() - t) / 1000)
    conn.close()
    sys.stdout.write("\n".join(f"{x:.1f}" for x in out) + "\n")


if __name__ == "__main__":
    main()
