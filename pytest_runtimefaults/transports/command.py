"""Subscribe by running a command that prints one event a line.

``ctr events``, ``podman events``, ``journalctl -f``, ``dbus-monitor``: many
daemons have a command-line client that streams events.  Each subscription is
one child process; cancelling kills it (SIGKILL, by PID: only processes this
transport started).  The process exiting on its own is a
:class:`~pytest_runtimefaults.subscribers.SubscriptionError` carrying the tail
of its stderr, e.g. ``ctr: rpc error: code = Unavailable``.

By default an event's key is the whole line: both ``ctr events`` and
``podman events`` start each line with a timestamp in nanoseconds, so two
events never print the same line, and every subscriber prints the same line
for the same event.  Pass ``parse`` for other formats.

Example::

    transport = CommandTransport(["ctr", "--address", sock, "events"], name="ctr events")
    with Swarm(transport, subscribers=10, seed=1) as swarm:
        ...
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence

from pytest_runtimefaults.core.log import swallowed
from pytest_runtimefaults.journal import Journal
from pytest_runtimefaults.subscribers import (
    Event,
    Subscription,
    SubscriptionError,
    ThreadedSubscription,
)

__all__ = ["CommandTransport", "parse_line"]


def parse_line(line: bytes) -> Event | None:
    """The whole line is the key; the first word starting with ``/`` is the topic.

    ``2026-11-22 09:30:00.1 +0000 UTC default /tasks/start {...}`` ->
    topic ``/tasks/start``.  Blank lines are skipped.
    """
    text = line.decode(errors="replace").strip()
    if not text:
        return None
    topic = next((w for w in text.split() if w.startswith("/")), "")
    return Event(key=text, topic=topic, data=text)


class CommandTransport:
    """Each subscription runs *argv* and reads its stdout line by line."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        parse: Callable[[bytes], Event | None] = parse_line,
        env: Mapping[str, str] | None = None,
        journal: Journal | None = None,
        name: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.parse = parse
        self.env = dict(env) if env is not None else None
        # Journaled by default, so a killed owner's command is reaped.
        self.journal = journal if journal is not None else Journal.default()
        self.name = name or " ".join(os.path.basename(a) for a in self.argv[:1] + self.argv[-1:])

    def subscribe(self) -> Subscription:
        try:
            proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env,
                start_new_session=True,
            )
        except OSError as exc:
            raise SubscriptionError(f"cannot run {self.argv[0]}: {exc}") from exc
        rid = self.journal.add_process(proc.pid) if self.journal is not None else None
        assert proc.stdout is not None
        assert proc.stderr is not None
        stdout, stderr = proc.stdout, proc.stderr
        err_tail: list[bytes] = []

        def drain_stderr() -> None:
            for line in stderr:
                err_tail.append(line)
                del err_tail[:-5]

        err_thread = threading.Thread(target=drain_stderr, daemon=True)
        err_thread.start()

        def pump(put: Callable[[Event], None], cancelled: Callable[[], bool]) -> None:
            try:
                for line in stdout:
                    ev = self.parse(line.rstrip(b"\n"))
                    if ev is not None:
                        put(ev)
                rc = proc.wait()
                err_thread.join(2)
                if not cancelled():
                    tail = b"".join(err_tail).decode(errors="replace").strip()
                    raise SubscriptionError(
                        f"{self.argv[0]} exited with status {rc}: {tail or '(no stderr)'}"
                    )
            finally:
                with swallowed(ProcessLookupError, "killing %s (pid %d)", self.argv[0], proc.pid):
                    proc.kill()
                proc.wait()
                stdout.close()
                err_thread.join(2)
                stderr.close()
                if rid is not None and self.journal is not None:
                    self.journal.release(rid)

        def cancel() -> None:
            # Only our own child, by PID, and only while it is not yet reaped.
            if proc.returncode is None:
                with swallowed(
                    ProcessLookupError, "cancelling %s (pid %d)", self.argv[0], proc.pid
                ):
                    os.kill(proc.pid, signal.SIGKILL)

        return ThreadedSubscription(pump, on_cancel=cancel, name=f"{self.name}-reader")
