"""The serial rewriter of incident 2: :class:`Serials` and its per-sender state.

This module owns serial rewriting, behind the small interface every
rewriting action has (:class:`~pytest_runtimefaults.dbus.actions.Rewriter`):
the engine asks a rule's one rewriter (shared by all the proxy's connections)
to ``rewrite`` every message the rule matches, to ``restore`` every message,
and to ``forget`` a closed connection, and knows nothing else of it (no serial
maps, no overflow modes).  It imports
:mod:`~pytest_runtimefaults.dbus.actions` and the codec.

The model is the real bus's: a sender (sd-bus: one ``bus->cookie`` per bus
connection) numbers every message it sends, to any destination, from one
counter, and each client sees a subset of that one sequence.  So the fake
serial is a function of the sender and its real serial alone, shared by every
proxied connection: ``fake = real - first_real_seen + start``, which keeps the
gaps where the sender wrote to someone else, and puts the boundary (and a
stall) at the same message of that sender on every connection.

Example::

    proxy.add(Serials(start=0xFFFFFFF0, on_overflow="stall").on(direction=TO_CLIENT))
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from pytest_runtimefaults.dbus.actions import Action, Rewritten, check_integer
from pytest_runtimefaults.dbus.match import RuleError
from pytest_runtimefaults.dbus.trace import TO_BUS, TO_CLIENT
from pytest_runtimefaults.dbus.wire import Message, MessageType

__all__ = ["SerialRewriter", "Serials"]

_KEEP = 65536  # calls remembered per sender (the oldest half is forgotten past it)
_SENDERS = 4096  # senders remembered per rule (the oldest half is forgotten past it)
_SEGMENTS = 1024  # offset changes remembered per sender, for messages that arrive late
_MAX = 0xFFFFFFFF
_DRIVER = "org.freedesktop.DBus"

#: who numbered a message: ("name", unique name) for a bus peer, whose serials every
#: proxied connection shares; ("conn", connection, direction) for the proxied client's
#: own messages, the bus driver's (dbus-daemon numbers them per connection) and a
#: peer-to-peer connection's (no SENDER field: the connection is the sender)
SenderKey = tuple[str, str] | tuple[str, int, str]


class Serials(Action):
    """Rewrite the serials a sender uses so that the clients see them pass 0xffffffff.

    Applies to every message the rule matches (use ``.on(direction=TO_CLIENT,
    sender=...)`` for the service's serials, ``direction=TO_BUS`` for the
    client's own), and rewrites every ``reply_serial`` that refers to them in
    the other direction, so the conversation stays consistent.  A sender's
    serials are mapped once for the whole proxy: what it sends to two clients
    carries fake serials of one sequence, with the real gaps (the first message
    of a sender the rule sees gets *start*).  At the boundary, *on_overflow*:

    * ``"wrap"``: continue at 1 (a naive sender);
    * ``"cycle"``: continue at *cycle_to* (0x80000000 by default), skipping the
      sender's serials still awaiting replies on any connection (systemd after
      PR 11818); a *cycle_to* above *start* brings a second cycle, and so the
      skipping, within a few messages;
    * ``"stall"``: deliver nothing more from that sender, on any connection
      (systemd before the fix, the incident: PID 1 could no longer seal a message).
    """

    name = "serials"
    incident = "2"
    rewrites = True
    _MODES = ("wrap", "cycle", "stall")

    def __init__(
        self, start: int = 0xFFFFFFF0, on_overflow: str = "stall", cycle_to: int = 0x80000000
    ) -> None:
        if on_overflow not in self._MODES:
            raise RuleError(f"Serials on_overflow {on_overflow!r}: use one of {self._MODES}")
        self.start = check_integer(start, "Serials start", 1, _MAX)
        self.on_overflow = on_overflow
        self.cycle_to = check_integer(cycle_to, "Serials cycle_to", 1, _MAX)

    def describe(self) -> str:
        # cycle_to only when it says something: the trace and report stay as they were
        text = f"Serials(start={self.start!r}, on_overflow={self.on_overflow!r}"
        if self.cycle_to != 0x80000000:
            text += f", cycle_to={self.cycle_to!r}"
        return text + ")"

    def rewriter(self) -> SerialRewriter:
        return SerialRewriter(self)


@dataclass
class _Sender:
    """One sender's mapping: ``fake = real + offset``, the offset changing at a boundary."""

    offset: int  # for the newest serials
    top: int  # the highest real serial mapped
    # (first real serial, offset from there on), ascending: a message that arrives late
    # (on another connection, or on the bus after its successor) gets the offset of its time
    segments: list[tuple[int, int]]
    calls: dict[int, int] = field(default_factory=dict)  # fake -> real, of calls
    awaiting: dict[int, int] = field(default_factory=dict)  # fake -> connection, of calls
    stalled: bool = False


