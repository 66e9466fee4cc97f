"""The unit files, stub targets and bus configuration a sandboxed systemd loads.

Text only (and one function that writes it): a unit directory of empty stub
targets, a ``dbus.socket`` and a ``dbus.service`` running its own bus is all
systemd needs to reach ``running`` in a fraction of a second, so nothing of
the host's unit files is ever read.

The bus is one of :data:`BUS_DAEMONS`:

* ``dbus-daemon``: socket-activated with ``--address=systemd:``; it serves
  both of ``dbus.socket``'s sockets (the usual one inside, and ``bus`` in the
  work directory for the host);
* ``dbus-broker``: ``dbus-broker-launch``, as Debian's and Fedora's
  ``dbus-broker.service`` runs it, reading our configuration.  The launcher
  takes one listening socket only (the first named ``dbus.socket``; it closes
  the others), so ``dbus.socket`` listens on the work directory's ``bus``
  alone and ``/run/dbus/system_bus_socket`` is a symlink to it (made by the
  service before it starts).  The launcher and the broker log to
  ``/run/systemd/journal/socket`` and exit when it is missing; the sandbox
  has no journald, so a socket unit of ours takes their datagrams and
  ``cat`` appends them to ``journal.log`` in the work directory (journal
  fields, one per line: ``MESSAGE=...``).

Example::

    install_units(workdir, extra_units={"sleeper.service": "[Service]\\nExecStart=sleep 1\\n"})
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "BROKER_CONFIG",
    "BUS_DAEMONS",
    "BUS_DAEMON_COMMANDS",
    "BUS_DAEMON_PACKAGES",
    "DBUS_CONFIG",
    "INNER_BUS_PATH",
    "JOURNAL_SOCKET",
    "STUB_TARGETS",
    "SYSTEMD",
    "TARGET",
    "bus_daemon_executable",
    "check_bus_daemon",
    "dbus_broker_service_unit",
    "dbus_service_unit",
    "dbus_socket_unit",
    "install_units",
    "journal_sink_units",
    "target_unit",
]

SYSTEMD = "/lib/systemd/systemd"
INNER_BUS_PATH = "/run/dbus/system_bus_socket"
TARGET = "runtimefaults-sandbox.target"
JOURNAL_SOCKET = "/run/systemd/journal/socket"  # where dbus-broker-launch logs (fixed in its code)
BUS_DAEMONS = ("dbus-daemon", "dbus-broker")
"""The buses the sandbox can run (``bus_daemon=``, ``--runtimefaults-bus-daemon``)."""
BUS_DAEMON_PACKAGES = {"dbus-daemon": "dbus-daemon", "dbus-broker": "dbus-broker"}
"""The Debian package of each bus."""
BUS_DAEMON_COMMANDS = {"dbus-daemon": "dbus-daemon", "dbus-broker": "dbus-broker-launch"}
"""The command each bus starts from (dbus-broker runs through its launcher)."""
_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # the sandbox's PATH (launcher.LAUNCHER_ENV)
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
# dbus-broker reads the same configuration; it ignores <listen> and <auth> (the
# socket is the one passed, EXTERNAL is all it speaks) and warns about the
# eavesdrop rule ("deprecated and ignored"), so its copy goes without that line.
BROKER_CONFIG = DBUS_CONFIG.replace('    <allow eavesdrop="true"/>\n', "")


def check_bus_daemon(bus_daemon: str) -> str:
    """*bus_daemon* if it is one of :data:`BUS_DAEMONS`; else a ValueError naming them."""
    if bus_daemon not in BUS_DAEMONS:
        raise ValueError(f"unknown bus daemon {bus_daemon!r}: use one of {', '.join(BUS_DAEMONS)}")
    return bus_daemon


def bus_daemon_executable(bus_daemon: str) -> str | None:
    """The path of the program that starts *bus_daemon* (None: not installed).

    ``dbus-broker`` needs both ``dbus-broker-launch`` and ``dbus-broker`` (the
    launcher execs the broker by name).
    """
    exe = shutil.which(BUS_DAEMON_COMMANDS[check_bus_daemon(bus_daemon)], path=_PATH)
    if bus_daemon == "dbus-broker" and shutil.which("dbus-broker", path=_PATH) is None:
        return None
    return exe


def target_unit() -> str:
    """The sandbox's default target: the bus, and nothing else."""
    return (
        "[Unit]\nDescription=runtimefaults sandbox\nDefaultDependencies=no\n"
        "Wants=dbus.socket dbus.service\nAfter=dbus.socket dbus.service\n"
    )


