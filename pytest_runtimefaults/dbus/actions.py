"""What a rule does to the messages it matches: :class:`Action`, the actions, :class:`Rule`.

This module owns the action side of a rule:

* :class:`Action`, the base with the fluent constructors (``.on()``,
  ``.on_reply()``, ``.always()``), and the ten one-shot actions (Delay,
  Reorder, SignalBeforeReply, SplitMessage, StrayReply, FlipByteOrder, Drop,
  Duplicate, ErrorReply, Disconnect) and :class:`JobResult`, which edits a
  signal's body (JobRemoved's result); each decides the fate of one message;
* the two small interfaces between actions and the engine: :class:`Context`
  (what an action may ask of the engine for one message) and
  :class:`Rewriter` (the state, shared by all connections, of an action that rewrites
  every message it matches and lets it go on: ``Action.rewrites``; the one
  there is, :class:`~pytest_runtimefaults.dbus.serials.Serials`, lives in its
  own module);
* :class:`Rule`, an action with its :class:`~pytest_runtimefaults.dbus.match.Match`
  and its limits (``times``/``every``/``probability``), which is also a
  :class:`~pytest_runtimefaults.core.Fault` (``name``, ``start()``, ``lift()``,
  ``stop()``, ``applied``);
* the argument checks every action uses, so a bad argument (a NaN, an
  infinite or negative time, a string where a number belongs) is a
  :class:`~pytest_runtimefaults.dbus.match.RuleError` when the rule is made,
  not an exception in the proxy's loop later.

It imports the codec and :mod:`~pytest_runtimefaults.dbus.match`, never the
engine.  Each action's docstring names the incident it reproduces
(docs/dbus-faults.md).

Example::

    rule = Delay(0.5).on_reply(member="StartTransientUnit").times(1)
"""

from __future__ import annotations

import itertools
import math
import os
import random
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pytest_runtimefaults.core.log import swallowed
from pytest_runtimefaults.dbus.match import Match, RuleError, match_from_kwargs
from pytest_runtimefaults.dbus.trace import TO_BUS, TO_CLIENT
from pytest_runtimefaults.dbus.wire import (
    Message,
    MessageType,
    WireError,
    build_error,
    build_method_return,
    build_signal,
    flip_byte_order,
    parse_signature,
    skip_value,
)

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "JOB_RESULTS",
    "MAX_SECONDS",
    "Action",
    "Context",
    "Delay",
    "Disconnect",
    "Drop",
    "Duplicate",
    "ErrorReply",
    "FlipByteOrder",
    "JobResult",
    "Output",
    "Reorder",
    "Rewriter",
    "Rule",
    "SignalBeforeReply",
    "SplitMessage",
    "StrayReply",
    "check_integer",
    "check_seconds",
    "close_fds",
    "job_removed",
    "with_job_result",
]

#: the longest time a rule may name (a day): the proxy's loop waits with epoll,
#: which refuses timeouts past about 24 days; a message that must never come is Drop()
MAX_SECONDS = 86400.0


# -- argument checks ------------------------------------------------------------------


def check_seconds(value: object, what: str) -> float:
    """*value* as a time in seconds, else a :class:`RuleError` naming *what* and the value.

    A time is a finite int or float in [0, :data:`MAX_SECONDS`]: NaN, infinities,
    negative times and strings are refused here, when the rule is made.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 <= value <= MAX_SECONDS
    ):
        raise RuleError(
            f"{what} must be a number of seconds in [0, {MAX_SECONDS:g}], got {value!r}"
        )
    return float(value)


def check_integer(value: object, what: str, low: int, high: int | None = None) -> int:
    """*value* as an int in [*low*, *high*], else a :class:`RuleError` naming *what*."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise RuleError(f"{what} must be an integer {bound}, got {value!r}")
    return value


def close_fds(fds: Iterable[int]) -> None:
    """Close the file descriptors of a message that will not be delivered."""
    for fd in fds:
        with swallowed(OSError, "closing fd %d of a withheld message", fd):
            os.close(fd)


# -- what the engine gives an action --------------------------------------------------


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


class Context(Protocol):
    """What an action may use while it decides one message (the engine provides it)."""

    @property
    def conn_id(self) -> int: ...

    @property
    def direction(self) -> str: ...

    @property
    def now(self) -> float: ...

    @property
    def rng(self) -> random.Random: ...

    @property
    def answered(self) -> Sequence[int]:
        """The reply_serials of the latest replies this connection's client got."""
        ...

    def out(
        self,
        msg: Message,
        fds: list[int] | None = None,
        *,
        fault: str | None = None,
        direction: str | None = None,
        pause_after: float = 0.0,
    ) -> Output:
        """A write of *msg* on this connection (this direction unless told)."""
        ...

    def synth_serial(self) -> int:
        """A serial for a message the proxy makes up."""
        ...

    def last_signal(self) -> Message | None:
        """The last real signal this connection's client received."""
        ...

    def note(self, msg: Message, fault: str) -> None:
        """Record a fault that writes nothing (a dropped message) in the trace."""
        ...

    def hold(
        self,
        outputs: list[Output],
        *,
        due: float | None = None,
        after: int | None = None,
        ordered: bool = False,
    ) -> None:
        """Hold *outputs* until *due*, or until *after* more messages passed this way."""
        ...


