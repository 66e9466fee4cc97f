"""A sans-I/O D-Bus wire codec for a proxy: framing, header fields, serial rewrite.

No socket is imported here: bytes go in (in any chunking), whole messages come
out, as :class:`Message` objects that keep their exact bytes.  That is what a
fault proxy needs and what jeepney (a fine client library) does not give:

* **byte-exactness**: a message is never re-marshalled unless a fault asks for
  it, so a proxy with no rule forwards exactly the bytes it received;
* **cheap framing**: only the 16-byte fixed header is decoded on the hot path;
  header fields are decoded lazily, the first time something asks;
* **in-place rewrites**: :meth:`Message.with_serials` changes ``serial`` and the
  ``REPLY_SERIAL`` header field where they lie, without touching the body;
* **validation with reasons**: a wrong endianness byte, a bad protocol version,
  an oversize message or a header field of the wrong type raises
  :class:`WireError` naming what was wrong.

jeepney is used where it serves: to build new messages (signals, errors,
replies) for fault rules.  Values of any other signature are walked by our own
code (:func:`skip_value`), iterative and bounded by the spec's limits, so that
no message, however hostile, can loop, recurse or raise anything but
:class:`WireError`: header fields of codes the spec does not define are skipped
(the spec says to ignore them) and kept as their raw bytes (:class:`RawField`),
and :func:`flip_byte_order` swaps every value of any signature in place.

Example::

    framer = Framer()
    for msg in framer.feed(chunk):
        print(msg.type_name, msg.serial, msg.member)
"""

from __future__ import annotations

import array
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

__all__ = [
    "HEADER_SIGNATURES",
    "MAX_ARRAY_LENGTH",
    "MAX_ARRAY_NESTING",
    "MAX_MESSAGE_LENGTH",
    "MAX_STRUCT_NESTING",
    "MAX_VALUE_NESTING",
    "Framer",
    "HeaderField",
    "Message",
    "MessageType",
    "RawField",
    "WireError",
    "build_error",
    "build_method_return",
    "build_signal",
    "flip_byte_order",
    "member_pattern",
    "messages_at",
    "parse_signature",
    "skip_value",
    "whole_messages",
    "whole_messages_without",
]

MAX_MESSAGE_LENGTH = 2**27  # 128 MiB, the spec's limit on a whole message
MAX_ARRAY_LENGTH = 2**26  # 64 MiB, the spec's limit on one array (the header fields)
MAX_ARRAY_NESTING = 32  # array type codes one inside the other, in one signature
MAX_STRUCT_NESTING = 32  # open parentheses (and dict entries) one inside the other
MAX_VALUE_NESTING = 64  # containers one inside the other in a value, variants included
_FIXED = 16  # endianness, type, flags, version, body length, serial, fields length


class WireError(ValueError):
    """Bytes that are not a valid D-Bus message; the message says what and where."""


class MessageType(IntEnum):
    INVALID = 0
    METHOD_CALL = 1
    METHOD_RETURN = 2
    ERROR = 3
    SIGNAL = 4


class HeaderField(IntEnum):
    PATH = 1
    INTERFACE = 2
    MEMBER = 3
    ERROR_NAME = 4
    REPLY_SERIAL = 5
    DESTINATION = 6
    SENDER = 7
    SIGNATURE = 8
    UNIX_FDS = 9


#: The single complete type each known header field must have.
HEADER_SIGNATURES: dict[int, str] = {
    HeaderField.PATH: "o",
    HeaderField.INTERFACE: "s",
    HeaderField.MEMBER: "s",
    HeaderField.ERROR_NAME: "s",
    HeaderField.REPLY_SERIAL: "u",
    HeaderField.DESTINATION: "s",
    HeaderField.SENDER: "s",
    HeaderField.SIGNATURE: "g",
    HeaderField.UNIX_FDS: "u",
}

_TYPE_NAMES = {1: "method_call", 2: "method_return", 3: "error", 4: "signal"}
FLAG_NO_REPLY_EXPECTED = 0x1


def _pad8(n: int) -> int:
    return (8 - n % 8) % 8


# The fixed header's three lengths by the endianness byte: one compiled struct each,
# since every message relayed is framed with them (the trace's framing is per message).
_LENGTHS = {
    0x6C: struct.Struct("<III").unpack_from,
    0x42: struct.Struct(">III").unpack_from,
}


