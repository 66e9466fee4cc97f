"""The CNI file faults: a broken file, a file held half-written, a file that
vanishes and comes back, and files rewritten in place while a runtime reads.

Each is a :class:`~pytest_runtimefaults.core.fault.Fault`: ``start()`` returns
the fault, ``lift()`` leaves the files whole (what the ``recovers`` marker
calls before probing), ``stop()`` lifts and releases what it holds, and
``applied`` counts what it did.  The three that work in the background are
:class:`~pytest_runtimefaults.core.fault.ThreadedFault`\\ s: lifting joins the
thread and raises :class:`~pytest_runtimefaults.core.fault.FaultThreadError`
if it is still running after the join (the files are then *not* rewritten, as
the thread may still be writing them) or if it failed (its error is chained).
Timing choices (chunk sizes, pauses) come from a seeded ``random.Random``.
They work on any :class:`ConfigDir` (a CNI conf dir, podman's netavark
network dir).

Example::

    with CniDir() as cni:
        conf = cni.bridge()
        with HalfWritten(cni, "10-broken.conflist", conf, mode="truncate") as fault:
            ...                                 # run the runtime against cni.conf_dir
        with RacingWriter(cni, {"10-a.conflist": conf}) as writer:
            ...
        assert writer.rounds > 0                # the files are whole again here
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from pytest_runtimefaults.cni.config import (
    BROKEN_MODES,
    BrokenMode,
    Content,
    broken_bytes,
    encode,
    write_atomic,
)
from pytest_runtimefaults.core.fault import FaultBase, ThreadedFault
from pytest_runtimefaults.core.log import swallowed

__all__ = [
    "ConfDirSwap",
    "ConfigDir",
    "DeleteRecreate",
    "EventStorm",
    "HalfWritten",
    "HeldHalfWritten",
    "RacingWriter",
    "RenamedInto",
]


class ConfigDir(Protocol):
    """What the file faults need of a directory of config files.

    :class:`~pytest_runtimefaults.cni.CniDir` (libcni's conf dir) and
    :class:`~pytest_runtimefaults.cni.netavark.NetavarkDir` (podman's
    netavark network dir) both have it.
    """

    #: names the faults wrote (a torn-write watcher skips them)
    fault_files: set[str]

    def path(self, filename: str) -> Path:
        """Where *filename* lives in the directory."""
        ...

    def remove(self, filename: str) -> None:
        """Remove *filename* if it is there."""
        ...

    @property
    def conf_dir(self) -> Path:
        """The directory itself."""
        ...


class HalfWritten(FaultBase):
    """A config file left broken in the conf dir (truncated, empty, NUL-padded,
    wrong cniVersion).  ``lift()`` replaces it with the whole content, or
    removes it with ``restore=False``.
    """

    def __init__(
        self,
        cni: ConfigDir,
        filename: str,
        content: Content,
        *,
        mode: BrokenMode = "truncate",
        at: float = 0.5,
        restore: bool = True,
    ) -> None:
        super().__init__()
        if mode not in BROKEN_MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(BROKEN_MODES)}")
        self.cni = cni
        self.filename = filename
        self.content = encode(content)
        self.mode = mode
        self.restore = restore
        self.broken = broken_bytes(self.content, mode, at)
        self.name = f"half-written {filename} ({mode})"

    @property
    def path(self) -> Path:
        return self.cni.path(self.filename)

    def _start(self) -> None:
        self.cni.fault_files.add(self.filename)
        # Written atomically: the fault is the broken *content*, not the write.
        write_atomic(self.path, self.broken)
        self._fired()

    def _lift(self) -> None:
        if self.restore:
            write_atomic(self.path, self.content)
        else:
            self.cni.remove(self.filename)


class _FileThread(ThreadedFault):
    """A threaded file fault: lifting ends the thread, then makes the files whole.

    The files are rewritten only once the thread is known to be gone: a thread
    still alive after the join may still be writing them (that is an error,
    raised); a thread that failed gets its files restored and its error raised.
    """

    def _restore(self) -> None:
        """Leave every file of the fault whole (called with the thread gone)."""

    def _lift(self) -> None:
        super()._lift()  # asks the thread to stop
        thread = self._thread
        try:
            self.join()
        except BaseException:
            if thread is None or not thread.is_alive():
                # The thread's own error is the one the test must see.
                with swallowed(OSError, "restoring the files of %s", self.name):
                    self._restore()
            raise
        self._restore()


class HeldHalfWritten(_FileThread):
    """A file written in place up to *at*, then held there until released.

    ``start()`` returns once the partial content is on disk (fsynced) at the
    final name; the rest is written when :meth:`release` (or ``lift()``) is
    called, when *hold* seconds have passed, or at ``stop()``, whichever comes
    first.  :attr:`completed` is set when the file is whole.
    """

    def __init__(
        self,
        cni: ConfigDir,
        filename: str,
        content: Content,
        *,
        at: float = 0.5,
        hold: float | None = None,
    ) -> None:
        super().__init__()
        self.cni = cni
        self.filename = filename
        self.content = encode(content)
        self.head = broken_bytes(self.content, "truncate", at)
        self.hold = hold
        self.completed = threading.Event()
        self._fd = -1
        self.name = f"held half-written {filename} ({len(self.head)}/{len(self.content)} bytes)"

    @property
    def path(self) -> Path:
        return self.cni.path(self.filename)

    def _start(self) -> None:
        self.cni.fault_files.add(self.filename)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(self._fd, self.head)
            os.fsync(self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        self._fired()
        super()._start()

    def _run(self) -> None:
        try:
            self.stopping.wait(self.hold)
            os.write(self._fd, self.content[len(self.head) :])
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self.completed.set()

    def release(self) -> None:
        """Write the rest now; returns when the file is whole (raises if the write failed)."""
        self.lift()


class DeleteRecreate(_FileThread):
    """Delete a config file and recreate it (atomically), again and again.

    Each cycle: unlink, wait *gap* seconds (the file is absent), recreate,
    wait a pause drawn from *rng* in *period*.  A runtime that lists the
    directory and opens files later meets ``no such file or directory``.
    :attr:`count` (= ``applied``) is the number of cycles done.
    """

    def __init__(
        self,
        cni: ConfigDir,
        filename: str,
        content: Content,
        *,
        gap: float = 0.005,
        period: tuple[float, float] = (0.001, 0.01),
        cycles: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__()
        self.cni = cni
        self.filename = filename
        self.content = encode(content)
        self.gap = gap
        self.period = period
        self.cycles = cycles
        self.rng = rng or random.Random(0)
        self.name = f"delete-and-recreate {filename}"

    @property
    def count(self) -> int:
        """Delete-and-recreate cycles done so far."""
        return self.applied

    def _start(self) -> None:
        self.cni.fault_files.add(self.filename)
        super()._start()

    def _run(self) -> None:
        path = self.cni.path(self.filename)
        while not self.stopping.is_set() and (self.cycles is None or self.count < self.cycles):
            path.unlink(missing_ok=True)
            self.stopping.wait(self.gap)
            write_atomic(path, self.content)
            self._fired()
            self.stopping.wait(self.rng.uniform(*self.period))

    def _restore(self) -> None:
        write_atomic(self.cni.path(self.filename), self.content)


class RacingWriter(_FileThread):
    """Rewrite config files in place, in small chunks, at a seeded rhythm.

    Each round picks a file, truncates it and writes its content back in
    chunks of *chunk* bytes (drawn from *rng*), pausing *pause* seconds
    between chunks, so a reader sees it empty or partial most of the time.
    Lifting ends the thread (a round in progress is finished first) and leaves
    every file whole; a thread still writing after ``join_timeout`` seconds is
    an error, and the files are then left to it.  :attr:`rounds` (=
    ``applied``) counts the rewrites.
    """

    def __init__(
        self,
        cni: ConfigDir,
        files: Mapping[str, Content],
        *,
        chunk: tuple[int, int] = (8, 48),
        pause: tuple[float, float] = (0.0005, 0.003),
        rng: random.Random | None = None,
    ) -> None:
        super().__init__()
        if not files:
            raise ValueError("RacingWriter needs at least one file")
        self.cni = cni
        self.files = {name: encode(c) for name, c in files.items()}
        self.chunk = chunk
        self.pause = pause
        self.rng = rng or random.Random(0)
        self.name = f"racing writer on {', '.join(sorted(self.files))}"

    @property
    def rounds(self) -> int:
        """Files rewritten so far."""
        return self.applied

    def _start(self) -> None:
        self.cni.fault_files.update(self.files)
        self._restore()
        super()._start()

    def _run(self) -> None:
        names = sorted(self.files)
        while not self.stopping.is_set():
            name = self.rng.choice(names)
            data = self.files[name]
            fd = os.open(self.cni.path(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                pos = 0
                while pos < len(data):
                    n = self.rng.randint(*self.chunk)
                    os.write(fd, data[pos : pos + n])
                    pos += n
                    # Not stopping.wait(): a stop mid-file must still finish it.
                    time.sleep(self.rng.uniform(*self.pause))
            finally:
                os.close(fd)
            self._fired()

    def _restore(self) -> None:
        for name, data in self.files.items():
            write_atomic(self.cni.path(name), data)


class RenamedInto(FaultBase):
    """A whole config that appears in the conf dir by ``rename`` from outside it.

    The file is written (and fsynced) in a staging directory beside the conf
    dir, on the same filesystem, then renamed to its final name: the conf
    dir's watch sees one ``IN_MOVED_TO`` and nothing else (no create, no write,
    no ``IN_MOVED_FROM``), which is how ``mv``, ansible's ``copy`` and many
    installers deliver a file (containerd issue 11715).  A reader that reloads
    only on writes and removals never sees it.  ``lift()`` rewrites the file
    the careful way inside the directory (temp file, rename), the change an
    operator would make to wake such a reader.
    """

    def __init__(self, cni: ConfigDir, filename: str, content: Content) -> None:
        super().__init__()
        self.cni = cni
        self.filename = filename
        self.content = encode(content)
        self.name = f"renamed into place {filename}"

    @property
    def path(self) -> Path:
        return self.cni.path(self.filename)

    def _start(self) -> None:
        self.cni.fault_files.add(self.filename)
        # Beside the conf dir, not in it: a rename within the watched directory
        # would also queue IN_MOVED_FROM, which most readers do act on.
        staging = Path(tempfile.mkdtemp(prefix=".rf-staging-", dir=self.path.parent.parent))
        try:
            write_atomic(staging / self.filename, self.content)
            os.rename(staging / self.filename, self.path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._fired()

    def _lift(self) -> None:
        write_atomic(self.path, self.content)


class ConfDirSwap(FaultBase):
    """The conf dir itself deleted and recreated: same path, a new inode.

    ``start()`` removes the directory with everything in it, waits *gap*
    seconds, makes it again and writes *files* into it (atomically, each).
    inotify watches an inode, not a path: a reader that added its watch once
    is now watching a directory that no longer exists, and never hears of the
    new one (containerd issue 6490, "never reloaded").  ``lift()`` rewrites
    *files* (whole; it cannot give a reader its watch back).
    """

    def __init__(self, cni: ConfigDir, files: Mapping[str, Content], *, gap: float = 0.05) -> None:
        super().__init__()
        self.cni = cni
        self.files = {name: encode(c) for name, c in files.items()}
        self.gap = gap
        #: the directory's inode before and after the swap
        self.inodes: tuple[int, int] = (0, 0)
        self.name = f"conf dir deleted and recreated ({', '.join(sorted(self.files)) or 'empty'})"

    def _start(self) -> None:
        conf_dir = self.cni.conf_dir
        self.cni.fault_files.update(self.files)
        before = conf_dir.stat()
        shutil.rmtree(conf_dir)
        time.sleep(self.gap)
        conf_dir.mkdir(mode=before.st_mode & 0o7777)
        self._write()
        after = conf_dir.stat().st_ino
        # tmpfs and ext4 may hand the freed inode number straight back: then
        # the kernel's watch is still gone, but the test would not show it.
        self.inodes = (before.st_ino, after)
        self._fired()

    def _write(self) -> None:
        for name, data in self.files.items():
            write_atomic(self.cni.path(name), data)

    def _lift(self) -> None:
        self._write()


class EventStorm(FaultBase):
    """A burst of inotify events in the conf dir: *files* scratch files
    created, written and removed as fast as possible.

    Each scratch file (``.rf-storm-N.tmp``, a name no CNI loader reads) queues
    ``IN_CREATE``, ``IN_MODIFY``, ``IN_CLOSE_WRITE`` and ``IN_DELETE``: a
    reader that reloads on every event (containerd's CRI does) does
    thousands of reloads for nothing, and a reader slower than the burst sees
    its queue overflow (``IN_Q_OVERFLOW``, past ``fs.inotify.max_queued_events``,
    16384 by default).  With *touch* given, that config file is rewritten
    (atomically) after the burst: the one change that matters, last in the
    queue.  ``start()`` returns when the burst is done; :attr:`seconds` is
    how long it took, ``applied`` the number of scratch files.
    """

    def __init__(
        self,
        cni: ConfigDir,
        *,
        files: int = 10000,
        touch: tuple[str, Content] | None = None,
    ) -> None:
        super().__init__()
        if files < 1:
            raise ValueError(f"EventStorm needs files >= 1, not {files}")
        self.cni = cni
        self.files = files
        self.touch = (touch[0], encode(touch[1])) if touch is not None else None
        self.seconds = 0.0
        self.name = f"event storm ({files} scratch files)"

    def _start(self) -> None:
        conf_dir = self.cni.conf_dir
        if self.touch is not None:
            self.cni.fault_files.add(self.touch[0])
        began = time.monotonic()
        for i in range(self.files):
            path = os.path.join(conf_dir, f".rf-storm-{i}.tmp")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, b"x")
            finally:
                os.close(fd)
            os.unlink(path)
        if self.touch is not None:
            write_atomic(self.cni.path(self.touch[0]), self.touch[1])
        self.seconds = time.monotonic() - began
        self._fired(self.files)