#: what a rewriter returns: the message to pass on (None: withhold it) and a trace note
Rewritten = tuple[Message | None, str]


class Rewriter(Protocol):
    """The state of an action that rewrites messages (``Action.rewrites``), one per rule.

    One rewriter serves every connection of the engine, because what it models
    spans them (a sender numbers its messages to all clients from one counter);
    *conn* says which connection a message travels on.  The engine shows it
    every message its rule matches (:meth:`rewrite`) before the one-shot rules
    look at it, every message (:meth:`restore`) so that it can put back what the
    peer expects, e.g. a reply_serial that answers a rewritten serial, and each
    closed connection (:meth:`forget`).
    """

    def rewrite(self, conn: int, direction: str, msg: Message) -> Rewritten:
        """*msg* (which the rule matched) rewritten, or ``None`` to withhold it; a note."""
        ...

    def restore(self, conn: int, direction: str, msg: Message) -> tuple[Message, str] | None:
        """*msg* mapped back, with a note, if it concerns this rewriter; else ``None``."""
        ...

    def forget(self, conn: int) -> None:
        """Connection *conn* closed: drop what only it needed."""
        ...


# -- actions ------------------------------------------------------------------------


class Action:
    """What to do with a matching message.  Subclasses implement :meth:`apply`.

    An action that sets ``rewrites = True`` instead implements :meth:`rewriter`:
    the engine then asks the rule's one :class:`Rewriter` (shared by all its
    connections) about every message, and the message goes on to the other rules.
    """

    name: ClassVar[str] = "action"
    incident: ClassVar[str] = ""
    rewrites: ClassVar[bool] = False

    def apply(self, ctx: Context, msg: Message, fds: list[int]) -> list[Output]:
        """The writes to make for *msg* (none: it is held, dropped or answered)."""
        raise NotImplementedError

    def rewriter(self) -> Rewriter:
        """A new rewriter for one engine (only for ``rewrites = True`` actions)."""
        raise NotImplementedError(f"{type(self).__name__} does not rewrite messages")

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    # Fluent construction: Delay(0.5).on(member="X").times(1)
    def on(self, **match: Any) -> Rule:
        """A rule applying this action to messages matching *match* (see :class:`Match`)."""
        return Rule(self, match_from_kwargs(match))

    def on_reply(self, **call: Any) -> Rule:
        """A rule applying this action to replies to calls matching *call*."""
        direction = call.pop("direction", None)
        return Rule(self, Match(direction=direction, reply_to=match_from_kwargs(call)))

    def always(self) -> Rule:
        return Rule(self, Match())


