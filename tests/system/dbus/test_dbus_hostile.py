"""One hostile client must not take the proxy down for the others.

A real ``runtimefaults proxy`` (a process of its own, so its memory is its own)
fronts a real dbus-daemon and the test service.  One client, a raw socket after
SASL and ``Hello``, sends each crafted message of issue 11 on a connection of
its own, while another (jeepney, through the proxy) keeps calling and opening
new connections.  Each crafted message ends its own connection only (the proxy
or the bus closes it); the legal ones (an unknown header field, an unknown
message type) are served; every other call succeeds; the proxy's RSS stays flat;
and SIGINT still stops the proxy, which prints its whole trace and its errors.

jeepney's parser, which the proxy used to skip unknown header fields, looped for
ever on an ``a()`` field: the loop thread never came back (RSS 18 -> 351 MiB in
12 s), every innocent call timed out and SIGINT was ignored.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from dbus_crafted import (
    crafted,
    message_type,
    method_call,
    string_array,
    with_field,
)
from dbus_helpers import NAME, PATH, service
from jeepney import DBusAddress, message_bus, new_method_call
from jeepney.io.blocking import open_dbus_connection
from jeepney.low_level import MessageType, Parser

from pytest_runtimefaults.dbus.bus import PrivateBus

pytestmark = pytest.mark.timeout(240)

SERVICE = DBusAddress(PATH, NAME, NAME)
DAEMON = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")
#: RSS growth allowed over the whole hostile run (the hang grew 333 MiB in 12 s).
RSS_SLACK_KIB = 16 * 1024
ROUNDS = 10  # times each crafted message is sent (on a new connection each time)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _hostile(
    path: str, payload: bytes, then: bytes = b"", *, eof: bool = False
) -> tuple[bool, list[object]]:
    """Connect, authenticate, say Hello, send *payload* (then *then*); read until EOF.

    With *eof*, shut the socket for writing after sending (a peer gone mid-message).

    Returns (whether the connection was closed on us within 10 s, the messages
    that came back: (type, reply_serial, body) of each).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(path)
        sock.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
        line = b""
        while not line.endswith(b"\r\n"):
            chunk = sock.recv(256)
            assert chunk, "the proxy closed the connection during SASL"
            line += chunk
        assert line.startswith(b"OK "), line
        hello = bytes(message_bus.Hello().serialise(serial=1))
        sock.sendall(b"BEGIN\r\n" + hello + payload + then)
        if eof:
            sock.shutdown(socket.SHUT_WR)
        parser = Parser()
        got: list[object] = []
        closed = False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not data:
                closed = True
                break
            parser.add_data(data)
            while (msg := parser.get_next_message()) is not None:
                got.append((msg.header.message_type, msg.header.fields.get(5), msg.body))
            if then and any(g[1] == 3 for g in got):  # type: ignore[index]
                break  # the probe (serial 3) was answered: the connection lives
        return closed, got
    finally:
        sock.close()


@dataclass
class Innocent:
    """A well-behaved client calling through the proxy all along, on new connections too."""

    address: str
    calls: int = 0
    connections: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                conn = open_dbus_connection(bus=self.address)
            except Exception as exc:
                self.failures.append(f"connect: {exc!r}")
                time.sleep(0.2)
                continue
            self.connections += 1
            try:
                for _ in range(20):
                    if self.stop.is_set():
                        break
                    reply = conn.send_and_get_reply(new_method_call(SERVICE, "Ping"), timeout=5)
                    assert reply.body == ("pong",), reply
                    self.calls += 1
                    # Paced: the proxy's trace (100 000 messages) must not be what grows.
                    time.sleep(0.01)
            except Exception as exc:
                self.failures.append(f"call: {exc!r}")
            finally:
                conn.close()


@pytest.fixture
def bus() -> Iterator[PrivateBus]:
    with PrivateBus() as b, service(b.address):
        yield b


