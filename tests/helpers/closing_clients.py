"""Test-only D-Bus clients that deliver signals into a bounded channel, and then close.

The bug class of godbus issues 94 and 158, in Python.  Each client reads its
connection on a reader thread and delivers every matched signal into a
:class:`Channel` (a Go channel: bounded, ``send`` blocks while it is full,
sending on a closed one is an error, and a sender blocked when it closes fails
too, as Go panics).  The program stops consuming when it decides to close.

* ``SusceptibleClient(mode="deadlock")``: godbus before PR 105.  The reader
  holds the handler's lock while it sends; ``close()`` takes that lock to shut
  the channel.  With the channel full, the reader never lets go: ``close()``
  waits for ever (the test's timeout says "deadlock").
* ``SusceptibleClient(mode="panic")``: godbus before PR 161.  With the channel
  full, the reader hands each signal to a delivery thread of its own (godbus:
  ``go func() { ch <- signal }()``) and reads on; ``close()`` removes the
  channel from the handler, then closes it, while those threads still send:
  each fails with ``send on closed channel``.
* ``CorrectClient``: after the fixes.  ``close()`` first sets a close event
  that every pending send selects on (they give up), waits for the delivery
  threads and the reader, then closes the channel.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from jeepney import MatchRule, MessageType
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import DBusConnection, open_dbus_connection
from jeepney.low_level import Message as JMessage

NO_REPLY_EXPECTED = 1


class ChannelClosed(RuntimeError):
    """What Go panics with: a send on a closed channel."""


class Channel:
    """A bounded Go-like channel of signals.

    ``send(item, cancel=event)`` is Go's ``select { case ch <- item: case <-cancel: }``:
    it returns False, delivering nothing, once *cancel* is set.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: list[Any] = []
        self.closed = False
        self.blocked = 0  # senders waiting for room now
        self._cond = threading.Condition()

    def send(self, item: Any, cancel: threading.Event | None = None) -> bool:
        with self._cond:
            while True:
                if self.closed:
                    raise ChannelClosed("send on closed channel")
                if cancel is not None and cancel.is_set():
                    return False
                if len(self.items) < self.capacity:
                    self.items.append(item)
                    self._cond.notify_all()
                    return True
                self.blocked += 1
                try:
                    self._cond.wait(0.05)  # a cancel event has no way to notify us
                finally:
                    self.blocked -= 1

    def close(self) -> None:
        with self._cond:
            if self.closed:
                raise ChannelClosed("close of closed channel")
            self.closed = True
            self._cond.notify_all()

    def full(self) -> bool:
        with self._cond:
            return len(self.items) >= self.capacity


