"""A real cookie overflow in a real, sandboxed systemd (issue 15, incident 2 calibrated).

The cookie of systemd's system-bus connection is found by value in its memory
and set just below 2^32 (:mod:`pytest_runtimefaults.systemd.cookie`); the
serials systemd really sends across 0xffffffff are read by a client through
the D-Bus proxy and compared with what ``Serials(on_overflow="cycle")`` makes
of the same calls.  Set RUNTIMEFAULTS_FAULT_TABLE=PATH to append one JSON line
per sequence and runtime outcome to PATH (the figures of docs/systemd.md).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from findings import judged
from jeepney import DBusAddress, new_method_call
from jeepney.io.blocking import DBusConnection, open_dbus_connection
from jeepney.low_level import Message, MessageFlag, MessageType
from naive_clients import SignedSerialClient

from pytest_runtimefaults.dbus.proxy import DBusFaultProxy
from pytest_runtimefaults.dbus.rules import Serials
from pytest_runtimefaults.dbus.trace import TO_CLIENT
from pytest_runtimefaults.expectations import Outcome
from pytest_runtimefaults.rootfs import build_bundle, build_rootfs
from pytest_runtimefaults.runtime import Runtime
from pytest_runtimefaults.systemd import HostSystemd, SandboxError, SystemdSandbox
from pytest_runtimefaults.systemd.cookie import (
    COOKIE_CYCLED,
    CookieWord,
    RealCookieOverflow,
    find_cookie,
    next_cookie,
)

pytestmark = [pytest.mark.needs("root"), pytest.mark.timeout(120)]

MANAGER = DBusAddress(
    "/org/freedesktop/systemd1",
    bus_name="org.freedesktop.systemd1",
    interface="org.freedesktop.systemd1.Manager",
)
PEER = DBusAddress(
    "/org/freedesktop/systemd1",
    bus_name="org.freedesktop.systemd1",
    interface="org.freedesktop.DBus.Peer",
)
BUS = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")
GET_UNIT = new_method_call(MANAGER, "GetUnit", "s", ("init.scope",))
PING = new_method_call(PEER, "Ping")
# 15 replies up to 0xffffffff, then 5 past it.
EXPECTED = [*range(0xFFFFFFF1, 0x1_0000_0000), *range(COOKIE_CYCLED, COOKIE_CYCLED + 5)]
RUNTIMES = [r for r in ("runc", "crun") if shutil.which(r)]


def _record(row: dict[str, Any]) -> None:
    path = os.environ.get("RUNTIMEFAULTS_FAULT_TABLE")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _systemd_version(sandbox: SystemdSandbox) -> str:
    return sandbox.inspector().version()


@pytest.fixture
def sandbox(systemd: SystemdSandbox | HostSystemd) -> SystemdSandbox:
    """The ``systemd`` fixture's sandbox (its layout from --runtimefaults-cgroup-layout)."""
    if not isinstance(systemd, SystemdSandbox):
        pytest.skip("a real cookie overflow needs a sandboxed systemd, not the host's")
    return systemd


@pytest.fixture
def proxy(sandbox: SystemdSandbox) -> Iterator[DBusFaultProxy]:
    with DBusFaultProxy(sandbox.bus_address, directory=sandbox.workdir) as p:
        yield p
        assert not p.errors, p.errors


@pytest.fixture
def client(proxy: DBusFaultProxy) -> Iterator[DBusConnection]:
    c = open_dbus_connection(bus=proxy.address)
    yield c
    c.close()


def _serial(c: DBusConnection, msg: Message) -> int:
    reply = c.send_and_get_reply(msg, timeout=5)
    assert reply.header.message_type == MessageType.method_return, reply.body
    return int(reply.header.serial)


def _unanswered(c: DBusConnection) -> None:
    msg = new_method_call(PEER, "Ping")
    msg.header.flags |= MessageFlag.no_reply_expected
    c.send(msg)


def _plain_calls(c: DBusConnection) -> list[int]:
    """20 answered calls of two kinds, with unanswered ones between: their reply serials."""
    seen = []
    for i in range(20):
        if i % 4 == 3:
            _unanswered(c)  # systemd receives it and sends nothing: no serial taken
        seen.append(_serial(c, GET_UNIT if i % 2 else PING))
    return seen


def _proxied_serials(proxy: DBusFaultProxy, sender: str) -> list[int]:
    """The serials of systemd's messages as the proxy received them (before any rule)."""
    return [
        int(e.serial)
        for e in proxy.trace.messages(TO_CLIENT)
        if e.fault is None and e.sender == sender and e.serial is not None
    ]


# -- the finder ---------------------------------------------------------------------------------


