"""Property tests of the D-Bus codec: no input, however hostile, gets past it as
anything but messages or a :class:`WireError`, and valid input is byte-exact.

Derandomized (the ``runtimefaults-ci`` profile below): every run tries the same
examples, so a failure in CI is a failure on a laptop, and the example counts
(6500 in all) are fixed.  Three properties:

* random bytes in random chunkings: the :class:`Framer` returns messages or
  raises :class:`WireError`, nothing else, and reading any message it returns
  (fields, ``repr``, a trace line, a byte-order flip) does the same;
* valid messages built by jeepney (arrays, dicts, variants, nested structs,
  file descriptors) in both byte orders: framed byte-exactly in any chunking,
  their header fields read as jeepney reads them, and flipping gives exactly
  the bytes jeepney builds in the other byte order (and flipping twice, the
  message itself);
* mutations of those (bit flips, truncations, huge lengths, unknown header
  fields of random signatures and bytes): only :class:`WireError`, each within
  a time bound (jeepney's parser looped for ever on some of them).
"""

from __future__ import annotations

import functools
import struct
import time
from typing import Any

import pytest
from dbus_crafted import with_field
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from jeepney.low_level import Endianness, Header, HeaderFields
from jeepney.low_level import Message as JMessage
from jeepney.low_level import MessageType as JType
from jeepney.low_level import parse_signature as jeepney_signature

from pytest_runtimefaults.dbus.trace import TraceEntry
from pytest_runtimefaults.dbus.wire import Framer, Message, WireError, flip_byte_order

pytestmark = pytest.mark.timeout(300)

settings.register_profile(
    "runtimefaults-ci",
    derandomize=True,  # the same examples on every run: CI failures replay anywhere
    database=None,  # nothing written to .hypothesis/: derandomized runs need no replay file
    deadline=None,  # this machine is shared: the time bound is asserted per example below
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # no slow "explain"
)
CI = settings.get_profile("runtimefaults-ci")
#: Seconds one example may take to frame, read and flip (the hang was unbounded).
TIME_BOUND = 2.0

# -- D-Bus types and values ---------------------------------------------------------

BASIC = "ybnqiuxtdsogh"
_RANGES = {
    "y": (0, 2**8 - 1),
    "n": (-(2**15), 2**15 - 1),
    "q": (0, 2**16 - 1),
    "i": (-(2**31), 2**31 - 1),
    "u": (0, 2**32 - 1),
    "x": (-(2**63), 2**63 - 1),
    "t": (0, 2**64 - 1),
    "h": (0, 50),  # an fd number: jeepney writes its index among the message's fds
}
_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=12)
_NAME_CHARS = "abcxyzABZ_019"
_PATHS = st.lists(st.text(_NAME_CHARS, min_size=1, max_size=6), max_size=3).map(
    lambda parts: "/" + "/".join(parts)
)
_MEMBERS = st.tuples(st.sampled_from("abMNZ_"), st.text(_NAME_CHARS, max_size=8)).map("".join)

#: A single complete type: a basic type, an array, a dict, a struct or a variant.
types: st.SearchStrategy[str] = st.recursive(
    st.sampled_from([*BASIC, "v"]),
    lambda inner: st.one_of(
        inner.map(lambda t: "a" + t),
        st.tuples(st.sampled_from(BASIC), inner).map(lambda kv: "a{" + kv[0] + kv[1] + "}"),
        st.lists(inner, min_size=1, max_size=4).map(lambda ts: "(" + "".join(ts) + ")"),
    ),
    max_leaves=8,
)
_VARIANT_TYPES = st.sampled_from(["y", "s", "ai", "a{sv}", "(ybv)", "as", "v", "ah", "d"])


def _split(sig: str) -> list[str]:
    """The complete types of *sig*, in order (a small test-side parser)."""
    out, depth, start = [], 0, 0
    for i, c in enumerate(sig):
        if c in "({":
            depth += 1
        elif c in ")}":
            depth -= 1
        if depth == 0 and c != "a":
            out.append(sig[start : i + 1])
            start = i + 1
    return out


