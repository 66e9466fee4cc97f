"""The sans-I/O D-Bus codec: framing in any chunking, both byte orders, header
fields, in-place serial rewrites and clear errors, cross-checked against jeepney."""

from __future__ import annotations

import random
import struct

import pytest
from jeepney import DBusAddress, new_method_call
from jeepney.low_level import Endianness, Header, HeaderFields
from jeepney.low_level import Message as JMessage
from jeepney.low_level import MessageType as JType

from pytest_runtimefaults.dbus.wire import (
    MAX_MESSAGE_LENGTH,
    Framer,
    HeaderField,
    Message,
    MessageType,
    WireError,
    build_error,
    build_method_return,
    build_signal,
    flip_byte_order,
    member_pattern,
    whole_messages_without,
)

TARGET = DBusAddress(
    "/org/freedesktop/systemd1", "org.freedesktop.systemd1", "org.freedesktop.systemd1.Manager"
)


def call(serial: int = 7, big: bool = False, payload: bytes = b"x") -> bytes:
    msg = new_method_call(TARGET, "StartTransientUnit", "ay", (payload,))
    if big:
        msg.header.endianness = Endianness.big
    return bytes(msg.serialise(serial=serial))


def stream(rng: random.Random, n: int) -> tuple[bytes, list[bytes]]:
    raws = [
        call(serial=i + 1, big=rng.random() < 0.5, payload=rng.randbytes(rng.randrange(0, 5000)))
        for i in range(n)
    ]
    return b"".join(raws), raws


@pytest.mark.parametrize("seed", range(5))
def test_framing_in_any_chunking_returns_exact_messages(seed: int) -> None:
    rng = random.Random(seed)
    data, raws = stream(rng, 40)
    framer = Framer()
    out: list[Message] = []
    pos = 0
    while pos < len(data):
        step = rng.choice([1, 2, 7, 16, 100, 4096, 70000])
        out += framer.feed(data[pos : pos + step])
        pos += step
    assert [m.raw for m in out] == raws
    assert framer.pending == 0


def test_header_fields_match_jeepney_in_both_byte_orders() -> None:
    for big in (False, True):
        raw = call(serial=0x1234, big=big)
        (msg,) = Framer().feed(raw)
        ref = Header.from_buffer(raw)[0]
        assert msg.big_endian is big
        assert msg.type == MessageType.METHOD_CALL
        assert msg.serial == ref.serial == 0x1234
        assert msg.path == ref.fields[HeaderFields.path]
        assert msg.interface == ref.fields[HeaderFields.interface]
        assert msg.member == "StartTransientUnit"
        assert msg.destination == "org.freedesktop.systemd1"
        assert msg.signature == "ay"
        assert msg.expects_reply
        assert msg.string_field_bytes(HeaderField.MEMBER) == b"StartTransientUnit"


def test_with_serials_rewrites_in_place_and_keeps_the_body() -> None:
    reply = build_method_return(41, "s", ("hello",), serial=9)
    moved = reply.with_serials(serial=0xFFFFFFFF, reply_serial=0x80000000)
    assert (moved.serial, moved.reply_serial) == (0xFFFFFFFF, 0x80000000)
    assert moved.body == reply.body
    assert moved.size == reply.size
    parsed = JMessage.from_buffer(moved.raw)
    assert parsed.header.serial == 0xFFFFFFFF
    assert parsed.header.fields[HeaderFields.reply_serial] == 0x80000000
    assert parsed.body == ("hello",)
    with pytest.raises(WireError, match="no REPLY_SERIAL"):
        Message(call()).with_serials(reply_serial=3)
    with pytest.raises(WireError, match="outside"):
        reply.with_serials(serial=0)


def test_built_messages_decode_with_jeepney() -> None:
    sig = build_signal(
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "JobRemoved",
        "uoss",
        (5, "/org/freedesktop/systemd1/job/5", "a.scope", "done"),
        serial=3,
        big_endian=True,
    )
    assert sig.big_endian
    assert sig.member == "JobRemoved"
    assert JMessage.from_buffer(sig.raw).body == (
        5,
        "/org/freedesktop/systemd1/job/5",
        "a.scope",
        "done",
    )
    err = build_error(12, "org.freedesktop.DBus.Error.Failed", "nope", serial=4)
    assert (err.type, err.reply_serial, err.error_name) == (
        MessageType.ERROR,
        12,
        "org.freedesktop.DBus.Error.Failed",
    )


