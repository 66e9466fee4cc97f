"""dbus_proxy with no fault: hand its address to a real client and read the trace."""

import os
import subprocess


def test_busctl_through_the_proxy(dbus_proxy):
    # Give the process under test the proxy's address, never the host's bus.
    env = {**os.environ, **dbus_proxy.env}
    result = subprocess.run(
        ["busctl", "--system", "list", "--no-pager"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "org.freedesktop.DBus" in result.stdout

    # Every message is in the trace: direction, type, serial, member, size...
    calls = [e for e in dbus_proxy.trace.messages("to_bus") if e.type == "method_call"]
    assert [e.member for e in calls][:2] == ["Hello", "ListNames"]
    assert all(e.size > 0 for e in calls)


def test_a_private_bus_alone(dbus_bus):
    # dbus_bus is a real dbus-daemon in a private directory, removed after the test.
    result = subprocess.run(
        [
            "dbus-send",
            f"--bus={dbus_bus.address}",
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.GetId",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0
    assert dbus_bus.dir.is_dir()
