"""A test-only event broadcaster, correct or with CRI-O's double ``Done`` bug.

CRI-O's ``GetContainerEvents`` (cri-o/cri-o issue 9004, fixed by PR 9014)
kept a ``sync.WaitGroup`` per subscriber stream.  The broadcaster called
``Done()`` when a ``Send`` failed and again when the subscriber's event
channel was closed, so a subscriber that went away while events were in
flight got ``Done()`` twice and the daemon died with ``panic: sync: negative
WaitGroup counter``.  The fix closes the stream once (``sync.Once``).

This module is a small real server (a separate process, over a Unix socket)
written to reproduce that bug class on demand, so that the subscriber swarm
can be shown to catch it: ``bug="double-done"`` decrements the counter on a
failed send and on close; ``bug=None`` closes once.  Go's runtime message is
printed on stderr and the process exits with status 2, as Go does.

``bug="remove-while-ranging"`` is the defect the swarm found in containerd
1.6 (docker/go-events' ``Broadcaster``): a departing subscriber's queue is
closed before its removal is processed, and a broadcast that meets the closed
queue removes it from the sink slice *while ranging over it*, with Go's slice
semantics: the next sink is skipped (it loses the event) and the last one is
visited twice (it gets the event twice).  Pending removals and events are
served in a seeded random order, as Go's ``select`` does.

Protocol, one line each way: ``SUBSCRIBE`` -> ``OK``, then ``EV <seq> <topic>``
lines; ``PUBLISH <n> <burst> <pause_ms>`` -> ``DONE <last seq>`` after
broadcasting *n* events in bursts.  ``STATS`` -> ``STATS <subscribers>``.

Example::

    with Broadcaster(bug="double-done") as server:
        transport = server.transport()
        server.publish(100, burst=10)
        server.wait()            # the exit status (2 once it panicked)
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pytest_runtimefaults.core.log import swallowed
from pytest_runtimefaults.journal import Journal
from pytest_runtimefaults.transports.unixline import UnixLineTransport

__all__ = ["BUGS", "Broadcaster", "main"]

BUGS = ("double-done", "remove-while-ranging")

# --- the server (runs in its own process) -----------------------------------------


class _WaitGroup:
    """Go's sync.WaitGroup counter, down to its panic."""

    def __init__(self) -> None:
        self._n = 0
        self._lock = threading.Lock()
        self._zero = threading.Condition(self._lock)

    def add(self, n: int) -> None:
        with self._lock:
            self._n += n
            if self._n < 0:
                _panic("sync: negative WaitGroup counter")
            if self._n == 0:
                self._zero.notify_all()

    def done(self) -> None:
        self.add(-1)

    def wait(self) -> None:
        with self._lock:
            while self._n > 0:
                self._zero.wait()


def _panic(message: str) -> None:
    sys.stderr.write(
        f"panic: {message}\n\ngoroutine {threading.get_ident() % 100000} [running]:\n"
        "sync.(*WaitGroup).Add(...)\n\tsync/waitgroup.go:64\n"
        "main.(*broadcaster).stream(...)\n\tbroadcaster.py\n"
    )
    sys.stderr.flush()
    os._exit(2)


_CLOSED = object()

#: How long the server takes to learn that a subscriber hung up (gRPC passes a
#: client's cancel to the stream's context a moment later; events keep being
#: sent to it meanwhile, and those Sends fail).  Without it the window for CRI-O's
#: double Done was a few microseconds, and in a slower container the swarm could
#: run twenty rounds without hitting it.
LEAVE_NOTICE = 0.05


class _Sink:
    """One subscriber's queue, as the broadcaster's sink list holds it."""

    def __init__(self, ch: queue.SimpleQueue[object]) -> None:
        self.ch = ch
        self.closed = False


