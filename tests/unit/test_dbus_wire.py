"""The sans-I/O D-Bus codec: framing in any chunking, both byte orders, header
fields, in-place serial rewrites and clear errors, cross-checked against jeepney."""

from __future__ import annotations

import random
import re
import struct

import pytest
from dbus_crafted import (
    array_of_empty_structs,
    message_type,
    method_call,
    nested_variants,
    string_array,
    struct_sv,
    variant_string_without_nul,
    with_field,
)
from jeepney import DBusAddress, new_method_call
from jeepney.low_level import Endianness, Header, HeaderFields
from jeepney.low_level import Message as JMessage
from jeepney.low_level import MessageType as JType
from jeepney.low_level import parse_signature as jeepney_signature

from pytest_runtimefaults.dbus.wire import (
    MAX_MESSAGE_LENGTH,
    Framer,
    HeaderField,
    Message,
    MessageType,
    RawField,
    WireError,
    build_error,
    build_method_return,
    build_signal,
    flip_byte_order,
    member_pattern,
    parse_signature,
    skip_value,
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
    # Kept as its exact bytes (the value from its aligned start), not decoded.
    assert msg.fields[42] == RawField("as", struct.pack("<II", 6, 1) + b"x\0")


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


# -- hostile input: everything malformed is a WireError naming what and where -------


@pytest.mark.timeout(10)  # jeepney's parser looped for ever on the first of these
@pytest.mark.parametrize(
    ("sig", "value", "error"),
    [
        (b"a()", array_of_empty_structs, r"header field 42 at byte \d+.*'a\(\)'.*empty struct"),
        (b"v", variant_string_without_nul, r"header field 42 .*string at byte \d+ lacks its NUL"),
        (b"({sv})", struct_sv, r"'\(\{sv\}\)' is invalid at 1: a dict entry outside an array"),
        (b"v", nested_variants(2000), r"nests containers more than 64 deep"),
        (b"v", nested_variants(70), r"nests containers more than 64 deep"),
    ],
    ids=[
        "array-of-empty-structs",
        "string-without-nul",
        "dict-entry-in-struct",
        "2000-variants",
        "70-variants",
    ],
)
@pytest.mark.parametrize("big", [False, True], ids=["little", "big"])
def test_a_hostile_unknown_header_field_is_a_wire_error(
    sig: bytes, value: object, error: str, big: bool
) -> None:
    raw = with_field(method_call(big=big), 42, sig, value)  # type: ignore[arg-type]
    (msg,) = Framer().feed(raw)  # framing reads the fixed header only: it frames
    for read in (lambda: msg.member, lambda: msg.fields, lambda: flip_byte_order(msg)):
        with pytest.raises(WireError, match=error):
            read()
    assert "bad header" in repr(msg)  # repr never raises


def test_variants_nest_up_to_the_limit() -> None:
    # In a header field a value is already 3 deep (array, struct, variant): 60 more
    # variants and a byte is 64 deep, legal; one more is not.
    ok = with_field(method_call(), 42, b"v", nested_variants(60))
    assert Message(ok).fields[42].signature == "v"
    assert flip_byte_order(flip_byte_order(Message(ok))).raw == ok
    with pytest.raises(WireError, match="more than 64 deep"):
        _ = Message(with_field(method_call(), 42, b"v", nested_variants(61))).fields


@pytest.mark.parametrize("big", [False, True], ids=["little", "big"])
def test_a_legal_unknown_field_is_kept_and_flipped_correctly(big: bool) -> None:
    raw = with_field(method_call(big=big), 42, b"as", string_array)
    msg = Message(raw)
    assert msg.member == "Ping"
    flipped = flip_byte_order(msg)  # raised ValueError: 42 is not a valid HeaderFields
    assert flipped.big_endian is not big
    assert flipped.member == "Ping"
    field = flipped.fields[42]
    assert field.signature == "as"
    # jeepney reads the kept value in the new byte order: it was swapped, not copied.
    at = flipped.raw.index(field.data, 16)
    order = Endianness.little if big else Endianness.big
    assert jeepney_signature(list("as")).parse_data(flipped.raw, at, order)[0] == ["x"]
    assert flip_byte_order(flipped).raw == raw


def test_an_unknown_message_type_passes_untouched() -> None:
    raw = message_type(with_field(method_call(), 42, b"as", string_array), 5)
    msg = Message(raw)
    assert (msg.type, msg.type_name, msg.member) == (5, "type5", "Ping")
    assert flip_byte_order(msg) is msg  # raised ValueError: 5 is not a valid MessageType
    (framed,) = Framer().feed(raw)
    assert framed.raw == raw


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"", "has 0 bytes, fewer than the 16 of the fixed header"),  # was IndexError
        (b"l\x01\x00\x01", "has 4 bytes, fewer than the 16"),  # was struct.error
        (b"l\x01\x00\x01" + struct.pack("<III", 0, 1, 9) + b"\0" * 8, "header says 32"),
    ],
    ids=["empty", "four-bytes", "short"],
)
def test_a_short_message_is_a_wire_error(raw: bytes, error: str) -> None:
    with pytest.raises(WireError, match=error):
        Message(raw)


