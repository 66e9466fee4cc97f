"""JobResult: JobRemoved's result rewritten through the proxy, seen by real clients.

A job that "ends badly" (runc PR 2331, crun PR 331: ``StartTransientUnit job
is not done: failed`` was ignored).  A systemd-like emitter on a real
dbus-daemon sends ``JobRemoved(uoss)`` with result ``done``; a client behind
the proxy waits for its job.  A susceptible client (takes any JobRemoved of
its job as success, as runc before PR 2331 did) is fooled under the rule; a
correct one (compares the result with ``done``) reports the failure.  The
rewrite is checked byte for byte: only the result and the body length change.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from jeepney import DBusAddress, MatchRule, MessageType, new_signal
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import DBusConnection, open_dbus_connection
from jeepney.low_level import Endianness, HeaderFields, Message

from pytest_runtimefaults.dbus.actions import JOB_RESULTS, JobResult, job_removed, with_job_result
from pytest_runtimefaults.dbus.bus import PrivateBus
from pytest_runtimefaults.dbus.grammar import parse_rule
from pytest_runtimefaults.dbus.match import RuleError
from pytest_runtimefaults.dbus.proxy import DBusFaultProxy
from pytest_runtimefaults.dbus.wire import Message as WireMessage
from pytest_runtimefaults.dbus.wire import build_signal

pytestmark = pytest.mark.timeout(60)

MANAGER = DBusAddress("/org/freedesktop/systemd1", interface="org.freedesktop.systemd1.Manager")
JOB = "/org/freedesktop/systemd1/job/42"
BAD_RESULTS = ("failed", "timeout", "canceled", "dependency")


class JobNotDone(Exception):
    """What a correct client raises: the job ended, but not with ``done``."""


def _wait_job(conn: DBusConnection, job: str, *, check_result: bool) -> str:
    """Wait for *job*'s JobRemoved; return its result (raise if *check_result* and not done).

    ``check_result=False`` is the susceptible client: any JobRemoved of its
    job means "created" (runc before PR 2331 waited for the signal only).
    """
    while True:
        msg = conn.receive(timeout=5)
        if (
            msg.header.message_type == MessageType.signal
            and msg.header.fields.get(HeaderFields.member) == "JobRemoved"
            and msg.body[1] == job
        ):
            result = str(msg.body[3])
            if check_result and result != "done":
                raise JobNotDone(f"StartTransientUnit job is not done: {result}")
            return result


@pytest.fixture(scope="module")
def bus() -> Iterator[PrivateBus]:
    with PrivateBus() as b:
        yield b


@pytest.fixture
def proxy(bus: PrivateBus) -> Iterator[DBusFaultProxy]:
    with DBusFaultProxy(upstream=bus.address, seed=1) as p:
        yield p
    assert p.errors == []


@pytest.fixture
def emitter(bus: PrivateBus) -> Iterator[DBusConnection]:
    """The "systemd": straight on the bus, not through the proxy."""
    c = open_dbus_connection(bus=bus.address)
    yield c
    c.close()


@pytest.fixture
def client(proxy: DBusFaultProxy) -> Iterator[DBusConnection]:
    """The runtime's side: through the proxy, subscribed to JobRemoved."""
    c = open_dbus_connection(bus=proxy.address)
    rule = MatchRule(type="signal", interface=MANAGER.interface, member="JobRemoved")
    c.send_and_get_reply(message_bus.AddMatch(rule), timeout=5)
    yield c
    c.close()


def _emit(emitter: DBusConnection, unit: str = "runc-rf.scope", job: str = JOB) -> None:
    emitter.send(new_signal(MANAGER, "JobRemoved", "uoss", (42, job, unit, "done")))


@pytest.mark.parametrize("check_result", [False, True], ids=["susceptible", "correct"])
def test_without_the_rule_both_clients_see_done(
    emitter: DBusConnection, client: DBusConnection, check_result: bool
) -> None:
    _emit(emitter)
    assert _wait_job(client, JOB, check_result=check_result) == "done"


