"""Test-only D-Bus clients that reproduce documented buggy behaviours.

They exist to prove that a fault catches its bug class: each must pass with no
fault and fail under the fault that reproduces its incident, while a correct
client (jeepney, which frames properly and matches ``reply_serial``) passes.

* :class:`YoukiLikeClient`: youki's own D-Bus client before PR 2838 (youki issues
  2826/2559): after a call it reads the socket once, framing by reading 128-byte
  chunks until a short read, and takes the first METHOD_RETURN in what it read,
  whatever its reply_serial.  Its error is youki's:
  ``expected to get a reply for method call, didn't get any``.
* :class:`SignedSerialClient`: keeps message serials in a signed 32-bit integer
  and rejects what it cannot represent, as a client with an ``int32`` serial
  field does once serials pass 0x7fffffff (incident 2).
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

from jeepney import DBusAddress, new_method_call
from jeepney.low_level import Message, MessageType, Parser

HELLO = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")


class NoReply(Exception):
    pass


class _RawClient:
    def __init__(self, address: str, timeout: float | None = 5.0) -> None:
        path = address.split("path=", 1)[1].split(",", 1)[0]
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        uid = str(os.geteuid()).encode().hex().encode()
        self.sock.sendall(b"\0AUTH EXTERNAL " + uid + b"\r\n")
        line = self.sock.recv(4096)
        if not line.startswith(b"OK"):
            raise ConnectionError(f"auth failed: {line!r}")
        self.sock.sendall(b"BEGIN\r\n")
        self.serial = 0

    def send(self, msg: Message) -> int:
        self.serial += 1
        self.sock.sendall(msg.serialise(serial=self.serial))
        return self.serial

    def close(self) -> None:
        self.sock.close()


class YoukiLikeClient(_RawClient):
    """One read after each call, 128-byte chunks until a short read, first METHOD_RETURN."""

    def __init__(self, address: str, timeout: float | None = 5.0) -> None:
        super().__init__(address, timeout)
        self.call(new_method_call(HELLO, "Hello"))
        # Drain NameAcquired, which dbus-daemon may send in a later write than the Hello
        # reply: a harness detail so that the no-fault case is deterministic.
        self.sock.settimeout(0.05)
        try:
            while self.sock.recv(4096):
                pass
        except (TimeoutError, BlockingIOError):
            pass
        self.sock.settimeout(timeout)

    def _read_once(self) -> bytes:
        data = b""
        while True:
            chunk = self.sock.recv(128)
            data += chunk
            if len(chunk) < 128:
                return data

    def call(self, msg: Message) -> tuple[Any, ...]:
        self.send(msg)
        parser = Parser()
        parser.add_data(self._read_once())
        while True:
            try:
                reply = parser.get_next_message()
            except Exception:
                reply = None
            if reply is None:
                raise NoReply(
                    "dbus function call error: expected to get a reply for method "
                    "call, didn't get any"
                )
            if reply.header.message_type == MessageType.method_return:
                return tuple(reply.body)


class SignedSerialClient(_RawClient):
    """Reads replies properly, but stores serials in a signed 32-bit integer."""

    def call(self, msg: Message) -> tuple[Any, ...]:
        serial = self.send(msg)
        parser = Parser()
        while True:
            reply = parser.get_next_message()
            if reply is None:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("connection closed")
                parser.add_data(chunk)
                continue
            raw_serial = reply.header.serial
            (signed,) = struct.unpack("<i", struct.pack("<I", raw_serial))
            if signed <= 0:
                raise ValueError(f"invalid message serial {signed}: serials must be positive")
            rs = reply.header.fields.get(5)
            if reply.header.message_type == MessageType.method_return and rs == serial:
                return tuple(reply.body)
