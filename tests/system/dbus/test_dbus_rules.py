"""Every fault action, through a real bus (dbus-daemon or dbus-broker), seen by real clients.

The youki bug class is caught: a client that reads once and takes the first
METHOD_RETURN (tests/helpers/naive_clients.py) passes with no fault and fails every
time under SignalBeforeReply, SplitMessage and StrayReply, while jeepney (which
frames properly and matches reply_serial) passes.  A client with signed 32-bit
serials fails under Serials; a stalled sender makes a client with a timeout
fail within it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from dbus_helpers import NAME, PATH, run, service
from jeepney import DBusAddress, MessageType, new_method_call
from jeepney.io.blocking import DBusConnection, open_dbus_connection
from jeepney.low_level import Endianness, HeaderFields, Message
from naive_clients import NoReply, SignedSerialClient, YoukiLikeClient

from pytest_runtimefaults.dbus.bus import PrivateBus
from pytest_runtimefaults.dbus.proxy import DBusFaultProxy
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
from pytest_runtimefaults.dbus.trace import TO_BUS, TO_CLIENT

pytestmark = pytest.mark.timeout(60)
SVC = DBusAddress(PATH, NAME, NAME)
PING = new_method_call(SVC, "Ping")


@pytest.fixture(scope="module")
def bus() -> Iterator[PrivateBus]:
    with PrivateBus() as b, service(b.address):
        yield b


@pytest.fixture
def proxy(bus: PrivateBus) -> Iterator[DBusFaultProxy]:
    with DBusFaultProxy(upstream=bus.address, seed=1) as p:
        yield p
    assert p.errors == []


@pytest.fixture
def conn(proxy: DBusFaultProxy) -> Iterator[DBusConnection]:
    c = open_dbus_connection(bus=proxy.address)
    yield c
    c.close()


def _replies(c: DBusConnection, n: int, timeout: float = 5) -> list[Message]:
    """The next *n* replies the client receives, skipping signals (NameAcquired...)."""
    out: list[Message] = []
    while len(out) < n:
        msg = c.receive(timeout=timeout)
        if msg.header.message_type != MessageType.signal:
            out.append(msg)
    return out


def _reply_serials(c: DBusConnection, n: int) -> list[int]:
    return [m.header.fields[HeaderFields.reply_serial] for m in _replies(c, n)]


# -- Delay and Reorder ------------------------------------------------------------------


def test_delay_holds_the_reply_for_the_given_time(
    proxy: DBusFaultProxy, conn: DBusConnection
) -> None:
    proxy.add(Delay(0.3).on_reply(member="Ping"))
    t = time.monotonic()
    assert conn.send_and_get_reply(PING, timeout=5).body == ("pong",)
    elapsed = time.monotonic() - t
    assert 0.3 <= elapsed < 1.0  # held, then released (not held for ever)
    arrived = next(
        e
        for e in proxy.trace.messages(TO_CLIENT)
        if e.message is not None
        and e.fault is None
        and e.reply_serial is not None
        and e.type == "method_return"
        and e.sender != "org.freedesktop.DBus"
    )
    (applied,) = [e for e in proxy.trace.faults() if e.fault and "Delay" in e.fault]
    # Measured inside the proxy: held 0.3 s, give or take a late wake of a busy loop
    # (the deadline is taken a moment before the arrival is traced).
    assert 0.29 <= applied.monotonic - arrived.monotonic < 0.8


@pytest.mark.parametrize("ordered", [True, False])
def test_delay_ordered_or_overtaken(
    proxy: DBusFaultProxy, conn: DBusConnection, ordered: bool
) -> None:
    # Long enough for the Echo round trip to finish inside the hold on a busy machine.
    proxy.add(Delay(1.0, ordered=ordered).on_reply(member="Ping").times(1))
    conn.send(PING, serial=1001)
    conn.send(new_method_call(SVC, "Echo", "ay", (b"x",)), serial=1002)
    assert _reply_serials(conn, 2) == ([1001, 1002] if ordered else [1002, 1001])


def test_reorder_swaps_with_the_next_message(proxy: DBusFaultProxy, conn: DBusConnection) -> None:
    proxy.add(Reorder().on_reply(member="Ping").times(1))
    conn.send(PING, serial=1001)
    time.sleep(0.05)  # the Ping reply is held before the Echo call is even sent
    conn.send(new_method_call(SVC, "Echo", "ay", (b"x",)), serial=1002)
    assert _reply_serials(conn, 2) == [1002, 1001]


# -- the youki bug class ---------------------------------------------------------------------


def test_youki_like_client_passes_with_no_fault(proxy: DBusFaultProxy) -> None:
    client = YoukiLikeClient(proxy.address)
    try:
        for _ in range(20):
            assert client.call(PING) == ("pong",)
    finally:
        client.close()


@pytest.mark.parametrize(
    "rule",
    [
        SignalBeforeReply().on_reply(member="Ping"),
        SignalBeforeReply("JobRemoved").on_reply(member="Ping"),
        SplitMessage(parts=2).on_reply(member="Ping"),
        SplitMessage(parts=3, random=True).on_reply(member="Ping"),
    ],
    ids=["signal-copy", "signal-jobremoved", "split2", "split3-random"],
)
def test_youki_like_client_fails_every_time_correct_client_passes(
    proxy: DBusFaultProxy, rule: object
) -> None:
    proxy.add(rule)  # type: ignore[arg-type]
    naive = YoukiLikeClient(proxy.address)
    failures = 0
    try:
        for _ in range(10):
            with pytest.raises(NoReply, match="expected to get a reply for method call"):
                naive.call(PING)
            failures += 1
            naive.sock.settimeout(0.2)  # drop what the naive client left in its socket
            try:
                while naive.sock.recv(65536):
                    pass
            except TimeoutError:
                pass
            naive.sock.settimeout(5)
    finally:
        naive.close()
    assert failures == 10
    good = open_dbus_connection(bus=proxy.address)
    try:
        for _ in range(10):
            assert good.send_and_get_reply(PING, timeout=5).body == ("pong",)
    finally:
        good.close()


def test_stray_reply_fools_the_naive_client_not_jeepney(proxy: DBusFaultProxy) -> None:
    proxy.add(StrayReply(answer="none").on_reply(member="Ping"))
    naive = YoukiLikeClient(proxy.address)
    try:
        assert naive.call(PING) != ("pong",)  # it took the stray, empty reply as its answer
    finally:
        naive.close()
    good = open_dbus_connection(bus=proxy.address)
    try:
        assert good.send_and_get_reply(PING, timeout=5).body == ("pong",)
    finally:
        good.close()
    strays = [e for e in proxy.trace.faults() if e.fault and "StrayReply" in e.fault]
    assert strays
    assert all(e.reply_serial is not None for e in strays)


def test_stray_reply_to_an_earlier_call(proxy: DBusFaultProxy, conn: DBusConnection) -> None:
    conn.send(PING, serial=1001)
    assert _reply_serials(conn, 1) == [1001]
    proxy.add(StrayReply(answer="earlier").on_reply(member="Ping"))
    conn.send(PING, serial=1002)
    assert _reply_serials(conn, 2) == [1001, 1002]


# -- the other actions with CLI clients ------------------------------------------------------


def test_flip_byte_order_is_legal_for_real_clients(
    proxy: DBusFaultProxy, conn: DBusConnection
) -> None:
    proxy.add(FlipByteOrder().on_reply(member="Ping"))
    conn.send(PING, serial=1001)
    (reply,) = _replies(conn, 1)
    assert reply.header.endianness == Endianness.big
    assert reply.body == ("pong",)
    for argv in (
        ["busctl", "--address", proxy.address, "call", NAME, PATH, NAME, "Ping"],
        [
            "gdbus",
            "call",
            "--address",
            proxy.address,
            "--dest",
            NAME,
            "--object-path",
            PATH,
            "--method",
            f"{NAME}.Ping",
        ],
        [
            "dbus-send",
            f"--bus={proxy.address}",
            "--print-reply",
            f"--dest={NAME}",
            PATH,
            f"{NAME}.Ping",
        ],
    ):
        r = run(argv)
        assert r.returncode == 0, r.stderr
        assert "pong" in r.stdout


def test_drop_makes_the_client_wait_and_time_out(
    proxy: DBusFaultProxy, conn: DBusConnection
) -> None:
    proxy.add(Drop().on(member="Ping", direction=TO_BUS).times(1))
    t = time.monotonic()
    with pytest.raises(TimeoutError):
        conn.send_and_get_reply(PING, timeout=0.5)
    assert time.monotonic() - t < 3  # the client's own timeout, not a reply
    assert conn.send_and_get_reply(PING, timeout=5).body == ("pong",)  # only once
    assert any("Drop" in (e.fault or "") for e in proxy.trace.faults())


def test_duplicate_delivers_twice(proxy: DBusFaultProxy, conn: DBusConnection) -> None:
    proxy.add(Duplicate().on_reply(member="Ping"))
    conn.send(PING, serial=1001)
    assert _reply_serials(conn, 2) == [1001, 1001]


def test_error_reply_answers_without_forwarding(proxy: DBusFaultProxy) -> None:
    proxy.add(ErrorReply("org.freedesktop.systemd1.NoSuchUnit", "injected").on(member="Ping"))
    r = run(["busctl", "--address", proxy.address, "call", NAME, PATH, NAME, "Ping"])
    assert r.returncode != 0
    assert "injected" in r.stderr
    r = run(
        [
            "gdbus",
            "call",
            "--address",
            proxy.address,
            "--dest",
            NAME,
            "--object-path",
            PATH,
            "--method",
            f"{NAME}.Ping",
        ]
    )
    assert "org.freedesktop.systemd1.NoSuchUnit" in r.stderr
    assert not [e for e in proxy.trace.messages(TO_CLIENT) if e.member == "Ping"]


@pytest.mark.parametrize("mid", [False, True])
def test_disconnect(proxy: DBusFaultProxy, mid: bool) -> None:
    proxy.add(Disconnect(mid_message=mid).on_reply(member="Ping"))
    r = run(["busctl", "--address", proxy.address, "call", NAME, PATH, NAME, "Ping"])
    assert r.returncode != 0
    c = open_dbus_connection(bus=proxy.address)
    with pytest.raises((ConnectionError, OSError, TimeoutError)):
        c.send_and_get_reply(PING, timeout=5)
    c.close()


# -- Serials: the 32-bit cookie overflow -------------------------------------------------------


@pytest.mark.parametrize(("mode", "after"), [("wrap", 1), ("cycle", 0x80000000)])
def test_serials_seen_by_the_client_cross_the_boundary(
    proxy: DBusFaultProxy, mode: str, after: int
) -> None:
    proxy.add(Serials(start=0xFFFFFFFF, on_overflow=mode).on(direction=TO_CLIENT))
    # Each sender is numbered apart: the service's first reply is 0xffffffff (the bus
    # driver's Hello reply and NameAcquired are a sequence of their own, per connection).
    c = open_dbus_connection(bus=proxy.address)
    try:
        seen = []
        for _ in range(4):
            c.send_message(PING)
            reply = c.receive(timeout=5)
            while reply.header.message_type != MessageType.method_return:
                reply = c.receive(timeout=5)
            assert reply.body == ("pong",)
            seen.append(reply.header.serial)
    finally:
        c.close()
    assert seen[0] == 0xFFFFFFFF
    assert seen[1:] == [after, after + 1, after + 2]
    rewrites = [e.fault for e in proxy.trace.faults() if "Serials" in (e.fault or "")]
    assert any(f.endswith(f"-> {0xFFFFFFFF}") for f in rewrites)
    assert any(f.endswith(f"-> {after}") for f in rewrites)


def test_client_serials_pushed_toward_the_bus_stay_consistent(proxy: DBusFaultProxy) -> None:
    proxy.add(Serials(start=0xFFFFFFFE, on_overflow="cycle").on(direction=TO_BUS))
    c = open_dbus_connection(bus=proxy.address)  # Hello goes out as 0xfffffffe
    try:
        for _ in range(4):  # each reply's reply_serial is mapped back to the client's own
            assert c.send_and_get_reply(PING, timeout=5).body == ("pong",)
    finally:
        c.close()
    sent = [e.serial for e in proxy.trace.messages(TO_BUS) if e.fault is None]
    assert sent[:3] == [1, 2, 3]  # as the client sent them
    upstream = [e.serial for e in proxy.trace.faults() if e.direction == TO_BUS]
    assert upstream[:3] == [0xFFFFFFFE, 0xFFFFFFFF, 0x80000000]  # as the bus got them


def test_signed_32_bit_serial_client_fails_correct_client_passes(
    bus: PrivateBus, proxy: DBusFaultProxy
) -> None:
    naive = SignedSerialClient(proxy.address)
    hello = new_method_call(
        DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus"),
        "Hello",
    )
    try:
        if bus.traits.driver_serial == 0xFFFFFFFF:
            # dbus-broker: every driver message has serial 0xffffffff (legal), which
            # this client reads as -1: it fails at its Hello, with no fault at all.
            with pytest.raises(ValueError, match="invalid message serial -1:"):
                naive.call(hello)
        else:
            naive.call(hello)
            assert naive.call(PING) == ("pong",)  # no fault: fine
            proxy.add(Serials(start=0xFFFFFFF0, on_overflow="cycle").on(direction=TO_CLIENT))
            with pytest.raises(ValueError, match="invalid message serial -"):
                naive.call(PING)
    finally:
        naive.close()
    good = open_dbus_connection(bus=proxy.address)
    try:
        assert good.send_and_get_reply(PING, timeout=5).body == ("pong",)
    finally:
        good.close()


def test_stall_client_with_timeout_fails_within_it(proxy: DBusFaultProxy) -> None:
    proxy.add(Serials(start=0xFFFFFFFF, on_overflow="stall").on(direction=TO_CLIENT))
    c = open_dbus_connection(bus=proxy.address)  # the bus driver's Hello reply: 0xffffffff
    try:
        # The service's first reply is its 0xffffffff; it can send nothing after it.
        assert c.send_and_get_reply(PING, timeout=5).body == ("pong",)
        t = time.monotonic()
        with pytest.raises(TimeoutError):
            c.send_and_get_reply(PING, timeout=1.0)
        assert time.monotonic() - t < 5
    finally:
        c.close()
    assert any("stalled" in (e.fault or "") for e in proxy.trace.faults())
    proxy.clear()  # lifting the fault: a new connection works again
    c = open_dbus_connection(bus=proxy.address)
    try:
        assert c.send_and_get_reply(PING, timeout=5).body == ("pong",)
    finally:
        c.close()


def test_stall_client_without_timeout_is_bounded_by_pytest_timeout(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest
        from jeepney import DBusAddress, new_method_call
        from jeepney.io.blocking import open_dbus_connection

        @pytest.mark.timeout(3, func_only=True)  # the call, not the bus's set-up
        @pytest.mark.dbus_faults(
            "Serials(0xfffffffe, on_overflow='stall') direction=to_client")
        def test_hangs(dbus_proxy):
            c = open_dbus_connection(bus=dbus_proxy.address)
            c.send_and_get_reply(new_method_call(
                DBusAddress("/", "org.freedesktop.DBus", "org.freedesktop.DBus"), "GetId"))
        """
    )
    t = time.monotonic()
    result = pytester.runpytest_subprocess("-p", "runtimefaults")
    assert time.monotonic() - t < 30
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Timeout*"])
    result.stdout.fnmatch_lines(["*runtimefaults D-Bus trace*", "*stalled*"])


