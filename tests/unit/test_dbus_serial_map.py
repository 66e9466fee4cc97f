"""Serials as pure code, through the engine: one sequence per sender, shared by connections.

A bus peer numbers every message it sends from one counter, so the fake serials
are a function of the sender and its real serial: the same on every proxied
connection, with the real gaps, the boundary and a stall at the same message.
"""

from __future__ import annotations

import pytest
from jeepney import DBusAddress, HeaderFields, new_method_call, new_method_return, new_signal
from jeepney.low_level import Message as JMessage

from pytest_runtimefaults.dbus.rules import FaultEngine, RuleError, Serials, parse_rule
from pytest_runtimefaults.dbus.trace import TO_BUS, TO_CLIENT
from pytest_runtimefaults.dbus.wire import Message

SVC = ":1.7"
OBJ = DBusAddress("/x", "org.example.X", "org.example.X")


def _wire(m: JMessage, serial: int, sender: str | None, dest: str | None = None) -> Message:
    if sender is not None:
        m.header.fields[HeaderFields.sender] = sender
    if dest is not None:
        m.header.fields[HeaderFields.destination] = dest
    return Message(bytes(m.serialise(serial=serial)))


def signal(serial: int, sender: str | None = SVC, dest: str | None = None) -> Message:
    return _wire(new_signal(OBJ, "Tick"), serial, sender, dest)


def call(serial: int, sender: str | None = SVC) -> Message:
    return _wire(new_method_call(OBJ, "Ask"), serial, sender)


def reply_to(fake: int, serial: int, dest: str | None = SVC) -> Message:
    m = new_method_return(new_method_call(OBJ, "Ask"))
    m.header.fields[HeaderFields.reply_serial] = fake
    return _wire(m, serial, None, dest)


def seen(engine: FaultEngine, conn: int, direction: str, msg: Message) -> int | None:
    """The serial the peer gets for *msg*, or None if it was withheld."""
    outs = engine.on_message(conn, direction, msg, [], 0.0)
    return Message(outs[0].data).serial if outs else None


def test_one_sequence_across_connections_with_the_gaps() -> None:
    engine = FaultEngine([Serials(start=0xFFFFFFF0, on_overflow="wrap").on(direction=TO_CLIENT)])
    # The service's serials 10..15, to connections 1, 2, 1, (someone unproxied), 2, 1
    got = [seen(engine, c, TO_CLIENT, signal(s)) for c, s in [(1, 10), (2, 11), (1, 12)]]
    got += [seen(engine, 2, TO_CLIENT, signal(14)), seen(engine, 1, TO_CLIENT, signal(15))]
    assert got == [0xFFFFFFF0, 0xFFFFFFF1, 0xFFFFFFF2, 0xFFFFFFF4, 0xFFFFFFF5]
    # a broadcast delivered to both connections has one serial, and a late one its own
    assert seen(engine, 1, TO_CLIENT, signal(16)) == seen(engine, 2, TO_CLIENT, signal(16))
    assert seen(engine, 2, TO_CLIENT, signal(13)) == 0xFFFFFFF3
    # past the boundary, "wrap" continues at 1, the same for both
    assert seen(engine, 1, TO_CLIENT, signal(26)) == 1
    assert seen(engine, 2, TO_CLIENT, signal(28)) == 3


def test_stall_starts_at_the_same_message_of_the_sender_everywhere() -> None:
    rule = Serials(start=0xFFFFFFFE, on_overflow="stall").on(direction=TO_CLIENT)
    engine = FaultEngine([rule])
    assert seen(engine, 1, TO_CLIENT, signal(5)) == 0xFFFFFFFE
    assert seen(engine, 1, TO_CLIENT, signal(6)) == 0xFFFFFFFF
    assert seen(engine, 2, TO_CLIENT, signal(7)) is None  # the first past the boundary
    assert seen(engine, 1, TO_CLIENT, signal(8)) is None
    assert [n[3].endswith("stalled") for n in engine.notes] == [True, True]
    assert "passed 0xffffffff" in engine.notes[0][3]
    # another sender, and the bus driver (numbered per connection), are not stalled
    assert seen(engine, 2, TO_CLIENT, signal(900, sender=":1.9")) == 0xFFFFFFFE
    assert seen(engine, 2, TO_CLIENT, signal(1, sender="org.freedesktop.DBus")) == 0xFFFFFFFE
    assert seen(engine, 1, TO_CLIENT, signal(1, sender="org.freedesktop.DBus")) == 0xFFFFFFFE


def test_cycle_skips_a_serial_awaiting_a_reply_on_another_connection() -> None:
    rule = Serials(start=0xFFFFFFFE, on_overflow="cycle", cycle_to=0xFFFFFFFE)
    engine = FaultEngine([rule.on(direction=TO_CLIENT)])
    assert seen(engine, 1, TO_CLIENT, call(40)) == 0xFFFFFFFE  # to connection 1, unanswered
    assert seen(engine, 2, TO_CLIENT, signal(41)) == 0xFFFFFFFF
    assert seen(engine, 2, TO_CLIENT, signal(42)) == 0xFFFFFFFF  # cycled: 0xfffffffe skipped
    # the answer, travelling the other way on connection 1, is mapped back to serial 40
    (out,) = engine.on_message(1, TO_BUS, reply_to(0xFFFFFFFE, 3), [], 0.0)
    assert Message(out.data).reply_serial == 40
    assert seen(engine, 2, TO_CLIENT, signal(43)) == 0xFFFFFFFE  # no longer awaited


