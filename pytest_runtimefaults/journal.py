"""A crash-safe journal of the resources fixtures create.

Every resource (a process, a directory, a mount, a network namespace, a link,
a cgroup) is appended to a journal file *as it is created* and marked released
when it is removed.  A journal file belongs to one owner process (a pytest run,
an xdist worker, the CLI, a plain script using a library class) and is named
after its PID and start time.  When the owner dies without cleaning up (pytest
was SIGKILLed, the machine ran out of memory), the next run, or
``runtimefaults cleanup``, replays the journals of dead owners and undoes what
they left, newest first.  Live owners' journals are never touched.

Example::

    journal = Journal.default()
    rid = journal.add("path", path=str(tmpdir))
    ...
    journal.release(rid)

Reaping kills processes and deletes files, so it trusts nothing it reads:

* the state directory must be owned by this user with mode 0700
  (:func:`check_state_dir`), or nothing is read or written there;
* each journal file must be a regular file owned by this user; a malformed
  line is skipped with a warning naming the file and line (:attr:`ReapResult.warnings`);
* each record is checked by its reaper before anything is done, and refused
  (:class:`RefusedToReap`, reported in :attr:`ReapResult.errors`) unless it is
  recognisably the project's own:

========  =====================  ===========================================================
kind      fields                 reaped by (only if ...)
========  =====================  ===========================================================
process   pid, starttime,        SIGKILL (same start time, and the same command line or a
          cmdline                cgroup the project named; never PID 1 or a reaper's ancestor)
path      path                   ``rm -r``, never following symlinks (a name starting with
                                 ``rf``/``runtimefaults``, under /tmp, ``$TMPDIR`` or /run,
                                 owned by this user)
mount     target                 ``umount -l`` (a current mount point below such a directory)
netns     name                   ``ip netns delete`` (a name with the project's prefix)
link      name, netns (opt.)     ``ip link delete`` (names with the project's prefix)
cgroup    path                   ``rmdir``, deepest first (below a cgroup mount, the
                                 project's prefix)
========  =====================  ===========================================================

The reapers of other kinds live in their modules and are named in one
explicit table, :data:`REAPERS` (kind -> ``"module:function"``), resolved only
when a record of that kind is reaped: no module has to be imported for its
side effect.  :func:`register_reaper` still works for kinds of your own.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import importlib
import itertools
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_runtimefaults.core.log import logger, swallowed
from pytest_runtimefaults.host import cgroups, proc
from pytest_runtimefaults.host.mounts import mount_table

__all__ = [
    "PROJECT_PREFIXES",
    "REAPERS",
    "Journal",
    "ReapResult",
    "RefusedToReap",
    "StateDirError",
    "check_owned_path",
    "check_state_dir",
    "default_state_dir",
    "process_starttime",
    "reap_dead_owners",
    "recorded_process_alive",
    "register_reaper",
    "temporary_roots",
]

Reaper = Callable[[dict[str, Any]], None]

#: Every kind the project journals, and the function that undoes it, as
#: ``"module:function"``: resolved (imported) only when such a record is reaped.
REAPERS: dict[str, str] = {
    "process": "pytest_runtimefaults.journal:_reap_process",
    "path": "pytest_runtimefaults.journal:_reap_path",
    "mount": "pytest_runtimefaults.journal:_reap_mount",
    "netns": "pytest_runtimefaults.journal:_reap_netns",
    "link": "pytest_runtimefaults.journal:_reap_link",
    "cgroup": "pytest_runtimefaults.journal:_reap_cgroup",
    "daemon": "pytest_runtimefaults.daemon:_reap_daemon",
    "containerd": "pytest_runtimefaults.containerd:_reap_containerd",
    "cgroup-tree": "pytest_runtimefaults.cni.cgroups:_reap_cgroup_tree",
    "systemd-sandbox-cgroups": "pytest_runtimefaults.systemd.cgroups:_reap_sandbox_cgroups",
}

#: The prefixes every name the project makes starts with (``naming.unique_name``
#: prefixes, ``tempfile.mkdtemp`` prefixes, ``/run/runtimefaults-*``).
PROJECT_PREFIXES = ("rf", "runtimefaults")
_NAME = re.compile(r"^(?:rf|runtimefaults)[A-Za-z0-9_.-]{0,240}$")

_REGISTERED: dict[str, Reaper] = {}
# The state directories being reaped now: a path record may not name them.
_reaping: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("_reaping", default=())
# The names the registry had before the table (tests of other families read them).
_REAPERS = _REGISTERED
_REAPER_MODULES: dict[str, str] = {}
_instances = itertools.count(1)


class StateDirError(RuntimeError):
    """The journal directory is not private to this user; the message says how to fix it."""


class RefusedToReap(Exception):
    """A journal record does not name something this project made: it is left alone."""


def register_reaper(kind: str, reaper: Reaper) -> None:
    """Teach the journal how to undo resources of *kind* (``reaper(record)``).

    For kinds outside :data:`REAPERS` (a plugin's own).  Kept for
    compatibility: the project's own kinds are all in the table, so calling it
    for one of them changes nothing.
    """
    _REGISTERED[kind] = reaper
    _REAPER_MODULES[kind] = reaper.__module__


def _reaper_for(kind: str) -> Reaper | None:
    target = REAPERS.get(kind)
    if target is None:
        return _REGISTERED.get(kind)
    module, _, name = target.partition(":")
    try:
        reaper: Reaper = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        logger.debug("cannot resolve the reaper %s of kind %s", target, kind, exc_info=True)
        return _REGISTERED.get(kind)
    return reaper


# --- the state directory --------------------------------------------------------


def default_state_dir() -> Path:
    """Where journals live: ``$RUNTIMEFAULTS_STATE_DIR``, else ``/run/runtimefaults``
    for root, else ``$XDG_RUNTIME_DIR/runtimefaults`` (private to the user by
    design), else ``/tmp/runtimefaults-UID``, which :func:`check_state_dir`
    verifies before every use (anyone may create it first)."""
    env = os.environ.get("RUNTIMEFAULTS_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0 and os.path.isdir("/run"):
        return Path("/run/runtimefaults")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "runtimefaults"
    return Path(f"/tmp/runtimefaults-{os.getuid()}")


def check_state_dir(directory: Path | str, *, create: bool) -> bool:
    """Make sure *directory* is private to this user (owner euid, mode 0700).

    Creates it (mode 0700) when *create*; returns False if it does not exist
    (and was not to be created).  Raises :class:`StateDirError`, saying how to
    fix it, for a symlink, a non-directory, another owner or group/other
    permissions: a journal read from there could name anything at all.
    """
    path = Path(directory)
    if create:
        with swallowed(FileExistsError, "creating %s (made before: checked below)", path):
            path.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(path, 0o700)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if create:
            raise
        return False
    fix = (
        f"remove it (`rm -r {path}`) if you did not make it, or set "
        "RUNTIMEFAULTS_STATE_DIR (--runtimefaults-state-dir) to a directory of your own"
    )
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"journal directory {path} is not a directory (a symlink?): {fix}")
    if st.st_uid != os.geteuid():
        raise StateDirError(
            f"journal directory {path} belongs to uid {st.st_uid}, not to you "
            f"(uid {os.geteuid()}): {fix}"
        )
    if st.st_mode & 0o077:
        raise StateDirError(
            f"journal directory {path} has mode {stat.S_IMODE(st.st_mode):04o}, "
            f"others may write journals into it: `chmod 700 {path}` if it is yours, or {fix}"
        )
    return True


# --- processes ------------------------------------------------------------------


def process_starttime(pid: int) -> int | None:
    """The start time of *pid* in clock ticks since boot, or None if it is gone.

    Together with the PID it names a process uniquely: a recycled PID has
    another start time, so the journal never kills a stranger.
    """
    return proc.starttime(pid)


def _alive(pid: int, starttime: int | None) -> bool:
    current = process_starttime(pid)
    return current is not None and (starttime is None or current == starttime)


def _same_command(recorded: list[str], current: list[str]) -> bool:
    # Either may be the tail of the other: a launcher (setpriv --pdeathsig,
    # unshare) execs the recorded command, or was itself recorded before it did.
    if not recorded or not current:
        return False
    shorter, longer = sorted((recorded, current), key=len)
    return longer[len(longer) - len(shorter) :] == shorter


def recorded_process_alive(record: dict[str, Any]) -> bool:
    """True if the process a record names (``pid``, ``starttime``, ``cmdline``) still runs.

    False once it is gone (another start time, a zombie).  Raises
    :class:`RefusedToReap` when the PID now runs something else than the
    recorded command line, when no start time or command line was recorded
    (the PID may since be a stranger's), or for PID 1 or an ancestor of this
    process (which no journal may kill, whatever it says).
    """
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise RefusedToReap(f"pid {pid!r} is not a process id")
    if pid in proc.ancestors():
        raise RefusedToReap(f"PID {pid} is PID 1 or an ancestor of this process")
    starttime = record.get("starttime")
    if not isinstance(starttime, int):
        raise RefusedToReap("no start time recorded: the PID may since be a stranger's")
    if process_starttime(pid) != starttime or not proc.alive(pid):
        return False
    if _in_project_cgroup(pid):
        # A process that exec'd since it was recorded (the sandbox's init:
        # sh, then systemd) is still recognisable by the cgroup we made for it.
        return True
    recorded = record.get("cmdline")
    if not isinstance(recorded, list) or not all(isinstance(a, str) for a in recorded):
        raise RefusedToReap("no command line recorded: cannot tell that PID is still ours")
    current = proc.cmdline(pid)
    if current is None:
        return False  # exited meanwhile
    then = record.get("exec_cmdline")
    if isinstance(then, list) and all(isinstance(a, str) for a in then) and then == current:
        return True  # it exec'd what it was recorded to exec
    if not _same_command(recorded, current):
        raise RefusedToReap(f"PID {pid} now runs {current!r}, not the recorded {recorded!r}")
    return True


def _in_project_cgroup(pid: int) -> bool:
    """True if *pid* is in a cgroup this project named (``/rfsd.../...``, ``/rfns.../...``)."""
    return any(
        part.startswith(PROJECT_PREFIXES) for path in proc.cgroups(pid) for part in Path(path).parts
    )


# --- paths ----------------------------------------------------------------------


def temporary_roots() -> list[str]:
    """Directories below which the project makes its files: /tmp, ``$TMPDIR``, /run, /dev/shm."""
    roots = {"/tmp", "/run", "/dev/shm", tempfile.gettempdir()}
    return sorted({os.path.realpath(r) for r in roots})


def _below(path: str, root: str) -> bool:
    return path.startswith(root.rstrip("/") + "/")


def check_owned_path(text: object, *, any_component: bool = False) -> Path:
    """*text* as a Path, if it may name something this project made; else :class:`RefusedToReap`.

    It must be an absolute, normalised path below a :func:`temporary_roots`
    directory (its parent resolved through symlinks) whose last component
    (with *any_component*: some component below the root) starts with one of
    :data:`PROJECT_PREFIXES`, and not the journal's own state directory.
    """
    if not isinstance(text, str) or not text:
        raise RefusedToReap(f"{text!r} is not a path")
    if "\0" in text or not os.path.isabs(text) or os.path.normpath(text) != text:
        raise RefusedToReap(f"{text!r} is not an absolute, normalised path")
    path = Path(text)
    parent = os.path.realpath(path.parent)
    full = os.path.join(parent, path.name)
    roots = [r for r in temporary_roots() if _below(full, r)]
    if not roots:
        raise RefusedToReap(f"{text} is not below a temporary directory {temporary_roots()}")
    names = Path(full).relative_to(max(roots, key=len)).parts if any_component else (path.name,)
    if not any(n.startswith(PROJECT_PREFIXES) for n in names):
        raise RefusedToReap(
            f"{text}: the name does not start with one of the project's prefixes "
            f"{list(PROJECT_PREFIXES)}"
        )
    for state in {os.path.realpath(default_state_dir()), *_reaping.get()}:
        if state == full or _below(state, full):
            raise RefusedToReap(f"{text} holds the journal directory itself")
    return Path(full)


def _mounts_under(path: Path) -> list[str]:
    text = str(path)
    return [m.target for m in mount_table() if m.target == text or _below(m.target, text)]


def _log_rmtree_error(function: object, path: str, exc_info: object) -> None:
    logger.debug("rm -r: %s failed on %s: %s", function, path, exc_info)


def _reap_path(record: dict[str, Any]) -> None:
    path = check_owned_path(record.get("path"))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if st.st_uid != os.geteuid():
        raise RefusedToReap(f"{path} belongs to uid {st.st_uid}, not to this user")
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        path.unlink(missing_ok=True)
        return
    # rmtree crosses mount points: a bind mount left inside the directory
    # would have its *source* emptied.  Detach mounts below it first, deepest
    # first; refuse to delete if any remain.
    for target in sorted(_mounts_under(path), key=len, reverse=True):
        _run_quiet("umount", "-l", target)
    remaining = _mounts_under(path)
    if remaining:
        raise OSError(f"not removing {path}: still mounted below it: {remaining}")
    shutil.rmtree(path, onerror=_log_rmtree_error)


def _run_quiet(*argv: str) -> None:
    done = subprocess.run(argv, check=False, capture_output=True, timeout=30)
    if done.returncode:
        logger.debug(
            "%s exited %d: %s", argv, done.returncode, done.stderr.decode(errors="replace")
        )


def _reap_mount(record: dict[str, Any]) -> None:
    target = check_owned_path(record.get("target"), any_component=True)
    if str(target) not in _mounts_under(target):
        return  # not mounted (any more): nothing of ours to detach
    _run_quiet("umount", "-l", str(target))


def _checked_name(record: dict[str, Any], key: str, *, optional: bool = False) -> str:
    value = record.get(key)
    if optional and value in (None, ""):
        return ""
    if not isinstance(value, str) or not _NAME.match(value):
        raise RefusedToReap(
            f"{key} {value!r} is not a name this project makes "
            f"(it starts with one of {list(PROJECT_PREFIXES)})"
        )
    return value


def _reap_netns(record: dict[str, Any]) -> None:
    _run_quiet("ip", "netns", "delete", _checked_name(record, "name"))


def _reap_link(record: dict[str, Any]) -> None:
    name = _checked_name(record, "name")
    netns = _checked_name(record, "netns", optional=True)
    if netns:
        _run_quiet("ip", "-n", netns, "link", "delete", name)
    else:
        _run_quiet("ip", "link", "delete", name)


def _reap_cgroup(record: dict[str, Any]) -> None:
    _check_cgroup(record)
    cgroups.remove_tree(Path(str(record["path"])), timeout=2.0)


def _reap_process(record: dict[str, Any]) -> None:
    if recorded_process_alive(record):
        with swallowed(ProcessLookupError, "killing %s", record.get("pid")):
            os.kill(int(record["pid"]), signal.SIGKILL)


# --- the journal ----------------------------------------------------------------


class Journal:
    """An append-only journal of one owner's resources (thread-safe).

    Nothing is written until the first :meth:`add`; then the state directory is
    created if need be and checked (:func:`check_state_dir`).
    """

    def __init__(self, state_dir: Path | str, owner_pid: int | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.owner_pid = owner_pid if owner_pid is not None else os.getpid()
        self.owner_starttime = process_starttime(self.owner_pid)
        # One file per Journal object, not per process: pytester runs a nested
        # pytest in the same process, and a library class may make its own
        # Journal; each must be able to delete its own file when empty.
        self.path = (
            self.state_dir / f"{self.owner_pid}-{self.owner_starttime}-{next(_instances)}.jsonl"
        )
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._live: dict[int, dict[str, Any]] = {}
        self._checked = False

    @classmethod
    def default(cls) -> Journal:
        """The journal of this process in :func:`default_state_dir` (one per process).

        The one library classes use when they are handed none, and that
        ``runtimefaults cleanup`` reads: a plain script killed half-way is
        reaped like a pytest run.
        """
        state_dir = default_state_dir()
        with _default_lock:
            journal = _defaults.get(state_dir)
            if journal is None or journal.owner_pid != os.getpid():
                journal = _defaults[state_dir] = cls(state_dir)
            return journal

    def _append(self, entry: dict[str, Any]) -> None:
        if not self._checked:
            check_state_dir(self.state_dir, create=True)
            self._checked = True
        line = json.dumps(entry, sort_keys=True) + "\n"
        # O_APPEND writes of one short line are atomic; fsync is not needed for
        # crash-of-pytest safety (the kernel keeps the page), only for power loss.
        # O_NOFOLLOW: never write through a link planted in our place.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def add(self, kind: str, **fields: Any) -> int:
        """Record a resource that now exists; returns its id for :meth:`release`.

        A ``process`` or ``daemon`` record gets the command line of its *pid*
        when none is given: the reaper kills only what still runs it.
        """
        if kind in ("process", "daemon") and "cmdline" not in fields and "pid" in fields:
            fields["cmdline"] = _settled_cmdline(int(fields["pid"]))
        with self._lock:
            rid = next(self._ids)
            record = {"op": "add", "id": rid, "kind": kind, **fields}
            self._live[rid] = record
            self._append(record)
            return rid

    def add_process(
        self, pid: int, cmdline: list[str] | None = None, *, then: list[str] | None = None
    ) -> int:
        """Record process *pid* (its start time and command line name it).

        *then* is the command line it will ``exec`` (a shell that joins a
        cgroup, then execs ``unshare``): the reaper recognises either.
        """
        fields: dict[str, Any] = {"pid": pid, "starttime": process_starttime(pid)}
        if cmdline is not None:
            fields["cmdline"] = list(cmdline)
        if then is not None:
            fields["exec_cmdline"] = list(then)
        return self.add("process", **fields)

    def release(self, rid: int) -> None:
        """Record that the resource *rid* is gone (idempotent)."""
        with self._lock:
            if self._live.pop(rid, None) is None:
                return
            self._append({"op": "del", "id": rid})
            if not self._live:
                with swallowed(FileNotFoundError, "removing the empty journal %s", self.path):
                    self.path.unlink()

    @contextlib.contextmanager
    def tracking(self, kind: str, **fields: Any) -> Iterator[int]:
        """``with journal.tracking("path", path=p):`` records for the block's duration."""
        rid = self.add(kind, **fields)
        try:
            yield rid
        finally:
            self.release(rid)

    def live(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._live.values())


def _settled_cmdline(pid: int) -> list[str] | None:
    # Popen returns when the child's close-on-exec pipe closes, which the
    # kernel does in execve *before* it sets up the new argument vector: for a
    # moment /proc/PID/cmdline is empty.  Wait (briefly) for the real one.
    deadline = time.monotonic() + 0.5
    while True:
        argv = proc.cmdline(pid)
        if argv or argv is None or time.monotonic() > deadline:
            return argv
        time.sleep(0.001)


_defaults: dict[Path, Journal] = {}
_default_lock = threading.Lock()


# --- reaping --------------------------------------------------------------------


@dataclass
class ReapResult:
    """What one reap did: resources undone, errors met (never raised), lines skipped."""

    reaped: list[dict[str, Any]]
    errors: list[str]
    journals: int
    warnings: list[str] = field(default_factory=list)


def _read_journal(path: Path, data: bytes, warnings: list[str]) -> list[dict[str, Any]]:
    """The live records of one journal's bytes, newest first; bad lines go to *warnings*."""
    live: dict[int, dict[str, Any]] = {}
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        why = ""
        entry: Any = None
        try:
            entry = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            why = "not UTF-8"
        except json.JSONDecodeError as exc:
            # The last line may be torn by the crash itself; the rest still counts.
            why = "torn by the crash" if number == len(lines) else f"not JSON ({exc.msg})"
        if not why:
            why = _malformed(entry)
        if why:
            message = f"{path}:{number}: skipped a malformed journal line ({why}): {raw[:80]!r}"
            logger.debug("%s", message)
            warnings.append(message)
            continue
        if entry["op"] == "add":
            live[entry["id"]] = entry
        else:
            live.pop(entry["id"], None)
    return sorted(live.values(), key=lambda e: int(e["id"]), reverse=True)


def _malformed(entry: Any) -> str:
    if not isinstance(entry, dict):
        return f"a JSON {type(entry).__name__}, not an object"
    if entry.get("op") not in ("add", "del"):
        return f"op {entry.get('op')!r} is neither 'add' nor 'del'"
    rid = entry.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool):
        return f"id {rid!r} is not an integer"
    if entry["op"] == "add" and not isinstance(entry.get("kind"), str):
        return f"kind {entry.get('kind')!r} is not a string"
    return ""


def reap_dead_owners(state_dir: Path | str | None = None, *, dry_run: bool = False) -> ReapResult:
    """Undo every resource recorded by an owner that is no longer alive.

    Raises :class:`StateDirError` if *state_dir* is not private to this user.
    """
    directory = Path(state_dir) if state_dir is not None else default_state_dir()
    result = ReapResult(reaped=[], errors=[], journals=0)
    if not check_state_dir(directory, create=False):
        return result
    token = _reaping.set((*_reaping.get(), os.path.realpath(directory)))
    try:
        _reap_directory(directory, result, dry_run)
    finally:
        _reaping.reset(token)
    return result


def _reap_directory(directory: Path, result: ReapResult, dry_run: bool) -> None:
    for path in sorted(directory.glob("*.jsonl")):
        try:
            pid_s, start_s = path.stem.split("-")[:2]
            owner_pid, owner_start = int(pid_s), (None if start_s == "None" else int(start_s))
        except ValueError:
            result.warnings.append(f"{path}: not a journal name (PID-STARTTIME-N.jsonl), skipped")
            continue
        if _alive(owner_pid, owner_start):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            continue  # another reaper (a concurrent pytest run) finished it
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            result.warnings.append(f"{path}: a symlink, not a journal: skipped")
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                result.warnings.append(f"{path}: not a regular file of uid {os.geteuid()}: skipped")
                continue
            try:
                # Two runs starting at once must not both replay one journal.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue
            _reap_one(path, fd, result, dry_run)
        finally:
            os.close(fd)


def _reap_one(path: Path, fd: int, result: ReapResult, dry_run: bool) -> None:
    if not path.exists():
        return  # reaped by another run between our open and our lock
    result.journals += 1
    with os.fdopen(os.dup(fd), "rb") as f:
        data = f.read()
    for record in _read_journal(path, data, result.warnings):
        kind = record["kind"]
        reaper = _reaper_for(kind)
        shown = {k: v for k, v in record.items() if k not in ("op", "id", "kind")}
        if reaper is None:
            result.errors.append(f"{path.name}: no reaper for kind {kind!r}")
            continue
        try:
            # Checked here too, so that a dry run shows the refusals a reap would
            # meet, and so that kinds reaped by other modules get the same guard.
            check = _CHECKS.get(kind)
            if check is not None:
                check(record)
            if not dry_run:
                reaper(record)
        except RefusedToReap as exc:
            result.errors.append(f"refused to reap {kind} {shown}: {exc}")
            continue
        except Exception as exc:  # a reap must go on past one failure
            logger.debug("reaping %s failed", record, exc_info=True)
            result.errors.append(f"{kind} {shown}: {exc}")
            continue
        result.reaped.append(record)
    if not dry_run:
        path.unlink(missing_ok=True)


def _check_cgroup(record: dict[str, Any]) -> None:
    text = record.get("path")
    if not isinstance(text, str) or not cgroups.is_below_cgroup_mount(text):
        raise RefusedToReap(f"{text!r} is not a cgroup below a cgroup mount")
    if not Path(text).name.startswith(PROJECT_PREFIXES):
        raise RefusedToReap(f"cgroup {text}: not a name this project makes")


def _check_process(record: dict[str, Any]) -> None:
    recorded_process_alive(record)


def _check_path(record: dict[str, Any]) -> None:
    check_owned_path(record.get("path"))


def _check_mount(record: dict[str, Any]) -> None:
    check_owned_path(record.get("target"), any_component=True)


def _check_link(record: dict[str, Any]) -> None:
    _checked_name(record, "name")
    _checked_name(record, "netns", optional=True)


def _check_netns(record: dict[str, Any]) -> None:
    _checked_name(record, "name")


def _check_cgroup_tree(record: dict[str, Any]) -> None:
    # cni's reaper kills every task below "/<parent>" in every hierarchy: an
    # empty or crafted parent would be the whole host.
    parent = record.get("parent")
    if not isinstance(parent, str) or not _NAME.match(parent.removeprefix("/")):
        raise RefusedToReap(f"cgroup parent {parent!r} is not a cgroup this project makes")


def _check_sandbox_cgroups(record: dict[str, Any]) -> None:
    paths = record.get("cgroups", [])
    if not isinstance(paths, list):
        raise RefusedToReap(f"cgroups {paths!r} is not a list")
    for text in paths:
        if not isinstance(text, str) or not cgroups.is_below_cgroup_mount(text):
            raise RefusedToReap(f"{text!r} is not a cgroup below a cgroup mount")
        if not any(part.startswith(PROJECT_PREFIXES) for part in Path(text).parts):
            raise RefusedToReap(f"cgroup {text}: no component is a name this project makes")


# Checked before every reap of these kinds (and in a dry run): the refusals.
_CHECKS: dict[str, Reaper] = {
    "cgroup-tree": _check_cgroup_tree,
    "systemd-sandbox-cgroups": _check_sandbox_cgroups,
    "process": _check_process,
    "path": _check_path,
    "mount": _check_mount,
    "netns": _check_netns,
    "link": _check_link,
    "cgroup": _check_cgroup,
}