def _fixed_header(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[str, int, int]:
    """Validate the fixed header at *pos*; return (struct endian, total length, serial)."""
    if len(buf) - pos < _FIXED:
        raise WireError(
            f"message at byte {pos} has {max(len(buf) - pos, 0)} bytes, fewer than the "
            f"{_FIXED} of the fixed header"
        )
    endian_byte = buf[pos]
    if endian_byte == 0x6C:  # 'l'
        e = "<"
    elif endian_byte == 0x42:  # 'B'
        e = ">"
    else:
        raise WireError(
            f"bad endianness byte 0x{endian_byte:02x} at the start of a message "
            "(expected 'l' or 'B'): the stream is not D-Bus or lost its framing"
        )
    version = buf[pos + 3]
    if version != 1:
        raise WireError(f"unsupported D-Bus protocol version {version} (only 1 exists)")
    body_length, serial, fields_length = _LENGTHS[endian_byte](buf, pos + 4)
    if fields_length > MAX_ARRAY_LENGTH:
        raise WireError(
            f"header fields array of {fields_length} bytes exceeds the spec's 64 MiB limit"
        )
    total = ((_FIXED + fields_length + 7) & ~7) + body_length  # header padded to 8
    if total > MAX_MESSAGE_LENGTH:
        raise WireError(
            f"message of {total} bytes exceeds the spec's 128 MiB limit "
            f"(body length field {body_length})"
        )
    if not buf[pos + 1]:  # MessageType.INVALID (an IntEnum: slow to compare with)
        raise WireError("message type 0 (INVALID) is not allowed on the wire")
    if serial == 0:
        raise WireError("message serial 0 is not allowed (serials start at 1)")
    return e, total, serial


@dataclass(frozen=True, slots=True)
class _Fields:
    values: dict[int, Any]
    offsets: dict[int, int]  # byte offset of a field's value (for in-place rewrites)


class Message:
    """One framed D-Bus message; ``raw`` holds its exact bytes.

    Cheap attributes (``type``, ``flags``, ``serial``, ``size``, ``big_endian``)
    come from the fixed header; header fields (``path``, ``member``,
    ``reply_serial``...) are decoded on first access.
    """

    __slots__ = ("_e", "_fields", "_hend", "raw", "serial", "type")

    def __init__(self, raw: bytes, *, _endian: str | None = None, _serial: int | None = None):
        if _endian is None or _serial is None:
            _endian, total, _serial = _fixed_header(raw)
            if total != len(raw):
                raise WireError(f"message is {len(raw)} bytes but its header says {total}")
        self.raw = raw
        self._e = _endian
        self.type: int = raw[1]
        self.serial: int = _serial
        self._fields: _Fields | WireError | None = None
        self._hend = 0

    def string_field_bytes(self, code: int) -> bytes | None:
        """The raw bytes of string header field *code*, found without decoding the rest.

        A field starts 8-aligned with its code, signature length 1, the type
        character and a NUL; names and paths cannot contain those bytes, so the
        first aligned hit is the field.  Used by the proxy's rule prefilter.
        """
        sig = _EXPECTED.get(code)
        if sig is None or sig == b"g":
            return None
        needle = bytes((code, 1, sig[0], 0))
        raw = self.raw
        end = self.header_end
        pos = raw.find(needle, _FIXED, end)
        while pos >= 0 and pos & 7:
            pos = raw.find(needle, pos + 1, end)
        if pos < 0 or pos + 8 > end:
            return None
        length = _U32[self._e](raw, pos + 4)[0]
        if pos + 8 + length >= end or raw[pos + 8 + length]:
            return None  # not a whole string: the exact parse will say what is wrong
        return raw[pos + 8 : pos + 8 + length]

    @property
    def header_end(self) -> int:
        """Offset just past the header fields array (before the padding)."""
        if not self._hend:
            self._hend = _FIXED + int(_U32[self._e](self.raw, 12)[0])
        return self._hend

    # -- fixed header ---------------------------------------------------------------
    @property
    def flags(self) -> int:
        return self.raw[2]

    @property
    def size(self) -> int:
        return len(self.raw)

    @property
    def big_endian(self) -> bool:
        return self._e == ">"

    @property
    def type_name(self) -> str:
        return _TYPE_NAMES.get(self.type, f"type{self.type}")

    @property
    def body_offset(self) -> int:
        header_length = self.header_end
        return header_length + _pad8(header_length)

    @property
    def body(self) -> bytes:
        return self.raw[self.body_offset :]

    # -- header fields ---------------------------------------------------------------
    @property
    def fields(self) -> dict[int, Any]:
        """Header fields by code; codes the spec does not define as :class:`RawField`."""
        return self._parsed().values

    def _parsed(self) -> _Fields:
        fields = self._fields
        if fields is None:
            try:
                fields = self._fields = _parse_fields(self.raw, self._e)
            except WireError as exc:
                # Kept: every later read raises it again without walking the bytes again.
                fields = self._fields = exc
        if isinstance(fields, WireError):
            raise WireError(str(fields))
        return fields

    def field(self, code: int) -> Any:
        return self._parsed().values.get(code)

    @property
    def path(self) -> str | None:
        return self.field(HeaderField.PATH)  # type: ignore[no-any-return]

    @property
    def interface(self) -> str | None:
        return self.field(HeaderField.INTERFACE)  # type: ignore[no-any-return]

    @property
    def member(self) -> str | None:
        return self.field(HeaderField.MEMBER)  # type: ignore[no-any-return]

    @property
    def error_name(self) -> str | None:
        return self.field(HeaderField.ERROR_NAME)  # type: ignore[no-any-return]

    @property
    def reply_serial(self) -> int | None:
        return self.field(HeaderField.REPLY_SERIAL)  # type: ignore[no-any-return]

    @property
    def destination(self) -> str | None:
        return self.field(HeaderField.DESTINATION)  # type: ignore[no-any-return]

    @property
    def sender(self) -> str | None:
        return self.field(HeaderField.SENDER)  # type: ignore[no-any-return]

    @property
    def signature(self) -> str:
        return str(self.field(HeaderField.SIGNATURE) or "")

    @property
    def unix_fds(self) -> int:
        return int(self.field(HeaderField.UNIX_FDS) or 0)

    @property
    def expects_reply(self) -> bool:
        return self.type == MessageType.METHOD_CALL and not self.flags & FLAG_NO_REPLY_EXPECTED

    # -- rewrites ------------------------------------------------------------------
    def with_serials(self, serial: int | None = None, reply_serial: int | None = None) -> Message:
        """A copy with ``serial`` and/or the ``REPLY_SERIAL`` field changed in place.

        The body is untouched, so this is cheap even for a large message.  Changing
        ``reply_serial`` needs the field to be present (replies and errors have it).
        """
        raw = bytearray(self.raw)
        if serial is not None:
            if not 0 < serial <= 0xFFFFFFFF:
                raise WireError(f"serial {serial} is outside 1..0xffffffff")
            struct.pack_into(self._e + "I", raw, 8, serial)
        if reply_serial is not None:
            offset = self._parsed().offsets.get(HeaderField.REPLY_SERIAL)
            if offset is None:
                raise WireError(f"{self.type_name} serial {self.serial} has no REPLY_SERIAL")
            struct.pack_into(self._e + "I", raw, offset, reply_serial)
        return Message(bytes(raw))

    def __repr__(self) -> str:
        parts = [f"{self.type_name} serial={self.serial}"]
        try:
            for name in (
                "reply_serial",
                "path",
                "interface",
                "member",
                "error_name",
                "sender",
                "destination",
            ):
                value = getattr(self, name)
                if value is not None:
                    parts.append(f"{name}={value!r}")
        except WireError as exc:
            parts.append(f"<bad header: {exc}>")
        return f"<Message {' '.join(parts)} size={self.size}>"


_U32 = {"<": struct.Struct("<I").unpack_from, ">": struct.Struct(">I").unpack_from}
_I32 = {"<": struct.Struct("<i").unpack_from, ">": struct.Struct(">i").unpack_from}
_EXPECTED = {int(code): sig.encode() for code, sig in HEADER_SIGNATURES.items()}


class RawField(NamedTuple):
    """A header field of a code the spec does not define: its type and exact bytes.

    The spec says to ignore such fields; the proxy keeps them as they are, so a
    message is relayed (and flipped) with them intact.  *data* is the value as it
    lies in the message, from its first byte (after the variant's signature) on.
    """

    signature: str
    data: bytes


# -- signatures and values of any type (our own walker: iterative and bounded) -------

#: A parsed single complete type: its type code and the types it contains (the
#: element of an array, the members of a struct, the key and value of a dict entry).
_Type = tuple[int, tuple["_Type", ...]]

_FIXED_SIZES = {
    ord("y"): 1,
    ord("b"): 4,
    ord("n"): 2,
    ord("q"): 2,
    ord("i"): 4,
    ord("u"): 4,
    ord("h"): 4,
    ord("x"): 8,
    ord("t"): 8,
    ord("d"): 8,
}
_BASIC = frozenset(_FIXED_SIZES) | frozenset(b"sog")
_ALIGN = {**_FIXED_SIZES, ord("s"): 4, ord("o"): 4, ord("g"): 1, ord("v"): 1}
_ALIGN.update({ord("a"): 4, ord("("): 8, ord("{"): 8})
_ARRAY, _STRUCT, _DICT, _VARIANT = ord("a"), ord("("), ord("{"), ord("v")
_SWAP_CODES = {2: "H", 4: "I", 8: "Q"}  # array typecodes by item size, to byte-swap runs
_SIGNATURES: dict[bytes, tuple[_Type, ...]] = {}  # parsed signatures (a few distinct ones)


def parse_signature(sig: bytes | str, what: str = "signature") -> tuple[_Type, ...]:
    """Parse a D-Bus signature into its complete types, validating it per the spec.

    At most 255 bytes; known type codes only; an array has an element type; a
    struct has members; a dict entry lies directly in an array and holds a basic
    key and one value; at most :data:`MAX_ARRAY_NESTING` arrays and
    :data:`MAX_STRUCT_NESTING` structs one inside the other.  Iterative, so no
    signature can exhaust the stack.  Raises :class:`WireError` naming *what*
    and the offending position.

    >>> [chr(code) for code, _ in parse_signature("sa{sv}u")]
    ['s', 'a', 'u']
    """
    raw = sig.encode("ascii", "replace") if isinstance(sig, str) else bytes(sig)
    cached = _SIGNATURES.get(raw)
    if cached is not None:
        return cached
    if len(raw) > 255:
        raise WireError(f"{what} is {len(raw)} bytes long, the spec allows 255")
    top: list[_Type] = []
    # Open containers: (type code, the types gathered in it so far).
    stack: list[tuple[int, list[_Type]]] = []
    arrays = structs = 0

    def bad(i: int, why: str) -> WireError:
        return WireError(f"{what} {raw.decode('ascii', 'replace')!r} is invalid at {i}: {why}")

    for i, c in enumerate(raw):
        node: _Type
        if c in _ALIGN and c not in (_ARRAY, _STRUCT, _DICT):
            node = (c, ())
        elif c == _ARRAY:
            arrays += 1
            if arrays > MAX_ARRAY_NESTING:
                raise bad(i, f"more than {MAX_ARRAY_NESTING} arrays nested")
            stack.append((c, []))
            continue
        elif c in (_STRUCT, _DICT):
            if c == _DICT and not (stack and stack[-1][0] == _ARRAY):
                raise bad(i, "a dict entry outside an array")
            structs += 1
            if structs > MAX_STRUCT_NESTING:
                raise bad(i, f"more than {MAX_STRUCT_NESTING} structs nested")
            stack.append((c, []))
            continue
        elif c == ord(")") or c == ord("}"):
            opener = _STRUCT if c == ord(")") else _DICT
            if not stack or stack[-1][0] != opener:
                if stack and stack[-1][0] == _ARRAY:
                    raise bad(i, "an array without an element type")
                raise bad(i, f"{chr(c)!r} closes nothing")
            code, members = stack.pop()
            structs -= 1
            if not members:
                raise bad(i, "an empty struct" if code == _STRUCT else "an empty dict entry")
            if code == _DICT and len(members) != 2:
                raise bad(i, "a dict entry needs a key and one value")
            node = (code, tuple(members))
        else:
            raise bad(i, f"unknown type code {chr(c)!r}" if 32 < c < 127 else f"byte {c}")
        # The type ends here: it completes every array waiting for an element type.
        while stack and stack[-1][0] == _ARRAY:
            stack.pop()
            arrays -= 1
            node = (_ARRAY, (node,))
        if not stack:
            top.append(node)
            continue
        code, members = stack[-1]
        if code == _DICT:
            if not members and node[0] not in _BASIC:
                raise bad(i, "a dict entry's key must be a basic type")
            if len(members) == 2:
                raise bad(i, "a dict entry holds a key and one value only")
        members.append(node)
    if stack:
        what_open = {_ARRAY: "an array without an element type", _STRUCT: "an unclosed struct"}
        raise bad(len(raw), what_open.get(stack[-1][0], "an unclosed dict entry"))
    result = tuple(top)
    if len(_SIGNATURES) < 1024:
        _SIGNATURES[raw] = result
    return result


def skip_value(
    buf: bytes,
    pos: int,
    types: tuple[_Type, ...],
    endian: str,
    end: int,
    *,
    swap: bytearray | None = None,
    depth: int = 0,
) -> int:
    """Walk the values of *types* in ``buf[pos:end]``; return the position after them.

    The walker is iterative (a stack of frames, never recursion) and bounded:
    every value consumes bytes, arrays are at most :data:`MAX_ARRAY_LENGTH`
    bytes, containers nest at most :data:`MAX_VALUE_NESTING` deep counting
    from *depth* (variants included), and every read is checked against *end*.
    Alignment is per type, counted from the start of *buf* (the message).  When
    *swap* (a copy of *buf*) is given, every multi-byte number in it is
    byte-swapped where it lies, which re-marshals the values in the other byte
    order (the layout is the same in both).  Anything malformed raises
    :class:`WireError` saying what and at which byte.

    >>> data = struct.pack("<I", 2) + b"hi" + bytes(1)
    >>> skip_value(data, 0, parse_signature("s"), "<", len(data))
    7
    """
    u32 = _U32[endian]
    # A frame: [types, next index, array end or -1 for a sequence, nesting depth].
    frames: list[list[Any]] = [[types, 0, -1, depth]]
    while frames:
        frame = frames[-1]
        seq, index, array_end, level = frame
        if array_end < 0:
            if index == len(seq):
                frames.pop()
                continue
            frame[1] = index + 1
            code, kids = seq[index]
        else:
            if pos >= array_end:
                if pos != array_end:
                    raise WireError(
                        f"an array element overruns its array's end at byte {array_end} "
                        f"(it ends at {pos})"
                    )
                frames.pop()
                continue
            code, kids = seq
        align = _ALIGN[code]
        pos = (pos + align - 1) & -align
        size = _FIXED_SIZES.get(code)
        if size is not None:
            if pos + size > end:
                raise _truncated(code, pos, size, end)
            if code == 0x62 and u32(buf, pos)[0] > 1:  # 'b'
                raise WireError(f"boolean at byte {pos} is {u32(buf, pos)[0]}, not 0 or 1")
            if swap is not None and size > 1:
                swap[pos : pos + size] = buf[pos : pos + size][::-1]
            pos += size
            continue
        if code == 0x73 or code == 0x6F:  # 's', 'o': u32 length, UTF-8, NUL
            if pos + 4 > end:
                raise _truncated(code, pos, 4, end)
            length = u32(buf, pos)[0]
            if swap is not None:
                swap[pos : pos + 4] = buf[pos : pos + 4][::-1]
            start = pos + 4
            pos = start + length + 1
            if pos > end:
                raise WireError(
                    f"{_NAMES[code]} at byte {start - 4} of {length} bytes runs past byte {end}"
                )
            _check_text(buf, start, pos - 1, code)
            continue
        if code == 0x67 or code == _VARIANT:  # 'g', 'v': u8 length, signature, NUL
            if pos + 1 > end:
                raise _truncated(code, pos, 1, end)
            length = buf[pos]
            start = pos + 1
            pos = start + length + 1
            if pos > end:
                raise WireError(f"signature at byte {start - 1} runs past byte {end}")
            if buf[pos - 1]:
                raise WireError(f"signature at byte {start - 1} lacks its NUL")
            inner = parse_signature(buf[start : pos - 1], f"signature at byte {start - 1}")
            if code == _VARIANT:
                if len(inner) != 1:
                    raise WireError(
                        f"variant at byte {start - 1} has signature "
                        f"{buf[start : pos - 1].decode('ascii', 'replace')!r}, "
                        "not one single complete type"
                    )
                if level + 1 > MAX_VALUE_NESTING:
                    raise _too_deep(start - 1)
                frames.append([inner, 0, -1, level + 1])
            continue
        if code == _ARRAY:
            if pos + 4 > end:
                raise _truncated(code, pos, 4, end)
            length = u32(buf, pos)[0]
            if length > MAX_ARRAY_LENGTH:
                raise WireError(
                    f"array at byte {pos} is {length} bytes, over the spec's 64 MiB limit"
                )
            if swap is not None:
                swap[pos : pos + 4] = buf[pos : pos + 4][::-1]
            elem = kids[0]
            ealign = _ALIGN[elem[0]]
            start = (pos + 4 + ealign - 1) & -ealign  # padded even when empty
            if start + length > end:
                raise WireError(f"array at byte {pos} of {length} bytes runs past byte {end}")
            esize = _FIXED_SIZES.get(elem[0])
            if esize is not None:  # numbers: the whole run at once
                if length % esize:
                    raise WireError(
                        f"array at byte {pos} of {length} bytes is not a whole number of "
                        f"{esize}-byte {chr(elem[0])!r} elements"
                    )
                if elem[0] == 0x62:
                    values = struct.unpack_from(f"{endian}{length // 4}I", buf, start)
                    if any(v > 1 for v in values):
                        raise WireError(f"array of booleans at byte {pos} holds a non-0/1 value")
                if swap is not None and esize > 1:
                    run = array.array(_SWAP_CODES[esize], buf[start : start + length])
                    run.byteswap()
                    swap[start : start + length] = run.tobytes()
                pos = start + length
                continue
            if level + 1 > MAX_VALUE_NESTING:
                raise _too_deep(pos)
            pos = start
            frames.append([elem, 0, start + length, level + 1])
            continue
        # A struct or a dict entry: its members in order.
        if level + 1 > MAX_VALUE_NESTING:
            raise _too_deep(pos)
        frames.append([kids, 0, -1, level + 1])
    return pos


_NAMES = {
    **{code: f"{chr(code)!r} value" for code in _ALIGN},
    0x73: "string",
    0x6F: "object path",
    0x67: "signature",
    _VARIANT: "variant",
    _ARRAY: "array length",
}


def _truncated(code: int, pos: int, size: int, end: int) -> WireError:
    return WireError(
        f"{_NAMES[code]} at byte {pos} needs {size} bytes, the data ends at byte {end}"
    )


def _too_deep(pos: int) -> WireError:
    return WireError(
        f"value at byte {pos} nests containers more than {MAX_VALUE_NESTING} deep "
        "(the spec's limit, variants included)"
    )


def _check_text(buf: bytes, start: int, nul: int, code: int) -> None:
    """The string at ``buf[start:nul]`` ends with a NUL, holds none, and is UTF-8."""
    if buf[nul]:
        raise WireError(f"{_NAMES[code]} at byte {start - 4} lacks its NUL at byte {nul}")
    if buf.find(b"\0", start, nul) >= 0:
        raise WireError(f"{_NAMES[code]} at byte {start - 4} contains a NUL")
    try:
        buf[start:nul].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(f"{_NAMES[code]} at byte {start - 4} is not UTF-8: {exc}") from None


_HEADER_TYPES = parse_signature("yyyyuua(yv)")


def _parse_fields(raw: bytes, e: str) -> _Fields:
    """Decode the header fields array, checking each known field's type.

    Hand-written for the types the spec gives header fields (this runs for every
    message a rule looks at); fields of other codes are walked by
    :func:`skip_value` (bounded, iterative) and kept as :class:`RawField`.
    """
    u32 = _U32[e]
    end = _FIXED + u32(raw, 12)[0]
    if end > len(raw):
        raise WireError(f"header fields end at byte {end}, past the message's {len(raw)} bytes")
    pos = _FIXED
    values: dict[int, Any] = {}
    offsets: dict[int, int] = {}
    try:
        while pos < end:
            pos = (pos + 7) & ~7  # each field is a STRUCT, 8-aligned
            start = pos
            if pos + 4 > end:
                raise WireError(f"header field at byte {pos} is cut off by the fields' end {end}")
            code = raw[pos]
            sig_len = raw[pos + 1]
            sig = raw[pos + 2 : pos + 2 + sig_len]
            pos += 3 + sig_len  # code, signature length, signature, its NUL
            if pos > end or raw[pos - 1]:
                raise WireError(
                    f"header field {code} at byte {start}: its signature of {sig_len} bytes "
                    "is not NUL-terminated within the header"
                )
            if code == 0:
                raise WireError(f"header field code 0 (INVALID) at byte {start}")
            if code in values:
                raise WireError(f"header field {code} at byte {start} appears twice")
            expected = _EXPECTED.get(code)
            if expected is not None and sig != expected:
                raise WireError(
                    f"header field {HeaderField(code).name} ({code}) has type "
                    f"{sig.decode('ascii', 'replace')!r}, the spec requires "
                    f"{expected.decode()!r}"
                )
            if expected is None:
                # A code the spec does not define: ignore its value, as the spec says,
                # but walk it (bounded) to find where the next field starts.
                types = parse_signature(sig, f"header field {code} at byte {start}: signature")
                if len(types) != 1:
                    raise WireError(
                        f"header field {code} at byte {start} has signature "
                        f"{sig.decode('ascii', 'replace')!r}, not one single complete type"
                    )
                align = _ALIGN[types[0][0]]
                value_at = (pos + align - 1) & -align
                try:
                    pos = skip_value(raw, pos, types, e, end, depth=3)  # in a(yv): 3 deep
                except WireError as exc:
                    raise WireError(
                        f"header field {code} at byte {start} (signature "
                        f"{sig.decode('ascii', 'replace')!r}): {exc}"
                    ) from None
                values[code] = RawField(sig.decode("ascii"), raw[value_at:pos])
            elif sig == b"s" or sig == b"o":
                pos = (pos + 3) & ~3
                if pos + 4 > end:
                    raise _truncated(sig[0], pos, 4, end)
                length = u32(raw, pos)[0]
                if pos + 5 + length > end:
                    raise WireError(
                        f"header field {HeaderField(code).name} at byte {start}: its "
                        f"{length}-byte string runs past the header's end at byte {end}"
                    )
                if raw[pos + 4 + length] or raw.find(b"\0", pos + 4, pos + 4 + length) >= 0:
                    raise WireError(
                        f"header field {HeaderField(code).name} at byte {start}: its string "
                        "lacks its NUL or holds one"
                    )
                offsets[code] = pos
                try:
                    values[code] = raw[pos + 4 : pos + 4 + length].decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise WireError(
                        f"header field {HeaderField(code).name} at byte {start} is not UTF-8: {exc}"
                    ) from None
                pos += 5 + length
            elif sig == b"u":
                pos = (pos + 3) & ~3
                if pos + 4 > end:
                    raise _truncated(sig[0], pos, 4, end)
                offsets[code] = pos
                values[code] = u32(raw, pos)[0]
                pos += 4
            else:  # b"g"
                if pos + 1 > end:
                    raise _truncated(sig[0], pos, 1, end)
                length = raw[pos]
                if pos + 2 + length > end or raw[pos + 1 + length]:
                    raise WireError(
                        f"header field SIGNATURE at byte {start}: its {length}-byte value "
                        f"is not NUL-terminated within the header (ends at byte {end})"
                    )
                offsets[code] = pos
                text = raw[pos + 1 : pos + 1 + length].decode("ascii")
                parse_signature(text, f"header field SIGNATURE at byte {start}")
                values[code] = text
                pos += 2 + length
    except WireError:
        raise
    except (IndexError, struct.error, UnicodeDecodeError, ValueError, KeyError) as exc:
        # Should not happen (every read above is bounds-checked): still a WireError.
        raise WireError(f"malformed header fields at byte {pos}: {exc}") from exc
    if pos > end:
        raise WireError(f"header fields overrun their declared length ({pos} > {end})")
    return _Fields(values, offsets)


def whole_messages(data: bytes | memoryview) -> list[tuple[str, int, int, int]] | None:
    """``[(endian, serial, start, end), ...]`` if *data* is whole messages and nothing else.

    Reads only the fixed headers (validating them), so the proxy can decide to
    forward a chunk before framing it; :func:`messages_at` builds the messages
    afterwards.  ``None`` if *data* ends inside a message.
    """
    n = len(data)
    pos = 0
    spans = []
    while n - pos >= _FIXED:
        e, total, serial = _fixed_header(data, pos)
        spans.append((e, serial, pos, pos + total))
        pos += total
    return spans if pos == n else None


def member_pattern(members: Iterable[bytes]) -> re.Pattern[bytes]:
    """A pattern that finds a ``MEMBER`` header field naming one of *members*.

    Its 4-byte start, any length, the name and its NUL (which no name contains);
    with no member, a pattern that finds nothing (and costs nothing to try).
    """
    names = sorted(set(members))
    if not names:
        return _NOTHING
    alternatives = b"|".join(re.escape(name) for name in names)
    return re.compile(re.escape(_MEMBER_FIELD) + rb"[\s\S]{4}(?:" + alternatives + rb")\0")


def whole_messages_without(data: bytes, members: re.Pattern[bytes]) -> bool:
    """Whether *data* is whole messages, none with a ``MEMBER`` field *members* finds.

    The proxy's prefilter on its hot path with rules (*members* comes from
    :func:`member_pattern`).  The pattern runs once over the whole chunk, bodies
    included (a hit there only costs the exact path); only the lengths of each
    fixed header are read: the framer validates every header when the chunk is
    framed.  ``False`` only means "look closer".
    """
    if members.search(data) is not None:
        return False
    n = len(data)
    pos = 0
    while n - pos >= _FIXED:
        endian = data[pos]
        if endian == 0x6C:
            body_length, _serial, fields_length = _LE_LENGTHS(data, pos + 4)
        elif endian == 0x42:
            body_length, _serial, fields_length = _BE_LENGTHS(data, pos + 4)
        else:
            return False
        pos += ((_FIXED + fields_length + 7) & ~7) + body_length  # from the message start
    return pos == n


_LE_LENGTHS = struct.Struct("<III").unpack_from
_BE_LENGTHS = struct.Struct(">III").unpack_from
_MEMBER_FIELD = bytes((HeaderField.MEMBER, 1, ord("s"), 0))
_NOTHING = re.compile(rb"\A(?!)")


def messages_at(data: bytes, spans: list[tuple[str, int, int, int]]) -> list[Message]:
    """The messages of *data* at the *spans* :func:`whole_messages` returned."""
    if len(spans) == 1:
        e, serial, _, _ = spans[0]
        return [Message(data, _endian=e, _serial=serial)]
    return [Message(data[a:b], _endian=e, _serial=serial) for e, serial, a, b in spans]


_new = object.__new__


def _framed(raw: bytes, endian: str, serial: int) -> Message:
    """``Message(raw, _endian=endian, _serial=serial)`` at half the cost.

    For the framer only, whose ``_fixed_header`` already checked the header and
    the length: every message relayed is framed so (for the trace), so the
    keyword call and its checks cost on every one.  Sets what ``__init__`` sets.
    """
    msg: Message = _new(Message)
    msg.raw = raw
    msg._e = endian
    msg.type = raw[1]
    msg.serial = serial
    msg._fields = None
    msg._hend = 0
    return msg


def _compiled_frame() -> Callable[[bytes, type[Message]], tuple[list[Message], int, int]] | None:
    """The compiled split of :meth:`Framer._frame` (``_fastpath.frame``), if built and allowed."""
    if os.environ.get("RUNTIMEFAULTS_PURE_PYTHON") == "1":
        return None
    try:
        from pytest_runtimefaults.dbus._fastpath import frame
    except ImportError:  # not built here (or an old build): the Python split
        return None
    return frame


_frame_c = _compiled_frame()


class Framer:
    """Turn a byte stream into whole messages, whatever the chunking.

    ``feed(data)`` returns the messages completed by *data* (possibly none).
    After a :class:`WireError` the stream has lost its framing: stop using it.
    """

    __slots__ = ("_buf", "_need")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need = _FIXED  # bytes needed before the next decision

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a whole message."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        buf = self._buf
        if not buf and len(data) >= _FIXED:
            # Fast path: the chunk starts on a message boundary (the usual case).
            return self._frame(bytes(data))
        buf += data
        if len(buf) < self._need:
            return []
        data = bytes(buf)
        buf.clear()
        return self._frame(data)

    def _frame(self, data: bytes) -> list[Message]:
        if _frame_c is not None:
            out, pos, need = _frame_c(data, Message)
            if need < 0:  # a header the checks refuse: Python's frame names what is wrong
                return out + self._frame_py(data[pos:])
            self._need = need
            if pos < len(data):
                self._buf += data[pos:] if pos else data
            return out
        return self._frame_py(data)

    def _frame_py(self, data: bytes) -> list[Message]:
        out: list[Message] = []
        pos = 0
        n = len(data)
        while n - pos >= _FIXED:
            e, total, serial = _fixed_header(data, pos)
            if n - pos < total:
                self._need = total
                break
            raw = data if (pos == 0 and total == n) else data[pos : pos + total]
            out.append(_framed(raw, e, serial))
            pos += total
        else:
            self._need = _FIXED
        if pos < n:
            self._buf += data[pos:] if pos else data
        return out


# -- building messages (through jeepney) ---------------------------------------------


def _build(
    kind: int,
    fields: Mapping[int, Any],
    signature: str,
    body: tuple[Any, ...],
    *,
    serial: int,
    sender: str | None,
    destination: str | None,
    big_endian: bool = False,
) -> Message:
    """Marshal a new message with jeepney (header fields by our codes)."""
    from jeepney.low_level import Endianness, Header, HeaderFields
    from jeepney.low_level import Message as JMessage

    all_fields: dict[int, Any] = dict(fields)
    for code, value in (
        (HeaderField.SIGNATURE, signature),
        (HeaderField.SENDER, sender),
        (HeaderField.DESTINATION, destination),
    ):
        if value:
            all_fields[code] = value
    endian = Endianness.big if big_endian else Endianness.little
    # METHOD_RETURN and ERROR carry NO_REPLY_EXPECTED, as buses send them.
    flags = 0 if kind == MessageType.SIGNAL else FLAG_NO_REPLY_EXPECTED
    header = Header(
        endian, kind, flags, 1, 0, serial, {HeaderFields(code): v for code, v in all_fields.items()}
    )
    return Message(JMessage(header, body).serialise(serial=serial))


def build_signal(
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: tuple[Any, ...] = (),
    *,
    serial: int,
    sender: str | None = None,
    destination: str | None = None,
    big_endian: bool = False,
) -> Message:
    """A SIGNAL message, e.g. a synthesized ``NameAcquired`` or ``JobRemoved``."""
    fields: dict[int, Any] = {
        HeaderField.PATH: path,
        HeaderField.INTERFACE: interface,
        HeaderField.MEMBER: member,
    }
    return _build(
        MessageType.SIGNAL,
        fields,
        signature,
        body,
        serial=serial,
        sender=sender,
        destination=destination,
        big_endian=big_endian,
    )


def build_method_return(
    reply_serial: int,
    signature: str = "",
    body: tuple[Any, ...] = (),
    *,
    serial: int,
    sender: str | None = None,
    destination: str | None = None,
) -> Message:
    """A METHOD_RETURN answering *reply_serial* (used for stray and duplicate replies)."""
    return _build(
        MessageType.METHOD_RETURN,
        {HeaderField.REPLY_SERIAL: reply_serial},
        signature,
        body,
        serial=serial,
        sender=sender,
        destination=destination,
    )


def build_error(
    reply_serial: int,
    name: str,
    text: str = "",
    *,
    serial: int,
    sender: str | None = None,
    destination: str | None = None,
) -> Message:
    """An ERROR answering *reply_serial* with error *name* and a message *text*."""
    fields: dict[int, Any] = {HeaderField.REPLY_SERIAL: reply_serial, HeaderField.ERROR_NAME: name}
    return _build(
        MessageType.ERROR,
        fields,
        "s" if text else "",
        (text,) if text else (),
        serial=serial,
        sender=sender,
        destination=destination,
    )


def flip_byte_order(msg: Message) -> Message:
    """Re-marshal *msg* in the other byte order (both are legal D-Bus).

    Every multi-byte number of the fixed header, of every header field (those
    of unknown codes included, whatever their type) and of the body is
    byte-swapped where it lies: the layout of a message is the same in both
    byte orders, so this is exact (flipping twice gives the same bytes) and
    needs no re-marshalling of values, not even of ``h`` (fd index) values.  A
    message of a type the spec does not define is returned untouched (the spec
    says to ignore those).  Raises :class:`WireError` if the message does not
    match its own signature.
    """
    if msg.type not in _TYPE_NAMES:
        return msg
    raw = msg.raw
    e = msg._e
    signature = msg.signature  # validates the header fields first
    out = bytearray(raw)
    header_end = msg.header_end
    pos = skip_value(raw, 0, _HEADER_TYPES, e, header_end, swap=out)
    if pos != header_end:
        raise WireError(f"header fields end at byte {pos}, not at {header_end} as declared")
    start = msg.body_offset
    end = len(raw)
    if start > end:
        raise WireError(f"the body would start at byte {start}, past the message's end {end}")
    if start < end and not signature:
        raise WireError(f"a body of {end - start} bytes but no SIGNATURE header field")
    types = parse_signature(signature, "body signature")
    pos = skip_value(raw, start, types, e, end, swap=out)
    if pos != end:
        raise WireError(
            f"the body of signature {signature!r} ends at byte {pos}, the message at {end}"
        )
    out[0] = 0x6C if msg.big_endian else 0x42
    return Message(bytes(out))
