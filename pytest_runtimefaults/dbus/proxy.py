"""The D-Bus fault proxy: the I/O around the codec, the SASL relay and the fault engine.

``DBusFaultProxy`` listens on a Unix socket in a private 0700 directory and
opens one upstream connection per client.  Each connection has two pump
threads (one per direction) doing blocking ``recvmsg``/``sendmsg``: for a
relay that mostly waits, blocking threads wake faster than any event loop
in Python (see benchmarks/bench_dbus_proxy.py).  With no rule the pump
forwards each batch of whole messages in one write, byte for byte; with
rules, every message goes through :class:`~pytest_runtimefaults.dbus.rules.FaultEngine`,
and a scheduler thread (started on first need) releases held messages.

File descriptors (SCM_RIGHTS) are attached to the write that starts the
message that carries them, as the ``UNIX_FDS`` header field says, since
sd-bus reads exactly one message at a time.

Example::

    with PrivateBus() as bus, DBusFaultProxy(upstream=bus.address) as proxy:
        proxy.add(Delay(0.5).on(member="GetId"))
        subprocess.run(["busctl", "--address", proxy.address, "status"], check=True)
        print(proxy.trace.tail())
"""

from __future__ import annotations

import array
import contextlib
import functools
import itertools
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

from pytest_runtimefaults.dbus.auth import AuthError, SaslRelay
from pytest_runtimefaults.dbus.rules import Action, FaultEngine, Output, Rule
from pytest_runtimefaults.dbus.trace import TO_BUS, TO_CLIENT, Trace
from pytest_runtimefaults.dbus.wire import (
    Framer,
    Message,
    WireError,
    messages_at,
    whole_messages,
)
from pytest_runtimefaults.journal import Journal

__all__ = ["HOST_BUS_PATHS", "DBusFaultProxy", "ProxyError", "parse_address"]

HOST_BUS_PATHS = ("/run/dbus/system_bus_socket", "/var/run/dbus/system_bus_socket")
_RECV = 262144
_MAX_FDS = 253  # SCM_MAX_FD
_ANC = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)


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


class _Connection:
    """One client and its upstream: two pumps, two write locks."""

    def __init__(
        self, proxy: DBusFaultProxy, ident: int, client: socket.socket, upstream: socket.socket
    ) -> None:
        self.proxy = proxy
        self.id = ident
        self.client = client
        self.upstream = upstream
        self.relay = SaslRelay()
        self.locks = {TO_BUS: threading.Lock(), TO_CLIENT: threading.Lock()}
        self.closed = False
        self.threads = [
            threading.Thread(
                target=self._pump,
                args=(client, upstream, TO_BUS),
                name=f"rf-proxy-{ident}-to-bus",
                daemon=True,
            ),
            threading.Thread(
                target=self._pump,
                args=(upstream, client, TO_CLIENT),
                name=f"rf-proxy-{ident}-to-client",
                daemon=True,
            ),
        ]

    def dest(self, direction: str) -> socket.socket:
        return self.upstream if direction == TO_BUS else self.client

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def close(self) -> None:
        """Shut both sockets down; the pumps then end and close them."""
        if self.closed:
            return
        self.closed = True
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        proxy = self.proxy
        trace = proxy.trace
        framer = Framer()
        pending_fds: list[int] = []
        relay = self.relay
        handshake = relay.client_data if direction == TO_BUS else relay.server_data
        in_auth = True
        lock = self.locks[direction]
        record = trace.record
        ident = self.id
        # recvmsg_into a preallocated buffer: plain recvmsg allocates (and, past the
        # malloc mmap threshold, maps and unmaps) a buffer of the full size every call.
        buffer = bytearray(_RECV)
        view = memoryview(buffer)
        recvmsg_into = src.recvmsg_into
        buffers = [view]
        try:
            while True:
                n, anc, flags, _ = recvmsg_into(buffers, _ANC)
                if not n:
                    break
                data = bytes(view[:n])
                if anc:
                    pending_fds += _fds_from(anc)
                    if flags & socket.MSG_CTRUNC:
                        raise ProxyError("file descriptors were truncated (more than 253)")
                if in_auth:
                    text, data = handshake(data)
                    if text:
                        with lock:
                            dst.sendall(text)
                    if (direction == TO_BUS and relay.client_done) or (
                        direction == TO_CLIENT and relay.server_done
                    ):
                        in_auth = False
                    if not data:
                        continue
                engine = proxy.engine
                spans = None
                if not anc and not pending_fds and not framer.pending:
                    spans = whole_messages(data)
                    # (passthrough reads the engine's state first, _releasing second:
                    # see _release.)
                    if spans is not None and engine.passthrough(data) and not proxy._releasing:
                        # The hot path: whole messages no rule can concern go out
                        # first; the trace is written while the peer works.
                        with lock:
                            dst.sendall(data)
                        for msg in messages_at(data, spans):
                            record(ident, direction, msg)
                        continue
                msgs = messages_at(data, spans) if spans is not None else framer.feed(data)
                if not msgs:
                    continue
                if (
                    engine.idle or all(engine.bypass(direction, m) for m in msgs)
                ) and not proxy._releasing:
                    self._forward_batch(msgs, pending_fds, direction, lock, dst)
                else:
                    proxy._release(functools.partial(self._decide, msgs, pending_fds, direction))
                    if proxy.engine.notes:
                        proxy._drain_notes()
                    if proxy.engine.holding:
                        proxy._kick()
        except (WireError, AuthError, ProxyError) as exc:
            side = "client" if direction == TO_BUS else "bus"
            proxy._error(
                f"connection #{self.id}: malformed data from the {side}: {exc}; connection closed"
            )
        except OSError:
            pass  # the peer went away at some byte: the other pump notices too
        finally:
            for fd in pending_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.close()
            proxy._connection_done(self, direction)

    def _decide(self, msgs: list[Message], pending_fds: list[int], direction: str) -> list[Output]:
        """The engine's decisions for a batch (called with the engine's lock held)."""
        now = time.monotonic()
        outputs: list[Output] = []
        on_message = self.proxy.engine.on_message
        record = self.proxy.trace.record
        for msg in msgs:
            fds = _take_fds(msg, pending_fds)
            record(self.id, direction, msg)
            outputs += on_message(self.id, direction, msg, fds, now)
        return outputs

    def _forward_batch(
        self,
        msgs: list[Message],
        pending_fds: list[int],
        direction: str,
        lock: threading.Lock,
        dst: socket.socket,
    ) -> None:
        record = self.proxy.trace.record
        ident = self.id
        if not pending_fds:
            for msg in msgs:
                record(ident, direction, msg)
            data = msgs[0].raw if len(msgs) == 1 else b"".join(m.raw for m in msgs)
            with lock:
                dst.sendall(data)
            return
        # Messages with fds start a write of their own, carrying their fds.
        batch: list[bytes] = []
        with lock:
            for msg in msgs:
                record(ident, direction, msg)
                fds = _take_fds(msg, pending_fds)
                if fds:
                    if batch:
                        dst.sendall(b"".join(batch))
                        batch = []
                    _send_with_fds(dst, msg.raw, fds)
                else:
                    batch.append(msg.raw)
            if batch:
                dst.sendall(b"".join(batch))


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