class SerialRewriter:
    """The serial maps of one :class:`Serials` rule, shared by all the proxy's connections."""

    def __init__(self, action: Serials) -> None:
        self.action = action
        self.senders: dict[SenderKey, _Sender] = {}

    # -- keys --
    @staticmethod
    def _key(conn: int, direction: str, msg: Message) -> SenderKey:
        """Who numbered *msg*, read from *conn* going *direction*."""
        sender = msg.sender
        if direction == TO_BUS or sender is None or sender == _DRIVER:
            return ("conn", conn, direction)
        return ("name", sender)

    @staticmethod
    def _key_of_call(conn: int, direction: str, reply: Message) -> SenderKey:
        """Who numbered the call *reply* (going *direction*) answers."""
        if direction == TO_CLIENT:  # the call went to the bus: the client's own
            return ("conn", conn, TO_BUS)
        dest = reply.destination
        if dest is None or dest == _DRIVER:
            return ("conn", conn, TO_CLIENT)
        return ("name", dest)

    # -- the mapping --
    def _fold(self, fake: int) -> int:
        """*fake* brought back under the boundary ("wrap" and "cycle")."""
        restart = 1 if self.action.on_overflow == "wrap" else self.action.cycle_to
        while fake > _MAX:
            fake -= _MAX + 1 - restart
        return fake

    def _map(self, state: _Sender, real: int) -> int | None:
        """The fake serial of *real*; None once the sender stalled."""
        mode = self.action.on_overflow
        if real <= state.top:  # late: the offset in force at its time
            at = bisect.bisect_right(state.segments, real, key=lambda s: s[0]) - 1
            fake = real + state.segments[max(at, 0)][1]
            if fake > _MAX:
                return None if mode == "stall" else self._fold(fake)
            return fake
        fake = real + state.offset
        if fake > _MAX:
            if mode == "stall":
                return None
            fake = self._fold(fake)
        if mode == "cycle":
            while fake in state.awaiting:  # sd-bus skips cookies with a reply callback
                fake = self._fold(fake + 1)
        if fake - real != state.offset:
            state.offset = fake - real
            state.segments.append((real, state.offset))
            del state.segments[:-_SEGMENTS]
        state.top = real
        return fake

    def _state(self, key: SenderKey, real: int) -> _Sender:
        state = self.senders.get(key)
        if state is None:
            if len(self.senders) >= _SENDERS:  # bound memory on long runs
                for old in list(self.senders)[: _SENDERS // 2]:
                    del self.senders[old]
            offset = self.action.start - real
            state = self.senders[key] = _Sender(offset, real - 1, [(real, offset)])
        return state

    # -- the Rewriter interface --
    def rewrite(self, conn: int, direction: str, msg: Message) -> Rewritten:
        real = msg.serial
        state = self._state(self._key(conn, direction, msg), real)
        fake = self._map(state, real)
        if fake is None:
            what = self.action.describe()
            if state.stalled:
                return None, f"{what}: stalled"
            state.stalled = True
            return None, f"{what}: serial passed 0xffffffff, stalled"
        if fake < 1:  # a late message from before the first one seen, with a small start
            return msg, f"Serials: serial {real} kept (before the first mapped)"
        if msg.type == MessageType.METHOD_CALL:
            state.calls[fake] = real
            if msg.expects_reply:
                state.awaiting[fake] = conn
            if len(state.calls) > _KEEP:  # bound memory on long runs
                for old in list(state.calls)[: _KEEP // 2]:
                    del state.calls[old]
                    state.awaiting.pop(old, None)
        return msg.with_serials(serial=fake), f"Serials: serial {real} -> {fake}"

    def restore(self, conn: int, direction: str, msg: Message) -> tuple[Message, str] | None:
        if msg.type not in (MessageType.METHOD_RETURN, MessageType.ERROR):
            return None
        rs = msg.reply_serial
        if rs is None:
            return None
        state = self.senders.get(self._key_of_call(conn, direction, msg))
        real = state.calls.get(rs) if state is not None else None
        if state is None or real is None:
            return None
        state.awaiting.pop(rs, None)
        return msg.with_serials(reply_serial=real), f"Serials: reply_serial {rs} -> {real}"

    def forget(self, conn: int) -> None:
        """*conn* closed: drop its own senders, and the calls awaiting its replies."""
        for key in [k for k in self.senders if k[0] == "conn" and k[1] == conn]:
            del self.senders[key]
        for state in self.senders.values():
            if conn in state.awaiting.values():
                state.awaiting = {f: c for f, c in state.awaiting.items() if c != conn}