def test_flip_byte_order_round_trips() -> None:
    msg = Message(call(payload=b"abc" * 100))
    flipped = flip_byte_order(msg)
    assert flipped.big_endian
    assert not msg.big_endian
    assert flipped.raw != msg.raw
    assert (flipped.serial, flipped.member) == (msg.serial, msg.member)
    assert JMessage.from_buffer(flipped.raw).body == JMessage.from_buffer(msg.raw).body
    assert flip_byte_order(flipped).raw == msg.raw


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda b: b"X" + b[1:], "bad endianness byte 0x58"),
        (lambda b: b[:3] + b"\x02" + b[4:], "protocol version 2"),
        (lambda b: b[:4] + struct.pack("<I", MAX_MESSAGE_LENGTH) + b[8:], "128 MiB"),
        (lambda b: b[:12] + struct.pack("<I", 2**26 + 8) + b[16:], "64 MiB"),
        (lambda b: b[:1] + b"\x00" + b[2:], "INVALID"),
        (lambda b: b[:8] + struct.pack("<I", 0) + b[12:], "serial 0"),
    ],
    ids=["endianness", "version", "oversize", "fields-oversize", "type0", "serial0"],
)
def test_bad_fixed_header_raises_a_clear_error(mutate: object, error: str) -> None:
    raw = mutate(call())  # type: ignore[operator]
    with pytest.raises(WireError, match=error):
        Framer().feed(raw)


def test_header_field_of_the_wrong_type_is_named() -> None:
    # MEMBER (3) declared as an object path instead of a string.
    fields = {HeaderFields.path: "/a", HeaderFields.member: "M"}
    header = Header(Endianness.little, JType.method_call, 0, 1, 0, 5, fields)
    raw = bytearray(JMessage(header, ()).serialise(serial=5))
    pos = raw.find(b"\x03\x01s\x00")
    raw[pos + 2] = ord("o")
    msg = Framer().feed(bytes(raw))[0]  # the fixed header is fine: framing succeeds
    with pytest.raises(WireError, match=r"MEMBER \(3\) has type 'o'.*requires 's'"):
        _ = msg.member


def test_unknown_header_fields_are_skipped_as_the_spec_says() -> None:
    fields = {HeaderFields.path: "/a", HeaderFields.member: "M"}
    header = Header(Endianness.little, JType.method_call, 0, 1, 0, 5, fields)
    raw = bytes(JMessage(header, ()).serialise(serial=5))
    # Append an unknown field code 42 of type 'as' to the fields array by hand.
    (flen,) = struct.unpack_from("<I", raw, 12)
    fields_bytes = raw[16 : 16 + flen]
    pad = b"\0" * ((8 - len(fields_bytes) % 8) % 8)
    extra = bytes([42, 2]) + b"as\0" + b"\0\0\0" + struct.pack("<I", 6) + struct.pack("<I", 1)
    extra += b"x\0"
    new_fields = fields_bytes + pad + extra
    head = raw[:12] + struct.pack("<I", len(new_fields)) + new_fields
    head += b"\0" * ((8 - len(head) % 8) % 8)
    msg = Message(head)
    assert msg.member == "M"
    assert msg.fields[42] == ["x"]


def test_truncated_stream_stays_pending() -> None:
    raw = call()
    framer = Framer()
    assert framer.feed(raw[:-1]) == []
    assert framer.pending == len(raw) - 1
    assert [m.raw for m in framer.feed(raw[-1:])] == [raw]


def test_whole_messages_without_reads_lengths_and_member_fields() -> None:
    little = bytes(new_method_call(TARGET, "StartUnit", "ss", ("a", "b")).serialise(serial=3))
    stop = new_method_call(TARGET, "StopUnit", "s", ("a",))
    stop.header.endianness = Endianness.big
    big = bytes(stop.serialise(serial=4))
    reply = bytes(build_method_return(3, "s", ("StartUnit",), serial=9).raw)
    none = member_pattern(())
    assert whole_messages_without(little + big + reply, none)
    assert whole_messages_without(little + big + reply, member_pattern({b"Reload"}))
    assert not whole_messages_without(little + big, member_pattern({b"StopUnit"}))
    assert not whole_messages_without(big + little, member_pattern({b"StartUnit"}))
    assert whole_messages_without(little, member_pattern({b"Start", b"StartUnitX"}))
    # A member name in a body is not a member field.
    assert whole_messages_without(reply, member_pattern({b"StartUnit"}))
    assert not whole_messages_without(little[:-1], none)
    assert not whole_messages_without(little + big[:20], none)
    assert not whole_messages_without(little + big[:10], none)
    assert not whole_messages_without(b"X" + little[1:], none)


def test_whole_messages_without_finds_the_member_behind_a_lookalike() -> None:
    # An unknown header field (code 0x50, bytes) holding what looks like a member
    # field, then the real MEMBER field.
    def pad(b: bytes, n: int) -> bytes:
        return b + b"\0" * (-len(b) % n)

    fake = bytes((3, 1)) + b"s\0" + struct.pack("<I", 1) + b"Z\0"
    fields = pad(bytes((0x50, 2)) + b"ay\0", 4) + struct.pack("<I", len(fake)) + fake
    fields = pad(fields, 8) + bytes((3, 1)) + b"s\0" + struct.pack("<I", 2) + b"M7\0"
    raw = pad(b"l\x01\x00\x01" + struct.pack("<III", 0, 5, len(fields)) + fields, 8)
    assert Message(raw).member == "M7"
    assert not whole_messages_without(raw, member_pattern({b"M7"}))
    assert whole_messages_without(raw, member_pattern({b"M8"}))