@functools.cache  # one strategy per type: building them costs more
def values(sig: str) -> st.SearchStrategy[Any]:
    """Values of the single complete type *sig*, as jeepney marshals them."""
    c = sig[0]
    if c in _RANGES:
        return st.integers(*_RANGES[c])
    if c == "b":
        return st.booleans()
    if c == "d":
        return st.floats(allow_nan=False)
    if c == "s":
        return _TEXT
    if c == "o":
        return _PATHS
    if c == "g":
        return st.sampled_from(["", "s", "a{sv}", "(ii)", "aah"])
    if c == "v":
        return _VARIANT_TYPES.flatmap(lambda t: st.tuples(st.just(t), values(t)))
    if c == "(":
        return st.tuples(*(values(t) for t in _split(sig[1:-1])))
    if sig.startswith("a{"):
        key, value = _split(sig[2:-1])
        return st.dictionaries(values(key), values(value), max_size=3)
    if sig == "ay":
        return st.binary(max_size=16)
    return st.lists(values(sig[1:]), max_size=3)


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, JMessage, int]:
    """(bytes, the jeepney message, its fd count): a valid message of any type."""
    kind = draw(st.sampled_from(list(JType)))
    big = draw(st.booleans())
    fields: dict[HeaderFields, Any] = {}
    if kind in (JType.method_call, JType.signal):
        fields[HeaderFields.path] = draw(_PATHS)
        fields[HeaderFields.member] = draw(_MEMBERS)
        if kind == JType.signal or draw(st.booleans()):
            fields[HeaderFields.interface] = "org.example.I" + str(draw(st.integers(0, 9)))
    else:
        fields[HeaderFields.reply_serial] = draw(st.integers(1, 2**32 - 1))
        if kind == JType.error:
            fields[HeaderFields.error_name] = "org.example.Error.E" + str(draw(st.integers(0, 9)))
    if draw(st.booleans()):
        fields[HeaderFields.destination] = ":1." + str(draw(st.integers(0, 999)))
    body_types = draw(st.lists(types, max_size=3))
    body = tuple(draw(values(t)) for t in body_types)
    if body_types:
        fields[HeaderFields.signature] = "".join(body_types)
    serial = draw(st.integers(1, 2**32 - 1))
    flags = draw(st.sampled_from([0, 1, 2, 4]))
    order = Endianness.big if big else Endianness.little
    jmsg = JMessage(Header(order, kind, flags, 1, 0, serial, fields), body)
    fds: list[int] = []
    raw = bytes(jmsg.serialise(serial=serial, fds=fds))
    return raw, jmsg, len(fds)


def _chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos, i = [], 0, 0
    while pos < len(data):
        step = sizes[i % len(sizes)] if sizes else len(data)
        out.append(data[pos : pos + step])
        pos += step
        i += 1
    return out


def _read_all(msg: Message) -> None:
    """Everything a proxy or a report reads of *msg*: only WireError may come out."""
    for read in (
        lambda: msg.fields,
        lambda: (msg.path, msg.member, msg.interface, msg.reply_serial, msg.unix_fds),
        lambda: msg.with_serials(serial=3),
        lambda: flip_byte_order(msg),
    ):
        try:
            read()
        except WireError:
            pass
    repr(msg)
    TraceEntry(1, "to_bus", msg).format()  # never raises, whatever the bytes


# -- random bytes ------------------------------------------------------------------


@settings(CI, max_examples=2000)
@given(
    prefix=st.sampled_from([b"", b"l\x01\x00\x01", b"B\x01\x00\x01", b"l\x04\x01\x01"]),
    data=st.binary(max_size=400),
    sizes=st.lists(st.integers(1, 64), max_size=8),
)
def test_random_bytes_in_random_chunkings_give_messages_or_wire_error(
    prefix: bytes, data: bytes, sizes: list[int]
) -> None:
    started = time.monotonic()
    framer = Framer()
    framed = 0
    try:
        for chunk in _chunks(prefix + data, sizes):
            for msg in framer.feed(chunk):
                framed += 1
                _read_all(msg)
        event("pending or framed" if framed or framer.pending else "nothing")
    except WireError:
        event("WireError on framing")
    try:
        _read_all(Message(prefix + data))
    except WireError:
        pass
    assert time.monotonic() - started < TIME_BOUND


# -- valid messages ------------------------------------------------------------------


@settings(CI, max_examples=1500)
@given(built=messages(), sizes=st.lists(st.integers(1, 200), max_size=6))
def test_valid_messages_round_trip_byte_exactly(
    built: tuple[bytes, JMessage, int], sizes: list[int]
) -> None:
    raw, jmsg, nfds = built
    framer = Framer()
    out: list[Message] = []
    for chunk in _chunks(raw + raw, sizes):  # two in a row: boundaries in any chunk
        out += framer.feed(chunk)
    assert [m.raw for m in out] == [raw, raw]
    assert framer.pending == 0
    msg = out[0]
    header = jmsg.header
    assert (msg.type, msg.serial) == (header.message_type.value, header.serial)
    assert msg.flags == int(header.flags)
    assert msg.big_endian is (header.endianness == Endianness.big)
    for code, value in header.fields.items():
        assert msg.field(code) == value, HeaderFields(code).name
    assert msg.unix_fds == nfds
    assert set(msg.fields) == {int(c) for c in header.fields}

    flipped = flip_byte_order(msg)
    # Exactly what jeepney builds in the other byte order, fds and all.
    header.endianness = Endianness.little if msg.big_endian else Endianness.big
    assert flipped.raw == bytes(jmsg.serialise(serial=header.serial, fds=[]))
    assert flip_byte_order(flipped).raw == raw
    reparsed = JMessage.from_buffer(flipped.raw, fds=list(range(nfds)))
    expected = JMessage.from_buffer(raw, fds=list(range(nfds)))
    assert reparsed.body == expected.body


