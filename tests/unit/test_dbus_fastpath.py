"""The compiled part of the relay (pytest_runtimefaults/dbus/_fastpath.c) on real sockets.

``relay``: one fused read-and-relay; ``loop``: the whole relay of connections no
rule concerns, on an epoll set as the proxy's, until Python is needed.

Skipped where the build could not compile it; the proxy then runs its
pure-Python path, which every other D-Bus test covers (and which
RUNTIMEFAULTS_PURE_PYTHON=1 forces where it is built).
"""

from __future__ import annotations

import array
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from jeepney import DBusAddress, new_method_call
from jeepney.low_level import Endianness

from pytest_runtimefaults.dbus import proxy, wire

relay, loop = proxy._compiled()
Pairs = tuple[socket.socket, socket.socket, socket.socket, socket.socket]
needs_built = pytest.mark.skipif(relay is None, reason="the compiled fast path is not built")
needs_frame = pytest.mark.skipif(wire._frame_c is None, reason="the compiled split is not built")
needs_loop = pytest.mark.skipif(loop is None, reason="the compiled relay loop is not built")


@pytest.fixture
def pairs() -> Iterator[Pairs]:
    """(writer, src, dst, reader): bytes go writer -> src, relay src -> dst, dst -> reader."""
    writer, src = socket.socketpair()
    dst, reader = socket.socketpair()
    socks = (writer, src, dst, reader)
    yield socks
    for s in socks:
        s.close()


@needs_built
@pytest.mark.parametrize("fds", [False, True])
def test_relays_what_it_reads_byte_for_byte(pairs: Pairs, fds: bool) -> None:
    assert relay is not None
    writer, src, dst, reader = pairs
    data = bytes(range(256)) * 100
    writer.sendall(data)
    got = relay(src.fileno(), dst.fileno(), fds)
    assert got is not None
    chunk, sent, received, truncated = got
    assert chunk == data[: len(chunk)]
    assert sent == len(chunk)
    assert (received, truncated) == ([], False)
    assert reader.recv(len(chunk), socket.MSG_WAITALL) == chunk


@needs_built
def test_nothing_to_read_is_none_and_eof_is_empty(pairs: Pairs) -> None:
    assert relay is not None
    writer, src, dst, _ = pairs
    assert relay(src.fileno(), dst.fileno(), True) is None
    writer.shutdown(socket.SHUT_WR)
    assert relay(src.fileno(), dst.fileno(), True) == (b"", -1, [], False)


@needs_built
def test_fds_are_received_and_nothing_is_written(pairs: Pairs) -> None:
    assert relay is not None
    writer, src, dst, reader = pairs
    r, w = os.pipe()
    try:
        writer.sendmsg(
            [b"message"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())]
        )
        got = relay(src.fileno(), dst.fileno(), True)
        assert got is not None
        chunk, sent, received, truncated = got
        assert (chunk, sent, len(received), truncated) == (b"message", -1, 1, False)
        os.write(w, b"x")
        assert os.read(received[0], 1) == b"x"  # a live duplicate of the pipe's end
        os.close(received[0])
        reader.setblocking(False)
        with pytest.raises(BlockingIOError):
            reader.recv(1)  # the exact path writes it, not the relay
    finally:
        os.close(r)
        os.close(w)


@needs_built
def test_a_closed_destination_says_minus_two(pairs: Pairs) -> None:
    assert relay is not None
    writer, src, dst, reader = pairs
    reader.close()
    writer.sendall(b"abc")
    assert relay(src.fileno(), dst.fileno(), False) == (b"abc", -2, [], False)


