"""Stale Unix sockets and their look-alikes: the Dragonfly incident.

After an OOM kill, dfdaemon crash-looped with ``Address already in use (os
error 98)``: its socket file outlived it, and ``bind()`` on an existing path
fails.  The naive fix (always unlink first) steals the socket of a live
instance; the first real fix tested ``is_file()``, which is false for a
socket.  A daemon must tell apart what it finds at its socket path, and this
module puts each case there, for real:

=============  ==========================================================  =========
variant        what is at the path                                         correct
=============  ==========================================================  =========
stale          a socket whose owner was SIGKILLed (connect: ECONNREFUSED)  serve
live           a socket another live process listens on                    refuse
file           a regular file                                              refuse
directory      a directory (with a file in it)                             refuse
symlink        a symlink to a stale socket elsewhere                       refuse
foreign-dir    a stale socket in a directory owned by another user         refuse
open-dir       a stale socket in a directory writable by everyone          refuse
abstract       an abstract name (``@name``) another process holds          refuse
bind-mount     a stale socket that a client bind-mounted elsewhere         serve
=============  ==========================================================  =========

"refuse" means: exit with a clear error and leave what was there untouched
(not delete a file, not steal a live socket, not delete through a symlink).
For ``bind-mount`` the client's mount (made in a private mount namespace,
never on the host) keeps the *old* inode: :meth:`StaleSocket.verdict` reports
whether that view reaches the new daemon (it cannot; mount the directory).

:func:`safe_bind` is the reference implementation of the correct behaviour,
and ``python -m pytest_runtimefaults.sockets demo-daemon --policy P PATH``
runs a small daemon with one of three policies (``naive``, ``always-unlink``,
``correct``) to show what each variant catches.

Example::

    from pytest_runtimefaults.daemon import Daemon
    from pytest_runtimefaults.sockets import StaleSocket

    with StaleSocket(variant="stale") as stale:
        d = Daemon(["mydaemon", "--socket", stale.path], socket_path=stale.path)
        verdict = stale.judge(d)      # starts it, sees what it did
        assert verdict.ok, verdict
        d.stop()
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import shutil
import socket
import stat
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_runtimefaults.core.fault import FaultBase
from pytest_runtimefaults.core.log import logger, swallowed
from pytest_runtimefaults.daemon import Daemon, DaemonExited, DaemonNotReady, connect_error
from pytest_runtimefaults.naming import unique_name

if TYPE_CHECKING:
    from pytest_runtimefaults.faults import FaultRegistry
    from pytest_runtimefaults.journal import Journal

__all__ = [
    "EXPECTED",
    "POLICIES",
    "VARIANTS",
    "SocketPathError",
    "StaleSocket",
    "Verdict",
    "safe_bind",
]

VARIANTS: tuple[str, ...] = (
    "stale",
    "live",
    "file",
    "directory",
    "symlink",
    "foreign-dir",
    "open-dir",
    "abstract",
    "bind-mount",
)

#: What a correct daemon does with each variant: ``serve`` or ``refuse``.
EXPECTED: dict[str, str] = {v: "refuse" for v in VARIANTS} | {
    "stale": "serve",
    "bind-mount": "serve",
}

#: The demo daemon's bind policies (see :func:`bind_with_policy`).
POLICIES: tuple[str, ...] = ("naive", "always-unlink", "correct")

FOREIGN_UID = 65534  # "nobody": owner of the foreign-dir variant's directory
_GREETING = b"runtimefaults-live-listener "

# A listener that greets every client with a token, so the test can tell
# whether the path still reaches it (not stolen) or someone else.
_LISTENER = r"""
import os, socket, sys
address, greeting = sys.argv[1], sys.argv[2].encode() + b"\n"
if address.startswith("@"):
    address = b"\0" + address[1:].encode()
s = socket.socket(socket.AF_UNIX)
s.bind(address)
s.listen(64)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    try:
        c.sendall(greeting)
    except OSError:
        pass
    c.close()
