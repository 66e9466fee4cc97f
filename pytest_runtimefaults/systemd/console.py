"""systemd's console: a pty whose master a thread drains into ``console.log``.

systemd, as PID 1, writes its log to ``/dev/console`` and closes it if that is
not a terminal (ENOTTY): with a plain file there, a sandbox that fails to boot
could not say why.  So the launcher binds the slave of a pty on
``/dev/console``, and :class:`_ConsoleDrain` copies what arrives on the master
into a file, without colours or carriage returns.

Example::

    console = _ConsoleDrain(workdir / "console.log")
    ...  # bind console.slave_path on /dev/console, boot systemd
    console.close()  # raises SandboxError if the thread failed or hangs
"""

from __future__ import annotations

import os
import re
import select
import threading
from pathlib import Path

from pytest_runtimefaults.core.log import logger
from pytest_runtimefaults.systemd.errors import SandboxError

__all__: list[str] = []  # private to the sandbox

_ANSI = re.compile(rb"\x1b(?:\[[0-9;?!]*[A-Za-z]|[()][0-9A-B]|[=>c])")


class _ConsoleDrain:
    """A pty for systemd's console; a thread copies what it writes into a file.

    The master must be read all the time, or systemd blocks once the pty's
    buffer is full.
    """

    def __init__(self, path: Path) -> None:
        self.master, self.slave = os.openpty()
        self.slave_path = os.ttyname(self.slave)
        self._out = open(path, "ab")  # noqa: SIM115 - closed in close()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"console {path}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                stopping = self._stop.is_set()
                ready, _, _ = select.select([self.master], [], [], 0 if stopping else 0.1)
                if not ready:
                    if stopping:
                        return
                    continue
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: every slave end is closed, the normal end
                    logger.debug("the console pty %s closed", self.slave_path, exc_info=True)
                    return
                if not data:
                    return
                # The tty turns "\n" into "\r\n"; colours and resets are noise in a file.
                self._out.write(_ANSI.sub(b"", data).replace(b"\r", b""))
                self._out.flush()
        except BaseException as exc:  # surfaced by close()
            self.error = exc

    def close(self) -> None:
        """Copy what is left, stop the thread, close the pty (idempotent)."""
        if self._out.closed:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        os.close(self.slave)
        os.close(self.master)
        self._out.close()
        if self._thread.is_alive():
            raise SandboxError("the console reader thread did not stop")
        if self.error is not None:
            raise SandboxError(f"the console reader thread failed: {self.error!r}")