def test_pure_python_is_forced_by_the_environment() -> None:
    code = (
        "from pytest_runtimefaults.dbus import proxy; "
        "print(proxy._relay is None, proxy._loop_c is None, proxy.fast_path())"
    )
    env = {**os.environ, "RUNTIMEFAULTS_PURE_PYTHON": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True True pure Python (RUNTIMEFAULTS_PURE_PYTHON=1)", out.stderr


@needs_loop
def test_fast_path_names_the_compiled_loop() -> None:
    assert proxy.fast_path().startswith("compiled (")


class Loop:
    """An epoll set as the proxy's: two relayed directions, a wake-up pipe, a table."""

    def __init__(self, want_fds: bool = False) -> None:
        # client -> a (relayed to b) -> bus ; bus -> b (relayed to a) -> client
        self.client, self.a = socket.socketpair()
        self.b, self.bus = socket.socketpair()
        for s in (self.a, self.b):
            s.setblocking(False)
        self.wake_r, self.wake_w = os.pipe()
        self.ep = select.epoll()
        for fd in (self.a.fileno(), self.b.fileno(), self.wake_r):
            self.ep.register(fd, select.EPOLLIN)
        self.table = array.array("i", [-1]) * (max(self.a.fileno(), self.b.fileno()) + 1)
        self.table[self.a.fileno()] = self.b.fileno() << 2 | want_fds
        self.table[self.b.fileno()] = self.a.fileno() << 2 | want_fds
        self.members = b""
        self.gen = array.array("q", [0])
        self.stamp = array.array("q", [1])
        self.arena = bytearray(1 << 20)

    def run(self, limit: int = 1) -> tuple[int, list[tuple[float | None, int, bytes]], object]:
        assert loop is not None
        return loop(
            self.ep.fileno(),
            self.wake_r,
            self.table,
            self.gen,
            self.gen[0],
            limit,
            self.stamp,
            self.arena,
            self.members,
        )

    def close(self) -> None:
        self.ep.close()
        for s in (self.client, self.a, self.b, self.bus):
            s.close()
        os.close(self.wake_r)
        os.close(self.wake_w)


@pytest.fixture
def lp() -> Iterator[Loop]:
    it = Loop()
    yield it
    it.close()


@needs_loop
def test_loop_relays_both_ways_and_records_each_chunk(lp: Loop) -> None:
    lp.client.sendall(b"call")
    before = time.monotonic()
    reason, records, pending = lp.run(limit=1)
    assert (reason, pending) == (1, None)  # the limit: Python frames them
    [(t, fd, data)] = records
    assert (fd, data) == (lp.a.fileno(), b"call")
    assert t is not None
    assert before <= t <= time.monotonic()
    assert lp.bus.recv(100) == b"call"
    lp.bus.sendall(b"reply")
    reason, records, pending = lp.run(limit=1)
    assert (reason, [r[1:] for r in records], pending) == (1, [(lp.b.fileno(), b"reply")], None)
    assert lp.client.recv(100) == b"reply"


def _relay_big(lp: Loop, data: bytes) -> None:
    """Relay *data* (more than the arena holds) client -> bus through *lp*; check it."""
    lp.b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # so that it fills
    got = bytearray()

    def drain() -> None:
        while len(got) < len(data):
            got.extend(lp.bus.recv(1 << 20))
        # The loop holds its last records until it is woken (as the proxy's trace
        # reads do) or reaches its limit.
        os.write(lp.wake_w, b"x")

    sender = threading.Thread(target=lp.client.sendall, args=(data,))
    reader = threading.Thread(target=drain)
    sender.start()
    reader.start()
    read = bytearray()
    partial = 0
    while len(read) < len(data):
        reason, records, pending = lp.run(limit=64)
        read += b"".join(r[2] for r in records)
        if pending is None:
            assert reason == 1 or (reason == 0 and len(read) == len(data))
            continue
        # dst took part of it: the rest is Python's to queue (here: to write now).
        assert reason == 2
        _, chunk, sent, fds, truncated, _ = pending  # type: ignore[misc]
        assert 0 <= sent < len(chunk)
        assert (fds, truncated) == ([], False)
        read += chunk
        lp.b.setblocking(True)
        lp.b.sendall(chunk[sent:])
        lp.b.setblocking(False)
        partial += 1
    sender.join()
    reader.join(10)
    assert bytes(got) == data == bytes(read)
    assert partial  # the socket's buffer was full at least once: that path ran too


@needs_loop
def test_loop_big_chunks_go_through_byte_for_byte(lp: Loop) -> None:
    _relay_big(lp, bytes(range(256)) * 4096)  # 1 MiB


@needs_loop
def test_two_loops_at_once_share_no_buffer() -> None:
    # Each proxy has its loop thread, in C at once with the GIL released: a buffer
    # shared between them would mix their bytes.
    loops = [Loop(), Loop()]
    errors: list[BaseException] = []

    def run(lp: Loop, fill: int) -> None:
        try:
            _relay_big(lp, bytes([fill]) * (1 << 20) + bytes(range(256)) * 256)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(lp, i + 1)) for i, lp in enumerate(loops)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for lp in loops:
            lp.close()
    assert not errors, errors


@needs_loop
def test_loop_leaves_the_wake_up_and_fds_not_its_own_to_python(lp: Loop) -> None:
    os.write(lp.wake_w, b"x")
    lp.client.sendall(b"call")
    assert lp.run(limit=10) == (0, [], None)
    assert os.read(lp.wake_r, 10) == b"x"  # left in the pipe for Python
    # A direction Python handles (the handshake, a queue): left unread.
    lp.table[lp.a.fileno()] = -1
    assert lp.run(limit=10) == (0, [], None)
    assert lp.a.recv(100) == b"call"


