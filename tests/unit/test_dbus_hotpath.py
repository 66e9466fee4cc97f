"""The proxy's hot path after issue 17's speed work: same results, cheaper steps.

The framer builds its messages without ``Message.__init__`` and the deferred
framing records a chunk's messages with ``Trace.extend``: both must give
exactly what the slow constructions gave, in both byte orders, one message
or many per chunk.  The constants the loop tests on every chunk must be
plain ints (an ``enum.IntFlag`` there costs about 0.5 us per test).
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
from jeepney import DBusAddress, new_method_call, new_signal
from jeepney.low_level import Endianness

from pytest_runtimefaults.dbus import proxy
from pytest_runtimefaults.dbus.trace import TO_BUS, Trace
from pytest_runtimefaults.dbus.wire import Framer, Message, WireError

BUS = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")


def _messages(endian: Endianness) -> list[bytes]:
    call = new_method_call(BUS, "GetNameOwner", "s", (":1.7",))
    signal = new_signal(BUS, "NameAcquired", "s", (":1.7",))
    call.header.endianness = signal.header.endianness = endian
    return [call.serialise(serial=5), signal.serialise(serial=0xFFFFFFFF), call.serialise(serial=6)]


def _same(a: Message, b: Message) -> None:
    for slot in Message.__slots__:
        if slot != "_fields":
            assert getattr(a, slot) == getattr(b, slot), slot
    assert (a.type, a.flags, a.serial, a.size, a.big_endian) == (
        b.type,
        b.flags,
        b.serial,
        b.size,
        b.big_endian,
    )
    assert (a.path, a.interface, a.member, a.sender) == (b.path, b.interface, b.member, b.sender)


@pytest.mark.parametrize("endian", [Endianness.little, Endianness.big])
@pytest.mark.parametrize("split", [None, 1, 17, 40])
def test_framed_messages_equal_constructed_ones(endian: Endianness, split: int | None) -> None:
    raws = _messages(endian)
    stream = b"".join(raws)
    framer = Framer()
    if split is None:
        got = framer.feed(stream)
    else:
        got = []
        for i in range(0, len(stream), split):
            got += framer.feed(stream[i : i + split])
    assert [m.raw for m in got] == raws  # byte for byte
    for msg, raw in zip(got, raws, strict=True):
        _same(msg, Message(raw))
    assert framer.pending == 0


@pytest.mark.parametrize(
    ("corrupt", "said"),
    [
        (lambda b: b[:1] + b"\x00" + b[2:], "INVALID"),
        (lambda b: b"x" + b[1:], "endianness"),
        (lambda b: b[:3] + b"\x02" + b[3 + 1 :], "version 2"),
        (lambda b: b[:8] + b"\0\0\0\0" + b[12:], "serial 0"),
        (lambda b: b[:12] + (2**26 + 8).to_bytes(4, "little") + b[16:], "64 MiB"),
        (lambda b: b[:4] + (2**27).to_bytes(4, "little") + b[8:], "128 MiB"),
    ],
)
def test_the_framer_still_refuses_bad_fixed_headers(
    corrupt: Callable[[bytes], bytes], said: str
) -> None:
    raw = _messages(Endianness.little)[0]
    with pytest.raises(WireError, match=said):
        Framer().feed(corrupt(raw))


def test_trace_extend_records_a_chunk_in_order_at_its_time() -> None:
    trace = Trace(maxlen=2)
    msgs = Framer().feed(b"".join(_messages(Endianness.little)))
    trace.extend(12.5, 3, TO_BUS, msgs)
    entries = trace.entries()
    assert [e.message for e in entries] == msgs[1:]  # bounded: the oldest dropped
    assert {(e.monotonic, e.conn, e.direction, e.fault) for e in entries} == {
        (12.5, 3, TO_BUS, None)
    }


def test_the_loops_flag_constants_are_plain_ints() -> None:
    assert isinstance(socket.MSG_CTRUNC, int)
    assert type(socket.MSG_CTRUNC) is not int  # an IntFlag: why the proxy keeps its own
    for name in ("_MSG_CTRUNC", "_IN", "_OUT", "_READABLE"):
        assert type(getattr(proxy, name)) is int, name
    assert proxy._MSG_CTRUNC == socket.MSG_CTRUNC