def dbus_socket_unit(host_socket: Path, bus_daemon: str = "dbus-daemon") -> str:
    """The bus's sockets: the usual one inside, and *host_socket* in the work directory.

    The host reaches the bus by a plain path: ``/proc/PID/root/...`` would
    resolve, by realpath, to the host's own ``/run/dbus/system_bus_socket`` and
    scare safety checks.  For ``dbus-broker``, *host_socket* only (the inner
    path is a symlink to it: :func:`dbus_broker_service_unit`).
    """
    inner = (
        "" if check_bus_daemon(bus_daemon) == "dbus-broker" else f"ListenStream={INNER_BUS_PATH}\n"
    )
    return (
        "[Unit]\nDefaultDependencies=no\n[Socket]\n"
        f"{inner}ListenStream={host_socket}\n"
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


def dbus_broker_service_unit(config: Path, host_socket: Path, log: Path) -> str:
    """``dbus-broker-launch`` on the socket systemd passes, reading *config*.

    As ``dbus-broker.service`` runs it (``Type=notify``: the launcher says
    READY once the broker listens), but with our configuration instead of
    ``/usr/share/dbus-1/system.conf``.  Before it starts,
    ``/run/dbus/system_bus_socket`` becomes a symlink to *host_socket*: the
    launcher connects to the bus it launched there (``sd_bus_open_system``),
    and so do systemd and the runtimes inside.  Its stdout and stderr (the
    fatal errors it prints before any log exists) go to *log*.
    """
    launcher = bus_daemon_executable("dbus-broker") or "/usr/bin/dbus-broker-launch"
    return (
        "[Unit]\nDefaultDependencies=no\nRequires=dbus.socket\nAfter=dbus.socket\n"
        "Wants=runtimefaults-journal.socket\nAfter=runtimefaults-journal.socket\n"
        "[Service]\nType=notify\nSockets=dbus.socket\n"
        f"ExecStartPre=/bin/ln -sfn {host_socket} {INNER_BUS_PATH}\n"
        f"ExecStart={launcher} --scope system --config-file={config}\n"
        f"StandardOutput=append:{log}\nStandardError=inherit\n"
    )


def journal_sink_units(log: Path) -> dict[str, str]:
    """A datagram socket on :data:`JOURNAL_SOCKET` whose datagrams ``cat`` appends to *log*.

    What dbus-broker needs of journald, and no more: a socket it can connect
    to and send its log records on (it logs lossily, so a slow reader never
    blocks the bus).
    """
    return {
        "runtimefaults-journal.socket": (
            "[Unit]\nDefaultDependencies=no\n"
            f"[Socket]\nListenDatagram={JOURNAL_SOCKET}\nSocketMode=0666\n"
        ),
        "runtimefaults-journal.service": (
            "[Unit]\nDefaultDependencies=no\n"
            "[Service]\nStandardInput=socket\n"
            f"StandardOutput=append:{log}\nStandardError=inherit\nExecStart=/bin/cat\n"
        ),
    }


def install_units(
    workdir: Path,
    extra_units: Mapping[str, str] | None = None,
    bus_daemon: str = "dbus-daemon",
) -> None:
    """Write ``units/``, an empty ``generators/`` and ``bus.conf`` into *workdir*.

    The bus's host-side socket is ``workdir/bus``; *bus_daemon* is one of
    :data:`BUS_DAEMONS` (dbus-broker also writes ``bus.log`` and
    ``journal.log`` there once it runs).  *extra_units* (file name -> content)
    are installed last, so they may replace a stub.
    """
    check_bus_daemon(bus_daemon)
    units = workdir / "units"
    units.mkdir()
    (workdir / "generators").mkdir()
    broker = bus_daemon == "dbus-broker"
    (workdir / "bus.conf").write_text(BROKER_CONFIG if broker else DBUS_CONFIG)
    for target in STUB_TARGETS:
        (units / target).write_text(_STUB)
    (units / TARGET).write_text(target_unit())
    (units / "dbus.socket").write_text(dbus_socket_unit(workdir / "bus", bus_daemon))
    if broker:
        service = dbus_broker_service_unit(
            workdir / "bus.conf", workdir / "bus", workdir / "bus.log"
        )
        for name, content in journal_sink_units(workdir / "journal.log").items():
            (units / name).write_text(content)
    else:
        service = dbus_service_unit(workdir / "bus.conf")
    (units / "dbus.service").write_text(service)
    for name, content in (extra_units or {}).items():
        (units / name).write_text(content)
