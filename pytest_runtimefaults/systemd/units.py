"""The unit files, stub targets and bus configuration a sandboxed systemd loads.

Text only (and one function that writes it): a unit directory of empty stub
targets, a ``dbus.socket`` and a ``dbus.service`` running its own
dbus-daemon is all systemd needs to reach ``running`` in a fraction of a
second, so nothing of the host's unit files is ever read.

Example::

    install_units(workdir, extra_units={"sleeper.service": "[Service]\\nExecStart=sleep 1\\n"})
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "DBUS_CONFIG",
    "INNER_BUS_PATH",
    "STUB_TARGETS",
    "SYSTEMD",
    "TARGET",
    "dbus_service_unit",
    "dbus_socket_unit",
    "install_units",
    "target_unit",
]

SYSTEMD = "/lib/systemd/systemd"
INNER_BUS_PATH = "/run/dbus/system_bus_socket"
TARGET = "runtimefaults-sandbox.target"
STUB_TARGETS = (
    "sysinit.target",
    "basic.target",
    "sockets.target",
    "slices.target",
    "paths.target",
    "timers.target",
    "local-fs.target",
    "remote-fs.target",
    "network.target",
    "network-online.target",
    "multi-user.target",
    "default.target",
    "shutdown.target",
    "umount.target",
    "final.target",
)
_STUB = "[Unit]\nDefaultDependencies=no\n"
# A permissive system bus: the sandbox is private, root talks to it from the host.
DBUS_CONFIG = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow eavesdrop="true"/>
  </policy>
  <limit name="max_incoming_bytes">1000000000</limit>
  <limit name="max_outgoing_bytes">1000000000</limit>
  <limit name="max_message_size">100000000</limit>
</busconfig>
"""


def target_unit() -> str:
    """The sandbox's default target: the bus, and nothing else."""
    return (
        "[Unit]\nDescription=runtimefaults sandbox\nDefaultDependencies=no\n"
        "Wants=dbus.socket dbus.service\nAfter=dbus.socket dbus.service\n"
    )


def dbus_socket_unit(host_socket: Path) -> str:
    """The bus's sockets: the usual one inside, and *host_socket* in the work directory.

    The host reaches the bus by a plain path: ``/proc/PID/root/...`` would
    resolve, by realpath, to the host's own ``/run/dbus/system_bus_socket`` and
    scare safety checks.
    """
    return (
        "[Unit]\nDefaultDependencies=no\n[Socket]\n"
        f"ListenStream={INNER_BUS_PATH}\nListenStream={host_socket}\n"
        "SocketMode=0666\n"
    )


def dbus_service_unit(config: Path, dbus_daemon: str | None = None) -> str:
    """A socket-activated dbus-daemon reading *config* (default: the one on PATH)."""
    daemon = dbus_daemon or shutil.which("dbus-daemon") or "/usr/bin/dbus-daemon"
    return (
        "[Unit]\nDefaultDependencies=no\nRequires=dbus.socket\nAfter=dbus.socket\n"
        "[Service]\nType=notify\nNotifyAccess=main\n"
        f"ExecStart={daemon} --config-file={config} "
        "--address=systemd: --nofork --nopidfile --systemd-activation\n"
    )


def install_units(workdir: Path, extra_units: Mapping[str, str] | None = None) -> None:
    """Write ``units/``, an empty ``generators/`` and ``bus.conf`` into *workdir*.

    The bus's host-side socket is ``workdir/bus``.  *extra_units* (file name ->
    content) are installed last, so they may replace a stub.
    """
    units = workdir / "units"
    units.mkdir()
    (workdir / "generators").mkdir()
    (workdir / "bus.conf").write_text(DBUS_CONFIG)
    for target in STUB_TARGETS:
        (units / target).write_text(_STUB)
    (units / TARGET).write_text(target_unit())
    (units / "dbus.socket").write_text(dbus_socket_unit(workdir / "bus"))
    (units / "dbus.service").write_text(dbus_service_unit(workdir / "bus.conf"))
    for name, content in (extra_units or {}).items():
        (units / name).write_text(content)