@needs_loop
def test_loop_leaves_writable_events_to_python(lp: Loop) -> None:
    lp.ep.modify(lp.b.fileno(), select.EPOLLIN | select.EPOLLOUT)  # a queue waits for b
    assert lp.run(limit=10) == (0, [], None)


@needs_loop
def test_loop_comes_back_at_once_when_a_rule_came(lp: Loop) -> None:
    lp.client.sendall(b"call")
    assert loop is not None
    got = loop(
        lp.ep.fileno(), lp.wake_r, lp.table, lp.gen, lp.gen[0] - 1, 10, lp.stamp, lp.arena, b""
    )
    assert got == (0, [], None)
    assert lp.a.recv(100) == b"call"  # not read: the rule's path reads it


@needs_loop
def test_a_rule_added_while_it_waits_keeps_the_next_chunk_from_the_wire(lp: Loop) -> None:
    # The proxy bumps gen after the engine has the rule; a chunk read after that is
    # not written but handed back whole, for the exact path.
    for _ in range(5):
        lp.gen[0] += 1

        def add_rule_then_call() -> None:
            time.sleep(0.2)  # the loop is in epoll_wait by then (else: another try)
            lp.gen[0] += 1
            lp.client.sendall(b"call")

        caller = threading.Thread(target=add_rule_then_call)
        caller.start()
        reason, records, pending = lp.run(limit=10)
        caller.join()
        if reason == 0:  # the bump came before the loop waited: it read nothing
            assert lp.a.recv(100) == b"call"
            continue
        assert (reason, records) == (2, [])
        assert pending is not None
        fd, data, sent, fds, truncated, _ = pending  # type: ignore[misc]
        assert (fd, data, sent, fds, truncated) == (lp.a.fileno(), b"call", -1, [], False)
        lp.bus.setblocking(False)
        with pytest.raises(BlockingIOError):
            lp.bus.recv(100)
        return
    pytest.fail("the loop never waited within 0.2 s in 5 tries")


@needs_loop
def test_loop_hands_back_fds_end_of_stream_and_a_full_destination() -> None:
    lp = Loop(want_fds=True)
    r, w = os.pipe()
    try:
        lp.client.sendmsg(
            [b"with fd"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())]
        )
        reason, records, pending = lp.run(limit=10)
        assert (reason, records) == (2, [])
        fd, data, sent, fds, truncated, t = pending  # type: ignore[misc]
        assert (fd, data, sent, len(fds), truncated) == (lp.a.fileno(), b"with fd", -1, 1, False)
        assert t is not None
        os.close(fds[0])
        # dst full: what it took is said, the rest is Python's to queue.
        lp.a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        while True:
            try:
                lp.a.send(b"x" * 65536)
            except BlockingIOError:
                break
        lp.bus.sendall(b"reply")
        reason, records, pending = lp.run(limit=10)
        assert (reason, records) == (2, [])
        fd, data, sent, fds, truncated, t = pending  # type: ignore[misc]
        assert (fd, data, sent, fds) == (lp.b.fileno(), b"reply", 0, [])
        lp.bus.shutdown(socket.SHUT_WR)
        reason, records, pending = lp.run(limit=10)
        assert (reason, records) == (2, [])
        assert pending[1:5] == (b"", -1, [], False)  # type: ignore[index]
    finally:
        lp.close()
        os.close(r)
        os.close(w)


@needs_loop
def test_loop_reads_the_trace_flag_at_each_read(lp: Loop) -> None:
    lp.stamp[0] = 0
    lp.client.sendall(b"untraced")
    reason, records, pending = lp.run(limit=1)
    assert (reason, records, pending) == (1, [(None, lp.a.fileno(), b"untraced")], None)


def _split(data: bytes, chunk: int) -> tuple[list[tuple[bytes, str, int, int]], int, str]:
    """Feed *data* to a Framer *chunk* bytes at a time: messages, what waits, the error."""
    framer = wire.Framer()
    got: list[tuple[bytes, str, int, int]] = []
    error = ""
    try:
        for i in range(0, len(data), chunk):
            for m in framer.feed(data[i : i + chunk]):
                got.append((m.raw, m._e, m.type, m.serial))
                assert m.member == "GetId" or m.type != 1  # fields parse from what it set
    except wire.WireError as exc:
        error = str(exc)
    return got, framer.pending, error


