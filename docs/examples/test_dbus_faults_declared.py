"""D-Bus faults declared with the marker, or added from the test."""

import subprocess
import time

import pytest

from pytest_runtimefaults.dbus.rules import Delay, ErrorReply, Serials

BUSCTL_GETID = ["org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetId"]


def busctl(proxy, *args):
    return subprocess.run(
        ["busctl", "--address", proxy.address, *args], capture_output=True, text=True, timeout=30
    )


@pytest.mark.dbus_faults("Delay(0.3) reply_to=GetId")
def test_marker_in_text_form(dbus_proxy):
    started = time.monotonic()
    assert busctl(dbus_proxy, "call", *BUSCTL_GETID).returncode == 0
    assert time.monotonic() - started >= 0.3


def test_rules_added_from_the_test(dbus_proxy):
    rule = dbus_proxy.add(
        ErrorReply("org.freedesktop.DBus.Error.NoReply", "systemd is gone").on(member="GetId")
    )
    result = busctl(dbus_proxy, "call", *BUSCTL_GETID)
    assert result.returncode != 0
    assert "systemd is gone" in result.stderr
    assert rule.applied == 1

    dbus_proxy.remove(rule)  # faults can be lifted while the proxy runs
    assert busctl(dbus_proxy, "call", *BUSCTL_GETID).returncode == 0


def test_a_delay_that_later_messages_overtake(dbus_proxy):
    dbus_proxy.add(Delay(0.2, ordered=False).on_reply(member="GetId").times(1))
    assert busctl(dbus_proxy, "call", *BUSCTL_GETID).returncode == 0
    (fault,) = [e for e in dbus_proxy.trace.faults() if "Delay" in e.fault]
    assert fault.type == "method_return"


@pytest.mark.recovers(within=5, probe=["true"])
def test_stalled_bus_then_recovery(dbus_proxy):
    # Incident 2: past serial 0xffffffff the sender delivers nothing more.
    dbus_proxy.add(Serials(start=0xFFFFFFFF, on_overflow="stall").on(direction="to_client"))
    result = busctl(dbus_proxy, "--timeout=1", "call", *BUSCTL_GETID)
    assert result.returncode != 0  # a client with a timeout fails within it
    # recovers lifts every rule after the body, then probes.
