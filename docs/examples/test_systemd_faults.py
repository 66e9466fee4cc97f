"""runc or crun through the D-Bus fault proxy to a real systemd."""

import pytest

from pytest_runtimefaults.dbus.rules import SignalBeforeReply, SplitMessage


@pytest.mark.dbus_faults("Delay(1.0) reply_to=StartTransientUnit")
@pytest.mark.recovers(within=10)
def test_create_survives_a_slow_systemd(runtime, systemd_dbus_proxy, oci_bundle):
    result = runtime.lifecycle(oci_bundle)
    assert result.ok, result.stderr
    assert result.extra["create"] >= 1.0


@pytest.mark.recovers(within=10)
def test_create_survives_a_signal_before_the_reply(runtime, systemd_dbus_proxy, oci_bundle):
    systemd_dbus_proxy.add(SignalBeforeReply("JobRemoved").on_reply(member="StartTransientUnit"))
    systemd_dbus_proxy.add(SplitMessage(3).on(member="JobRemoved"))
    for i in range(5):
        result = runtime.lifecycle(oci_bundle, f"c{i}")
        assert result.ok, result.stderr
