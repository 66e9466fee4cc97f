"""Hostile D-Bus messages, crafted byte by byte, shared by the wire, fuzz and proxy tests.

Each is a well-framed message (its fixed header and lengths are right) that
carries something a peer may send and a proxy must survive: a header field of
a code the spec does not define, with a value of any signature, legal or not.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from jeepney import DBusAddress, new_method_call
from jeepney.low_level import Endianness

#: Where the service of tests/helpers/dbus_service.py answers (a harmless method call target).
TARGET = DBusAddress(
    "/org/example/RuntimeFaults", "org.example.RuntimeFaults", "org.example.RuntimeFaults"
)


def method_call(serial: int = 7, big: bool = False, member: str = "Ping") -> bytes:
    """A plain, valid method call built by jeepney."""
    msg = new_method_call(TARGET, member)
    if big:
        msg.header.endianness = Endianness.big
    return bytes(msg.serialise(serial=serial))


def with_field(raw: bytes, code: int, sig: bytes, value: Callable[[int, str], bytes]) -> bytes:
    """*raw* with one more header field: *code*, signature *sig*, ``value(pos, endian)``.

    *value* gets the absolute offset where the value starts (right after the
    signature's NUL, before any alignment of its own) and the struct byte order,
    and returns the bytes from there on, padding included.  The fields' length,
    the header padding and the body are fixed up, so the message frames.
    """
    e = "<" if raw[0] == 0x6C else ">"
    body_length, _serial, flen = struct.unpack_from(e + "III", raw, 4)
    fields = raw[16 : 16 + flen]
    body = raw[len(raw) - body_length :] if body_length else b""
    fields += b"\0" * ((8 - len(fields) % 8) % 8)
    head = bytes([code, len(sig)]) + sig + b"\0"
    start = 16 + len(fields) + len(head)
    fields += head + value(start, e)
    header = raw[:12] + struct.pack(e + "I", len(fields)) + fields
    header += b"\0" * ((8 - len(header) % 8) % 8)
    return header + body


def pad_to(pos: int, align: int) -> bytes:
    return b"\0" * ((align - pos % align) % align)


def array_of_empty_structs(pos: int, e: str) -> bytes:
    """``a()`` of 64 bytes: jeepney loops for ever on it (an empty struct has no size)."""
    lead = pad_to(pos, 4)
    after = pos + len(lead) + 4
    return lead + struct.pack(e + "I", 64) + pad_to(after, 8) + b"\0" * 64


def variant_string_without_nul(pos: int, e: str) -> bytes:
    """``v`` holding ``s`` "abc" whose NUL is an 'X'."""
    out = b"\x01s\0"
    out += pad_to(pos + len(out), 4) + struct.pack(e + "I", 3) + b"abcX"
    return out


def nested_variants(depth: int) -> Callable[[int, str], bytes]:
    """``v`` holding a ``v`` holding ... *depth* times, then a byte."""

    def value(pos: int, e: str) -> bytes:
        return b"\x01v\0" * depth + b"\x01y\0" + b"\x07"

    return value


def string_array(pos: int, e: str) -> bytes:
    """``as`` holding ["x"]: a legal value of a field code the spec does not define."""
    lead = pad_to(pos, 4)
    return lead + struct.pack(e + "I", 6) + struct.pack(e + "I", 1) + b"x\0"


def struct_sv(pos: int, e: str) -> bytes:
    """Bytes for ``({sv})`` (never read: the signature is refused first)."""
    return pad_to(pos, 8) + b"\0" * 16


def message_type(raw: bytes, kind: int) -> bytes:
    """*raw* with its message type byte set to *kind* (5: a type the spec does not define)."""
    return raw[:1] + bytes([kind]) + raw[2:]


#: (name, bytes) of every crafted message the issue lists, little-endian.
def crafted(big: bool = False) -> list[tuple[str, bytes]]:
    base = method_call(big=big)
    return [
        ("a() field", with_field(base, 42, b"a()", array_of_empty_structs)),
        ("v holding s without NUL", with_field(base, 42, b"v", variant_string_without_nul)),
        ("({sv}) field", with_field(base, 42, b"({sv})", struct_sv)),
        ("2000 nested variants", with_field(base, 42, b"v", nested_variants(2000))),
    ]