def _send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    try:
        sent = sock.sendmsg(
            [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        )
        if sent < len(data):
            sock.sendall(data[sent:])
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


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
        self.pcap = pcap
        self.journal = journal
        self.errors: list[str] = []
        self.dir: Path | None = None
        self.socket_path: Path | None = None
        self.connections: dict[int, _Connection] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._scheduler: threading.Thread | None = None
        self._wake = threading.Condition()
        self._stopping = False
        self._releasing = 0  # > 0 while held messages are being handed to their writers
        self._rids: list[int] = []

    # -- lifecycle -------------------------------------------------------------------
    @property
    def address(self) -> str:
        if self.socket_path is None:
            raise ProxyError("the proxy is not started")
        return f"unix:path={self.socket_path}"

    @property
    def env(self) -> dict[str, str]:
        """Environment entries pointing a client at the proxy (pass as ``env=``)."""
        return {"DBUS_SYSTEM_BUS_ADDRESS": self.address, "DBUS_SESSION_BUS_ADDRESS": self.address}

    def start(self) -> DBusFaultProxy:
        if self._listener is not None:
            return self
        self._stopping = False
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
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(str(self.socket_path))
        except OSError as exc:
            listener.close()
            self._cleanup_dir()
            raise ProxyError(f"cannot listen on {self.socket_path}: {exc}") from exc
        listener.listen(128)
        self._listener = listener
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="rf-proxy-accept", daemon=True
        )
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection, wait for the threads, write the pcap."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._stopping = True
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
        with self._lock:
            conns = list(self.connections.values())
        for conn in conns:
            conn.close()
        for conn in conns:
            for t in conn.threads:
                t.join(timeout=5)
        with self._wake:
            self._wake.notify_all()
        if self._scheduler is not None:
            self._scheduler.join(timeout=5)
            self._scheduler = None
        if self.pcap:
            self.trace.write_pcap(self.pcap)
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        elif self._listen is not None:
            with contextlib.suppress(FileNotFoundError):
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
        out = [t for t in (self._acceptor, self._scheduler) if t is not None and t.is_alive()]
        with self._lock:
            for conn in self.connections.values():
                out += [t for t in conn.threads if t.is_alive()]
        return out

    # -- rules -----------------------------------------------------------------------
    def add(self, rule: Rule | Action | str) -> Rule:
        """Add a fault rule (a Rule, an Action for every message, or its text form).

        It takes effect for the next message.  Returns the :class:`Rule`, whose
        ``hits`` and ``applied`` counts tell what it did.
        """
        added = self.engine.add(rule)
        for callback in self.on_add:
            callback(added)
        return added

    def remove(self, rule: Rule) -> None:
        """Remove *rule*; when it was the last, held messages are released now."""
        self._release(lambda: self.engine.remove(rule))

    def clear(self) -> None:
        """Remove every rule and release every held message now."""
        self._release(self.engine.clear)

    @property
    def rules(self) -> list[Rule]:
        return list(self.engine.rules)

    # -- the I/O ---------------------------------------------------------------------
    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping:
            try:
                client, _ = listener.accept()
            except OSError:
                break
            ident = next(self._ids)
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
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
            conn = _Connection(self, ident, client, upstream)
            with self._lock:
                self.connections[ident] = conn
            conn.start()

    def _connection_done(self, conn: _Connection, direction: str) -> None:
        if all(not t.is_alive() or t is threading.current_thread() for t in conn.threads):
            with self._lock:
                self.connections.pop(conn.id, None)
            self.engine.forget(conn.id)
            for sock in (conn.client, conn.upstream):
                sock.close()

    def _error(self, message: str) -> None:
        self.errors.append(message)
        self.trace.record(0, TO_BUS, None, fault=f"error: {message}")

    def _drain_notes(self) -> None:
        notes = self.engine.notes
        while notes:
            conn, direction, msg, fault = notes.pop(0)
            self.trace.record(conn, direction, msg, fault=fault)

    def _release(self, take: Callable[[], list[Output]]) -> None:
        """Write what *take* (an engine call that releases held messages) returns, in order.

        The write locks of the lanes concerned are claimed before the engine's
        lock is let go, by the scheduler releasing held messages and by a pump
        writing its decisions alike: whoever decided first writes first, so a
        held message is never overtaken by one that was queued behind it, and a
        pump's batch is never overtaken by messages released meanwhile.  Each
        lane is unlocked as soon as its own messages are written.  (Both take
        the engine's lock, then a write lock; nothing takes them the other way.)
        """
        claimed: list[tuple[_Connection, str, list[Output]]] = []
        with self.engine.lock:
            # While set, pumps do not take their fast paths: `take` may free a lane in
            # the engine before its write lock is claimed below.
            self._releasing += 1
            try:
                outputs = take()
                if outputs:
                    claimed = self._claim(outputs)
            finally:
                self._releasing -= 1
        for conn, direction, outs in claimed:
            try:
                self._write_claimed(conn, direction, outs)
            finally:
                conn.locks[direction].release()

    def _claim(self, outputs: list[Output]) -> list[tuple[_Connection, str, list[Output]]]:
        """Group *outputs* by lane and take each lane's write lock (engine lock held)."""
        lanes: dict[tuple[int, str], list[Output]] = {}
        for out in outputs:
            lanes.setdefault((out.conn, out.direction), []).append(out)
        claimed: list[tuple[_Connection, str, list[Output]]] = []
        for (conn_id, direction), outs in lanes.items():
            with self._lock:
                conn = self.connections.get(conn_id)
            if conn is None or conn.closed:
                for out in outs:
                    for fd in out.fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                continue
            conn.locks[direction].acquire()
            claimed.append((conn, direction, outs))
        return claimed

    def _write_claimed(self, conn: _Connection, direction: str, outputs: list[Output]) -> None:
        sock = conn.dest(direction)
        for out in outputs:
            if out.fault:
                self.trace.record(out.conn, out.direction, out.message, fault=out.fault)
            try:
                if out.fds:
                    _send_with_fds(sock, out.data, out.fds)
                elif out.data:
                    sock.sendall(out.data)
            except OSError:
                conn.close()
                return
            if out.pause_after:
                time.sleep(out.pause_after)
            if out.close:
                conn.close()
                return

    def _kick(self) -> None:
        """Make sure the scheduler runs if the engine holds messages."""
        if self.engine.next_deadline() is None:
            return
        with self._wake:
            if self._scheduler is None or not self._scheduler.is_alive():
                self._scheduler = threading.Thread(
                    target=self._schedule, name="rf-proxy-scheduler", daemon=True
                )
                self._scheduler.start()
            self._wake.notify_all()

    def _schedule(self) -> None:
        while not self._stopping:
            deadline = self.engine.next_deadline()
            now = time.monotonic()
            if deadline is None:
                with self._wake:
                    self._wake.wait(timeout=0.5)
                if self.engine.next_deadline() is None and self.engine.idle:
                    return
                continue
            if deadline > now:
                with self._wake:
                    self._wake.wait(timeout=deadline - now)
                continue
            self._release(functools.partial(self.engine.tick, now))

    def __repr__(self) -> str:
        where = self.socket_path or "stopped"
        return f"<DBusFaultProxy {where} -> {self.upstream} rules={len(self.engine.rules)}>"
