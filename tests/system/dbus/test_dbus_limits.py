"""A bus at its limits: connect() gets EAGAIN; the per-user connection cap (issue 15).

* :class:`~pytest_runtimefaults.dbus.limits.ConnectBacklogFull`: the proxy
  stops accepting with its listen backlog full (systemd before 254 listened
  with a backlog of 128; opencontainers/cgroups PR 45, cri-o PR 4921, youki
  PR 3557 retry on EAGAIN).
* :class:`~pytest_runtimefaults.dbus.limits.ConnectionCap`: dbus-daemon's
  ``max_connections_per_user`` set low and reached (podman PR 11313: crun
  ``sd-bus call: No buffer space available``).

For each: a test-only susceptible client fails, a correct one passes, and
what real clients (busctl, dbus-send, gdbus) do is measured and pinned.
runc and crun are in tests/system/systemd/test_bus_limits.py.
"""

from __future__ import annotations

import errno
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from jeepney import DBusAddress, DBusErrorResponse, new_method_call
from jeepney.auth import BEGIN, Authenticator
from jeepney.bus import get_bus
from jeepney.io.blocking import DBusConnection, open_dbus_connection, prep_socket

from pytest_runtimefaults.dbus.bus import PrivateBus
from pytest_runtimefaults.dbus.limits import (
    LIMITS_EXCEEDED,
    CapError,
    ConnectBacklogFull,
    ConnectionCap,
)
from pytest_runtimefaults.dbus.proxy import DBusFaultProxy, ProxyError

pytestmark = [pytest.mark.needs("dbus-daemon"), pytest.mark.timeout(60)]
DBUS = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")
#: dbus-daemon's words for root past the cap (bus/connection.c)
CAP_TEXT = "The maximum number of active connections for UID 0 has been reached"
#: What each real client says past the cap, by bus (one of the words is in its output).
#: dbus-broker closes the connection during the handshake, saying nothing: the
#: clients report the broken connection, in words that depend on when it broke
#: (measured: dbus-broker 37, Debian 13).
PAST_THE_CAP = {
    "dbus-daemon": {
        # sd-bus's Hello failed and busctl reports its next call (or ENOBUFS)
        "busctl": ("Transport endpoint is not connected", "No buffer space"),
        "dbus-send": (CAP_TEXT,),
        "gdbus": (CAP_TEXT,),
    },
    "dbus-broker": {
        # as the broker's close meets sd-bus's handshake or its Hello (both seen)
        "busctl": (
            "Broken pipe",
            "Connection reset by peer",
            "Transport endpoint is not connected",
        ),
        "dbus-send": ("Did not receive a reply", "Broken pipe", "Connection reset by peer"),
        "gdbus": ("Broken pipe", "Connection reset by peer"),
    },
}


@pytest.fixture
def bus() -> Iterator[PrivateBus]:
    with PrivateBus(journal=None) as b:
        yield b


@pytest.fixture
def proxy(bus: PrivateBus) -> Iterator[DBusFaultProxy]:
    with DBusFaultProxy(bus.address, journal=None) as p:
        yield p
        assert not p.errors, p.errors


def _get_id(conn: DBusConnection) -> str:
    return str(conn.send_and_get_reply(new_method_call(DBUS, "GetId"), timeout=5).body[0])


def open_connection(address: str) -> DBusConnection:
    """jeepney's open_dbus_connection, but closing the socket when Hello is refused."""
    sock = prep_socket(get_bus(address), False, timeout=5)
    try:
        return DBusConnection(sock)
    except BaseException:
        sock.close()
        raise


# -- test-only clients ----------------------------------------------------------------


