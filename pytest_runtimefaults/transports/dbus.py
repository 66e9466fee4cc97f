"""D-Bus signal subscriptions: ``AddMatch`` on a bus (or through the fault proxy).

Each subscription is its own connection to the bus: ``Hello``, then
``AddMatch(rule)``; the bus's reply to ``AddMatch`` is a real acknowledgement
that the rule is in place.  With ``systemd=True`` the subscriber also calls
``org.freedesktop.systemd1.Manager.Subscribe``, as ``systemctl`` and runc do,
so that systemd (which emits ``UnitNew``/``JobRemoved``... only while someone
subscribed) tracks, and must forget, every subscriber of the swarm.

Connect through :class:`~pytest_runtimefaults.dbus.proxy.DBusFaultProxy` (its
``.address``) to combine D-Bus faults (``Delay`` on signals) with churn.

An event's key is the sender's unique name and the signal's serial: the bus
delivers the very same message to every matching connection.

Example::

    transport = DBusSignals(proxy.address, systemd=True)
    with Swarm(transport, subscribers=10, seed=1) as swarm:
        ...
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from pytest_runtimefaults.core.log import swallowed
from pytest_runtimefaults.subscribers import (
    Event,
    Subscription,
    SubscriptionError,
    ThreadedSubscription,
)

__all__ = ["SYSTEMD_MANAGER_SIGNALS", "DBusSignals"]

SYSTEMD_MANAGER_SIGNALS = (
    "type='signal',sender='org.freedesktop.systemd1',"
    "interface='org.freedesktop.systemd1.Manager',path='/org/freedesktop/systemd1'"
)


def _bus_address() -> Any:
    from jeepney import DBusAddress

    return DBusAddress(
        "/org/freedesktop/DBus", bus_name="org.freedesktop.DBus", interface="org.freedesktop.DBus"
    )


class DBusSignals:
    """Subscribe to signals matching *match* on the bus at *address* (see module doc)."""

    def __init__(
        self,
        address: str,
        *,
        match: str = SYSTEMD_MANAGER_SIGNALS,
        systemd: bool = True,
        timeout: float = 10.0,
        name: str = "dbus signals",
    ) -> None:
        self.address = address
        self.match = match
        self.systemd = systemd
        self.timeout = timeout
        self.name = name

    def _call(self, conn: Any, msg: Any) -> Any:
        from jeepney import HeaderFields, MessageType

        reply = conn.send_and_get_reply(msg, timeout=self.timeout)
        if reply.header.message_type == MessageType.error:
            raise SubscriptionError(
                f"{self.address}: {msg.header.fields.get(HeaderFields.member)} failed: "
                f"{reply.header.fields.get(HeaderFields.error_name)} {reply.body}"
            )
        return reply

    def subscribe(self) -> Subscription:
        from jeepney import DBusAddress, HeaderFields, MessageType, new_method_call
        from jeepney.io.blocking import open_dbus_connection

        try:
            conn = open_dbus_connection(bus=self.address, auth_timeout=self.timeout)
        except (OSError, EOFError, ValueError) as exc:
            raise SubscriptionError(f"cannot connect to {self.address}: {exc}") from exc
        try:
            self._call(conn, new_method_call(_bus_address(), "AddMatch", "s", (self.match,)))
            if self.systemd:
                manager = DBusAddress(
                    "/org/freedesktop/systemd1",
                    bus_name="org.freedesktop.systemd1",
                    interface="org.freedesktop.systemd1.Manager",
                )
                self._call(conn, new_method_call(manager, "Subscribe"))
        except (OSError, EOFError, TimeoutError) as exc:
            conn.close()
            raise SubscriptionError(f"{self.address}: subscribing failed: {exc!r}") from exc
        except BaseException:
            conn.close()
            raise

        def pump(put: Callable[[Event], None], cancelled: Callable[[], bool]) -> None:
            try:
                while True:
                    try:
                        msg = conn.receive()
                    except (OSError, EOFError, ValueError) as exc:
                        if cancelled():
                            return
                        raise SubscriptionError(f"{self.address}: {exc!r}") from exc
                    h = msg.header
                    if h.message_type != MessageType.signal:
                        continue
                    f = h.fields
                    put(
                        Event(
                            key=f"{f.get(HeaderFields.sender)}/{h.serial}",
                            topic=f"{f.get(HeaderFields.interface)}.{f.get(HeaderFields.member)}",
                            data=str(msg.body)[:200],
                        )
                    )
            finally:
                conn.close()

        def cancel() -> None:
            with swallowed(OSError, "shutting down a D-Bus signal subscription"):
                conn.sock.shutdown(socket.SHUT_RDWR)

        return ThreadedSubscription(pump, on_cancel=cancel, name="dbus-signals")