def test_default_cycle_continues_at_0x80000000() -> None:
    engine = FaultEngine([Serials(0xFFFFFFFF, on_overflow="cycle").on(direction=TO_CLIENT)])
    assert [seen(engine, 1 + s % 2, TO_CLIENT, signal(s)) for s in (1, 2, 4)] == [
        0xFFFFFFFF,
        0x80000000,
        0x80000002,
    ]


def test_a_closed_connection_no_longer_holds_a_serial() -> None:
    rule = Serials(start=0xFFFFFFFE, on_overflow="cycle", cycle_to=0xFFFFFFFE)
    engine = FaultEngine([rule.on(direction=TO_CLIENT)])
    seen(engine, 1, TO_CLIENT, call(40))
    engine.forget(1)
    seen(engine, 2, TO_CLIENT, signal(41))
    assert seen(engine, 2, TO_CLIENT, signal(42)) == 0xFFFFFFFE


def test_clients_own_serials_and_peer_to_peer_are_per_connection() -> None:
    engine = FaultEngine([Serials(start=0xFFFFFFF0, on_overflow="wrap").on()])
    # two clients both start at serial 1: two senders, each from start
    assert seen(engine, 1, TO_BUS, call(1, sender=None)) == 0xFFFFFFF0
    assert seen(engine, 2, TO_BUS, call(1, sender=None)) == 0xFFFFFFF0
    assert seen(engine, 2, TO_BUS, call(2, sender=None)) == 0xFFFFFFF1
    (back,) = engine.on_message(2, TO_CLIENT, reply_to(0xFFFFFFF1, 9, dest=":1.2"), [], 0.0)
    assert Message(back.data).reply_serial == 2
    # no SENDER field (a direct connection): the connection is the sender
    assert seen(engine, 3, TO_CLIENT, signal(7, sender=None)) == 0xFFFFFFF0
    assert seen(engine, 4, TO_CLIENT, signal(7, sender=None)) == 0xFFFFFFF0
    assert seen(engine, 4, TO_CLIENT, call(9, sender=None)) == 0xFFFFFFF2
    (ans,) = engine.on_message(4, TO_BUS, reply_to(0xFFFFFFF2, 1, dest=None), [], 0.0)
    assert Message(ans.data).reply_serial == 9


def test_removing_the_rule_forgets_the_mapping() -> None:
    engine = FaultEngine()
    rule = engine.add(Serials(start=0xFFFFFFF0).on(direction=TO_CLIENT))
    seen(engine, 1, TO_CLIENT, signal(3))
    engine.remove(rule)
    assert engine.idle
    assert seen(engine, 1, TO_CLIENT, signal(4)) == 4


@pytest.mark.parametrize("cycle_to", [0, 0x100000000, True, "1"])
def test_a_bad_cycle_to_is_a_rule_error_naming_it(cycle_to: object) -> None:
    with pytest.raises(RuleError, match="cycle_to"):
        Serials(on_overflow="cycle", cycle_to=cycle_to)  # type: ignore[arg-type]


def test_the_rule_text_form_takes_cycle_to_and_says_it_only_when_set() -> None:
    rule = parse_rule(
        "Serials(0xfffffff0, on_overflow='cycle', cycle_to=0xfffffff0) direction=to_client"
    )
    assert rule.action.describe() == (
        "Serials(start=4294967280, on_overflow='cycle', cycle_to=4294967280)"
    )
    assert Serials().describe() == "Serials(start=4294967280, on_overflow='stall')"


def test_memory_stays_bounded_on_long_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_runtimefaults.dbus import serials

    monkeypatch.setattr(serials, "_KEEP", 64)
    monkeypatch.setattr(serials, "_SENDERS", 16)
    rule = Serials(start=0xFFFFFFF0, on_overflow="cycle").on(direction=TO_CLIENT)
    engine = FaultEngine([rule])
    for s in range(1, 1000):  # calls never answered: each is remembered, then forgotten
        seen(engine, 1 + s % 3, TO_CLIENT, call(s))
    for n in range(40):  # many senders
        seen(engine, 1, TO_CLIENT, signal(1, sender=f":1.{100 + n}"))
    rewriter = next(iter(engine._rewriters.values()))
    assert isinstance(rewriter, serials.SerialRewriter)
    assert len(rewriter.senders) <= 16
    assert all(len(s.calls) <= 64 and len(s.awaiting) <= 64 for s in rewriter.senders.values())


def test_a_driver_that_always_sends_0xffffffff_is_no_overflow() -> None:
    # dbus-broker numbers every message of its driver 0xffffffff (src/bus/driver.c): a
    # constant sequence, not a sender past the boundary, so nothing stalls.
    engine = FaultEngine([Serials(start=0xFFFFFFF0, on_overflow="stall").on(direction=TO_CLIENT)])
    driver = "org.freedesktop.DBus"
    got = [seen(engine, 1, TO_CLIENT, signal(0xFFFFFFFF, sender=driver)) for _ in range(3)]
    assert got == [0xFFFFFFF0] * 3
    assert engine.notes == []