# -- determinism -------------------------------------------------------------------------------


def _faulted_trace(bus: PrivateBus, seed: int) -> list[tuple[object, ...]]:
    rules = [
        SplitMessage(parts=3, random=True, pause=0.001).on_reply(member="Echo"),
        Delay(0.005).on_reply(member="Ping").probability(0.5),
        Duplicate().on(type="signal").probability(0.3),
    ]
    with DBusFaultProxy(upstream=bus.address, rules=rules, seed=seed) as proxy:
        c = open_dbus_connection(bus=proxy.address)
        for i in range(15):
            c.send_and_get_reply(new_method_call(SVC, "Echo", "ay", (bytes(i * 50),)), timeout=5)
            c.send_and_get_reply(PING, timeout=5)
        c.close()
        # Each direction is one ordered stream; how the two interleave is up to threads.
        entries = proxy.trace.entries()
        return [
            (e.direction, e.type, e.member, e.size, e.fault)
            for direction in (TO_BUS, TO_CLIENT)
            for e in entries
            if e.direction == direction
        ]


def test_same_seed_gives_the_same_faulted_trace(bus: PrivateBus) -> None:
    first = _faulted_trace(bus, 1234)
    assert first == _faulted_trace(bus, 1234)
    assert any(f for *_, f in first)
    assert first != _faulted_trace(bus, 4321)


@pytest.mark.parametrize("seconds", [0.0, 0.001])
def test_ordered_delay_is_never_overtaken_when_released(
    proxy: DBusFaultProxy, conn: DBusConnection, seconds: float
) -> None:
    # The scheduler releases held replies while the pump forwards the ones behind them:
    # with many short holds in a burst, any window in which a newer reply could be
    # written before a released one shows up as replies out of order.
    proxy.add(Delay(seconds).on_reply(member="Ping").every(3))
    serials = list(range(1000, 1100))  # under dbus-daemon's 128 pending replies per client
    for _ in range(25):
        for s in serials:
            conn.send(PING, serial=s)
        assert _reply_serials(conn, len(serials)) == serials
