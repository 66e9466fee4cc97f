"""The pure fault engine: which writes the proxy makes for each message it frames.

This module owns the decisions and the per-connection state they need (held
messages, calls awaiting replies) and each rewriting rule's one
:class:`~pytest_runtimefaults.dbus.actions.Rewriter` (shared by every
connection: a sender numbers its messages to all of them from one counter), and the proxy's
prefilter over them.  It has no socket and no clock of its own; the proxy
drives it with

* ``on_message(conn, direction, message, fds, now)``: the
  :class:`~pytest_runtimefaults.dbus.actions.Output` writes to make now;
* ``tick(now)``: the writes whose time has come (delays, holds);
  ``next_deadline()`` says when to call it next;
* ``add``/``remove``/``clear`` (rules), ``forget`` (a closed connection),
  ``bypass``/``passthrough``/``prefilter``/``idle``/``holding`` (the hot path's
  questions) and ``notes`` (faults that wrote nothing, for the trace).

It knows actions only through their interface: a one-shot action's
``apply()``, or, for an action with ``rewrites = True`` (serial rewriting), its
rewriter's ``rewrite()``, ``restore()`` and ``forget()``.  All randomness
comes from one ``random.Random(seed)``, so a run replays.  It imports the
actions, the grammar (rules given as text) and the codec.

Example::

    engine = FaultEngine([Delay(0.5).on(member="GetId")], seed=1)
    outputs = engine.on_message(1, TO_BUS, msg, [], time.monotonic())
"""

from __future__ import annotations

import random
import re
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pytest_runtimefaults.dbus.actions import (
    Action,
    Output,
    Rewriter,
    Rule,
    close_fds,
)
from pytest_runtimefaults.dbus.grammar import as_rule
from pytest_runtimefaults.dbus.trace import TO_BUS, TO_CLIENT
from pytest_runtimefaults.dbus.wire import (
    HeaderField,
    Message,
    MessageType,
    member_pattern,
    whole_messages_without,
)

__all__ = ["SYNTH_SERIAL_BASE", "FaultEngine"]

SYNTH_SERIAL_BASE = 0x7FFF0000  # serials of messages the proxy makes up (signals, errors)
_REPLIES = (MessageType.METHOD_RETURN, MessageType.ERROR)


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