def test_the_finder_finds_one_word_that_follows_systemds_replies_only(
    sandbox: SystemdSandbox,
) -> None:
    word = find_cookie(sandbox)
    assert isinstance(word, CookieWord)
    assert word.rounds[-1] == 1
    print(word)
    again = find_cookie(sandbox)  # the same sd_bus, found again from scratch
    assert again.address == word.address
    fault = RealCookieOverflow(sandbox)
    fault.word = again  # read() through the found word, nothing written
    c = open_dbus_connection(bus=sandbox.bus_address)
    try:
        for msg in (PING, GET_UNIT, PING):
            serial = _serial(c, msg)
            assert fault.read() == serial
        before = fault.read()
        for _ in range(5):
            _unanswered(c)
        _serial(c, PING)
        assert fault.read() == before + 1  # 5 received, 1 sent
    finally:
        c.close()


def test_refuses_the_host_systemd_and_a_stopped_sandbox() -> None:
    host = object.__new__(HostSystemd)  # as the fixture gives it under --runtimefaults-host-systemd
    host.pid = 1
    with pytest.raises(SandboxError, match="only on a SystemdSandbox"):
        RealCookieOverflow(host).start()  # type: ignore[arg-type]
    with pytest.raises(SandboxError, match="not running"):
        RealCookieOverflow(SystemdSandbox()).start()
    for bad in (0, 0x1_0000_0000, True, "0xfffffff0"):
        with pytest.raises(ValueError, match=r"1\.\.0xffffffff"):
            RealCookieOverflow(SystemdSandbox(), bad)  # type: ignore[arg-type]


# -- the real sequence --------------------------------------------------------------------------


def test_real_serials_across_the_boundary(
    sandbox: SystemdSandbox,
    proxy: DBusFaultProxy,
    client: DBusConnection,
    record_property: Callable[[str, object], None],
) -> None:
    """systemd's next replies: 0xfffffff1 ... 0xffffffff, then 0x80000000 ... (PR 11818)."""
    systemd_name = sandbox.inspector().unique_name()
    with RealCookieOverflow(sandbox) as fault:
        assert fault.applied == 1
        assert fault.read() == 0xFFFFFFF0
        seen = _plain_calls(client)
        after = fault.read()
    # lift() wrote nothing back: systemd stays in the cycled range.
    assert fault.read() == after
    assert _serial(client, PING) == EXPECTED[-1] + 1
    version = _systemd_version(sandbox)  # (a call of its own: one more cookie)
    _record({"case": "real-cookie-sequence", "systemd": version, "serials": [hex(s) for s in seen]})
    record_property("real_cookie_serials", " ".join(map(hex, seen)))
    assert seen == EXPECTED, f"systemd {version}: {[hex(s) for s in seen]}"
    # The proxy saw the same serials arrive from systemd (dbus-daemon forwards them as sent).
    assert _proxied_serials(proxy, systemd_name) == [*EXPECTED, EXPECTED[-1] + 1]
    assert after == EXPECTED[-1]
    # The model of systemd's arithmetic agrees, step by step.
    model = [next_cookie(0xFFFFFFF0)]
    while len(model) < len(EXPECTED):
        model.append(next_cookie(model[-1]))
    assert model == EXPECTED


def test_serials_cycle_gives_the_client_the_real_sequence(
    sandbox: SystemdSandbox, proxy: DBusFaultProxy, client: DBusConnection
) -> None:
    """The same calls, once under Serials(cycle), once under the real overflow: equal."""
    systemd_name = sandbox.inspector().unique_name()
    rule = proxy.add(
        Serials(start=0xFFFFFFF1, on_overflow="cycle").on(direction=TO_CLIENT, sender=systemd_name)
    )
    emulated = _plain_calls(client)
    assert rule.applied == 20
    proxy.clear()
    real_before = _serial(client, PING)
    assert real_before < 0x1000  # the proxy no longer rewrites: systemd's own, small serials
    with RealCookieOverflow(sandbox):
        real = _plain_calls(client)
    assert emulated == real == EXPECTED


