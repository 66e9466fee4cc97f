"""A private, real bus (dbus-daemon or dbus-broker), started in a temporary directory.

Tests must never disturb the host's system bus, so every test gets a
bus of its own: system-bus-like (``<type>system</type>``, EXTERNAL
authentication, unix fd passing) but with a permissive policy, so that a test
service may own any name (``org.freedesktop.systemd1`` included).

The bus is dbus-daemon or dbus-broker (``bus_daemon=``; the default follows
``--runtimefaults-bus-daemon``, as the systemd sandbox's does).  dbus-broker
runs without systemd: ``dbus-broker-launch`` gets the socket PrivateBus bound,
socket-activation style (``LISTEN_FDS``, fd 3, named ``dbus.socket``), finds
the bus it launched by ``DBUS_SYSTEM_BUS_ADDRESS`` (``DBUS_SESSION_BUS_ADDRESS``
for ``bus_type="user"``), and logs to ``/run/systemd/journal/socket``: it runs
in a mount namespace of its own (``unshare --mount``, private propagation)
where that path is a datagram socket of the bus's directory, which PrivateBus
reads (readiness: the launcher's ``Ready``; its last records go into
:meth:`PrivateBus.exit_report`).  The host's ``/run/systemd`` is never touched.

Example::

    with PrivateBus() as bus:
        subprocess.run(["busctl", "--address", bus.address, "list"], check=True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from pytest_runtimefaults.journal import Journal

__all__ = ["BUS_DAEMONS", "BUS_TRAITS", "BusError", "BusTraits", "PrivateBus"]

BUS_DAEMONS = ("dbus-daemon", "dbus-broker")
"""The buses :class:`PrivateBus` can run (``bus_daemon=``)."""


@dataclasses.dataclass(frozen=True)
class BusTraits:
    """What a bus does differently, where a client or a test can see it (measured).

    Measured on dbus-daemon 1.14.10 / 1.16.2 and dbus-broker 37 (Debian 12, 13);
    docs/dbus-proxy.md, "On dbus-broker".
    """

    #: the serial of every message the bus driver sends (None: it counts up from 1).
    #: dbus-broker's is 0xffffffff, a legal serial that a signed 32-bit client reads as -1.
    driver_serial: int | None
    #: whether ``max_connections_per_user`` caps connections (dbus-broker only scales
    #: its per-user byte and fd quotas by it)
    counts_connections: bool
    #: how the bus refuses root's connection past the cap of a
    #: :class:`~pytest_runtimefaults.dbus.limits.ConnectionCap` (``cap.refusal``)
    cap_refusals: tuple[str, ...]


BUS_TRAITS = {
    "dbus-daemon": BusTraits(
        driver_serial=None,
        counts_connections=True,
        cap_refusals=(
            "org.freedesktop.DBus.Error.LimitsExceeded: The maximum number of active "
            "connections for UID 0 has been reached",
        ),
    ),
    # It closes the connection during the handshake, saying nothing (its fd quota).
    "dbus-broker": BusTraits(
        driver_serial=0xFFFFFFFF,
        counts_connections=False,
        cap_refusals=(
            "connect or handshake: [Errno 104] Connection reset by peer",
            "connect or handshake: [Errno 32] Broken pipe",
        ),
    ),
}
""":class:`BusTraits` by bus daemon (:attr:`PrivateBus.traits` is its bus's)."""

# The journal's socket: a fixed path in dbus-broker (launcher.c opens it by name).
_JOURNAL_DIR = "/run/systemd/journal"
# Runs in the launcher's own mount namespace (unshare --mount: private
# propagation, so nothing here reaches the host's mounts).  $1: where a tmpfs
# goes so that /run/systemd/journal can exist ("" when it already does);
# $2: the directory whose "socket" becomes /run/systemd/journal/socket; then
# the launcher's command line.  LISTEN_PID=$$: exec keeps the shell's pid.
# $RF_LISTEN_FD, the listening socket, becomes fd 3 (SD_LISTEN_FDS_START) here,
# in the shell: a preexec_fn in Python is unsafe in a process with threads.
_BROKER_SCRIPT = f"""set -e
case "$RF_LISTEN_FD" in
  3) ;;
  *[!0-9]*|"") exit 90 ;;
  *) eval "exec 3<&$RF_LISTEN_FD $RF_LISTEN_FD<&-" ;;
esac
unset RF_LISTEN_FD
if [ -n "$1" ]; then mount -t tmpfs -o mode=0755,size=1m runtimefaults-journal "$1"; fi
mkdir -p {_JOURNAL_DIR}
mount --bind "$2" {_JOURNAL_DIR}
shift 2
LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=dbus.socket exec "$@"
"""
# Reads dbus-broker's journal records on fd 0 (a datagram socket) and appends
# their MESSAGE to the file argv[1], one a line, flushed: until it is ended.
_SINK_READER = """import os, sys
from pytest_runtimefaults.dbus.bus import _journal_field
with open(sys.argv[1], "ab", buffering=0) as log:
    while True:
        message = _journal_field(os.read(0, 1 << 17), b"MESSAGE")
        if message is not None:
            log.write(message.rstrip(b"\\n").replace(b"\\n", b" ") + b"\\n")
"""

_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>{bus_type}</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <auth>ANONYMOUS</auth>
  <allow_anonymous/>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="*"/>
    <allow eavesdrop="true"/>
  </policy>
  <limit name="max_message_size">{max_message_size}</limit>
  <limit name="max_incoming_bytes">{max_incoming}</limit>
  <limit name="max_outgoing_bytes">{max_incoming}</limit>
  <limit name="reply_timeout">{reply_timeout_ms}</limit>
{extra_limits}</busconfig>
"""


class BusError(RuntimeError):
    """The private bus could not be started; the message says why."""


class PrivateBus:
    """A dbus-daemon (or dbus-broker) of our own, in a private 0700 directory.

    ``address`` is ``unix:path=DIR/bus``.  ``stop()`` ends the daemon (by its PID)
    and removes the directory; both ``start()`` and ``stop()`` are idempotent.
    *limits* adds ``<limit>`` entries to its configuration (``bus.conf`` in
    its directory; :class:`~pytest_runtimefaults.dbus.limits.ConnectionCap`
    changes it while it runs).
    Both are recorded in a cleanup journal (*journal*, else the default one) as
    they are created, so a killed owner's bus is reaped by the next run.
    *bus_daemon* is ``"dbus-daemon"`` or ``"dbus-broker"`` (None: the
    session's default, :func:`~pytest_runtimefaults.systemd.default_bus_daemon`,
    which ``--runtimefaults-bus-daemon`` sets); *dbus_daemon* is the
    dbus-daemon program to run (dbus-daemon only).  On dbus-broker ``pid`` is
    the launcher's (the broker is its child and ends with it), and it needs
    root (a mount namespace for its journal socket).
    """

    def __init__(
        self,
        *,
        bus_type: str = "system",
        directory: str | Path | None = None,
        max_message_size: int = 2**27,
        reply_timeout: float = 25.0,
        start_timeout: float = 5.0,
        journal: Journal | None = None,
        dbus_daemon: str = "dbus-daemon",
        limits: Mapping[str, int] | None = None,
        bus_daemon: str | None = None,
    ) -> None:
        if bus_daemon is None:
            # The session's bus (--runtimefaults-bus-daemon): a bus a test builds
            # itself follows the option, as the sandbox's does.
            from pytest_runtimefaults.systemd.sandbox import default_bus_daemon

            bus_daemon = default_bus_daemon()
        if bus_daemon not in BUS_DAEMONS:
            raise ValueError(
                f"PrivateBus bus_daemon={bus_daemon!r}: use one of {', '.join(BUS_DAEMONS)}"
            )
        #: ``"dbus-daemon"`` or ``"dbus-broker"``: which bus this is
        self.bus_daemon = bus_daemon
        self.bus_type = bus_type
        self._parent = Path(directory) if directory else None
        self.max_message_size = max_message_size
        self.reply_timeout = reply_timeout
        self.start_timeout = start_timeout
        # Journaled even outside pytest: if the owner is killed before stop(), the next
        # pytest run (or `runtimefaults cleanup`) ends the daemon and removes its dir.
        self.journal = journal if journal is not None else Journal.default()
        self.dbus_daemon = dbus_daemon
        #: more ``<limit name=...>`` of its configuration (e.g. ``max_connections_per_user``)
        self.limits = dict(limits or {})
        for name, value in self.limits.items():
            if not re.fullmatch(r"[a-z_]+", name) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"PrivateBus limits: {name!r}={value!r} is not a limit name and an int >= 0 "
                    "(e.g. limits={'max_connections_per_user': 8})"
                )
        self.dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""
        self._rids: list[int] = []
        # dbus-broker only: the process that reads its journal socket into
        # journal.log (MESSAGE fields, one a line).
        self._sink_reader: subprocess.Popen[bytes] | None = None

    @property
    def traits(self) -> BusTraits:
        """How this bus differs from the other (:data:`BUS_TRAITS`)."""
        return BUS_TRAITS[self.bus_daemon]

    @property
    def socket_path(self) -> Path:
        if self.dir is None:
            raise BusError("the bus is not started")
        return self.dir / "bus"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def env(self) -> dict[str, str]:
        """Environment entries that point a client at this bus (pass as ``env=``)."""
        return {"DBUS_SYSTEM_BUS_ADDRESS": self.address, "DBUS_SESSION_BUS_ADDRESS": self.address}

    def start(self) -> PrivateBus:
        if self.process is not None:
            return self
        if self.bus_daemon == "dbus-broker":
            return self._start_broker()
        exe = shutil.which(self.dbus_daemon)
        if exe is None:
            raise BusError(f"{self.dbus_daemon} not found: apt-get install dbus-daemon")
        self.dir = Path(tempfile.mkdtemp(prefix="rf-bus-", dir=self._parent))
        if self.journal:
            self._rids.append(self.journal.add("path", path=str(self.dir)))
        config = self.dir / "bus.conf"
        config.write_text(self._config())
        try:
            self.process = subprocess.Popen(
                [exe, f"--config-file={config}", "--nofork", "--nopidfile", "--print-address=1"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            self._remove_dir()
            raise BusError(f"cannot start {exe}: {exc}") from exc
        if self.journal:
            self._rids.append(self.journal.add_process(self.process.pid))
        try:
            self.address = self._read_address()
        except BaseException:
            self.stop()
            raise
        return self

    def _config(self) -> str:
        """The bus's configuration (``bus.conf``)."""
        assert self.dir is not None
        config = _CONFIG.format(
            bus_type=self.bus_type,
            socket=self.dir / "bus",
            max_message_size=self.max_message_size,
            max_incoming=max(self.max_message_size * 2, 2**28),
            reply_timeout_ms=int(self.reply_timeout * 1000),
            extra_limits="".join(
                f'  <limit name="{name}">{value}</limit>\n' for name, value in self.limits.items()
            ),
        )
        if self.bus_daemon == "dbus-broker":
            # The broker ignores <listen> and <auth> (the socket is passed; EXTERNAL
            # is all it speaks) and warns that eavesdropping is "deprecated and
            # ignored": its copy goes without that rule.
            config = config.replace('    <allow eavesdrop="true"/>\n', "")
            # Its per-user byte quota is max_outgoing_bytes times the connections a
            # user may have; with ours (256 MiB) dbus-broker 37 refuses its own
            # launcher's connection ("UID 0 exceeded its 'bytes' quota"); the
            # sandbox's 10^9 works (measured).  The broker reads no other of these.
            config = config.replace(
                f'<limit name="max_outgoing_bytes">{max(self.max_message_size * 2, 2**28)}<',
                '<limit name="max_outgoing_bytes">1000000000<',
            )
        return config

    def _start_broker(self) -> PrivateBus:
        """Start ``dbus-broker-launch`` on a socket of ours (see the module's docstring)."""
        launcher = shutil.which("dbus-broker-launch")
        if launcher is None or shutil.which("dbus-broker") is None:
            raise BusError("dbus-broker not found: apt-get install dbus-broker")
        unshare = shutil.which("unshare")
        if unshare is None:
            raise BusError("unshare not found (it runs dbus-broker): apt-get install util-linux")
        if os.geteuid() != 0:
            raise BusError(
                "a dbus-broker bus needs root: its launcher logs to "
                f"{_JOURNAL_DIR}/socket, which PrivateBus gives it in a mount namespace "
                "of its own (run as root, or bus_daemon='dbus-daemon')"
            )
        tmpfs = _journal_tmpfs()
        self.dir = Path(tempfile.mkdtemp(prefix="rf-bus-", dir=self._parent))
        if self.journal:
            self._rids.append(self.journal.add("path", path=str(self.dir)))
        if tmpfs and (self.dir == Path(tmpfs) or Path(tmpfs) in self.dir.parents):
            self._remove_dir()
            raise BusError(
                f"PrivateBus directory= under {tmpfs}: dbus-broker's journal socket needs a "
                f"tmpfs on {tmpfs} in its namespace, which would hide it; use another directory"
            )
        assert self.dir is not None
        (self.dir / "bus.conf").write_text(self._config())
        (self.dir / "journal").mkdir()
        sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sink.bind(str(self.dir / "journal" / "socket"))
        except OSError as exc:
            sink.close()
            self._remove_dir()
            raise BusError(f"cannot bind dbus-broker's journal socket: {exc}") from exc
        try:
            # A process of its own reads the sink at once, whatever this one does
            # (holding the GIL, blocked in a test): a unix datagram socket queues
            # only net.unix.max_dgram_qlen (10) records, and the broker blocks on
            # the 11th (measured: the 12th client it disconnected for an invalid
            # header was never served, nor was any new connection).
            self._sink_reader = subprocess.Popen(
                [sys.executable, "-c", _SINK_READER, str(self.log_path)],
                stdin=sink.fileno(),
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            self._remove_dir()
            raise BusError(f"cannot start dbus-broker's journal reader: {exc}") from exc
        finally:
            sink.close()
        if self.journal:
            self._rids.append(self.journal.add_process(self._sink_reader.pid))
        self._spawn_broker(launcher, unshare, tmpfs)
        return self

    @property
    def log_path(self) -> Path:
        """dbus-broker's log: the MESSAGE of each record it sent to its journal, one a line."""
        if self.dir is None:
            raise BusError("the bus is not started")
        return self.dir / "journal.log"

    def broker_log(self) -> list[str]:
        """What dbus-broker logged so far (``[]`` on dbus-daemon, or before it started)."""
        try:
            return (self.log_path).read_text(errors="replace").splitlines()
        except (BusError, FileNotFoundError):
            return []

    def _spawn_broker(self, launcher: str, unshare: str, tmpfs: str) -> None:
        """Bind the bus's socket, run the launcher on it, wait for its ``Ready``."""
        assert self.dir is not None
        config = self.dir / "bus.conf"
        address = f"unix:path={self.socket_path}"
        readies = self.broker_log().count("Ready")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Bound and listening before the launcher runs, as systemd's dbus.socket
            # is: a client may connect at once (the broker accepts once it runs).
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()  # a restart's: the old broker's socket file
            listener.bind(str(self.socket_path))
            listener.listen(socket.SOMAXCONN)
            env = dict(os.environ)
            env.update(DBUS_SYSTEM_BUS_ADDRESS=address, DBUS_SESSION_BUS_ADDRESS=address)
            scope = "user" if self.bus_type in ("session", "user") else "system"
            listen_fd = listener.fileno()
            self.process = subprocess.Popen(
                [
                    unshare,
                    "--mount",
                    "--propagation",
                    "private",
                    "/bin/bash",  # dash takes no fd above 9 in a redirection
                    "-c",
                    _BROKER_SCRIPT,
                    "sh",
                    tmpfs,
                    str(self.dir / "journal"),
                    launcher,
                    "--scope",
                    scope,
                    f"--config-file={config}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**env, "RF_LISTEN_FD": str(listen_fd)},
                start_new_session=True,
                # The listening socket only; the script makes it fd 3.
                pass_fds=(listen_fd,),
            )
        except OSError as exc:
            self.stop()
            raise BusError(f"cannot start {launcher}: {exc}") from exc
        finally:
            # The launcher has its copy; ours closed, a dead broker refuses connections.
            listener.close()
        if self.journal:
            self._rids.append(self.journal.add_process(self.process.pid))
        try:
            self._await_ready(readies)
        except BaseException:
            self.stop()
            raise
        self.address = address

    def restart_bus(self) -> None:
        """Restart dbus-broker on the same socket and configuration (dbus-broker only).

        Every connection is dropped.  What :class:`~pytest_runtimefaults.dbus.limits.ConnectionCap`
        needs on dbus-broker: its launcher passes quotas to the broker only as it starts it.
        """
        if self.bus_daemon != "dbus-broker":
            raise BusError(
                "restart_bus() is for dbus-broker; dbus-daemon rereads bus.conf on "
                "ReloadConfig (what ConnectionCap does)"
            )
        if self.process is None:
            raise BusError("the bus is not started")
        launcher = shutil.which("dbus-broker-launch")
        unshare = shutil.which("unshare")
        assert launcher is not None
        assert unshare is not None
        process, self.process = self.process, None
        _end_broker(process)
        if self.journal and self._rids:
            self.journal.release(self._rids.pop())  # the old launcher's process record
        self._spawn_broker(launcher, unshare, _journal_tmpfs())

    def _await_ready(self, readies: int) -> None:
        """Wait for the launcher's next ``Ready`` record (it connected to the broker it ran).

        *readies*: how many the log held before this launcher started.
        """
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        while self.broker_log().count("Ready") <= readies:
            left = deadline - time.monotonic()
            if self.process.poll() is not None:
                raise BusError(f"dbus-broker exited at start: {self.exit_report()}")
            if left <= 0:
                raise BusError(
                    f"dbus-broker-launch logged no 'Ready' within {self.start_timeout} s; "
                    f"its log: {'; '.join(self.broker_log()[-10:]) or 'nothing'}"
                )
            time.sleep(min(left, 0.02))

    def _read_address(self) -> str:
        assert self.process is not None
        assert self.process.stdout is not None
        deadline = time.monotonic() + self.start_timeout
        buf = b""
        fd = self.process.stdout.fileno()
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BusError(f"dbus-daemon printed no address within {self.start_timeout} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    err = self.process.stderr.read().decode() if self.process.stderr else ""
                    raise BusError(f"dbus-daemon exited at start: {err.strip()}")
                buf += chunk
        # The daemon prints the address it listens on; keep our form (path=) since it
        # may add a guid, which clients accept either way.
        return buf.split(b"\n", 1)[0].decode().strip()

    def exit_report(self) -> str | None:
        """None while the daemon runs; once it died, how, with its last output.

        Example: ``dbus-daemon (pid 812) was killed by SIGKILL; it printed nothing``.
        """
        process = self.process
        if process is None or process.poll() is None:
            return None
        code = process.returncode
        how = (
            f"was killed by {signal.Signals(-code).name}"
            if code < 0 and -code in signal.valid_signals()
            else f"exited with status {code}"
        )
        output = b""
        for stream in (process.stderr, process.stdout):
            if stream is not None:
                output += _read_left(stream.fileno())
        lines = output.decode(errors="replace").strip().splitlines()[-20:]
        if self.bus_daemon == "dbus-broker":
            # Its words go to the journal, not to stdout/stderr.
            lines += [f"log: {line}" for line in self.broker_log()[-20:]]
            name = "dbus-broker-launch"
        else:
            name = self.dbus_daemon
        last = "; its last output:\n" + "\n".join(lines) if lines else "; it printed nothing"
        return f"{name} (pid {process.pid}) {how}{last}"

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            # dbus-broker: the launcher's session holds the broker too
            _end_broker(process, session=self.bus_daemon == "dbus-broker")
        reader, self._sink_reader = self._sink_reader, None
        if reader is not None:
            _end_broker(reader)  # ours, by its pid: SIGTERM, then SIGKILL
        self._remove_dir()
        if self.journal:
            for rid in self._rids:
                self.journal.release(rid)
        self._rids.clear()

    def _remove_dir(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> PrivateBus:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<PrivateBus {self.address or 'stopped'} pid={self.pid}>"


def _end_session(pid: int) -> None:
    """SIGKILL what is left of the session *pid* leads (a broker whose launcher ended).

    The broker ends with its launcher (PDEATHSIG SIGTERM); the session is ours
    (start_new_session), so this ends only our processes, by its id.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _end_broker(process: subprocess.Popen[bytes], *, session: bool = True) -> None:
    """End a process of ours (SIGTERM, then SIGKILL after 2 s) and, with *session*,
    what is left of its session (a launcher's broker); close its pipes."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait()
    if session:
        _end_session(process.pid)
    for stream in (process.stdout, process.stderr):
        if stream:
            stream.close()


def _journal_tmpfs() -> str:
    """Where dbus-broker's namespace needs a tmpfs so that /run/systemd/journal can exist.

    "" when it exists (a bind mount over it does); else the deepest of
    ``/run/systemd`` and ``/run`` that exists (a container's private /run may
    have no /run/systemd).  Only ever mounted in the launcher's namespace.
    """
    if os.path.isdir(_JOURNAL_DIR):
        return ""
    return "/run/systemd" if os.path.isdir("/run/systemd") else "/run"


def _journal_field(record: bytes, name: bytes) -> bytes | None:
    """Field *name* of a journal native-protocol datagram (None: absent).

    Fields are ``NAME=value\\n``, or ``NAME\\n`` + little-endian 64-bit size +
    value + ``\\n`` for a value that holds a newline (``MESSAGE=Ready\\n``).
    """
    pos = 0
    while pos < len(record):
        end = record.find(b"\n", pos)
        if end < 0:
            end = len(record)
        line = record[pos:end]
        key, eq, value = line.partition(b"=")
        if eq:
            if key == name:
                return value
            pos = end + 1
            continue
        if end + 9 > len(record):
            return None
        (size,) = struct.unpack_from("<Q", record, end + 1)
        value = record[end + 9 : end + 9 + size]
        if line == name:
            return value
        pos = end + 9 + size + 1
    return None


def _read_left(fd: int, limit: int = 65536) -> bytes:
    """What is left to read on *fd* of a dead process (bounded: a child may keep it open)."""
    data = b""
    while len(data) < limit and select.select([fd], [], [], 0.1)[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data