"""


class SocketPathError(OSError):
    """What is at a socket path makes it unsafe to bind there; the message says why."""


# --- the reference: how a daemon should bind --------------------------------


def _describe(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    return "not a socket"


def safe_bind(path: str, *, check_dir: bool = True, backlog: int = 128) -> socket.socket:
    """Bind and listen on *path* (``@name``: abstract), removing only a stale socket.

    * an abstract name already held: refuse (EADDRINUSE), nothing to clean;
    * the directory is not owned by us or is writable by group/others
      (*check_dir*): refuse, someone else could have planted the socket;
    * nothing there: bind;
    * not a socket (file, directory, symlink, FIFO; checked with ``lstat``,
      never following a link): refuse;
    * a socket that accepts a connection: another instance is live: refuse;
    * a socket that refuses (ECONNREFUSED): stale: unlink it and bind.

    Raises :class:`SocketPathError` with a message saying what was found.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if path.startswith("@"):
            try:
                sock.bind(b"\0" + path[1:].encode())
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise SocketPathError(
                        errno.EADDRINUSE,
                        f"abstract socket {path} is held by another process "
                        "(is another instance running?)",
                    )
                raise
            sock.listen(backlog)
            return sock
        parent = os.path.dirname(os.path.abspath(path))
        if check_dir:
            st = os.stat(parent)
            if st.st_uid != os.geteuid():
                raise SocketPathError(
                    errno.EPERM,
                    f"refusing to use {path}: its directory {parent} is owned by uid "
                    f"{st.st_uid}, not by us (uid {os.geteuid()})",
                )
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise SocketPathError(
                    errno.EPERM,
                    f"refusing to use {path}: its directory {parent} is writable by "
                    f"others (mode {stat.S_IMODE(st.st_mode):04o})",
                )
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise SocketPathError(
                    errno.EEXIST,
                    f"refusing to replace {path}: it is {_describe(st.st_mode)}, not a socket",
                )
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(1.0)
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)  # stale: nobody listens on it
            except OSError as exc:
                raise SocketPathError(
                    exc.errno or errno.EIO, f"cannot tell whether {path} is stale: {exc}"
                )
            else:
                raise SocketPathError(
                    errno.EADDRINUSE,
                    f"{path} is in use: another instance is listening on it",
                )
            finally:
                probe.close()
        sock.bind(path)
        sock.listen(backlog)
        return sock
    except BaseException:
        sock.close()
        raise


def bind_with_policy(path: str, policy: str) -> socket.socket:
    """Bind the way a daemon with *policy* does.

    ``naive``: bind as is (dfdaemon before its fix: EADDRINUSE on a stale
    socket).  ``always-unlink``: unlink whatever is there, then bind (the
    naive fix: steals live sockets, deletes files).  ``correct``:
    :func:`safe_bind`.
    """
    if policy == "correct":
        return safe_bind(path)
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    address: str | bytes = b"\0" + path[1:].encode() if path.startswith("@") else path
    if policy == "always-unlink" and isinstance(address, str):
        with swallowed(FileNotFoundError, "unlinking %s (nothing there)", address):
            os.unlink(address)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def demo_daemon(path: str, policy: str) -> int:
    """A daemon that binds *path* by *policy*, prints ``ready``, greets clients."""
    try:
        sock = bind_with_policy(path, policy)
    except OSError as exc:
        print(f"demo-daemon ({policy}): cannot listen on {path}: {exc}", file=sys.stderr)
        return 1
    print(f"ready: listening on {path}", flush=True)
    hello = f"demo-daemon {os.getpid()}\n".encode()
    while True:
        conn, _ = sock.accept()
        with swallowed(OSError, "greeting a client of the demo daemon"):
            conn.sendall(hello)
        conn.close()


def demo_daemon_argv(path: str, policy: str) -> list[str]:
    """The command line running :func:`demo_daemon` in a new Python process."""
    return [
        sys.executable,
        "-m",
        "pytest_runtimefaults.sockets",
        "demo-daemon",
        "--policy",
        policy,
        path,
    ]


# --- the variants -------------------------------------------------------------


@dataclass
class Verdict:
    """What a daemon did with one variant, and whether that was right."""

    variant: str
    expected: str  # "serve" | "refuse"
    outcome: str  # "served" | "refused" | "hung" | "ran without serving"
    ok: bool
    error: str = ""  # the daemon's last output line when it refused
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float | None = None  # spawn to ready, when it served

    def __str__(self) -> str:
        text = f"{self.variant}: {self.outcome} (expected {self.expected}) -> "
        text += "ok" if self.ok else "WRONG"
        for p in self.problems:
            text += f"; {p}"
        if self.error:
            text += f"; error: {self.error}"
        for n in self.notes:
            text += f"; note: {n}"
        return text


