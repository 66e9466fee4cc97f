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

jeepney is used where it serves: to skip header fields of unknown codes (the
spec says to ignore them), to build new messages (signals, errors, replies) for
fault rules, and to re-marshal a message in the other byte order.

Example::

    framer = Framer()
    for msg in framer.feed(chunk):
        print(msg.type_name, msg.serial, msg.member)
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

__all__ = [
    "HEADER_SIGNATURES",
    "MAX_ARRAY_LENGTH",
    "MAX_MESSAGE_LENGTH",
    "Framer",
    "HeaderField",
    "Message",
    "MessageType",
    "WireError",
    "build_error",
    "build_method_return",
    "build_signal",
    "flip_byte_order",
    "member_pattern",
    "messages_at",
    "whole_messages",
    "whole_messages_without",
]

MAX_MESSAGE_LENGTH = 2**27  # 128 MiB, the spec's limit on a whole message
MAX_ARRAY_LENGTH = 2**26  # 64 MiB, the spec's limit on one array (the header fields)
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


def _fixed_header(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[str, int, int]:
    """Validate the fixed header at *pos*; return (struct endian, total length, serial)."""
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
    body_length, serial, fields_length = struct.unpack_from(e + "III", buf, pos + 4)
    if fields_length > MAX_ARRAY_LENGTH:
        raise WireError(
            f"header fields array of {fields_length} bytes exceeds the spec's 64 MiB limit"
        )
    header_length = _FIXED + fields_length
    total = header_length + _pad8(header_length) + body_length
    if total > MAX_MESSAGE_LENGTH:
        raise WireError(
            f"message of {total} bytes exceeds the spec's 128 MiB limit "
            f"(body length field {body_length})"
        )
    if buf[pos + 1] == MessageType.INVALID:
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
        self._fields: _Fields | None = None
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
        if pos < 0:
            return None
        length = _U32[self._e](raw, pos + 4)[0]
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
        """Header fields by code (unknown codes included, as jeepney decodes them)."""
        return self._parsed().values

    def _parsed(self) -> _Fields:
        if self._fields is None:
            self._fields = _parse_fields(self.raw, self._e)
        return self._fields

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


def _parse_fields(raw: bytes, e: str) -> _Fields:
    """Decode the header fields array, checking each known field's type.

    Hand-written for the types the spec gives header fields (this runs for every
    message a rule looks at); other codes are skipped with jeepney's parser.
    """
    u32 = _U32[e]
    end = _FIXED + u32(raw, 12)[0]
    pos = _FIXED
    values: dict[int, Any] = {}
    offsets: dict[int, int] = {}
    try:
        while pos < end:
            pos = (pos + 7) & ~7  # each field is a STRUCT, 8-aligned
            code = raw[pos]
            sig_len = raw[pos + 1]
            sig = raw[pos + 2 : pos + 2 + sig_len]
            pos += 3 + sig_len  # code, signature length, signature, its NUL
            expected = _EXPECTED.get(code)
            if expected is not None and sig != expected:
                raise WireError(
                    f"header field {HeaderField(code).name} ({code}) has type "
                    f"{sig.decode('ascii', 'replace')!r}, the spec requires "
                    f"{expected.decode()!r}"
                )
            if sig == b"s" or sig == b"o":
                pos = (pos + 3) & ~3
                length = u32(raw, pos)[0]
                offsets[code] = pos
                values[code] = raw[pos + 4 : pos + 4 + length].decode("utf-8")
                pos += 5 + length
            elif sig == b"u" or sig == b"i":
                pos = (pos + 3) & ~3
                offsets[code] = pos
                values[code] = (u32 if sig == b"u" else _I32[e])(raw, pos)[0]
                pos += 4
            elif sig == b"g":
                length = raw[pos]
                offsets[code] = pos
                values[code] = raw[pos + 1 : pos + 1 + length].decode("ascii")
                pos += 2 + length
            else:  # a field code the spec does not define: skip its value
                from jeepney.low_level import Endianness, parse_signature

                endianness = Endianness.big if e == ">" else Endianness.little
                value, pos = parse_signature(list(sig.decode("ascii"))).parse_data(
                    raw, pos, endianness
                )
                values[code] = value
    except WireError:
        raise
    except (IndexError, struct.error, UnicodeDecodeError, ValueError, KeyError) as exc:
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
        out: list[Message] = []
        pos = 0
        n = len(data)
        while n - pos >= _FIXED:
            e, total, serial = _fixed_header(data, pos)
            if n - pos < total:
                self._need = total
                break
            raw = data if (pos == 0 and total == n) else data[pos : pos + total]
            out.append(Message(raw, _endian=e, _serial=serial))
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

    A message that carries file descriptors is returned unchanged: its ``h``
    values index the fds sent alongside and re-marshalling them needs the fds.
    """
    if msg.unix_fds:
        return msg
    from jeepney.low_level import Endianness
    from jeepney.low_level import Message as JMessage

    parsed = JMessage.from_buffer(msg.raw)
    parsed.header.endianness = Endianness.little if msg.big_endian else Endianness.big
    return Message(parsed.serialise(serial=msg.serial))