def connect_once(path: str) -> socket.socket:
    """Susceptible: one non-blocking connect(), as sd-bus and Go do, and no retry."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def connect_with_backoff(path: str, patience: float = 10.0) -> tuple[socket.socket, int]:
    """Correct: retry EAGAIN with a growing pause, as cgroups PR 45 does; (socket, retries)."""
    pause, retries = 0.01, 0
    deadline = time.monotonic() + patience
    while True:
        try:
            return connect_once(path), retries
        except BlockingIOError:
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.2)
            retries += 1


def _bus_connection(sock: socket.socket) -> DBusConnection:
    """The D-Bus handshake (EXTERNAL) and Hello on a connected socket."""
    sock.setblocking(True)
    sock.settimeout(5)
    auth = Authenticator()  # its first request starts with the NUL credentials byte
    for request in auth:
        sock.sendall(request)
        auth.feed(sock.recv(1024))
    sock.sendall(BEGIN)
    sock.settimeout(None)
    return DBusConnection(sock)


# -- connect() gets EAGAIN --------------------------------------------------------------


def test_a_full_backlog_gives_eagain_to_a_non_blocking_connect(proxy: DBusFaultProxy) -> None:
    path = str(proxy.socket_path)
    with ConnectBacklogFull(proxy) as fault:
        assert not proxy.accepting
        with pytest.raises(BlockingIOError) as info:
            connect_once(path)
        assert info.value.errno == errno.EAGAIN
        assert info.value.strerror == "Resource temporarily unavailable"
    assert fault.applied == 1
    assert proxy.accepting
    # Lifted: the same client gets through, and the bus answers it.
    conn = _bus_connection(connect_once(path))
    try:
        assert _get_id(conn)
    finally:
        conn.close()
    faults = [e.fault for e in proxy.trace.entries() if e.fault]
    assert faults[0].startswith("stop_accepting: backlog full"), faults
    assert "resume_accepting" in faults


def test_a_client_that_retries_gets_through_once_the_backlog_drains(
    proxy: DBusFaultProxy,
) -> None:
    path = str(proxy.socket_path)
    with ConnectBacklogFull(proxy, duration=0.5) as fault:
        t0 = time.monotonic()
        with pytest.raises(BlockingIOError):
            connect_once(path)
        sock, retries = connect_with_backoff(path)
        waited = time.monotonic() - t0
    conn = _bus_connection(sock)
    try:
        assert _get_id(conn)
    finally:
        conn.close()
    assert retries >= 2, "it got through at once: the fault did not hold"
    assert 0.4 < waited < 3, waited
    assert fault.seconds is not None
    assert 0.45 < fault.seconds < 2


def test_a_blocking_connect_waits_and_gets_through(proxy: DBusFaultProxy) -> None:
    """A truly blocking connect() (libdbus's) waits in the kernel until there is room."""
    path = str(proxy.socket_path)
    with ConnectBacklogFull(proxy, duration=0.6):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # blocking, no timeout
        t0 = time.monotonic()
        sock.connect(path)
        waited = time.monotonic() - t0
    conn = _bus_connection(sock)
    try:
        assert _get_id(conn)
    finally:
        conn.close()
    assert 0.5 < waited < 3, waited


def test_clients_connected_before_are_unharmed(proxy: DBusFaultProxy) -> None:
    before = [open_dbus_connection(proxy.address) for _ in range(3)]
    try:
        ids = {_get_id(c) for c in before}
        with ConnectBacklogFull(proxy):
            for _ in range(20):  # they go on calling while nobody new gets in
                assert {_get_id(c) for c in before} == ids
            with pytest.raises(BlockingIOError):
                connect_once(str(proxy.socket_path))
        assert {_get_id(c) for c in before} == ids
        # The proxy's own filler connections, accepted at the lift, never became
        # proxied connections (each would have taken an id and an upstream): the
        # next client is the 4th.
        after = open_dbus_connection(proxy.address)
        before.append(after)
        assert _get_id(after) in ids
        assert sorted(proxy.connections) == [1, 2, 3, 4]
    finally:
        for c in before:
            c.close()


def test_stopping_the_proxy_while_the_backlog_is_held(bus: PrivateBus) -> None:
    """stop() mid-fault: the fillers are closed, the loop ends, nothing is left."""
    proxy = DBusFaultProxy(bus.address, journal=None).start()
    fault = ConnectBacklogFull(proxy, duration=30).start()
    assert proxy._fillers  # white-box: what must not outlive the proxy
    proxy.stop()
    assert not proxy._fillers
    assert not proxy.threads
    fault.stop()  # the timer is cancelled; resuming a stopped proxy is a no-op
    assert fault.seconds is not None
    with pytest.raises(ProxyError, match="not started"):
        ConnectBacklogFull(proxy).start()


#: (client, argv) of the real clients measured through the proxy
def _real_clients(address: str) -> dict[str, list[str]]:
    return {
        "busctl": ["busctl", "--address", address, "status"],
        "dbus-send": [
            "dbus-send",
            f"--bus={address}",
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/",
            "org.freedesktop.DBus.GetId",
        ],
        "gdbus": [
            "gdbus",
            "call",
            "-a",
            address,
            "-d",
            "org.freedesktop.DBus",
            "-o",
            "/",
            "-m",
            "org.freedesktop.DBus.GetId",
        ],
    }


@pytest.mark.parametrize("client", ["busctl", "dbus-send", "gdbus"])
def test_real_clients_under_a_full_backlog(
    client: str, proxy: DBusFaultProxy, record_property: object
) -> None:
    """What each real client does while connect() would get EAGAIN for 1.5 s.

    Seen on Debian 12 and 13: busctl (sd-bus) fails at once, `Failed to connect
    to bus: Resource temporarily unavailable`; gdbus fails at once, `Could not
    connect: Resource temporarily unavailable`; dbus-send (libdbus connects
    blocking) waits until the backlog drains and succeeds.  Either a clear
    EAGAIN error or success after the wait passes; anything else fails.
    """
    argv = _real_clients(proxy.address)[client]
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} not installed")
    with ConnectBacklogFull(proxy, duration=1.5):
        t0 = time.monotonic()
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        took = time.monotonic() - t0
    out = (res.stdout + res.stderr).strip()
    print(f"{client}: rc {res.returncode} in {took:.2f} s: {out[-200:]}")
    if res.returncode:
        assert "Resource temporarily unavailable" in out, out
        assert took < 1.5, f"{client} failed, but only after {took:.2f} s: {out}"
    else:
        assert took >= 1.4, f"{client} got through in {took:.2f} s: the fault did not hold"