@pytest.mark.parametrize(
    ("sig", "error"),
    [
        ("a", "an array without an element type"),
        ("(i", "an unclosed struct"),
        ("()", "an empty struct"),
        ("a{s}", "a dict entry needs a key and one value"),
        ("a{sss}", "a key and one value only"),
        ("a{vs}", "key must be a basic type"),
        ("{ss}", "a dict entry outside an array"),
        ("i)", "closes nothing"),
        ("(a)", "an array without an element type"),
        ("z", "unknown type code 'z'"),
        ("a" * 33 + "y", "more than 32 arrays nested"),
        ("(" * 33 + "y" + ")" * 33, "more than 32 structs nested"),
        ("a{s" * 17 + "y" + "}" * 17, ""),  # 17 arrays and 17 dict entries: legal
        ("y" * 256, "256 bytes long, the spec allows 255"),
    ],
)
def test_signatures_are_validated_as_the_spec_says(sig: str, error: str) -> None:
    if not error:
        assert len(parse_signature(sig)) == 1
        return
    with pytest.raises(WireError, match=re.escape(error)):
        parse_signature(sig)


def test_the_deepest_legal_signature_parses() -> None:
    sig = "a" * 32 + "(" * 32 + "y" + ")" * 32
    ((code, _),) = parse_signature(sig)
    assert chr(code) == "a"


@pytest.mark.parametrize(
    ("sig", "data", "error"),
    [
        ("ai", struct.pack("<I", 2**26 + 4), "over the spec's 64 MiB limit"),
        ("ai", struct.pack("<I", 6) + b"\0" * 8, "not a whole number of 4-byte 'i'"),
        ("b", struct.pack("<I", 2), "boolean at byte 0 is 2"),
        ("ab", struct.pack("<II", 4, 3), "non-0/1"),
        ("s", struct.pack("<I", 100) + b"ab\0", "runs past byte 7"),
        ("s", struct.pack("<I", 1) + b"\xff\0", "not UTF-8"),
        ("s", struct.pack("<I", 2) + b"a\0\0", "contains a NUL"),
        ("v", b"\x02ii\0" + b"\0" * 8, "not one single complete type"),
        ("g", b"\x01a\0", "an array without an element type"),
        ("u", b"\0\0", "needs 4 bytes"),
        (
            "a(yy)",
            struct.pack("<I", 3) + b"\0" * 4 + b"\1\2" + b"\0" * 6 + b"\3\4",
            "overruns its array's end at byte 11",
        ),
    ],
)
def test_values_are_walked_with_bounds(sig: str, data: bytes, error: str) -> None:
    with pytest.raises(WireError, match=re.escape(error)):
        skip_value(data, 0, parse_signature(sig), "<", len(data))


def test_the_walker_matches_jeepney_on_valid_values() -> None:
    types = ["a{sv}", "(yaxd)", "ah", "g", "ab"]
    values = [
        {"k": ("as", ["a", "bc"]), "n": ("(ib)", (-3, True))},
        (9, [1, -2], 0.5),
        [0, 1],
        "a{sv}",
        [True, False],
    ]
    for order, e in ((Endianness.little, "<"), (Endianness.big, ">")):
        for start in range(8):  # alignment is counted from the start of the message
            data = b"\0" * start
            for sig, value in zip(types, values, strict=True):
                data += jeepney_signature(list(sig)).serialise(value, len(data), order, fds=[])
            end = skip_value(data, start, parse_signature("".join(types)), e, len(data))
            assert end == len(data)