class _Client:
    """Connects, subscribes to *match*, then reads on a thread of its own."""

    def __init__(self, address: str, match: MatchRule, capacity: int = 16) -> None:
        self.conn: DBusConnection = open_dbus_connection(address)
        self.match = match
        self.conn.send_and_get_reply(message_bus.AddMatch(match), timeout=10)
        self.channel = Channel(capacity)
        self.lock = threading.RLock()
        self.subscribed = True  # the handler still delivers to the channel
        self.errors: list[BaseException] = []  # what a Go program would have died of
        self.received = 0
        self.closing = threading.Event()
        self._delivery: list[threading.Thread] = []
        self._gone = False  # the socket is being shut: the reader must end
        self._reader = threading.Thread(target=self._read, name="rf-test-reader", daemon=True)
        self._reader.start()

    @property
    def unique_name(self) -> str:
        return str(self.conn.unique_name)

    def _read(self) -> None:
        try:
            while not self._gone:
                try:
                    msg = self.conn.receive(timeout=0.1)
                except TimeoutError:
                    continue
                except (OSError, EOFError, ValueError):
                    return  # the connection closed under us (close() shut it)
                if msg.header.message_type == MessageType.signal:
                    self.received += 1
                    self.deliver(msg)
        except BaseException as exc:
            self.errors.append(exc)

    def deliver(self, msg: JMessage) -> None:
        raise NotImplementedError

    def unsubscribe(self) -> None:
        """Tell the bus it wants no more of them (RemoveMatch, no reply awaited): closing."""
        msg = message_bus.RemoveMatch(self.match)
        msg.header.flags |= NO_REPLY_EXPECTED
        self.conn.send(msg)

    def delivering(self) -> bool:
        """Whether signals are still on their way into the full channel."""
        alive = any(t.is_alive() for t in self._delivery)
        return self.channel.blocked > 0 or alive

    def wait_delivering(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.delivering() and self.channel.full():
                return True
            time.sleep(0.01)
        return False

    def _shut_socket(self) -> None:
        """Shut the socket, let the reader see it (unless it is stuck delivering), close."""
        self._gone = True
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if threading.current_thread() is not self._reader:
            self._reader.join(1)
        self.conn.close()

    def close(self) -> None:
        raise NotImplementedError

    def close_within(self, seconds: float) -> bool:
        """Run close() on a thread; False if it had not returned after *seconds* (a deadlock)."""
        thread = threading.Thread(target=self._close_noting, name="rf-test-close", daemon=True)
        thread.start()
        thread.join(seconds)
        return not thread.is_alive()

    def _close_noting(self) -> None:
        try:
            self.close()
        except BaseException as exc:
            self.errors.append(exc)

    def settle(self, seconds: float = 2.0) -> None:
        """Let the delivery threads end (they fail or give up) before the errors are read."""
        deadline = time.monotonic() + seconds
        for t in list(self._delivery):
            t.join(max(0.0, deadline - time.monotonic()))

    def abandon(self) -> None:
        """After a deadlock: free the threads the test left stuck (cancel, shut the socket)."""
        self.closing.set()
        self._shut_socket()


class SusceptibleClient(_Client):
    """godbus before PR 105 (``mode="deadlock"``) or before PR 161 (``mode="panic"``)."""

    def __init__(self, address: str, match: MatchRule, *, mode: str, capacity: int = 16) -> None:
        if mode not in ("deadlock", "panic"):
            raise ValueError(f"mode {mode!r}: use 'deadlock' or 'panic'")
        self.mode = mode
        super().__init__(address, match, capacity)

    def deliver(self, msg: JMessage) -> None:
        if self.mode == "deadlock":
            with self.lock:  # held while the send blocks on a full channel
                if self.subscribed:
                    self.channel.send(msg, cancel=self.closing)
            return
        with self.lock:
            if not self.subscribed:
                return
            if not self.channel.full():
                self.channel.send(msg)
                return
            # full: hand it to a thread of its own and read on (godbus's goroutine)
            t = threading.Thread(target=self._send_later, args=(msg,), daemon=True)
            self._delivery.append(t)
            t.start()

    def _send_later(self, msg: JMessage) -> None:
        try:
            self.channel.send(msg)
        except ChannelClosed as exc:
            self.errors.append(exc)

    def close(self) -> None:
        with self.lock:  # RemoveSignal: the handler forgets the channel
            self.subscribed = False
        self.channel.close()  # the program's own channel: safe, it thinks
        self._shut_socket()


class CorrectClient(_Client):
    """After godbus PRs 105 and 161: pending sends select on a close event."""

    def deliver(self, msg: JMessage) -> None:
        with self.lock:
            if not self.subscribed:
                return
            if not self.channel.full():
                self.channel.send(msg, cancel=self.closing)
                return
            t = threading.Thread(
                target=self.channel.send, args=(msg,), kwargs={"cancel": self.closing}, daemon=True
            )
            self._delivery.append(t)
            t.start()

    def close(self) -> None:
        self.closing.set()  # every pending send gives up
        with self.lock:
            self.subscribed = False
        for t in list(self._delivery):
            t.join(5)
        self._shut_socket()
        self._reader.join(5)
        self.channel.close()


def event_match(interface: str, member: str) -> MatchRule:
    return MatchRule(type="signal", interface=interface, member=member)


__all__ = [
    "Channel",
    "ChannelClosed",
    "CorrectClient",
    "SusceptibleClient",
    "event_match",
]