# -- the per-user connection cap --------------------------------------------------------


class LeakingClient:
    """Susceptible: a new bus connection for every call, never closed (podman PR 11313's bug)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.leaked: list[DBusConnection] = []

    def get_id(self) -> str:
        conn = open_connection(self.address)
        self.leaked.append(conn)
        return _get_id(conn)

    def close(self) -> None:
        for conn in self.leaked:
            conn.close()


class ReusingClient:
    """Correct: one connection, opened once, for every call."""

    def __init__(self, address: str) -> None:
        self.conn = open_dbus_connection(address)

    def get_id(self) -> str:
        return _get_id(self.conn)

    def close(self) -> None:
        self.conn.close()


def test_a_leaking_client_hits_the_cap_and_a_reusing_one_does_not(bus: PrivateBus) -> None:
    # dbus-broker takes the cap as it restarts (ConnectionCap's reload): every earlier
    # connection is dropped, so the reusing client connects under the cap there.
    broker = bus.bus_daemon == "dbus-broker"
    correct = None if broker else ReusingClient(bus.address)
    susceptible = LeakingClient(bus.address)
    try:
        with ConnectionCap.of(bus, max_per_user=8, leave=4 if broker else 3) as cap:
            if correct is None:
                correct = ReusingClient(bus.address)
            assert cap.refusal in bus.traits.cap_refusals, cap.refusal
            for _ in range(3):  # the 3 connections left under the cap
                susceptible.get_id()
            if broker:  # closed during the handshake, nothing said
                with pytest.raises((ConnectionResetError, BrokenPipeError)):
                    susceptible.get_id()
            else:
                with pytest.raises(DBusErrorResponse) as info:
                    susceptible.get_id()
                assert info.value.name == LIMITS_EXCEEDED
                assert info.value.data == (CAP_TEXT,)
            for _ in range(50):
                assert correct.get_id()
            if not broker:
                assert cap.applied == 8 - 1 - 3  # the reusing client's connection is one
        # Lifted: held connections closed, the limit back to the default.
        susceptible.close()
        susceptible.leaked.clear()
        for _ in range(12):
            susceptible.get_id()
    finally:
        correct.close()
        susceptible.close()
    assert "max_connections_per_user" not in (bus.dir / "bus.conf").read_text()  # type: ignore[operator]


@pytest.mark.parametrize("client", ["busctl", "dbus-send", "gdbus"])
def test_real_clients_past_the_cap(client: str, bus: PrivateBus) -> None:
    """What the bus tells each real client past the cap (seen on Debian 12 and 13).

    busctl: ``Failed to get credentials: Transport endpoint is not connected``
    (sd-bus's Hello failed and busctl reports its next call); dbus-send:
    ``Failed to register on connection ... The maximum number of active
    connections for UID 0 has been reached``; gdbus: ``GDBus.Error:org.
    freedesktop.DBus.Error.LimitsExceeded: The maximum ...``.
    """
    argv = _real_clients(bus.address)[client]
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} not installed")
    with ConnectionCap.of(bus, max_per_user=4):
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    out = (res.stdout + res.stderr).strip()
    print(f"{client}: rc {res.returncode}: {out[-300:]}")
    assert res.returncode != 0, out
    assert any(words in out for words in PAST_THE_CAP[bus.bus_daemon][client]), out
    assert subprocess.run(argv, capture_output=True, check=False).returncode == 0


def test_static_limits_of_a_private_bus() -> None:
    with pytest.raises(ValueError, match="max_connections_per_user"):
        PrivateBus(limits={"max connections": 2})
    with PrivateBus(journal=None, limits={"max_connections_per_user": 2}) as b:
        if not b.traits.counts_connections:
            pytest.skip(
                f"{b.bus_daemon} counts no connections: max_connections_per_user only "
                "scales its per-user byte and fd quotas (dbus-broker's launcher.c)"
            )
        held = [open_dbus_connection(b.address) for _ in range(2)]
        try:
            sock = prep_socket(get_bus(b.address), False, timeout=5)
            with pytest.raises(DBusErrorResponse, match="LimitsExceeded"):
                DBusConnection(sock)
            sock.close()
        finally:
            for c in held:
                c.close()


def test_a_cap_that_the_bus_does_not_enforce_is_an_error(bus: PrivateBus) -> None:
    """A bus that takes every connection (dbus-broker) must not pass silently."""
    cap = ConnectionCap.of(bus, max_per_user=3)
    # The configuration is written but the reload goes to a bus that ignores it:
    # a copy of the config elsewhere stands for dbus-broker's missing cap.
    assert bus.dir is not None
    other = bus.dir / "other.conf"
    other.write_text((bus.dir / "bus.conf").read_text())
    cap.config = other
    with pytest.raises(CapError, match="does not cap connections per user"):
        cap.start()
    assert cap.held == 0
    assert other.read_text() == (bus.dir / "bus.conf").read_text()  # restored


def test_leaving_more_than_is_held_is_an_error(bus: PrivateBus) -> None:
    """Root's other connections count under the cap too: say so, and leave nothing behind."""
    if bus.bus_daemon == "dbus-broker":
        pytest.skip(
            "on dbus-broker ConnectionCap restarts the bus to apply the cap, which drops "
            "root's other connections: none is left to count under it"
        )
    others = [open_dbus_connection(bus.address) for _ in range(3)]
    try:
        cap = ConnectionCap.of(bus, max_per_user=4, leave=3)
        with pytest.raises(CapError, match="only 1 connections are held"):
            cap.start()
        assert cap.held == 0
        assert bus.dir is not None
        assert "max_connections_per_user" not in (bus.dir / "bus.conf").read_text()
        others.append(open_dbus_connection(bus.address))  # the cap was lifted again
    finally:
        for conn in others:
            conn.close()
