"""The D-Bus fault proxy: the I/O around the codec, the SASL relay and the fault engine.

``DBusFaultProxy`` listens on a Unix socket in a private 0700 directory and
opens one upstream connection per client.  One thread runs an epoll loop over
every socket, non-blocking: for a relay that mostly waits, a single loop
wakes once per message where a thread per direction pays a GIL hand-over as
well (benchmarks/bench_dbus_proxy.py measures both designs' floors), and one
thread writing every byte makes the order of writes the order of decisions,
with no lock to get wrong.

* With no rule that can concern them, bytes are written as soon as they are
  read, byte for byte, and kept as read; they are framed (for the trace and for
  the exact path's state) later, in relay order: when the trace or ``errors``
  is read, when a message needs the exact path, every 256 chunks, and at
  ``stop()``.
* Otherwise every message goes through
  :class:`~pytest_runtimefaults.dbus.rules.FaultEngine`; its writes are queued
  per *lane* (one direction of one connection), which is flushed in order,
  honouring pauses between fragments, and held messages are released when
  the engine's deadlines come, as the loop's timeout.
* File descriptors (SCM_RIGHTS) go with the write that starts the message that
  declares them (``UNIX_FDS``), since sd-bus reads one message at a time.

Example::

    with PrivateBus() as bus, DBusFaultProxy(upstream=bus.address) as proxy:
        proxy.add(Delay(0.5).on(member="GetId"))
        subprocess.run(["busctl", "--address", proxy.address, "status"], check=True)
        print(proxy.trace.tail())
"""

from __future__ import annotations

import array
import contextlib
import itertools
import os
import select
import shutil
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

from pytest_runtimefaults.core.log import logger, swallowed
from pytest_runtimefaults.dbus.auth import AuthError, SaslRelay
from pytest_runtimefaults.dbus.routing import (
    Delivery,
    Route,
    deliver,
    may_read_fast,
    route_read,
    route_received,
    route_settled,
)
from pytest_runtimefaults.dbus.rules import Action, FaultEngine, Output, Rule
from pytest_runtimefaults.dbus.trace import TO_BUS, TO_CLIENT, Trace
from pytest_runtimefaults.dbus.wire import Framer, Message, WireError
from pytest_runtimefaults.journal import Journal

# The compiled part (_fastpath.c), when the build made it: ``loop`` relays every
# connection no rule concerns in C with the GIL released until Python is needed,
# and ``relay`` reads a chunk and writes it on in one call when the loop is back in
# Python.  Without it (or with RUNTIMEFAULTS_PURE_PYTHON=1) the loop does the same
# in Python; both paths are tested.
_RelayFn = Callable[[int, int, bool], "tuple[bytes, int, list[int], bool] | None"]
_Pending = tuple[int, bytes, int, list[int], bool, "float | None"]
_LoopFn = Callable[
    [
        int,
        int,
        "array.array[int]",
        "array.array[int]",
        int,
        int,
        "array.array[int]",
        bytearray,
        bytes,
    ],
    "tuple[int, list[tuple[float | None, int, bytes]], _Pending | None]",
]
_LOOP_PYTHON, _LOOP_LIMIT, _LOOP_PENDING = 0, 1, 2  # why the compiled loop came back


def _compiled() -> tuple[_RelayFn | None, _LoopFn | None]:
    if os.environ.get("RUNTIMEFAULTS_PURE_PYTHON") == "1":
        return None, None
    try:
        from pytest_runtimefaults.dbus import _fastpath
    except ImportError:  # not built on this host: the pure-Python path
        return None, None
    return _fastpath.relay, getattr(_fastpath, "loop", None)


_relay, _loop_c = _compiled()


def fast_path() -> str:
    """Which relay path this process uses: for ``runtimefaults doctor`` and bug reports."""
    if _loop_c is not None:
        return "compiled (pytest_runtimefaults.dbus._fastpath: the relay loop in C, GIL released)"
    if _relay is not None:
        return (
            "compiled, an old build without the relay loop: run `pip install -e .` again "
            "to rebuild pytest_runtimefaults/dbus/_fastpath.c"
        )
    if os.environ.get("RUNTIMEFAULTS_PURE_PYTHON") == "1":
        return "pure Python (RUNTIMEFAULTS_PURE_PYTHON=1)"
    return (
        "pure Python: pytest_runtimefaults.dbus._fastpath is not built in this tree (it "
        "needs gcc and python3-dev at `pip install -e .`, or run `python setup.py "
        "build_ext --inplace`); the proxy works the same, with more CPU per message"
    )


__all__ = ["HOST_BUS_PATHS", "DBusFaultProxy", "ProxyError", "parse_address"]

HOST_BUS_PATHS = ("/run/dbus/system_bus_socket", "/var/run/dbus/system_bus_socket")
_RECV = 262144
_STRAIGHT_RECV = 65536  # sock.recv() of more allocates (and shrinks) an mmap'd buffer
_ARENA = 1 << 20  # bytes the compiled loop holds at most before it hands them over
_SETTLE_AT = 256  # chunks relayed unframed: frame them now (bounds memory and delay)
_MAX_FDS = 253  # SCM_MAX_FD
_ANC = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)
_BACKLOG_LIMIT = 32 * 2**20  # stop reading a peer while 32 MiB wait for the other one
_EOF_FLUSH = 0.2  # seconds the loop may block giving a closing side what it is owed
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_READABLE = _IN | select.EPOLLHUP | select.EPOLLERR
# A plain int: socket.MSG_CTRUNC is an enum.IntFlag, and ``flags & MSG_CTRUNC`` on it
# runs through enum.py (about 0.5 us) on every chunk a client negotiating fds sends.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
# The routes as module globals: ``Route.EXACT`` goes through the enum class's
# attribute lookup (about 50 ns against 6 ns for a global), twice per chunk.
_RELAY = Route.RELAY
_RELAY_WHOLE = Route.RELAY_WHOLE
_EXACT = Route.EXACT
_BATCH = Delivery.BATCH
_EACH = Delivery.EACH


class ProxyError(RuntimeError):
    """The proxy cannot do what was asked; the message says what to change."""


