"""Helper for bench_dbus_proxy.py's throughput mode: keep M calls in flight on ADDRESS.

``_dbus_loadclient.py PATH T0 T1 INFLIGHT [fds]``: connects to the Unix socket
PATH, authenticates (negotiating fd passing with ``fds``), says Hello, then
keeps INFLIGHT ``org.freedesktop.DBus.GetId`` calls in flight until the
CLOCK_MONOTONIC time T1 (the same clock in every process), and prints the
replies received between T0 and T1.

Cheap on purpose, so the proxy and not the client is measured: once one reply
is seen, every reply on this connection has its size (same destination, same
32-character body), so replies are counted by bytes, never parsed, and every
call is the same bytes (same serial: neither bus nor proxy asks for unique ones).
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time

from jeepney import DBusAddress, new_method_call

BUS = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")
METHOD_RETURN, ERROR = 2, 3


def _line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise RuntimeError("the peer closed during the handshake")
        data += chunk
    return data


def _messages(buf: bytearray) -> list[tuple[int, int]]:
    """(type, size) of each whole message at the start of *buf*, consumed from it."""
    out = []
    while len(buf) >= 16:
        fmt = "<" if buf[0:1] == b"l" else ">"
        body, _serial, fields = struct.unpack_from(fmt + "III", buf, 4)
        total = 16 + (fields + 7) // 8 * 8 + body
        if len(buf) < total:
            break
        out.append((buf[1], total))
        del buf[:total]
    return out


def main() -> None:
    path, t0, t1, inflight = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    fds = sys.argv[5:] == ["fds"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
    if not _line(sock).startswith(b"OK "):
        raise RuntimeError("authentication refused")
    if fds:
        sock.sendall(b"NEGOTIATE_UNIX_FD\r\n")
        if not _line(sock).startswith(b"AGREE_UNIX_FD"):
            raise RuntimeError("fd passing refused")
    sock.sendall(b"BEGIN\r\n")
    hello = new_method_call(BUS, "Hello").serialise(serial=1)
    call = new_method_call(BUS, "GetId").serialise(serial=2)
    sock.sendall(hello + call)
    buf = bytearray()
    returns: list[int] = []
    while len(returns) < 2:  # Hello's reply (NameAcquired may follow it), then GetId's
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the peer closed after the handshake")
        buf += chunk
        for kind, size in _messages(buf):
            if kind == ERROR:
                raise RuntimeError("the peer answered with an error")
            if kind == METHOD_RETURN:
                returns.append(size)
    if buf:
        raise RuntimeError("unexpected bytes after the first reply")
    size = returns[1]
    batches: dict[int, bytes] = {}
    sock.sendall(call * inflight)
    got = done = counted_from = 0
    recv_into = sock.recv_into
    area = bytearray(1 << 20)
    monotonic = time.monotonic
    started = False
    while True:
        n = recv_into(area)
        if not n:
            raise RuntimeError("the peer closed mid-run")
        got += n
        now = monotonic()
        if not started and now >= t0:
            started, counted_from = True, got // size
        if now >= t1:
            break
        new = got // size - done
        if new:
            done += new
            blob = batches.get(new)
            if blob is None:
                blob = batches[new] = call * new
            sock.sendall(blob)
    sock.close()
    print(got // size - counted_from if started else 0)


if __name__ == "__main__":
    main()
