"""A private, real dbus-daemon, started in a temporary directory.

Tests must never disturb the host's system bus, so every test gets a
dbus-daemon of its own: system-bus-like (``<type>system</type>``, EXTERNAL
authentication, unix fd passing) but with a permissive policy, so that a test
service may own any name (``org.freedesktop.systemd1`` included).

Example::

    with PrivateBus() as bus:
        subprocess.run(["busctl", "--address", bus.address, "list"], check=True)
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from pytest_runtimefaults.journal import Journal

__all__ = ["BusError", "PrivateBus"]

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
    """The private dbus-daemon could not be started; the message says why."""


class PrivateBus:
    """A dbus-daemon of our own, in a private 0700 directory.

    ``address`` is ``unix:path=DIR/bus``.  ``stop()`` ends the daemon (by its PID)
    and removes the directory; both ``start()`` and ``stop()`` are idempotent.
    *limits* adds ``<limit>`` entries to its configuration (``bus.conf`` in
    its directory; :class:`~pytest_runtimefaults.dbus.limits.ConnectionCap`
    changes it while it runs).
    Both are recorded in a cleanup journal (*journal*, else the default one) as
    they are created, so a killed owner's bus is reaped by the next run.
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
    ) -> None:
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
        exe = shutil.which(self.dbus_daemon)
        if exe is None:
            raise BusError(f"{self.dbus_daemon} not found: apt-get install dbus-daemon")
        self.dir = Path(tempfile.mkdtemp(prefix="rf-bus-", dir=self._parent))
        if self.journal:
            self._rids.append(self.journal.add("path", path=str(self.dir)))
        config = self.dir / "bus.conf"
        config.write_text(
            _CONFIG.format(
                bus_type=self.bus_type,
                socket=self.dir / "bus",
                max_message_size=self.max_message_size,
                max_incoming=max(self.max_message_size * 2, 2**28),
                reply_timeout_ms=int(self.reply_timeout * 1000),
                extra_limits="".join(
                    f'  <limit name="{name}">{value}</limit>\n'
                    for name, value in self.limits.items()
                ),
            )
        )
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
        last = "; its last output:\n" + "\n".join(lines) if lines else "; it printed nothing"
        return f"{self.dbus_daemon} (pid {process.pid}) {how}{last}"

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGKILL)
                    process.wait()
            for stream in (process.stdout, process.stderr):
                if stream:
                    stream.close()
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


def _read_left(fd: int, limit: int = 65536) -> bytes:
    """What is left to read on *fd* of a dead process (bounded: a child may keep it open)."""
    data = b""
    while len(data) < limit and select.select([fd], [], [], 0.1)[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data