class _Server:
    def __init__(self, path: str, bug: str | None) -> None:
        self.path = path
        self.bug = bug
        self.subs: dict[int, queue.SimpleQueue[object]] = {}
        self.lock = threading.Lock()
        self.seq = 0
        self.ids = 0
        # remove-while-ranging: a Go slice (backing array + length) of sinks.
        self.arr: list[_Sink] = []
        self.n = 0
        self.pending: list[_Sink] = []
        self.rng = random.Random(0)

    def _go_append(self, sink: _Sink) -> None:
        if len(self.arr) > self.n:
            self.arr[self.n] = sink
        else:
            self.arr.append(sink)
        self.n += 1

    def _go_remove(self, target: _Sink) -> None:
        # b.sinks = append(b.sinks[:i], b.sinks[i+1:]...): shifts left in place;
        # the old last slot keeps its value.
        for i in range(self.n):
            if self.arr[i] is target:
                self.arr[i : self.n - 1] = self.arr[i + 1 : self.n]
                self.n -= 1
                return

    def _go_broadcast(self, line: bytes) -> None:
        if self.pending and self.rng.random() < 0.5:
            self._go_removes()
        n = self.n  # for _, sink := range b.sinks: the length is read once
        for i in range(n):
            sink = self.arr[i]
            if sink.closed:
                self._go_remove(sink)
                continue
            sink.ch.put(line)

    def _go_removes(self) -> None:
        for sink in self.pending:
            self._go_remove(sink)
        self.pending.clear()

    def serve(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(512)
        print(f"listening on {self.path} bug={self.bug}", file=sys.stderr, flush=True)
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        line = f.readline().decode().split()
        if not line:
            conn.close()
            return
        if line[0] == "SUBSCRIBE":
            self.stream(conn, f)
        elif line[0] == "PUBLISH":
            n, burst, pause_ms = (int(x) for x in [*line[1:], "1", "1", "0"][:3])
            last = self.publish(n, max(1, burst), pause_ms / 1000)
            conn.sendall(f"DONE {last}\n".encode())
            conn.close()
        elif line[0] == "STATS":
            with self.lock:
                conn.sendall(f"STATS {len(self.subs)}\n".encode())
            conn.close()
        else:
            conn.close()

    def publish(self, n: int, burst: int, pause: float) -> int:
        for i in range(n):
            with self.lock:
                self.seq += 1
                line = f"EV {self.seq} /demo/event\n".encode()
                if self.bug == "remove-while-ranging":
                    self._go_broadcast(line)
                else:
                    for ch in self.subs.values():
                        ch.put(line)
            if pause and (i + 1) % burst == 0:
                time.sleep(pause)
        with self.lock:
            self._go_removes()
        return self.seq

    def stream(self, conn: socket.socket, f: object) -> None:
        ch: queue.SimpleQueue[object] = queue.SimpleQueue()
        sink = _Sink(ch)
        with self.lock:
            self.ids += 1
            sid = self.ids
            self.subs[sid] = ch
            if self.bug == "remove-while-ranging":
                self._go_append(sink)
        wg = _WaitGroup()
        wg.add(1)
        once = threading.Lock()
        closed = [False]

        def close_once() -> None:
            with once:
                if closed[0]:
                    return
                closed[0] = True
            wg.done()

        def sender() -> None:
            while True:
                item = ch.get()
                if item is _CLOSED:
                    if self.bug == "double-done":
                        wg.done()  # the bug: Done() again though a failed Send already did
                    else:
                        close_once()
                    return
                assert isinstance(item, bytes)
                try:
                    conn.sendall(item)
                except OSError:
                    if self.bug == "double-done":
                        wg.done()
                    else:
                        close_once()
                        return

        def watcher() -> None:
            # The stream's context: ends when the subscriber hangs up.
            with swallowed(OSError, "reading from a subscriber that hung up"):
                while conn.recv(4096):
                    pass
            if self.bug == "remove-while-ranging":
                sink.closed = True  # the queue is closed first; Remove comes later
                with self.lock:
                    self.subs.pop(sid, None)
                    self.pending.append(sink)
            else:
                time.sleep(LEAVE_NOTICE)  # events still go to it meanwhile
                with self.lock:
                    self.subs.pop(sid, None)
            ch.put(_CLOSED)

        conn.sendall(b"OK\n")
        threading.Thread(target=sender, daemon=True).start()
        threading.Thread(target=watcher, daemon=True).start()
        wg.wait()
        # The handler returns; with the fix, the stream is closed exactly once.
        with swallowed(OSError, "closing a subscriber's stream"):
            conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--bug", choices=BUGS, default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    _Server(args.socket, args.bug).serve()
    return 0


# --- the client side: a component for tests -----------------------------------------


class Broadcaster:
    """Run the test-only broadcaster in a child process (a context manager).

    ``bug`` is ``"double-done"`` (CRI-O before PR 9014) or ``None`` (fixed).
    ``log_path`` holds its stderr (where a panic goes); ``pid`` its process.
    """

    def __init__(
        self,
        bug: str | None = None,
        *,
        directory: Path | str | None = None,
        journal: Journal | None = None,
    ) -> None:
        if bug is not None and bug not in BUGS:
            raise ValueError(f"unknown bug {bug!r}: choose one of {BUGS} or None")
        self.bug = bug
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="rf-bcast-"))
        self.socket_path = str(self.directory / "events.sock")
        self.log_path = self.directory / "broadcaster.log"
        # Journaled by default (the journal `runtimefaults cleanup` reads): a
        # killed script's server process and directory are reaped too.
        self.journal = journal if journal is not None else Journal.default()
        self.process: subprocess.Popen[bytes] | None = None
        self._rids: list[int] = []

    @property
    def pid(self) -> int:
        assert self.process is not None, "start() first"
        return self.process.pid

    def __enter__(self) -> Broadcaster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            return
        if self._own_dir:
            self._rids.append(self.journal.add("path", path=str(self.directory)))
        with swallowed(FileNotFoundError, "removing an old socket %s", self.socket_path):
            os.unlink(self.socket_path)
        argv = [sys.executable, "-m", "pytest_runtimefaults.transports.broadcaster"]
        argv += ["--socket", self.socket_path] + (["--bug", self.bug] if self.bug else [])
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        self._rids.append(self.journal.add_process(self.process.pid, cmdline=argv))
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log_text = self.log_path.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"the broadcaster did not start: {log_text}")
            time.sleep(0.02)

    def _answers(self) -> bool:
        try:
            self.stats()
        except OSError:
            return False
        return True

    def _request(self, line: str, timeout: float = 60.0) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.socket_path)
            s.sendall(line.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    raise ConnectionError(f"the broadcaster hung up on {line!r}")
                data += chunk
            return data.decode().strip()

    def stats(self) -> int:
        """How many subscribers the broadcaster holds now."""
        return int(self._request("STATS", timeout=2.0).split()[1])

    def publish(self, n: int, burst: int = 10, pause: float = 0.005) -> int:
        """Broadcast *n* events in bursts; returns the last sequence number.

        Raises ConnectionError if the broadcaster died on the way.
        """
        return int(self._request(f"PUBLISH {n} {burst} {int(pause * 1000)}").split()[1])

    def transport(self) -> UnixLineTransport:
        return UnixLineTransport(
            self.socket_path, hello=b"SUBSCRIBE\n", ack=b"OK", name=f"broadcaster({self.bug})"
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self, timeout: float = 10.0) -> int | None:
        """The exit status, or None if still running after *timeout*."""
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None  # still running: the documented answer, not an error

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with swallowed(ProcessLookupError, "killing broadcaster %d", self.process.pid):
                os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        with swallowed(FileNotFoundError, "removing the socket %s", self.socket_path):
            os.unlink(self.socket_path)
        if self._own_dir and self.directory.exists():
            with swallowed(OSError, "removing %s", self.directory):
                shutil.rmtree(self.directory)
        for rid in self._rids:
            self.journal.release(rid)
        self._rids.clear()


if __name__ == "__main__":
    sys.exit(main())
