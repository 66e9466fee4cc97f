"""The compiled fused read-and-relay (pytest_runtimefaults/dbus/_fastpath.c) on real sockets.

Skipped where the build could not compile it; the proxy then runs its
pure-Python path, which every other D-Bus test covers (and which
RUNTIMEFAULTS_PURE_PYTHON=1 forces where it is built).
"""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pytest_runtimefaults.dbus import proxy

relay = proxy._compiled_relay()
Pairs = tuple[socket.socket, socket.socket, socket.socket, socket.socket]
needs_built = pytest.mark.skipif(relay is None, reason="the compiled fast path is not built")


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
    code = "from pytest_runtimefaults.dbus import proxy; print(proxy._relay is None)"
    env = {**os.environ, "RUNTIMEFAULTS_PURE_PYTHON": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr
