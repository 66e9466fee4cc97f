"""D-Bus faults as data, and the pure engine that decides what the proxy writes.

A :class:`Rule` is a :class:`Match` (which messages) and an :class:`Action`
(what to do with them).  The :class:`FaultEngine` holds the rules and the
per-connection state (held messages, serial maps, calls awaiting replies) and
is driven by the proxy with two calls, with no socket and no clock of its own:

* ``on_message(conn, direction, message, fds, now)`` returns the
  :class:`Output` writes to make now;
* ``tick(now)`` returns the writes whose time has come (delays, holds);
  ``next_deadline()`` says when to call it next.

All randomness comes from one ``random.Random(seed)``, so a run replays.

Example::

    proxy.add(Delay(0.5).on_reply(member="StartTransientUnit"))
    proxy.add(SignalBeforeReply("JobRemoved").on_reply(member="StartTransientUnit"))
    proxy.add(Serials(start=0xFFFFFFF0, on_overflow="stall").on(direction=TO_CLIENT))

Each action's docstring names the incident it reproduces (docs/dbus-faults.md).
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import os
import random
import re
import shlex
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from pytest_runtimefaults.dbus.trace import TO_BUS, TO_CLIENT
from pytest_runtimefaults.dbus.wire import (
    HeaderField,
    Message,
    MessageType,
    build_error,
    build_method_return,
    build_signal,
    flip_byte_order,
    member_pattern,
    whole_messages_without,
)

__all__ = [
    "ACTIONS",
    "Action",
    "Delay",
    "Disconnect",
    "Drop",
    "Duplicate",
    "ErrorReply",
    "FaultEngine",
    "FlipByteOrder",
    "Match",
    "Output",
    "Reorder",
    "Rule",
    "RuleError",
    "Serials",
    "SignalBeforeReply",
    "SplitMessage",
    "StrayReply",
    "parse_rule",
]

_TYPES = {"method_call": 1, "method_return": 2, "error": 3, "signal": 4}
_DIRECTIONS = {TO_BUS: TO_BUS, TO_CLIENT: TO_CLIENT, "in": TO_CLIENT, "out": TO_BUS}
_STRING_FIELDS = {
    "path": (HeaderField.PATH, "o"),
    "interface": (HeaderField.INTERFACE, "s"),
    "member": (HeaderField.MEMBER, "s"),
    "error_name": (HeaderField.ERROR_NAME, "s"),
    "destination": (HeaderField.DESTINATION, "s"),
    "sender": (HeaderField.SENDER, "s"),
}
SYNTH_SERIAL_BASE = 0x7FFF0000  # serials of messages the proxy makes up (signals, errors)


class RuleError(ValueError):
    """A rule that cannot work: unknown action or field, bad argument; says which."""


# -- matching -----------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """Which messages a rule applies to; ``None`` fields match anything.

    ``reply_to`` matches replies (METHOD_RETURN or ERROR) to a call that matched
    it, since a reply carries no member of its own.  String fields are compared
    exactly; the proxy first looks for the encoded field in the header bytes
    (a C-speed ``bytes.find``), so rules that match nothing cost little.
    """

    direction: str | None = None
    type: str | None = None
    path: str | None = None
    interface: str | None = None
    member: str | None = None
    error_name: str | None = None
    destination: str | None = None
    sender: str | None = None
    reply_to: Match | None = None

    def __post_init__(self) -> None:
        if self.direction is not None and self.direction not in _DIRECTIONS:
            raise RuleError(f"direction {self.direction!r}: use {TO_BUS!r} or {TO_CLIENT!r}")
        if self.direction is not None:
            object.__setattr__(self, "direction", _DIRECTIONS[self.direction])
        if self.type is not None and self.type not in _TYPES:
            raise RuleError(f"message type {self.type!r}: use one of {sorted(_TYPES)}")
        needles: list[tuple[str, str, tuple[bytes, bytes]]] = []
        for name, (code, sig) in _STRING_FIELDS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise RuleError(f"{name} must be a string, got {value!r}")
            encoded = value.encode()
            head = bytes([code, 1, ord(sig), 0])
            needles.append(
                (
                    name,
                    value,
                    (
                        head + struct.pack("<I", len(encoded)) + encoded + b"\0",
                        head + struct.pack(">I", len(encoded)) + encoded + b"\0",
                    ),
                )
            )
        object.__setattr__(self, "_needles", tuple(needles))
        object.__setattr__(self, "_type", _TYPES[self.type] if self.type else None)

    def matches(self, direction: str, msg: Message) -> bool:
        """Whether *msg* travelling in *direction* matches (ignoring ``reply_to``)."""
        if self.direction is not None and direction != self.direction:
            return False
        want_type: int | None = self._type  # type: ignore[attr-defined]
        if want_type is not None and msg.type != want_type:
            return False
        needles: tuple[tuple[str, str, tuple[bytes, bytes]], ...] = self._needles  # type: ignore[attr-defined]
        if needles:
            raw = msg.raw
            end = msg.header_end + 1
            which = 1 if msg.big_endian else 0
            for _name, _value, pair in needles:
                if raw.find(pair[which], 16, end) < 0:
                    return False
            for name, value, _pair in needles:  # confirm on the decoded fields
                if getattr(msg, name) != value:
                    return False
        return True

    def describe(self) -> str:
        parts = [
            f"{k}={v}"
            for k, v in (
                ("direction", self.direction),
                ("type", self.type),
                ("path", self.path),
                ("interface", self.interface),
                ("member", self.member),
                ("error_name", self.error_name),
                ("destination", self.destination),
                ("sender", self.sender),
            )
            if v is not None
        ]
        if self.reply_to is not None:
            parts.append(f"reply_to=({self.reply_to.describe()})")
        return " ".join(parts) or "any message"


# -- outputs and context ----------------------------------------------------------------


@dataclass
class Output:
    """One write the proxy must make: bytes (and fds) for one direction of a connection.

    ``pause_after`` seconds pass before the next write of the same batch (so that a
    client's read returns this write alone); ``close`` closes the client connection
    after writing.
    """

    conn: int
    direction: str
    data: bytes
    fds: list[int] = field(default_factory=list)
    message: Message | None = None
    fault: str | None = None
    pause_after: float = 0.0
    close: bool = False


@dataclass
class _Held:
    outputs: list[Output]
    due: float | None = None  # release at this time
    after: int | None = None  # release after this many more messages in the lane
    ordered: bool = False


@dataclass
class _Lane:
    """Per connection and direction: held messages."""

    queue: deque[_Held] = field(default_factory=deque)  # ordered holds (FIFO)
    side: list[_Held] = field(default_factory=list)  # holds others may overtake


@dataclass
class _Conn:
    lanes: dict[str, _Lane] = field(default_factory=lambda: {TO_BUS: _Lane(), TO_CLIENT: _Lane()})
    # (direction of the call, serial) -> the rules whose reply_to matched the call
    calls: dict[tuple[str, int], list[Rule]] = field(default_factory=dict)
    answered: deque[int] = field(default_factory=lambda: deque(maxlen=64))
    serials: dict[int, _SerialState] = field(default_factory=dict)  # id(rule) -> state
    client_name: str | None = None


class Context:
    """What an action may use: the engine's rng and helpers, for one message."""

    def __init__(
        self, engine: FaultEngine, conn_id: int, conn: _Conn, direction: str, now: float
    ) -> None:
        self.engine = engine
        self.conn_id = conn_id
        self.conn = conn
        self.direction = direction
        self.now = now
        self.rng = engine.rng

    def out(
        self,
        msg: Message,
        fds: list[int] | None = None,
        *,
        fault: str | None = None,
        direction: str | None = None,
        pause_after: float = 0.0,
    ) -> Output:
        return Output(
            self.conn_id, direction or self.direction, msg.raw, fds or [], msg, fault, pause_after
        )

    def synth_serial(self) -> int:
        return self.engine.next_synth_serial()

    def hold(
        self,
        outputs: list[Output],
        *,
        due: float | None = None,
        after: int | None = None,
        ordered: bool = False,
    ) -> None:
        lane = self.conn.lanes[self.direction]
        held = _Held(outputs, due=due, after=after, ordered=ordered)
        if ordered:
            lane.queue.append(held)
        else:
            lane.side.append(held)


# -- actions ------------------------------------------------------------------------


class Action:
    """What to do with a matching message.  Subclasses implement :meth:`apply`."""

    name: ClassVar[str] = "action"
    incident: ClassVar[str] = ""

    def apply(self, ctx: Context, msg: Message, fds: list[int]) -> list[Output]:
        raise NotImplementedError

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    # Fluent construction: Delay(0.5).on(member="X").times(1)
    def on(self, **match: Any) -> Rule:
        """A rule applying this action to messages matching *match* (see :class:`Match`)."""
        return Rule(self, _match_from_kwargs(match))

    def on_reply(self, **call: Any) -> Rule:
        """A rule applying this action to replies to calls matching *call*."""
        direction = call.pop("direction", None)
        return Rule(self, Match(direction=direction, reply_to=_match_from_kwargs(call)))

    def always(self) -> Rule:
        return Rule(self, Match())


def _match_from_kwargs(kwargs: dict[str, Any]) -> Match:
    reply = kwargs.pop("reply_to", None)
    if isinstance(reply, str):
        reply = Match(member=reply)
    elif isinstance(reply, dict):
        reply = Match(**reply)
    try:
        return Match(reply_to=reply, **kwargs)
    except TypeError as exc:
        valid = ", ".join(f.name for f in dataclasses.fields(Match))
        raise RuleError(f"{exc}; match fields are: {valid}") from None


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Delay(Action):
    """Hold the message *seconds*; later messages wait (``ordered``) or overtake it.

    ``Delay(1.0, ordered=False).on_reply(member="StartTransientUnit")`` lets the
    ``JobRemoved`` signal overtake the reply: HOST.md's runc experiment.
    """

    name = "delay"
    incident = "1, 2"

    def __init__(self, seconds: float, ordered: bool = True) -> None:
        if not isinstance(seconds, (int, float)) or seconds < 0:
            raise RuleError(f"Delay seconds must be a number >= 0, got {seconds!r}")
        self.seconds = float(seconds)
        self.ordered = bool(ordered)

    def apply(self, ctx: Context, msg: Message, fds: list[int]) -> list[Output]:
        out = ctx.out(msg, fds, fault=self.describe())
        ctx.hold([out], due=ctx.now + self.seconds, ordered=self.ordered)
        return []


class Reorder(Action):
    """Hold the message until *after* more messages passed in its direction, then send it.

    ``Reorder()`` swaps it with the next one.  If fewer messages come, it is sent
    after *max_hold* seconds anyway.
    """

    name = "reorder"
    incident = "1"

    def __init__(self, after: int = 1, max_hold: float = 2.0) -> None:
        if not isinstance(after, int) or after < 1:
            raise RuleError(f"Reorder after must be an integer >= 1, got {after!r}")
        self.after = after
        self.max_hold = float(max_hold)

    def apply(self, ctx: Context, msg: Message, fds: list[int]) -> list[Output]:
        out = ctx.out(msg, fds, fault=self.describe())
        ctx.hold([out], due=ctx.now + self.max_hold, after=self.after)
        return []


_SIGNALS: dict[str, tuple[str, str, str, str, Callable[[random.Random], tuple[Any, ...]]]] = {
    "NameAcquired": (
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "NameAcquired",
        "s",
        lambda r: (f":1.{r.randrange(1000, 9999)}",),
    ),
    "JobRemoved": (
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "JobRemoved",
        "uoss",
        lambda r: (
            n := r.randrange(1000, 9999),
            f"/org/freedesktop/systemd1/job/{n}",
            f"rf-unrelated-{n}.scope",
            "done",
        ),
    ),
    "UnitNew": (
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "UnitNew",
        "so",
        lambda r: (
            f"rf-unrelated-{(n := r.randrange(1000, 9999))}.scope",
            f"/org/freedesktop/systemd1/unit/rf_2dunrelated_2d{n}_2escope",
        ),
    ),
}


class SignalBeforeReply(Action):
    """Just before the matching reply, deliver a signal in its own write (youki 2826).

    *signal* is ``"copy"`` (a copy of the last real signal the client received,
    else NameAcquired), or a synthesized ``"NameAcquired"``, ``"JobRemoved"`` or
    ``"UnitNew"``.  *pause* seconds separate the two writes, so that a client that
    reads once after its call gets the signal alone.
    """

    name = "signal_before_reply"
    incident = "1"

    def __init__(self, signal: str = "copy", pause: float = 0.02, count: int = 1) -> None:
        if signal != "copy" and signal not in _SIGNALS:
            raise RuleError(
                f"SignalBeforeReply signal {signal!r}: use 'copy' or one of {sorted(_SIGNALS)}"
            )
        self.signal = signal
        self.pause = float(pause)
        self.count = int(count)

    def apply(self, ctx: Context, msg: Message, fds: list[int]) -> list[Output]:
        outputs = []
        for _ in range(self.count):
            sig = None
            if self.signal == "copy":
                last = ctx.engine.last_signal.get(ctx.conn_id)
                if last is not None:
                    sig = last.with_serials(serial=ctx.synth_serial())
            if sig is None:
                path, iface, member, signature, body = _SIGNALS[
                    "NameAcquired" if self.signal == "copy" else self.signal
                ]
                sender = "org.freedesktop.DBus" if iface == "org.freedesktop.DBus" else msg.sender
                sig = build_signal(
                    path,
                    iface,
                    member,
                    signature,
                    body(ctx.rng),
                    serial=ctx.synth_serial(),
                    sender=sender,
                    destination=msg.destination,
                )
            outputs.append(ctx.out(sig, fault=self.describe(), pause_after=self.pause))
        outputs.append(ctx.out(msg, fds))
        return outputs


class SplitMessage(Action):
    """Write the message in *parts* fragments with *pause* seconds between them.

    Catches clients that frame by "read until a short read" (youki before PR 2838).
    ``at`` gives the split offsets; else they are even, or drawn from the seeded
    rng with ``random=True``.
    """

    name = "split"
    incident = "1"

    def __init__(
        self, parts: int = 2, pause: float = 0.02, at: list[int] | None = None, random: bool = False
    ) -> None:
        if not isinstance(parts, int) or parts < 2:
            raise RuleError(f"SplitMessage parts must be an integer >= 2, got {parts!r}")
        self.parts = parts
        self.pause = float(pause)
        self.at = list(at) if at else None
        self.random = random

    def apply(self, ctx: Context, msg: Message, fds: list[int]) -> list[Output]:
        size = msg.size
        if self.at:
            cuts = sorted({c for c in self.at if 0 < c < size})
        elif self.random:
            cuts = sorted(ctx.rng.sample(range(1, size), min(self.parts - 1, size - 1)))
        else:
            cuts = [size * i // self.parts for i in range(1, self.parts)]
        bounds = [0, *cuts, size]
        outputs = []
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            last = i == len(bounds) - 2
            outputs.append(
                Output(
                    ctx.conn_id,
                    ctx.direction,
                    msg.raw[a:b],
                    fds if i == 0 else [],
                    msg if i == 0 else None,
                    self.describe() if i == 0 else None,
                    0.0 if last else self.pause,
                )
            )
        return outputs


class StrayReply(Action):
    """Before the real reply, deliver a METHOD_RETURN nobody is waiting for.

    ``answer="earlier"`` replies again to the client's previous, already answered
    call (the latest seen while the rule was active, else the serial just below
    the real call's); ``answer="none"`` uses a reply_serial no call had.  youki even after
    PR 3557 never compares reply_serial, so it takes the stray reply as its answer.
    """

    name = "stray_reply"
    incident = "1"

    def __init__(self, answer: str = "none", pause: float = 0.02) -> None:
        if answer not in ("earlier", "none"):
            raise RuleError(f"StrayReply answer {answer!r}: use 'earlier' or 'none'")
        self.answer = answer
        self.pause = float(pause)

    def apply(self, ctx: Context, msg: Message, fds: list[int]) -> list[Output]:
        real = msg.reply_serial or 1
        earlier = [s for s in ctx.conn.answered if s != real]
        if self.answer == "earlier" and earlier:
            stray_to = earlier[-1]
        elif self.answer == "earlier" and real > 1:
            # No answered call seen while the rule was active: clients number their
            # calls upwards, so the serial just below is an earlier message of theirs.
            stray_to = real - 1
        else:
            stray_to = (real + 0x10000) & 0xFFFFFFFF or 1
        stray = build_method_return(
            stray_to, serial=ctx.synth_serial(), sender=msg.sender, destination=msg.destination
        )
        return [ctx.out(stray, fault=self.describe(), pause_after=self.pause), ctx.out(msg, fds)]


class FlipByteOrder(Action):
    """Re-marshal the message big-endian (or little), which is legal D-Bus."""

    name = "flip_byte_order"
    incident = "1"

    def apply(self, ctx: Context, msg: Message, fds: list[int]) -> list[Output]:
        return [ctx.out(flip_byte_order(msg), fds, fault=self.describe())]


class Drop(Action):
    """Black-hole the message: the peer waits for something that never comes."""

    name = "drop"
    incident = "2"

    def apply(self, ctx: Context, msg: Message, fds: list[int]) -> list[Output]:
        _close_fds(fds)
        ctx.engine.note(ctx.conn_id, ctx.direction, msg, self.describe())
        return []


class Duplicate(Action):
    """Deliver the message twice (the copy's file descriptors are dup()ed)."""

    name = "duplicate"
    incident = "1"

    def apply(self, ctx: Context, msg: Message, fds: list[int]) -> list[Output]:
        return [ctx.out(msg, fds), ctx.out(msg, [os.dup(fd) for fd in fds], fault=self.describe())]


class ErrorReply(Action):
    """Answer a method call with a D-Bus error instead of forwarding it."""

    name = "error_reply"
    incident = "2"

    def __init__(
        self,
        name: str = "org.freedesktop.DBus.Error.Failed",
        text: str = "injected by pytest-runtimefaults",
    ) -> None:
        if not isinstance(name, str) or "." not in name:
            raise RuleError(f"ErrorReply name must be a dotted D-Bus error name, got {name!r}")
        self.error = name
        self.text = text

    def apply(self, ctx: Context, msg: Message, fds: list[int]) -> list[Output]:
        _close_fds(fds)
        if msg.type != MessageType.METHOD_CALL or not msg.expects_reply:
            ctx.engine.note(ctx.conn_id, ctx.direction, msg, self.describe() + " (dropped)")
            return []
        back = TO_CLIENT if ctx.direction == TO_BUS else TO_BUS
        error = build_error(
            msg.serial,
            self.error,
            self.text,
            serial=ctx.synth_serial(),
            sender=msg.destination,
            destination=msg.sender,
        )
        ctx.engine.note(ctx.conn_id, ctx.direction, msg, self.describe() + " (not forwarded)")
        return [ctx.out(error, direction=back, fault=self.describe())]


class Disconnect(Action):
    """Close the client's connection, after writing half of the message if *mid_message*."""

    name = "disconnect"
    incident = "2"

    def __init__(self, mid_message: bool = False) -> None:
        self.mid_message = bool(mid_message)

    def apply(self, ctx: Context, msg: Message, fds: list[int]) -> list[Output]:
        data = msg.raw[: msg.size // 2] if self.mid_message else b""
        _close_fds(fds)
        return [
            Output(
                ctx.conn_id,
                TO_CLIENT,
                data if ctx.direction == TO_CLIENT else b"",
                [],
                msg,
                self.describe(),
                close=True,
            )
        ]


@dataclass
class _SerialState:
    next: int
    fake_of: dict[tuple[str | None, int], int] = field(default_factory=dict)
    real_of: dict[int, tuple[str | None, int]] = field(default_factory=dict)
    awaiting: set[int] = field(default_factory=set)
    cycled: bool = False
    stalled: bool = False


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
    _MODES = ("wrap", "cycle", "stall")

    def __init__(self, start: int = 0xFFFFFFF0, on_overflow: str = "stall") -> None:
        if on_overflow not in self._MODES:
            raise RuleError(f"Serials on_overflow {on_overflow!r}: use one of {self._MODES}")
        if not isinstance(start, int) or not 0 < start <= 0xFFFFFFFF:
            raise RuleError(f"Serials start must be an integer in 1..0xffffffff, got {start!r}")
        self.start = start
        self.on_overflow = on_overflow

    def _state(self, ctx: Context, rule: Rule) -> _SerialState:
        return ctx.conn.serials.setdefault(id(rule), _SerialState(next=self.start))

    def allocate(self, state: _SerialState) -> int | None:
        serial = state.next
        if serial > 0xFFFFFFFF:
            if self.on_overflow == "stall":
                state.stalled = True
                return None
            serial = 1 if self.on_overflow == "wrap" else 0x80000000
            state.cycled = True
        if self.on_overflow == "cycle" and state.cycled:
            while serial in state.awaiting or serial in state.real_of:
                serial += 1
        state.next = serial + 1
        return serial

    def apply(self, ctx: Context, msg: Message, fds: list[int]) -> list[Output]:
        raise AssertionError("Serials is applied by the engine, not as a one-shot action")


ACTIONS: dict[str, type[Action]] = {
    cls.__name__: cls
    for cls in (
        Delay,
        Reorder,
        SignalBeforeReply,
        SplitMessage,
        StrayReply,
        FlipByteOrder,
        Drop,
        Duplicate,
        ErrorReply,
        Disconnect,
        Serials,
    )
}


# -- rules ------------------------------------------------------------------------------


@dataclass(eq=False)
class Rule:
    """An action applied to matching messages, optionally limited in count or rhythm.

    ``times(n)``: only the first *n* matches; ``every(n)``: every *n*-th match;
    ``probability(p)``: each match with probability *p* (seeded).
    """

    action: Action
    match: Match = field(default_factory=Match)
    limit: int | None = None
    nth: int = 1
    chance: float = 1.0
    hits: int = 0  # matches seen
    applied: int = 0  # times the action ran

    def times(self, n: int) -> Rule:
        if not isinstance(n, int) or n < 1:
            raise RuleError(f"times(n) needs an integer >= 1, got {n!r}")
        return replace(self, limit=n)

    def every(self, n: int) -> Rule:
        if not isinstance(n, int) or n < 1:
            raise RuleError(f"every(n) needs an integer >= 1, got {n!r}")
        return replace(self, nth=n)

    def probability(self, p: float) -> Rule:
        if not 0.0 <= p <= 1.0:
            raise RuleError(f"probability must be in [0, 1], got {p!r}")
        return replace(self, chance=p)

    def describe(self) -> str:
        extra = "".join(
            [
                f" times={self.limit}" if self.limit else "",
                f" every={self.nth}" if self.nth != 1 else "",
                f" probability={self.chance}" if self.chance != 1.0 else "",
            ]
        )
        return f"{self.action.describe()} on {self.match.describe()}{extra}"

    def __str__(self) -> str:
        return self.describe()


def parse_rule(text: str) -> Rule:
    """Parse the text form of a rule (CLI ``--rule``, marker strings).

    ``ACTION(ARGS) [FIELD=VALUE ...]`` where ACTION is one of :data:`ACTIONS`,
    ARGS are Python literals, and FIELD is a :class:`Match` field,
    ``reply_to=MEMBER`` / ``reply_to.FIELD=VALUE`` (replies to matching calls),
    ``times=N``, ``every=N`` or ``probability=P``.  Examples::

        Delay(0.5) reply_to=StartTransientUnit
        SignalBeforeReply('JobRemoved') reply_to.member=StartTransientUnit times=1
        Serials(0xfffffff0, on_overflow='stall') direction=to_client sender=org.freedesktop.systemd1
    """
    stripped = text.strip()
    if not stripped:
        raise RuleError("empty rule")
    # The action may hold spaces and quotes inside its parentheses: cut it at the
    # parenthesis that closes the first one, and split only the rest like a shell.
    head_end = len(stripped.split(None, 1)[0])
    paren = stripped.find("(")
    if 0 <= paren < head_end:
        depth = 0
        for i, ch in enumerate(stripped[paren:], paren):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                head_end = i + 1
                break
        else:
            raise RuleError(f"rule {text!r}: unbalanced parentheses in the action")
    try:
        words = shlex.split(stripped[head_end:])
    except ValueError as exc:
        raise RuleError(f"rule {text!r}: {exc}") from None
    action = _parse_action(stripped[:head_end], text)
    match: dict[str, Any] = {}
    reply: dict[str, Any] = {}
    rule_opts: dict[str, Any] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise RuleError(f"rule {text!r}: expected FIELD=VALUE, got {word!r}")
        if key in ("times", "every"):
            try:
                rule_opts[key] = int(value, 0)
            except ValueError:
                raise RuleError(f"rule {text!r}: {key} needs an integer, got {value!r}") from None
        elif key == "probability":
            rule_opts[key] = float(value)
        elif key == "reply_to":
            reply["member"] = value
        elif key.startswith("reply_to."):
            reply[key.split(".", 1)[1]] = value
        else:
            match[key] = value
    if reply:
        match["reply_to"] = reply
    rule = Rule(action, _match_from_kwargs(match))
    if "times" in rule_opts:
        rule = rule.times(rule_opts["times"])
    if "every" in rule_opts:
        rule = rule.every(rule_opts["every"])
    if "probability" in rule_opts:
        rule = rule.probability(rule_opts["probability"])
    return rule


def _parse_action(word: str, text: str) -> Action:
    try:
        node = ast.parse(word if "(" in word else word + "()", mode="eval").body
    except SyntaxError:
        raise RuleError(f"rule {text!r}: cannot parse action {word!r}") from None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise RuleError(f"rule {text!r}: action must look like Name(args), got {word!r}")
    cls = ACTIONS.get(node.func.id)
    if cls is None:
        raise RuleError(
            f"rule {text!r}: unknown action {node.func.id!r}; known: {', '.join(ACTIONS)}"
        )
    try:
        args = [ast.literal_eval(a) for a in node.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
    except ValueError:
        raise RuleError(f"rule {text!r}: arguments must be literals") from None
    try:
        return cls(*args, **kwargs)
    except TypeError as exc:
        raise RuleError(f"rule {text!r}: {exc}") from None


# -- the engine ----------------------------------------------------------------------------


class FaultEngine:
    """Rules plus per-connection state; pure decisions, driven by the proxy (thread-safe)."""

    def __init__(self, rules: Iterable[Rule | Action | str] = (), seed: int = 0) -> None:
        self._lock = threading.RLock()
        self.rules: list[Rule] = []
        self.rng = random.Random(seed)
        self._conns: dict[int, _Conn] = {}
        self._synth = SYNTH_SERIAL_BASE
        self.last_signal: dict[int, Message] = {}
        self.notes: list[tuple[int, str, Message, str]] = []  # faults with no output
        self.idle = True  # no rule and no state: the proxy may bypass the engine
        self.holding = False  # some message is held: the proxy must run its scheduler
        self._serial_rules: list[Rule] = []
        self._plain_rules: list[Rule] = []
        self._reply_watch: list[Rule] = []
        # Prefilter index (see bypass): rules keyed by the member they need.
        self._by_member: dict[bytes, list[Rule]] = {}
        self._unkeyed: list[Rule] = []
        self._watch_by_member: dict[bytes, list[Rule]] = {}
        self._watch_unkeyed: list[Rule] = []
        self._members: frozenset[bytes] = frozenset()
        self._pending_calls = 0
        #: the proxy's hot-path prefilter: ``None`` when any message may concern a rule
        #: or the engine's state, else a pattern finding the member fields of the only
        #: messages that may (see :meth:`passthrough`)
        self.prefilter: re.Pattern[bytes] | None = member_pattern(())
        self._member_pattern = self.prefilter
        for rule in rules:
            self.add(rule)

    @property
    def lock(self) -> threading.RLock:
        """The engine's lock (reentrant): the proxy holds it to claim write order."""
        return self._lock

    # -- rule management (takes effect for the next message) --
    def add(self, rule: Rule | Action | str) -> Rule:
        if isinstance(rule, str):
            rule = parse_rule(rule)
        elif isinstance(rule, Action):
            rule = rule.always()
        if not isinstance(rule, Rule):
            raise RuleError(f"not a rule: {rule!r}")
        with self._lock:
            self.rules.append(rule)
            self._index()
            self.idle = False
        return rule

    def _index(self) -> None:
        self._serial_rules = [r for r in self.rules if isinstance(r.action, Serials)]
        self._plain_rules = [r for r in self.rules if not isinstance(r.action, Serials)]
        self._reply_watch = [r for r in self._plain_rules if r.match.reply_to is not None]
        by_member: dict[bytes, list[Rule]] = {}
        unkeyed: list[Rule] = []
        watch_by_member: dict[bytes, list[Rule]] = {}
        watch_unkeyed: list[Rule] = []
        for rule in self._plain_rules:
            call = rule.match.reply_to
            if call is not None:
                if call.member is not None:
                    watch_by_member.setdefault(call.member.encode(), []).append(rule)
                else:
                    watch_unkeyed.append(rule)
            elif rule.match.member is not None:
                by_member.setdefault(rule.match.member.encode(), []).append(rule)
            else:
                unkeyed.append(rule)
        self._by_member, self._unkeyed = by_member, unkeyed
        self._watch_by_member, self._watch_unkeyed = watch_by_member, watch_unkeyed
        self._members = frozenset((*by_member, *watch_by_member))
        self._member_pattern = member_pattern(self._members)
        self._update_prefilter()

    def _update_prefilter(self) -> None:
        if (
            self.holding
            or self._serial_rules
            or self._unkeyed
            or self._watch_unkeyed
            or self._pending_calls
        ):
            self.prefilter = None
        else:
            self.prefilter = self._member_pattern

    def passthrough(self, data: bytes | memoryview) -> bool:
        """True if *data* is whole messages, none of which any rule can concern.

        The proxy then forwards *data* before it even frames it.  One regular
        expression (:attr:`prefilter`, kept up to date as rules and state change)
        looks for a member field naming a member the rules name; a hit, even a
        false one in a body, only sends the chunk down the exact path.
        """
        pattern = self.prefilter
        return pattern is not None and whole_messages_without(bytes(data), pattern)

    def bypass(self, direction: str, msg: Message) -> bool:
        """True if no rule and no state can concern *msg*: forward it untouched.

        This is the proxy's hot-path prefilter; it must never say True wrongly.
        Rules are indexed by member, so rules that match nothing cost one
        ``bytes.find`` and one dict lookup per message, not a scan of every rule.
        """
        if self.idle:
            return True
        if self.holding or self._serial_rules:
            return False
        t = msg.type
        if (t == MessageType.METHOD_RETURN or t == MessageType.ERROR) and self._pending_calls:
            return False
        if self._unkeyed or (t == MessageType.METHOD_CALL and self._watch_unkeyed):
            return False
        if self._by_member or self._watch_by_member:
            member = msg.string_field_bytes(HeaderField.MEMBER)
            if member is not None:
                if member in self._by_member:
                    return False
                if t == MessageType.METHOD_CALL and member in self._watch_by_member:
                    return False
        return True

    def remove(self, rule: Rule) -> list[Output]:
        """Remove *rule*; once no rule is left, held messages are released (returned)."""
        with self._lock:
            self.rules = [r for r in self.rules if r is not rule]
            self._index()
            if not self.rules:
                return self.clear()
            self._update_idle()
            return []

    def clear(self) -> list[Output]:
        """Remove every rule and release every held message now (returned as outputs)."""
        with self._lock:
            self.rules = []
            self._index()
            released: list[Output] = []
            for conn_id in list(self._conns):
                released += self._release_all(conn_id)
            self._update_idle()
            return released

    def _update_idle(self) -> None:
        self.holding = any(
            lane.queue or lane.side for conn in self._conns.values() for lane in conn.lanes.values()
        )
        self.idle = (
            not self.rules
            and not self.holding
            and not any(conn.serials or conn.calls for conn in self._conns.values())
        )
        self._update_prefilter()

    def next_synth_serial(self) -> int:
        self._synth += 1
        return self._synth

    def note(self, conn: int, direction: str, msg: Message, fault: str) -> None:
        self.notes.append((conn, direction, msg, fault))

    # -- connections --
    def forget(self, conn_id: int) -> None:
        """The connection closed: drop its state and close the fds of held messages."""
        with self._lock:
            conn = self._conns.pop(conn_id, None)
            self.last_signal.pop(conn_id, None)
            if conn is not None:
                self._pending_calls -= len(conn.calls)
                for lane in conn.lanes.values():
                    for held in [*lane.queue, *lane.side]:
                        for out in held.outputs:
                            _close_fds(out.fds)
            self._update_idle()

    # -- the decisions --
    def on_message(
        self, conn_id: int, direction: str, msg: Message, fds: list[int], now: float
    ) -> list[Output]:
        with self._lock:
            conn = self._conns.get(conn_id)
            if conn is None:
                conn = self._conns[conn_id] = _Conn()
            ctx = Context(self, conn_id, conn, direction, now)
            lane = conn.lanes[direction]
            waiting = list(lane.side)  # holds made by this very message do not count it
            outputs = self._decide(ctx, msg, fds)
            if not (lane.side or lane.queue or self.holding):
                return outputs
            # Count-based holds: this message passed; release those whose turn came.
            released: list[Output] = []
            if waiting:
                keep = []
                for held in lane.side:
                    if held.after is not None and any(held is w for w in waiting):
                        held.after -= 1
                        if held.after <= 0:
                            released += held.outputs
                            continue
                    keep.append(held)
                lane.side = keep
            outputs += released
            if lane.queue:
                # An ordered hold is active: everything queues behind it, in order.
                if outputs:
                    lane.queue.append(_Held(outputs, due=None, ordered=True))
                self._update_idle()
                return []
            self._update_idle()
            return outputs

    def _decide(self, ctx: Context, msg: Message, fds: list[int]) -> list[Output]:
        direction = ctx.direction
        conn = ctx.conn
        if msg.type == MessageType.SIGNAL and direction == TO_CLIENT:
            self.last_signal[ctx.conn_id] = msg
        # Replies: find the rules whose reply_to matched the call, note answered serials.
        reply_rules: list[Rule] = []
        note: str | None = None  # how serial rewriting changed the message, for the trace
        if msg.type in (MessageType.METHOD_RETURN, MessageType.ERROR):
            # Serial rewriting maps fake reply_serials back before anything else looks.
            original = msg
            msg = self._unmap_reply(ctx, msg)
            if msg is not original:
                note = f"Serials: reply_serial {original.reply_serial} -> {msg.reply_serial}"
            rs = msg.reply_serial
            if rs is not None:
                call_dir = TO_BUS if direction == TO_CLIENT else TO_CLIENT
                reply_rules = conn.calls.pop((call_dir, rs), [])
                if reply_rules:
                    self._pending_calls -= 1
                    self._update_prefilter()
                if direction == TO_CLIENT:
                    conn.answered.append(rs)
        elif msg.type == MessageType.METHOD_CALL and msg.expects_reply:
            watching = [
                r
                for r in self.rules
                if r.match.reply_to is not None and r.match.reply_to.matches(direction, msg)
            ]
            if watching:
                conn.calls[(direction, msg.serial)] = watching
                self._pending_calls += 1
                self._update_prefilter()
        # Serial rewriting (Serials rules) applies to every matching message.
        for rule in self.rules:
            if isinstance(rule.action, Serials) and rule.match.matches(direction, msg):
                rewritten = self._rewrite_serial(ctx, rule, msg)
                if rewritten is None:
                    _close_fds(fds)
                    return []
                note = f"Serials: serial {msg.serial} -> {rewritten.serial}"
                msg = rewritten
        for rule in self.rules:
            if isinstance(rule.action, Serials):
                continue
            m = rule.match
            if m.reply_to is not None:
                if rule not in reply_rules or not m.matches(direction, msg):
                    continue
            elif not m.matches(direction, msg):
                continue
            rule.hits += 1
            if rule.limit is not None and rule.applied >= rule.limit:
                continue
            if rule.hits % rule.nth:
                continue
            if rule.chance < 1.0 and self.rng.random() >= rule.chance:
                continue
            rule.applied += 1
            return rule.action.apply(ctx, msg, fds)
        return [ctx.out(msg, fds, fault=note)]

    def _rewrite_serial(self, ctx: Context, rule: Rule, msg: Message) -> Message | None:
        action = rule.action
        assert isinstance(action, Serials)
        state = action._state(ctx, rule)
        if state.stalled:
            rule.hits += 1
            self.note(ctx.conn_id, ctx.direction, msg, f"{action.describe()}: stalled")
            return None
        fake = action.allocate(state)
        rule.hits += 1
        if fake is None:
            self.note(
                ctx.conn_id,
                ctx.direction,
                msg,
                f"{action.describe()}: serial passed 0xffffffff, stalled",
            )
            return None
        rule.applied += 1
        key = (msg.sender, msg.serial)
        state.fake_of[key] = fake
        state.real_of[fake] = key
        if msg.expects_reply:
            state.awaiting.add(fake)
        if len(state.real_of) > 65536:  # bound memory on long runs
            for old in list(state.real_of)[:32768]:
                state.fake_of.pop(state.real_of.pop(old), None)
        return msg.with_serials(serial=fake)

    def _unmap_reply(self, ctx: Context, msg: Message) -> Message:
        if not ctx.conn.serials:
            return msg
        rs = msg.reply_serial
        if rs is None:
            return msg
        for rule in self.rules:
            if not isinstance(rule.action, Serials):
                continue
            state = ctx.conn.serials.get(id(rule))
            if state is None or rs not in state.real_of:
                continue
            # A reply travelling against the rewritten direction answers a fake serial.
            if rule.match.direction is not None and rule.match.direction == ctx.direction:
                continue
            state.awaiting.discard(rs)
            _sender, real = state.real_of[rs]
            return msg.with_serials(reply_serial=real)
        return msg

    # -- time --
    def next_deadline(self) -> float | None:
        with self._lock:
            deadlines = [
                h.due
                for conn in self._conns.values()
                for lane in conn.lanes.values()
                for h in (*lane.side, *(list(lane.queue)[:1]))
                if h.due is not None
            ]
            return min(deadlines) if deadlines else None

    def tick(self, now: float) -> list[Output]:
        """Release what is due at *now*."""
        with self._lock:
            outputs: list[Output] = []
            for conn in self._conns.values():
                for lane in conn.lanes.values():
                    keep = []
                    for held in lane.side:
                        if held.due is not None and held.due <= now:
                            outputs += held.outputs
                        else:
                            keep.append(held)
                    lane.side = keep
                    while lane.queue and (lane.queue[0].due is None or lane.queue[0].due <= now):
                        outputs += lane.queue.popleft().outputs
            self._update_idle()
            return outputs

    def _release_all(self, conn_id: int) -> list[Output]:
        conn = self._conns[conn_id]
        outputs: list[Output] = []
        for lane in conn.lanes.values():
            for held in lane.side:
                outputs += held.outputs
            lane.side = []
            while lane.queue:
                outputs += lane.queue.popleft().outputs
        conn.serials.clear()
        self._pending_calls -= len(conn.calls)
        conn.calls.clear()
        self._update_prefilter()
        return outputs
