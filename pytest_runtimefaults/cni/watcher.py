"""The torn-write watcher: every moment a runtime's CNI config was visible incomplete.

A careful writer makes a config appear at its final name only by ``rename``
(``IN_MOVED_TO``), whole.  :class:`TornWriteWatcher` watches a conf dir with
inotify (through `inotify_simple`_, a thin maintained binding that hands over
every event as the kernel queued it, uncoalesced) on one thread, and records a
:class:`TornWrite` for every ``IN_CREATE``/``IN_MODIFY`` of a name a CNI
loader reads, and for every content that does not parse when read at an event.

.. _inotify_simple: https://pypi.org/project/inotify-simple/

Example::

    with TornWriteWatcher(cni.conf_dir) as watcher:
        ...                                     # the runtime writes its configs
    assert not watcher.torn, watcher.report()
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from inotify_simple import INotify, flags  # type: ignore[import-untyped]

from pytest_runtimefaults.cni.config import CONFIG_SUFFIXES, validate_config
from pytest_runtimefaults.core.log import swallowed

if TYPE_CHECKING:
    from pytest_runtimefaults.cni.config import CniDir

__all__ = [
    "IN_CLOEXEC",
    "IN_CLOSE_WRITE",
    "IN_CREATE",
    "IN_DELETE",
    "IN_MODIFY",
    "IN_MOVED_FROM",
    "IN_MOVED_TO",
    "IN_NONBLOCK",
    "IN_Q_OVERFLOW",
    "TornWrite",
    "TornWriteWatcher",
]

# The event bits by their inotify(7) names (kept: they were public names of cni.py).
IN_MODIFY = int(flags.MODIFY)
IN_CLOSE_WRITE = int(flags.CLOSE_WRITE)
IN_MOVED_FROM = int(flags.MOVED_FROM)
IN_MOVED_TO = int(flags.MOVED_TO)
IN_CREATE = int(flags.CREATE)
IN_DELETE = int(flags.DELETE)
IN_Q_OVERFLOW = int(flags.Q_OVERFLOW)
IN_NONBLOCK = os.O_NONBLOCK  # inotify_init1(2) flags
IN_CLOEXEC = os.O_CLOEXEC

_WATCHED = IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE
_NAMES = (
    (IN_CREATE, "IN_CREATE"),
    (IN_MODIFY, "IN_MODIFY"),
    (IN_CLOSE_WRITE, "IN_CLOSE_WRITE"),
    (IN_MOVED_TO, "IN_MOVED_TO"),
    (IN_MOVED_FROM, "IN_MOVED_FROM"),
    (IN_DELETE, "IN_DELETE"),
)


@dataclass(frozen=True)
class TornWrite:
    """One moment a config file was visible incomplete or invalid.

    *how*: ``in-place`` (the file was created or modified at its final name,
    so a reader could open it before the last byte was written) or ``invalid``
    (the watcher read it and it did not parse).  *content* is what was read.
    """

    filename: str
    how: str
    event: str
    reason: str
    content: bytes
    at: float


@dataclass
class TornWriteWatcher:
    """Watch a CNI conf dir with inotify and record every torn write.

    A careful writer makes a config appear at its final name only by
    ``rename`` (``IN_MOVED_TO``), whole.  Every ``IN_CREATE``/``IN_MODIFY``
    of a name a CNI loader reads is a moment the file was visible
    incomplete; the watcher also reads the file at each event and records
    content that does not parse.  Files written by faults
    (``CniDir.fault_files``) or matched by *ignore* are not the runtime's
    and are skipped.  *validate* judges a file's content (default: libcni's
    rule, :func:`~pytest_runtimefaults.cni.validate_config`) and *suffixes*
    are the names a loader reads (default :data:`CONFIG_SUFFIXES`), so the
    watcher serves any directory of config files (netavark's: see
    :meth:`~pytest_runtimefaults.cni.NetavarkDir.watcher`).  ``stop()`` is
    idempotent; it raises if the watching thread failed or did not end when
    asked.
    """

    directory: Path | str
    ignore: Callable[[str], bool] | None = None
    fault_files: set[str] = field(default_factory=set)
    torn: list[TornWrite] = field(default_factory=list)
    events: int = 0
    overflowed: bool = False
    validate: Callable[[bytes], str | None] = validate_config
    suffixes: tuple[str, ...] = CONFIG_SUFFIXES

    #: how long ``stop()`` waits for the thread before calling it stuck
    join_timeout: float = 10.0

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self._inotify: INotify | None = None
        self._pipe: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    @classmethod
    def for_dir(cls, cni: CniDir) -> TornWriteWatcher:
        """A watcher on *cni*'s conf dir that skips the files its faults write."""
        return cls(cni.conf_dir, fault_files=cni.fault_files)

    def start(self) -> TornWriteWatcher:
        if self._thread is not None:
            return self
        inotify = INotify(nonblocking=True)
        try:
            inotify.add_watch(self.directory, _WATCHED)
        except OSError as exc:
            inotify.close()
            raise OSError(exc.errno, f"inotify_add_watch {self.directory}: {exc.strerror}") from exc
        self._inotify = inotify
        self._pipe = os.pipe()
        self._thread = threading.Thread(target=self._run, name="torn-write watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        thread, pipe, inotify = self._thread, self._pipe, self._inotify
        if thread is None or pipe is None or inotify is None:
            return
        # Drain what the kernel already queued before stopping, so a write
        # that finished just before stop() is still judged.
        time.sleep(0.02)
        os.write(pipe[1], b"x")
        thread.join(self.join_timeout)
        if thread.is_alive():
            # Its descriptors stay open: the thread may still be reading them.
            raise RuntimeError(
                f"torn-write watcher on {self.directory}: its thread is still running "
                f"{self.join_timeout:g} s after it was asked to stop"
            )
        for fd in pipe:
            with swallowed(OSError, "closing the watcher's pipe fd %d", fd):
                os.close(fd)
        with swallowed(OSError, "closing the watcher's inotify fd"):
            inotify.close()
        self._thread = self._pipe = self._inotify = None
        if self.error is not None:
            error, self.error = self.error, None
            raise RuntimeError(f"torn-write watcher failed: {error}") from error

    def __enter__(self) -> TornWriteWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _skipped(self, name: str) -> bool:
        if not name.endswith(self.suffixes):
            return True
        if name in self.fault_files:
            return True
        return self.ignore is not None and self.ignore(name)

    def _run(self) -> None:
        assert self._pipe is not None
        assert self._inotify is not None
        inotify, wake = self._inotify, self._pipe[0]
        try:
            while True:
                ready, _, _ = select.select([inotify.fileno(), wake], [], [])
                if inotify.fileno() in ready:
                    self._drain(inotify)
                if wake in ready:
                    self._drain(inotify)
                    return
        except BaseException as exc:  # re-raised by stop(), in the test
            self.error = exc

    def _drain(self, inotify: INotify) -> None:
        for event in inotify.read(timeout=0):
            self.events += 1
            if event.mask & IN_Q_OVERFLOW:
                self.overflowed = True
                continue
            if not event.name or self._skipped(event.name):
                continue
            self._judge(event.name, event.mask)

    def _judge(self, name: str, mask: int) -> None:
        event = _event_name(mask)
        now = time.monotonic()
        try:
            content: bytes | None = (Path(self.directory) / name).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            content = None  # gone again, or not a file: nothing a reader could load
        with self._lock:
            if mask & (IN_CREATE | IN_MODIFY):
                self.torn.append(
                    TornWrite(
                        name, "in-place", event, "written at its final name", content or b"", now
                    )
                )
            if content is not None and mask & (
                IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO
            ):
                reason = self.validate(content)
                if reason is not None:
                    self.torn.append(TornWrite(name, "invalid", event, reason, content, now))

    def files(self) -> set[str]:
        """Names of files seen torn."""
        with self._lock:
            return {t.filename for t in self.torn}

    def report(self) -> str:
        """A readable list of the torn moments, for an assertion message."""
        with self._lock:
            if not self.torn:
                return "no torn writes"
            lines = [f"{len(self.torn)} torn write(s) in {self.directory}:"]
            for t in self.torn[:20]:
                lines.append(
                    f"  {t.filename}: {t.how} on {t.event}: {t.reason} ({len(t.content)} bytes: "
                    f"{t.content[:40]!r})"
                )
            return "\n".join(lines)


def _event_name(mask: int) -> str:
    return "|".join(n for bit, n in _NAMES if mask & bit) or hex(mask)
