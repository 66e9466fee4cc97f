"""SignalFlood's decisions, without sockets: what the engine writes behind a matched message."""

from __future__ import annotations

import pytest
from jeepney import DBusAddress, new_method_call
from jeepney.low_level import Message as JMessage

from pytest_runtimefaults.dbus.engine import SYNTH_SERIAL_BASE, FaultEngine
from pytest_runtimefaults.dbus.flood import SIGNALS, FloodSignal, SignalFlood
from pytest_runtimefaults.dbus.match import RuleError
from pytest_runtimefaults.dbus.trace import TO_BUS, TO_CLIENT
from pytest_runtimefaults.dbus.wire import Framer, Message, build_signal

SYSTEMD = ":1.7"


def _job_removed(serial: int = 41) -> Message:
    return build_signal(
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "JobRemoved",
        "uoss",
        (5, "/org/freedesktop/systemd1/job/5", "runc-c1.scope", "done"),
        serial=serial,
        sender=SYSTEMD,
    )


@pytest.mark.parametrize("kind", sorted(SIGNALS))
def test_the_burst_follows_the_message_from_its_sender_with_serials_of_its_own(kind: str) -> None:
    engine = FaultEngine([SignalFlood(50, kind).on(member="JobRemoved")])
    real = _job_removed()
    outputs = engine.on_message(3, TO_CLIENT, real, [], 0.0)
    assert outputs[0].data == real.raw  # the real message first, untouched
    assert {o.conn for o in outputs} == {3}
    assert {o.direction for o in outputs} == {TO_CLIENT}
    msgs = Framer().feed(b"".join(o.data for o in outputs[1:]))
    assert len(msgs) == 50  # each whole, each its own write
    assert {m.member for m in msgs} == {SIGNALS[kind].member}
    assert {m.sender for m in msgs} == {SYSTEMD}  # the upstream's name: the matched sender
    assert [m.serial for m in msgs] == list(range(SYNTH_SERIAL_BASE + 1, SYNTH_SERIAL_BASE + 51))
    assert all(m.destination is None for m in msgs)
    assert [o.fault is not None for o in outputs[1:]] == [True] + [False] * 49
    # a second burst takes the next serials: never one reused
    more = Framer().feed(b"".join(o.data for o in engine.on_message(3, TO_CLIENT, real, [], 0)[1:]))
    assert more[0].serial == SYNTH_SERIAL_BASE + 51


def test_a_call_to_the_bus_sends_the_burst_back_to_its_client() -> None:
    engine = FaultEngine([SignalFlood(3, "UnitNew", sender=SYSTEMD).on(member="RemoveMatch")])
    bus = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")
    j: JMessage = new_method_call(bus, "RemoveMatch", "s", ("type='signal'",))
    call = Message(j.serialise(serial=9))
    outputs = engine.on_message(1, TO_BUS, call, [], 0.0)
    assert [o.direction for o in outputs] == [TO_BUS, TO_CLIENT, TO_CLIENT, TO_CLIENT]
    assert outputs[1].fault == "SignalFlood(3, 'UnitNew', sender=':1.7'): 3 signals from :1.7"


def test_a_signal_that_does_not_fit_its_signature_is_refused_when_made() -> None:
    bad = FloodSignal("/x", "org.example.X", "Event", "u", lambda i: ("not a number",))
    with pytest.raises(RuleError, match=r"SignalFlood\(2, 'Event', sender=':1.7'\): cannot build"):
        SignalFlood(2, bad, sender=SYSTEMD)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"count": 0}, "SignalFlood count must be an integer in [1, 1000000], got 0"),
        ({"count": True}, "SignalFlood count must be an integer"),
        ({"signal": "Nope"}, "SignalFlood signal 'Nope': use one of"),
        ({"sender": 5}, "SignalFlood sender must be a bus name, got 5"),
    ],
)
def test_bad_arguments_name_what_was_wrong(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(RuleError) as info:
        SignalFlood(**kwargs)  # type: ignore[arg-type]
    assert words in str(info.value)