class Delay(Action):
    """Hold the message *seconds*; later messages wait (``ordered``) or overtake it.

    ``Delay(1.0, ordered=False).on_reply(member="StartTransientUnit")`` lets the
    ``JobRemoved`` signal overtake the reply: HOST.md's runc experiment.
    """

    name = "delay"
    incident = "1, 2"

    def __init__(self, seconds: float, ordered: bool = True) -> None:
        self.seconds = check_seconds(seconds, "Delay seconds")
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
        self.after = check_integer(after, "Reorder after", 1)
        self.max_hold = check_seconds(max_hold, "Reorder max_hold")

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
    reads once after its call gets the signal alone.  *count* signals (at most
    1000) come before the reply.
    """

    name = "signal_before_reply"
    incident = "1"

    def __init__(self, signal: str = "copy", pause: float = 0.02, count: int = 1) -> None:
        if signal != "copy" and signal not in _SIGNALS:
            raise RuleError(
                f"SignalBeforeReply signal {signal!r}: use 'copy' or one of {sorted(_SIGNALS)}"
            )
        self.signal = signal
        self.pause = check_seconds(pause, "SignalBeforeReply pause")
        self.count = check_integer(count, "SignalBeforeReply count", 1, 1000)

    def apply(self, ctx: Context, msg: Message, fds: list[int]) -> list[Output]:
        outputs = []
        for _ in range(self.count):
            sig = None
            if self.signal == "copy":
                last = ctx.last_signal()
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
    rng with ``random=True``.  A message shorter than *parts* bytes is split
    into single bytes (no fragment is empty).
    """

    name = "split"
    incident = "1"

    def __init__(
        self, parts: int = 2, pause: float = 0.02, at: list[int] | None = None, random: bool = False
    ) -> None:
        self.parts = check_integer(parts, "SplitMessage parts", 2, 1 << 16)
        self.pause = check_seconds(pause, "SplitMessage pause")
        if at is not None and (
            not isinstance(at, (list, tuple))
            or not all(isinstance(c, int) and not isinstance(c, bool) for c in at)
        ):
            raise RuleError(f"SplitMessage at must be a list of byte offsets, got {at!r}")
        self.at = list(at) if at else None
        self.random = bool(random)

    def apply(self, ctx: Context, msg: Message, fds: list[int]) -> list[Output]:
        size = msg.size
        if self.at:
            cuts = sorted({c for c in self.at if 0 < c < size})
        elif self.random:
            cuts = sorted(ctx.rng.sample(range(1, size), min(self.parts - 1, size - 1)))
        else:
            cuts = sorted({size * i // self.parts for i in range(1, self.parts)} - {0})
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
        self.pause = check_seconds(pause, "StrayReply pause")

    def apply(self, ctx: Context, msg: Message, fds: list[int]) -> list[Output]:
        real = msg.reply_serial or 1
        earlier = [s for s in ctx.answered if s != real]
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
        close_fds(fds)
        ctx.note(msg, self.describe())
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
        if not isinstance(text, str):
            raise RuleError(f"ErrorReply text must be a string, got {text!r}")
        self.error = name
        self.text = text

    def apply(self, ctx: Context, msg: Message, fds: list[int]) -> list[Output]:
        close_fds(fds)
        if msg.type != MessageType.METHOD_CALL or not msg.expects_reply:
            ctx.note(msg, self.describe() + " (dropped)")
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
        ctx.note(msg, self.describe() + " (not forwarded)")
        return [ctx.out(error, direction=back, fault=self.describe())]


class Disconnect(Action):
    """Close the client's connection, after writing half of the message if *mid_message*."""

    name = "disconnect"
    incident = "2"

    def __init__(self, mid_message: bool = False) -> None:
        self.mid_message = bool(mid_message)

    def apply(self, ctx: Context, msg: Message, fds: list[int]) -> list[Output]:
        data = msg.raw[: msg.size // 2] if self.mid_message else b""
        close_fds(fds)
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


#: every result systemd's JobRemoved may carry (systemd's job_result_table, src/core/job.c)
JOB_RESULTS = (
    "done",
    "canceled",
    "timeout",
    "failed",
    "dependency",
    "skipped",
    "invalid",
    "assert",
    "unsupported",
    "collected",
    "once",
    "frozen",
    "concurrency",
)

_JOB_REMOVED_TYPES = parse_signature("uoss")


def _string_at(raw: bytes, pos: int, endian: str) -> tuple[int, str]:
    """Where the D-Bus string after *pos* starts (its length word) and its text.

    Only called on a body :func:`skip_value` already walked, so it is well-formed.
    """
    start = pos + (-pos % 4)
    (length,) = struct.unpack_from(endian + "I", raw, start)
    return start, raw[start + 4 : start + 4 + length].decode("utf-8", "replace")


def job_removed(msg: Message) -> tuple[str, str] | None:
    """``(unit, result)`` of a ``JobRemoved(uoss)`` signal, else None (not one, or malformed)."""
    if (
        msg.type != MessageType.SIGNAL
        or msg.member != "JobRemoved"
        or msg.interface != "org.freedesktop.systemd1.Manager"
        or msg.signature != "uoss"
    ):
        return None
    raw, e, end = msg.raw, ">" if msg.big_endian else "<", msg.size
    try:
        after_path = skip_value(raw, msg.body_offset, _JOB_REMOVED_TYPES[:2], e, end)
        after_unit = skip_value(raw, after_path, _JOB_REMOVED_TYPES[2:3], e, end)
        if skip_value(raw, after_unit, _JOB_REMOVED_TYPES[3:], e, end) != end:
            return None
    except WireError:
        return None
    return _string_at(raw, after_path, e)[1], _string_at(raw, after_unit, e)[1]


def with_job_result(msg: Message, result: str) -> Message:
    """A copy of JobRemoved signal *msg* whose result (its last argument) is *result*.

    The result is the body's last value, so only it and the body length change:
    the header (serial, sender, byte order, unknown fields) stays byte-exact,
    which a re-marshalling through jeepney would not promise.  Raises
    :class:`WireError` if *msg* is not a well-formed ``JobRemoved(uoss)``.
    """
    if job_removed(msg) is None:
        raise WireError(f"{msg!r} is not a well-formed JobRemoved(uoss) signal")
    raw, e = msg.raw, ">" if msg.big_endian else "<"
    after_unit = skip_value(raw, msg.body_offset, _JOB_REMOVED_TYPES[:3], e, msg.size)
    start, _old = _string_at(raw, after_unit, e)
    text = result.encode()
    out = bytearray(raw[:start])
    out += struct.pack(e + "I", len(text)) + text + b"\0"
    struct.pack_into(e + "I", out, 4, len(out) - msg.body_offset)
    return Message(bytes(out))


class JobResult(Action):
    """Rewrite a ``JobRemoved`` signal's result to *result*: the job "ended badly".

    systemd really ran the job (the unit exists, its process is in it), but the
    client is told ``failed``, ``timeout``, ``canceled``, ``dependency``... A
    runtime must report the failure and leave nothing behind (runc PR 2331 and
    crun PR 331: ``StartTransientUnit job is not done: failed`` was ignored).
    *unit*, a glob (``runc-*.scope``), limits the rewrite to the jobs of
    matching units; other JobRemoved signals (and any other message the rule
    matches) go on untouched, though the rule's ``times`` counts them: match
    ``member=JobRemoved`` and name the unit.  Only the result's bytes and the
    body length change.
    """

    name = "job_result"
    incident = "neighbour: a job that ends badly (runc PR 2331, crun PR 331)"

    def __init__(self, result: str = "failed", unit: str | None = None) -> None:
        if result not in JOB_RESULTS:
            raise RuleError(
                f"JobResult result {result!r} is not a systemd job result: use one of "
                f"{', '.join(JOB_RESULTS)}"
            )
        if unit is not None and (not isinstance(unit, str) or not unit):
            raise RuleError(f"JobResult unit must be a unit name or glob, got {unit!r}")
        self.result = result
        self.unit = unit

    def apply(self, ctx: Context, msg: Message, fds: list[int]) -> list[Output]:
        job = job_removed(msg)
        if job is None or (self.unit is not None and not fnmatchcase(job[0], self.unit)):
            return [ctx.out(msg, fds)]
        fault = f"{self.describe()} (was {job[1]!r}, unit {job[0]})"
        return [ctx.out(with_job_result(msg, self.result), fds, fault=fault)]


# -- rules ------------------------------------------------------------------------------


@dataclass(eq=False)
class Rule:
    """An action applied to matching messages, optionally limited in count or rhythm.

    ``times(n)``: only the first *n* matches; ``every(n)``: every *n*-th match;
    ``probability(p)``: each match with probability *p* (seeded).

    A rule is a :class:`~pytest_runtimefaults.core.Fault`: it is injected by
    adding it to a proxy (or engine); ``start()`` returns it; ``lift()`` (and
    ``stop()``) remove it from the proxy it was bound to with :meth:`bind`
    (the D-Bus fixtures bind every rule to their proxy); ``applied`` counts the
    times its action ran.
    """

    action: Action
    match: Match = field(default_factory=Match)
    limit: int | None = None
    nth: int = 1
    chance: float = 1.0
    hits: int = 0  # matches seen
    applied: int = 0  # times the action ran
    # Not copied by dataclasses.replace(): a copy is a rule of its own, unbound.
    _removers: list[Callable[[Rule], object]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.action, Action):
            raise RuleError(f"a rule needs an Action, got {self.action!r}")
        if not isinstance(self.match, Match):
            raise RuleError(f"a rule needs a Match, got {self.match!r}")

    def times(self, n: int) -> Rule:
        return replace(self, limit=check_integer(n, "times(n)", 1))

    def every(self, n: int) -> Rule:
        return replace(self, nth=check_integer(n, "every(n)", 1))

    def probability(self, p: float) -> Rule:
        if (
            isinstance(p, bool)
            or not isinstance(p, (int, float))
            or not math.isfinite(p)
            or not 0.0 <= p <= 1.0
        ):
            raise RuleError(f"probability must be a number in [0, 1], got {p!r}")
        return replace(self, chance=float(p))

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

    # -- the Fault protocol --
    @property
    def name(self) -> str:
        """What the report calls this fault: the rule's description."""
        return self.describe()

    def bind(self, remove: Callable[[Rule], object]) -> Rule:
        """Make :meth:`lift` call *remove(rule)* (e.g. ``proxy.remove``); returns the rule.

        A rule added to two proxies is bound to both, and lifted from both.
        """
        self._removers.append(remove)
        return self

    def start(self) -> Self:
        """A rule acts once it is added to a proxy or engine: nothing more to do."""
        return self

    def lift(self) -> None:
        """Remove the rule from the proxies it was bound to; held messages go on.

        Idempotent: the bindings go with the lift, so a rule added again later
        (a module-level rule a second test adds) is bound and lifted anew.
        """
        removers, self._removers = self._removers, []
        for remove in removers:
            remove(self)

    def stop(self) -> None:
        """The same as :meth:`lift`: a rule holds nothing of its own."""
        self.lift()
