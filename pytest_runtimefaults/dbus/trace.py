"""The proxy's record of every message it relayed, and of every fault it applied.

Recording must cost almost nothing on the relay's hot path, so an entry keeps
the :class:`~pytest_runtimefaults.dbus.wire.Message` itself and decodes header
fields only when someone reads them (a failing test's report, a rule's test,
the pcap writer).

Example::

    for entry in proxy.trace.entries():
        print(entry.direction, entry.type, entry.serial, entry.member, entry.fault)
"""

from __future__ import annotations

import array
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

from pytest_runtimefaults.core.log import logger
from pytest_runtimefaults.dbus.wire import Message, WireError

__all__ = ["TO_BUS", "TO_CLIENT", "Trace", "TraceEntry", "write_pcap"]

TO_BUS = "to_bus"  # from the client, towards the bus
TO_CLIENT = "to_client"  # from the bus, towards the client
LINKTYPE_DBUS = 231
_now = time.monotonic
# Wall-clock time of an entry = its monotonic time + this offset (one clock read per message).
_WALL_OFFSET = time.time() - time.monotonic()


class TraceEntry:
    """One message seen (or one fault applied) by the proxy."""

    __slots__ = ("conn", "direction", "fault", "message", "monotonic", "wall")

    def __init__(
        self,
        conn: int,
        direction: str,
        message: Message | None,
        fault: str | None = None,
        monotonic: float | None = None,
    ) -> None:
        self.monotonic = time.monotonic() if monotonic is None else monotonic
        self.wall = self.monotonic + _WALL_OFFSET
        self.conn = conn
        self.direction = direction
        self.message = message
        self.fault = fault

    def _get(self, name: str) -> object:
        """A header field of the message, or None if absent or malformed.

        A trace holds what peers sent, hostile bytes included; reading it (a
        failing test's report) must never raise, so a malformed header reads as
        absent (:attr:`problem` says why).
        """
        if self.message is None:
            return None
        try:
            return getattr(self.message, name)
        except WireError:
            return None
        except Exception:  # a bug of the codec: still never break a report
            logger.debug("trace: reading %s of %r failed", name, self.message, exc_info=True)
            return None

    @property
    def problem(self) -> str | None:
        """Why the message's header fields cannot be read (None when they can)."""
        if self.message is None:
            return None
        try:
            _ = self.message.fields
        except Exception as exc:  # WireError, or a bug of the codec: said, not raised
            return str(exc)
        return None

    type = property(lambda self: self.message.type_name if self.message else None)
    serial = property(lambda self: self.message.serial if self.message else None)
    size = property(lambda self: self.message.size if self.message else 0)
    reply_serial = property(lambda self: self._get("reply_serial"))
    path = property(lambda self: self._get("path"))
    interface = property(lambda self: self._get("interface"))
    member = property(lambda self: self._get("member"))
    error_name = property(lambda self: self._get("error_name"))
    sender = property(lambda self: self._get("sender"))
    destination = property(lambda self: self._get("destination"))

    def as_dict(self) -> dict[str, object]:
        return {
            "time": self.wall,
            "conn": self.conn,
            "direction": self.direction,
            "type": self.type,
            "serial": self.serial,
            "reply_serial": self.reply_serial,
            "path": self.path,
            "interface": self.interface,
            "member": self.member,
            "error_name": self.error_name,
            "sender": self.sender,
            "destination": self.destination,
            "size": self.size,
            "fault": self.fault,
        }

    def format(self, t0: float = 0.0) -> str:
        arrow = "->bus" if self.direction == TO_BUS else "<-bus"
        if self.message is None:
            return f"{self.monotonic - t0:9.4f} #{self.conn} {arrow} FAULT {self.fault}"
        what = ".".join(x for x in (self.interface, self.member) if x) or self.error_name or ""
        extra = f" reply_serial={self.reply_serial}" if self.reply_serial is not None else ""
        fault = f"  [fault: {self.fault}]" if self.fault else ""
        problem = self.problem
        bad = f"  [malformed: {problem}]" if problem else ""
        line = (
            f"{self.monotonic - t0:9.4f} #{self.conn} {arrow} {self.type} "
            f"serial={self.serial}{extra} {what} "
            f"{self.sender or ''}->{self.destination or ''} {self.size}B{fault}{bad}"
        )
        # Names come from peers: no control character may reach a terminal or a report.
        return line if line.isprintable() else _printable(line)


