"""A subscription over a Unix socket that carries one event per line.

The client connects, writes *hello*, waits for a line starting with *ack*
(the server's word that the subscription is registered), then reads events,
one per line.  Used for the test-only broadcaster, and for any home-grown
daemon with such a protocol.

Example::

    transport = UnixLineTransport("/run/x/events.sock", hello=b"SUBSCRIBE\\n", ack=b"OK")
    sub = transport.subscribe()
    print(sub.receive(1.0))
    sub.cancel()
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from pytest_runtimefaults.core.log import swallowed
from pytest_runtimefaults.subscribers import (
    Event,
    Subscription,
    SubscriptionError,
    ThreadedSubscription,
)

__all__ = ["UnixLineTransport", "parse_word_line"]


def parse_word_line(line: bytes) -> Event | None:
    """``b"EV 17 /topic rest"`` -> ``Event(key="17", topic="/topic")``; other lines: None."""
    parts = line.decode(errors="replace").split(" ", 3)
    if len(parts) < 3 or parts[0] != "EV":
        return None
    return Event(key=parts[1], topic=parts[2], data=parts[3] if len(parts) > 3 else "")


class UnixLineTransport:
    """Subscribe by connecting to a Unix stream socket (see module doc)."""

    def __init__(
        self,
        path: str,
        *,
        hello: bytes = b"",
        ack: bytes | None = None,
        parse: Callable[[bytes], Event | None] = parse_word_line,
        connect_timeout: float = 5.0,
        name: str = "unixline",
    ) -> None:
        self.path = path
        self.hello = hello
        self.ack = ack
        self.parse = parse
        self.connect_timeout = connect_timeout
        self.name = name

    def subscribe(self) -> Subscription:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        rest = b""
        try:
            sock.settimeout(self.connect_timeout)
            sock.connect(self.path)
            if self.hello:
                sock.sendall(self.hello)
            if self.ack is not None:
                while b"\n" not in rest:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise SubscriptionError(f"{self.path}: closed before acknowledging")
                    rest += chunk
                line, rest = rest.split(b"\n", 1)
                if not line.startswith(self.ack):
                    raise SubscriptionError(f"{self.path}: refused: {line[:200]!r}")
            sock.settimeout(None)
        except OSError as exc:
            sock.close()
            raise SubscriptionError(f"cannot subscribe at {self.path}: {exc}") from exc
        except BaseException:
            sock.close()
            raise

        def pump(put: Callable[[Event], None], cancelled: Callable[[], bool]) -> None:
            buf = rest
            try:
                while True:
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        ev = self.parse(line)
                        if ev is not None:
                            put(ev)
                    try:
                        chunk = sock.recv(65536)
                    except OSError as exc:
                        if cancelled():
                            return
                        raise SubscriptionError(f"{self.path}: {exc}") from exc
                    if not chunk:
                        if cancelled():
                            return
                        raise SubscriptionError(f"{self.path}: the daemon closed the stream")
                    buf += chunk
            finally:
                sock.close()

        def cancel() -> None:
            # shutdown() wakes the reader blocked in recv(); close() alone does not.
            with swallowed(OSError, "shutting down %s", self.name):
                sock.shutdown(socket.SHUT_RDWR)

        return ThreadedSubscription(pump, on_cancel=cancel, name=f"{self.name}-reader")