def parse_address(address: str) -> tuple[int, str | bytes]:
    """The first usable transport of a D-Bus address: ``(AF_UNIX, path)``.

    Supports ``unix:path=`` and ``unix:abstract=`` (what dbus-daemon and
    systemd listen on); other transports raise :class:`ProxyError`.
    """
    for entry in address.split(";"):
        transport, _, params = entry.partition(":")
        if transport != "unix":
            continue
        kv = dict(p.split("=", 1) for p in params.split(",") if "=" in p)
        if "path" in kv:
            return socket.AF_UNIX, _unescape(kv["path"])
        if "abstract" in kv:
            return socket.AF_UNIX, b"\0" + _unescape(kv["abstract"]).encode()
    raise ProxyError(f"no unix:path= or unix:abstract= transport in D-Bus address {address!r}")


def _unescape(value: str) -> str:
    out = bytearray()
    i = 0
    raw = value.encode()
    while i < len(raw):
        if raw[i] == ord("%") and i + 2 < len(raw) + 1:
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode()


def _is_host_bus(path: str) -> bool:
    """Whether *path* is the host's system bus socket: the same inode, not the same name.

    A sandbox's bus reached as ``/proc/PID/root/run/dbus/system_bus_socket`` has the
    host's path once resolved, but is another socket in another mount namespace.
    """
    try:
        st = os.stat(path)
    except OSError:
        return False
    for host in HOST_BUS_PATHS:
        try:
            hs = os.stat(host)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (hs.st_dev, hs.st_ino):
            return True
    return False


class _Write:
    """One queued write of a lane."""

    __slots__ = ("close", "data", "fault", "fds", "message", "pause_after")

    def __init__(self, out: Output) -> None:
        self.data = memoryview(out.data)
        self.fds = out.fds
        self.message = out.message
        self.fault = out.fault
        self.pause_after = out.pause_after
        self.close = out.close


class _Lane:
    """One direction of one connection: the socket it writes to and its queue."""

    __slots__ = ("bytes_queued", "direction", "not_before", "queue", "sock")

    def __init__(self, direction: str, sock: socket.socket) -> None:
        self.direction = direction
        self.sock = sock
        self.queue: deque[_Write] = deque()
        self.not_before = 0.0  # a pause between fragments holds the lane until then
        self.bytes_queued = 0


class _Connection:
    """One client and its upstream, with the state of both directions."""

    def __init__(self, ident: int, client: socket.socket, upstream: socket.socket) -> None:
        self.id = ident
        self.client = client
        self.upstream = upstream
        self.relay = SaslRelay()
        self.closed = False
        # Lanes by the direction of the bytes they carry.
        self.lanes = {TO_BUS: _Lane(TO_BUS, upstream), TO_CLIENT: _Lane(TO_CLIENT, client)}
        self.framers = {TO_BUS: Framer(), TO_CLIENT: Framer()}
        self.pending_fds: dict[str, list[int]] = {TO_BUS: [], TO_CLIENT: []}
        self.in_auth = {TO_BUS: True, TO_CLIENT: True}
        self.owed = {TO_BUS: 0, TO_CLIENT: 0}  # bytes of a partial message already sent
        self.reading = {TO_BUS: True, TO_CLIENT: True}
        self.readers = {TO_BUS: _Reader(self, TO_BUS), TO_CLIENT: _Reader(self, TO_CLIENT)}

    def source(self, direction: str) -> socket.socket:
        return self.client if direction == TO_BUS else self.upstream


class _Reader:
    """One direction of one connection as the loop reads it: what the hot path needs.

    ``straight`` says the bytes of this direction may go out as they are read
    (when the engine is idle, no fd waits and the lane's queue is empty): the
    handshake is over and the framer holds no byte that was not sent.  ``fast``
    adds that the handshake is over both ways, so the loop reads it itself:
    with ``recv``, or with ``recvmsg`` when fd passing was negotiated (``fds``),
    and a chunk that came with fds takes the exact path.
    ``dirty``: chunks relayed so wait to be framed, and the framer and ``owed``
    lag behind until the proxy settles them (chunks of whole messages relayed
    with rules leave the framer on a message boundary, and need no settling).
    ``aligned``: the framer is on a message boundary and nothing is owed.
    """

    __slots__ = (
        "aligned",
        "back",
        "broken",
        "conn",
        "direction",
        "dirty",
        "dst",
        "fast",
        "fds",
        "framer",
        "lane",
        "pending_fds",
        "recv",
        "recvmsg",
        "send",
        "straight",
    )

    def __init__(self, conn: _Connection, direction: str) -> None:
        self.conn = conn
        self.direction = direction
        self.lane = conn.lanes[direction]
        # The other direction's lane, which writes to the socket this one reads.
        self.back = conn.lanes[TO_CLIENT if direction == TO_BUS else TO_BUS]
        self.framer = conn.framers[direction]
        self.pending_fds = conn.pending_fds[direction]
        self.recv = conn.source(direction).recv
        self.recvmsg = conn.source(direction).recvmsg
        self.send = self.lane.sock.send
        self.dst = self.lane.sock.fileno()  # for the compiled relay
        self.straight = False
        self.fast = False
        self.fds = False
        self.aligned = False
        self.dirty = False
        self.broken = False  # the framer failed: this stream lost its framing

    def refresh(self) -> None:
        """Recompute ``straight`` and ``fast`` after the exact path changed the state."""
        conn = self.conn
        self.straight = (
            not conn.in_auth[self.direction] and self.framer.pending == conn.owed[self.direction]
        )
        self.fast = self.straight and conn.relay.client_done
        self.fds = conn.relay.unix_fds_agreed
        self.aligned = not self.framer.pending and not conn.owed[self.direction]