@pytest.mark.parametrize("result", BAD_RESULTS)
def test_the_susceptible_client_is_fooled_and_the_correct_one_reports(
    proxy: DBusFaultProxy, emitter: DBusConnection, client: DBusConnection, result: str
) -> None:
    rule = proxy.add(JobResult(result, unit="runc-*.scope").on(member="JobRemoved"))
    _emit(emitter)
    # Susceptible: it takes the job's end as success, the unit "created".
    assert _wait_job(client, JOB, check_result=False) == result
    _emit(emitter)
    with pytest.raises(JobNotDone, match=f"job is not done: {result}$"):
        _wait_job(client, JOB, check_result=True)
    assert rule.applied == 2
    faults = [e.fault for e in proxy.trace.entries() if e.fault]
    assert len(faults) == 2, faults
    assert all("was 'done', unit runc-rf.scope" in f for f in faults), faults


def test_other_units_jobs_go_on_untouched(
    proxy: DBusFaultProxy, emitter: DBusConnection, client: DBusConnection
) -> None:
    proxy.add(JobResult("failed", unit="runc-*.scope").on(member="JobRemoved"))
    other = "/org/freedesktop/systemd1/job/7"
    _emit(emitter, unit="dbus.service", job=other)
    _emit(emitter)
    assert _wait_job(client, other, check_result=True) == "done"
    assert _wait_job(client, JOB, check_result=False) == "failed"


@pytest.mark.parametrize("big", [False, True], ids=["little", "big"])
def test_the_rewrite_changes_only_the_result_and_the_body_length(big: bool) -> None:
    msg = build_signal(
        MANAGER.object_path,
        "org.freedesktop.systemd1.Manager",
        "JobRemoved",
        "uoss",
        (42, JOB, "runc-rf.scope", "done"),
        serial=0xFFFFFFF0,
        sender=":1.7",
        destination=":1.9",
        big_endian=big,
    )
    out = with_job_result(msg, "dependency")
    e = ">" if big else "<"
    decoded = Message.from_buffer(out.raw)
    assert decoded.header.endianness == (Endianness.big if big else Endianness.little)
    assert decoded.body == (42, JOB, "runc-rf.scope", "dependency")
    assert out.serial == msg.serial
    assert out.sender == ":1.7"
    assert out.destination == ":1.9"
    # The header is byte-exact but for the body length word (bytes 4-8).
    assert out.raw[:4] == msg.raw[:4]
    assert out.raw[8 : msg.body_offset] == msg.raw[8 : msg.body_offset]
    assert struct.unpack_from(e + "I", out.raw, 4)[0] == out.size - out.body_offset
    assert job_removed(out) == ("runc-rf.scope", "dependency")


def test_a_message_that_is_not_jobremoved_is_not_one() -> None:
    msg = build_signal("/x", "org.example.X", "JobRemoved", "s", ("done",), serial=3)
    assert job_removed(msg) is None
    truncated = WireMessage(
        build_signal(
            MANAGER.object_path, MANAGER.interface or "", "JobRemoved", "u", (1,), serial=4
        ).raw
    )
    assert job_removed(truncated) is None


@pytest.mark.parametrize("result", BAD_RESULTS)
def test_the_text_form_accepts_each_result(result: str) -> None:
    rule = parse_rule(f"JobResult('{result}', unit='crun-*.scope') member=JobRemoved times=1")
    assert isinstance(rule.action, JobResult)
    assert (rule.action.result, rule.action.unit, rule.limit) == (result, "crun-*.scope", 1)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("JobResult('broken') member=JobRemoved", ["JobResult result 'broken'", "failed"]),
        ("JobResult(3)", ["JobResult result 3"]),
        ("JobResult('failed', unit='')", ["JobResult unit", "''"]),
        ("JobResult('failed', colour='red')", ["colour"]),
    ],
)
def test_a_bad_result_word_is_a_clear_rule_error(text: str, words: list[str]) -> None:
    with pytest.raises(RuleError) as info:
        parse_rule(text)
    message = str(info.value)
    assert message.startswith(f"rule {text!r}: ")
    for word in words:
        assert word in message
    if "result" in words[0]:
        assert all(r in message for r in JOB_RESULTS)