@settings(CI, max_examples=1000)
@given(
    built=messages(),
    code=st.integers(10, 255),
    sig=types,
    data=st.data(),
)
def test_unknown_fields_of_any_type_are_kept_and_flipped(
    built: tuple[bytes, JMessage, int], code: int, sig: str, data: st.DataObject
) -> None:
    raw, jmsg, nfds = built
    value = data.draw(values(sig))
    order = jmsg.header.endianness
    other = Endianness.little if order == Endianness.big else Endianness.big

    def marshal(pos: int, e: str) -> bytes:
        # jeepney marshals the value where it lies (alignment counts from the start).
        return bytes(jeepney_signature(list(sig)).serialise(value, pos, order, fds=[]))

    hostile = with_field(raw, code, sig.encode(), marshal)
    msg = Message(hostile)
    field = msg.fields[code]
    assert field.signature == sig
    assert msg.member == jmsg.header.fields.get(HeaderFields.member)
    flipped = flip_byte_order(msg)
    assert flip_byte_order(flipped).raw == hostile
    # Kept where it lies, and jeepney reads it in the other byte order: every
    # number in it was swapped, whatever the type.
    (flen,) = struct.unpack_from(">I" if msg.big_endian else "<I", raw, 12)
    align = _ALIGN[sig[0]]
    at = -(-(16 + -(-flen // 8) * 8 + 3 + len(sig)) // align) * align
    assert hostile[at : at + len(field.data)] == field.data
    assert flipped.fields[code].data == flipped.raw[at : at + len(field.data)]
    parsed, _ = jeepney_signature(list(sig)).parse_data(flipped.raw, at, other, fds=FDS)
    assert parsed == jeepney_signature(list(sig)).parse_data(hostile, at, order, fds=FDS)[0]
    reparsed = JMessage.from_buffer(
        _without_field(flipped.raw, hostile, raw), fds=list(range(nfds))
    )
    assert reparsed.body == JMessage.from_buffer(raw, fds=list(range(nfds))).body


_ALIGN = {**dict.fromkeys("ygv", 1), **dict.fromkeys("nq", 2), **dict.fromkeys("biuhsoa", 4)}
_ALIGN.update(dict.fromkeys("xtd({", 8))
FDS = list(range(64))  # jeepney maps an ``h`` index to an fd: any will do here


def _without_field(flipped: bytes, hostile: bytes, raw: bytes) -> bytes:
    """*flipped* with the unknown field cut out again (jeepney refuses unknown codes)."""
    e = ">" if flipped[0] == 0x42 else "<"
    (old_len,) = struct.unpack_from("<I" if raw[0] == 0x6C else ">I", raw, 12)
    head = flipped[:12] + struct.pack(e + "I", old_len) + flipped[16 : 16 + old_len]
    head += b"\0" * ((8 - len(head) % 8) % 8)
    body_start = len(hostile) - (len(raw) - len(head))
    return head + flipped[body_start:]


# -- mutations -----------------------------------------------------------------------

_SIG_ALPHABET = "ybnqiuxtdsoghav(){}"


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, bytes]:
    """(what was done, bytes): a valid message made hostile in one of several ways."""
    raw, _jmsg, _n = draw(messages())
    how = draw(st.sampled_from(["flip-bits", "truncate", "huge-length", "unknown-field"]))
    if how == "flip-bits":
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= 1 << draw(st.integers(0, 7))
        return how, bytes(data)
    if how == "truncate":
        return how, raw[: draw(st.integers(0, len(raw) - 1))]
    if how == "huge-length":
        e = "<" if raw[0] == 0x6C else ">"
        value = draw(st.sampled_from([2**32 - 1, 2**26, 2**26 + 1, 2**27, 2**31, 7, 0]))
        # The body length, the fields' length, or any 4-aligned word (an array length?).
        offset = draw(
            st.sampled_from([4, 12]) | st.integers(4, len(raw) // 4 - 1).map(lambda i: 4 * i)
        )
        return how, raw[:offset] + struct.pack(e + "I", value) + raw[offset + 4 :]
    code = draw(st.integers(10, 255))
    sig = draw(st.text(st.sampled_from(_SIG_ALPHABET), max_size=14)).encode()
    value = draw(st.binary(max_size=80))
    return how, with_field(raw, code, sig, lambda pos, e: value)


@settings(CI, max_examples=2000)
@given(mutated=mutations(), sizes=st.lists(st.integers(1, 300), max_size=4))
def test_mutated_messages_give_only_wire_error_in_bounded_time(
    mutated: tuple[str, bytes], sizes: list[int]
) -> None:
    how, data = mutated
    started = time.monotonic()
    framer = Framer()
    outcome = "pending (a truncated stream waits for more)"
    try:
        for chunk in _chunks(data, sizes):
            for msg in framer.feed(chunk):
                _read_all(msg)
                try:
                    flipped = flip_byte_order(msg)
                except WireError:
                    outcome = "framed, WireError on reading"
                    continue
                # Whatever was accepted flips back to itself.
                assert flip_byte_order(flipped).raw == msg.raw
                outcome = "framed and read (still legal)"
    except WireError:
        outcome = "WireError on framing"
    event(f"{how}: {outcome}")
    assert time.monotonic() - started < TIME_BOUND
