"""A sans-I/O relay of the D-Bus SASL handshake, for a proxy that stays transparent.

The proxy does not authenticate on its own behalf: it forwards the client's
handshake to the bus byte for byte, and only needs to know *where the
handshake ends* in each direction, so that the bytes after it are framed as
D-Bus messages.  The rules (D-Bus specification, "Authentication protocol"):

* the client first sends one NUL byte (the credentials byte), then
  ``\\r\\n``-terminated commands: ``AUTH [mechanism [initial-response]]``,
  ``DATA``, ``CANCEL``, ``ERROR``, ``NEGOTIATE_UNIX_FD`` and ``BEGIN``;
* the server answers **every** client command but ``BEGIN`` with exactly one
  line (``OK``, ``REJECTED``, ``DATA``, ``ERROR``, ``AGREE_UNIX_FD``);
* after ``BEGIN`` the client's stream is binary; the server's stream is binary
  once it has answered every command sent before ``BEGIN``.

Clients that pipeline (sd-bus sends ``AUTH``, ``NEGOTIATE_UNIX_FD``, ``BEGIN``
and its ``Hello`` call in one write) are handled, since the split is by count
and not by timing.  The proxy authenticates to the bus with its own socket
credentials; ``EXTERNAL`` therefore works for clients of the proxy's own uid.

Example::

    relay = SaslRelay()
    auth, binary = relay.client_data(b"\\0AUTH EXTERNAL 30\\r\\nBEGIN\\r\\n")
"""

from __future__ import annotations

import threading

__all__ = ["AuthError", "SaslRelay"]

MAX_LINE = 16384  # far above any real SASL line; a runaway peer is not buffered forever
CLIENT_COMMANDS = frozenset({b"AUTH", b"DATA", b"CANCEL", b"ERROR", b"NEGOTIATE_UNIX_FD", b"BEGIN"})
SERVER_COMMANDS = frozenset({b"OK", b"REJECTED", b"DATA", b"ERROR", b"AGREE_UNIX_FD"})


class AuthError(ValueError):
    """A handshake that breaks the protocol; the message says which side and how."""


class SaslRelay:
    """Tracks both directions of one connection's handshake (thread-safe).

    ``client_data`` and ``server_data`` each return ``(handshake, binary)``: the
    bytes to forward as they are, and the bytes after the end of the handshake
    in that direction (to be framed as messages).  Once a direction is done,
    everything it is given is returned as binary.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client_line = bytearray()
        self._server_line = bytearray()
        self._nul_seen = False
        self._awaiting_replies = 0
        self.client_done = False
        self.server_done = False
        self.unix_fds_agreed = False
        self.authenticated = False
        self.mechanisms: list[str] = []

    def client_data(self, data: bytes) -> tuple[bytes, bytes]:
        if self.client_done:
            return b"", data
        pos = 0
        if not self._nul_seen and data:
            if data[0] != 0:
                raise AuthError(
                    f"client did not start with the NUL credentials byte (got {data[:1]!r})"
                )
            self._nul_seen = True
            pos = 1
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end < 0:
                self._client_line += data[pos:]
                self._check_length(self._client_line, "client")
                return data, b""
            line = bytes(self._client_line) + data[pos:end]
            self._client_line.clear()
            pos = end + 1
            command = self._command(line, "client", CLIENT_COMMANDS)
            if command == b"BEGIN":
                with self._lock:
                    self.client_done = True
                    if self._awaiting_replies == 0:
                        self.server_done = True
                return data[:pos], data[pos:]
            if command == b"AUTH":
                words = line.split()
                if len(words) > 1:
                    self.mechanisms.append(words[1].decode("ascii", "replace"))
            with self._lock:
                self._awaiting_replies += 1
        return data, b""

    def server_data(self, data: bytes) -> tuple[bytes, bytes]:
        if self.server_done:
            return b"", data
        pos = 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end < 0:
                self._server_line += data[pos:]
                self._check_length(self._server_line, "server")
                return data, b""
            line = bytes(self._server_line) + data[pos:end]
            self._server_line.clear()
            pos = end + 1
            command = self._command(line, "server", SERVER_COMMANDS)
            if command == b"AGREE_UNIX_FD":
                self.unix_fds_agreed = True
            elif command == b"OK":
                self.authenticated = True
            with self._lock:
                self._awaiting_replies -= 1
                if self._awaiting_replies < 0:
                    raise AuthError(f"server sent {line!r} with no client command to answer")
                if self._awaiting_replies == 0 and self.client_done:
                    self.server_done = True
                    return data[:pos], data[pos:]
        return data, b""

    @staticmethod
    def _command(line: bytes, side: str, known: frozenset[bytes]) -> bytes:
        if not line.endswith(b"\r"):
            raise AuthError(f"{side} SASL line {line[:80]!r} does not end with \\r\\n")
        words = line[:-1].split(b" ", 1)
        command = words[0]
        if command not in known:
            # The spec lets a server answer unknown commands with ERROR; a proxy just
            # passes them on, but they still expect a reply.
            return command
        return command

    @staticmethod
    def _check_length(buf: bytearray, side: str) -> None:
        if len(buf) > MAX_LINE:
            raise AuthError(f"{side} SASL line longer than {MAX_LINE} bytes: not D-Bus")