def test_systemds_own_calls_leave_gaps_and_serials_keeps_them(
    sandbox: SystemdSandbox,
    proxy: DBusFaultProxy,
    client: DBusConnection,
    record_property: Callable[[str, object], None],
) -> None:
    """Subscribe makes systemd track the caller: it calls dbus-daemon (AddMatch, GetNameOwner)
    on the same connection, and those calls take cookies no proxy in front of the client sees.

    The real serials the client gets then have gaps.  ``Serials`` maps a sender's real
    serial affinely (fake = real - first seen + start), so it keeps them, even those
    of messages no proxy sees: the emulated and the real sequences step alike.
    """
    script = ("GetUnit", "Subscribe", "GetUnit", "Unsubscribe", "GetUnit")
    calls = {
        "GetUnit": GET_UNIT,
        "Subscribe": new_method_call(MANAGER, "Subscribe"),
        "Unsubscribe": new_method_call(MANAGER, "Unsubscribe"),
    }
    systemd_name = sandbox.inspector().unique_name()
    proxy.add(
        Serials(start=0xFFFFFFF1, on_overflow="cycle").on(direction=TO_CLIENT, sender=systemd_name)
    )
    emulated = [_serial(client, calls[m]) for m in script]
    proxy.clear()
    with RealCookieOverflow(sandbox):
        real = [_serial(client, calls[m]) for m in script]
    record_property("real_cookie_subscribe", " ".join(map(hex, real)))
    _record(
        {
            "case": "real-cookie-gaps",
            "systemd": _systemd_version(sandbox),
            "script": script,
            "real": [hex(s) for s in real],
            "emulated": [hex(s) for s in emulated],
        }
    )
    gaps = [b - a for a, b in itertools.pairwise(real)]
    assert emulated[0] == 0xFFFFFFF1
    assert [b - a for a, b in itertools.pairwise(emulated)] == gaps, [hex(s) for s in emulated]
    # Subscribe and Unsubscribe are answered after calls of systemd's own.
    assert real[0] == 0xFFFFFFF1
    shown = [hex(s) for s in real]
    assert gaps[0] > 1, shown
    assert gaps[2] > 1, shown
    assert gaps[1] == 1, shown
    assert gaps[3] == 1, shown


def test_a_cookie_held_by_systemds_own_pending_call_is_skipped_after_the_wrap(
    sandbox: SystemdSandbox, record_property: Callable[[str, object], None]
) -> None:
    """sd-bus skips, once cycled, cookies its own calls still await replies for.

    An unprivileged caller makes systemd ask polkit (``CheckAuthorization``, an async
    call of systemd's on its system-bus connection); here the test owns the polkit name
    and holds the answer, so that call's cookie stays in use.  With the cookie set to
    0x7fffffff first, the held call gets a cookie just past 0x80000000; set to 0xfffffff0
    next, the replies run up to 0xffffffff, cycle, and step over the held one.
    """
    if sandbox.bus_daemon == "dbus-broker":
        # Seen in debian13-broker: systemd's CheckAuthorization never reached the
        # test's polkit name within 10 s (cause not investigated yet).
        pytest.skip("on dbus-broker systemd's polkit call never reached the test's name")
    polkit = open_dbus_connection(bus=sandbox.bus_address)
    child = None
    try:
        owned = polkit.send_and_get_reply(
            new_method_call(BUS, "RequestName", "su", ("org.freedesktop.PolicyKit1", 4)), timeout=5
        )
        assert owned.body == (1,)  # the primary owner
        RealCookieOverflow(sandbox, 0x7FFFFFFF).start()
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "busctl"]
        argv += ["--system", "--timeout=30", "call", "org.freedesktop.systemd1"]
        argv += ["/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager"]
        argv += ["StartUnit", "ss", "sockets.target", "replace"]
        child = subprocess.Popen(sandbox.command(argv), stderr=subprocess.DEVNULL)
        check = polkit.receive(timeout=10)
        while check.header.fields.get(3) != "CheckAuthorization":  # 3: MEMBER
            check = polkit.receive(timeout=10)
        held = int(check.header.serial)
        assert COOKIE_CYCLED <= held < COOKIE_CYCLED + 4, hex(held)
        RealCookieOverflow(sandbox, 0xFFFFFFF0).start()  # found again: a second, known write
        seen = [_serial(polkit, GET_UNIT) for _ in range(20)]
    finally:
        polkit.close()  # systemd's call then fails; busctl is told access denied
        if child is not None:
            child.kill()
            child.wait(timeout=10)
    record_property("real_cookie_skip", f"held {held:#x}: " + " ".join(map(hex, seen)))
    _record({"case": "real-cookie-skip", "held": hex(held), "serials": [hex(s) for s in seen]})
    expected = [next_cookie(0xFFFFFFF0, {held})]
    while len(expected) < 20:
        expected.append(next_cookie(expected[-1], {held}))
    assert held not in seen
    assert seen == expected, [hex(s) for s in seen]


# -- susceptible clients ------------------------------------------------------------------------


class MonotonicSerialClient:
    """A test-only client that drops a message whose serial is not above the last one it
    saw from that sender (a "duplicate" filter that assumes serials only grow, as a
    naive 32-bit counter would): it never sees the first reply past 0xffffffff."""

    def __init__(self, address: str) -> None:
        self.conn = open_dbus_connection(bus=address)
        self.last: dict[str, int] = {}
        self.serial = 100  # its own serials (jeepney numbered the Hello)

    def call(self, msg: Message) -> tuple[Any, ...]:
        self.serial += 1
        serial = self.serial
        self.conn.send(msg, serial=serial)
        while True:
            reply = self.conn.receive(timeout=2)
            sender = str(reply.header.fields.get(7, ""))  # 7: SENDER
            if reply.header.serial <= self.last.get(sender, 0):
                continue  # "a duplicate": dropped
            self.last[sender] = reply.header.serial
            if reply.header.fields.get(5) == serial:  # 5: REPLY_SERIAL
                return tuple(reply.body)

    def close(self) -> None:
        self.conn.close()