class StaleSocket(FaultBase):
    """Leave one variant (see :data:`VARIANTS`) at a socket path (a fault).

    *path*: where (default: ``daemon.sock`` in a new private directory; for
    ``abstract``, ``@<unique name>``).  The private directory, and everything
    planted, is removed on :meth:`stop`; a planted object the daemon replaced
    is left alone (it is the daemon's now).  *rng* chooses the content and
    tokens (seeded: runs replay).  With *journal*, the helper processes and the
    directory are recorded.  As a fault, ``start()`` plants, ``lift()``
    removes what was planted (:meth:`remove`), ``stop()`` also deletes the
    private directory, and ``applied`` is 1 once planted; hand it to a test's
    registry with ``runtimefaults_faults.register(stale)``.  *registry* is
    deprecated (it registered the fault from ``start()``).

    Attributes: :attr:`path` (give it to the daemon), :attr:`expected`
    (``serve`` or ``refuse``), :attr:`client_view` (``bind-mount``: the
    client's bind mount of the old inode, reachable from this namespace).
    """

    VARIANTS = VARIANTS

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        variant: str = "stale",
        *,
        rng: random.Random | None = None,
        journal: Journal | None = None,
        registry: FaultRegistry | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(
                f"unknown stale_socket variant {variant!r}; choose one of {', '.join(VARIANTS)}"
            )
        super().__init__()
        if registry is not None:
            warnings.warn(
                "StaleSocket(registry=...) is deprecated: call registry.register(stale) "
                "(the one way a fault reaches a test's registry)",
                DeprecationWarning,
                stacklevel=2,
            )
        self.variant = variant
        self.expected = EXPECTED[variant]
        self.rng = rng or random.Random(0)
        self.journal = journal if journal is not None else _default_journal()
        self.registry = registry
        self.token = f"{self.rng.getrandbits(64):016x}"
        self._own_dir: str | None = None
        self._journal_ids: list[int] = []
        if path is None:
            if variant == "abstract":
                path = "@" + unique_name("rfabs", maxlen=40) + "-" + self.token[:8]
            else:
                self._own_dir = tempfile.mkdtemp(prefix="rfsock-")
                os.chmod(self._own_dir, 0o755)
                sub = "sockdir" if variant in ("foreign-dir", "open-dir") else ""
                path = os.path.join(self._own_dir, sub, "daemon.sock")
        self.path = os.fspath(path)
        if variant == "abstract" and not self.path.startswith("@"):
            raise ValueError(f"an abstract variant needs a path '@name', got {self.path!r}")
        self.client_view: str | None = None
        self.target: str | None = None  # symlink: the socket it points to
        self._helpers: list[Daemon] = []
        self._planted: dict[str, tuple[int, ...]] = {}  # path -> _identity()
        self._file_content = b""
        self._restore_dir: tuple[str, int, int, int] | None = None  # path, mode, uid, gid

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"stale_socket {self.variant}"

    def __repr__(self) -> str:
        return f"<StaleSocket {self.variant} at {self.path}>"

    # -- planting ------------------------------------------------------------------

    def _helper(self, address: str, argv: list[str] | None = None, **kw: object) -> Daemon:
        d = Daemon(
            argv or [sys.executable, "-c", _LISTENER, address, (_GREETING.decode() + self.token)],
            socket_path=None,
            ready_log=r"^(listening|ready)",
            ready_timeout=10.0,
            name="stale_socket-helper",
            journal=self.journal,
            stop_signal=9,
            **kw,  # type: ignore[arg-type]
        )
        self._helpers.append(d)
        d.start()
        return d

    def _make_stale(self, path: str) -> None:
        """A real stale socket: a child binds and listens, then is SIGKILLed."""
        helper = self._helper(path)
        helper.kill()
        helper.stop()
        err = connect_error(path)
        if err != "ECONNREFUSED":
            raise RuntimeError(f"{path} should refuse connections once stale, got {err}")
        self._remember(path)

    def _remember(self, path: str) -> None:
        self._planted[path] = _identity(os.lstat(path))

    def _ours(self, path: str) -> bool:
        """True if *path* is still the very object planted there."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        return self._planted.get(path) == _identity(st)

    def _start(self) -> None:
        """Plant the variant (``start()``: once; a failed start removes what it made)."""
        if self._own_dir is not None and self.journal is not None:
            self._journal_ids.append(self.journal.add("path", path=self._own_dir))
        self._plant()
        self._fired()
        if self.registry is not None:  # deprecated path, kept for old callers
            self.registry.register(self)

    def _plant(self) -> None:
        v, path = self.variant, self.path
        if v != "abstract":
            os.makedirs(os.path.dirname(path), exist_ok=True)
        if v in ("stale", "bind-mount"):
            self._make_stale(path)
        if v in ("live", "abstract"):
            self._helper(path)
            if v == "live":
                self._remember(path)
        elif v == "file":
            self._file_content = self.rng.randbytes(64)
            with open(path, "xb") as f:
                f.write(self._file_content)
            self._remember(path)
        elif v == "directory":
            os.mkdir(path)
            Path(path, "keep").write_text(self.token)
            self._remember(path)
        elif v == "symlink":
            elsewhere = os.path.join(os.path.dirname(os.path.dirname(path)), "elsewhere")
            if self._own_dir is not None:
                elsewhere = os.path.join(self._own_dir, "elsewhere")
            os.makedirs(elsewhere, exist_ok=True)
            self.target = os.path.join(elsewhere, "target.sock")
            self._make_stale(self.target)
            os.symlink(self.target, path)
            self._remember(path)
        elif v in ("foreign-dir", "open-dir"):
            parent = os.path.dirname(path)
            st = os.stat(parent)
            self._restore_dir = (parent, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            self._make_stale(path)
            if v == "foreign-dir":
                os.chown(parent, FOREIGN_UID, FOREIGN_UID)
                os.chmod(parent, 0o755)
            else:
                os.chmod(parent, 0o777)
        if v == "bind-mount":
            self._bind_mount_client_view()

    def _bind_mount_client_view(self) -> None:
        """In a private mount namespace (never the host's), bind-mount the stale
        socket onto the client's path, the way a pod mounts a hostPath file."""
        view = os.path.join(os.path.dirname(self.path), "client-view.sock")
        Path(view).touch()
        script = 'mount --bind "$1" "$2" && echo ready && exec sleep infinity'
        holder = self._helper(
            "",
            argv=[
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                script,
                "sh",
                self.path,
                view,
            ],
        )
        self.client_view = f"/proc/{holder.pid}/root{view}"

    # -- inspection ------------------------------------------------------------------

    def greets(self, timeout: float = 0.5) -> bool:
        """True if :attr:`path` still reaches our live listener (``live``, ``abstract``)."""
        address: str | bytes = self.path
        if self.path.startswith("@"):
            address = b"\0" + self.path[1:].encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                s.connect(address)
                data = b""
                while not data.endswith(b"\n") and len(data) < 200:
                    chunk = s.recv(200)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                return False
        return data == _GREETING + self.token.encode() + b"\n"

    def damage(self) -> list[str]:
        """What someone did to the planted variant that a correct daemon would not."""
        v, path, problems = self.variant, self.path, []
        if v in ("live", "abstract") and not self.greets():
            problems.append(f"stole the socket of a live process ({path} no longer reaches it)")
        elif v == "file":
            try:
                unchanged = self._ours(path) and Path(path).read_bytes() == self._file_content
            except OSError:
                unchanged = False
            if not unchanged:
                problems.append(f"deleted or replaced the regular file at {path}")
        elif v == "directory":
            if not (self._ours(path) and Path(path, "keep").exists()):
                problems.append(f"removed or replaced the directory at {path}")
        elif v == "symlink":
            if not self._ours(path):
                problems.append(f"removed or replaced the symlink at {path}")
            assert self.target is not None
            if not self._ours(self.target):
                problems.append(f"deleted through the symlink: its target {self.target} changed")
        return problems

    def client_view_error(self) -> str | None:
        """``bind-mount``: None if the client's mounted view reaches a listener, else the error."""
        if self.client_view is None:
            return None
        return connect_error(self.client_view)

    def verdict(self, outcome: str, error: str = "", seconds: float | None = None) -> Verdict:
        """Judge a daemon's *outcome* (``served``, ``refused``, ``hung``...) here."""
        problems = self.damage()
        wanted = "served" if self.expected == "serve" else "refused"
        if outcome != wanted:
            problems.insert(0, f"{outcome} where a correct daemon {self.expected}s")
        if outcome == "refused" and not error:
            problems.append("refused without saying why")
        notes: list[str] = []
        if self.variant == "bind-mount" and outcome == "served":
            err = self.client_view_error()
            notes.append(
                "client's bind mount of the old socket: "
                + ("reaches the daemon" if err is None else f"{err} (it keeps the old inode)")
            )
        return Verdict(
            self.variant, self.expected, outcome, not problems, error, problems, notes, seconds
        )

    def judge(self, daemon: Daemon, *, timeout: float | None = None, grace: float = 0.5) -> Verdict:
        """Start *daemon* (configured to use :attr:`path`) here and judge what it did.

        Served: it became ready (and, where the path is held, no longer reaches
        the holder); refused: it exited before, its last output line is the
        error; hung: neither within the bound.  The daemon is left as it is
        (running if it served): stop it yourself.
        """
        try:
            seconds = daemon.start(timeout=timeout)
        except DaemonExited:
            return self.verdict("refused", _last_line(daemon.run_log()))
        except DaemonNotReady:
            return self.verdict("hung", _last_line(daemon.run_log()))
        if self.variant in ("live", "abstract") and self.greets():
            # Ready by its own criteria while the holder still answers: it may be
            # about to exit with an error; give it a moment to say so.
            deadline = time.monotonic() + grace
            while daemon.running and time.monotonic() < deadline:
                time.sleep(0.01)
            if not daemon.running:
                return self.verdict("refused", _last_line(daemon.run_log()))
            return self.verdict("ran without serving", _last_line(daemon.run_log()))
        return self.verdict("served", seconds=seconds)

    # -- removal -----------------------------------------------------------------------

    def remove(self) -> None:
        """Remove what was planted and is still ours; end the helpers (idempotent)."""
        errors: list[BaseException] = []
        for helper in reversed(self._helpers):
            try:
                helper.stop()
            except BaseException as exc:
                logger.debug("stopping a helper of %r failed", self, exc_info=True)
                errors.append(exc)
        if self._restore_dir is not None:
            parent, mode, uid, gid = self._restore_dir
            with swallowed(FileNotFoundError, "restoring the owner and mode of %s", parent):
                os.chown(parent, uid, gid)
                os.chmod(parent, mode)
            self._restore_dir = None
        for path in list(self._planted):
            if self._ours(path):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with swallowed(FileNotFoundError, "unlinking %s (gone already)", path):
                        os.unlink(path)
            del self._planted[path]
        if errors:
            raise errors[0]

    def _lift(self) -> None:
        self.remove()

    def _stop(self) -> None:
        """:meth:`remove` (again: a failed start skips the lift), then the private directory."""
        try:
            self.remove()
        finally:
            if self._own_dir is not None:
                shutil.rmtree(self._own_dir, ignore_errors=True)
            if self.journal is not None:
                for rid in self._journal_ids:
                    self.journal.release(rid)
            self._journal_ids.clear()


def _identity(st: os.stat_result) -> tuple[int, ...]:
    # Inode numbers are reused at once on tmpfs: a socket bound where a symlink
    # was unlinked can get its number.  Type and ctime tell them apart.
    return (st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode), st.st_ctime_ns)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_runtimefaults.sockets",
        description="Test-only daemons for the stale-socket fixtures.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo-daemon", help="listen on PATH with a bind policy")
    demo.add_argument("--policy", choices=POLICIES, required=True)
    demo.add_argument("path")
    args = parser.parse_args(argv)
    return demo_daemon(args.path, args.policy)


if __name__ == "__main__":
    sys.exit(main())


def _default_journal() -> Journal:
    """The default journal (``runtimefaults cleanup`` reads it): classes journal
    what they create even when no fixture handed them one."""
    from pytest_runtimefaults.journal import Journal

    return Journal.default()
