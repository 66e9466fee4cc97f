"""Test-only CNI conf dir readers: the susceptible ones the reload faults must
catch, and a correct one that must pass.

:class:`ConfReader` watches a conf dir with inotify (as containerd's CRI and
libcni users do) and keeps :attr:`ConfReader.network`, the name of the first
config file in libcni's order.  Its switches are the mistakes of containerd's
issues 11715, 6490 and 5041 (and of the 1.6 code this project measured):

* ``creates=False`` ignores ``IN_CREATE``/``IN_MOVED_TO`` (fsnotify reports
  both as Create, which containerd skips): a config renamed into place is
  never loaded;
* ``rewatch=False`` adds its watch once: the conf dir deleted and recreated
  leaves it watching a dead inode, never reloading again;
* ``overflow="fatal"`` stops on ``IN_Q_OVERFLOW`` (containerd 1.6's CRI exits
  on it); ``"rescan"`` reloads instead;
* ``coalesce=False`` reloads once per event, not once per batch.

The correct reader is ``ConfReader(d)`` with the defaults.  Without a watch
to be had (``inotify_init`` fails, e.g. ``EMFILE``), ``no_watch="poll"``
logs why and polls, retrying the watch; ``"ignore"`` carries on without one
and so never reloads.  Run as a script (``python cni_readers.py DIR [flags]``)
it prints one JSON line per reload, for tests that run it in another
namespace.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import select
import sys
import threading
import time
from pathlib import Path
from typing import Literal

#: what libcni loads (ConfFiles: .conf, .conflist, .json)
SUFFIXES = (".conf", ".conflist", ".json")

_IN_MODIFY, _IN_CLOSE_WRITE = 0x2, 0x8
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_DELETE_SELF, _IN_MOVE_SELF = 0x400, 0x800
_IN_Q_OVERFLOW, _IN_IGNORED = 0x4000, 0x8000
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_MASK = (
    _IN_MODIFY
    | _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
)
_EVENT_HEADER = 16  # struct inotify_event: wd, mask, cookie, len

_libc = ctypes.CDLL(None, use_errno=True)


def first_network(conf_dir: Path) -> str | None:
    """The file libcni would take as the default network (first in name order)."""
    try:
        names = sorted(n for n in os.listdir(conf_dir) if n.endswith(SUFFIXES))
    except FileNotFoundError:
        return None
    return names[0] if names else None


class ConfReader:
    """A conf dir reader on its own thread; see the module docstring for the switches."""

    def __init__(
        self,
        conf_dir: Path | str,
        *,
        creates: bool = True,
        rewatch: bool = True,
        overflow: Literal["rescan", "fatal"] = "rescan",
        coalesce: bool = True,
        no_watch: Literal["poll", "ignore"] = "poll",
        poll: float = 0.05,
    ) -> None:
        self.conf_dir = Path(conf_dir)
        self.creates = creates
        self.rewatch = rewatch
        self.overflow = overflow
        self.coalesce = coalesce
        self.no_watch = no_watch
        self.poll = poll
        self.network: str | None = None
        self.reloads = 0
        #: why the reader stopped, or why it has no watch (a clear message)
        self.error: str | None = None
        #: set while the reader does not read its queue (a slow reader)
        self.paused = threading.Event()
        self.on_reload = lambda network: None
        self._stop = threading.Event()
        self._fd = -1
        self._thread = threading.Thread(target=self._run, name="conf-reader", daemon=True)

    def __enter__(self) -> ConfReader:
        self._open()
        self._reload()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        if self._fd >= 0:
            os.close(self._fd)
        if self._thread.is_alive():
            raise RuntimeError("the conf reader's thread did not stop within 5 s")

    def _open(self) -> None:
        fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            self.error = f"cannot watch {self.conf_dir}: inotify_init1: {os.strerror(err)}" + (
                " (no inotify instance left to this user: fs.inotify.max_user_instances, "
                "or user.max_inotify_instances in a user namespace)"
                if err == errno.EMFILE
                else ""
            )
            return
        if _libc.inotify_add_watch(fd, os.fsencode(self.conf_dir), _MASK) < 0:
            self.error = f"cannot watch {self.conf_dir}: {os.strerror(ctypes.get_errno())}"
            os.close(fd)
            return
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self.error = fd, None

    def _reload(self) -> None:
        self.network = first_network(self.conf_dir)
        self.reloads += 1
        self.on_reload(self.network)

    def wait_for(self, network: str | None, timeout: float) -> bool:
        """Whether :attr:`network` becomes *network* within *timeout* seconds."""
        deadline = time.monotonic() + timeout
        while self.network != network and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.network == network

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.paused.is_set():
                time.sleep(0.01)
                continue
            if self._fd < 0:
                if self.no_watch == "poll":
                    self._open()  # retried: instances come back when others let go
                    self._reload()
                self._stop.wait(self.poll)
                continue
            ready, _, _ = select.select([self._fd], [], [], self.poll)
            if not ready:
                continue
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            if not self._handle(data):
                return

    def _handle(self, data: bytes) -> bool:
        """Act on one read's events; False when the reader stops."""
        relevant = 0
        gone = False
        for mask in _masks(data):
            if mask & _IN_Q_OVERFLOW:
                if self.overflow == "fatal":
                    self.error = "inotify queue overflow"
                    return False
                relevant += 1
            elif mask & (_IN_IGNORED | _IN_DELETE_SELF | _IN_MOVE_SELF):
                gone = True
                relevant += 1
            elif mask & (_IN_CREATE | _IN_MOVED_TO) and not self.creates:
                continue
            elif mask & (_IN_CREATE | _IN_MOVED_TO | _IN_MODIFY | _IN_MOVED_FROM | _IN_DELETE):
                relevant += 1
                if not self.coalesce:
                    self._reload()
        if gone and self.rewatch:
            while not self.conf_dir.is_dir() and not self._stop.wait(self.poll):
                pass
            self._open()
        if relevant and self.coalesce:
            self._reload()
        return True


def _masks(data: bytes) -> list[int]:
    masks = []
    pos = 0
    while pos + _EVENT_HEADER <= len(data):
        _wd, mask, _cookie, length = (
            int.from_bytes(data[pos + i : pos + i + 4], sys.byteorder, signed=(i == 0))
            for i in (0, 4, 8, 12)
        )
        masks.append(mask)
        pos += _EVENT_HEADER + length
    return masks


def main() -> None:
    """``python cni_readers.py DIR [--no-watch ignore]``: a JSON line per reload."""
    parser = argparse.ArgumentParser()
    parser.add_argument("conf_dir")
    parser.add_argument("--no-watch", choices=("poll", "ignore"), default="poll")
    args = parser.parse_args()
    reader = ConfReader(args.conf_dir, no_watch=args.no_watch)

    last: list[object] = []

    def say(network: str | None) -> None:
        if last != [network, reader.error]:  # a poll that changed nothing says nothing
            last[:] = [network, reader.error]
            print(json.dumps({"network": network, "error": reader.error}), flush=True)

    reader.on_reload = say
    with reader:
        say(reader.network)
        sys.stdin.read()  # until the test closes our stdin


if __name__ == "__main__":
    main()