class _MessageContext:
    """The engine's :class:`~pytest_runtimefaults.dbus.actions.Context` for one message."""

    def __init__(
        self, engine: FaultEngine, conn_id: int, conn: _Conn, direction: str, now: float
    ) -> None:
        self.engine = engine
        self.conn_id = conn_id
        self.conn = conn
        self.direction = direction
        self.now = now
        self.rng = engine.rng

    @property
    def answered(self) -> Sequence[int]:
        return self.conn.answered

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

    def last_signal(self) -> Message | None:
        return self.engine.last_signal.get(self.conn_id)

    def note(self, msg: Message, fault: str) -> None:
        self.engine.note(self.conn_id, self.direction, msg, fault)

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
        self._rewriting: list[Rule] = []  # rules whose action rewrites every match
        self._oneshot: list[Rule] = []  # rules whose action decides one message
        # One per rewriting rule, shared by every connection, made at its first match.
        self._rewriters: dict[Rule, Rewriter] = {}
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
        """Add a rule (or an action for every message, or a rule's text form); return it."""
        added = as_rule(rule)
        with self._lock:
            self.rules.append(added)
            self._index()
            self.idle = False
        return added

    def _index(self) -> None:
        self._rewriting = [r for r in self.rules if r.action.rewrites]
        self._oneshot = [r for r in self.rules if not r.action.rewrites]
        by_member: dict[bytes, list[Rule]] = {}
        unkeyed: list[Rule] = []
        watch_by_member: dict[bytes, list[Rule]] = {}
        watch_unkeyed: list[Rule] = []
        for rule in self._oneshot:
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

    @property
    def members(self) -> frozenset[bytes]:
        """The members the rules name: what :attr:`prefilter` looks for (the compiled loop too)."""
        return self._members

    def _update_prefilter(self) -> None:
        # A rewriting rule concerns replies to what it rewrote, which name no member.
        if (
            self.holding
            or self._rewriting
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
        if self.holding or self._rewriting:
            return False
        t = msg.type
        if t in _REPLIES and self._pending_calls:
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
            self._rewriters.pop(rule, None)
            self._index()
            if not self.rules:
                return self.clear()
            self._update_idle()
            return []

    def clear(self) -> list[Output]:
        """Remove every rule and release every held message now (returned as outputs)."""
        with self._lock:
            self.rules = []
            self._rewriters = {}
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
            and not self._rewriters
            and not any(conn.calls for conn in self._conns.values())
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
            for rewriter in self._rewriters.values():
                rewriter.forget(conn_id)
            if conn is not None:
                self._pending_calls -= len(conn.calls)
                for lane in conn.lanes.values():
                    for held in [*lane.queue, *lane.side]:
                        for out in held.outputs:
                            close_fds(out.fds)
            self._update_idle()

    # -- the decisions --
    def on_message(
        self, conn_id: int, direction: str, msg: Message, fds: list[int], now: float
    ) -> list[Output]:
        """The writes to make now for *msg*, read from *conn_id* going *direction*."""
        with self._lock:
            conn = self._conns.get(conn_id)
            if conn is None:
                conn = self._conns[conn_id] = _Conn()
            ctx = _MessageContext(self, conn_id, conn, direction, now)
            lane = conn.lanes[direction]
            waiting = list(lane.side)  # holds made by this very message do not count it
            outputs = self._decide(ctx, msg, fds)
            if not (lane.side or lane.queue or self.holding):
                return outputs
            outputs += self._count_down(lane, waiting)
            if lane.queue:
                # An ordered hold is active: everything queues behind it, in order.
                if outputs:
                    lane.queue.append(_Held(outputs, due=None, ordered=True))
                self._update_idle()
                return []
            self._update_idle()
            return outputs

    @staticmethod
    def _count_down(lane: _Lane, waiting: list[_Held]) -> list[Output]:
        """A message passed *lane*: release the count-based holds whose turn came."""
        released: list[Output] = []
        if not waiting:
            return released
        keep = []
        for held in lane.side:
            if held.after is not None and any(held is w for w in waiting):
                held.after -= 1
                if held.after <= 0:
                    released += held.outputs
                    continue
            keep.append(held)
        lane.side = keep
        return released

    def _decide(self, ctx: _MessageContext, msg: Message, fds: list[int]) -> list[Output]:
        direction = ctx.direction
        if msg.type == MessageType.SIGNAL and direction == TO_CLIENT:
            self.last_signal[ctx.conn_id] = msg
        # Rewriters map back what they changed (a reply to a rewritten serial) before
        # anything else looks at the message.
        note: str | None = None  # how rewriting changed the message, for the trace
        for mine in self._rewriters.values():
            restored = mine.restore(ctx.conn_id, direction, msg)
            if restored is not None:
                msg, note = restored
                break
        reply_rules = self._track_call(ctx.conn, direction, msg)
        for rule in self._rewriting:
            if not rule.match.matches(direction, msg):
                continue
            rewriter = self._rewriters.get(rule)
            if rewriter is None:
                rewriter = self._rewriters[rule] = rule.action.rewriter()
            rewritten, text = rewriter.rewrite(ctx.conn_id, direction, msg)
            rule.hits += 1
            if rewritten is None:  # withheld (a stalled sender)
                close_fds(fds)
                self.note(ctx.conn_id, direction, msg, text)
                return []
            rule.applied += 1
            msg, note = rewritten, text
        chosen = self._first_to_apply(direction, msg, reply_rules)
        if chosen is not None:
            return chosen.action.apply(ctx, msg, fds)
        return [ctx.out(msg, fds, fault=note)]

    def _track_call(self, conn: _Conn, direction: str, msg: Message) -> list[Rule]:
        """Note calls that reply_to rules watch; for a reply, the rules its call matched."""
        if msg.type in _REPLIES:
            rs = msg.reply_serial
            if rs is None:
                return []
            call_dir = TO_BUS if direction == TO_CLIENT else TO_CLIENT
            reply_rules = conn.calls.pop((call_dir, rs), [])
            if reply_rules:
                self._pending_calls -= 1
                self._update_prefilter()
            if direction == TO_CLIENT:
                conn.answered.append(rs)
            return reply_rules
        if msg.type == MessageType.METHOD_CALL and msg.expects_reply:
            watching = [
                r
                for r in self._oneshot
                if r.match.reply_to is not None and r.match.reply_to.matches(direction, msg)
            ]
            if watching:
                conn.calls[(direction, msg.serial)] = watching
                self._pending_calls += 1
                self._update_prefilter()
        return []

    def _first_to_apply(self, direction: str, msg: Message, reply_rules: list[Rule]) -> Rule | None:
        """The first one-shot rule that matches *msg* and whose turn it is (counted)."""
        for rule in self._oneshot:
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
            return rule
        return None

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
        self._pending_calls -= len(conn.calls)
        conn.calls.clear()
        self._update_prefilter()
        return outputs
