"""A small, real D-Bus service for the tests (run as its own process).

    python tests/helpers/dbus_service.py ADDRESS [NAME]

Owns NAME (default org.example.RuntimeFaults) on the bus at ADDRESS, prints
``ready`` and serves on object ``/org/example/RuntimeFaults``, interface
``org.example.RuntimeFaults``:

* ``Ping() -> s``: "pong";
* ``Echo(ay) -> ay``: the bytes back (large payloads);
* ``ReadFd(h) -> s``: reads the passed file descriptor to its end;
* ``Emit(s)``: emits signal ``Event(s)`` then returns;
* ``Slow(d) -> s``: answers after the given seconds;
* ``Quit()``: returns, then exits.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from jeepney import HeaderFields, MessageType, new_error, new_method_return, new_signal
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection
from jeepney.wrappers import DBusAddress

PATH = "/org/example/RuntimeFaults"
IFACE = "org.example.RuntimeFaults"


def main() -> None:
    address = sys.argv[1]
    name = sys.argv[2] if len(sys.argv) > 2 else IFACE
    conn = open_dbus_connection(bus=address, enable_fds=True)
    conn.send_and_get_reply(message_bus.RequestName(name, 4))
    print("ready", flush=True)
    lock = threading.Lock()
    emitter = DBusAddress(PATH, interface=IFACE)
    while True:
        msg = conn.receive()
        if msg.header.message_type != MessageType.method_call:
            continue
        member = msg.header.fields.get(HeaderFields.member)
        if member == "Ping":
            reply = new_method_return(msg, "s", ("pong",))
        elif member == "Echo":
            reply = new_method_return(msg, "ay", (msg.body[0],))
        elif member == "ReadFd":
            with msg.body[0].to_file("rb") as f:
                reply = new_method_return(msg, "s", (f.read().decode(),))
        elif member == "Emit":
            with lock:
                conn.send(new_signal(emitter, "Event", "s", (msg.body[0],)))
            reply = new_method_return(msg)
        elif member == "Slow":
            delay = msg.body[0]

            def later(m=msg, d=delay):
                time.sleep(d)
                with lock:
                    conn.send(new_method_return(m, "s", ("slow",)))

            threading.Thread(target=later, daemon=True).start()
            continue
        elif member == "Quit":
            conn.send(new_method_return(msg))
            os._exit(0)
        else:
            reply = new_error(
                msg, "org.freedesktop.DBus.Error.UnknownMethod", "s", (f"no method {member}",)
            )
        with lock:
            conn.send(reply)


if __name__ == "__main__":
    main()
