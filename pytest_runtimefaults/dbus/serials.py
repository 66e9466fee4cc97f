"""The serial rewriter of incident 2: :class:`Serials` and its per-connection state.

This module owns serial rewriting, behind the small interface every
rewriting action has (:class:`~pytest_runtimefaults.dbus.actions.Rewriter`):
the engine asks a connection's rewriter to ``rewrite`` every message the rule
matches and to ``restore`` every message on the connection, and knows nothing
else of it (no serial maps, no overflow modes).  It imports
:mod:`~pytest_runtimefaults.dbus.actions` and the codec.

Example::

    proxy.add(Serials(start=0xFFFFFFF0, on_overflow="stall").on(direction=TO_CLIENT))
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pytest_runtimefaults.dbus.actions import Action, Rewritten, check_integer
from pytest_runtimefaults.dbus.match import RuleError
from pytest_runtimefaults.dbus.wire import Message, MessageType

__all__ = ["SerialRewriter", "Serials"]

_KEEP = 65536  # serial mappings kept per connection (the oldest half is forgotten past it)


class Serials(Action):
    """Rewrite the serials a sender uses so that the client sees them pass 0xffffffff.

    Applies to every message the rule matches (use ``.on(direction=TO_CLIENT,
    sender=...)`` for the service's serials, ``direction=TO_BUS`` for the
    client's own), and rewrites every ``reply_serial`` that refers to them in
    the other direction, so the conversation stays consistent.  At the boundary,
    *on_overflow*:

    * ``"wrap"``: continue at 1 (a naive sender);
    * ``"cycle"``: continue at 0x80000000, skipping serials still awaiting
      replies (systemd after PR 11818);
    * ``"stall"``: deliver nothing more from that sender (systemd before the fix,
      the incident: PID 1 could no longer seal a message).
    """

    name = "serials"
    incident = "2"
    rewrites = True
    _MODES = ("wrap", "cycle", "stall")

    def __init__(self, start: int = 0xFFFFFFF0, on_overflow: str = "stall") -> None:
        if on_overflow not in self._MODES:
            raise RuleError(f"Serials on_overflow {on_overflow!r}: use one of {self._MODES}")
        self.start = check_integer(start, "Serials start", 1, 0xFFFFFFFF)
        self.on_overflow = on_overflow

    def rewriter(self) -> SerialRewriter:
        return SerialRewriter(self)


@dataclass
class SerialRewriter:
    """One connection's serial map for one :class:`Serials` rule."""

    action: Serials
    next: int = 0
    # (sender, real serial) -> fake serial, and fake -> (sender, real, direction rewritten)
    fake_of: dict[tuple[str | None, int], int] = field(default_factory=dict)
    real_of: dict[int, tuple[str | None, int, str]] = field(default_factory=dict)
    awaiting: set[int] = field(default_factory=set)
    cycled: bool = False
    stalled: bool = False

    def __post_init__(self) -> None:
        self.next = self.action.start

    def _allocate(self) -> int | None:
        serial = self.next
        mode = self.action.on_overflow
        if serial > 0xFFFFFFFF:
            if mode == "stall":
                self.stalled = True
                return None
            serial = 1 if mode == "wrap" else 0x80000000
            self.cycled = True
        if mode == "cycle" and self.cycled:
            while serial in self.awaiting or serial in self.real_of:
                serial += 1
        self.next = serial + 1
        return serial

    def rewrite(self, direction: str, msg: Message) -> Rewritten:
        what = self.action.describe()
        if self.stalled:
            return None, f"{what}: stalled"
        fake = self._allocate()
        if fake is None:
            return None, f"{what}: serial passed 0xffffffff, stalled"
        key = (msg.sender, msg.serial)
        self.fake_of[key] = fake
        self.real_of[fake] = (msg.sender, msg.serial, direction)
        if msg.expects_reply:
            self.awaiting.add(fake)
        if len(self.real_of) > _KEEP:  # bound memory on long runs
            for old in list(self.real_of)[: _KEEP // 2]:
                sender, real, _dir = self.real_of.pop(old)
                self.fake_of.pop((sender, real), None)
        return msg.with_serials(serial=fake), f"Serials: serial {msg.serial} -> {fake}"

    def restore(self, direction: str, msg: Message) -> tuple[Message, str] | None:
        if msg.type not in (MessageType.METHOD_RETURN, MessageType.ERROR):
            return None
        rs = msg.reply_serial
        entry = self.real_of.get(rs) if rs is not None else None
        # Only a reply travelling against the rewritten message answers its fake serial.
        if entry is None or entry[2] == direction:
            return None
        self.awaiting.discard(rs)
        real = entry[1]
        return msg.with_serials(reply_serial=real), f"Serials: reply_serial {rs} -> {real}"