def _printable(text: str) -> str:
    """*text* with every non-printable character escaped (as ``repr`` does)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Trace:
    """A bounded, thread-safe log of :class:`TraceEntry` (oldest dropped first)."""

    def __init__(self, maxlen: int | None = 100_000) -> None:
        self._entries: deque[tuple[float, int, str, Message | None, str | None]] = deque(
            maxlen=maxlen
        )
        self._lock = threading.Lock()
        self.started = time.monotonic()
        #: ``enabled`` as one int the proxy's compiled loop reads before each read
        #: (another thread may switch the trace off while it relays)
        self.flag = array.array("q", [1])
        #: called before every read: the proxy frames there what it relayed unframed
        self.settle: Callable[[], None] | None = None

    @property
    def enabled(self) -> bool:
        """Whether messages are recorded (switch it off to stop recording)."""
        return bool(self.flag[0])

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.flag[0] = 1 if value else 0

    def record(
        self, conn: int, direction: str, message: Message | None, fault: str | None = None
    ) -> None:
        # A tuple now, a TraceEntry when read: recording is on the relay's path.
        if self.enabled:
            self._entries.append((_now(), conn, direction, message, fault))  # atomic (GIL)

    def append(self, monotonic: float, conn: int, direction: str, message: Message) -> None:
        """Record *message* relayed at *monotonic* (the proxy's deferred framing)."""
        self._entries.append((monotonic, conn, direction, message, None))

    def extend(self, monotonic: float, conn: int, direction: str, messages: list[Message]) -> None:
        """Record *messages* relayed together at *monotonic* (one chunk framed late)."""
        self._entries.extend([(monotonic, conn, direction, m, None) for m in messages])

    def entries(self) -> list[TraceEntry]:
        if self.settle is not None:
            self.settle()
        with self._lock:
            raw = list(self._entries)
        return [TraceEntry(c, d, m, f, t) for t, c, d, m, f in raw]

    def messages(self, direction: str | None = None) -> list[TraceEntry]:
        return [
            e
            for e in self.entries()
            if e.message is not None and (direction is None or e.direction == direction)
        ]

    def faults(self) -> list[TraceEntry]:
        return [e for e in self.entries() if e.fault]

    def clear(self) -> None:
        if self.settle is not None:
            self.settle()
        self._entries.clear()

    def tail(self, n: int = 40) -> str:
        entries = self.entries()[-n:]
        return "\n".join(e.format(self.started) for e in entries)

    def __iter__(self) -> Iterator[TraceEntry]:
        return iter(self.entries())

    def __len__(self) -> int:
        if self.settle is not None:
            self.settle()
        return len(self._entries)

    def write_pcap(self, path: str | Path) -> int:
        return write_pcap(path, self.entries())


def write_pcap(path: str | Path, entries: list[TraceEntry]) -> int:
    """Write the messages of *entries* as a pcap file (LINKTYPE_DBUS); return the count.

    Each record is one whole D-Bus message, as ``tshark -r FILE`` decodes them.
    """
    count = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 2**27, LINKTYPE_DBUS))
        for entry in entries:
            if entry.message is None:
                continue
            raw = entry.message.raw
            sec = int(entry.wall)
            usec = int((entry.wall - sec) * 1_000_000)
            f.write(struct.pack("<IIII", sec, usec, len(raw), len(raw)))
            f.write(raw)
            count += 1
    return count