def _start_proxy(bus: PrivateBus, rules: list[str]) -> tuple[subprocess.Popen[str], str]:
    argv = [sys.executable, "-m", "pytest_runtimefaults", "proxy", "--upstream", bus.address]
    for rule in rules:
        argv += ["--rule", rule]
    proc = subprocess.Popen(
        [*argv, "--trace"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    assert address.startswith("unix:path="), (address, proc.stderr.read() if proc.stderr else "")
    return proc, address


# Modes: no rule (crafted bytes go out on the hot path, the bus refuses them, the
# trace frames them later) and a rule that makes the proxy read every Ping's
# header fields (the crafted messages are Pings): then the proxy refuses them.
MODES = {
    "no-rule": [],
    "parsing-rule": ["FlipByteOrder() member=Ping interface=org.example.RuntimeFaults"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_a_hostile_client_closes_only_its_own_connection(bus: PrivateBus, mode: str) -> None:
    proc, address = _start_proxy(bus, MODES[mode])
    path = address.removeprefix("unix:path=")
    innocent = Innocent(address)
    thread = threading.Thread(target=innocent.run, daemon=True)
    try:
        thread.start()
        deadline = time.monotonic() + 30
        while innocent.calls < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert innocent.calls >= 50, innocent.failures
        rss_before = _rss_kib(proc.pid)
        calls_before = innocent.calls

        hostile = crafted() + [(name + " (big-endian)", raw) for name, raw in crafted(big=True)]
        hostile += [
            ("16 bytes of garbage", b"X" * 16),
            ("4 bytes, then EOF", b"l\x01\x00\x01"),
        ]
        outcomes: dict[str, str] = {}
        for _round in range(ROUNDS):  # repeated: a leak per message would show in the RSS
            for name, raw in hostile:
                closed, got = _hostile(path, raw, eof=name == "4 bytes, then EOF")
                # Closed on us: by the proxy, or by the bus that refused the message.
                outcomes[name] = "closed" if closed else f"open, got {len(got)} messages"
                assert closed, (name, got)

        # Legal input is served: an unknown header field, an unknown message type.
        probe = bytes(new_method_call(DAEMON, "GetId").serialise(serial=3))
        legal = with_field(
            bytes(new_method_call(DAEMON, "GetId").serialise(serial=2)), 42, b"as", string_array
        )
        closed, got = _hostile(path, legal, probe)
        assert (MessageType.method_return, 2) in [g[:2] for g in got], got  # type: ignore[index]
        typed5 = message_type(method_call(serial=2), 5)
        closed, got = _hostile(path, typed5, probe)
        assert (MessageType.method_return, 3) in [g[:2] for g in got], got  # type: ignore[index]

        # The innocent client kept going, and its memory did not grow.
        time.sleep(1)
        calls_during = innocent.calls - calls_before
        rss_after = _rss_kib(proc.pid)
        innocent.stop.set()
        thread.join(20)
        assert not innocent.failures, innocent.failures
        assert calls_during > 20, f"only {calls_during} calls went through meanwhile"
        print(
            f"\n{mode}: proxy RSS {rss_before} KiB before, {rss_after} KiB after "
            f"{ROUNDS * len(hostile) + 2} hostile connections; {calls_during} innocent calls "
            f"meanwhile on {innocent.connections} connections; outcomes: {outcomes}"
        )
        assert rss_after - rss_before < RSS_SLACK_KIB, (rss_before, rss_after)
    finally:
        innocent.stop.set()
        thread.join(20)
        proc.send_signal(signal.SIGINT)
        try:
            _out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError("runtimefaults proxy ignored SIGINT") from None
    assert proc.returncode == 0, err
    assert "relayed" in err  # the whole trace and the summary were printed
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    print("\n".join(errors))
    assert any("bad endianness byte 0x58" in e for e in errors), errors
    # The whole trace was printed (--trace), crafted entries said to be malformed.
    assert "[malformed: header field 42 at byte 152: signature 'a()' is invalid" in err
    if mode == "parsing-rule":
        for text in (
            "'a()' is invalid at 2: an empty struct",
            "lacks its NUL",
            "a dict entry outside an array",
            "nests containers more than 64 deep",
        ):
            assert any(text in e for e in errors), (text, errors)


def test_a_failing_test_reports_a_trace_of_hostile_messages(pytester: pytest.Pytester) -> None:
    # With no rule, the crafted bytes went out unparsed; the failing test's report
    # then read their header fields: INTERNALERROR, or pytest hung for ever.
    payloads = [raw.hex() for _name, raw in crafted() + crafted(big=True)]
    pytester.makepyfile(
        f"""
        import os, socket, time
        from jeepney import message_bus

        PAYLOADS = {payloads!r}

        def test_fails(dbus_proxy):
            for payload in PAYLOADS:
                sock = socket.socket(socket.AF_UNIX)
                sock.settimeout(10)
                sock.connect(str(dbus_proxy.socket_path))
                uid = str(os.getuid()).encode().hex().encode()
                sock.sendall(b"\\0AUTH EXTERNAL " + uid + b"\\r\\n")
                assert sock.recv(256).startswith(b"OK ")
                hello = bytes(message_bus.Hello().serialise(serial=1))
                sock.sendall(b"BEGIN\\r\\n" + hello + bytes.fromhex(payload))
                while sock.recv(65536):  # until the bus closes it
                    pass
                sock.close()
            assert False, "a failing test: its report prints the proxy's trace"
        """
    )
    result = pytester.runpytest_subprocess("-p", "runtimefaults", "--timeout=60")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "INTERNALERROR" not in out
    assert "Timeout" not in out
    assert "runtimefaults D-Bus trace (call)" in out
    assert "[malformed: header field 42" in out
    for text in ("an empty struct", "lacks its NUL", "a dict entry outside an array", "64 deep"):
        assert text in out, text