def test_a_monotonic_serial_client_fails_at_the_real_boundary(sandbox: SystemdSandbox) -> None:
    naive = MonotonicSerialClient(sandbox.bus_address)
    try:
        with RealCookieOverflow(sandbox, 0xFFFFFFFD):
            assert naive.call(GET_UNIT)  # 0xfffffffe
            assert naive.call(GET_UNIT)  # 0xffffffff
            with pytest.raises(TimeoutError):
                naive.call(GET_UNIT)  # 0x80000000: "not newer", dropped; the call times out
    finally:
        naive.close()
    good = open_dbus_connection(bus=sandbox.bus_address)
    try:
        assert _serial(good, GET_UNIT) > COOKIE_CYCLED  # jeepney matches reply_serial
    finally:
        good.close()


def test_a_signed_32_bit_serial_client_fails_after_the_real_overflow(
    sandbox: SystemdSandbox,
) -> None:
    naive = SignedSerialClient(sandbox.bus_address)
    if sandbox.bus_daemon == "dbus-broker":
        # dbus-broker numbers every message of its driver 0xffffffff (legal): such
        # a client fails at its Hello, before any overflow of systemd's.
        try:
            with pytest.raises(ValueError, match="invalid message serial"):
                naive.call(new_method_call(BUS, "Hello"))
        finally:
            naive.close()
        return
    try:
        naive.call(new_method_call(BUS, "Hello"))
        assert naive.call(GET_UNIT)  # systemd's serials are small: fine
        with RealCookieOverflow(sandbox), pytest.raises(ValueError, match="invalid message serial"):
            naive.call(GET_UNIT)
    finally:
        naive.close()
    good = open_dbus_connection(bus=sandbox.bus_address)
    try:  # a client with unsigned serials reads the same replies
        assert _serial(good, GET_UNIT) > 0xFFFFFFF1
    finally:
        good.close()


# -- runtimes -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_rootfs(tmp_path_factory.mktemp("rootfs") / "rootfs")


@pytest.mark.needs("runc|crun")
@pytest.mark.parametrize("name", RUNTIMES)
def test_runtime_lifecycle_across_the_real_boundary(
    name: str,
    sandbox: SystemdSandbox,
    proxy: DBusFaultProxy,
    rootfs: Path,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """runc or crun with --systemd-cgroup while systemd's real cookie crosses 0xffffffff."""
    bundle = build_bundle(tmp_path / "bundle", ["/bin/true"], rootfs=rootfs)
    inspector = sandbox.inspector()
    baseline = inspector.scopes_and_slices()
    systemd_name = inspector.unique_name()
    rt = Runtime(
        name, cgroup_driver="systemd", sandbox=sandbox, dbus_address=proxy.address, timeout=35
    )
    with RealCookieOverflow(sandbox, 0xFFFFFFFC) as fault:
        result = rt.lifecycle(bundle, "rf-cookie")
        after = fault.read()
    received = _proxied_serials(proxy, systemd_name)
    left = inspector.wait_gone({u.name for u in inspector.leftovers(baseline)}, timeout=3)
    processes = sandbox.processes()
    # Most of what systemd sends meanwhile goes elsewhere (signals nobody matched, its own
    # calls to dbus-daemon): the runtime's connection sees a subset of the sequence.
    crossed = after is not None and COOKIE_CYCLED <= after < 0xFFFFFFF0
    crossed = crossed and any(COOKIE_CYCLED <= s < 0xFFFFFFF0 for s in received)
    _record(
        {
            "case": "real-cookie-runtime",
            "runtime": name,
            "systemd": _systemd_version(sandbox),
            "ok": result.ok,
            "err": result.stderr.strip()[-200:],
            "received": [hex(s) for s in received],
            "cookie_after": hex(after or 0),
        }
    )
    # The test proves something only if the runtime's own connection saw the boundary.
    assert crossed, f"{name} got {[hex(s) for s in received]} from systemd, cookie {after!r}"
    if result.ok and not left and not processes:
        observed = Outcome.SURVIVES
    elif left or processes:
        observed = Outcome.LEAKS
    else:
        observed = Outcome.FAILS_CLEANLY
    detail = (
        f"rc {result.returncode}: {result.stderr.strip()[-200:]}; serials "
        f"{' '.join(map(hex, received))}; left {sorted(left)} {sorted(processes)}"
    )
    verdict = judged(record_property, name, "systemd:real-cookie-overflow", observed, detail)
    print(verdict.message)
    assert verdict.ok, verdict.message
