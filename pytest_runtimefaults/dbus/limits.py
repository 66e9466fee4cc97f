"""Faults of a bus at its limits: connect() gets EAGAIN; the per-user connection cap.

Two neighbours of incident 2 (docs/incidents.md, "Neighbours"):

* :class:`ConnectBacklogFull`: the socket's listen backlog is full, so a
  non-blocking ``connect()`` fails with ``EAGAIN`` (``Resource temporarily
  unavailable``).  systemd before 254 listened with a backlog of 128, and a
  burst of clients got EAGAIN; opencontainers/cgroups PR 45, cri-o PR 4921
  and youki PR 3557 added retries.  Made by a
  :class:`~pytest_runtimefaults.dbus.proxy.DBusFaultProxy`, which stops
  accepting and fills its own backlog (:meth:`~pytest_runtimefaults.dbus.
  proxy.DBusFaultProxy.stop_accepting`), for *duration* seconds or until
  lifted.  Clients connected before are not touched.
* :class:`ConnectionCap`: the bus's ``max_connections_per_user`` set low
  (written into its configuration and reloaded) and the connections left
  under it held by the fault, so that the next connection of the user is
  refused at ``Hello``: dbus-daemon answers
  ``org.freedesktop.DBus.Error.LimitsExceeded: The maximum number of active
  connections for UID 0 has been reached``, which sd-bus maps to ``ENOBUFS``
  (crun: ``No buffer space available``, podman PR 11313).  dbus-broker has
  no connection count, but its per-user fd quota caps connections all the
  same (see the class).

Example::

    with PrivateBus() as bus, ConnectionCap.of(bus, max_per_user=4) as cap:
        ...  # a new connection of root's is refused: cap.refusal says how
    with DBusFaultProxy(bus.address) as proxy, ConnectBacklogFull(proxy, duration=2):
        ...  # connect() to proxy.address gets EAGAIN for 2 s
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_runtimefaults.core.fault import FaultBase
from pytest_runtimefaults.core.log import logger, swallowed

if TYPE_CHECKING:
    from pytest_runtimefaults.dbus.proxy import DBusFaultProxy

__all__ = [
    "LIMITS_EXCEEDED",
    "CapError",
    "ConnectBacklogFull",
    "ConnectionCap",
    "set_limit",
]

#: the D-Bus error dbus-daemon answers ``Hello`` with past a limit
LIMITS_EXCEEDED = "org.freedesktop.DBus.Error.LimitsExceeded"
_LIMIT_NAME = "max_connections_per_user"
_FDS_NAME = "max_outgoing_unix_fds"


class CapError(RuntimeError):
    """The connection cap could not be reached or set; the message says why."""


class ConnectBacklogFull(FaultBase):
    """*proxy* stops accepting with its backlog full: ``connect()`` gets ``EAGAIN``.

    ``start()`` calls :meth:`DBusFaultProxy.stop_accepting`; ``lift()`` (or
    the end of *duration* seconds, when given) calls
    :meth:`DBusFaultProxy.resume_accepting`, which accepts whoever waited in
    the backlog (a blocking ``connect()`` waits, and then gets through) and
    drops the proxy's own filler connections.  ``applied`` is 1 once the
    backlog was full; ``seconds`` is how long it stayed so.
    """

    def __init__(self, proxy: DBusFaultProxy, *, duration: float | None = None) -> None:
        super().__init__()
        if duration is not None and not duration > 0:
            raise ValueError(f"ConnectBacklogFull duration must be > 0 seconds, not {duration!r}")
        self.name = "connect backlog full" + (f" for {duration:g} s" if duration else "")
        self.proxy = proxy
        self.duration = duration
        self.seconds: float | None = None
        self._t0 = 0.0
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()  # lift() from the timer and from the test

    def _start(self) -> None:
        self.proxy.stop_accepting()
        self._t0 = time.monotonic()
        self._fired()
        if self.duration:
            self._timer = threading.Timer(self.duration, self.lift)
            self._timer.name = "rf-backlog-timer"
            self._timer.daemon = True
            self._timer.start()

    def lift(self) -> None:
        with self._lock:
            super().lift()

    def _lift(self) -> None:
        self.proxy.resume_accepting()
        self.seconds = time.monotonic() - self._t0

    def _stop(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()
            timer.join(5)


def set_limit(config: str, name: str, value: int) -> str:
    """*config* (a bus configuration's text) with ``<limit name=NAME>VALUE</limit>``.

    An existing limit of that name is replaced, else the limit goes last.

    >>> set_limit("<busconfig>\\n</busconfig>", "max_connections_per_user", 4)
    '<busconfig>\\n  <limit name="max_connections_per_user">4</limit>\\n</busconfig>'
    """
    if not re.fullmatch(r"[a-z_]+", name):
        raise ValueError(f"not a bus limit name: {name!r}")
    line = f'<limit name="{name}">{int(value)}</limit>'
    pattern = re.compile(rf'<limit\s+name="{name}"\s*>[^<]*</limit>')
    if pattern.search(config):
        return pattern.sub(line, config)
    if "</busconfig>" not in config:
        raise ValueError("not a bus configuration: no </busconfig>")
    return config.replace("</busconfig>", f"  {line}\n</busconfig>", 1)


class ConnectionCap(FaultBase):
    """The bus's per-user connection cap set to *max_per_user*, reached, and held.

    ``start()`` writes ``max_connections_per_user`` into the bus's
    configuration file *config* and asks the bus at *address* to reload it
    (``ReloadConfig``; connections already open stay), then opens connections
    as root until the bus refuses one, and holds them: from then on the
    user's next connection is refused (``refusal`` is the bus's exact
    answer).  With *leave* = K it then closes K of them, so K more
    connections get through before the cap bites (a leaking client fails at
    its K+1-th).  ``lift()`` closes the held connections and restores the
    configuration (reloaded).  ``applied`` is how many connections it held.

    Use :meth:`of` for a :class:`~pytest_runtimefaults.dbus.bus.PrivateBus`
    or a :class:`~pytest_runtimefaults.systemd.SystemdSandbox`.

    dbus-broker (*broker* true) counts no connections: its launcher reads
    ``max_connections_per_user`` only to multiply the per-connection byte,
    fd and match limits into per-user quotas (``--max-bytes``,
    ``--max-fds``, ``--max-matches``), and the broker's per-user object
    quota (``--max-objects``) is not passed by the launcher at all.  But each
    connection is charged its socket's fd against the fd quota, so
    ``max_outgoing_unix_fds`` = 1 as well makes ``max_connections_per_user``
    a connection cap (measured: dbus-broker 37 closes the next connection
    during the handshake, ``Connection reset by peer``).  The launcher
    passes the quotas only when it starts the broker, so *reload* must
    restart the bus (:meth:`SystemdSandbox.restart_bus`, which :meth:`of`
    picks).  A bus that takes every connection is a :class:`CapError`.
    """

    def __init__(
        self,
        config: str | Path,
        address: str,
        *,
        max_per_user: int,
        leave: int = 0,
        timeout: float = 5.0,
        broker: bool = False,
        reload: Callable[[], object] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(max_per_user, int) or max_per_user < 1:
            raise ValueError(f"max_per_user must be an int >= 1, not {max_per_user!r}")
        if not isinstance(leave, int) or not 0 <= leave < max_per_user:
            raise ValueError(f"leave must be an int in [0, max_per_user), not {leave!r}")
        self.name = f"{_LIMIT_NAME}={max_per_user}" + (f", {leave} left" if leave else ", reached")
        self.config = Path(config)
        self.address = address
        self.max_per_user = max_per_user
        self.leave = leave
        self.timeout = timeout
        self.broker = broker
        self._reload_fn = reload
        #: the bus's answer to the connection it refused (the exact error text)
        self.refusal: str | None = None
        self._original: str | None = None
        self._held: list[Any] = []

    @classmethod
    def of(cls, bus: Any, *, max_per_user: int, leave: int = 0) -> ConnectionCap:
        """The cap of a PrivateBus (``bus.dir/bus.conf``) or a SystemdSandbox's bus.

        A sandbox running dbus-broker gets the broker's way (the fd quota, and a
        restart of the bus to apply it: every connection is dropped once).
        """
        workdir = getattr(bus, "workdir", None) or getattr(bus, "dir", None)
        if workdir is None:
            raise CapError(f"{bus!r} has no bus configuration of ours to change (not started?)")
        address = getattr(bus, "bus_address", None) or bus.address
        broker = getattr(bus, "bus_daemon", "dbus-daemon") == "dbus-broker"
        return cls(
            Path(workdir) / "bus.conf",
            address,
            max_per_user=max_per_user,
            leave=leave,
            broker=broker,
            reload=bus.restart_bus if broker else None,
        )

    @property
    def held(self) -> int:
        """How many connections the fault holds now."""
        return len(self._held)

    def _start(self) -> None:
        self._original = self.config.read_text()
        capped = set_limit(self._original, _LIMIT_NAME, self.max_per_user)
        if self.broker:
            capped = set_limit(capped, _FDS_NAME, 1)  # one fd per connection: a connection quota
        self.config.write_text(capped)
        # The connection that asked for the reload is kept as the first one held:
        # closed, the bus would free its slot some time later, under the cap.
        kept = self._reload(keep=True)
        if kept is not None:
            self._held.append(kept)
        # Counting the user's connections would need the bus's stats interface (not
        # built everywhere); opening until refused reaches the cap exactly.
        for _ in range(self.max_per_user + 1):
            conn, error = _connect(self.address, self.timeout)
            if conn is None:
                self.refusal = error
                break
            self._held.append(conn)
        if self.refusal is None:
            raise CapError(
                f"the bus at {self.address} took {len(self._held)} connections of root with "
                f"{_LIMIT_NAME}={self.max_per_user}: it does not cap connections per user "
                "(dbus-broker does not count connections: pass broker=True, which sets "
                f"{_FDS_NAME}=1 too, and a reload= that restarts it)"
            )
        if self.leave > len(self._held):
            raise CapError(
                f"only {len(self._held)} connections are held under {_LIMIT_NAME}="
                f"{self.max_per_user} (the others are the bus's other clients of root): "
                f"leave={self.leave} cannot be left free; raise max_per_user"
            )
        if self.leave:
            before = _connections_of(self._held[0], 0, self.timeout) if self._held else 0
            for _ in range(self.leave):
                self._held.pop().close()
            # The bus frees a closed connection's quota when it sees the hangup, not
            # at our close(): wait for that, or the next client may still be refused.
            self._wait_freed(before - self.leave)
        self._fired(len(self._held))
        logger.debug("%s: holding %d, refusal %r", self.name, len(self._held), self.refusal)

    def _wait_freed(self, expected: int) -> None:
        if not self._held:
            time.sleep(0.2)  # no connection of ours left to ask the bus with
            return
        deadline = time.monotonic() + self.timeout
        while (seen := _connections_of(self._held[0], 0, self.timeout)) > expected:
            if time.monotonic() > deadline:
                raise CapError(
                    f"the bus still counts {seen} connections of root {self.timeout} s after "
                    f"{self.leave} were closed (expected {expected})"
                )
            time.sleep(0.02)

    def release(self) -> None:
        """Close the held connections (the cap stays set): leaked connections closed."""
        held, self._held = self._held, []
        for conn in held:
            with swallowed(OSError, "closing a held bus connection"):
                conn.close()

    def _lift(self) -> None:
        self._restore()

    def _stop(self) -> None:
        # Also after a failed start (which skips _lift): nothing held, the config as it was.
        self._restore()

    def _restore(self) -> None:
        self.release()
        if self._original is not None:
            original, self._original = self._original, None
            self.config.write_text(original)
            self._reload()

    def _reload(self, *, keep: bool = False) -> Any:
        """*reload*, else ``ReloadConfig`` on a connection of its own.

        That connection is returned with *keep* (None when *reload* was used),
        else closed.
        """
        if self._reload_fn is not None:
            self._reload_fn()
            return None
        from jeepney import DBusAddress, new_method_call
        from jeepney.wrappers import unwrap_msg

        conn, error = _connect(self.address, self.timeout)
        if conn is None:
            raise CapError(f"cannot reach the bus at {self.address} to reload it: {error}")
        try:
            bus = DBusAddress(
                "/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus"
            )
            unwrap_msg(
                conn.send_and_get_reply(new_method_call(bus, "ReloadConfig"), timeout=self.timeout)
            )
        except Exception as exc:  # jeepney's DBusErrorResponse, timeouts
            conn.close()
            raise CapError(
                f"the bus at {self.address} did not reload {self.config}: {exc}"
            ) from exc
        if keep:
            return conn
        conn.close()
        return None


def _connections_of(conn: Any, uid: int, timeout: float) -> int:
    """How many connections of *uid* the bus has now (its unique names, asked on *conn*)."""
    from jeepney import DBusAddress, DBusErrorResponse, new_method_call
    from jeepney.wrappers import unwrap_msg

    bus = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")
    names = conn.send_and_get_reply(new_method_call(bus, "ListNames"), timeout=timeout).body[0]
    count = 0
    for name in names:
        if not name.startswith(":"):
            continue
        call = new_method_call(bus, "GetConnectionUnixUser", "s", (name,))
        reply = conn.send_and_get_reply(call, timeout=timeout)
        try:
            count += unwrap_msg(reply)[0] == uid
        except DBusErrorResponse:  # gone between the two calls
            continue
    return count


def _connect(address: str, timeout: float) -> tuple[Any, str | None]:
    """A jeepney connection past ``Hello``, or None and the bus's refusal as text."""
    from jeepney import DBusErrorResponse
    from jeepney.bus import get_bus
    from jeepney.io.blocking import DBusConnection, prep_socket

    try:
        sock = prep_socket(get_bus(address), False, timeout=timeout)
    except OSError as exc:
        return None, f"connect or handshake: {exc}"
    try:
        return DBusConnection(sock), None
    except DBusErrorResponse as exc:
        sock.close()
        return None, f"{exc.name}: {exc.data[0] if exc.data else ''}"
    except Exception as exc:  # EOF at Hello (a bus that closes), auth failures
        sock.close()
        return None, f"{type(exc).__name__}: {exc}"