def _fds_from(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return fds


def _take_fds(msg: Message, pending: list[int]) -> list[int]:
    if not pending:
        return []
    n = msg.unix_fds
    if not n:
        return []
    taken = pending[:n]
    del pending[:n]
    return taken


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with swallowed(OSError, "closing fd %d", fd):
            os.close(fd)


def _send(sock: socket.socket, data: memoryview, fds: list[int]) -> int:
    """Send what the socket takes now; fds go with the first byte (then are closed)."""
    if not fds:
        return sock.send(data)
    try:
        return sock.sendmsg(
            [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        )
    finally:
        _close_all(fds)
        fds.clear()


class DBusFaultProxy:
    """A transparent D-Bus proxy that injects faults on demand.

    :param upstream: the D-Bus address to relay to (a :class:`PrivateBus`, a sandboxed
        systemd's bus, any ``unix:`` address).
    :param listen: the socket path to listen on (default: ``bus`` in a new private
        0700 directory).
    :param rules: initial fault rules (see :mod:`pytest_runtimefaults.dbus.rules`).
    :param seed: seed of every random choice the rules make.
    :param allow_host_bus: the host's system bus is refused unless this is true, since
        a test suite must never disturb the host.
    :param pcap: write the trace to this pcap file at ``stop()``.
    :param trace_maxlen: messages kept in the trace (oldest dropped first).
    :param journal: record the private directory in this cleanup journal.
    :param directory: parent of the private directory (default: the temp dir).
    """

    def __init__(
        self,
        upstream: str,
        *,
        listen: str | Path | None = None,
        rules: Iterable[Rule | Action | str] = (),
        seed: int = 0,
        allow_host_bus: bool = False,
        pcap: str | Path | None = None,
        trace_maxlen: int | None = 100_000,
        journal: Journal | None = None,
        directory: str | Path | None = None,
    ) -> None:
        self.upstream = upstream
        _family, target = parse_address(upstream)
        if isinstance(target, str) and not allow_host_bus and _is_host_bus(target):
            raise ProxyError(
                f"refusing to proxy the host's system bus ({target}): a test suite must "
                "not disturb it. Use a PrivateBus, or opt in with allow_host_bus=True "
                "(--runtimefaults-allow-host-bus)."
            )
        self._upstream_target = target
        self._listen = Path(listen) if listen else None
        self._parent = directory
        self.engine = FaultEngine(seed=seed)
        #: callables told of every rule added (the pytest fixture registers faults so)
        self.on_add: list[Callable[[Rule], object]] = []
        for rule in rules:
            self.engine.add(rule)
        self.trace = Trace(trace_maxlen)
        # Chunks relayed before they were framed, in relay order: (time or None when the
        # trace was off, reader, bytes).  Reading the trace frames them first.
        self._unframed: list[tuple[float | None, _Reader, bytes]] = []
        self.trace.settle = self._settle_on_loop
        # Bumped by every add(): the compiled loop reads it between a read and its
        # write, so a rule added while it relays takes effect for the next message.
        self._gen = array.array("q", [0])
        self._arena: bytearray | None = None  # what the compiled loop reads into (1 MiB)
        self.pcap = pcap
        # Journaled even outside pytest, so a killed owner's directory is reaped later.
        self.journal = journal if journal is not None else Journal.default()
        self._errors: list[str] = []
        self.dir: Path | None = None
        self.socket_path: Path | None = None
        self.connections: dict[int, _Connection] = {}
        self._ids = itertools.count(1)
        self._listener: socket.socket | None = None
        self._loop: threading.Thread | None = None
        self._epoll: select.epoll | None = None
        self._by_fd: dict[int, _Reader] = {}  # fd -> the direction read from it
        self._wake_r = self._wake_w = -1
        self._inbox: deque[Callable[[], None]] = deque()
        self._paused: set[tuple[int, str]] = set()  # lanes waiting for a pause to end
        self._stopping = False
        self._rids: list[int] = []
        self._refuse_until = 0.0  # drop_connections: connections accepted before then are closed
        # stop_accepting: our own connections that fill the listen backlog, and their
        # (autobound, abstract) names, by which the accept loop knows them afterwards.
        self._fillers: list[socket.socket] = []
        self._filler_names: set[bytes] = set()
        self._accepting = True

    # -- lifecycle -------------------------------------------------------------------
    @property
    def address(self) -> str:
        if self.socket_path is None:
            raise ProxyError("the proxy is not started")
        return f"unix:path={self.socket_path}"

    @property
    def errors(self) -> list[str]:
        """Malformed data and unreachable upstreams, one readable line each.

        Reading it frames what was relayed unframed first (as reading the trace
        does), so malformed data sent on the hot path is named here; clear the
        list to acknowledge them.
        """
        self._settle_on_loop()
        return self._errors

    @errors.setter
    def errors(self, value: list[str]) -> None:
        self._errors = value

    @property
    def env(self) -> dict[str, str]:
        """Environment entries pointing a client at the proxy (pass as ``env=``)."""
        return {"DBUS_SYSTEM_BUS_ADDRESS": self.address, "DBUS_SESSION_BUS_ADDRESS": self.address}

    def start(self) -> DBusFaultProxy:
        if self._listener is not None:
            return self
        self._stopping = False
        self._accepting = True  # a new listener (a stop() mid-fault left it False)
        if self._listen is None:
            self.dir = Path(tempfile.mkdtemp(prefix="rf-proxy-", dir=self._parent))
            os.chmod(self.dir, 0o700)
            if self.journal:
                self._rids.append(self.journal.add("path", path=str(self.dir)))
            self.socket_path = self.dir / "bus"
        else:
            self.socket_path = self._listen
            if self.journal:
                self._rids.append(self.journal.add("path", path=str(self._listen)))
        listener = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        try:
            listener.bind(str(self.socket_path))
        except OSError as exc:
            listener.close()
            self._cleanup_dir()
            raise ProxyError(f"cannot listen on {self.socket_path}: {exc}") from exc
        listener.listen(128)
        self._listener = listener
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll = select.epoll()
        self._epoll.register(listener.fileno(), _IN)
        self._epoll.register(self._wake_r, _IN)
        self._loop = threading.Thread(target=self._run, name="rf-proxy-loop", daemon=True)
        self._loop.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection, end the loop, write the pcap."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._stopping = True
        self._wake()
        if self._loop is not None:
            self._loop.join(timeout=10)
            self._loop = None
        # The loop closed the connections on its way out; close what is left anyway.
        for conn in list(self.connections.values()):
            self._close(conn)
        listener.close()
        self._close_fillers()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        for fd in (self._wake_r, self._wake_w):
            with swallowed(OSError, "closing the wake pipe fd %d", fd):
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self.pcap:
            self.trace.write_pcap(self.pcap)
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        elif self._listen is not None:
            with swallowed(FileNotFoundError, "removing the listen socket %s", self._listen):
                self._listen.unlink()
        if self.journal:
            for rid in self._rids:
                self.journal.release(rid)
        self._rids.clear()

    def __enter__(self) -> DBusFaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def threads(self) -> list[threading.Thread]:
        """Every thread the proxy runs now (tests check none survives ``stop()``)."""
        return [t for t in (self._loop,) if t is not None and t.is_alive()]

    def sync(self, timeout: float = 10.0) -> None:
        """Wait until every message relayed so far is in the trace.

        With no rule concerned, bytes are written before they are framed for the
        trace; reading the trace frames them first, so this is only needed to
        wait for the loop without reading (the trace's readers call it).  Raises
        :class:`TimeoutError` if the loop is stuck for *timeout* seconds.
        """
        if not self._on_loop(self._settle, timeout):
            raise TimeoutError(
                f"proxy {self.address}: its loop did not come round within {timeout} s "
                f"(errors: {self._errors or 'none'})"
            )

    def _settle_on_loop(self) -> None:
        self._on_loop(self._settle)

    # -- rules -----------------------------------------------------------------------
    def add(self, rule: Rule | Action | str) -> Rule:
        """Add a fault rule (a Rule, an Action for every message, or its text form).

        It takes effect for the next message.  Returns the :class:`Rule`, whose
        ``hits`` and ``applied`` counts tell what it did.
        """
        added = self.engine.add(rule)
        self._gen[0] += 1  # after the engine has it: see _loop_compiled
        for callback in self.on_add:
            callback(added)
        return added

    def remove(self, rule: Rule) -> None:
        """Remove *rule*; when it was the last, held messages are released now."""
        self._on_loop(lambda: self._enqueue(self.engine.remove(rule)))

    def clear(self) -> None:
        """Remove every rule and release every held message now."""
        self._on_loop(lambda: self._enqueue(self.engine.clear()))

    @property
    def rules(self) -> list[Rule]:
        return list(self.engine.rules)

    # -- the bus going away ----------------------------------------------------------
    def drop_connections(self, refuse_for: float = 0.0) -> int:
        """Close every connection, as a bus that restarts does; returns how many.

        Each client sees its socket closed (EOF) at once; messages held by rules
        for it are lost with it.  For *refuse_for* seconds afterwards every new
        connection is closed as soon as it is accepted (before the handshake: the
        client reads EOF), so a client that reconnects at once fails and one that
        retries a while gets through.  Both appear in the trace as faults.

        Example::

            proxy.drop_connections(refuse_for=0.5)   # mid-call: the runtime must reconnect
        """
        if refuse_for < 0:
            raise ValueError(f"refuse_for must be >= 0 seconds, not {refuse_for!r}")
        dropped: list[int] = []

        def drop() -> None:
            self._refuse_until = time.monotonic() + refuse_for if refuse_for else 0.0
            for conn in list(self.connections.values()):
                self._record(conn.id, TO_CLIENT, None, fault="drop_connections: closed")
                self._close(conn)
                dropped.append(conn.id)

        if not self._on_loop(drop):
            raise ProxyError(f"proxy {self.address}: its loop did not run drop_connections")
        return len(dropped)

    # -- a listen backlog that is full (connect() gets EAGAIN) ---------------------------
    def stop_accepting(self) -> int:
        """Stop accepting and fill the listen backlog, so that connect() gets EAGAIN.

        What a bus (or systemd before 254, which listened with a backlog of 128)
        does under a connection storm: the proxy stops accepting, shrinks its
        backlog to the least the kernel allows (``listen(0)``: one waiting
        connection) and fills it with connections of its own.  Until
        :meth:`resume_accepting`, a client's non-blocking ``connect()`` (sd-bus,
        Go, Python sockets with a timeout) fails at once with ``EAGAIN``
        (``Resource temporarily unavailable``) and a blocking one waits.
        Connections accepted before go on as if nothing happened.  Returns how
        many connections of its own it queued (0 when clients already filled it).
        Idempotent; in the trace as a fault.

        Example::

            proxy.stop_accepting()
            ...                      # a runtime connecting now meets EAGAIN
            proxy.resume_accepting()
        """
        if self._listener is None:
            raise ProxyError("the proxy is not started: start() it before stop_accepting()")
        queued: list[int] = []

        def fill() -> None:
            if not self._accepting or self._listener is None or self.socket_path is None:
                return
            self._accepting = False
            if self._epoll is not None:
                self._epoll.unregister(self._listener.fileno())
            self._listener.listen(0)
            # Bounded: the kernel's queue for backlog 0 holds one connection; if it
            # took more, the loop would still end instead of filling memory.
            for _ in range(64):
                filler = socket.socket(
                    socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
                filler.bind("")  # autobind: an abstract name that tells it apart when accepted
                try:
                    filler.connect(str(self.socket_path))
                except (BlockingIOError, InterruptedError):
                    filler.close()  # full: what we wanted
                    break
                except OSError:
                    filler.close()
                    raise
                self._fillers.append(filler)
                self._filler_names.add(filler.getsockname())
            queued.append(len(self._fillers))
            self._record(0, TO_BUS, None, fault=f"stop_accepting: backlog full ({queued[0]} ours)")

        if not self._on_loop(fill):
            raise ProxyError(f"proxy {self.address}: its loop did not run stop_accepting")
        return queued[0] if queued else 0

    def resume_accepting(self) -> None:
        """Accept again (those who waited in the backlog first); drop our fillers.

        Idempotent.  The backlog is 128 again, as at start.
        """

        def resume() -> None:
            if self._accepting or self._listener is None:
                return
            self._accepting = True
            self._listener.listen(128)  # also wakes blocking connect()s waiting for room
            if self._epoll is not None:
                self._epoll.register(self._listener.fileno(), _IN)
            self._accept()  # the fillers are known by name there and closed
            self._close_fillers()
            self._record(0, TO_BUS, None, fault="resume_accepting")

        if not self._on_loop(resume):
            raise ProxyError(f"proxy {self.address}: its loop did not run resume_accepting")

    @property
    def accepting(self) -> bool:
        """False between :meth:`stop_accepting` and :meth:`resume_accepting`."""
        return self._accepting

    def _close_fillers(self) -> None:
        for filler in self._fillers:
            filler.close()
        self._fillers.clear()

    def inject(self, make: Callable[[list[int]], list[Output]]) -> int:
        """Write messages the caller makes, on the loop: ``make(connection ids)`` gives them.

        *make* runs on the loop thread with the ids of the open connections and
        returns :class:`~pytest_runtimefaults.dbus.actions.Output` writes; they are
        queued behind what each lane holds and flushed as any other (a write's
        ``fault`` goes to the trace).  Returns how many connections they went to.
        An exception of *make* is raised here.  Used by
        :func:`~pytest_runtimefaults.dbus.flood.flood_now`.
        """
        box: dict[str, object] = {}

        def run() -> None:
            try:
                outputs = make(sorted(self.connections))
            except Exception as exc:  # raised in the caller's thread, not the loop's
                box["error"] = exc
                return
            box["conns"] = len({out.conn for out in outputs})
            self._enqueue(outputs)

        if not self._on_loop(run):
            raise ProxyError(f"proxy {self.address}: its loop did not run the injection")
        error = box.get("error")
        if isinstance(error, Exception):
            raise error
        conns = box.get("conns", 0)
        assert isinstance(conns, int)
        return conns

    def _on_loop(self, fn: Callable[[], None], timeout: float = 10.0) -> bool:
        """Run *fn* on the loop thread and wait for it (or run it here if stopped).

        False if the loop did not run it within *timeout* seconds.
        """
        loop = self._loop
        if loop is None or threading.current_thread() is loop or not loop.is_alive():
            fn()
            return True
        done = threading.Event()

        def call() -> None:
            try:
                fn()
            finally:
                done.set()

        self._inbox.append(call)
        self._wake()
        deadline = time.monotonic() + timeout
        while not done.wait(0.1):
            if not loop.is_alive():
                # The loop ended without running it (stop() raced with us): run it here.
                with contextlib.suppress(ValueError):
                    self._inbox.remove(call)
                    call()
                return True
            if time.monotonic() >= deadline:
                return False
        return True

    def _wake(self) -> None:
        # Not logged: a full pipe (EAGAIN) already holds a wake-up, which is all we need.
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # -- the loop ----------------------------------------------------------------------
    def _run(self) -> None:
        epoll = self._epoll
        assert epoll is not None
        assert self._listener is not None
        listen_fd = self._listener.fileno()
        wake_fd = self._wake_r
        by_fd = self._by_fd
        engine = self.engine
        relay = _relay
        loop_c = _loop_c
        try:
            while not self._stopping:
                if (
                    loop_c is not None
                    and (engine.idle or engine.prefilter is not None)
                    and not self._paused
                    and not self._inbox
                    and self._loop_compiled(loop_c)
                ):
                    continue  # it relayed, or Python finished a chunk for it: go on in C
                timeout = self._timeout() if engine.holding or self._paused else -1
                # (No timeout to frame what waits while idle: arming a timer for every
                # wait costs more than the framing saves, on a VM at least.)
                events = epoll.poll(timeout)
                for fd, mask in events:
                    r = by_fd.get(fd)
                    if r is None:
                        if fd == listen_fd:
                            self._accept()
                        elif fd == wake_fd:
                            # Hot path, not logged: an empty pipe means a read drained it.
                            with contextlib.suppress(OSError):
                                os.read(wake_fd, 4096)
                            while self._inbox:
                                self._inbox.popleft()()
                        continue
                    conn = r.conn
                    if mask & _OUT:
                        self._flush(conn, r.back)
                    if not mask & _READABLE or conn.closed:
                        continue
                    if not may_read_fast(r.fast, bool(r.lane.queue), bool(r.pending_fds)):
                        self._read(r)
                        continue
                    if relay is not None and engine.idle:
                        # No rule at all: the route is RELAY whatever the bytes, so
                        # read and write in one C call, and frame later as below.
                        self._relay_compiled(r, fd, relay)
                        continue
                    try:
                        if r.fds:
                            data, anc, flags, _ = r.recvmsg(_STRAIGHT_RECV, _ANC)
                            if data and (anc or flags & _MSG_CTRUNC):
                                self._handle(r, data, anc, flags)  # fds: the exact path
                                continue
                        else:
                            data = r.recv(_STRAIGHT_RECV)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        self._eof(conn, r.direction)
                        continue
                    # route_read's first answer, without the call: no rule at all.
                    route = (
                        _RELAY
                        if engine.idle
                        else route_read(
                            data,
                            idle=False,
                            dirty=r.dirty,
                            aligned=r.aligned,
                            prefilter=engine.prefilter,
                        )
                    )
                    if route is _EXACT:
                        self._handle(r, data, [], 0)
                        continue
                    # RELAY (no rule at all: even a piece of a message goes out as it
                    # came, framed later) or RELAY_WHOLE (whole messages no rule
                    # concerns: the same, and the framer stays on a message boundary).
                    if route is _RELAY:
                        r.dirty = True
                    self._straight(r, data)
                if engine.holding:
                    deadline = engine.next_deadline()
                    if deadline is not None and deadline <= time.monotonic():
                        self._enqueue(engine.tick(time.monotonic()))
                if self._paused:
                    self._resume_paused()
        except Exception as exc:  # a bug of ours must not leave clients hanging silently
            self._error(f"proxy loop failed: {exc!r}; every connection was closed")
            raise
        finally:
            try:
                self._settle()
            finally:
                for conn in list(self.connections.values()):
                    self._close(conn)
                while self._inbox:  # calls that came with stop(): nobody waits in vain
                    self._inbox.popleft()()

    def _loop_compiled(self, loop_c: _LoopFn) -> bool:
        """Relay in C every connection no rule concerns, until Python is needed.

        With no rule, every chunk of every direction past its handshake goes on
        as it came (framed later, as on the Python path: ``dirty``).  With rules
        and a prefilter, a direction whose framer is on a message boundary goes
        on chunk by chunk while each chunk is whole messages naming no member
        the rules name (RELAY_WHOLE); any other chunk comes back unwritten and
        takes the exact path.

        True when the loop should call it again at once (it recorded as many
        chunks as it may, or Python finished a chunk for it); False when an event
        only Python handles waits in the epoll set (the wake-up pipe, the
        listener, a connection off the fast path, a writable socket) or a rule came.
        """
        assert self._epoll is not None
        seen = self._gen[0]  # before the engine is read: an add() after it is seen in C
        engine = self.engine
        idle = engine.idle
        if not idle and engine.prefilter is None:
            return False
        by_fd = self._by_fd
        if not by_fd:
            return False
        table = array.array("i", [-1]) * (max(by_fd) + 1)
        whole = 0 if idle else 2
        ours = False
        for fd, r in by_fd.items():
            if (
                not r.conn.closed
                and may_read_fast(r.fast, bool(r.lane.queue), bool(r.pending_fds))
                and (idle or (r.aligned and not r.dirty))
            ):
                table[fd] = r.dst << 2 | whole | r.fds
                ours = True
        if not ours:
            return False
        members = b"" if idle else b"".join(m + b"\0" for m in engine.members)
        unframed = self._unframed
        if self._arena is None:
            self._arena = bytearray(_ARENA)
        try:
            reason, records, pending = loop_c(
                self._epoll.fileno(),
                self._wake_r,
                table,
                self._gen,
                seen,
                max(1, _SETTLE_AT - len(unframed)),
                self.trace.flag,
                self._arena,
                members,
            )
        except InterruptedError:
            return False
        for t, fd, data in records:
            r = by_fd[fd]
            if idle:  # (whole messages, RELAY_WHOLE, leave the framer on a boundary)
                r.dirty = True
            unframed.append((t, r, data))
        if pending is not None:
            fd, data, sent, fds, truncated, t = pending
            self._relayed(by_fd[fd], data, sent, fds, truncated, t, dirty=idle)
        if len(unframed) >= _SETTLE_AT:
            self._settle()
        return reason != _LOOP_PYTHON

    def _relay_compiled(
        self,
        r: _Reader,
        fd: int,
        relay: _RelayFn,
    ) -> None:
        """One chunk through the compiled relay: written on at once unless fds came."""
        t = time.monotonic() if self.trace.enabled else None  # before the peer can act
        try:
            got = relay(fd, r.dst, r.fds)
        except OSError:
            got = (b"", -1, [], False)
        if got is None:
            return  # nothing to read after all
        data, sent, fds, truncated = got
        self._relayed(r, data, sent, fds, truncated, t)

    def _relayed(
        self,
        r: _Reader,
        data: bytes,
        sent: int,
        fds: list[int],
        truncated: bool,
        t: float | None,
        *,
        dirty: bool = True,
    ) -> None:
        """Finish a chunk the compiled part read: *sent* bytes written (-1: none, -2: failed).

        *dirty*: it went on as RELAY (no rule), not RELAY_WHOLE (whole messages).
        """
        if not data:
            _close_all(fds)
            self._eof(r.conn, r.direction)
            return
        if sent == -1:
            # fds came (or were cut): nothing was written; the exact path takes them.
            anc = (
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                if fds
                else []
            )
            self._handle(r, data, anc, _MSG_CTRUNC if truncated else 0)
            return
        if sent == -2:
            self._close(r.conn)
            return
        if dirty:
            r.dirty = True
        if sent < len(data):
            self._queue_rest(r, data, sent)
        self._unframed.append((t, r, data))
        if len(self._unframed) >= _SETTLE_AT:
            self._settle()

    def _timeout(self) -> float:
        """Seconds until the next held message or paused lane is due (-1: none)."""
        deadlines = []
        if self.engine.holding:
            d = self.engine.next_deadline()
            if d is not None:
                deadlines.append(d)
        for conn_id, direction in self._paused:
            conn = self.connections.get(conn_id)
            if conn is not None:
                deadlines.append(conn.lanes[direction].not_before)
        if not deadlines:
            return -1
        return max(0.0, min(deadlines) - time.monotonic())

    def _accept(self) -> None:
        assert self._listener is not None
        assert self._epoll is not None
        if not self._accepting:
            # stop_accepting ran earlier in this turn of the loop, after epoll had
            # reported the listener: what waits in the backlog must stay there.
            return
        while True:
            try:
                client, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if peer and peer in self._filler_names:
                # One of stop_accepting's own connections, out of the backlog.
                self._filler_names.discard(peer)
                client.close()
                continue
            ident = next(self._ids)
            if self._refuse_until:
                if time.monotonic() < self._refuse_until:
                    self._record(ident, TO_CLIENT, None, fault="drop_connections: refused")
                    client.close()
                    continue
                self._refuse_until = 0.0
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            upstream.settimeout(5)
            try:
                upstream.connect(self._upstream_target)
            except OSError as exc:
                self._error(
                    f"connection #{ident}: cannot reach the bus at {self.upstream}: "
                    f"{exc}; is it running? The client was disconnected."
                )
                upstream.close()
                client.close()
                continue
            client.setblocking(False)
            upstream.setblocking(False)
            conn = _Connection(ident, client, upstream)
            self.connections[ident] = conn
            self._by_fd[client.fileno()] = conn.readers[TO_BUS]
            self._by_fd[upstream.fileno()] = conn.readers[TO_CLIENT]
            self._epoll.register(client.fileno(), _IN)
            self._epoll.register(upstream.fileno(), _IN)

    def _read(self, r: _Reader) -> None:
        conn = r.conn
        src = conn.source(r.direction)
        anc: list[tuple[int, int, bytes]] = []
        flags = 0
        try:
            if conn.relay.client_done and not conn.relay.unix_fds_agreed:
                # No fd passing was negotiated: none can come, and recv is cheaper.
                n = src.recv_into(_BUFFER)
            else:
                n, anc, flags, _ = src.recvmsg_into([_VIEW], _ANC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n, anc, flags = 0, [], 0
        if not n:
            self._eof(conn, r.direction)
            return
        self._handle(r, bytes(_VIEW[:n]), anc, flags)

    def _handle(
        self, r: _Reader, data: bytes, anc: list[tuple[int, int, bytes]], flags: int
    ) -> None:
        """Relay *data* read for *r* off the loop's hot path."""
        conn = r.conn
        try:
            self._received(r, data, anc, flags)
        except (WireError, AuthError, ProxyError) as exc:
            self._malformed(r, exc)
        except Exception as exc:
            # A bug of ours on this connection's bytes: it ends this connection, not
            # the loop and every other client with it.  Named in ``errors``.
            logger.debug("proxy: connection #%d failed", conn.id, exc_info=True)
            side = "client" if r.direction == TO_BUS else "bus"
            self._error(
                f"connection #{conn.id}: internal error on data from the {side}: {exc!r} "
                "(a bug of the proxy: please report it); connection closed"
            )
            self._close(conn)
        finally:
            if not conn.closed:
                for reader in conn.readers.values():
                    reader.refresh()

    def _malformed(self, r: _Reader, exc: Exception) -> None:
        side = "client" if r.direction == TO_BUS else "bus"
        self._error(
            f"connection #{r.conn.id}: malformed data from the {side}: {exc}; connection closed"
        )
        self._close(r.conn)

    def _queue_rest(self, r: _Reader, data: bytes, sent: int) -> None:
        """The socket took *sent* bytes of *data* on the hot path: queue the rest."""
        conn = r.conn
        self._queue(conn, r.lane, Output(conn.id, r.direction, data[sent:]))
        self._update_mask(conn, r.lane.sock)

    def _settle(self) -> None:
        """Frame the chunks relayed unframed, in relay order: trace them, catch up the framers.

        Runs on the loop thread (or once it ended).  A chunk that does not frame
        closes its connection, as it would have on the exact path.
        """
        unframed = self._unframed
        entries = self.trace.extend
        while unframed:
            batch = unframed[:]
            unframed.clear()
            for t, r, data in batch:
                r.dirty = False
                if r.broken:
                    continue
                try:
                    msgs = r.framer.feed(data)
                except WireError as exc:
                    r.broken = True  # the rest of its chunks cannot be framed
                    self._malformed(r, exc)
                    continue
                conn = r.conn
                direction = r.direction
                # Bytes of a message not yet whole that are already on their way: if a
                # rule comes before the rest, the rest must follow them as they are.
                conn.owed[direction] = r.framer.pending
                r.aligned = not conn.owed[direction]
                if t is not None and msgs:
                    entries(t, conn.id, direction, msgs)

    def _received(
        self,
        r: _Reader,
        data: bytes,
        anc: list[tuple[int, int, bytes]],
        flags: int,
    ) -> None:
        conn = r.conn
        direction = r.direction
        pending_fds = r.pending_fds
        if anc:
            pending_fds += _fds_from(anc)
            if flags & _MSG_CTRUNC:
                raise ProxyError("file descriptors were truncated (more than 253)")
        lane = r.lane
        engine = self.engine
        if (
            route_received(
                straight=r.straight,
                idle=engine.idle,
                pending_fds=bool(pending_fds),
                queued=bool(lane.queue),
            )
            is _RELAY
        ):
            # No rule at all (fd passing negotiated, or the first chunk after the
            # handshake): as on the loop's hottest path, write now, frame later.
            r.dirty = True
            self._straight(r, data)
            return
        if r.dirty:
            # This direction's framer must see every byte relayed so far.
            self._settle()
            if conn.closed:
                return
        framer = r.framer
        if (
            route_settled(
                data,
                in_auth=conn.in_auth[direction],
                owed=bool(conn.owed[direction]),
                pending_fds=bool(pending_fds),
                queued=bool(lane.queue),
                framer_pending=bool(framer.pending),
                prefilter=engine.prefilter,
            )
            is _RELAY_WHOLE
        ):
            # Nothing queued, whole messages no rule concerns: write them now, frame
            # them later (the framer stays on a message boundary).
            self._straight(r, data)
            return
        if self._unframed:
            # The trace must show what was relayed before what comes now.
            self._settle()
            if conn.closed:
                return
        if conn.in_auth[direction]:
            data = self._handshake(r, data)
        if data:
            self._exact(r, data)
        self._flush(conn, lane)

    def _handshake(self, r: _Reader, data: bytes) -> bytes:
        """Relay the SASL text in *data*; return the bytes after it (the first messages)."""
        conn = r.conn
        direction = r.direction
        relay = conn.relay
        text, data = (relay.client_data if direction == TO_BUS else relay.server_data)(data)
        if text:
            self._queue(conn, r.lane, Output(conn.id, direction, text))
        if relay.client_done if direction == TO_BUS else relay.server_done:
            conn.in_auth[direction] = False
            other = TO_CLIENT if direction == TO_BUS else TO_BUS
            if relay.server_done and relay.client_done:
                conn.in_auth[other] = False
        return data

    def _exact(self, r: _Reader, data: bytes) -> None:
        """Frame *data* and queue what it completes, through the engine if a rule may care.

        The caller flushes the lane.
        """
        conn = r.conn
        direction = r.direction
        lane = r.lane
        engine = self.engine
        pending_fds = r.pending_fds
        framer = r.framer
        msgs = framer.feed(data)
        owed = conn.owed[direction]
        if owed:
            # The start of the first message went out on the hot path: send the rest
            # of it as it is, whatever rules say.
            if not msgs:
                conn.owed[direction] = framer.pending
                self._queue(conn, lane, Output(conn.id, direction, data))
                return
            first = msgs.pop(0)
            conn.owed[direction] = 0
            self._record(conn.id, direction, first)
            self._queue(conn, lane, Output(conn.id, direction, first.raw[owed:]))
        if not msgs:
            return
        delivery = deliver(
            unconcerned=engine.idle or all(engine.bypass(direction, m) for m in msgs),
            pending_fds=bool(pending_fds),
            queued=bool(lane.queue),
        )
        if delivery is _BATCH:
            for msg in msgs:
                self._record(conn.id, direction, msg)
            self._queue(conn, lane, Output(conn.id, direction, b"".join(m.raw for m in msgs)))
        elif delivery is _EACH:
            for msg in msgs:
                self._record(conn.id, direction, msg)
                self._queue(
                    conn, lane, Output(conn.id, direction, msg.raw, _take_fds(msg, pending_fds))
                )
        else:
            now = time.monotonic()
            outputs: list[Output] = []
            for msg in msgs:
                fds = _take_fds(msg, pending_fds)
                self._record(conn.id, direction, msg)
                outputs += engine.on_message(conn.id, direction, msg, fds, now)
            if engine.notes:
                self._drain_notes()
            self._enqueue(outputs)

    def _straight(self, r: _Reader, data: bytes) -> bool:
        """Write *data* now (queue what the socket does not take), frame it later.

        False if the connection closed (a write failed).
        """
        t = time.monotonic() if self.trace.enabled else None  # before the peer can act
        try:
            sent = r.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(r.conn)
            return False
        if sent < len(data):
            self._queue_rest(r, data, sent)
        self._unframed.append((t, r, data))
        if len(self._unframed) >= _SETTLE_AT:
            self._settle()
        return True

    def _eof(self, conn: _Connection, direction: str) -> None:
        """One side stopped sending: give it what is queued for it, briefly, then close.

        A client that half-closes still reads what it is owed.  The flush blocks
        the loop, so it is bounded by :data:`_EOF_FLUSH` seconds in all (a
        client that reads a trickle, or not at all, must not freeze every other
        connection); what it could not take is dropped and said in the trace.
        """
        other = conn.lanes[TO_CLIENT if direction == TO_BUS else TO_BUS]
        deadline = time.monotonic() + _EOF_FLUSH
        with swallowed(OSError, "flushing a closing connection's queue"):
            other.sock.setblocking(True)
            for w in other.queue:
                while w.data:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"not flushed within {_EOF_FLUSH} s")
                    other.sock.settimeout(left)
                    w.data = w.data[_send(other.sock, w.data, w.fds) :]
        undelivered = [w for w in other.queue if w.data]
        if undelivered:
            side = "client" if other.direction == TO_CLIENT else "bus"
            self._record(
                conn.id,
                other.direction,
                None,
                fault=f"eof: the {side} stopped sending; {len(undelivered)} writes "
                f"({sum(len(w.data) for w in undelivered)} bytes) queued for it were dropped",
            )
        self._close(conn)

    # -- writing -------------------------------------------------------------------------
    def _enqueue(self, outputs: list[Output]) -> None:
        touched: dict[tuple[int, str], tuple[_Connection, _Lane]] = {}
        for out in outputs:
            conn = self.connections.get(out.conn)
            if conn is None or conn.closed:
                _close_all(out.fds)
                continue
            lane = conn.lanes[out.direction]
            self._queue(conn, lane, out)
            touched[(out.conn, out.direction)] = (conn, lane)
        for conn, lane in touched.values():
            self._flush(conn, lane)

    def _queue(self, conn: _Connection, lane: _Lane, out: Output) -> None:
        lane.queue.append(_Write(out))
        lane.bytes_queued += len(out.data)
        if lane.bytes_queued > _BACKLOG_LIMIT and conn.reading[lane.direction]:
            # Back-pressure: stop reading the source until the destination drains.
            conn.reading[lane.direction] = False
            self._update_mask(conn, conn.source(lane.direction))

    def _flush(self, conn: _Connection, lane: _Lane) -> None:
        """Write the lane's queue in order until it is empty, blocked or paused."""
        queue = lane.queue
        now = 0.0
        while queue and not conn.closed:
            if lane.not_before:
                now = now or time.monotonic()
                if now < lane.not_before:
                    self._paused.add((conn.id, lane.direction))
                    return
                lane.not_before = 0.0
            w = queue[0]
            if w.fault:
                # Recorded as the write starts: whoever sees the effect finds it traced.
                self._record(conn.id, lane.direction, w.message, fault=w.fault)
                w.fault = None
            if w.data:
                try:
                    sent = _send(lane.sock, w.data, w.fds)
                except (BlockingIOError, InterruptedError):
                    self._update_mask(conn, lane.sock)
                    return
                except OSError:
                    self._close(conn)
                    return
                lane.bytes_queued -= sent
                w.data = w.data[sent:]
                if w.data:
                    self._update_mask(conn, lane.sock)  # wait until it is writable
                    return
            queue.popleft()
            if w.close:
                self._close(conn)
                return
            if w.pause_after and queue:
                lane.not_before = time.monotonic() + w.pause_after
                now = 0.0
        lane.bytes_queued = max(lane.bytes_queued, 0)
        self._paused.discard((conn.id, lane.direction))
        if not conn.reading[lane.direction] and lane.bytes_queued < _BACKLOG_LIMIT // 2:
            conn.reading[lane.direction] = True
        self._update_mask(conn, lane.sock)
        self._update_mask(conn, conn.source(lane.direction))

    def _resume_paused(self) -> None:
        now = time.monotonic()
        for conn_id, direction in list(self._paused):
            conn = self.connections.get(conn_id)
            if conn is None:
                self._paused.discard((conn_id, direction))
                continue
            if conn.lanes[direction].not_before <= now:
                self._paused.discard((conn_id, direction))
                self._flush(conn, conn.lanes[direction])

    def _update_mask(self, conn: _Connection, sock: socket.socket) -> None:
        """Poll *sock* for reading if its direction reads, for writing if its lane waits."""
        if conn.closed or self._epoll is None:
            return
        reads = TO_BUS if sock is conn.client else TO_CLIENT
        writes = TO_CLIENT if sock is conn.client else TO_BUS
        mask = 0
        if conn.reading[reads]:
            mask |= _IN
        lane = conn.lanes[writes]
        if lane.queue and not lane.not_before:
            mask |= _OUT
        # Hot path, not logged: a socket closed under us is dropped by _close.
        with contextlib.suppress(OSError, ValueError):
            self._epoll.modify(sock.fileno(), mask)

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.connections.pop(conn.id, None)
        for direction, lane in conn.lanes.items():
            self._paused.discard((conn.id, direction))
            for w in lane.queue:
                _close_all(w.fds)
            lane.queue.clear()
        for fds in conn.pending_fds.values():
            _close_all(fds)
            fds.clear()
        for sock in (conn.client, conn.upstream):
            with swallowed((OSError, ValueError), "unregistering a closed connection's socket"):
                fd = sock.fileno()
                self._by_fd.pop(fd, None)
                if self._epoll is not None:
                    self._epoll.unregister(fd)
            with swallowed(OSError, "shutting down a connection's socket"):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.engine.forget(conn.id)

    def _record(
        self, conn_id: int, direction: str, msg: Message | None, fault: str | None = None
    ) -> None:
        """Trace *msg* (or a fault) after everything relayed before it."""
        if self._unframed:
            self._settle()
        self.trace.record(conn_id, direction, msg, fault)

    def _error(self, message: str) -> None:
        self._errors.append(message)
        self._record(0, TO_BUS, None, fault=f"error: {message}")

    def _drain_notes(self) -> None:
        notes = self.engine.notes
        while notes:
            conn, direction, msg, fault = notes.pop(0)
            self._record(conn, direction, msg, fault=fault)

    def __repr__(self) -> str:
        where = self.socket_path or "stopped"
        return f"<DBusFaultProxy {where} -> {self.upstream} rules={len(self.engine.rules)}>"


# One receive buffer: the loop is the only reader, and every byte read is copied
# (or written) before the next read.
_BUFFER = bytearray(_RECV)
_VIEW = memoryview(_BUFFER)
