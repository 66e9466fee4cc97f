"""A burst of signals toward a client that is closing: :class:`SignalFlood`.

A neighbour of incident 2 (docs/incidents.md, "Signals flood while the
client closes"): godbus delivered each signal to the channel a program gave
``Conn.Signal``; with that channel full (or unbuffered) its reader blocked in
the send, holding the handler's lock, so a ``Close()`` or ``RemoveSignal``
that wanted the lock waited for ever (godbus issue 94, fixed by PR 105: a
close channel that unblocks the send); and the goroutines it started to
deliver to a full channel outlived ``RemoveSignal``, so a program that then
closed its channel died of ``panic: send on closed channel`` (godbus issue
158, fixed by PR 161).  Both need signals to arrive in numbers just as the
client stops reading them, which a real bus does only by chance.

:class:`SignalFlood` is an action of the rule engine: after each message its
rule matches, the proxy writes *count* well-formed signals toward that
connection's client, right behind it.  A rule says when the burst comes:

* ``.on(member="RemoveMatch")`` or ``.on(member="Unsubscribe")``: when the
  client starts to disconnect (what a client sends last before it closes);
* ``.on(member="JobRemoved")``: right after the signal runc's godbus waits
  for while it creates (and stops) a scope, after which it closes;
* ``.on_reply(member=...)``: behind the reply to a named method.

:func:`flood_now` sends a burst on demand, to one connection or to all.

The proxy learns that a client closed only from EOF, when nothing can reach
it any more; so a burst "while it closes" is armed on what the client does
last before closing, or sent on demand just before the test makes it close.

The signals are built by the proxy (:data:`SIGNALS`: systemd's
``PropertiesChanged`` of a unit, ``JobRemoved`` of unrelated jobs,
``UnitNew``, or any :class:`FloodSignal`), from the upstream's name (the
sender of the message that set the burst off, or of the last real signal the
client got, or *sender*), broadcast (no destination, as a bus delivers a
matched signal).  Their serials are the proxy's serials for the messages it
makes up (``FaultEngine.next_synth_serial``, from ``SYNTH_SERIAL_BASE``): one
counter for the whole proxy, never 0, never reused, so no two messages of the
burst, and no message of SignalBeforeReply or StrayReply, share one; they are
not fed through a :class:`~pytest_runtimefaults.dbus.serials.Serials` rule,
whose map is of one sender's real counter, which a made-up message is not on
(its serial would collide with the sender's next real one, or fall past the
boundary).

Example::

    proxy.add(SignalFlood(2000, "PropertiesChanged").on(member="RemoveMatch"))
    flood_now(proxy, count=500, signal="JobRemoved", sender=":1.4")
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pytest_runtimefaults.dbus.actions import Action, Context, Output, check_integer
from pytest_runtimefaults.dbus.match import RuleError
from pytest_runtimefaults.dbus.trace import TO_BUS, TO_CLIENT
from pytest_runtimefaults.dbus.wire import Message, WireError, build_signal

if TYPE_CHECKING:
    from pytest_runtimefaults.dbus.proxy import DBusFaultProxy

__all__ = ["MAX_COUNT", "SIGNALS", "FloodSignal", "SignalFlood", "flood_now"]

#: the most signals one burst may hold (about 200 MB of them): a bound on memory
MAX_COUNT = 1_000_000
_DRIVER = "org.freedesktop.DBus"
_LITTLE = ord("l")


@dataclass(frozen=True)
class FloodSignal:
    """One kind of signal a flood is made of; ``body(i)`` gives the *i*-th one's arguments.

    Example: a signal of a test interface::

        FloodSignal("/org/example/X", "org.example.X", "Event", "s", lambda i: (f"e{i}",))
    """

    path: str
    interface: str
    member: str
    signature: str
    body: Callable[[int], tuple[Any, ...]]

    def build(self, i: int, *, serial: int, sender: str | None) -> Message:
        """The *i*-th signal of a burst, with *serial*, from *sender*."""
        return build_signal(
            self.path,
            self.interface,
            self.member,
            self.signature,
            self.body(i),
            serial=serial,
            sender=sender,
        )


#: the signals a flood may name: what systemd sends a runtime in numbers
SIGNALS: dict[str, FloodSignal] = {
    # A unit's properties changed (systemd sends these for every unit that moves).
    "PropertiesChanged": FloodSignal(
        "/org/freedesktop/systemd1/unit/rf_2dflood_2eservice",
        "org.freedesktop.DBus.Properties",
        "PropertiesChanged",
        "sa{sv}as",
        lambda i: (
            "org.freedesktop.systemd1.Unit",
            {"ActiveState": ("s", "active"), "InvocationID": ("ay", i.to_bytes(16, "big"))},
            [],
        ),
    ),
    # Other units' jobs ending: a client waiting for its own job must ignore them.
    "JobRemoved": FloodSignal(
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "JobRemoved",
        "uoss",
        lambda i: (
            900_000 + i,
            f"/org/freedesktop/systemd1/job/{900_000 + i}",
            f"rf-flood-{i}.scope",
            "done",
        ),
    ),
    "UnitNew": FloodSignal(
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "UnitNew",
        "so",
        lambda i: (
            f"rf-flood-{i}.scope",
            f"/org/freedesktop/systemd1/unit/rf_2dflood_2d{i}_2escope",
        ),
    ),
}


def _signal(signal: str | FloodSignal) -> FloodSignal:
    if isinstance(signal, FloodSignal):
        return signal
    if isinstance(signal, str) and signal in SIGNALS:
        return SIGNALS[signal]
    raise RuleError(
        f"SignalFlood signal {signal!r}: use one of {sorted(SIGNALS)} or a FloodSignal(path, "
        "interface, member, signature, body)"
    )


def _check_sender(sender: object) -> str | None:
    if sender is not None and (not isinstance(sender, str) or not sender):
        raise RuleError(f"SignalFlood sender must be a bus name, got {sender!r}")
    return sender


def templates(signal: FloodSignal, count: int, sender: str | None) -> list[bytes]:
    """The bytes of *count* signals of *signal* from *sender*, serial still 1.

    Marshalling is the slow part (about 0.1 ms a message): done once per
    sender, outside the proxy's loop where it can be; :func:`burst` then only
    stamps serials.
    """
    return [signal.build(i, serial=1, sender=sender).raw for i in range(count)]


def _marshalled(signal: FloodSignal, count: int, sender: str | None, what: str) -> list[bytes]:
    """:func:`templates`, a :class:`RuleError` naming *what* if the signal cannot be built."""
    try:
        return templates(signal, count, sender)
    except (WireError, ValueError, TypeError, KeyError, struct.error) as exc:
        # A FloodSignal whose body does not fit its signature: say so at once.
        raise RuleError(f"{what}: cannot build its signal: {exc}") from exc


def burst(
    conn: int,
    raws: list[bytes],
    *,
    serial: Callable[[], int],
    fault: str,
) -> list[Output]:
    """Writes of the signals *raws* toward *conn*'s client, each with a new serial.

    Each signal is its own write, as a bus delivers them (the proxy's lane
    writes as many as the socket takes at once); the first names *fault* in
    the trace.  About 1 us a signal: this runs on the proxy's loop.
    """
    outputs = []
    for i, raw in enumerate(raws):
        data = bytearray(raw)
        # the serial is the fixed header's third word, in the message's byte order
        struct.pack_into("<I" if data[0] == _LITTLE else ">I", data, 8, serial())
        stamped = bytes(data)
        first = i == 0
        outputs.append(
            Output(
                conn,
                TO_CLIENT,
                stamped,
                [],
                Message(stamped) if first else None,
                fault if first else None,
            )
        )
    return outputs


class SignalFlood(Action):
    """Behind each message the rule matches, *count* signals toward the client.

    *signal* names one of :data:`SIGNALS` or is a :class:`FloodSignal`.
    The signals come from *sender*; by default from the upstream's name: the
    sender of the matched message when it came from the bus, else the sender
    of the last real signal this client got, else the destination of the
    matched call (the name the client was talking to).  The matched message
    itself goes on untouched, first.  godbus issues 94 and 158: a client
    whose reader delivers signals to a bounded channel that ``close()`` shuts
    while the reader still sends deadlocks or panics under it.
    """

    name = "signal_flood"
    incident = "neighbour: signals flood while the client closes (godbus issues 94, 158)"

    def __init__(
        self,
        count: int = 1000,
        signal: str | FloodSignal = "PropertiesChanged",
        sender: str | None = None,
    ) -> None:
        self.count = check_integer(count, "SignalFlood count", 1, MAX_COUNT)
        self.signal = _signal(signal)
        self.sender = _check_sender(sender)
        self.bursts = 0  # bursts queued (each of count signals)
        # the marshalled signals by sender; a named sender's are made now, off the loop
        self._raws: dict[str | None, list[bytes]] = {}
        if sender is not None:
            self._raws[sender] = self._templates(sender)

    def _templates(self, sender: str | None) -> list[bytes]:
        return _marshalled(self.signal, self.count, sender, self.describe())

    def describe(self) -> str:
        sender = f", sender={self.sender!r}" if self.sender else ""
        return f"SignalFlood({self.count}, {self.signal.member!r}{sender})"

    def _sender_for(self, ctx: Context, msg: Message) -> str | None:
        if self.sender is not None:
            return self.sender
        if ctx.direction == TO_CLIENT and msg.sender:
            return msg.sender
        last = ctx.last_signal()
        if last is not None and last.sender and last.sender != _DRIVER:
            return last.sender
        return msg.destination if ctx.direction == TO_BUS else None

    def apply(self, ctx: Context, msg: Message, fds: list[int]) -> list[Output]:
        sender = self._sender_for(ctx, msg)
        self.bursts += 1
        fault = f"{self.describe()}: {self.count} signals from {sender or 'no sender'}"
        raws = self._raws.get(sender)
        if raws is None:  # the first burst from a sender it could not know in advance
            raws = self._raws[sender] = self._templates(sender)
        outputs = burst(ctx.conn_id, raws, serial=ctx.synth_serial, fault=fault)
        return [ctx.out(msg, fds), *outputs]


def flood_now(
    proxy: DBusFaultProxy,
    *,
    count: int = 1000,
    signal: str | FloodSignal = "PropertiesChanged",
    sender: str | None = None,
    conn: int | None = None,
) -> int:
    """Send a burst of *count* signals now to connection *conn* (default: every one).

    Returns how many connections it went to.  *sender* defaults to the sender
    of the last real signal each connection's client got (the upstream's
    name), else none.  The burst is queued behind what the proxy already
    holds for each client and is in its trace as a fault.

    Example::

        flood_now(proxy, count=5000, signal="JobRemoved", sender=":1.1")
        client.close()  # while the burst arrives
    """
    kind = _signal(signal)
    count = check_integer(count, "flood_now count", 1, MAX_COUNT)
    _check_sender(sender)
    engine = proxy.engine
    # Marshalled here, in the caller's thread: the loop only stamps serials.
    made: dict[str | None, list[bytes]] = {}
    if sender is not None:
        made[sender] = _marshalled(kind, count, sender, "flood_now")

    def make(conn_ids: list[int]) -> list[Output]:
        if conn is not None and conn not in conn_ids:
            raise ValueError(
                f"flood_now: the proxy has no connection #{conn} (it has {conn_ids or 'none'})"
            )
        outputs: list[Output] = []
        with engine.lock:  # the serial counter is the engine's
            for cid in [conn] if conn is not None else conn_ids:
                last = engine.last_signal.get(cid)
                who = sender or (
                    last.sender if last is not None and last.sender != _DRIVER else None
                )
                if who not in made:
                    made[who] = _marshalled(kind, count, who, "flood_now")
                what = f"flood_now: {count} {kind.member} signals from {who or 'no sender'}"
                outputs += burst(cid, made[who], serial=engine.next_synth_serial, fault=what)
        return outputs

    return proxy.inject(make)