def _header(endian: int, kind: int, version: int, body: int, serial: int, fields: int) -> bytes:
    order = "<" if endian == 0x6C else ">"
    return bytes((endian, kind, 0, version)) + struct.pack(order + "III", body, serial, fields)


@needs_frame
@pytest.mark.parametrize("chunk", [1, 7, 16, 128, 1000, 1 << 20])
@pytest.mark.parametrize(
    ("tail", "bad"),
    [
        (b"", False),
        (_header(0x6C, 1, 1, 0, 9, 0)[:10], False),  # a piece of a fixed header
        (_header(0x6C, 1, 1, 100, 9, 0), False),  # a header whose body is still to come
        (_header(0x00, 1, 1, 0, 9, 0), True),  # bad endianness
        (_header(0x6C, 1, 2, 0, 9, 0), True),  # version 2
        (_header(0x6C, 0, 1, 0, 9, 0), True),  # type INVALID
        (_header(0x6C, 1, 1, 0, 0, 0), True),  # serial 0
        (_header(0x6C, 1, 1, 0, 9, 2**26 + 1), True),  # header fields over 64 MiB
        (_header(0x42, 1, 1, 2**27, 9, 0), True),  # a message over 128 MiB
    ],
)
def test_compiled_split_is_the_python_split(
    monkeypatch: pytest.MonkeyPatch, chunk: int, tail: bytes, bad: bool
) -> None:
    address = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")
    call = new_method_call(address, "GetId")
    big = new_method_call(address, "GetId", "s", ("x" * 5000,))
    big_endian = new_method_call(address, "GetId")
    big_endian.header.endianness = Endianness.big
    data = b"".join(
        [
            call.serialise(serial=1),
            big.serialise(serial=2),
            big_endian.serialise(serial=3),
            *(call.serialise(serial=4 + i) for i in range(20)),
            tail,
        ]
    )
    compiled = _split(data, chunk)
    monkeypatch.setattr(wire, "_frame_c", None)
    assert compiled == _split(data, chunk)
    assert bool(compiled[2]) == bad
    if not bad:
        assert len(compiled[0]) == 23
        assert compiled[1] == len(tail)


@pytest.mark.parametrize("pure", [False, True])
def test_doctor_says_which_relay_path_is_active(pure: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RUNTIMEFAULTS_PURE_PYTHON"}
    if pure:
        env["RUNTIMEFAULTS_PURE_PYTHON"] = "1"
    elif loop is None:
        pytest.skip("the compiled relay loop is not built")
    out = subprocess.run(
        [sys.executable, "-m", "pytest_runtimefaults", "doctor"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    [line] = [x for x in out.stdout.splitlines() if " dbus relay " in x]
    want = "pure Python (RUNTIMEFAULTS_PURE_PYTHON=1)" if pure else "compiled (pytest_runtimefaults"
    assert line.startswith("info")
    assert want in line


def _calls(*members: str) -> bytes:
    address = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")
    return b"".join(
        new_method_call(address, m).serialise(serial=i + 1) for i, m in enumerate(members)
    )


@needs_loop
@pytest.mark.parametrize(
    "chunk",
    [
        _calls("GetId"),
        _calls("GetId", "ListNames", "GetId"),
        _calls("Watched"),  # a member the rules name
        _calls("GetId", "Watched"),
        _calls("WatchedNot"),  # a longer name that starts with one: not theirs
        _calls("GetId")[:-1],  # not whole
        _calls("GetId") + _calls("GetId")[:20],
        _calls("GetId", "Hello")[: len(_calls("GetId")) + 3],
        b"\x00" * 16,  # no endianness byte
    ],
)
def test_loop_with_rules_relays_only_whole_messages_no_rule_names(chunk: bytes) -> None:
    # The C check must say what wire.whole_messages_without says for the same rules.
    lp = Loop()
    try:
        members = [b"Watched", b"Other"]
        lp.members = b"".join(m + b"\0" for m in members)
        lp.table[lp.a.fileno()] |= 2
        lp.client.sendall(chunk)
        reason, records, pending = lp.run(limit=1)
        expected = wire.whole_messages_without(chunk, wire.member_pattern(members))
        if expected:
            assert (reason, [r[2] for r in records], pending) == (1, [chunk], None)
            assert lp.bus.recv(1 << 16) == chunk
        else:
            assert (reason, records) == (2, [])
            assert pending is not None
            assert pending[1:4] == (chunk, -1, [])  # unwritten: the exact path's
            lp.bus.setblocking(False)
            with pytest.raises(BlockingIOError):
                lp.bus.recv(100)
    finally:
        lp.close()
